"""nvmefs.linux.locate against real filesystems on loop devices, with e2fsprogs and xfsprogs,
and the expected blocks found independently (filefrag for ext4, xfs_bmap for XFS); plus the
pure parts (debugfs output, partition arithmetic, FIEMAP and GETFSMAP decoding)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nvmefs.linux import locate

NVMEFS = [sys.executable, "-m", "nvmefs"]
# Tools the tests need (and the package that brings each): a missing one fails, never skips.
TOOLS = {
    "losetup": "mount",
    "sfdisk": "fdisk",
    "mkfs.ext4": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "filefrag": "e2fsprogs",
    "mkfs.xfs": "xfsprogs",
    "xfs_bmap": "xfsprogs",
    "mkfs.btrfs": "btrfs-progs",
}


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pkgs = sorted({TOOLS.get(t, t) for t in missing})
        pytest.fail(
            f"missing {', '.join(missing)}: apt-get install -y {' '.join(pkgs)} "
            "(contrib/bootstrap's APT_PACKAGES)",
            pytrace=False,
        )


def sh(*argv: str, stdin: str | None = None) -> str:
    return subprocess.run(
        argv, input=stdin, capture_output=True, text=True, check=True, timeout=120
    ).stdout


@dataclass
class Disk:
    """A loop device over a sparse image, and what the test mounted of it."""

    dev: str
    mounts: list[Path]

    def mount(self, part: str, point: Path) -> Path:
        point.mkdir()
        sh("mount", part, str(point))
        self.mounts.append(point)
        return point


@contextlib.contextmanager
def loop_disk(tmp_path: Path, size: str, table: str | None = None) -> Iterator[Disk]:
    """A loop device (with `losetup -P` when an sfdisk `table` is given); every mount and the
    device itself are gone afterwards, whether the test passed or not."""
    need("losetup", "sfdisk")
    img = tmp_path / f"disk-{os.getpid()}.img"
    sh("truncate", "-s", size, str(img))
    if table is not None:
        sh("sfdisk", "-q", str(img), stdin=table)
    args = ["-P"] if table is not None else []
    dev = sh("losetup", "-f", "--show", *args, str(img)).strip()
    disk = Disk(dev, [])
    try:
        name = os.path.basename(dev)
        if table is not None and not any(
            p.startswith(name + "p") for p in os.listdir(f"/sys/block/{name}")
        ):
            # Some kernels (this host's) do not scan the table for losetup -P: add them.
            sh("partx", "-a", dev)
        yield disk
    finally:
        for point in reversed(disk.mounts):
            subprocess.run(["umount", str(point)], capture_output=True, check=False)
        if table is not None:
            subprocess.run(["partx", "-d", dev], capture_output=True, check=False)
        subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)


def run_locate(dev: str, lba: int) -> dict[str, object]:
    locate.clear_cache()
    proc = subprocess.run(
        [*NVMEFS, "locate", dev, str(lba), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out: dict[str, object] = json.loads(proc.stdout)
    return out


def write_files(mnt: Path) -> tuple[Path, bytes]:
    """A file of several blocks with known content, among others; synced to the device."""
    for i in range(20):
        (mnt / f"other{i}").write_bytes(os.urandom(3000 + 97 * i))
    (mnt / "sub").mkdir()
    target = mnt / "sub" / "target.bin"
    data = b"".join(bytes([i]) * 4096 for i in range(1, 9))  # 8 blocks of 4 KiB
    target.write_bytes(data)
    sh("sync")
    return target, data


_FILEFRAG = re.compile(r"^\s*\d+:\s+(\d+)\.\.\s*(\d+):\s+(\d+)\.\.\s*(\d+):", re.MULTILINE)
_XFS_BMAP = re.compile(r"^\s*\d+: \[(\d+)\.\.(\d+)\]: (\d+)\.\.(\d+)$", re.MULTILINE)


def filefrag_extents(path: Path) -> list[tuple[int, int, int]]:
    """(file block, device block, count) of a file, in filesystem blocks, from filefrag."""
    text = sh("filefrag", "-e", str(path))
    return [
        (int(a), int(c), int(b) - int(a) + 1)
        for a, b, c, _ in (m.groups() for m in _FILEFRAG.finditer(text))
    ]


def xfs_bmap_extents(path: Path) -> list[tuple[int, int, int]]:
    """(file sector, device sector, count) of a file, in 512-byte sectors, from xfs_bmap."""
    text = sh("xfs_bmap", str(path))
    return [
        (int(a), int(c), int(b) - int(a) + 1)
        for a, b, c, _ in (m.groups() for m in _XFS_BMAP.finditer(text))
    ]


def check_file_answer(
    dev: str, part_start_sectors: int, extents: list[tuple[int, int, int]], unit: int, target: Path
) -> None:
    """Every 3rd 512-byte LBA of the file's third extent unit onwards names the file and the
    4 KiB block range that holds it."""
    file_unit, dev_unit, count = extents[0]
    assert count * unit >= 3 * 4096, extents
    for k in (0, 1, 9, 17):  # sectors into the file's first extent
        lba = part_start_sectors + dev_unit * unit // 512 + k
        got = run_locate(dev, lba)
        file_byte = file_unit * unit + k * 512
        assert got["owner"] == "file", got
        assert got["file"] == str(target)
        assert got["file_range"] == [file_byte // 4096 * 4096, file_byte // 4096 * 4096 + 4096]
        assert got["fs_block"] == (dev_unit * unit + k * 512) // 4096
        assert got["partition_lba"] == lba - part_start_sectors


def last_lba(dev: str) -> int:
    return int(sh("blockdev", "--getsz", dev)) - 1


@pytest.mark.root
def test_ext4_lba_inside_a_file_names_it_and_its_bytes_metadata_and_free(tmp_path: Path) -> None:
    need("mkfs.ext4", "debugfs", "filefrag")
    with loop_disk(tmp_path, "64M") as disk:
        sh("mkfs.ext4", "-q", "-b", "4096", disk.dev)
        mnt = disk.mount(disk.dev, tmp_path / "mnt")
        target, data = write_files(mnt)
        extents = filefrag_extents(target)
        check_file_answer(disk.dev, 0, extents, 4096, target)
        # The content at the answer's range is the content at that LBA of the device.
        got = run_locate(disk.dev, extents[0][1] * 8 + 8 * 2 + 3)
        with open(disk.dev, "rb") as f:
            f.seek((extents[0][1] * 8 + 8 * 2 + 3) * 512)
            sector = f.read(512)
        rng = got["file_range"]
        assert isinstance(rng, list)
        assert sector == data[rng[0] + 3 * 512 : rng[0] + 4 * 512]
        sb = run_locate(disk.dev, 2)  # the superblock, 1024 bytes in
        assert sb["owner"] == "metadata" and sb["fs_block"] == 0, sb
        gdt = run_locate(disk.dev, 8)  # block 1: the group descriptors
        assert gdt["owner"] == "metadata" and gdt["fs"] == "ext4", gdt
        free = run_locate(disk.dev, last_lba(disk.dev) - 100)
        assert free["owner"] == "free", free
        assert free["mountpoint"] == str(mnt)


@pytest.mark.root
def test_xfs_lba_inside_a_file_names_it_and_its_bytes_metadata_and_free(tmp_path: Path) -> None:
    need("mkfs.xfs", "xfs_bmap")
    for rmap in ("0", "1"):  # without reverse mapping: the FIEMAP walk; with: GETFSMAP's owner
        with loop_disk(tmp_path, "320M") as disk:
            sh("mkfs.xfs", "-q", "-f", "-m", f"rmapbt={rmap}", disk.dev)
            mnt = disk.mount(disk.dev, tmp_path / f"mnt{rmap}")
            target, _ = write_files(mnt)
            check_file_answer(disk.dev, 0, xfs_bmap_extents(target), 512, target)
            sb = run_locate(disk.dev, 0)
            assert sb["owner"] == "metadata" and sb["fs"] == "xfs", sb
            free = run_locate(disk.dev, last_lba(disk.dev) - 100)
            assert free["owner"] == "free", (rmap, free)


@pytest.mark.root
def test_partitioned_disk_translates_the_lba_through_the_partition_start(
    tmp_path: Path,
) -> None:
    need("mkfs.ext4", "debugfs", "filefrag")
    table = "label: gpt\nstart=2048, size=40960\nstart=43008, size=131072\n"
    with loop_disk(tmp_path, "100M", table) as disk:
        part2 = f"{disk.dev}p2"
        assert os.path.exists(part2), "losetup -P made no partition nodes"
        sh("mkfs.ext4", "-q", "-b", "4096", part2)
        mnt = disk.mount(part2, tmp_path / "mnt")
        target, _ = write_files(mnt)
        check_file_answer(disk.dev, 43008, filefrag_extents(target), 4096, target)
        got = run_locate(disk.dev, 43008 + 2)
        assert got["partition"] == part2 and got["partition_lba"] == 2
        assert got["owner"] == "metadata"
        # Partition 1 is not mounted; the GPT itself is in no partition.
        p1 = run_locate(disk.dev, 2048 + 5)
        assert p1["owner"] == "unresolved" and "not mounted" in str(p1["reason"]), p1
        gpt = run_locate(disk.dev, 1)
        assert gpt["owner"] == "unresolved" and gpt["partition"] is None
        assert "no partition" in str(gpt["reason"])
        # Through kept layouts (the daemon's Placer), the same answers; and a mount made
        # since is seen at the next lookup.
        lay = locate.Layouts()
        for lba in (43008 + 2, 2048 + 5, 1, 43008 + 2):
            assert locate.locate(disk.dev, lba, layouts=lay) == locate.locate(disk.dev, lba)
        sh("mkfs.ext4", "-q", "-b", "4096", f"{disk.dev}p1")
        disk.mount(f"{disk.dev}p1", tmp_path / "mnt1")
        assert locate.locate(disk.dev, 2048 + 5, layouts=lay).fs == "ext4"
        lay.table.close()


@pytest.mark.root
def test_kept_layouts_answer_an_unmounted_disk_at_once_and_see_a_mount_come(
    tmp_path: Path,
) -> None:
    need("mkfs.ext4")
    with loop_disk(tmp_path, "64M") as disk:
        kept = locate.Layouts()
        try:
            assert kept.known(disk.dev, 100) is None  # nothing kept yet: a lookup must tell
            first = locate.locate(disk.dev, 100, layouts=kept)
            assert "not mounted" in str(first.reason)
            at_once = kept.known(disk.dev, 200)
            assert at_once == locate.locate(disk.dev, 200).place()
            assert at_once is not None and at_once.owner == "unresolved"
            assert kept.known(disk.dev, 300) is at_once  # the partition's answer, kept
            assert kept.known(disk.dev, 1 << 40) is None  # beyond the disk: the lookup says so
            sh("mkfs.ext4", "-q", disk.dev)
            disk.mount(disk.dev, tmp_path / "mnt")
            kept.table.get()  # a lookup of another disk read the table (and took its poll)
            time.sleep(locate.MOUNTS_POLL_S)
            assert kept.known(disk.dev, 200) is None  # the table changed: a lookup must tell
            assert locate.locate(disk.dev, 200, layouts=kept).fs == "ext4"
            assert kept.known(disk.dev, 200) is None  # a filesystem to ask: never at once
        finally:
            kept.table.close()


@pytest.mark.root
def test_unmounted_raw_and_unsupported_filesystems_are_not_resolved(tmp_path: Path) -> None:
    need("mkfs.btrfs")
    with loop_disk(tmp_path, "128M") as disk:
        raw = run_locate(disk.dev, 100)  # no filesystem at all
        assert raw["owner"] == "unresolved" and "not mounted" in str(raw["reason"]), raw
        sh("mkfs.btrfs", "-q", "-f", disk.dev)
        disk.mount(disk.dev, tmp_path / "mnt")
        got = run_locate(disk.dev, 100000)
        assert got["owner"] == "unresolved" and got["fs"] == "btrfs"
        assert "not supported" in str(got["reason"])


@pytest.mark.root
def test_a_walk_that_reaches_its_file_limit_says_how_far_it_searched(tmp_path: Path) -> None:
    need("mkfs.xfs", "xfs_bmap")
    with loop_disk(tmp_path, "320M") as disk:
        sh("mkfs.xfs", "-q", "-f", "-m", "rmapbt=0", disk.dev)
        mnt = disk.mount(disk.dev, tmp_path / "mnt")
        target, _ = write_files(mnt)
        _, sector, _ = xfs_bmap_extents(target)[0]
        locate.clear_cache()
        got = locate.locate(disk.dev, sector, max_files=3)
        assert got.owner == "unresolved"
        assert re.fullmatch(r"searched 3 files in [0-9.]+ s", str(got.reason)), got
        # Unresolved answers are not cached: with room to search, the file is found.
        assert locate.locate(disk.dev, sector).file == str(target)


@pytest.mark.root
def test_text_output_has_one_owner_line(tmp_path: Path) -> None:
    need("mkfs.ext4", "debugfs", "filefrag")
    with loop_disk(tmp_path, "64M") as disk:
        sh("mkfs.ext4", "-q", "-b", "4096", disk.dev)
        mnt = disk.mount(disk.dev, tmp_path / "mnt")
        target, _ = write_files(mnt)
        block = filefrag_extents(target)[0][1]
        out = sh(*NVMEFS, "locate", disk.dev, str(block * 8))
        assert f"owner file={target} bytes=0..4096\n" in out
        assert out.startswith(f"disk {disk.dev}\n")


# ---------------------------------------------------------------- the pure parts

ICHECK = "debugfs 1.47.0 (5-Feb-2023)\nBlock\tInode number\n2066\t12\n0\t<block not found>\n"


def test_icheck_output_gives_inode_or_none() -> None:
    assert locate.parse_icheck(ICHECK) == {2066: 12, 0: None}


def test_ncheck_output_gives_the_first_path_of_each_inode() -> None:
    text = "Inode\tPathname\n12\t/sub/target.bin\n12\t/hard link\n13\t/a\tb\n"
    assert locate.parse_ncheck(text) == {12: "/sub/target.bin", 13: "/a\tb"}


def test_testb_output_says_in_use_or_not() -> None:
    text = "Block 2066 marked in use\nBlock 9000 not in use\n"
    assert locate.parse_testb(text) == {2066: True, 9000: False}


@given(st.integers(0, 1 << 40), st.lists(st.integers(0, 1 << 20), min_size=1, max_size=8))
def test_fiemap_replies_decode_to_their_extents(start: int, lengths: list[int]) -> None:
    extents = []
    logical, physical = 0, start
    for n in lengths:
        extents.append(locate.Extent(logical, physical, n * 4096, 0))
        logical += n * 4096
        physical += n * 4096 + 8192
    buf = bytearray(locate.FIEMAP_HEAD.size + len(extents) * locate.FIEMAP_EXTENT.size)
    locate.FIEMAP_HEAD.pack_into(buf, 0, 0, 1 << 63, 0, len(extents), len(extents), 0)
    for i, e in enumerate(extents):
        off = locate.FIEMAP_HEAD.size + i * locate.FIEMAP_EXTENT.size
        locate.FIEMAP_EXTENT.pack_into(buf, off, e.logical, e.physical, e.length, e.flags)
    assert locate.FIEMAP_EXTENT.size == 56 and locate.FIEMAP_HEAD.size == 32
    assert locate.fiemap_decode(bytes(buf)) == (len(extents), extents)


@given(
    st.integers(0, 1 << 30),
    st.integers(1, 1 << 16),
    st.integers(0, (1 << 16) - 1),
    st.sampled_from([512, 1024, 2048, 4096]),
)
def test_the_block_range_is_where_the_extent_puts_the_device_offset(
    logical_blocks: int, blocks: int, into: int, block: int
) -> None:
    into %= blocks
    e = locate.Extent(logical_blocks * block, 1 << 30, blocks * block, 0)
    phys = e.physical + into * block
    assert locate.file_range(iter([e]), phys, block) == (
        e.logical + into * block,
        e.logical + (into + 1) * block,
    )
    assert locate.file_range(iter([e]), e.physical + e.length, block) is None
    delalloc = locate.Extent(e.logical, e.physical, e.length, 0x4)
    assert locate.file_range(iter([delalloc]), phys, block) is None


@given(
    st.lists(st.tuples(st.integers(1, 1 << 20), st.integers(1, 1 << 20)), max_size=6),
    st.integers(0, 1 << 22),
    st.sampled_from([512, 4096]),
)
def test_partition_arithmetic(sizes: list[tuple[int, int]], sector: int, lba_size: int) -> None:
    parts, start = [], 2048
    for i, (gap, size) in enumerate(sizes):
        parts.append(locate.Part(f"p{i}", f"7:{i}", start, size))
        start += size + gap
    got = locate.find_part(parts, sector)
    inside = [p for p in parts if p.start <= sector < p.start + p.size]
    assert got == (inside[0] if inside else None)
    if got is not None:
        lba = sector * 512 // lba_size
        assert locate.fs_offset(lba, lba_size, got.start) == lba * lba_size - got.start * 512


def test_getfsmap_replies_decode_to_their_records() -> None:
    buf = locate.fsmap_request(4096, 8191, 3, locate.encode_dev("7:0"))
    base = locate.FSMAP_HEAD.size + 2 * locate.FSMAP.size
    assert len(buf) == base + 3 * locate.FSMAP.size and base == 192
    locate.FSMAP_HEAD.pack_into(buf, 0, 0, 0, 3, 2)
    locate.FSMAP.pack_into(buf, base, 0, 0x10, 0, locate.FMR_OWN_FREE, 0, 4096)
    locate.FSMAP.pack_into(buf, base + 64, 0, 0, 4096, 131, 8192, 4096)
    assert locate.fsmap_decode(bytes(buf)) == [
        locate.MapRecord(0, 4096, locate.FMR_OWN_FREE, 0, True, 0),
        locate.MapRecord(4096, 4096, 131, 8192, False, 0),
    ]


def test_fsmap_device_numbers_are_encoded_as_the_kernel_does() -> None:
    assert locate.encode_dev("7:0") == 0x700
    assert locate.encode_dev("259:1") == (259 << 8) | 1
    assert locate.encode_dev("8:300") == (300 & 0xFF) | (8 << 8) | ((300 & ~0xFF) << 12)


def test_a_tool_that_runs_too_long_is_killed_and_says_so() -> None:
    with pytest.raises(locate.ToolError, match=r"^sleep timed out after 0.2 s$"):
        locate.run_tool(["sleep", "30"], 0.2)


def test_a_missing_tool_says_it_is_not_installed() -> None:
    with pytest.raises(locate.ToolError, match="no-such-tool-nvmefs not installed"):
        locate.run_tool(["no-such-tool-nvmefs"], 1)


def test_a_tool_output_is_read_up_to_its_cap() -> None:
    out = locate.run_tool(["head", "-c", str(3 * locate.OUTPUT_CAP), "/dev/zero"], 10)
    assert len(out) == locate.OUTPUT_CAP


def test_partitions_and_holders_come_from_sysfs(tmp_path: Path) -> None:
    """A fake sysfs tree: nvme0n1 with two partitions, the second under dm-0 (LVM)."""
    disk = tmp_path / "nvme0n1"
    for name, dev, start, size in (
        ("nvme0n1p2", "259:2", 4096, 100),
        ("nvme0n1p1", "259:1", 2048, 2048),
    ):
        d = disk / name
        (d / "holders").mkdir(parents=True)
        for f, v in (("partition", "1"), ("dev", dev), ("start", str(start)), ("size", str(size))):
            (d / f).write_text(v + "\n")
    (disk / "queue").mkdir()
    (disk / "nvme0n1p2" / "holders" / "dm-0").touch()
    parts = locate.partitions("nvme0n1", str(tmp_path))
    assert [p.name for p in parts] == ["nvme0n1p1", "nvme0n1p2"]
    assert locate.find_part(parts, 4095) == locate.Part("nvme0n1p1", "259:1", 2048, 2048)
    assert locate.find_part(parts, 4196) is None
    assert locate.holders("nvme0n1p2", str(disk)) == ["dm-0"]
    assert locate.holders("nvme0n1p1", str(disk)) == []


def test_a_disks_layout_is_kept_for_its_time_and_read_again_after(tmp_path: Path) -> None:
    disk = tmp_path / "nvme0n1"
    (disk / "queue").mkdir(parents=True)
    for f, v in (("dev", "259:0"), ("size", "8192"), ("queue/logical_block_size", "4096")):
        (disk / f).write_text(v + "\n")
    part = disk / "nvme0n1p1"
    (part / "holders").mkdir(parents=True)
    for f, v in (("partition", "1"), ("dev", "259:1"), ("start", "2048"), ("size", "2048")):
        (part / f).write_text(v + "\n")
    (tmp_path / "nvme0n1p1").symlink_to(part)  # /sys/class/block lists partitions too
    kept = locate.Layouts(ttl=3600, root=str(tmp_path))
    first = kept.disk("nvme0n1")
    assert (first.dev, first.lba_size, first.sectors) == ("259:0", 4096, 8192)
    assert first.parts == (locate.Part("nvme0n1p1", "259:1", 2048, 2048),)
    assert first.holders == {"nvme0n1": [], "nvme0n1p1": []}
    (part / "holders" / "dm-0").touch()  # LVM takes the partition
    assert kept.disk("nvme0n1") is first  # within its time: not read again
    fresh = locate.Layouts(ttl=0, root=str(tmp_path)).disk("nvme0n1")
    assert fresh.holders["nvme0n1p1"] == ["dm-0"] and fresh.parts == first.parts


@pytest.mark.root
def test_ext4_file_whose_name_has_a_newline_is_still_found(tmp_path: Path) -> None:
    """debugfs prints such a name over two lines: the answer comes from the walk by inode."""
    need("mkfs.ext4", "debugfs", "filefrag")
    with loop_disk(tmp_path, "64M") as disk:
        sh("mkfs.ext4", "-q", "-b", "4096", disk.dev)
        mnt = disk.mount(disk.dev, tmp_path / "mnt")
        odd = mnt / "two\nlines and\\ spaces"
        odd.write_bytes(os.urandom(5 * 4096))
        sh("sync")
        block = filefrag_extents(odd)[0][1]
        got = run_locate(disk.dev, (block + 3) * 8 + 1)
        assert got["owner"] == "file" and got["file"] == str(odd), got
        assert got["file_range"] == [3 * 4096, 4 * 4096]
        text = sh(*NVMEFS, "locate", disk.dev, str((block + 3) * 8 + 1))
        assert (
            "owner file=" + str(mnt) + "/two\\x0alines and\\\\ spaces bytes=12288..16384\n" in text
        )


@given(start=st.integers(0, 1 << 40), length=st.integers(1, 1 << 20), size=st.integers(0, 1 << 41))
def test_a_byte_range_is_cut_at_the_file_size_and_never_reversed(
    start: int, length: int, size: int
) -> None:
    rng = locate.within((start, start + length), size)
    if start >= size:  # a block allocated past the end of the file: no bytes of it
        assert rng is None
    else:
        assert rng is not None and rng[0] == start < rng[1] <= min(start + length, size)
