"""Boots the QEMU test VM and runs tests/vm inside it (real NVMe controllers): all of it on the
host's kernel (Debian 12's 6.1), and the tests of what depends on the kernel's tracepoints and
log lines (the kernel source, the kernel log's backfill; see OTHER_KERNELS) on the other kernels
Debian users run too, fetched by package name (contrib/qemu/vm.py fetch-kernel: bullseye's 5.10,
bookworm-backports' 6.12; kept in contrib/qemu/work/kernels once fetched).

The guest has been seen to stall for good now and then (every process in it, not one test:
see the stop notes of issue 13), more often on a loaded machine. A stalled guest (no heartbeat
for STALL_S seconds) is ended - the runner prints where its vCPUs were and any kernel error
first - and the tests that had not passed yet run again in a new VM, up to BOOTS boots in all;
every test must pass in one of them, and each retry is reported loudly. So too when a test
finds that the bed lost a controller it needs after a command timeout (tests/vm/guest.py
bed_lost: QEMU's controller stops completing commands under a storm's reads now and then, and
6.1 then disables it)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.vm.guest import BED_LOST

REPO = Path(__file__).resolve().parents[1]
VM_PY = REPO / "contrib/qemu/vm.py"
# The guest writes each test that passed there: the checkout is shared.
PASSED = REPO / "contrib/qemu/work/vm-passed.txt"
# The guest prints a heartbeat every 15 s (contrib/qemu/vm.py): this long without one, it has
# stopped. A slow test is not a stall; it fails on its own at its own limit (240 s).
STALL_S = 120
STALLED = 125  # contrib/qemu/vm.py's exit status then
TIMED_OUT = 124
# The whole suite in one VM: about 7 minutes under TCG on 2 cores (each nvmefs process the
# guest starts spends seconds importing, over 9p: see CACHED in contrib/qemu/vm.py), with
# room for a loaded machine and a slower kernel.
VM_S = 1800
BOOTS = 3
# What depends on the kernel's tracepoints and log lines: it runs on the other kernels too.
KERNEL_SOURCE_TESTS = [
    "tests/vm/test_kernel_source.py", "tests/vm/test_backfill.py", "tests/vm/test_multipath.py",
    "tests/vm/test_storm.py",
]  # fmt: skip
# The other kernels, by the Debian suite that has them: the kernel-source tests, but those that
# cannot run on that kernel (each with why). A defect of the bed on 5.10: QEMU 7.2's NVMe
# controller stops completing a 5.10 guest's commands under many clean reads in flight (fio's
# random reads at QD32, io_uring or libaio, on any controller, within seconds, in two boots of
# three: timeout, abort, reset, then the controller disabled for the rest of the boot); one
# read at a time (fio psync, ~2,700/s) and QD4 ran clean. The tests keep clear of it.
OTHER_KERNELS: dict[str, tuple[str, list[str], tuple[str, ...]]] = {
    "6.12": ("bookworm-backports", KERNEL_SOURCE_TESTS, ()),
    "5.10": ("bullseye", KERNEL_SOURCE_TESTS, (
        # A device source needs the generic nodes /dev/ngXnY, which came in 5.13 (5.10's own
        # refusal: test_a_device_source_without_its_generic_node_is_refused_in_one_line).
        "tests/vm/test_kernel_source.py::"
        "test_a_device_source_with_kernel_adds_other_processes_errors_once",
    )),
}  # fmt: skip
# The guest's pytest keeps its temporary files here, not under /tmp/pytest-of-root: the guest's
# /tmp shows the host's (an overlay over it), and pytest's start-up clean-up of old numbered
# directories would walk the host tests' leftovers over 9p.
BASETEMP = "/run/nvmefs-vm-pytest"


def run_vm(tests: list[str], deselect: list[str], kernel: str | None) -> tuple[int, str]:
    cmd = [
        sys.executable, str(VM_PY), "run", "--timeout", str(VM_S), "--stall", str(STALL_S),
        *(["--kernel", kernel] if kernel else []), "--",
        "env", "NVMEFS_IN_VM=1", f"NVMEFS_VM_PASSED={PASSED}", sys.executable, "-m", "pytest",
        *tests, "-v", "-p", "no:cacheprovider", "-o", "addopts=-ra",
        # A hung test fails on its own, with its stack, instead of the whole boot timing out.
        "--timeout=240", f"--basetemp={BASETEMP}",
        *(f"--deselect={nodeid}" for nodeid in deselect),
    ]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=VM_S + 60, cwd=REPO)
    return p.returncode, p.stdout + p.stderr


def passes_in_the_vm(
    tests: list[str], kernel: str | None = None, but: tuple[str, ...] = ()
) -> None:
    """Every test of `tests` but those of `but` passes in a VM booting `kernel` (the host's:
    None), in one boot or, after stalls, in up to BOOTS boots (see the module docstring)."""
    PASSED.parent.mkdir(parents=True, exist_ok=True)
    PASSED.write_text("")
    for boot in range(1, BOOTS + 1):
        code, out = run_vm(tests, sorted(set(PASSED.read_text().split()) | set(but)), kernel)
        print(out)
        if code not in (STALLED, TIMED_OUT, BED_LOST) or boot == BOOTS:
            break
        why = "lost a controller" if code == BED_LOST else "stalled"
        print(f"WARNING: VM boot {boot} {why} after {len(PASSED.read_text().split())} tests "
              "passed in all: running the rest in a new VM")  # fmt: skip
    summary = re.findall(r"=+ (.*) in [\d.]+s", out)
    assert code == 0 and summary, out[-4000:]
    if boot == 1:  # nothing failed or skipped
        expected = rf"\d+ passed, {len(but)} deselected" if but else r"\d+ passed"
        assert re.fullmatch(expected, summary[-1]), summary[-1]
        return
    assert re.fullmatch(r"\d+ passed, \d+ deselected|\d+ passed", summary[-1]), summary[-1]
    (collected,) = re.findall(r"collected (\d+) items", out)
    # each passed in one boot
    assert len(set(PASSED.read_text().split()) - set(but)) == int(collected) - len(but)


@pytest.mark.vm
@pytest.mark.timeout(BOOTS * (VM_S + 60) + 60)
def test_vm_suite_passes_against_qemus_nvme_controllers() -> None:
    passes_in_the_vm(["tests/vm"])


@pytest.mark.vm
@pytest.mark.timeout(BOOTS * (VM_S + 60) + 600)  # and the download of the kernel, once
@pytest.mark.parametrize("release", list(OTHER_KERNELS))
def test_the_kernel_source_and_backfill_pass_on_other_debian_kernels(release: str) -> None:
    suite, tests, but = OTHER_KERNELS[release]
    fetch = subprocess.run([sys.executable, str(VM_PY), "fetch-kernel", suite],
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert fetch.returncode == 0, fetch.stdout + fetch.stderr
    passes_in_the_vm(tests, kernel=release, but=but)
