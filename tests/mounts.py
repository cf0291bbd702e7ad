"""Helpers for tests against a real nvmefs mount run as a user would run it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

NVMEFS = [sys.executable, "-m", "nvmefs"]
BUF = "nvme_circular_buffer"
LINE = re.compile(rb"^\[[0-9TZ:.+ -]+\] [^\n\x00]+\n$")

# Every read of the namespace fails once (DNR: no retries): one entry per chunk.
ALL_READS_FAIL = """
[[fault]]
opcode = "read"
lba = [0, 1099511627775]
status = 0x4281
"""


def mountinfo() -> list[str]:
    return Path("/proc/self/mountinfo").read_text().splitlines()


def is_mounted(mnt: Path) -> bool:
    real = os.path.realpath(mnt)
    return any(line.split()[4] == real for line in mountinfo())


def gone(pid: int) -> bool:
    """Process `pid` has exited: it is not there, or it is a zombie its parent has not reaped
    yet (reaping is its parent's business, and an init that reaps by polling is slow at it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def daemon_pids(mnt: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"nvmefs .*{mnt}"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def wait_for(cond: Callable[[], bool], timeout: float = 10, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def stats(mnt: Path) -> dict[str, str]:
    text = (mnt / "stats").read_text()
    return dict(line.split(" ", 1) for line in text.splitlines())


def run_nvmefs(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NVMEFS, *args], capture_output=True, text=True, timeout=timeout)


def cleanup(mnt: Path) -> None:
    for pid in daemon_pids(mnt):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    while is_mounted(mnt):
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def unmount(mnt: Path, timeout: float = 30) -> None:
    """Unmount as a user does and wait for the daemon to have ended (its last writes done)."""
    pids = daemon_pids(mnt)
    subprocess.run(["umount", str(mnt)], check=True, capture_output=True)
    wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in pids), timeout, "the daemon")


@contextlib.contextmanager
def mounted(
    tmp_path: Path, opts: str, plan: str | None = None, name: str = "mnt"
) -> Iterator[Path]:
    mnt = tmp_path / name
    mnt.mkdir()
    if plan is not None:
        (tmp_path / "plan.toml").write_text(plan)
        opts = f"{opts},faults={tmp_path / 'plan.toml'}"
    p = run_nvmefs("sim", str(mnt), "-o", opts)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "" and is_mounted(mnt)
    try:
        yield mnt
    finally:
        cleanup(mnt)


def wait_static(mnt: Path) -> None:
    """Until a one-pass scrub has finished and the workload went idle."""
    wait_for(lambda: stats(mnt)["workload"] == "idle", 30, "the scrub pass to finish")
