"""`nvmefs locate`: its input checks (one line, exit 2, no traceback), its refusal without root,
and its text rendering. What it finds on real filesystems: tests/linux/test_locate.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nvmefs import cli
from nvmefs.linux.locate import Location
from nvmefs.locate import render

NVMEFS = [sys.executable, "-m", "nvmefs"]


def run(*args: str, user: bool = False) -> subprocess.CompletedProcess[str]:
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if user else []
    return subprocess.run(
        [*prefix, *NVMEFS, *args], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/etc/hostname", "0"], "not a block device"),
        (["/nonexistent-disk", "0"], "No such file or directory"),
        (["/dev/null", "12"], "not a block device"),
        (["/dev/loop0", "x12"], "is not a number"),
        (["/dev/loop0", "-1"], "is not a number"),
        (["/dev/loop0", "1" * 80], "out of range"),
        (["/dev/loop0", str(1 << 62)], "is beyond /dev/loop0"),
        (["/dev/loop0", "0", "--timeout", "0"], "expected 0 < S"),
        (["/dev/loop0", "0", "--timeout", "soon"], "not a number of seconds"),
        (["/dev/loop0"], "the following arguments are required: LBA"),
    ],
)
@pytest.mark.root
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    proc = run("locate", *args)
    assert proc.returncode == 2, proc
    assert proc.stdout == ""
    assert proc.stderr.startswith("nvmefs: locate: ") and proc.stderr.count("\n") == 1
    assert message in proc.stderr, proc.stderr


@pytest.mark.root
def test_without_root_it_refuses_and_says_why() -> None:
    proc = run("locate", "/dev/loop0", "0", "--json", user=True)
    assert proc.returncode == 2
    assert proc.stderr == (
        "nvmefs: locate: needs root: it reads the raw device and the filesystem's maps\n"
    )


def test_the_command_is_listed_in_the_help() -> None:
    assert "locate" in cli.COMMANDS
    assert "nvmefs locate DISK LBA [--json]" in (cli.__doc__ or "")


def test_text_lines_name_each_part_of_the_answer() -> None:
    loc = Location(
        disk="/dev/nvme0n1",
        lba=2099200,
        lba_size=512,
        partition="/dev/nvme0n1p2",
        partition_lba=2048,
        fs="ext4",
        mountpoint="/srv",
        fs_block=256,
        fs_block_size=4096,
        owner="file",
        file="/srv/a b\nowner free",
        file_range=(0, 4096),
    )
    assert render(loc).splitlines() == [
        "disk /dev/nvme0n1",
        "lba 2099200 (512-byte blocks)",
        "partition /dev/nvme0n1p2 lba 2048",
        "fs ext4 on /srv",
        "fs_block 256 (4096-byte blocks)",
        "owner file=/srv/a b\\x0aowner free bytes=0..4096",
    ]
    unresolved = Location(disk="/dev/sda", lba=5, lba_size=512, reason="/dev/sda is not mounted")
    assert render(unresolved).splitlines()[-1] == "owner not resolved: /dev/sda is not mounted"


def test_json_has_every_documented_key() -> None:
    d = Location(disk="/dev/sda", lba=5, lba_size=512, owner="free").as_dict()
    keys = {"disk", "lba", "partition", "partition_lba", "fs", "mountpoint", "fs_block"}
    keys |= {"owner", "file", "file_range", "reason"}
    assert keys <= set(d)
    assert json.loads(json.dumps(d))["owner"] == "free"
