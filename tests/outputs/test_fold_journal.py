"""Folded entries (issue 20) in the journal: written with their count and LBA range, replayed
with them, and a journal of before folding still replays, each of its entries one request."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nvmefs import options
from nvmefs.nvme.status import Translator
from nvmefs.outputs.journal import Journal
from nvmefs.outputs.replay import Replay
from nvmefs.store.events import NvmeEvent
from nvmefs.store.render import Renderer
from nvmefs.store.ring import EVENT, DebugRing

T = Translator()


def nvme(slba: int, repeats: int = 0, lba_range: tuple[int, int] | None = None) -> NvmeEvent:
    return NvmeEvent(
        T.decode(0x4281), "sim0", 1, 1, 7, 0x02, False, slba, 8, 0,
        repeats=repeats, lba_range=lba_range,
    )  # fmt: skip


def attached(path: Path) -> tuple[Journal, DebugRing]:
    j = Journal.open(options.parse([f"journal={path}", "capacity=64"], allow_fuse=False))
    assert j is not None
    ring = DebugRing(64)
    j.attach(ring)
    return j, ring


def test_a_folded_entry_round_trips_through_the_journal(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    j, ring = attached(path)
    ring.append(nvme(0))
    ring.append(nvme(8, repeats=4999, lba_range=(8, 40_007)))
    j.close()
    recs = [json.loads(line) for line in path.read_bytes().splitlines()]
    assert [(r["repeats"], r["lba_range"]) for r in recs] == [(0, None), (4999, [8, 40_007])]
    j2, ring2 = attached(path)
    replayed = [e[EVENT] for e in ring2 if isinstance(e[EVENT], NvmeEvent)]
    j2.close()
    assert [(e.repeats, e.lba_range, e.replayed) for e in replayed] == [
        (0, None, True),
        (4999, (8, 40_007), True),
    ]
    r = Renderer()
    assert r.line((1, 0, 0, replayed[1])).endswith(" (4999 more, LBA 8..40007) (replayed)\n")


def test_a_line_of_before_folding_replays_as_one_request() -> None:
    rec = Renderer().record((3, 1, 2, nvme(16)))
    del rec["repeats"], rec["lba_range"]
    event = Replay("linux-7.1").entry(json.dumps(rec).encode())[EVENT]
    assert isinstance(event, NvmeEvent) and (event.repeats, event.lba_range) == (0, None)


@pytest.mark.parametrize(
    "change",
    [
        {"repeats": -1},
        {"repeats": 1.0},
        {"repeats": True},
        {"repeats": "3"},
        {"repeats": 1 << 63},
        {"repeats": 3, "lba_range": [9, 8]},
        {"repeats": 3, "lba_range": [0, 1 << 64]},
        {"repeats": 3, "lba_range": [1, 2, 3]},
        {"repeats": 3, "lba_range": {"lo": 1}},
        {"repeats": 0, "lba_range": [1, 2]},  # a range with nothing folded: not nvmefs's
    ],
)
def test_fold_fields_nvmefs_would_not_write_make_the_line_unreadable(
    change: dict[str, object],
) -> None:
    rec = Renderer().record((3, 1, 2, nvme(16)))
    rec.update(change)
    with pytest.raises(ValueError):
        Replay("linux-7.1").entry(json.dumps(rec).encode())
