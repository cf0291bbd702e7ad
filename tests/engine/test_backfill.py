"""Backfill from the kernel log (issue 21): one entry per failed request the log tells of, timed
when the kernel printed it, marked as such, never twice across a restart."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from nvmefs.engine.backfill import Disks, backfill, newest_replayed_wall_ns, read_kmsg
from nvmefs.nvme.kernlog import Record
from nvmefs.nvme.policy import LogPolicy
from nvmefs.nvme.status import Translator
from nvmefs.outputs.replay import Replay
from nvmefs.store import events
from nvmefs.store.events import KMSG, HostEvent, NvmeEvent
from nvmefs.store.render import Clock, Renderer
from nvmefs.store.ring import DebugRing

IO = "nvme0n1: I/O Cmd(0x2) @ LBA {lba}, 1 blocks, I/O Error (sct 0x2 / sc 0x81) DNR "
BLK = "critical medium error, dev nvme0n1, sector {sector} op 0x0:(READ) flags 0x0 phys_seg 1"
OLD_BLK = (
    "blk_update_request: I/O error, dev nvme0n1, sector {sector} op 0x0:(READ) flags 0x0 "
    "phys_seg 1 prio class 0"
)


def fake_sysfs(root: Path) -> Disks:
    """/sys/class/block/nvme0n1 of controller nvme0: nsid 1, 4 KiB blocks."""
    disk = root / "class" / "block" / "nvme0n1"
    (disk / "queue").mkdir(parents=True)
    (disk / "queue" / "logical_block_size").write_text("4096\n")
    (disk / "nsid").write_text("1\n")
    (root / "class" / "nvme" / "nvme0").mkdir(parents=True)
    os.symlink(root / "class" / "nvme" / "nvme0", disk / "device")
    return Disks(root)


def run(records: list[Record], disks: Disks, after: int = 0, log: str = "errors") -> DebugRing:
    ring = DebugRing(64)
    backfill(ring, records, Translator(), LogPolicy(log), disks, after)
    return ring


def test_each_failed_request_is_one_entry_timed_by_the_kernel_and_marked(tmp_path: Path) -> None:
    disks = fake_sysfs(tmp_path)
    recs = [
        Record(0, 1_000_000, "Linux version 6.1.0"),
        Record(1, 2_000_000, IO.format(lba=256)),
        Record(2, 2_000_050, BLK.format(sector=2048)),
        Record(3, 3_000_000, OLD_BLK.format(sector=4096)),
        Record(4, 4_000_000, "blk_print_req_error: 5 callbacks suppressed"),
    ]
    ring = run(recs, disks)
    entries = list(ring)
    assert [type(e[3]) for e in entries] == [NvmeEvent, HostEvent, HostEvent]
    first = entries[0][3]
    assert isinstance(first, NvmeEvent)
    assert first.status.status == 0x4281 and first.origin == KMSG
    assert (first.ctrl, first.nsid, first.disk, first.slba, first.nlb) == (
        "nvme0",
        1,
        "nvme0n1",
        256,
        1,
    )
    assert entries[0][1] == 2_000_050_000  # the kernel's time of the request's last line
    block_only = entries[1][3]
    assert block_only.kind == events.KERNEL_LOG and block_only.fields["slba"] == 512
    assert block_only.fields["blk_status"] == "IOERR" and block_only.origin == KMSG
    assert entries[2][3].fields["suppressed"] == 5
    # Marked in the text and JSON files, and kept across a journal round trip.
    renderer = Renderer(Clock("uptime"))
    assert renderer.line(entries[0]).rstrip().endswith("(from the kernel log)")
    rec = renderer.record(entries[0])
    assert rec["origin"] == "kmsg"
    back = Replay("linux-7.1").entry(json.dumps(rec).encode())
    assert back[3].origin == KMSG and back[3].replayed
    assert renderer.line(back).rstrip().endswith("(from the kernel log) (replayed)")


def test_the_log_policy_applies_and_the_journal_s_newest_entry_bounds_what_is_taken(
    tmp_path: Path,
) -> None:
    disks = fake_sysfs(tmp_path)
    recs = [Record(0, 2_000_000, IO.format(lba=1)), Record(1, 5_000_000, IO.format(lba=2))]
    assert not list(run(recs, disks, log="0x285"))  # a policy that logs 0x281 alone
    offset = time.time_ns() - time.monotonic_ns()
    # A journal that ends between the two: only the second is new.
    ring = run(recs, disks, after=offset + 3_000_000_000)
    assert [e[3].slba for e in ring] == [2]


def test_a_wrapped_log_says_from_when_it_covers(tmp_path: Path) -> None:
    ring = run([Record(5000, 7_500_000, IO.format(lba=1))], fake_sysfs(tmp_path))
    notice = next(iter(ring))[3]
    assert notice.kind == events.NOTICE and "has wrapped" in notice.message
    assert "7.500000 s after boot" in notice.message


def test_the_newest_replayed_entry_is_found_among_this_runs_entries() -> None:
    ring = DebugRing(8)
    ring.restore([(1, 10, 100, HostEvent(events.NOTICE, "old", replayed=True)),
                  (2, 20, 200, HostEvent(events.NOTICE, "old", replayed=True))])  # fmt: skip
    ring.append(HostEvent(events.NOTICE, "this run"))
    assert newest_replayed_wall_ns(ring) == 200
    assert newest_replayed_wall_ns(DebugRing(4)) == 0


@pytest.mark.root
def test_the_machines_own_kernel_log_reads_whole_and_in_order() -> None:
    recs = list(read_kmsg())
    assert recs, "the kernel log is empty"
    seqs = [r.seq for r in recs]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
