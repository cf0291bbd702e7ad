"""A folded entry (issue 20) as the outputs show it and the report counts it: its text says how
many more and where, its JSON record carries `repeats` and `lba_range`, and a summary counts the
1 + repeats errors it stands for, exactly."""

from __future__ import annotations

import json
import random
from typing import Any

from nvmefs.nvme.status import Translator
from nvmefs.store.events import NvmeEvent, Place
from nvmefs.store.render import INFO_MAX, Renderer, fold_words, info
from nvmefs.store.summary import BUCKETS, Histogram, summarize

T = Translator()
WALL = 1_764_672_000_123_456_789


def ev(**kw: Any) -> NvmeEvent:
    fields: dict[str, Any] = dict(ctrl="nvme0", nsid=1, qid=3, cid=17, opcode=2, slba=2048)
    fields.update(nlb=8, retries=0)
    fields.update(kw)
    return NvmeEvent(T.decode(0x281), **fields)


def entry(event: NvmeEvent, seq: int = 1) -> tuple[int, int, int, NvmeEvent]:
    return (seq, 5_000_000_000, WALL, event)


# -- text and JSON -------------------------------------------------------------------------------


def test_the_text_line_of_a_folded_entry_ends_with_how_many_more_and_their_lbas() -> None:
    folded = ev(repeats=4999, lba_range=(2048, 90111))
    assert info(folded).endswith(" retries=0 (4999 more, LBA 2048..90111)")
    assert info(folded) == info(ev()) + " (4999 more, LBA 2048..90111)"
    # Without context (the slow path) and without any LBA (admin commands).
    bare = ev(qid=None, cid=None, repeats=2, lba_range=None, slba=None, nlb=None)
    assert info(bare).endswith(" retries=0 (2 more)")
    # The seed format keeps the count: its bare status, then how many more.
    assert info(folded, "seed") == "Specific NVMe error encountered: Status = 0x281 (4999 more)"
    assert info(ev(), "seed") == "Specific NVMe error encountered: Status = 0x281"
    assert fold_words(ev()) == ""


def test_the_count_survives_the_info_cap_whole() -> None:
    place = Place("file", file="/" + "d/" * 200 + "f", file_range=(0, 4096))
    big = (1 << 63) - 1
    folded = ev(place=place, repeats=big, lba_range=(0, (1 << 64) - 1))
    text = info(folded)
    assert len(text.encode()) <= INFO_MAX
    assert text.endswith(f" ({big} more, LBA 0..{(1 << 64) - 1})")
    ctrl = "\u202e" * 200  # escaped, long: the cut is in the context, never in the count
    text = info(ev(ctrl=ctrl, repeats=3, lba_range=(1, 2)))
    assert len(text.encode()) <= INFO_MAX and text.endswith(" (3 more, LBA 1..2)")


def test_json_records_always_carry_repeats_and_lba_range() -> None:
    r = Renderer()
    plain = json.loads(r.json_line(entry(ev())))
    assert (plain["repeats"], plain["lba_range"]) == (0, None)
    folded = json.loads(r.json_line(entry(ev(repeats=9, lba_range=(2048, 4095)))))
    assert (folded["repeats"], folded["lba_range"]) == (9, [2048, 4095])
    assert folded["info"].endswith("(9 more, LBA 2048..4095)")
    assert r.line(entry(ev(repeats=9, lba_range=(2048, 4095)))).endswith(
        " (9 more, LBA 2048..4095)\n"
    )


# -- the report's summary ------------------------------------------------------------------------


def record(**kw: Any) -> dict[str, Any]:
    return Renderer().record(entry(ev(**kw)))


def test_a_folded_entry_counts_as_the_errors_it_stands_for() -> None:
    s = summarize(
        [
            record(),  # one error at 2048
            record(slba=10_000, repeats=99, lba_range=(10_000, 20_007)),  # 100 errors
            record(slba=None, nlb=None, repeats=4),  # 5 errors, no LBA
        ]
    )
    assert (s.records, s.errors, s.folded) == (3, 106, 103)
    assert s.records == s.errors - s.folded + s.skipped + s.bad + s.before_since + s.overflow
    (ns,) = s.namespaces.values()
    row = ns.rows["0x281"]
    assert row.count == 106 and (row.lba_min, row.lba_max) == (2048, 20_007)
    assert ns.no_lba == 5
    assert sum(ns.lba.series["0x281"]) + ns.no_lba == 106
    assert sum(s.time.series[(ns.key, "0x281")]) == 106
    # The 99 others are spread over the buckets of their range, none outside it.
    counts = ns.lba.series["0x281"]
    lo, hi = ns.lba.bucket_of(10_000), ns.lba.bucket_of(20_007)
    assert sum(counts[lo : hi + 1]) == 100 and counts[ns.lba.bucket_of(2048)] >= 1
    assert s.as_dict()["folded"] == 103


def test_records_without_the_keys_of_folding_count_one_each_and_bad_ones_are_bad() -> None:
    old = record()
    del old["repeats"], old["lba_range"]  # a journal written before folding
    bad = [
        record(repeats=-1),
        {**record(), "repeats": 1.5},
        {**record(), "repeats": True},
        {**record(), "repeats": 2, "lba_range": [5, 4]},
        {**record(), "repeats": 2, "lba_range": [5]},
        {**record(), "repeats": 2, "lba_range": "5..9"},
    ]
    s = summarize([old, *bad])
    assert (s.errors, s.bad, s.folded) == (1, len(bad), 0)


def test_spread_keeps_every_count_whatever_the_range_and_the_growth() -> None:
    rnd = random.Random(7)
    for _ in range(200):
        h = Histogram(BUCKETS, 1, 0)
        total = 0
        for _ in range(rnd.randrange(1, 20)):
            lo = rnd.randrange(0, 1 << rnd.choice([8, 20, 40]))
            hi = lo + rnd.randrange(0, 1 << rnd.choice([0, 8, 30]))
            n = rnd.randrange(0, 5000)
            if rnd.random() < 0.5:
                h.add("k", lo, n)
            else:
                h.spread("k", lo, hi, n)
            total += n
            assert h.origin is not None and h.origin <= lo
            assert h.hi is not None and h.hi < h.origin + h.n * h.width
        assert sum(h.series["k"]) == total
