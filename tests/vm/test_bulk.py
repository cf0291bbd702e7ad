"""The bulk data path (scrub, randread) on QEMU's controllers: the compiled loop and its fallbacks
log the same entries and count the same completions, and a scrub stops within a second."""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nvmefs import workloads
from nvmefs.engine.compiled import Bulk
from nvmefs.nvme import commands as c
from nvmefs.nvme import lbas
from nvmefs.store.events import NvmeEvent
from nvmefs.store.ring import EVENT, DebugRing
from tests.mounts import BUF, cleanup, gone, is_mounted, stats, wait_for
from tests.vm.guest import engine_on, ng

NVMEFS = [sys.executable, "-m", "nvmefs"]
UNDER_WAY = re.compile(rb" [1-9][0-9]* MiB")  # the progress bar, once a MiB is read
PATHS = [("uring", "compiled"), ("uring", "python"), ("ioctl", "python")]


def entries(ring: DebugRing) -> list[tuple[int, int, int]]:
    """(status word, slba, retries) of each entry of a read or verify, in ring order."""
    return [
        (e.status.status, e.slba, e.retries)
        for e in (x[EVENT] for x in ring)
        if isinstance(e, NvmeEvent) and e.slba is not None
    ]


@pytest.mark.parametrize(("transport", "datapath"), PATHS)
async def test_scrub_logs_each_failed_command_once_through_every_data_path(
    transport: str, datapath: str
) -> None:
    async with engine_on("nvmefs-err", transport, datapath=datapath, max_retries=2) as (e, ring):
        assert e.datapath == datapath
        for op, word in (("read", 0x281), ("verify", 0x006)):
            before = e.stats.completions
            progress = workloads.Progress()
            await workloads.scrub(e, progress, bs=128 << 10, qd=8, passes=1, op=op)
            # Two failing chunks, three attempts each (the first and two retries), one entry each.
            assert [(w, lba, n) for w, lba, n in entries(ring)[-2:]] == [
                (word, 2048, 2),
                (word, 40960, 2),
            ]
            assert e.stats.completions - before == 512 + 2 * 2
            assert (progress.commands, progress.failed) == (512, 2)
            assert (progress.bytes_done, progress.lba, progress.pass_ratio) == (64 << 20, 131072, 1)
        assert e.stats.failed == {(e.ctrl_name, 1, 0x281): 2, (e.ctrl_name, 1, 0x006): 2}
        assert e.stats.by_status[0x281] == e.stats.by_status[0x006] == 6
        assert e.stats.by_opcode[(False, c.NVM_READ)] == e.stats.by_opcode[(False, c.NVM_VERIFY)]
        assert (e.stats.retries, e.stats.logged, e.stats.host_errors) == (8, 4, 0)


async def test_compiled_loop_statuses_successes_under_log_all_and_dulbe() -> None:
    async with engine_on("nvmefs-err", log="all", max_retries=0) as (e, ring):
        assert e.datapath == "compiled"
        # log=all: the loop hands successes back too, and each is logged once.
        await e.run_bulk(Bulk(1, c.NVM_READ, 8, start=2032, end=2064), qd=4)
        got = sorted(entries(ring))
        assert got == sorted([(0, 2032, 0), (0, 2040, 0), (0, 2056, 0), (0x281, 2048, 0)])
        # DULBE: every never-written block fails with a DNR status, logged once per command.
        await e.submit(c.set_features(c.FEAT_ERROR_RECOVERY, c.DULBE, nsid=1))
        try:
            job = Bulk(1, c.NVM_READ, 8, start=50000, end=50064)
            await e.run_bulk(job, qd=8)
        finally:
            await e.submit(c.set_features(c.FEAT_ERROR_RECOVERY, 0, nsid=1))
        dulbe = [x for x in entries(ring) if x[0] == 0x4287]
        assert sorted(dulbe) == [(0x4287, lba, 0) for lba in range(50000, 50064, 8)]
        assert (job.commands, job.failed, job.lba) == (8, 8, 50064)


async def test_compiled_randread_counts_every_completion() -> None:
    async with engine_on("nvmefs-slow") as (e, ring):
        before = e.stats.completions
        progress = workloads.Progress()
        await workloads.randread(e, progress, bs=4096, qd=16, count=3000, seed=7)
        assert e.stats.completions - before == progress.commands == 3000
        assert progress.bytes_done == 3000 * 4096 and progress.failed == 0 and not entries(ring)
        assert e.stats.latency_ns_max > 0


@pytest.mark.parametrize("datapath", ["compiled", "python"])
def test_ctrl_c_ends_a_scrub_within_1s(datapath: str) -> None:
    # 4 KiB at QD1 over 256 MiB: about a minute of commands, interrupted mid-pass. stderr is a
    # terminal, so that the progress bar says when the scrub is under way.
    master, slave = os.openpty()
    p = subprocess.Popen(
        [*NVMEFS, "scrub", ng("nvmefs-big"), "-o", f"bs=4K,qd=1,datapath={datapath}"],
        stdout=subprocess.DEVNULL,
        stderr=slave,
    )
    os.close(slave)
    try:
        seen = b""
        end = time.monotonic() + 60
        while not UNDER_WAY.search(seen) and time.monotonic() < end:
            try:
                seen += os.read(master, 4096)
            except OSError:  # the scrub ended: the terminal is gone
                break
        assert UNDER_WAY.search(seen) and p.poll() is None, seen[-500:]
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        p.wait(timeout=10)
        took = time.monotonic() - t0
    finally:
        p.kill()
        os.close(master)
    assert p.returncode == 130
    print(f"stopped {took:.2f} s after the signal")
    assert took < 1.0, f"{took:.2f} s"


def test_sigterm_unmounts_a_scrubbing_mount_within_1s(tmp_path: Path) -> None:
    mnt = tmp_path / "big"
    mnt.mkdir()
    p = subprocess.run(
        [*NVMEFS, ng("nvmefs-big"), str(mnt), "-o", "workload=scrub,bs=4K,qd=1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    try:
        wait_for(lambda: int(stats(mnt)["workload_bytes"]) > 1 << 20, 60, "the scrub under way")
        pid = int(stats(mnt)["pid"])
        t0 = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: gone(pid), 10, "the daemon to exit")
        took = time.monotonic() - t0
        assert not is_mounted(mnt)
        print(f"stopped {took:.2f} s after the signal")
        assert took < 1.0, f"{took:.2f} s"
    finally:
        if is_mounted(mnt):
            print((mnt / BUF).read_text()[-2000:])
        cleanup(mnt)


pytestmark = pytest.mark.vm


async def test_one_seed_reads_the_same_lbas_through_both_data_paths() -> None:
    # One command at a time, every completion logged (fold=0: successes beyond fold='s rate
    # would fold): the entries are the reads in order.
    seen = {}
    for datapath in ("compiled", "python"):
        on = engine_on("nvmefs-err", "uring", log="all", datapath=datapath, fold=0)
        async with on as (e, ring):
            assert e.datapath == datapath
            progress = workloads.Progress()
            await workloads.randread(e, progress, bs=4096, qd=1, seed=7, count=200)
            seen[datapath] = [slba for _, slba, _ in entries(ring)]
            ns = e.namespaces[0]
    nlb = 4096 // ns.lba_size
    want = list(itertools.islice(lbas.random_lbas(7, 0, ns.nblocks, nlb), 200))
    assert seen["compiled"] == seen["python"] == want
