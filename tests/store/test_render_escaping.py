"""One escaping rule for every string an entry carries (issue 18, item 5): whatever the strings
of an NvmeEvent or a HostEvent hold, the text line is one line with no control character, its
escapes can be undone exactly, and the JSON line gives the strings back as they were."""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

import hypothesis.strategies as st
from hypothesis import example, given

from nvmefs.nvme import tables
from nvmefs.nvme.status import Translator
from nvmefs.store import events
from nvmefs.store.events import HostEvent, NvmeEvent
from nvmefs.store.render import (
    INFO_MAX,
    RECORD_KEYS,
    REPLAYED_MARK,
    Clock,
    Renderer,
    cap,
    escape,
    info,
)

T = Translator()
WALL = 1_764_672_000_123_456_789
FORGED = "nvme0\n[1] Specific NVMe error encountered: FORGED2\x1b[31m"

# What a terminal, a pager or a line splitter acts on: C0, DEL, C1 (all Cc), the line and
# paragraph separators, format characters (bidi controls among them), lone surrogates.
FORBIDDEN = ("Cc", "Cf", "Zl", "Zp", "Cs")
# Characters worth drawing often: each breaks, drives or reorders a line somewhere.
NASTY = [
    *"\n\r\t\x00\x1b\x7f\\",
    *"\x85\x9b\x9c",  # NEL, CSI, ST
    *"\u2028\u2029",
    *"\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069",
    *"\u200b\u200d\ufeff\U000e0041",  # zero width, BOM, a tag character
    "\ud800",  # a lone surrogate, as JSON's "\ud800" gives one
    "\U0010ffff",
    "é",
    "\u3000",
]
CHARS = st.one_of(st.characters(exclude_categories=()), st.sampled_from(NASTY))
TEXT = st.text(CHARS, max_size=80)
OPT_TEXT = st.none() | TEXT
# Undoes `escape`: a backslash always starts a whole escape, or the text is not one of ours.
ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}|)")


def unescape(text: str) -> str:
    def one(m: re.Match[str]) -> str:
        code = m.group(1)
        assert code, f"a backslash that starts no escape in {text!r}"
        return "\\" if code == "\\" else chr(int(code[1:], 16))

    return ESCAPE.sub(one, text)


def renderer(fmt: str = "full") -> Renderer:
    return Renderer(Clock("jiffies", hz=1000), fmt)


def assert_one_clean_line(line: str) -> None:
    assert line.endswith("\n") and line.count("\n") == 1
    assert len(line.splitlines()) == 1  # str.splitlines: \x1c-\x1e, \x85, \u2028 too
    body = line[:-1]
    bad = [ch for ch in body if unicodedata.category(ch) in FORBIDDEN]
    assert bad == [], (bad, line)
    body.encode()  # UTF-8, as the view serves it
    text = body.split("] ", 1)[1].removesuffix(REPLAYED_MARK)
    assert len(text.encode()) <= INFO_MAX
    unescape(text)  # every backslash starts a whole escape, even where the cap cut


@given(
    ctrl=OPT_TEXT,
    disk=OPT_TEXT,
    op=OPT_TEXT,
    file=OPT_TEXT,
    full=st.booleans(),
    replayed=st.booleans(),
)
@example(ctrl=FORGED, disk=None, op=None, file=FORGED, full=True, replayed=True)
def test_any_strings_of_an_nvme_event_make_one_clean_line_and_round_trip_in_json(
    ctrl: str | None,
    disk: str | None,
    op: str | None,
    file: str | None,
    full: bool,
    replayed: bool,
) -> None:
    # `full`: all the context, the engines' common case, formatted in one step. `file`: the
    # owner of its LBA, a file any user may have named.
    ctx: dict[str, Any] = dict(nsid=1, qid=2, cid=3, opcode=2, slba=4, nlb=8, retries=0)
    place = None if file is None else events.Place("file", fs="ext4", file=file, file_range=(0, 9))
    ev = NvmeEvent(
        T.decode(0x4281),
        ctrl=ctrl,
        disk=disk,
        op=op,
        replayed=replayed,
        place=place,
        **(ctx if full else {}),
    )
    entry = (1, 5_000_000_000, WALL, ev)
    for fmt in ("full", "seed"):
        assert_one_clean_line(renderer(fmt).line(entry))
    line = renderer("json").line(entry)
    assert line.isascii() and line.endswith("\n") and line.count("\n") == 1
    rec = json.loads(line)
    assert (rec["ctrl"], rec["disk"], rec["op"]) == (ctrl, disk, op)
    assert rec.get("file") == file
    if file is not None and ctrl is disk is op is None:  # what comes first leaves it room
        assert " file=" in renderer().line(entry)


@given(
    kind=TEXT,
    message=TEXT,
    fields=st.dictionaries(TEXT, st.one_of(TEXT, st.integers(), st.none()), max_size=6),
    replayed=st.booleans(),
)
@example(kind="notice", message=FORGED, fields={FORGED: FORGED}, replayed=False)
def test_any_strings_of_a_host_event_make_one_clean_line_and_round_trip_in_json(
    kind: str, message: str, fields: dict[str, Any], replayed: bool
) -> None:
    ev = HostEvent(kind, message, fields, replayed=replayed)
    entry = (1, 5_000_000_000, WALL, ev)
    for fmt in ("full", "seed"):
        assert_one_clean_line(renderer(fmt).line(entry))
    line = renderer("json").line(entry)
    assert line.isascii() and line.endswith("\n") and line.count("\n") == 1
    rec = json.loads(line)
    assert (rec["kind"], rec["message"]) == (kind, message)
    own = {k: v for k, v in fields.items() if k not in RECORD_KEYS}
    assert {k: rec[k] for k in own} == own


@given(text=st.text(CHARS), ascii_only=st.booleans())
def test_escaping_is_undone_exactly_and_leaves_nothing_forbidden(
    text: str, ascii_only: bool
) -> None:
    shown = escape(text, ascii_only)
    assert unescape(shown) == text
    assert not any(unicodedata.category(ch) in FORBIDDEN for ch in shown)
    if ascii_only:
        assert shown.isascii() and shown.isprintable()


@given(text=st.text(CHARS), limit=st.integers(0, 300))
def test_a_cap_never_cuts_an_escape_or_a_character_in_half(text: str, limit: int) -> None:
    shown = escape(text)
    capped = cap(shown, limit)
    assert len(capped.encode()) <= limit and shown.startswith(capped)
    assert text.startswith(unescape(capped))  # whole escapes only
    if capped != shown:  # what is lost is at most the escape or the character cut in half
        assert len(capped.encode()) > limit - len("\\U0010ffff")


def test_what_nvmefs_makes_of_its_tables_is_plain_ascii_for_every_status_and_opcode() -> None:
    # The NVMe text escapes only the event's strings: the rest, from the tables, needs none.
    def plain(text: str) -> bool:
        return text.isascii() and text.isprintable() and "\\" not in text

    for profile in tables.PROFILES:
        tr = Translator(profile)
        for word in range(0x8000):
            assert plain(info(NvmeEvent(tr.decode(word)))), (profile, hex(word))
    for opcode in range(0x100):
        for admin in (False, True):
            ev = NvmeEvent(T.decode(0x4281), opcode=opcode, admin=admin)
            assert plain(info(ev)), (hex(opcode), admin)


def test_the_forged_line_of_the_issue_is_one_line_with_its_escapes() -> None:
    ev = NvmeEvent(T.decode(0x4281), ctrl=FORGED, replayed=True)
    line = renderer().line((1, 0, WALL, ev))
    assert line.count("\n") == 1 and "\x1b" not in line
    assert line.endswith(
        " ctrl=nvme0\\x0a[1] Specific NVMe error encountered: FORGED2\\x1b[31m (replayed)\n"
    )


def test_the_host_events_existing_escape_form_is_kept_and_the_backslash_escaped() -> None:
    ev = HostEvent(events.HOST_ERROR, "open /dev/a\nb failed", {"path": "C:\\x0a\x00"})
    assert info(ev) == "nvmefs host-error: open /dev/a\\x0ab failed path=C:\\\\x0a\\x00"


def test_unicode_text_stays_as_it_is_and_the_ascii_form_escapes_it() -> None:
    ev = HostEvent(events.NOTICE, "dévice ノード", {"ctrl": "nvme0"})
    assert info(ev) == "nvmefs notice: dévice ノード ctrl=nvme0"
    assert info(ev, ascii_only=True) == "nvmefs notice: d\\xe9vice \\u30ce\\u30fc\\u30c9 ctrl=nvme0"


def test_bidi_controls_and_line_separators_are_escaped() -> None:
    ev = HostEvent(events.NOTICE, "a\u202eb\u2066c\u2028d\u2029e\u200ff")
    assert info(ev) == "nvmefs notice: a\\u202eb\\u2066c\\u2028d\\u2029e\\u200ff"


def test_a_field_cannot_take_the_place_of_the_records_own_keys() -> None:
    ev = HostEvent(events.NOTICE, "m", {"seq": 99, "kind": "nvme", "info": "x", "ctrl": "a"})
    rec = json.loads(renderer("json").line((7, 0, WALL, ev)))
    assert (rec["seq"], rec["kind"], rec["ctrl"]) == (7, events.NOTICE, "a")
    assert rec["info"] == "nvmefs notice: m seq=99 kind=nvme info=x ctrl=a"


def test_a_cut_at_the_cap_drops_a_partial_escape_and_keeps_whole_ones() -> None:
    assert cap("ab\\x1b", 5) == "ab"  # half of \x1b
    assert cap("ab\\x1b", 6) == "ab\\x1b"
    assert cap("ab\\\\x1", 5) == "ab\\\\x"  # an escaped backslash, then the letters x, 1
    assert cap("ab\\\\\\x1b", 6) == "ab\\\\"  # an escaped backslash, then half of \x1b
    assert cap("ab\\u202e", 7) == "ab"
    assert cap("ab\\U000e0041", 11) == "ab"
    assert cap("é" * 200, 255) == "é" * 127
