"""What owns a namespace LBA: the partition, the filesystem mounted from it, the filesystem
block, and the file (with the byte range of the file that block holds), filesystem metadata,
free space, or "not resolved" with the reason.

The answer comes from the running system, never from parsing on-disk formats here: sysfs for
the partitions (start and size in 512-byte sectors) and their holders (LVM, md, dm-crypt),
/proc/self/mountinfo for the mount, and then the kernel's own and the filesystems' own tools:

- FS_IOC_GETFSMAP (ioctl_getfsmap(2)) on the mountpoint: the filesystem says whether the block
  is free, which metadata holds it, or (XFS with reverse mapping, rmapbt=1) the inode and the
  file offset directly. ext4 and XFS without rmapbt answer "unknown" for file data.
- ext4: e2fsprogs' `debugfs -R "icheck B"` (block -> inode), `ncheck I` (inode -> path) and,
  for a block no inode holds, `testb B` (the on-disk bitmap: free or metadata). Not `-c`:
  catastrophic mode skips the bitmaps testb needs. debugfs opens the device read-only.
- FS_IOC_FIEMAP on the file found: the file offset of the block (the byte range).
- Any other case (XFS without rmapbt, a filesystem without GETFSMAP): a bounded walk of the
  mounted tree mapping each file's extents with FIEMAP, stopping at the first hit.

Why the tools and not our own reader of ext4/XFS structures: the on-disk formats have many
variants (extent trees, flex_bg, bigalloc, inline data, XFS AG encoding, reflink), the kernel
and the maintainers' tools follow them exactly and are kept in step with the kernel; a second
reader would be a second place to be wrong. The tools read the device as it is on disk: a
filesystem whose page cache is not written back yet may answer for the blocks it had before.

Bounds: every subprocess has a timeout and its output is read up to OUTPUT_CAP bytes (from a
temporary file, so a chatty tool costs no memory); a walk stops after `max_files` files or at
the deadline; answers that will not change by asking again (file, metadata, free) are cached
per (device, filesystem block) in a small LRU. Everything here is plain blocking code, to be
called from a worker thread, never from an event loop.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import re
import signal
import stat
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from nvmefs.errors import UsageError
from nvmefs.linux import mountinfo
from nvmefs.store.events import Place

SYS_BLOCK = "/sys/class/block"
SYS_DEV_BLOCK = "/sys/dev/block"
SECTOR = 512
# Default time a lookup may take (each subprocess, and a walk, stops by then).
TIMEOUT_S = 10.0
# The most files a walk maps before it gives up.
MAX_FILES = 200_000
# The most bytes of a tool's output read: a few lines are expected.
OUTPUT_CAP = 1 << 20
# Cached answers (each well under a KiB).
CACHE_SIZE = 256
# How long a Layouts keeps a disk's layout (see Layouts), and how often `known` asks whether
# the mount table changed.
LAYOUT_S = 10.0
MOUNTS_POLL_S = 0.1
# Filesystems whose FIEMAP addresses are not device offsets (btrfs, bcachefs: logical
# addresses over several devices) or that have no blocks of their own on a disk.
UNSUPPORTED = frozenset({"btrfs", "bcachefs", "zfs", "nfs", "nfs4", "cifs", "tmpfs", "overlay"})
EXT = frozenset({"ext2", "ext3", "ext4"})


@dataclass(frozen=True, slots=True)
class Location:
    """The answer for one LBA. `owner` is one of nvmefs.store.events.OWNERS; `file` and
    `file_range` are set when the owner is a file (`file_range` is [start, end) in bytes of
    the file, clipped to its size), `reason` says why for "unresolved" and what for
    "metadata". LBAs are in the disk's logical block size; `partition_lba` is the LBA counted
    from the partition's start (equal to `lba` on a disk without partitions)."""

    disk: str
    lba: int
    lba_size: int
    partition: str | None = None
    partition_lba: int | None = None
    fs: str | None = None
    mountpoint: str | None = None
    fs_block: int | None = None
    fs_block_size: int | None = None
    owner: str = "unresolved"
    file: str | None = None
    file_range: tuple[int, int] | None = None
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["file_range"] = list(self.file_range) if self.file_range else None
        return d

    def place(self) -> Place:
        """What an entry records of this answer."""
        return Place(self.owner, self.partition, self.fs, self.fs_block, self.file,
                     self.file_range, self.reason)  # fmt: skip


# ---------------------------------------------------------------- block devices (sysfs)


@dataclass(frozen=True, slots=True)
class Part:
    """A partition of a disk (or the whole disk): its sysfs name, its device number
    (MAJOR:MINOR) and its extent in 512-byte sectors."""

    name: str
    dev: str
    start: int
    size: int


def _read(path: str) -> str:
    with open(path) as f:
        return f.read(4096).strip()


def disk_name(path: str, layouts: Layouts | None = None) -> str:
    """The sysfs name of the block device at `path` (a node such as /dev/nvme0n1, or a name);
    UsageError when it is none."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror}") from None
    if not stat.S_ISBLK(st.st_mode):
        raise UsageError(f"{path}: not a block device")
    link = f"{SYS_DEV_BLOCK}/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"

    def read() -> str:
        try:
            return os.path.basename(os.path.realpath(link, strict=True))
        except OSError:
            raise UsageError(f"{path}: no such block device in sysfs") from None

    return read() if layouts is None else layouts.name(st.st_rdev, read)


def partitions(disk: str, root: str = SYS_BLOCK) -> list[Part]:
    """The partitions of `disk` by start sector; [] when it has none."""
    base = os.path.join(root, disk)
    out = []
    for name in sorted(os.listdir(base)):
        d = os.path.join(base, name)
        if not os.path.exists(os.path.join(d, "partition")):
            continue
        out.append(Part(name, _read(f"{d}/dev"), int(_read(f"{d}/start")), int(_read(f"{d}/size"))))
    return sorted(out, key=lambda p: p.start)


def find_part(parts: Sequence[Part], sector: int) -> Part | None:
    """The partition holding a 512-byte sector, or None (a gap or the partition table)."""
    for p in parts:
        if p.start <= sector < p.start + p.size:
            return p
    return None


def fs_offset(lba: int, lba_size: int, part_start: int) -> int:
    """The byte offset inside the partition of the first byte of `lba` (a disk LBA)."""
    return lba * lba_size - part_start * SECTOR


def holders(name: str, root: str = SYS_BLOCK) -> list[str]:
    """What stacks on a block device (dm-0 for LVM or dm-crypt, md0...)."""
    try:
        return sorted(os.listdir(os.path.join(root, name, "holders")))
    except OSError:
        return []


@dataclass(frozen=True, slots=True)
class Layout:
    """What sysfs says of a disk, read at monotonic time `read_at`: its device number, LBA size
    and size in 512-byte sectors, its partitions by start, and what holds the disk and each
    partition (by sysfs name)."""

    name: str
    dev: str
    lba_size: int
    sectors: int
    parts: tuple[Part, ...]
    holders: dict[str, list[str]]
    read_at: float


def read_layout(name: str, root: str = SYS_BLOCK) -> Layout:
    """The Layout of disk `name` now (OSError if it is gone)."""
    base = os.path.join(root, name)
    parts = tuple(partitions(name, root))
    return Layout(
        name,
        _read(f"{base}/dev"),
        int(_read(f"{base}/queue/logical_block_size")),
        int(_read(f"{base}/size")),
        parts,
        {p: holders(p, root) for p in (name, *(q.name for q in parts))},
        time.monotonic(),
    )


@dataclass(frozen=True, slots=True)
class _Known:
    """What `Layouts.known` answers for a disk at once, from its layout read at `read_at` and the
    mount table of `generation`: the answer for the 512-byte sectors [start, end) of each
    partition (or the whole disk) noted."""

    read_at: float
    generation: int  # of the mount table
    lba_size: int
    extents: list[tuple[int, int, Place]]


class Layouts:
    """Disks' layouts and the mount table, kept between the lookups of a long-running caller
    (the kernel source's Placer, which in a storm looks up LBAs of one disk many times a
    second: reading sysfs and the mount table again for each cost more than the rest of the
    lookup). A disk's layout is read again after `ttl` seconds (and its sysfs name, from its
    device number); the mount table whenever it changed (mountinfo.MountTable), and so are
    the mounts of a device found in it. Thread-safe."""

    def __init__(self, ttl: float = LAYOUT_S, root: str = SYS_BLOCK) -> None:
        self.ttl = ttl
        self.root = root
        self.table = mountinfo.MountTable()
        self._disks: dict[str, Layout] = {}
        self._names: dict[int, tuple[float, str]] = {}  # by device number: (read at, name)
        self._mounts_of: dict[str, list[mountinfo.Mount]] = {}  # by dev, for `_generation`
        self._generation = -1
        self._known: dict[str, _Known] = {}  # by disk path: see `known`
        self._polled = 0.0  # when `known` last polled the mount table
        self._lock = threading.Lock()

    def name(self, rdev: int, read: Callable[[], str]) -> str:
        """The sysfs name of block device number `rdev` (`read` finds it when not known)."""
        now = time.monotonic()
        with self._lock:
            hit = self._names.get(rdev)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        name = read()
        with self._lock:
            self._names[rdev] = (now, name)
        return name

    def disk(self, name: str) -> Layout:
        with self._lock:
            lay = self._disks.get(name)
        if lay is None or time.monotonic() - lay.read_at >= self.ttl:
            lay = read_layout(name, self.root)
            with self._lock:
                self._disks[name] = lay
        return lay

    def known(self, disk: str, lba: int) -> Place | None:
        """The answer for `lba` of block device `disk` (a /dev path) when a lookup gave it for
        its partition with no filesystem to ask (see `_where`: the partition is held, not
        mounted, or of a filesystem nvmefs cannot map), within `ttl` and with the mount table
        unchanged since; else None. For the event loop: it reads nothing (a poll of the mount
        table at most every MOUNTS_POLL_S, never waiting for a lookup's read of it)."""
        now = time.monotonic()
        if now - self._polled >= MOUNTS_POLL_S:
            self._polled = now
            if self.table.changed():
                return None
        with self._lock:
            k = self._known.get(disk)
        if k is None or now - k.read_at >= self.ttl or k.generation != self.table.generation:
            return None
        sector = lba * k.lba_size // SECTOR
        for start, end, place in k.extents:
            if start <= sector < end:
                return place
        return None

    def note(self, disk: str, lay: Layout, part: Part, generation: int, answer: Location) -> None:
        """What `_where` answered for `part` of `disk` from layout `lay` and the mount table of
        `generation`, for `known`."""
        with self._lock:
            k = self._known.get(disk)
            if k is None or (k.read_at, k.generation) != (lay.read_at, generation):
                k = self._known[disk] = _Known(lay.read_at, generation, lay.lba_size, [])
            k.extents.append((part.start, part.start + part.size, answer.place()))

    def mounts_of(self, dev: str) -> tuple[int, list[mountinfo.Mount]]:
        """(the mount table's generation, the mounts of block device `dev` in it)."""
        generation, table = self.table.get()
        with self._lock:
            if generation != self._generation:
                self._mounts_of, self._generation = {}, generation
            hit = self._mounts_of.get(dev)
        if hit is None:
            hit = _mounts_in(table, dev)
            with self._lock:
                if generation == self._generation:
                    self._mounts_of[dev] = hit
        return generation, hit


# ---------------------------------------------------------------- FIEMAP and GETFSMAP

FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
FIEMAP_HEAD = struct.Struct("=QQIIII")  # fm_start fm_length fm_flags mapped count reserved
FIEMAP_EXTENT = struct.Struct("=QQQ16xI12x")  # logical physical length [res] flags [res]
FIEMAP_EXTENT_LAST = 0x1
# Extents whose physical address is not (yet) a place on the device: delayed allocation,
# unknown, inline in metadata, encoded (compressed or encrypted).
FIEMAP_NOT_ON_DISK = 0x2 | 0x4 | 0x8 | 0x200
FIEMAP_BATCH = 128


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of a file: `length` bytes at file offset `logical`, device offset `physical`."""

    logical: int
    physical: int
    length: int
    flags: int


def fiemap_decode(buf: bytes) -> tuple[int, list[Extent]]:
    """(mapped extent count, the extents) of an FS_IOC_FIEMAP reply."""
    _, _, _, mapped, count, _ = FIEMAP_HEAD.unpack_from(buf, 0)
    n = min(mapped, count, (len(buf) - FIEMAP_HEAD.size) // FIEMAP_EXTENT.size)
    out = []
    for i in range(n):
        lo, ph, ln, fl = FIEMAP_EXTENT.unpack_from(buf, FIEMAP_HEAD.size + i * FIEMAP_EXTENT.size)
        out.append(Extent(lo, ph, ln, fl))
    return mapped, out


def fiemap(fd: int) -> Iterator[Extent]:
    """The extents of an open file, in file order (no sync: extents not on disk yet are
    flagged, and passed over by the callers)."""
    start = 0
    while True:
        buf = bytearray(FIEMAP_HEAD.size + FIEMAP_BATCH * FIEMAP_EXTENT.size)
        FIEMAP_HEAD.pack_into(buf, 0, start, (1 << 64) - 1 - start, 0, 0, FIEMAP_BATCH, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        mapped, extents = fiemap_decode(bytes(buf))
        if not extents:
            return
        yield from extents
        last = extents[-1]
        if last.flags & FIEMAP_EXTENT_LAST or mapped < FIEMAP_BATCH:
            return
        start = last.logical + last.length


def file_range(extents: Iterator[Extent], phys: int, block: int) -> tuple[int, int] | None:
    """The file bytes [start, end) held by the filesystem block at device offset `phys`
    (block-aligned, `block` bytes long), or None when no extent on disk covers it."""
    for e in extents:
        if e.flags & FIEMAP_NOT_ON_DISK:
            continue
        if e.physical <= phys < e.physical + e.length:
            start = e.logical + (phys - e.physical)
            return start, start + block
    return None


FS_IOC_GETFSMAP = 0xC0C0583B  # _IOWR('X', 59, struct fsmap_head)
FSMAP = struct.Struct("=IIQQQQ24x")  # device flags physical owner offset length [reserved]
FSMAP_HEAD = struct.Struct("=IIII48x")  # iflags oflags count entries [reserved]
FMR_OF_SPECIAL_OWNER = 0x10
FSMAP_BATCH = 64
FSMAP_ROUNDS = 64
_ALL = (1 << 64) - 1


def _owner(kind: int, code: int) -> int:
    return (kind << 32) | code


FMR_OWN_FREE = _owner(0, 1)
FMR_OWN_UNKNOWN = _owner(0, 2)
# Special owners by name (XFS's 'X' and ext4's 'f' families): every one is metadata.
SPECIAL_OWNERS = {
    _owner(ord("X"), 1): "static fs metadata",
    _owner(ord("X"), 2): "journalling log",
    _owner(ord("X"), 3): "per-AG metadata",
    _owner(ord("X"), 4): "inode btree",
    _owner(ord("X"), 5): "inodes",
    _owner(ord("X"), 6): "refcount btree",
    _owner(ord("X"), 7): "cow reservation",
    _owner(ord("X"), 8): "defective",
    _owner(ord("f"), 1): "group descriptors",
    _owner(ord("f"), 2): "block bitmap",
    _owner(ord("f"), 3): "inode bitmap",
}


@dataclass(frozen=True, slots=True)
class MapRecord:
    """One GETFSMAP record: `length` bytes at device offset `physical`, owned by `owner` (an
    inode when not `special`, then `offset` is the file offset)."""

    physical: int
    length: int
    owner: int
    offset: int
    special: bool
    device: int = 0


def encode_dev(dev: str) -> int:
    """MAJOR:MINOR as GETFSMAP's fmr_device has it (the kernel's new_encode_dev)."""
    major, minor = (int(x) for x in dev.split(":"))
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def fsmap_request(lo: int, hi: int, count: int = 16, device: int = 0) -> bytearray:
    """A GETFSMAP query for bytes [lo, hi] of `device` (encode_dev): low key at lo, high key
    at hi and all ones. The low key names the device: a filesystem answers for a device after
    the low key's from that device's start (XFS does)."""
    buf = bytearray(FSMAP_HEAD.size + (2 + count) * FSMAP.size)
    FSMAP_HEAD.pack_into(buf, 0, 0, 0, count, 0)
    FSMAP.pack_into(buf, FSMAP_HEAD.size, device, 0, lo, 0, 0, 0)
    FSMAP.pack_into(buf, FSMAP_HEAD.size + FSMAP.size, 0xFFFFFFFF, 0xFFFFFFFF, hi, _ALL, _ALL, 0)
    return buf


def fsmap_decode(buf: bytes) -> list[MapRecord]:
    """The records of a GETFSMAP reply."""
    _, _, count, entries = FSMAP_HEAD.unpack_from(buf, 0)
    base = FSMAP_HEAD.size + 2 * FSMAP.size
    n = min(count, entries, (len(buf) - base) // FSMAP.size)
    out = []
    for i in range(n):
        dev, flags, phys, owner, offset, length = FSMAP.unpack_from(buf, base + i * FSMAP.size)
        special = bool(flags & FMR_OF_SPECIAL_OWNER)
        out.append(MapRecord(phys, length, owner, offset, special, dev))
    return out


def getfsmap(mountpoint: str, phys: int, block: int, device: int) -> list[MapRecord] | None:
    """The GETFSMAP records covering device byte `phys` of the filesystem mounted at
    `mountpoint`; None when it has no GETFSMAP. ext4 may answer from before the low key (from
    its group's start), so replies are read on, at most FSMAP_ROUNDS of them."""
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        lo = phys
        for _ in range(FSMAP_ROUNDS):
            buf = fsmap_request(lo, phys + block - 1, FSMAP_BATCH, device)
            try:
                fcntl.ioctl(fd, FS_IOC_GETFSMAP, buf)
            except OSError:  # EOPNOTSUPP, ENOTTY: not this filesystem
                return None
            replies = fsmap_decode(bytes(buf))
            records = [r for r in replies if r.device == device]  # not an external log's
            hits = [r for r in records if r.physical <= phys < r.physical + r.length]
            if hits or len(replies) < FSMAP_BATCH or not records:
                return hits
            end = records[-1].physical + records[-1].length
            if end <= lo or end > phys:
                return hits
            lo = end
        return []
    finally:
        os.close(fd)


# ---------------------------------------------------------------- tools (e2fsprogs)


class ToolError(Exception):
    """A tool that is missing, timed out or failed; the message is the reason for a user."""


def run_tool(argv: Sequence[str], timeout: float, stdin: str = "") -> str:
    """A tool's standard output (at most OUTPUT_CAP bytes), killed with its process group at
    `timeout` seconds."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as inp:
        inp.write(stdin.encode())
        inp.seek(0)
        try:
            proc = subprocess.Popen(
                argv,
                stdin=inp,
                stdout=out,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                env={
                    "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                    "LC_ALL": "C",
                },
            )
        except FileNotFoundError:
            raise ToolError(f"{argv[0]} not installed") from None
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise ToolError(f"{argv[0]} timed out after {timeout:g} s") from None
        out.seek(0)
        text = out.read(OUTPUT_CAP).decode("utf-8", "surrogateescape")
    return text


_ICHECK = re.compile(r"^(\d+)\s+(\d+|<block not found>)\s*$", re.MULTILINE)
_NCHECK = re.compile(r"^(\d+)\t(.*)$", re.MULTILINE)


def parse_icheck(text: str) -> dict[int, int | None]:
    """debugfs `icheck` output: block -> inode, None for `<block not found>`."""
    return {int(b): (None if i.startswith("<") else int(i)) for b, i in _ICHECK.findall(text)}


def parse_ncheck(text: str) -> dict[int, str]:
    """debugfs `ncheck` output: inode -> its first path (relative to the filesystem root,
    starting with /)."""
    out: dict[int, str] = {}
    for ino, path in _NCHECK.findall(text):
        out.setdefault(int(ino), path)
    return out


_TESTB = re.compile(r"^Block (\d+) (marked in use|not in use)$", re.MULTILINE)


def parse_testb(text: str) -> dict[int, bool]:
    """debugfs `testb` output: block -> whether the on-disk bitmap marks it in use."""
    return {int(b): state == "marked in use" for b, state in _TESTB.findall(text)}


# ext4's inodes below this number are the filesystem's own (journal, resize, bad blocks...).
EXT4_FIRST_INO = 11


# ---------------------------------------------------------------- the walk


@dataclass
class Walk:
    """A bounded walk of one mounted filesystem (not crossing into other mounts)."""

    root: str
    deadline: float
    max_files: int
    files: int = 0
    gave_up: bool = False

    def entries(self) -> Iterator[os.DirEntry[str]]:
        """Every entry (files, directories, the rest) below the root on its filesystem, until
        the bounds are reached (then `gave_up`)."""
        dev = os.stat(self.root).st_dev
        stack = [self.root]
        while stack:
            top = stack.pop()
            try:
                it = os.scandir(top)
            except OSError:
                continue
            with it:
                for e in it:
                    if self.files >= self.max_files or time.monotonic() > self.deadline:
                        self.gave_up = True
                        return
                    self.files += 1
                    try:
                        if e.is_dir(follow_symlinks=False):
                            if e.stat(follow_symlinks=False).st_dev != dev:
                                continue  # another filesystem mounted here
                            stack.append(e.path)
                    except OSError:
                        continue
                    yield e


def find_inode(root: str, ino: int, deadline: float, max_files: int) -> tuple[str | None, Walk]:
    """A path of inode `ino` under a mountpoint (directory entries carry their inode number:
    no stat per file), or None."""
    w = Walk(root, deadline, max_files)
    for e in w.entries():
        if e.inode() == ino:
            return e.path, w
    return None, w


def find_block(
    root: str, phys: int, block: int, deadline: float, max_files: int
) -> tuple[tuple[str, tuple[int, int]] | None, Walk]:
    """The regular file holding device offset `phys`, with its byte range, by FIEMAP over
    every file, or None."""
    w = Walk(root, deadline, max_files)
    for e in w.entries():
        try:
            if not e.is_file(follow_symlinks=False):
                continue
            fd = os.open(e.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            rng = file_range(fiemap(fd), phys, block)
        except OSError:
            rng = None
        finally:
            os.close(fd)
        if rng is not None:
            return (e.path, rng), w
    return None, w


# ---------------------------------------------------------------- the lookup


_cache: collections.OrderedDict[tuple[str, str, int, int], Location] = collections.OrderedDict()
_cache_lock = threading.Lock()


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


def _file_answer(loc: Location, path: str, phys: int, block: int) -> Location:
    """`loc` owned by the file at `path`, with the byte range FIEMAP gives."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        return replace(loc, file=path, reason=f"{path}: {e.strerror}")
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            # A directory's blocks are its entries: metadata, named by the directory.
            return replace(loc, owner="metadata", file=path, reason=f"directory {path}")
        size = st.st_size
        rng = file_range(fiemap(fd), phys, block)
    except OSError as e:
        return replace(loc, file=path, reason=f"FIEMAP on {path}: {e.strerror}")
    finally:
        os.close(fd)
    if rng is None:
        # The inode owns the block but no data extent covers it: its extent tree, an xattr
        # block, or a directory's index.
        return replace(loc, owner="metadata", file=path, reason=f"metadata of {path}")
    return replace(loc, owner="file", file=path, file_range=within(rng, size))


def _same_device(source: str, dev: str) -> bool:
    """Whether a mount's source is the block device MAJOR:MINOR `dev`."""
    try:
        st = os.stat(source)
    except (OSError, ValueError):
        return False
    return stat.S_ISBLK(st.st_mode) and f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" == dev


def _mounts_in(table: Sequence[mountinfo.Mount], dev: str) -> list[mountinfo.Mount]:
    """The mounts of block device `dev` in `table`, in its order. btrfs shows an anonymous
    device number in mountinfo (0:NN): its mounts are found by their source."""
    found = [m for m in table if m.dev == dev]
    return found or [m for m in table if m.source.startswith("/") and _same_device(m.source, dev)]


def _through_mounts(mounts: Sequence[mountinfo.Mount], rel: str, ino: int) -> str | None:
    """The absolute path of fs-relative `rel` through the first mount that shows it as inode
    `ino` (a bind mount of a subdirectory does not)."""
    for m in mounts:
        path = os.path.join(m.point, rel.lstrip("/"))
        with contextlib.suppress(OSError):
            if os.stat(path, follow_symlinks=False).st_ino == ino:
                return path
    return None


def _where(
    disk: str, lba: int, layouts: Layouts | None
) -> Location | tuple[Location, Part, list[mountinfo.Mount], int]:
    """The first steps of `locate`, which need no filesystem: the answer when they give it
    (no partition there, a holder, not mounted), else (the location so far, the partition,
    its mounts, the byte offset of `lba` in it)."""
    name = disk_name(disk, layouts)
    lay = read_layout(name) if layouts is None else layouts.disk(name)
    lba_size, sectors = lay.lba_size, lay.sectors
    if lba < 0 or lba * lba_size >= sectors * SECTOR:
        raise UsageError(f"LBA {lba} is beyond {disk} ({sectors * SECTOR // lba_size} LBAs)")
    loc = Location(disk=disk, lba=lba, lba_size=lba_size)
    if lay.parts:
        part = find_part(lay.parts, lba * lba_size // SECTOR)
        if part is None:
            return replace(loc, reason="in no partition (the partition table or a gap)")
    else:
        part = Part(name, lay.dev, 0, sectors)
    offset = fs_offset(lba, lba_size, part.start)
    loc = replace(loc, partition=f"/dev/{part.name}", partition_lba=offset // lba_size)
    generation = -1 if layouts is None else layouts.table.generation
    held = lay.holders.get(part.name) or []
    answer = None
    if held:
        answer = replace(
            loc, reason=f"/dev/{part.name} is used by {', '.join(held)} (LVM, md or dm-crypt)"
        )
    else:
        if layouts is None:
            mounts = _mounts_in(mountinfo.mounts(), part.dev)
        else:
            generation, mounts = layouts.mounts_of(part.dev)
        if not mounts:
            answer = replace(loc, reason=f"/dev/{part.name} is not mounted")
        elif mounts[0].fstype in UNSUPPORTED:
            fs, point = mounts[0].fstype, mounts[0].point
            answer = replace(
                loc, fs=fs, mountpoint=point, reason=f"{fs} is not supported (no device offsets)"
            )
    if answer is None:
        return loc, part, mounts, offset
    if layouts is not None:  # the same for every LBA of the partition: `known` gives it
        layouts.note(disk, lay, part, generation, answer)
    return answer


def locate(
    disk: str, lba: int, timeout: float = TIMEOUT_S, max_files: int = MAX_FILES,
    layouts: Layouts | None = None,
) -> Location:  # fmt: skip
    """What owns `lba` of block device `disk` (a /dev path). UsageError for a path that is no
    block device or an LBA beyond it; every other failure is an "unresolved" answer with its
    reason. Takes at most about `timeout` seconds (each tool and the walk stop by then). With
    `layouts`, the disk's layout and the mount table come from there (a caller that looks up
    many LBAs); else they are read now."""
    where = _where(disk, lba, layouts)
    if isinstance(where, Location):
        return where
    loc, part, mounts, offset = where
    mount = mounts[0]
    loc = replace(loc, fs=mount.fstype, mountpoint=mount.point)
    try:
        block = os.statvfs(mount.point).f_bsize
    except OSError as e:
        return replace(loc, reason=f"{mount.point}: {e.strerror}")
    fs_block = offset // block
    phys = fs_block * block
    loc = replace(loc, fs_block=fs_block, fs_block_size=block)
    key = (part.dev, mount.fstype, block, fs_block)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
    if hit is not None:
        return replace(hit, disk=disk, lba=lba, partition_lba=loc.partition_lba)
    answer = _resolve(loc, part, mounts, phys, block, time.monotonic() + timeout, max_files)
    if answer.owner != "unresolved":
        with _cache_lock:
            _cache[key] = answer
            while len(_cache) > CACHE_SIZE:
                _cache.popitem(last=False)
    return answer


def _resolve(
    loc: Location,
    part: Part,
    mounts: Sequence[mountinfo.Mount],
    phys: int,
    block: int,
    deadline: float,
    max_files: int,
) -> Location:
    root = mounts[0].point
    try:
        records = getfsmap(root, phys, block, encode_dev(part.dev))
    except OSError as e:
        return replace(loc, reason=f"{root}: {e.strerror}")
    ino: int | None = None
    for r in records or ():
        if r.owner == FMR_OWN_FREE:
            return replace(loc, owner="free")
        if r.special and r.owner != FMR_OWN_UNKNOWN:
            return replace(loc, owner="metadata", reason=SPECIAL_OWNERS.get(r.owner, "metadata"))
        if not r.special:
            ino = r.owner
    node = f"/dev/{part.name}"
    if not _same_device(node, part.dev):  # no devtmpfs node: the one it was mounted from
        node = mounts[0].source
    if ino is None and loc.fs in EXT:
        try:
            ino = _ext_icheck(node, phys // block, deadline)
        except ToolError as e:
            return replace(loc, reason=str(e))
        if ino is None:
            # No inode's: free, or the filesystem's own blocks GETFSMAP does not name (it
            # says "unknown" also for blocks mballoc holds in memory as a preallocation).
            try:
                used = _ext_testb(node, phys // block, deadline)
            except ToolError as e:
                return replace(loc, reason=str(e))
            if not used:
                return replace(loc, owner="free")
            return replace(loc, owner="metadata", reason="filesystem metadata")
        if ino < EXT4_FIRST_INO:
            return replace(loc, owner="metadata", reason=f"reserved inode {ino}")
        try:
            rel = _ext_ncheck(node, ino, deadline)
        except ToolError as e:
            return replace(loc, reason=str(e))
        path = _through_mounts(mounts, rel, ino) if rel else None
        if path is not None:
            return _file_answer(loc, path, phys, block)
        # debugfs prints names as they are: one with a newline does not parse. Directory
        # entries carry inode numbers: look for it.
    if ino is not None:
        found, walk = find_inode(root, ino, deadline, max_files)
        if found is None:
            return replace(loc, reason=_gave_up(f"inode {ino}", walk, deadline))
        return _file_answer(loc, found, phys, block)
    start = time.monotonic()
    hit, walk = find_block(root, phys, block, deadline, max_files)
    if hit is not None:
        return replace(loc, owner="file", file=hit[0], file_range=_clip(hit[0], hit[1]))
    if walk.gave_up:
        return replace(
            loc,
            reason=f"searched {walk.files} files in {time.monotonic() - start:.1f} s",
        )
    if records:  # used space that no file maps: the filesystem's own
        return replace(loc, owner="metadata", reason="filesystem metadata")
    return replace(loc, reason=f"no file maps it (searched {walk.files} files)")


def within(rng: tuple[int, int], size: int) -> tuple[int, int] | None:
    """A file's byte range [start, end) cut at its size; None for a block wholly past its end
    (space allocated beyond it, or a file that shrank meanwhile)."""
    if rng[0] >= size:
        return None
    return rng[0], min(rng[1], size)


def _clip(path: str, rng: tuple[int, int]) -> tuple[int, int] | None:
    with contextlib.suppress(OSError):
        return within(rng, os.stat(path).st_size)
    return rng


def _gave_up(what: str, walk: Walk, deadline: float) -> str:
    if walk.gave_up:
        return f"{what}: searched {walk.files} files before the limit"
    return f"{what} has no path (searched {walk.files} files)"


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise ToolError("timed out")
    return left


def _ext_icheck(dev: str, fs_block: int, deadline: float) -> int | None:
    # Not -c (catastrophic mode): it skips the bitmaps, and reads the same inode tables.
    text = run_tool(["debugfs", "-R", f"icheck {fs_block}", dev], _remaining(deadline))
    got = parse_icheck(text)
    if fs_block not in got:
        raise ToolError(f"debugfs icheck gave no answer for block {fs_block}")
    return got[fs_block]


def _ext_testb(dev: str, fs_block: int, deadline: float) -> bool:
    text = run_tool(["debugfs", "-R", f"testb {fs_block}", dev], _remaining(deadline))
    used = parse_testb(text).get(fs_block)
    if used is None:
        raise ToolError(f"debugfs testb gave no answer for block {fs_block}")
    return used


def _ext_ncheck(dev: str, ino: int, deadline: float) -> str | None:
    text = run_tool(["debugfs", "-R", f"ncheck {ino}", dev], _remaining(deadline))
    return parse_ncheck(text).get(ino)
