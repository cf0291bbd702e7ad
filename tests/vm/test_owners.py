"""The file behind a bad LBA, in the VM (issue 21): ext4 and XFS made by the guest's own
e2fsprogs/xfsprogs on a QEMU namespace with a read error injected at one LBA; a file the test
wrote covers it. Reading the file after the page cache is dropped fails there, and each error
entry names that file and its byte range (as FIEMAP places it); once the file is gone the same
LBA is free space; `nvmefs locate` answers the same."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvmefs.linux import locate
from tests.mounts import wait_for
from tests.vm.guest import controller
from tests.vm.test_kernel_source import dd, kernel_mount, nvme_records

NVMEFS = [sys.executable, "-m", "nvmefs"]
BAD_LBA = 400000  # contrib/qemu/vm.py FS_READ_ERROR_LBAS (512-byte blocks)
LBA_SIZE = 512
# XFS's internal log goes to AG 0: by default it sits in the middle AG, where the bad LBA is.
MKFS = {
    "ext4": ["mkfs.ext4", "-F", "-q", "-E", "nodiscard"],
    "xfs": ["mkfs.xfs", "-f", "-q", "-K", "-l", "agnum=0"],
}


def run(*argv: str) -> str:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (argv, p.stderr)
    return p.stdout


@contextlib.contextmanager
def filesystem(tmp_path: Path, fs: str) -> Iterator[tuple[str, str, Path]]:
    """(disk, partition, mountpoint): one GPT partition from 1 MiB on nvmefs-fs, `fs` on it,
    mounted; unmounted and wiped after."""
    block = controller("nvmefs-fs").namespaces[0].block
    disk = block.rsplit("/", 1)[1]
    run("wipefs", "-a", "-q", block)
    subprocess.run(["sfdisk", "-q", "-X", "gpt", block], input="1MiB,,L\n", text=True,
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    run("udevadm", "settle")
    part = f"{block}p1"
    wait_for(lambda: os.path.exists(part), 10, part)
    run(*MKFS[fs], part)
    mnt = tmp_path / f"fs-{fs}"
    mnt.mkdir()
    run("mount", part, str(mnt))
    try:
        yield disk, part, mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        subprocess.run(["wipefs", "-a", "-q", block], capture_output=True)


def fill(mnt: Path) -> list[Path]:
    """Files of written data until the filesystem is full: the bad LBA is then in one of them
    (or in metadata, which the test would say)."""
    (mnt / "data").mkdir()
    files = []
    for i in range(1000):
        path = mnt / "data" / f"part{i:03}.bin"
        p = dd("if=/dev/zero", f"of={path}", "bs=1M", "count=8", "conv=fsync")
        files.append(path)
        if p.returncode != 0:
            assert "No space left" in p.stderr, p.stderr
            return files
    raise AssertionError("the filesystem never filled")


def file_offset(path: Path, part_start: int, lba: int) -> int | None:
    """The byte of `path` that disk LBA `lba` holds, from FIEMAP (filefrag's ioctl), or None."""
    phys = lba * LBA_SIZE - part_start * 512  # byte offset within the partition
    fd = os.open(path, os.O_RDONLY)
    try:
        for ext in locate.fiemap(fd):
            if ext.physical <= phys < ext.physical + ext.length:
                return ext.logical + phys - ext.physical
    finally:
        os.close(fd)
    return None


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_each_error_names_the_file_and_its_bytes_then_free_space(tmp_path: Path, fs: str) -> None:
    with filesystem(tmp_path, fs) as (disk, part, mnt):
        files = fill(mnt)
        start = int(Path(f"/sys/class/block/{os.path.basename(part)}/start").read_text())
        found = [(f, o) for f in files if (o := file_offset(f, start, BAD_LBA)) is not None]
        assert len(found) == 1, f"LBA {BAD_LBA} is in {found}: one of the test's files must hold it"
        ((path, offset),) = found
        # Lookups in the VM take seconds (debugfs and Python under TCG): entries wait for them.
        with kernel_mount(tmp_path, "log=errors,locate=on,locate_wait=60") as m:
            run("sync")
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            skip = offset // 4096
            p = dd(f"if={path}", "of=/dev/null", "bs=4096", f"skip={max(skip - 4, 0)}", "count=8")
            assert p.returncode != 0, "the read of the bad block did not fail"
            wait_for(lambda: any(r["disk"] == disk for r in nvme_records(m)), 120, "an entry")
            time.sleep(5)  # the rest of the request's errors
            recs = [r for r in nvme_records(m) if r["disk"] == disk]
            text = (m / "nvme_circular_buffer").read_text()
            stats = dict(ln.split(" ", 1) for ln in (m / "stats").read_text().splitlines())
        assert recs and all(r["status"] == "0x281" for r in recs), recs
        for r in recs:  # every failed request lies in the file: named, with the bytes of
            # its first block (the file's bytes there, as FIEMAP places them)
            assert (r["owner"], r["file"], r["fs"]) == ("file", str(path), fs), r
            assert r["partition"] == part
            lo, hi = r["file_range"]
            at = file_offset(path, start, int(r["slba"]))
            assert at is not None and lo <= at < hi, r
        # The request over the bad LBA: its bytes of the file (from those of its first block
        # on, as long as it is) hold the very byte that could not be read.
        bad = [r for r in recs if int(r["slba"]) <= BAD_LBA < int(r["slba"]) + int(r["nlb"])]
        assert bad, recs
        for r in bad:
            first = r["file_range"][0]
            assert first <= offset < first + int(r["nlb"]) * LBA_SIZE, (offset, r)
        # The text lines name it too (as far as the 255 bytes of an entry's info reach: the
        # test's path is long).
        lines = [ln for ln in text.splitlines() if f"disk={disk}" in ln]
        assert len(lines) == len(recs) and all(f" file={path}"[:40] in ln for ln in lines), lines
        assert int(stats["locate_placed"]) >= len(recs)
        answer = json.loads(run(*NVMEFS, "locate", f"/dev/{disk}", str(BAD_LBA), "--json"))
        assert (answer["owner"], answer["file"]) == ("file", str(path))
        assert answer["file_range"][0] <= offset < answer["file_range"][1]

        path.unlink()
        run("sync")
        with kernel_mount(tmp_path, "log=errors,locate=on,locate_wait=60", name="k2") as m:
            p = dd(f"if=/dev/{disk}", "of=/dev/null", "bs=512", f"skip={BAD_LBA}", "count=1",
                   "iflag=direct")  # fmt: skip
            assert p.returncode != 0
            wait_for(lambda: any(r["disk"] == disk for r in nvme_records(m)), 120, "an entry")
            (r,) = [r for r in nvme_records(m) if r["disk"] == disk]
        assert (r["owner"], r["file"], r["slba"]) == ("free", None, BAD_LBA), r
        answer = json.loads(run(*NVMEFS, "locate", f"/dev/{disk}", str(BAD_LBA), "--json"))
        assert answer["owner"] == "free", answer
