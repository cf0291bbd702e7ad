"""`nvmefs scrub` as a user runs it: stdout carries exactly the logged entries."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

PLAN = """
[[fault]]
opcode = "read"
lba = [2048, 2055]
status = 0x281
"""


def scrub(*opts: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "nvmefs", "scrub", "sim"]
    for o in opts:
        cmd += ["-o", o]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def check_line(line: str, retries: int) -> None:
    m = re.fullmatch(r"\[(\d+)\] (.*)", line)
    assert m, line
    info = m.group(2)
    assert info.startswith("Specific NVMe error encountered: Status = 0x281 ")
    assert "slba=2048 " in info and "nlb=256 " in info and info.endswith(f" retries={retries}")
    assert "(Unrecovered Read Error)" in info and "blk_status=MEDIUM" in info


def test_scrub_prints_one_line_per_failed_command_and_exits_1(tmp_path: Path) -> None:
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN)
    p = scrub(f"sim_size=16M,faults={plan}")
    assert p.returncode == 1, p.stderr
    # bs 128 KiB = 256 blocks: only the chunk 2048..2303 touches 2048..2055. It is tried 1 + 5
    # times and, as the kernel's nvme_error_status() sees it, fails once: one line.
    (line,) = p.stdout.splitlines()
    check_line(line, 5)


def test_scrub_with_log_attempts_prints_every_attempt(tmp_path: Path) -> None:
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN)
    p = scrub(f"sim_size=16M,faults={plan},log_attempts")
    assert p.returncode == 1, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 6
    for retries, line in enumerate(lines):
        check_line(line, retries)


def test_scrub_with_a_dnr_status_prints_one_line_without_retries(tmp_path: Path) -> None:
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN.replace("0x281", "0x4281"))
    p = scrub(f"sim_size=16M,faults={plan}")
    assert p.returncode == 1, p.stderr
    (line,) = p.stdout.splitlines()
    assert "Status = 0x4281 " in line and " DNR " in line and line.endswith(" retries=0")


def test_scrub_with_small_chunks_reports_each_chunk_touching_the_lbas(tmp_path: Path) -> None:
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN)
    p = scrub(f"sim_size=16M,faults={plan},bs=2K,retries=0,format=seed")
    assert p.returncode == 1
    # 4-block chunks: 2048..2051 and 2052..2055, nothing else.
    assert p.stdout.count("\n") == 2
    assert all(
        line.endswith("] Specific NVMe error encountered: Status = 0x281")
        for line in p.stdout.splitlines()
    )


def test_scrub_without_faults_exits_0_and_prints_nothing() -> None:
    p = scrub("sim_size=16M")
    assert (p.returncode, p.stdout) == (0, "")


def test_scrub_verify_and_demo_plan() -> None:
    p = scrub("faults=demo,op=verify,retries=0,log=errors")
    assert p.returncode == 1
    assert "Status = 0x282 " in p.stdout and p.stdout.count("\n") == 1


@pytest.mark.parametrize(
    ("opts", "needle"),
    [
        ("bogus=1", "unknown option 'bogus'"),
        ("qd=0", "option qd=0"),
        ("sim_size=lots", "option sim_size=lots"),
        ("faults=/nonexistent.toml", "/nonexistent.toml"),
        ("log=sometimes", "log policy"),
        ("allow_other", "unknown option 'allow_other'"),
        ("sim_lba=1000", "sim_lba 1000"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(opts: str, needle: str) -> None:
    p = scrub(opts)
    assert p.returncode == 2 and p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1 and needle in p.stderr, p.stderr


def test_unknown_source_exits_2() -> None:
    p = subprocess.run(
        [sys.executable, "-m", "nvmefs", "scrub", "floppy"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2 and "floppy" in p.stderr


def test_progress_goes_to_stderr_only_when_it_is_a_terminal(tmp_path: Path) -> None:
    import os
    import pty

    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN)
    out = tmp_path / "out"
    pid, fd = pty.fork()
    if pid == 0:  # stderr is the pty; stdout a file
        with open(out, "w") as f:
            os.dup2(f.fileno(), 1)
        os.execv(
            sys.executable,
            [
                sys.executable,
                "-m",
                "nvmefs",
                "scrub",
                "sim",
                "-o",
                f"faults={plan},rate=20,sim_size=16M",
            ],
        )
    term = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        term += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 1
    assert b"scrub pass 1 nsid 1:" in term and b"%" in term
    assert out.read_text().count("Specific NVMe error encountered") == 1  # one failed command
    assert "scrub pass" not in out.read_text()
