"""Boots the QEMU test VM once and runs tests/vm inside it (real NVMe controllers)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.vm
def test_vm_suite_passes_against_qemus_nvme_controllers() -> None:
    cmd = [
        sys.executable,
        str(REPO / "contrib/qemu/vm.py"),
        "run",
        "--timeout",
        "840",
        "--",
        "env",
        "NVMEFS_IN_VM=1",
        sys.executable,
        "-m",
        "pytest",
        "tests/vm",
        "-v",
        # A hung test fails on its own, with its stack, instead of the whole boot timing out.
        "--timeout=240",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=-ra",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    out = p.stdout + p.stderr
    print(out)
    summary = re.findall(r"=+ (.*) in [\d.]+s", out)
    assert p.returncode == 0 and summary, out[-4000:]
    assert re.fullmatch(r"\d+ passed", summary[-1]), summary[-1]  # nothing failed or skipped
