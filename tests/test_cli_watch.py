"""`nvmefs watch` as a script or a systemd unit runs it, and the kernel source's refusals that
need no kernel."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.mounts import ALL_READS_FAIL

NVMEFS = [sys.executable, "-m", "nvmefs"]


def test_watch_prints_entries_as_they_happen_and_ends_cleanly_on_sigterm(tmp_path: Path) -> None:
    plan = tmp_path / "plan.toml"
    plan.write_text(ALL_READS_FAIL)
    w = subprocess.Popen(
        [*NVMEFS, "watch", "sim", "-o", f"sim_size=1M,faults={plan},format=json,log=errors"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert w.stdout is not None
    first = json.loads(w.stdout.readline())  # arrives before the process ends
    assert first["kind"] == "nvme" and first["status"] == "0x4281"
    time.sleep(0.5)
    w.send_signal(signal.SIGTERM)
    out, err = w.communicate(timeout=20)
    assert w.returncode == 0 and err == ""
    assert all(json.loads(line)["kind"] for line in out.splitlines())


def test_options_of_the_kernel_source_are_refused_elsewhere() -> None:
    for args, why in [
        (["scrub", "sim", "-o", "kernel"], "option kernel is for device sources only"),
        (["scrub", "sim", "-o", "trace_buffer_kb=64"], "trace_buffer_kb is for the kernel"),
        (["scrub", "kernel:sda"], ""),  # refused one way or another, never a traceback
        (["watch", "kernel:sda"], ""),
    ]:
        p = subprocess.run([*NVMEFS, *args], capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and why in p.stderr and p.stderr.count("\n") == 1, p.stderr
