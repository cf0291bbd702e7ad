"""Text and JSON forms of ring entries.

The text line is the seed's `[<ticks>] <info>\\n`. With the default clock the ticks are what the
kernel's jiffies counter would read at that moment (INITIAL_JIFFIES + uptime * HZ), so a line
can be held next to dmesg and next to the seed's `[4295386259]` numbers. The info text is capped
at 255 bytes, the seed's `char info[256]`.

One escaping rule, `escape`, holds for every text this module makes, whatever the entry's source
(live, replayed from a journal, read from the kernel): every string an event carries is escaped
as `info` puts it in the text, and the rest of the text is what nvmefs makes from numbers and
its own tables, plain printable ASCII. So a text line is one entry: it has no character but its
final newline that a terminal, a pager or a line splitter acts on (no C0 or C1 control, no DEL,
no line or paragraph separator, no bidi control that reorders what is shown), and what was
escaped can be read back exactly, as the backslash itself is escaped. JSON lines need no rule
of their own: json.dumps escapes every control character and, with its default ensure_ascii,
everything outside ASCII, so a JSON line is one line of ASCII that gives the strings back as
they were. (The JSON line of an NvmeEvent is built by hand, the bytes json.dumps would give, as
the journal renders every entry of an error storm on the event loop.)
"""

from __future__ import annotations

import datetime
import gzip
import json
import os
import re
import unicodedata
from typing import Any

from nvmefs.nvme import tables
from nvmefs.nvme.status import Status
from nvmefs.store.events import CLEARED, KMSG, HostEvent, NvmeEvent, Place
from nvmefs.store.ring import Entry

INFO_MAX = 255
FORMATS = ("full", "seed", "json")  # json: the text file shows JSON lines too
CLOCKS = ("jiffies", "uptime", "realtime")
SEED_PREFIX = "Specific NVMe error encountered: Status = "
# What the text line of an entry replayed from the journal ends with (the seed format, whose
# lines are the bare status, shows none).
REPLAYED_MARK = " (replayed)"
# What the text line of an entry read from the kernel log at start ends with.
KMSG_MARK = " (from the kernel log)"
# The keys of a host event's JSON record that are the record's own: no field of the event is
# written under one of them.
RECORD_KEYS = frozenset(
    {"seq", "ticks", "jiffies", "monotonic_ns", "wall_ns", "wall", "kind", "info", "message"}
    | {"replayed", "origin"}
)


def kernel_hz(release: str | None = None) -> int:
    """CONFIG_HZ of the running kernel, from /boot/config-* or /proc/config.gz; 1000 if unknown."""
    release = release or os.uname().release
    for text in (_read_text(f"/boot/config-{release}"), _read_text("/proc/config.gz")):
        for line in text.splitlines():
            if line.startswith("CONFIG_HZ="):
                try:
                    return int(line.split("=", 1)[1])
                except ValueError:
                    break
    return 1000


def _read_text(path: str) -> str:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rt") as gz:
                return gz.read()
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def initial_jiffies(hz: int) -> int:
    # include/linux/jiffies.h: ((unsigned long)(unsigned int) (-300*HZ)) on 64-bit.
    return (-300 * hz) & 0xFFFFFFFF


class Clock:
    """Turns an entry's CLOCK_MONOTONIC / wall-clock nanoseconds into the ticks shown."""

    def __init__(self, kind: str = "jiffies", hz: int | None = None) -> None:
        if kind not in CLOCKS:
            raise ValueError(f"clock {kind!r}: expected one of {', '.join(CLOCKS)}")
        self.kind = kind
        self.hz = hz if hz is not None else kernel_hz()
        self._base = initial_jiffies(self.hz)

    def jiffies(self, mono_ns: int) -> int:
        # CLOCK_MONOTONIC counts from boot and stops in suspend, as jiffies do.
        return self._base + mono_ns * self.hz // 1_000_000_000

    def ticks(self, mono_ns: int, wall_ns: int) -> str:
        if self.kind == "jiffies":
            return str(self.jiffies(mono_ns))
        if self.kind == "uptime":
            return f"{mono_ns // 1_000_000_000:5d}.{mono_ns // 1000 % 1_000_000:06d}"
        return _iso(wall_ns)


def _iso_datetime(wall_ns: int) -> str:
    # Integer arithmetic: a float of the nanoseconds rounds the microseconds.
    dt = datetime.datetime.fromtimestamp(wall_ns // 1_000_000_000, tz=datetime.UTC).replace(
        microsecond=wall_ns // 1000 % 1_000_000
    )
    return dt.isoformat(timespec="microseconds").replace("+00:00", "Z")


# The last whole second `_iso` formatted, and its text up to the microseconds.
_iso_second: tuple[int, str] = (0, _iso_datetime(0)[:-7])


def _iso(wall_ns: int) -> str:
    """`wall_ns` as UTC ISO 8601 to the microsecond (`_iso_datetime`); the text of the second is
    made once per second, not per entry."""
    global _iso_second
    if type(wall_ns) is not int:
        return _iso_datetime(wall_ns)
    second, prefix = _iso_second
    if wall_ns // 1_000_000_000 != second:
        second = wall_ns // 1_000_000_000
        prefix = _iso_datetime(second * 1_000_000_000)[:-7]  # less its "000000Z"
        _iso_second = (second, prefix)
    return f"{prefix}{wall_ns // 1000 % 1_000_000:06d}Z"


# -- the escaping rule ---------------------------------------------------------------------------

# The Unicode categories `escape` shows as escapes, besides the backslash:
#   Cc  C0 controls (newline, ESC...), DEL and the C1 controls U+0080-U+009F (U+009B is a CSI,
#       U+0085 a line end to str.splitlines): they break or drive a terminal;
#   Zl, Zp  U+2028 and U+2029, which editors, browsers and str.splitlines take as line ends;
#   Cf  format characters: the bidi marks, embeddings, overrides and isolates (U+061C, U+200E,
#       U+200F, U+202A-U+202E, U+2066-U+2069) reorder the rest of the line as a terminal shows
#       it (the "Trojan Source" attack), and the others (zero-width characters, the BOM, tag
#       characters) are invisible: either way what an administrator reads is not what is there;
#   Cs  lone surrogates (JSON's "\ud800" makes one): no UTF-8 can hold them;
#   Cn  unassigned code points: whatever a later Unicode makes of them (a new format character,
#       say) is escaped already.
# Every other character is shown as it is (the text file is UTF-8): letters of any script,
# spaces, symbols, private-use characters.
ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Cn"})
# What is not printable ASCII, or is the backslash: the characters `escape` looks at.
_NOT_PLAIN = re.compile(r"[^ -\[\]-~]")
# A text cut in an escape: a backslash that starts an escape (after any escaped backslashes)
# and the part of the escape that made it before the cut.
_CUT_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*(\\(?:x[0-9a-f]?|u[0-9a-f]{0,3}|U[0-9a-f]{0,7})?)\Z")


def escape_code(ch: str) -> str:
    """The escape of one character: \\xNN below U+0100, \\uNNNN in the BMP, \\UNNNNNNNN above
    (Python's own forms, lowercase hex)."""
    o = ord(ch)
    if o < 0x100:
        return f"\\x{o:02x}"
    if o < 0x10000:
        return f"\\u{o:04x}"
    return f"\\U{o:08x}"


def _escape_one(m: re.Match[str]) -> str:
    ch = m.group()
    if ch == "\\":
        return "\\\\"
    return escape_code(ch) if unicodedata.category(ch) in ESCAPED_CATEGORIES else ch


def _escape_ascii(m: re.Match[str]) -> str:
    ch = m.group()
    return "\\\\" if ch == "\\" else escape_code(ch)


def escape(text: str, ascii_only: bool = False) -> str:
    """`text` as the text outputs show it: the backslash as \\\\, each character of
    ESCAPED_CATEGORIES as its `escape_code`, and (with `ascii_only`, for outputs that take ASCII
    only) every other character outside printable ASCII as its `escape_code` too.

    The result has no character of ESCAPED_CATEGORIES, and every backslash in it starts one
    whole escape: the text is unambiguous, and undoing the escapes gives `text` back."""
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text  # the common case: nothing to look at
    return _NOT_PLAIN.sub(_escape_ascii if ascii_only else _escape_one, text)


def cap(text: str, limit: int = INFO_MAX) -> str:
    """An escaped text cut to at most `limit` bytes of UTF-8, never inside a character or an
    escape (half an escape would make what follows the text, the replayed mark, say, look
    escaped)."""
    raw = text.encode()
    if len(raw) <= limit:
        return text
    cut = raw[:limit].decode("utf-8", "ignore")
    if "\\" not in cut[-9:]:  # a cut escape is at most 9 characters, a backslash first
        return cut
    m = _CUT_ESCAPE.search(cut)
    return cut if m is None else cut[: m.start(1)]


# What depends only on the status word (or only on the opcode) is built once, not per line.
_STATUS_TEXT: dict[tuple[int, str], str] = {}
_OPCODE_TEXT: dict[tuple[int, bool], str] = {}


def _status_text(st: Status) -> str:
    key = (st.status, st.profile)
    text = _STATUS_TEXT.get(key)
    if text is None:
        head = "NVMe command completed: Status = " if st.ok else SEED_PREFIX
        parts = [f"{head}0x{st.status:x}", f"({st.name})", f"SCT=0x{st.sct:x} SC=0x{st.sc:02x}"]
        if st.crd:
            parts.append(f"CRD={st.crd}")
        if st.more:
            parts.append("MORE")
        if st.dnr:
            parts.append("DNR")
        parts.append(
            f"blk_status={st.blk_status}" + (f" ({st.blk_string})" if st.blk_string else "")
        )
        text = _STATUS_TEXT[key] = " ".join(parts)
    return text


def _opcode_text(opcode: int, admin: bool) -> str:
    text = _OPCODE_TEXT.get((opcode, admin))
    if text is None:
        text = _OPCODE_TEXT[(opcode, admin)] = (
            f"opcode=0x{opcode:02x} ({tables.opcode_name(opcode, admin)})"
        )
    return text


def fold_words(ev: NvmeEvent, fmt: str = "full") -> str:
    """What ends the info text of a folded entry (one that stands for 1 + `repeats` failed
    requests): ` (N more, LBA a..b)`, or ` (N more)` without an LBA range or in the seed
    format; "" for an entry that folds nothing."""
    n = ev.repeats
    if not n:
        return ""
    if ev.lba_range is None or fmt == "seed":
        return f" ({n} more)"
    return f" ({n} more, LBA {ev.lba_range[0]}..{ev.lba_range[1]})"


def nvme_info(ev: NvmeEvent, fmt: str = "full", ascii_only: bool = False) -> str:
    """The info text of an NVMe completion: its status, then its context, then how many more
    like it a folded entry stands for (`fold_words`), at most INFO_MAX bytes (the fold's words
    are kept whole: the context is cut before them). Its strings (ctrl, disk, op) are escaped
    by `escape`; the rest is what nvmefs makes (numbers, status and opcode names from its
    tables), plain printable ASCII."""
    st = ev.status
    fold = fold_words(ev, fmt) if ev.repeats else ""
    if fmt == "seed":
        return f"{SEED_PREFIX}0x{st.status:x}{fold}"
    if ev.place is None and None not in (
        ev.ctrl, ev.nsid, ev.qid, ev.cid, ev.opcode, ev.slba, ev.nlb, ev.retries
    ):  # fmt: skip
        # The common case, a completion with all its context, in one formatting step.
        text = (
            f"{_status_text(st)} ctrl={escape(ev.ctrl, ascii_only)} nsid={ev.nsid} qid={ev.qid} "  # type: ignore[arg-type]
            f"cid={ev.cid} {_opcode_text(ev.opcode, ev.admin)} slba={ev.slba} nlb={ev.nlb} "  # type: ignore[arg-type]
            f"retries={ev.retries}"
        )
        if len(text) + len(fold) <= INFO_MAX and text.isascii():
            return text + fold
        return cap(text, INFO_MAX - len(fold)) + fold
    parts = [_status_text(st)]
    if ev.ctrl is not None:
        parts.append(f"ctrl={escape(ev.ctrl, ascii_only)}")
    if ev.disk is not None:
        parts.append(f"disk={escape(ev.disk, ascii_only)}")
    for key in ("nsid", "qid", "cid"):
        value = getattr(ev, key)
        if value is not None:
            parts.append(f"{key}={value}")
    if ev.opcode is not None:
        parts.append(_opcode_text(ev.opcode, ev.admin))
    elif ev.op is not None:
        parts.append(f"op={escape(ev.op, ascii_only)}")
    for key in ("slba", "nlb", "retries"):
        value = getattr(ev, key)
        if value is not None:
            parts.append(f"{key}={value}")
    if ev.place is not None:
        parts += place_words(ev.place, ascii_only)
    return cap(" ".join(parts), INFO_MAX - len(fold)) + fold


def place_words(place: Place, ascii_only: bool = False) -> list[str]:
    """What a text line says of the owner of an entry's LBA: the file and its byte range, or
    that it is free space or metadata; nothing when it is not resolved (JSON says why)."""
    if place.owner == "file" and place.file is not None:
        words = [f"file={escape(place.file, ascii_only)}"]
        if place.file_range is not None:
            words.append(f"bytes={place.file_range[0]}..{place.file_range[1]}")  # as `locate`
        return words
    if place.owner in ("free", "metadata"):
        return [f"owner={place.owner}"]
    return []


# Fields of host events the text line leaves out: their message says it already.
TEXT_SILENT_FIELDS = frozenset({CLEARED})


def host_info(ev: HostEvent, ascii_only: bool = False) -> str:
    """The info text of a host event: its kind, message and fields, at most INFO_MAX bytes.
    Every one of its strings (kind, message, each field's key and value) is escaped by
    `escape`, whatever made the event: nvmefs, a journal replayed, the kernel."""
    extra = " ".join(
        f"{escape(str(k), ascii_only)}={escape(str(v), ascii_only)}"
        for k, v in ev.fields.items()
        if v is not None and k not in TEXT_SILENT_FIELDS
    )
    text = f"nvmefs {escape(ev.kind, ascii_only)}: {escape(ev.message, ascii_only)}"
    return cap(f"{text} {extra}" if extra else text)


def info(event: Any, fmt: str = "full", ascii_only: bool = False) -> str:
    """The info text of an entry's event, as every text output shows it: one line's worth,
    every string of the event escaped by `escape` (with `ascii_only`, all of it printable ASCII),
    at most INFO_MAX bytes."""
    if isinstance(event, NvmeEvent):
        return nvme_info(event, fmt, ascii_only)
    return host_info(event, ascii_only)


def missed_info(missed: int) -> str:
    """The text of a reader's missed line (JSON lines carry it too, as their info)."""
    noun = "entry" if missed == 1 else "entries"
    why = "overwritten or cleared before this reader reached them"
    return f"nvmefs: {missed} {noun} missed ({why})"


# The keys of an entry's JSON record that say what owns its LBA, and the Place field of each
# (replay reads them back by this table too).
PLACE_KEYS = {
    "owner": "owner",
    "file": "file",
    "file_range": "file_range",
    "partition": "partition",
    "fs": "fs",
    "fs_block": "fs_block",
    "owner_reason": "reason",
}


def place_record(place: Place) -> dict[str, Any]:
    """The PLACE_KEYS of an entry's JSON record (file_range as a list)."""
    rec = {key: getattr(place, name) for key, name in PLACE_KEYS.items()}
    if place.file_range is not None:
        rec["file_range"] = list(place.file_range)
    return rec


# -- JSON lines of NvmeEvents, by hand ------------------------------------------------------------

# The string encoder json.dumps uses (with its default ensure_ascii).
_json_str = json.encoder.encode_basestring_ascii


def _json_values(values: tuple[Any, ...]) -> tuple[str, ...] | None:
    """Each value as json.dumps writes it, for a str, an int, a bool or None; None if any value
    is of another type (a float, a subclass...), which only json.dumps itself should write."""
    out = []
    for value in values:
        kind = type(value)
        if kind is str:
            out.append(_json_str(value))
        elif kind is int:
            out.append(str(value))
        elif value is None:
            out.append("null")
        elif kind is bool:
            out.append("true" if value else "false")
        else:
            return None
    return tuple(out)


def _json_pair(value: Any) -> str | None:
    """A (first, last) range as json.dumps writes the list of it (null for None); None if it
    is not a pair of scalars."""
    if value is None:
        return "null"
    if type(value) is not tuple or len(value) != 2:
        return None
    if type(value[0]) is type(value[1]) is int:
        return f"[{value[0]},{value[1]}]"
    pair = _json_values(value)
    return None if pair is None else f"[{pair[0]},{pair[1]}]"


def _place_json(place: Place) -> str | None:
    """The keys of `place_record` in a JSON line, after a comma; None as `_json_values`."""
    if type(place) is not Place:
        return None
    values = _json_values(
        (place.owner, place.file, place.partition, place.fs, place.fs_block, place.reason)
    )
    file_range = _json_pair(place.file_range)
    if values is None or file_range is None:
        return None
    owner, file, partition, fs, fs_block, reason = values
    return (
        f',"owner":{owner},"file":{file},"file_range":{file_range},"partition":{partition},'
        f'"fs":{fs},"fs_block":{fs_block},"owner_reason":{reason}'
    )


_NVME_KIND = _json_str(NvmeEvent.kind)

# The JSON of each Status's as_dict (without its braces), by id, with the Status itself (which
# keeps the id its own).
_STATUS_JSON: dict[int, tuple[Status, str]] = {}
_STATUS_JSON_MAX = 4096


def _status_json(st: Status) -> str:
    """`st.as_dict()` as json.dumps writes it in a record, without its braces."""
    hit = _STATUS_JSON.get(id(st))
    if hit is not None and hit[0] is st:
        return hit[1]
    text = json.dumps(st.as_dict(), separators=(",", ":"))[1:-1]
    if len(_STATUS_JSON) >= _STATUS_JSON_MAX:
        _STATUS_JSON.clear()
    _STATUS_JSON[id(st)] = (st, text)
    return text


class Renderer:
    """Renders entries as text lines or JSON lines under one clock and format."""

    def __init__(self, clock: Clock | None = None, fmt: str = "full") -> None:
        if fmt not in FORMATS:
            raise ValueError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
        self.clock = clock or Clock()
        self.fmt = fmt

    def line(self, entry: Entry) -> str:
        if self.fmt == "json":
            return self.json_line(entry)
        _seq, mono_ns, wall_ns, event = entry
        mark = ""
        if self.fmt != "seed":
            mark = (KMSG_MARK if event.origin == KMSG else "") + (
                REPLAYED_MARK if event.replayed else ""
            )
        return f"[{self.clock.ticks(mono_ns, wall_ns)}] {info(event, self.fmt)}{mark}\n"

    def missed_line(self, missed: int, mono_ns: int, wall_ns: int) -> str:
        if self.fmt == "json":
            return self.missed_json_line(missed, mono_ns, wall_ns)
        return f"[{self.clock.ticks(mono_ns, wall_ns)}] {missed_info(missed)}\n"

    def record(self, entry: Entry) -> dict[str, Any]:
        seq, mono_ns, wall_ns, event = entry
        rec: dict[str, Any] = {
            "seq": seq,
            "ticks": self.clock.ticks(mono_ns, wall_ns),
            "jiffies": self.clock.jiffies(mono_ns),
            "monotonic_ns": mono_ns,
            "wall_ns": wall_ns,
            "wall": _iso(wall_ns),
            "kind": event.kind,
            "info": info(event, self.fmt),
        }
        if isinstance(event, NvmeEvent):
            rec.update(event.status.as_dict())
            rec.update(
                ctrl=event.ctrl,
                nsid=event.nsid,
                qid=event.qid,
                cid=event.cid,
                opcode=event.opcode,
                opcode_name=(
                    None if event.opcode is None else tables.opcode_name(event.opcode, event.admin)
                ),
                admin=event.admin,
                disk=event.disk,
                op=event.op,
                slba=event.slba,
                nlb=event.nlb,
                retries=event.retries,
                # Always there (0 and null unless folded): the failed requests this entry
                # stands for are 1 + repeats.
                repeats=event.repeats,
                lba_range=None if event.lba_range is None else list(event.lba_range),
            )
            if event.place is not None:
                rec.update(place_record(event.place))
        elif isinstance(event, HostEvent):
            rec["message"] = event.message
            # A field never takes the place of the record's own keys (a field "seq" would
            # renumber the entry in the journal).
            rec.update((k, v) for k, v in event.fields.items() if k not in RECORD_KEYS)
        if event.origin is not None:
            rec["origin"] = event.origin
        if event.replayed:
            rec["replayed"] = True
        return rec

    def json_line(self, entry: Entry) -> str:
        line = self._nvme_json_line(entry)
        if line is None:
            line = json.dumps(self.record(entry), separators=(",", ":")) + "\n"
        return line

    def _nvme_json_line(self, entry: Entry) -> str | None:
        """The JSON line of an NvmeEvent entry, as json.dumps writes its `record` (same keys,
        same order), built as a string; None for any other entry, or for one with a value that
        only json.dumps should write."""
        seq, mono_ns, wall_ns, ev = entry
        if type(ev) is not NvmeEvent or type(ev.status) is not Status:
            return None
        if not type(seq) is type(mono_ns) is type(wall_ns) is int:
            return None
        clock = self.clock
        jiffies = clock.jiffies(mono_ns)
        if type(jiffies) is not int:
            return None
        if clock.kind == "jiffies":
            ticks = f'"{jiffies}"'
        else:
            ticks = _json_str(clock.ticks(mono_ns, wall_ns))
        # The numbers go into the line as they are when all are ints (an f-string writes an int
        # as json.dumps does), the common case.
        numbers: tuple[Any, ...] | None
        numbers = (ev.nsid, ev.qid, ev.cid, ev.opcode, ev.slba, ev.nlb, ev.retries, ev.repeats)
        if set(map(type, numbers)) != {int}:
            numbers = _json_values(numbers)
        opcode = ev.opcode
        texts = _json_values(
            (
                info(ev, self.fmt),
                ev.ctrl,
                None if opcode is None else tables.opcode_name(opcode, ev.admin),
                ev.admin,
                ev.disk,
                ev.op,
            )
        )
        lba_range = _json_pair(ev.lba_range)
        if numbers is None or texts is None or lba_range is None:
            return None
        nsid, qid, cid, opcode_, slba, nlb, retries, repeats = numbers
        info_, ctrl, opcode_name, admin, disk, op = texts
        line = (
            f'{{"seq":{seq},"ticks":{ticks},"jiffies":{jiffies},"monotonic_ns":{mono_ns},'
            # _iso's text needs no escape: digits, "-", "T", ":", "." and "Z".
            f'"wall_ns":{wall_ns},"wall":"{_iso(wall_ns)}","kind":{_NVME_KIND},"info":{info_},'
            f"{_status_json(ev.status)},"
            f'"ctrl":{ctrl},"nsid":{nsid},"qid":{qid},"cid":{cid},"opcode":{opcode_},'
            f'"opcode_name":{opcode_name},"admin":{admin},"disk":{disk},"op":{op},'
            f'"slba":{slba},"nlb":{nlb},"retries":{retries},"repeats":{repeats},'
            f'"lba_range":{lba_range}'
        )
        if ev.place is not None:
            place = _place_json(ev.place)
            if place is None:
                return None
            line += place
        if ev.origin is not None:
            origin = _json_values((ev.origin,))
            if origin is None:
                return None
            line += f',"origin":{origin[0]}'
        if ev.replayed:
            line += ',"replayed":true'
        return line + "}\n"

    def missed_json_line(self, missed: int, mono_ns: int, wall_ns: int) -> str:
        return (
            json.dumps(
                {
                    "kind": "missed",
                    "info": missed_info(missed),
                    "missed": missed,
                    "monotonic_ns": mono_ns,
                    "wall_ns": wall_ns,
                    "wall": _iso(wall_ns),
                },
                separators=(",", ":"),
            )
            + "\n"
        )
