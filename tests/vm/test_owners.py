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
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nvmefs.linux import locate
from tests.mounts import daemon_pids, wait_for
from tests.vm.guest import controller
from tests.vm.test_kernel_source import (
    dd,
    err_nodes,
    errors_total,
    kernel_mount,
    nvme_records,
    read_lba,
)

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
def filesystem(
    tmp_path: Path, fs: str, options: Sequence[str] = ()
) -> Iterator[tuple[str, str, Path]]:
    """(disk, partition, mountpoint): one GPT partition from 1 MiB on nvmefs-fs, `fs` on it
    (made with mkfs's `options` too), mounted; unmounted and wiped after."""
    block = controller("nvmefs-fs").namespaces[0].block
    disk = block.rsplit("/", 1)[1]
    run("wipefs", "-a", "-q", block)
    subprocess.run(["sfdisk", "-q", "-X", "gpt", block], input="1MiB,,L\n", text=True,
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    run("udevadm", "settle")
    part = f"{block}p1"
    wait_for(lambda: os.path.exists(part), 10, part)
    run(*MKFS[fs], *options, part)
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


FILES = 100_000
# What a filesystem of FILES files needs: ext4's default of one inode per 16 KiB gives 20k on
# this disk; XFS without reverse mapping is the case that walks the files (README: locate).
MANY = {"ext4": ["-N", str(FILES + 20_000)], "xfs": ["-m", "rmapbt=0"]}


def make_files(root: Path, n: int) -> None:
    """`n` empty files, a thousand to a directory."""
    for d in range(0, n, 1000):
        sub = root / f"d{d // 1000:03}"
        sub.mkdir(parents=True)
        for i in range(min(1000, n - d)):
            os.close(os.open(sub / f"f{i:03}", os.O_CREAT | os.O_WRONLY, 0o644))


def entries_of(mnt: Path, disk: str) -> int:
    return sum(r["disk"] == disk for r in nvme_records(mnt))


def arrival(mnt: Path, ctrl: str, disk: str, n: int) -> tuple[float, float, int]:
    """Seconds until the `n`th error of `disk` is counted, and until it is in the ring; how
    many lookups had ended when it was counted."""
    t = time.monotonic()
    wait_for(lambda: errors_total(mnt, ctrl) >= n, 30, f"error {n} counted")
    counted = time.monotonic() - t
    lookups = int(stats_of(mnt)["locate_lookups"])
    wait_for(lambda: entries_of(mnt, disk) >= n, 60, f"entry {n}")
    return counted, time.monotonic() - t, lookups


def arrival_of_entry(mnt: Path, disk: str, since: float) -> float:
    """Seconds from `since` until an entry of `disk` is in the ring."""
    wait_for(lambda: entries_of(mnt, disk) > 0, 60, f"an entry of {disk}")
    return time.monotonic() - since


def hwm_kib(pid: int) -> int:
    """The peak resident memory of process `pid` (VmHWM)."""
    for ln in Path(f"/proc/{pid}/status").read_text().splitlines():
        if ln.startswith("VmHWM:"):
            return int(ln.split()[1])
    raise AssertionError(f"no VmHWM for {pid}")


def stats_of(mnt: Path) -> dict[str, str]:
    return dict(ln.split(" ", 1) for ln in (mnt / "stats").read_text().splitlines())


# XFS without rmapbt: the lookup that walks every file, the longest. (ext4, debugfs icheck
# over 120k inodes, took 2.5-4.2 s in the same VM; it is left out to keep the suite short.)
@pytest.mark.parametrize("fs", ["xfs"])
def test_a_lookup_among_100k_files_is_bounded_and_the_recorder_keeps_time(
    tmp_path: Path, fs: str
) -> None:
    """An error in a file of a filesystem with 100k files, with the default locate_wait: the
    lookup takes what it takes (bounded by the lookup limit, in the daemon's `stats`), while
    errors elsewhere are counted at once and every entry reaches the ring by its wait."""
    err_ctrl, err_block, err_disk = err_nodes()
    err_ctrl = os.path.basename(err_ctrl)
    fs_ctrl = controller("nvmefs-fs").name
    with filesystem(tmp_path, fs, MANY[fs]) as (disk, part, mnt):
        files = fill(mnt)
        start = int(Path(f"/sys/class/block/{os.path.basename(part)}/start").read_text())
        found = [(f, o) for f in files if (o := file_offset(f, start, BAD_LBA)) is not None]
        assert len(found) == 1, f"LBA {BAD_LBA} is in {found}"
        ((path, offset),) = found
        for f in [f for f in files if f != path][:12]:  # room for XFS's inodes
            f.unlink()
        t0 = time.monotonic()
        # Made after the data: a walk (depth first, the last directory entry first) goes
        # through all of them before it gets to the file.
        make_files(mnt / "many", FILES)
        made_s = time.monotonic() - t0
        run("sync")
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        with kernel_mount(tmp_path, "log=errors,locate=on") as m, ThreadPoolExecutor(1) as pool:
            (pid,) = daemon_pids(m)
            wait = float(2)  # locate_wait's default
            before_kib = hwm_kib(pid)
            p = dd(f"if={path}", "of=/dev/null", "bs=4096", f"skip={offset // 4096}", "count=1")
            assert p.returncode != 0, "the read of the bad block did not fail"
            fs_entry = pool.submit(arrival_of_entry, m, disk, time.monotonic())
            # The file's error is taken first, and its lookup starts: the source reads every
            # CPU's events in one turn, CPU by CPU, so an error elsewhere made at once could
            # come before it (on CI: its quick lookup ended before the file's began).
            wait_for(lambda: errors_total(m, fs_ctrl) >= 1, 30, "the file's error counted")
            # Meanwhile, errors on another disk: counted at once, in the ring by their wait.
            late: list[tuple[float, float, int]] = []
            for n in range(1, 4):
                read_lba(err_block, 2048)
                late.append(arrival(m, err_ctrl, err_disk, n))
            fs_entry_s = fs_entry.result()
            # The lookup ends within its bound (LOOKUP_S, 10 s), whatever it found.
            wait_for(lambda: int(stats_of(m)["locate_lookups"]) >= 2, 60, "the lookups")
            stats = stats_of(m)
            after_kib = hwm_kib(pid)
            recs = nvme_records(m)
        lookup_ms = int(stats["locate_lookup_ms_max"])
        times = [(round(a, 1), round(b, 1)) for a, b, _ in late]
        print(f"\n{fs}: {FILES} files made in {made_s:.0f} s; longest lookup {lookup_ms} ms; "
              f"fs entry after {fs_entry_s:.1f} s; other errors counted, in the ring after "
              f"{times} s; daemon VmHWM {before_kib // 1024} -> {after_kib // 1024} MiB; "
              f"{stats['locate_late']} late")  # fmt: skip
        assert lookup_ms <= 10_000 + 5_000, stats  # LOOKUP_S, and the time to stop a tool
        assert all(counted < 5 for counted, _, _ in late), late
        assert all(entry < wait + 5 for _, entry, _ in late), late
        assert fs_entry_s < wait + 5, fs_entry_s
        if lookup_ms > 5_000:  # a slow lookup: the first error elsewhere was counted during it
            assert late[0][2] == 0, late
        assert after_kib - before_kib < 64 * 1024, (before_kib, after_kib)
        fs_recs = [r for r in recs if r["disk"] == disk]
        assert fs_recs, recs
        for r in fs_recs:  # named, or unresolved saying it was late or how far it searched
            assert r["owner"] in ("file", "unresolved"), r
            if r["owner"] == "file":
                assert r["file"] == str(path), r
            else:
                reason = str(r["owner_reason"])
                assert "took over" in reason or "searched" in reason, r
