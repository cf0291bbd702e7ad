"""The JSON line of an entry is exactly json.dumps of its record, though Renderer.json_line
builds an NvmeEvent's line by hand: for any values an event holds (hostile strings, None, big
ints, odd types), under every clock and format; and `_iso`, which keeps the text of the last
second, says what the datetime formula says for every wall time."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import re
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import example, given, settings

from nvmefs.nvme import tables
from nvmefs.nvme.status import Status, Translator
from nvmefs.store import render
from nvmefs.store.events import HOST_KINDS, KMSG, OWNERS, HostEvent, NvmeEvent, Place
from nvmefs.store.render import CLOCKS, FORMATS, Clock, Renderer, _iso, cap, escape
from nvmefs.store.ring import Entry

WALL = 1_764_672_000_123_456_789
# The wall times datetime can show: years 1 to 9999.
WALL_MIN = -62_135_596_800 * 10**9
WALL_MAX = 253_402_300_800 * 10**9 - 1
TRANSLATORS = {profile: Translator(profile) for profile in tables.PROFILES}

NASTY = [*'\n\r\t\x00\x1b\x7f\\"/', *"\x85\x9b\u2028\u2029\u202e\ufeff", "\ud800", "\udfff"]
CHARS = st.one_of(st.characters(exclude_categories=()), st.sampled_from(NASTY))
TEXT = st.text(CHARS, max_size=40)
OPT_TEXT = st.none() | TEXT
BIG = st.one_of(st.integers(0, 0xFFFF), st.integers(-(2**80), 2**80))
OPT_INT = st.none() | BIG
PAIR = st.none() | st.tuples(BIG, BIG)

# What a storm logs: a failed read with all its context, and one with the file behind its LBA.
READ = NvmeEvent(
    Translator().decode(0x281),
    ctrl="nvme7",
    disk="nvme7n1",
    op="read",
    nsid=1,
    qid=3,
    cid=417,
    opcode=2,
    slba=123456789,
    nlb=8,
    retries=0,
)
PLACED = dataclasses.replace(
    READ,
    place=Place("file", "nvme7n1p1", "ext4", 15432098, "/srv/a\nb\u00e9", (4096, 8192)),
    repeats=4,
    lba_range=(9, 99),
    origin=KMSG,
    replayed=True,
)
# The fields of an NvmeEvent but its status.
NVME_FIELDS = [f.name for f in dataclasses.fields(NvmeEvent) if f.name != "status"]


class Op(enum.IntEnum):
    READ = 2


class Text(str):
    pass


# What no event of nvmefs holds, but json.dumps writes all the same: the line must not differ.
ODD_VALUES = [
    True,
    False,
    1.5,
    float("nan"),
    Op.READ,
    Text("nvme\n0"),
    [1, 2],
    (1, 2, 3),
    (True, 1),
    (1, 1.5),
    (Op.READ, 3),
    ("a", None),
    {"a": 1},
]
ODD = st.one_of(
    st.sampled_from(ODD_VALUES),
    st.floats(allow_nan=True, allow_infinity=True),
    st.builds(Text, TEXT),
    st.lists(BIG, max_size=3),
)


def expected(r: Renderer, entry: Entry) -> str:
    return json.dumps(r.record(entry), separators=(",", ":")) + "\n"


def assert_same(r: Renderer, entry: Entry) -> None:
    """json_line(entry) is json.dumps of the record, or fails as it does."""
    try:
        want = expected(r, entry)
    except Exception as e:
        with pytest.raises(type(e)):
            r.json_line(entry)
        return
    assert r.json_line(entry) == want


statuses = st.builds(
    lambda profile, word: TRANSLATORS[profile].decode(word),
    st.sampled_from(tables.PROFILES),
    st.integers(0, 0x7FFF),
)
places = st.builds(
    Place,
    owner=st.one_of(st.sampled_from(OWNERS), TEXT),
    partition=OPT_TEXT,
    fs=OPT_TEXT,
    fs_block=OPT_INT,
    file=OPT_TEXT,
    file_range=PAIR,
    reason=OPT_TEXT,
)
nvme_events = st.builds(
    NvmeEvent,
    status=statuses,
    ctrl=OPT_TEXT,
    nsid=OPT_INT,
    qid=OPT_INT,
    cid=OPT_INT,
    opcode=st.none() | st.integers(0, 0xFF) | BIG,
    admin=st.booleans(),
    slba=OPT_INT,
    nlb=OPT_INT,
    retries=OPT_INT,
    disk=OPT_TEXT,
    op=OPT_TEXT,
    replayed=st.booleans(),
    origin=st.none() | st.just(KMSG) | TEXT,
    place=st.none() | places,
    repeats=st.integers(0, 10) | BIG,
    lba_range=PAIR,
)
renderers = st.builds(
    Renderer,
    st.builds(Clock, st.sampled_from(CLOCKS), st.sampled_from([100, 250, 300, 1000])),
    st.sampled_from(FORMATS),
)
entries_at = st.tuples(
    st.integers(0, 2**64), st.integers(0, 2**63), st.integers(WALL_MIN, WALL_MAX)
)


@settings(max_examples=400)
@given(r=renderers, at=entries_at, ev=nvme_events)
@example(r=Renderer(Clock("jiffies", 1000)), at=(1, 719_193_448_123, WALL), ev=READ)
@example(r=Renderer(Clock("realtime", 1000)), at=(1, 719_193_448_123, WALL), ev=PLACED)
def test_an_nvme_events_line_is_json_dumps_of_its_record_and_is_built_by_hand(
    r: Renderer, at: tuple[int, int, int], ev: NvmeEvent
) -> None:
    entry = (*at, ev)
    line = r.json_line(entry)
    assert line == expected(r, entry)
    assert r._nvme_json_line(entry) == line  # not json.dumps's work after all
    json.loads(line)


@pytest.mark.parametrize("odd", ODD_VALUES, ids=repr)
def test_each_odd_value_in_each_field_gives_json_dumps_s_line_too(odd: Any) -> None:
    r = Renderer(Clock("jiffies", 1000))
    for field in NVME_FIELDS:
        for ev in (READ, PLACED):
            assert_same(r, (5, 7_000_000_000, WALL, dataclasses.replace(ev, **{field: odd})))
    for field in (f.name for f in dataclasses.fields(Place)):
        assert PLACED.place is not None
        place = dataclasses.replace(PLACED.place, **{field: odd})
        assert_same(r, (5, 7_000_000_000, WALL, dataclasses.replace(READ, place=place)))
    for i in range(3):
        at: list[Any] = [5, 7_000_000_000, WALL]
        at[i] = odd
        assert_same(r, (*at, READ))


@given(
    r=renderers,
    ev=nvme_events,
    field=st.sampled_from(NVME_FIELDS),
    odd=ODD,
)
def test_odd_values_of_an_nvme_event_give_json_dumps_s_line_too(
    r: Renderer, ev: NvmeEvent, field: str, odd: Any
) -> None:
    setattr(ev, field, odd)
    assert_same(r, (5, 7_000_000_000, WALL, ev))


@given(
    r=renderers,
    place=places,
    field=st.sampled_from([f.name for f in dataclasses.fields(Place)]),
    odd=ODD,
)
def test_odd_values_of_a_place_give_json_dumps_s_line_too(
    r: Renderer, place: Place, field: str, odd: Any
) -> None:
    place = dataclasses.replace(place, **{field: odd})
    ev = NvmeEvent(Translator().decode(0x281), ctrl="nvme0", slba=8, place=place)
    assert_same(r, (5, 7_000_000_000, WALL, ev))


@given(
    r=renderers,
    at=st.tuples(ODD | BIG, ODD | BIG, ODD | st.integers(WALL_MIN, WALL_MAX)),
    ev=nvme_events,
)
def test_odd_numbers_of_an_entry_give_json_dumps_s_line_too(
    r: Renderer, at: tuple[Any, Any, Any], ev: NvmeEvent
) -> None:
    assert_same(r, (*at, ev))


def test_statuses_of_other_types_and_equal_ones_are_not_mixed_up() -> None:
    r = Renderer(Clock("jiffies", 1000))
    base = Translator().decode(0x281)
    # Equal as dataclasses (1 == True), written differently by json.dumps: each its own.
    for st_ in (base, dataclasses.replace(base, sct=True), dataclasses.replace(base, sct=2.0)):
        for _ in range(2):
            assert_same(r, (1, 0, WALL, NvmeEvent(st_, ctrl="nvme0")))

    class Mine(Status):
        __slots__ = ()

        def as_dict(self) -> dict[str, Any]:
            return {"mine": True}

    mine = Mine(**{f.name: getattr(base, f.name) for f in dataclasses.fields(Status)})
    line = r.json_line((1, 0, WALL, NvmeEvent(mine)))
    assert line == expected(r, (1, 0, WALL, NvmeEvent(mine))) and '"mine":true' in line


@pytest.mark.parametrize("profile", tables.PROFILES)
def test_every_status_word_under_every_profile(profile: str) -> None:
    tr = Translator(profile)
    r = Renderer(Clock("jiffies", 1000))
    for word in range(0x8000):
        ev = NvmeEvent(tr.decode(word), ctrl="nvme0", nsid=1, qid=1, cid=word, opcode=2,
                       slba=word * 8, nlb=8, retries=0)  # fmt: skip
        entry = (word, word * 10**6, WALL + word * 10**6, ev)
        assert r.json_line(entry) == expected(r, entry), (profile, hex(word))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("clock", CLOCKS)
def test_every_clock_and_format_with_and_without_a_place(clock: str, fmt: str) -> None:
    r = Renderer(Clock(clock, 250), fmt)
    for ev in (
        READ,
        PLACED,
        NvmeEvent(Translator().decode(0x4281), "nvme0", 1, 3, 417, 2, False, 123, 8, 0),
        NvmeEvent(Translator("linux-5.14").decode(0x6), admin=True, opcode=0x06),
        NvmeEvent(Translator().decode(0), place=Place("unresolved", reason="no partition")),
    ):
        for entry in ((1, 0, WALL, ev), (2**64 - 1, 2**63 - 1, -1, ev), (3, 10**12, 0, ev)):
            line = r.json_line(entry)
            assert line == expected(r, entry) and r._nvme_json_line(entry) == line


@given(
    r=renderers,
    kind=st.one_of(st.sampled_from(HOST_KINDS), TEXT),
    message=TEXT,
    fields=st.dictionaries(
        st.one_of(TEXT, st.sampled_from(sorted(render.RECORD_KEYS))),
        st.one_of(TEXT, BIG, st.none(), st.booleans(), st.floats(), st.lists(BIG, max_size=3)),
        max_size=6,
    ),
    origin=st.none() | st.just(KMSG),
    replayed=st.booleans(),
    at=entries_at,
)
def test_a_host_events_line_is_json_dumps_of_its_record(
    r: Renderer,
    kind: str,
    message: str,
    fields: dict[str, Any],
    origin: str | None,
    replayed: bool,
    at: tuple[int, int, int],
) -> None:
    entry = (*at, HostEvent(kind, message, fields, replayed=replayed, origin=origin))
    assert r.json_line(entry) == expected(r, entry)
    assert r._nvme_json_line(entry) is None


# -- _iso ----------------------------------------------------------------------------------------


def iso_by_datetime(wall_ns: int) -> str:
    dt = datetime.datetime.fromtimestamp(wall_ns // 1_000_000_000, tz=datetime.UTC).replace(
        microsecond=wall_ns // 1000 % 1_000_000
    )
    return dt.isoformat(timespec="microseconds").replace("+00:00", "Z")


ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


@settings(max_examples=500)
@given(
    walls=st.lists(
        st.one_of(
            st.integers(WALL_MIN, WALL_MAX),
            st.integers(-(10**12), 10**12),
            st.integers(WALL - 3 * 10**9, WALL + 3 * 10**9),
        ),
        min_size=1,
        max_size=8,
    )
)
@example(walls=[0, -1, 1, 999, 1000, -1000, -1001, 10**9 - 1, 10**9, -(10**9), WALL_MIN, WALL_MAX])
@example(walls=[WALL, WALL + 1, WALL - 10**9, WALL, WALL + 10**9 - 1, WALL + 10**9])
def test_iso_is_the_datetime_formula_for_every_wall_time(walls: list[int]) -> None:
    for wall in walls:  # in any order: the second kept is never shown for another
        text = _iso(wall)
        assert text == iso_by_datetime(wall) and ISO.fullmatch(text)
        assert Clock("realtime", 1000).ticks(0, wall) == text


@pytest.mark.parametrize(
    "wall", [WALL_MIN - 1, WALL_MAX + 1, 2**100, -(2**100), True, False, 10**9 * 1.5]
)
def test_iso_fails_or_not_as_the_formula_does_out_of_range_and_on_other_types(wall: Any) -> None:
    try:
        want = iso_by_datetime(wall)
    except Exception as e:
        with pytest.raises(type(e)):
            _iso(wall)
        return
    assert _iso(wall) == want


def test_a_missed_line_shows_the_same_wall_time() -> None:
    r = Renderer(Clock("jiffies", 1000), "json")
    for wall in (WALL, 0, -5, WALL_MAX):
        assert json.loads(r.missed_json_line(3, 1, wall))["wall"] == iso_by_datetime(wall)


# -- cap -------------------------------------------------------------------------------------------


def cap_by_regex(text: str, limit: int) -> str:
    raw = text.encode()
    if len(raw) <= limit:
        return text
    cut = raw[:limit].decode("utf-8", "ignore")
    m = render._CUT_ESCAPE.search(cut)
    return cut if m is None else cut[: m.start(1)]


@settings(max_examples=300)
@given(
    text=st.text(st.one_of(CHARS, st.sampled_from(["\\", "x", "u", "U", "0", "f"]))),
    limit=st.integers(0, 300),
)
def test_cap_cuts_where_its_regex_says(text: str, limit: int) -> None:
    for t in (escape(text), escape(text, ascii_only=True)):
        assert cap(t, limit) == cap_by_regex(t, limit)
