"""The filesystem: five files over the recorder. Thin on purpose; the logic is in views.py.

    nvme_circular_buffer        0444  the ring as text lines
    nvme_circular_buffer.jsonl  0444  the same entries as JSON lines
    stats                       0444  name value lines
    nvmefs.prom                 0444  the metrics in Prometheus's text format (outputs/metrics.py)
    control                     0200  clear, log=..., profile=..., format=..., clock=...

stats and nvmefs.prom are snapshots taken at open, so reads at any offset and size agree. The
mtime of nvmefs.prom is the moment it is looked at: its content is that fresh, and
node_exporter's textfile collector, which reads the mount directly, exports that mtime (an
alert on a stale textfile then means the daemon is gone, not that it is idle).

Every file is opened direct_io (reads come to us, never from a stale page cache) and a file's
attributes are never cached (attr_timeout 0); only names and the root's attributes, which never
change, are left to the kernel. Each read handle is a bounded stream (views.py): a read at an
offset whose bytes it no longer keeps fails with ENODATA, and a read at its horizon is an EOF.

st_size is per reading process (`_size_for`): the largest stream size among that process's
handles on the file, after bringing the handle it read last up to date, so GNU tail -f sees
exactly the appended bytes and no handle, whichever thread asks, sees a size below what it has
read. A FUSE request names the calling thread, not its process: the thread id is mapped to its
thread group id through /proc.

Nothing here can be created, removed, renamed or linked (EPERM), and the permission checks follow
the modes whoever asks, root included, when the kernel leaves them to us (without
default_permissions): `access(W_OK)` on a 0444 file is false.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import select
import stat
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3

from nvmefs.outputs.metrics import Metrics
from nvmefs.recorder import ControlError, Recorder
from nvmefs.store import events
from nvmefs.store.events import HostEvent
from nvmefs.store.ring import WALL_NS
from nvmefs.store.views import Dropped, LogStream, StaticStream, Stream

log = logging.getLogger("nvmefs.fs")

ROOT = pyfuse3.ROOT_INODE
BUF, JSONL, STATS, CONTROL, PROM = range(2, 7)
FILES = {
    b"nvme_circular_buffer": (BUF, 0o444),
    b"nvme_circular_buffer.jsonl": (JSONL, 0o444),
    b"stats": (STATS, 0o444),
    b"nvmefs.prom": (PROM, 0o444),
    b"control": (CONTROL, 0o200),
}
SNAPSHOTS = (STATS, PROM)  # files whose content is made whole at open
MODES = {ino: mode for ino, mode in FILES.values()}
ROOT_MODE = 0o555
NAMES = sorted(FILES)

# The preferred I/O size stat() reports; cat and cp read max(128 KiB, this) per call. Larger
# saves FUSE requests, but with direct_io the kernel pins the reader's whole buffer, and a fresh
# large one costs more in page faults than it saves.
BLKSIZE = 1 << 17
STATIC_TIMEOUT = 300.0
# Thread id -> process id, remembered for this many threads (most recently added kept).
TGID_CACHE = 4096
# The answer to a read at an offset whose bytes the handle no longer keeps (views.Dropped).
DROPPED_ERRNO = errno.ENODATA

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def guarded(fn: F) -> F:
    """A bug in a handler answers EIO and is logged; it never ends the filesystem."""

    @functools.wraps(fn)
    async def wrapper(self: NvmeFS, *args: Any) -> Any:
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except Exception as e:
            log.exception("%s failed", fn.__name__)
            self.recorder.ring.append(
                HostEvent(events.HOST_ERROR, f"filesystem {fn.__name__} failed: {e!r}")
            )
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


def tgid_of(tid: int) -> int:
    """The process (thread group) a thread belongs to, from /proc/<tid>/status; `tid` itself
    when that cannot be read (the thread is gone, or the number is not a thread)."""
    try:
        fd = os.open(f"/proc/{tid}/status", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return tid
    try:
        head = os.read(fd, 4096)  # Tgid: is the fourth line
    except OSError:
        return tid
    finally:
        os.close(fd)
    m = re.search(rb"^Tgid:\s*(\d+)", head, re.MULTILINE)
    return int(m.group(1)) if m else tid


def _unescape(field: bytes) -> bytes:
    # mountinfo writes space, tab, newline and backslash in paths as \ooo.
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


class MountWatch:
    """Whether this filesystem is still mounted anywhere, from /proc/self/mountinfo.

    `start()` (once the mount is live) notes the device number of the FUSE mount at the
    mountpoint, so a later mount at the same path does not count as ours. Invariant: `mounted`
    is what the mount table said at the last read; the table is read again only after poll()
    on it reports a change, so asking costs one system call when nothing changed.
    """

    def __init__(self, mountpoint: str) -> None:
        # Resolved by the caller: once mounted, looking the path up would ask this filesystem,
        # from the thread that has to answer.
        self.path = os.fsencode(mountpoint)
        self.dev: bytes | None = None
        self.mounted = True
        self._fd: int | None = None
        self._poll = select.poll()

    def _lines(self) -> list[list[bytes]]:
        assert self._fd is not None
        os.lseek(self._fd, 0, os.SEEK_SET)
        chunks = []
        while data := os.read(self._fd, 1 << 16):
            chunks.append(data)
        out = []
        for line in b"".join(chunks).splitlines():
            left, _, right = line.partition(b" - ")
            fields = left.split()
            if len(fields) >= 5 and right:
                out.append([fields[2], _unescape(fields[4]), right.split()[0]])
        return out

    def start(self) -> None:
        self._fd = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        self._poll.register(self._fd, select.POLLPRI)
        for dev, point, fstype in self._lines():
            if point == self.path and fstype.startswith(b"fuse"):
                self.dev = dev  # the last one listed is the one on top
        self.mounted = True

    def still_mounted(self) -> bool:
        if self._fd is None:
            return True
        if self._poll.poll(0):  # the mount table changed since the last look
            lines = self._lines()
            if self.dev is not None:
                self.mounted = any(dev == self.dev for dev, _, _ in lines)
            else:
                self.mounted = any(point == self.path for _, point, _ in lines)
        return self.mounted


class _Reader:
    """One process's open handles on one file, and the st_size it has been told.

    Invariant: `size` is at least the rendered size of each of its handles and every st_size
    this process was given since one of its handles last closed (a close sets it to the largest
    rendered size left, so it never goes below what a handle still open has read);
    `active` is the handle it read last, None before a read; `horizon` is the newest entry a
    size told to it covers, so its reads may go that far.
    """

    __slots__ = ("active", "fhs", "horizon", "key", "size")

    def __init__(self, key: tuple[int, int], horizon: int) -> None:
        self.key = key
        self.fhs: set[int] = set()
        self.active: int | None = None
        self.size = 0
        self.horizon = horizon


class _Handle:
    """An open read handle: its stream, and the reader (process and file) it belongs to."""

    __slots__ = ("reader", "stream")

    def __init__(self, stream: Stream, reader: _Reader) -> None:
        self.stream = stream
        self.reader = reader


class NvmeFS(pyfuse3.Operations):
    """The five files over a Recorder. Invariant: every open read handle is in `_handles` with
    its own stream and belongs to exactly one `_Reader` (its process and inode); `_open` counts
    every open handle, control handles included."""

    def __init__(
        self, recorder: Recorder, mountpoint: str | None = None, metrics: Metrics | None = None
    ) -> None:
        super().__init__()
        self.recorder = recorder
        # The daemon's metrics, attached to the ring before its start entry; without them, the
        # host events are counted from here on.
        self.metrics = metrics or Metrics()
        self.metrics.attach(recorder.ring)
        self.mounted_ns = time.time_ns()
        # Set it to have the daemon end once lazily unmounted (umount -l) and the last open
        # handle is closed: the kernel keeps such a mount alive while handles are open.
        # Resolved now, before the mount: looking it up later would ask this filesystem.
        self.mountpoint = None if mountpoint is None else os.path.realpath(mountpoint)
        self.watch: MountWatch | None = None
        self._handles: dict[int, _Handle] = {}  # read handles
        self._readers: dict[tuple[int, int], _Reader] = {}  # (tgid, inode) -> reader
        self._tgids: OrderedDict[int, int] = OrderedDict()  # tid -> tgid
        self._polls: dict[int, pyfuse3.PollHandle] = {}  # fh -> handle to notify
        self._open = 0
        self._next_fh = 1
        recorder.ring.subscribe(self._on_append)

    def init(self) -> None:
        # The mount is live now: note which mount is ours. Called from libfuse's init callback,
        # which has no way to report an error: a failure only costs the lazy-unmount check.
        if self.mountpoint is not None:
            try:
                watch = MountWatch(self.mountpoint)
                watch.start()
                self.watch = watch
            except Exception:
                log.exception("cannot watch the mount table")

    def attached(self) -> bool:
        """Whether this filesystem is still mounted, as far as the mount table says (a newer
        mount at the same path is not this one); True when that is not known."""
        return self.watch is None or self.watch.still_mounted()

    # -- attributes ----------------------------------------------------------------------------

    def _attr(self, inode: int, size: int = 0) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        if inode == ROOT:
            a.st_mode = stat.S_IFDIR | ROOT_MODE
            a.st_nlink = 2
        else:
            a.st_mode = stat.S_IFREG | MODES[inode]
            a.st_nlink = 1
            a.st_size = size
        a.st_uid = a.st_gid = 0
        a.st_blksize = BLKSIZE
        a.st_blocks = (size + 511) // 512
        a.st_atime_ns = a.st_ctime_ns = self.mounted_ns
        a.st_mtime_ns = self._mtime_ns(inode)
        # Names and the root never change, so the kernel may keep them (saving a LOOKUP and a
        # root GETATTR per open); a file's size differs per reader, so it is asked every time.
        a.attr_timeout = STATIC_TIMEOUT if inode == ROOT else 0
        a.entry_timeout = STATIC_TIMEOUT
        return a

    def _mtime_ns(self, inode: int) -> int:
        if inode == PROM:
            return time.time_ns()  # made at open: as fresh as the moment it is looked at
        if inode in (BUF, JSONL):
            ring = self.recorder.ring
            _, newest = ring.read_after(ring.last_seq - 1)
            if newest:
                return newest[0][WALL_NS]
        return self.mounted_ns

    def _tgid(self, tid: int) -> int:
        tgids = self._tgids
        tgid = tgids.get(tid)
        if tgid is None:
            # A thread id is reused only after pid_max others: a stale entry is that unlikely,
            # and would only lend one process another's st_size.
            tgid = tgids[tid] = tgid_of(tid)
            if len(tgids) > TGID_CACHE:
                tgids.popitem(last=False)
        return tgid

    def _size_for(self, inode: int, tgid: int) -> int:
        if inode in (ROOT, CONTROL):
            return 0
        reader = self._readers.get((tgid, inode))
        if inode in SNAPSHOTS:
            return reader.size if reader is not None else self._new_stream(inode).size()
        json = inode == JSONL
        if reader is None:
            return self.recorder.fresh_size(json)  # what an open now would see
        # Whatever size is told, this process's reads may go that far.
        reader.horizon = self.recorder.ring.last_seq
        handle = self._handles.get(reader.active) if reader.active is not None else None
        # Only the handle it read last is brought up to date: idle handles hold nothing, and
        # bringing all of them up to date on every stat would make them hold a ring's worth.
        size = handle.stream.size() if handle is not None else self.recorder.fresh_size(json)
        if size > reader.size:
            reader.size = size
        return reader.size

    def _new_stream(self, inode: int) -> Stream:
        r = self.recorder
        if inode == BUF:
            return r.text_stream()
        if inode == JSONL:
            return r.json_stream()
        if inode == PROM:
            return StaticStream(self.metrics.exposition(r))
        return r.stats_stream()

    @guarded
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode != ROOT and inode not in MODES:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode, self._size_for(inode, self._tgid(ctx.pid)))

    @guarded
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT or name not in FILES:
            raise pyfuse3.FUSEError(errno.ENOENT)
        inode = FILES[name][0]
        return self._attr(inode, self._size_for(inode, self._tgid(ctx.pid)))

    @guarded
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        # `echo clear > control` truncates first; nothing else about any file may change.
        only_size = fields.update_size and not (
            fields.update_mode
            or fields.update_uid
            or fields.update_gid
            or fields.update_atime
            or fields.update_mtime
        )
        if inode == CONTROL and only_size and attr.st_size == 0 and ctx.uid == 0:
            return self._attr(inode)
        raise pyfuse3.FUSEError(errno.EACCES if inode != ROOT else errno.EPERM)

    @guarded
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        # Asked only without default_permissions; the modes hold for root too (no override).
        if inode == ROOT:
            perm = ROOT_MODE
        elif inode in MODES:
            perm = MODES[inode]
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        shift = 6 if ctx.uid == 0 else 3 if ctx.gid == 0 else 0  # everything is root:root
        allowed = (perm >> shift) & 0o7
        return mode & allowed == mode

    # -- the namespace is fixed ------------------------------------------------------------------

    @guarded
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    @guarded
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    @guarded
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    @guarded
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    @guarded
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    @guarded
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    @guarded
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    @guarded
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise pyfuse3.FUSEError(errno.EPERM)

    # -- directory -----------------------------------------------------------------------------

    @guarded
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return 0

    @guarded
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for i, name in enumerate(NAMES):
            if i < start_id:
                continue
            inode = FILES[name][0]
            if not pyfuse3.readdir_reply(token, name, self._attr(inode), i + 1):
                break

    @guarded
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_files = len(FILES) + 1
        s.f_namemax = 255
        return s

    # -- files ---------------------------------------------------------------------------------

    @guarded
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode not in MODES:
            raise pyfuse3.FUSEError(errno.EISDIR if inode == ROOT else errno.ENOENT)
        mode = flags & os.O_ACCMODE
        # Root passes the kernel's permission check on any mode: refuse here as the mode says
        # (and without default_permissions, only root, the owner, may write control).
        if inode == CONTROL and (mode != os.O_WRONLY or ctx.uid != 0):
            raise pyfuse3.FUSEError(errno.EACCES)
        if inode != CONTROL and mode != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EACCES)
        fh = self._next_fh
        self._next_fh += 1
        if inode != CONTROL:
            key = (self._tgid(ctx.pid), inode)
            reader = self._readers.get(key)
            if reader is None:
                reader = self._readers[key] = _Reader(key, self.recorder.ring.last_seq)
            stream = self._new_stream(inode)
            if not isinstance(stream, LogStream):  # a snapshot: its size is known and fixed
                reader.size = max(reader.size, stream.size())
            reader.fhs.add(fh)
            self._handles[fh] = _Handle(stream, reader)
        self._open += 1
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    @guarded
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        reader, stream = handle.reader, handle.stream
        try:
            data = stream.read(off, size, reader.horizon)
        except Dropped:
            raise pyfuse3.FUSEError(DROPPED_ERRNO) from None
        reader.active = fh
        if stream.rendered_size > reader.size:
            reader.size = stream.rendered_size
        return data

    @guarded
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if fh in self._handles:
            raise pyfuse3.FUSEError(errno.EBADF)
        # Only a write that arrives whole, in one request at offset 0, applies: the kernel
        # splits a large write(2) into several requests, and none of them may apply alone
        # (the recorder refuses anything over CONTROL_MAX, so the first part fails too).
        if off != 0:
            log.warning("control: refused a write of %d bytes at offset %d", len(buf), off)
            raise pyfuse3.FUSEError(errno.EINVAL)
        try:
            self.recorder.control(buf.decode("utf-8"))
        except (ControlError, UnicodeDecodeError) as e:
            log.warning("control: %s", e)
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        return len(buf)

    @guarded
    async def release(self, fh: int) -> None:
        self._open = max(0, self._open - 1)
        self._polls.pop(fh, None)
        handle = self._handles.pop(fh, None)
        if handle is not None:
            reader = handle.reader
            reader.fhs.discard(fh)
            if not reader.fhs:
                del self._readers[reader.key]
            else:
                if reader.active == fh:
                    reader.active = None
                # The largest of the handles still open: none of them is past it.
                reader.size = max(self._handles[f].stream.rendered_size for f in reader.fhs)
        if self._open == 0 and not self.attached():
            # Lazily unmounted (umount -l) and now nobody holds it: stop serving, so the
            # daemon and its workload end instead of running on unreachable.
            log.info("unmounted and the last handle closed: stopping")
            pyfuse3.terminate()

    @guarded
    async def poll(
        self,
        inode: int,
        fh: int,
        poll_handle: pyfuse3.PollHandle | None,
        ctx: pyfuse3.RequestContext,
    ) -> int:
        handle = self._handles.get(fh)
        if handle is None:
            return select.POLLOUT if inode == CONTROL else 0
        if handle.stream.has_unread:
            return select.POLLIN | select.POLLRDNORM
        if poll_handle is not None:
            self._polls[fh] = poll_handle
        return 0

    def _on_append(self) -> None:
        # On the completion path: nothing to do unless someone is blocked in poll().
        if self._polls:
            handles = list(self._polls.values())
            self._polls.clear()
            for ph in handles:
                ph.notify()
