"""Input checked before anything starts, and exit statuses that say what a scrub found even when
its output fails (issue: hardening)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

NVMEFS = [sys.executable, "-m", "nvmefs"]
PLAN = '[[fault]]\nopcode = "read"\nlba = [{lo}, {hi}]\nstatus = 0x281\n{extra}'


def nvmefs(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NVMEFS, *args], capture_output=True, text=True, timeout=60, **kw)  # type: ignore[call-overload,no-any-return]


def refused(p: subprocess.CompletedProcess[str], why: str) -> None:
    assert p.returncode == 2, p
    assert why in p.stderr and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr


@pytest.mark.parametrize(
    ("bs", "why"),
    [("0", "not a whole number of 512-byte blocks"), ("1", "not a whole number"),
     ("513", "not a whole number"), ("1M", "the controller's MDTS"),
     ("4M", "the controller's MDTS")],
)  # fmt: skip
def test_bs_is_whole_blocks_within_the_transfer_limit(bs: str, why: str) -> None:
    refused(nvmefs("scrub", "sim", "-o", f"sim_size=1M,bs={bs}"), why)


def test_bs_up_to_mdts_works_through_chained_prp_lists(tmp_path: Path) -> None:
    plan = tmp_path / "p.toml"
    plan.write_text(PLAN.format(lo=2048, hi=2048, extra=""))
    p = nvmefs("scrub", "sim", "-o", f"sim_size=4M,bs=512K,retries=0,faults={plan}")
    assert p.returncode == 1 and p.stdout.count("\n") == 1 and "nlb=1024 " in p.stdout, p


def test_bs_on_4k_blocks() -> None:
    refused(nvmefs("scrub", "sim", "-o", "sim_size=1M,sim_lba=4096,bs=2K"), "4096-byte blocks")
    assert nvmefs("scrub", "sim", "-o", "sim_size=1M,sim_lba=4096,bs=8K").returncode == 0


def test_fault_plans_come_only_from_regular_files_of_bounded_size(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    refused(nvmefs("scrub", "sim", "-o", f"faults={fifo}"), "not a regular file")
    assert time.monotonic() - t0 < 10  # refused, not waited on
    refused(nvmefs("scrub", "sim", "-o", "faults=/dev/zero"), "not a regular file")
    big = tmp_path / "big.toml"
    big.write_text("#" * (2 << 20))
    refused(nvmefs("scrub", "sim", "-o", f"faults={big}"), "more than a plan")
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    refused(nvmefs("scrub", "sim", "-o", f"faults={binary}"), f"fault plan {binary}: not UTF-8")


def test_rules_that_can_never_fire_are_refused(tmp_path: Path) -> None:
    plan = tmp_path / "p.toml"
    plan.write_text(PLAN.format(lo=5000, hi=6000, extra=""))  # 1 MiB: 2048 blocks
    refused(nvmefs("scrub", "sim", "-o", f"sim_size=1M,faults={plan}"),
            f"fault plan {plan}: rule 1: lba: 5000 is beyond the namespace")  # fmt: skip
    plan.write_text(PLAN.format(lo=0, hi=10, extra="nsid = 3\n"))
    refused(nvmefs("scrub", "sim", "-o", f"sim_size=1M,faults={plan}"),
            "rule 1: nsid: no namespace 3")  # fmt: skip


def test_scrub_says_what_it_found_when_its_reader_leaves() -> None:
    p = subprocess.run(
        f"{sys.executable} -m nvmefs scrub sim -o faults=demo,retries=0 | head -1; "
        'echo "status=${PIPESTATUS[0]}" >&2',
        shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert p.stdout.count("\n") == 1 and "slba=2048" in p.stdout
    assert p.stderr == "status=1\n"  # quiet, and errors were found


def test_scrub_output_errors_are_one_line_with_the_same_status() -> None:
    with open("/dev/full", "w") as full:
        p = subprocess.run([*NVMEFS, "scrub", "sim", "-o", "faults=demo,retries=0"],
                           stdout=full, stderr=subprocess.PIPE, text=True, timeout=60)  # fmt: skip
    assert p.returncode == 1 and p.stderr == "nvmefs: scrub: stdout: No space left on device\n"
    p = subprocess.run(
        f"{sys.executable} -m nvmefs scrub sim -o faults=demo,retries=0 >&-",
        shell=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert p.returncode == 1 and p.stderr == "nvmefs: scrub: stdout: closed\n"


def test_watch_ends_when_its_reader_leaves() -> None:
    w = subprocess.Popen([*NVMEFS, "watch", "sim", "-o", "faults=demo,retries=0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert w.stdout is not None
    w.stdout.readline()
    w.stdout.close()
    timer = threading.Timer(30, w.kill)
    timer.start()
    _, err = w.communicate()
    timer.cancel()
    assert w.returncode == 0 and err == b""


def test_a_storm_scrub_prints_fewer_entries_that_account_for_every_failed_read(
    tmp_path: Path,
) -> None:
    """Folding end to end: every read of the namespace fails (DNR, no retry), far over the
    rate; the entries printed stand for every one of them exactly (1 + repeats each), the
    last fold included (the source's end flushes it)."""
    plan = tmp_path / "p.toml"
    plan.write_text('[[fault]]\nopcode = "read"\nstatus = 0x4281\n')
    reads = (8 << 20) // 512
    p = nvmefs("scrub", "sim", "-o", f"sim_size=8M,bs=512,qd=32,format=json,faults={plan}")
    assert p.returncode == 1 and p.stderr == "", p.stderr
    recs = [json.loads(line) for line in p.stdout.splitlines()]
    assert all(r["kind"] == "nvme" and r["status"] == "0x4281" for r in recs)
    assert sum(1 + r["repeats"] for r in recs) == reads
    assert len(recs) < reads // 4 and recs[-1]["repeats"] > 0
    covered = sorted((r["lba_range"] or [r["slba"], r["slba"]]) for r in recs)
    assert covered[0][0] == 0 and max(hi for _, hi in covered) == reads - 1
    # fold=0: one entry per failed read, as before folding.
    p = nvmefs("scrub", "sim", "-o", f"sim_size=1M,bs=512,format=json,fold=0,faults={plan}")
    recs = [json.loads(line) for line in p.stdout.splitlines()]
    assert len(recs) == (1 << 20) // 512 and all(r["repeats"] == 0 for r in recs)


def test_a_fold_rate_that_is_no_number_is_refused_in_one_line() -> None:
    refused(nvmefs("scrub", "sim", "-o", "fold=abc"), "option fold=abc: 'abc' is not a number")
