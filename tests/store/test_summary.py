"""summary: adaptive bins keep every value in exactly one bucket, counts are preserved, rows
equal a plain computation, and what the summary holds is bounded."""

from __future__ import annotations

import tracemalloc
from typing import Any

import hypothesis.strategies as st
from hypothesis import given, settings

from nvmefs.store import summary as sm
from nvmefs.store.summary import BUCKETS, Histogram, Summary, summarize

T0 = 1_796_000_000 * 10**9


@given(
    values=st.lists(
        st.tuples(st.sampled_from("abc"), st.integers(0, (1 << 63) - 1)), min_size=1, max_size=80
    )
    | st.lists(st.tuples(st.sampled_from("ab"), st.integers(0, 5000)), min_size=1, max_size=80),
    n=st.sampled_from([2, 4, 16, 256]),
    min_width=st.sampled_from([1, 3, 10**9]),
    anchored=st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_every_value_lands_in_exactly_one_bucket_and_counts_are_preserved(
    values: list[tuple[str, int]], n: int, min_width: int, anchored: bool
) -> None:
    h = Histogram(n, min_width, 0 if anchored else None)
    for key, v in values:
        assert 0 <= h.add(key, v) < n
    assert h.origin is not None
    assert h.origin % h.width == 0
    ratio = h.width // min_width
    assert h.width % min_width == 0 and ratio & (ratio - 1) == 0  # a power of two
    if anchored:
        assert h.origin == 0
    # The merged counts are exactly what bucketing every value at the final width gives.
    expected: dict[str, list[int]] = {k: [0] * n for k, _ in values}
    for key, v in values:
        assert h.origin <= v < h.origin + n * h.width
        expected[key][h.bucket_of(v)] += 1
    assert h.series == expected
    assert sum(map(sum, h.series.values())) == len(values)
    assert (h.lo, h.hi) == (min(v for _, v in values), max(v for _, v in values))


@given(values=st.lists(st.integers(0, 10**15), min_size=2, max_size=60))
@settings(max_examples=200, deadline=None)
def test_bins_grow_only_as_far_as_the_values_need(values: list[int]) -> None:
    h = Histogram(BUCKETS, 1)
    for v in values:
        h.add("k", v)
    assert h.lo is not None and h.hi is not None
    if h.width > 1:  # it grew: the values seen span more than a quarter of the buckets
        assert (h.hi - h.lo + 1) * 4 > BUCKETS * h.width


@given(
    values=st.lists(st.integers(0, 10**6), min_size=1, max_size=60),
    columns=st.integers(1, 300),
    start=st.none() | st.just(0),
)
@settings(max_examples=200, deadline=None)
def test_a_view_regroups_every_count_into_one_column(
    values: list[int], columns: int, start: int | None
) -> None:
    h = Histogram(BUCKETS, 1, 0 if start == 0 else None)
    for v in values:
        h.add("k", v)
    first, per, cols = h.view(columns, ["k", "missing"], start=start)
    assert len(cols["k"]) <= columns
    assert sum(cols["k"]) == len(values) and sum(cols["missing"]) == 0
    for v in values:  # each value's column covers it
        j = (v - first) // per
        assert 0 <= j < len(cols["k"]) and cols["k"][j] > 0


def nvme(
    wall: Any,
    status: str = "0x281",
    slba: Any = 2048,
    nlb: Any = 8,
    ctrl: Any = "nvme0",
    nsid: Any = 1,
    **more: Any,
) -> dict[str, Any]:
    rec = {
        "seq": 1,
        "kind": "nvme",
        "wall_ns": wall,
        "status": status,
        "name": "Unrecovered Read Error",
        "ctrl": ctrl,
        "nsid": nsid,
        "slba": slba,
        "nlb": nlb,
        "disk": None,
    }
    rec.update(more)
    return rec


record = st.one_of(
    st.builds(
        nvme,
        wall=st.integers(T0, T0 + 10**15),
        status=st.sampled_from(["0x281", "0x4281", "0x287", "0x2", "0x0", "0x4000", "0x8000"]),
        slba=st.none() | st.integers(0, 1 << 40),
        nlb=st.none() | st.integers(1, 256),
        ctrl=st.sampled_from(["nvme0", "nvme1", None]),
        nsid=st.sampled_from([1, 2, None, -1, "1", True]),
    ),
    st.builds(
        lambda k: {"kind": k, "message": "m", "wall_ns": T0}, st.sampled_from(["start", "notice"])
    ),
    st.just(None),
)


def plain(records: list[Any]) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The rows the summary must have, computed the obvious way."""
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in records:
        if not isinstance(r, dict) or r["kind"] != "nvme":
            continue
        word = int(r["status"], 16)
        if word > 0x7FFF or not word & 0x7FF or type(r["nsid"]) not in (int, type(None)):
            continue
        if r["nsid"] is not None and r["nsid"] < 0:
            continue
        row = rows.setdefault(
            (r["ctrl"], r["nsid"], r["status"]),
            {"count": 0, "first": None, "last": None, "lo": None, "hi": None},
        )
        row["count"] += 1
        w = r["wall_ns"]
        row["first"] = w if row["first"] is None else min(row["first"], w)
        row["last"] = w if row["last"] is None else max(row["last"], w)
        if r["slba"] is not None:
            end = r["slba"] + (r["nlb"] or 1) - 1
            row["lo"] = r["slba"] if row["lo"] is None else min(row["lo"], r["slba"])
            row["hi"] = end if row["hi"] is None else max(row["hi"], end)
    return rows


@given(records=st.lists(record, max_size=120))
@settings(max_examples=200, deadline=None)
def test_rows_and_bins_equal_a_plain_computation(records: list[Any]) -> None:
    s = summarize(records)
    assert s.records == len(records)
    assert s.records == s.errors + s.skipped + s.bad + s.before_since + s.overflow
    want = plain(records)
    got = {
        (ns.key[0], ns.key[1], r.status): {
            "count": r.count,
            "first": r.first_ns,
            "last": r.last_ns,
            "lo": r.lba_min,
            "hi": r.lba_max,
        }
        for ns in s.namespaces.values()
        for r in ns.rows.values()
    }
    assert got == want
    assert s.errors == sum(r["count"] for r in want.values())
    # Every error is in exactly one time bin, and in one LBA bin or counted as without LBA.
    assert sum(map(sum, s.time.series.values())) == s.errors
    assert (
        sum(sum(map(sum, ns.lba.series.values())) + ns.no_lba for ns in s.namespaces.values())
        == s.errors
    )
    for ns in s.namespaces.values():
        for status, counts in ns.lba.series.items():
            assert sum(counts) == ns.rows[status].count - sum(
                1
                for r in records
                if isinstance(r, dict)
                and r["kind"] == "nvme"
                and type(r["nsid"]) in (int, type(None))  # True == 1, but a bool is a bad record
                and (r["ctrl"], r["nsid"], r["status"]) == (ns.key[0], ns.key[1], status)
                and r["slba"] is None
            )


def test_successes_host_events_and_bad_records_are_counted_apart() -> None:
    s = summarize(
        [
            nvme(T0),
            nvme(T0, status="0x0"),  # success (log=all)
            nvme(T0, status="0x4000"),  # DNR only: still a success
            {"kind": "notice", "message": "replayed", "wall_ns": T0},
            {"kind": "missed", "missed": 3},
            None,  # a line that was no JSON object
            nvme(T0, status="0x8000"),  # not a 15-bit word
            nvme(T0, status="0X281"),
            nvme("1"),
            nvme(T0, slba=-1),
            nvme(T0, nlb=1.5),
            nvme(True),
        ]
    )
    assert (s.records, s.errors, s.skipped, s.bad) == (12, 1, 4, 7)
    assert s.missed == 3 and s.as_dict()["missed"] == 3


def test_since_leaves_out_older_records_and_counts_them() -> None:
    s = summarize([nvme(T0), nvme(T0 + 5), nvme(T0 + 10)], since_ns=T0 + 5)
    assert (s.errors, s.before_since) == (2, 1)
    (ns,) = s.namespaces.values()
    assert ns.rows["0x281"].first_ns == T0 + 5


def test_rate_per_day_counts_a_burst_as_one_day_and_a_long_span_as_its_days() -> None:
    burst = summarize([nvme(T0), nvme(T0 + 1)])
    assert burst.namespaces[("nvme0", 1, None)].rows["0x281"].rate_per_day() == 2.0
    week = summarize([nvme(T0 + k * sm.DAY_NS) for k in range(8)])  # 8 errors over 7 days
    assert week.namespaces[("nvme0", 1, None)].rows["0x281"].rate_per_day() == 8 / 7


def test_lba_range_covers_the_whole_command_and_the_map_its_first_lba() -> None:
    s = summarize(
        [nvme(T0, slba=100, nlb=8), nvme(T0, slba=5000, nlb=256), nvme(T0, slba=7, nlb=None)]
    )
    ns = s.namespaces[("nvme0", 1, None)]
    row = ns.rows["0x281"]
    assert (row.lba_min, row.lba_max) == (7, 5255)
    assert ns.lba.origin == 0
    counts = ns.lba.series["0x281"]
    assert {i for i, c in enumerate(counts) if c} == {ns.lba.bucket_of(v) for v in (7, 100, 5000)}


def test_namespaces_and_statuses_beyond_the_bounds_are_counted_as_overflow() -> None:
    recs = [nvme(T0, ctrl=f"nvme{i}") for i in range(sm.MAX_NAMESPACES + 5)]
    recs += [nvme(T0, status=f"0x{0x200 + i:x}") for i in range(1, sm.MAX_STATUSES + 4)]
    s = summarize(recs)
    assert len(s.namespaces) == sm.MAX_NAMESPACES
    assert s.overflow == 5 + 4  # nvme0 already has 0x281: 3 more statuses fit, 4 do not
    assert max(len(ns.rows) for ns in s.namespaces.values()) == sm.MAX_STATUSES
    assert s.records == s.errors + s.overflow


def test_strings_are_escaped_and_capped() -> None:
    s = summarize([nvme(T0, ctrl="nvme0\x1b[2J\u202e" + "x" * 500, name="bad\nname")])
    (ns,) = s.namespaces.values()
    ctrl = ns.key[0]
    assert ctrl is not None and "\x1b" not in ctrl and "\u202e" not in ctrl
    assert ctrl.startswith("nvme0\\x1b[2J\\u202e") and len(ctrl.encode()) <= sm.MAX_TEXT
    assert ns.rows["0x281"].name == "bad\\x0aname"


def test_identify_names_the_controllers_namespaces_only() -> None:
    s = summarize([nvme(T0), nvme(T0, ctrl="nvme1")])
    s.identify("nvme1", "S123", "Model\x07X")
    by_ctrl = {ns.key[0]: ns for ns in s.namespaces.values()}
    assert (by_ctrl["nvme1"].serial, by_ctrl["nvme1"].model) == ("S123", "Model\\x07X")
    assert by_ctrl["nvme0"].serial is None


def test_json_form_holds_the_rows_and_the_series() -> None:
    s = summarize([nvme(T0, slba=10), nvme(T0 + 3 * 10**9, status="0x4281", slba=None)])
    d = s.as_dict()
    assert (d["records"], d["errors"], d["first_ns"], d["last_ns"]) == (2, 2, T0, T0 + 3 * 10**9)
    (ns,) = d["namespaces"]
    assert [r["status"] for r in ns["statuses"]] == ["0x281", "0x4281"]
    assert (
        ns["no_lba"] == 1 and sum(ns["lba_map"]["0x281"]) == 1 and sum(ns["lba_map"]["0x4281"]) == 0
    )
    assert {k: sum(v) for k, v in ns["over_time"].items()} == {"0x281": 1, "0x4281": 1}
    assert all(len(v) == BUCKETS for v in ns["over_time"].values())


def test_an_empty_summary_has_no_namespaces_and_no_times() -> None:
    d = Summary().as_dict()
    assert d["namespaces"] == [] and d["first_ns"] is None and d["errors"] == 0


def test_memory_does_not_grow_with_the_number_of_records() -> None:
    def records(n: int) -> Any:
        for i in range(n):  # 8 namespaces, 7 statuses, LBAs and times all over
            yield nvme(
                T0 + i * 7 * 10**9,
                status=("0x281", "0x4281", "0x287", "0x280", "0x4287", "0x2", "0x6")[i % 7],
                slba=(i * 2654435761) % (1 << 40),
                ctrl=f"nvme{i % 4}",
                nsid=1 + i % 2,
            )

    def peak(n: int) -> int:
        tracemalloc.start()
        try:
            s = summarize(records(n))
            assert s.errors == n
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(5_000), peak(40_000)
    assert large < 2 << 20, large  # the bins of 56 series, whatever the count
    assert large < small * 1.5, (small, large)
