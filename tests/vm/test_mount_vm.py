"""nvmefs on QEMU's controllers: scrub, a mount followed with tail -f, a hung device, hot-unplug."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from nvmefs.linux import devices
from tests.mounts import BUF, cleanup, is_mounted, stats, wait_for
from tests.vm.guest import dmesg, ng, qmp

NVMEFS = [sys.executable, "-m", "nvmefs"]


def test_scrub_prints_the_injected_media_errors_and_exits_1() -> None:
    p = subprocess.run(
        [*NVMEFS, "scrub", ng("nvmefs-err"), "-o", "bs=4K,qd=16,retries=0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 1, p.stderr
    lines = p.stdout.splitlines()
    assert [int(re.search(r"slba=(\d+)", ln).group(1)) for ln in lines] == [2048, 40960]  # type: ignore[union-attr]
    for line in lines:
        assert "] Specific NVMe error encountered: Status = 0x" in line
        assert "(Unrecovered Read Error)" in line and "blk_status=MEDIUM" in line


def test_scrub_with_defaults_prints_one_line_per_failed_command() -> None:
    p = subprocess.run(
        [*NVMEFS, "scrub", ng("nvmefs-err")], capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 1, p.stderr
    lines = p.stdout.splitlines()
    # First try and five retries each, like the kernel, and one line each, like the patch.
    assert [int(re.search(r"slba=(\d+)", ln).group(1)) for ln in lines] == [2048, 40960]  # type: ignore[union-attr]
    assert all(ln.endswith(" retries=5") for ln in lines), lines


def test_scrub_with_log_attempts_prints_each_attempt() -> None:
    p = subprocess.run(
        [*NVMEFS, "scrub", ng("nvmefs-err"), "-o", "log_attempts"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 1, p.stderr
    found = [re.search(r"slba=(\d+) .*retries=(\d)$", ln) for ln in p.stdout.splitlines()]
    assert [(int(m.group(1)), int(m.group(2))) for m in found if m] == [
        (lba, n) for lba in (2048, 40960) for n in range(6)
    ]


def mount(mnt: Path, source: str, opts: str) -> None:
    mnt.mkdir(exist_ok=True)
    p = subprocess.run(
        [*NVMEFS, source, str(mnt), "-o", opts], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr


def test_mount_ring_and_tail_f_within_2s(tmp_path: Path) -> None:
    mnt = tmp_path / "err"
    mount(mnt, ng("nvmefs-err"), "log=errors,retries=0,interval=1,clock=realtime")
    try:
        wait_for(lambda: "slba=40960" in (mnt / BUF).read_text(), 120, "a whole scrub pass")
        text = (mnt / BUF).read_text()
        errs = [ln for ln in text.splitlines() if "Specific NVMe error" in ln]
        assert {re.search(r"slba=(\d+)", ln).group(1) for ln in errs} == {"2048", "40960"}  # type: ignore[union-attr]
        tail = subprocess.Popen(
            ["tail", "-f", str(mnt / BUF)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        got: list[tuple[float, bytes]] = []

        def collect() -> None:
            assert tail.stdout is not None
            for line in iter(tail.stdout.readline, b""):
                got.append((time.time(), line))

        threading.Thread(target=collect, daemon=True).start()
        try:
            wait_for(lambda: len(got) >= 12, 60, "new entries in tail -f")
        except AssertionError:  # say whether the scrub went on, and what the driver said
            nvme = [ln for ln in dmesg().splitlines() if "nvme" in ln][-15:]
            raise AssertionError(
                f"{len(got)} lines from tail -f in 60 s; stats {stats(mnt)}; the guest's last "
                f"nvme lines {nvme}"
            ) from None
        tail.terminate()
        _, err = tail.communicate(timeout=10)
        assert b"truncated" not in err
        for arrived, line in got[10:]:
            made = datetime.fromisoformat(
                line[1 : line.index(b"]")].decode().replace("Z", "+00:00")
            )
            assert arrived - made.timestamp() < 2.0
    finally:
        cleanup(mnt)


def test_hung_device_is_logged_and_the_ring_stays_readable(tmp_path: Path) -> None:
    mnt = tmp_path / "slow"
    mount(mnt, ng("nvmefs-slow"), "workload=randread,qd=1,bs=4K,io_timeout=3,retries=0,log=errors")
    # 400 bytes/s: a 4 KiB read takes 10 s, past two 3 s timeouts, so the kernel aborts, then
    # resets the controller and cancels the passthrough commands (-EINTR). One read at a time:
    # QEMU's reset waits for the reads its throttle holds, and the whole guest with it (at
    # 100 bytes/s and 4 in flight that was over 2 minutes: taken for a stalled guest).
    throttle = dict(device="slow", bps=400, bps_rd=0, bps_wr=0, iops=0, iops_rd=0, iops_wr=0)
    try:
        wait_for(lambda: int(stats(mnt)["completions"]) > 50, 60, "I/O before the stall")
        assert "error" not in qmp("block_set_io_throttle", **throttle)
        wait_for(lambda: "host-error" in (mnt / BUF).read_text(), 90, "the stall to be logged")
        text = (mnt / BUF).read_text()
        assert "EINTR" in text or "timed out" in text or "no completion" in text, text[-1500:]
        assert is_mounted(mnt) and stats(mnt)["engine_state"] == "ready"
    finally:
        qmp("block_set_io_throttle", **{**throttle, "bps": 0})
    try:
        before = int(stats(mnt)["completions"])
        wait_for(lambda: int(stats(mnt)["completions"]) > before + 50, 60, "I/O to resume")
    finally:
        cleanup(mnt)


def test_hot_unplug_pauses_the_scrub_and_it_resumes_where_it_stopped(tmp_path: Path) -> None:
    mnt = tmp_path / "hot"
    # A paced scrub (64 MiB at 1 MB/s) is still running when the controller goes away.
    opts = "workload=scrub,passes=1,bs=64K,qd=2,rate=1,retries=0,log=errors,health_interval=1"
    mount(mnt, ng("nvmefs-err"), opts)
    try:
        wait_for(lambda: int(stats(mnt)["workload_lba"]) > 4096, 60, "the scrub under way")
        assert "error" not in qmp("device_del", id="hot0")
        wait_for(lambda: "removed" in (mnt / BUF).read_text(), 60, "the removal entry")
        assert stats(mnt)["engine_state"] == "detached"
        stopped = int(stats(mnt)["workload_lba"])
        time.sleep(3)
        # While detached the workload waits: no progress, and nothing written to the ring.
        assert int(stats(mnt)["workload_lba"]) == stopped
        assert "removed; waiting for it to come back" in (mnt / BUF).read_text().splitlines()[-1]
        plug_back()
        wait_for(lambda: "reattached" in (mnt / BUF).read_text(), 60, "the reattach entry")
        wait_for(lambda: stats(mnt)["engine_state"] == "ready", 30, "ready again")
        wait_for(lambda: int(stats(mnt)["workload_lba"]) > stopped, 60, "the scrub to resume")
        lines = (mnt / BUF).read_text().splitlines()
        removed = next(i for i, ln in enumerate(lines) if "removed; waiting" in ln)
        # Between removal and reattach the ring gained only the removal notice.
        assert "reattached as" in lines[removed + 1], lines[removed:]
        s = stats(mnt)
        # No command was lost to the removal: the ones in flight were sent again.
        assert s["host_errors"] == "0" and "host-error" not in "\n".join(lines)
        assert int(s["workload_lba"]) >= stopped
    finally:
        cleanup(mnt)
        if not any(c.serial == "nvmefs-err" for c in devices.controllers()):
            plug_back()  # whatever failed above, later tests need the controller


def plug_back() -> None:
    reply = qmp("device_add", driver="nvme", id="hot0", serial="nvmefs-err", drive="err", bus="rp1")
    assert "error" not in reply, reply
    wait_for(lambda: any(c.serial == "nvmefs-err" for c in devices.controllers()), 30, "hot0")


pytestmark = pytest.mark.vm
