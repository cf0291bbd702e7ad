"""Backfill in the VM (issue 21): errors from before the mount, from the guest kernel's own log,
one entry per failed request, never twice across a restart within the boot."""

from __future__ import annotations

import re
from pathlib import Path

from tests.vm.guest import dmesg
from tests.vm.test_kernel_source import err_nodes, kernel_mount, read_lba, records

BAD_LBA = 2048  # contrib/qemu/vm.py READ_ERROR_LBAS: reads there fail (512-byte blocks)


def logged_failures(disk: str, lba: int) -> int:
    """How many failed requests at `lba` of `disk` the kernel log tells of: its nvme_log_error
    lines (Linux >= 5.18), else the block layer's lines."""
    log = dmesg()
    nvme = re.findall(rf"\] {disk}: [^\n]*\(0x2\) @ LBA {lba}, ", log)
    if nvme:
        return len(nvme)
    return len(re.findall(rf"error, dev {disk}, sector {lba} op 0x0:\(READ\)", log))


def test_errors_before_the_mount_come_from_the_kernel_log_once(tmp_path: Path) -> None:
    _ctrl, block, disk = err_nodes()
    for _ in range(2):  # failed reads while no nvmefs runs
        read_lba(block, BAD_LBA)
    want = logged_failures(disk, BAD_LBA)
    assert want >= 2, dmesg()[-3000:]
    journal = tmp_path / "journal"
    journal.mkdir(mode=0o700)
    opts = f"log=errors,journal={journal / 'j.jsonl'},capacity=100000,backfill=on"
    with kernel_mount(tmp_path, opts) as mnt:
        recs = records(mnt)
        first_text = (mnt / "nvme_circular_buffer").read_text()
    start = next(i for i, r in enumerate(recs) if r["kind"] == "start")
    from_log = [r for r in recs if r.get("origin") == "kmsg"]
    assert all(recs.index(r) < start for r in from_log)  # before this run's start entry
    mine = [r for r in from_log if r.get("disk") == disk and r.get("slba") == BAD_LBA]
    assert len(mine) == want, (want, mine)
    for r in mine:
        if r["kind"] == "nvme":  # 5.18 and later: the status the kernel logged
            # The boot's partition scan read 8 blocks there; our reads 1.
            assert (r["sct"], r["sc"]) == (2, 0x81) and int(r["nlb"]) >= 1, r
            assert r["ctrl"] and r["nsid"] == 1
        else:  # older kernels: the block layer's line alone
            assert r["kind"] == "kernel-log" and r["blk_status"] == "MEDIUM", r
    assert first_text.count("(from the kernel log)\n") >= want
    # Timed when the kernel logged them: in this boot, before the start entry.
    assert all(0 < int(r["monotonic_ns"]) <= int(recs[start]["monotonic_ns"]) for r in mine)

    # The same boot, the same journal: the entries come back replayed, none is added twice.
    with kernel_mount(tmp_path, opts, name="again") as mnt:
        again = records(mnt)
        text = (mnt / "nvme_circular_buffer").read_text()
    fresh = [r for r in again if r.get("origin") == "kmsg" and not r.get("replayed")]
    assert fresh == [], fresh
    replayed = [r["seq"] for r in again if r.get("origin") == "kmsg" and r.get("replayed")]
    assert {r["seq"] for r in mine} <= set(replayed)
    assert "(from the kernel log) (replayed)" in text


def test_backfill_off_takes_nothing_from_the_kernel_log(tmp_path: Path) -> None:
    _ctrl, block, _disk = err_nodes()
    read_lba(block, BAD_LBA)
    with kernel_mount(tmp_path, "log=errors,backfill=off") as mnt:
        assert not [r for r in records(mnt) if r.get("origin") == "kmsg"]
