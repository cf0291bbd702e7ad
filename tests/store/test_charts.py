"""charts: the terminal drawing fits its width and shows colour only when asked; the SVG is
well-formed, holds both charts per namespace with every error in a bar, and stays bounded."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any

import hypothesis.strategies as st
from hypothesis import given, settings

from nvmefs.store import charts
from nvmefs.store.summary import DAY_NS, Summary, summarize

T0 = 1_796_000_000 * 10**9
SVG = "{http://www.w3.org/2000/svg}"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def nvme(wall: int, status: str = "0x281", slba: int | None = 2048, **more: Any) -> dict[str, Any]:
    rec = {
        "kind": "nvme",
        "wall_ns": wall,
        "status": status,
        "name": "Unrecovered Read Error",
        "ctrl": "nvme0",
        "nsid": 1,
        "slba": slba,
        "nlb": 8,
    }
    rec.update(more)
    return rec


def sample() -> Summary:
    recs = [nvme(T0 + k * DAY_NS // 7, slba=2048 + 8 * (k % 5)) for k in range(40)]
    recs += [
        nvme(T0 + k * DAY_NS, status="0x4287", slba=100_000, name="Deallocated") for k in range(9)
    ]
    recs += [nvme(T0, ctrl="nvme1", disk="nvme1n1", slba=None, status="0x280")]
    recs += [{"kind": "notice", "message": "x", "wall_ns": T0}]
    s = summarize(recs)
    s.identify("nvme0", "S4EWNX0R123456", "Samsung SSD 980 PRO 1TB")
    return s


@given(width=st.integers(0, 240), colour=st.booleans(), unicode=st.booleans())
@settings(max_examples=60, deadline=None)
def test_text_fits_its_width_and_has_escape_codes_only_with_colour(
    width: int, colour: bool, unicode: bool
) -> None:
    out = charts.text(sample(), width, colour=colour, unicode=unicode)
    shown = ANSI.sub("", out)
    assert ("\x1b" in out) == colour
    assert "\x1b" not in shown  # nothing but colour codes
    assert all(len(line) <= max(width, charts.MIN_WIDTH) for line in shown.splitlines())
    if not unicode:
        assert shown.isascii()


def test_text_rows_and_chart_totals_say_the_counts() -> None:
    out = charts.text(sample(), 80)
    assert "nvmefs report: 50 NVMe errors on 2 namespaces" in out
    assert "nvme0 nsid 1  serial S4EWNX0R123456  model Samsung SSD 980 PRO 1TB" in out
    assert re.search(r"0x281 +Unrecovered Read Error +40 ", out)
    assert re.search(r"0x4287 +Deallocated +9 +1\.1/day", out)  # 9 over 8 days
    assert "LBA 2048..2087" in out and "LBA 100000..100007" in out
    assert "1 error without an LBA (not in the map)" in out
    # Every chart row ends with its total: LBA map and errors over time each count them all.
    totals = [int(m) for m in re.findall(r"\|\s+(\d+)$", out, re.M)]
    assert sorted(totals) == sorted([40, 9, 40, 9, 1])


def test_svg_is_well_formed_with_both_charts_per_namespace() -> None:
    doc = charts.svg(sample())
    root = ET.fromstring(doc)
    assert root.tag == f"{SVG}svg"
    groups = {g.get("id"): g for g in root.iter(f"{SVG}g")}
    for k in (1, 2):
        assert groups[f"lba-map-{k}"].get("class") == "chart lba-map"
        assert groups[f"errors-over-time-{k}"].get("class") == "chart errors-over-time"
    # Every error of a namespace is in a bar of its time chart (its tooltips say how many).
    for k, total in ((1, 49), (2, 1)):
        tips = [r.find(f"{SVG}title") for r in groups[f"errors-over-time-{k}"].iter(f"{SVG}rect")]
        counts = []
        for tip in tips:
            if tip is not None:
                m = re.match(r"\S+: (\d+) error", tip.text or "")
                assert m is not None, tip.text
                counts.append(int(m.group(1)))
        assert sum(counts) == total
    lba_bars = [r for r in groups["lba-map-1"].iter(f"{SVG}rect") if r.get("class") == "bar"]
    assert {r.get("data-status") for r in lba_bars} == {"0x281", "0x4287"}
    assert not [r for r in groups["lba-map-2"].iter(f"{SVG}rect") if r.get("class") == "bar"]


def test_svg_of_hostile_strings_is_still_well_formed() -> None:
    s = summarize([nvme(T0, ctrl='<x a="1">&amp;\x00\x1b\ufffe\ud800]]>', name="</svg>\x0c")])
    root = ET.fromstring(charts.svg(s))
    texts = " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
    assert '<x a="1">&amp;\\x00\\x1b\\ufffe\\ud800]]>' in texts and "</svg>\\x0c" in texts


def test_svg_of_nothing_says_so() -> None:
    root = ET.fromstring(charts.svg(Summary()))
    assert [t.text for t in root.iter(f"{SVG}text") if t.get("class") == "empty"] == [
        "no NVMe errors"
    ]


def test_svg_size_is_bounded_whatever_the_summary_holds() -> None:
    recs = [
        nvme(T0 + i * 7919 * 10**9, status=f"0x{0x200 + s:x}", ctrl=f"nvme{n}", slba=i * 104729)
        for n in range(64)
        for s in range(1, 33)
        for i in range(8)
    ]
    s = summarize(recs)
    doc = charts.svg(s)
    root = ET.fromstring(doc)
    assert (
        len([g for g in root.iter(f"{SVG}g") if g.get("class") == "namespace"])
        == charts.SVG_NAMESPACES
    )
    assert "48 more namespaces not drawn" in doc
    assert len(doc) < 4 << 20
    bars = [r for r in root.iter(f"{SVG}rect") if r.get("class") == "bar"]
    assert len({r.get("data-status") for r in bars}) == charts.TOP_STATUSES + 1  # and "other"
