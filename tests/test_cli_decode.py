"""`nvmefs decode` as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nvmefs", *args], capture_output=True, text=True, timeout=60
    )


def test_decode_the_issue_example_under_the_seed_kernel() -> None:
    p = run("decode", "0x281", "0x4287", "0x183", "--profile", "linux-5.14")
    assert p.returncode == 0, p.stderr
    recs = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["blk_status"] for r in recs] == ["MEDIUM", "MEDIUM", "NOTSUPP"]
    assert [r["dnr"] for r in recs] == [False, True, False]
    for key in (
        "status",
        "sct",
        "sc",
        "crd",
        "more",
        "dnr",
        "name",
        "blk_status",
        "logged_by_default",
    ):
        assert all(key in r for r in recs)
    assert recs[0]["name"] == "Unrecovered Read Error" and recs[0]["logged_by_default"]
    assert recs[2]["logged_by_default"] is False


def test_decode_default_profile_is_current_kernel() -> None:
    p = run("decode", "387")  # decimal 0x183
    assert json.loads(p.stdout)["blk_status"] == "IOERR"


def test_decode_cqe_field_and_all() -> None:
    rec = json.loads(run("decode", "--cqe", "0x8503").stdout)
    assert (rec["status"], rec["dnr"], rec["phase"]) == ("0x4281", True, 1)
    lines = run("decode", "--all").stdout.splitlines()
    assert len(lines) == 32768 and json.loads(lines[0x281])["name"] == "Unrecovered Read Error"


def test_bad_input_is_one_line_naming_the_argument_and_exit_2() -> None:
    for args, needle in (
        (("zz",), "'zz'"),
        (("0x8000",), "'0x8000'"),
        (("0x281", "--profile", "linux-2.6"), "linux-2.6"),
        ((), "STATUS"),
    ):
        p = run("decode", *args)
        assert p.returncode == 2, args
        assert p.stdout == ""
        assert len(p.stderr.strip().splitlines()) == 1 and needle in p.stderr, p.stderr


def test_decode_takes_ascii_numbers_only() -> None:
    # Fullwidth and Arabic-Indic digits, which int() would take, then ASCII that is no number.
    for bad in ("\uff13\uff12", "\u0661\u0662", "1_0", " 5", "12a", "0o8", "0x"):
        p = run("decode", bad)
        assert p.returncode == 2 and "not a number" in p.stderr and "Traceback" not in p.stderr
