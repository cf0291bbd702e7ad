"""The filesystem: five files over the recorder. Thin on purpose; the logic is in views.py.

    nvme_circular_buffer        0444  the ring as text lines
    nvme_circular_buffer.jsonl  0444  the same entries as JSON lines
    stats                       0444  name value lines
    nvmefs.prom                 0444  the metrics in Prometheus's text format (what `prom` makes)
    control                     0200  clear, log=..., profile=..., format=..., clock=...

stats and nvmefs.prom are snapshots taken at open, so reads at any offset and size agree (and a
handle's st_size is its own snapshot's). Rendering one costs far more than a FUSE request, so the
st_size a stat() or lookup shows a process without the file open is that of the last snapshot
made, if it is under SNAPSHOT_SIZE_TTL old: a stat loop renders at most once per interval. The
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
default_permissions): `access(W_OK)` on a 0444 file is false, and an open of one for writing or
with O_TRUNC (O_RDONLY|O_TRUNC included) fails with EACCES.

What the handles of users other than root can make the daemon hold is bounded, per user (the
uid that opened them) and for all of them together; root is held to the global bound on handles:
  - open handles: USER_HANDLES per user, ALL_HANDLES in all, root's included, of which
    ROOT_RESERVED_HANDLES only root may use (other users together stop short of them);
  - rendered bytes kept by their streams (views.Budget): USER_BYTES per user, USERS_BYTES for
    all users but root. A stream whose budget is spent renders nothing more: what does not fit
    waits in the ring, or becomes a missed line, never daemon memory. Root's streams keep up to
    a ring's worth each, as they always did: root chose the ring's size.
An open past a user's own bound fails with EMFILE, past a bound shared with others with ENFILE.
A closed handle gives back what it held, and once closed handles have given back TRIM_AFTER bytes
the freed heap is handed back to the system (malloc_trim), so the daemon returns near its idle
size after a mass close.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import heapq
import logging
import os
import re
import select
import stat
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3
import trio

from nvmefs.linux import mountinfo
from nvmefs.recorder import ControlError, Recorder
from nvmefs.store import events
from nvmefs.store.events import HostEvent
from nvmefs.store.ring import WALL_NS
from nvmefs.store.views import Budget, Dropped, StaticStream, Stream

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
# How old the st_size of a snapshot file shown to a process without it open may be, in seconds.
# Rendering nvmefs.prom costs a few hundred microseconds, several FUSE requests' worth: rendering
# per stat let two stat loops take three quarters of the engine's completions (issue 18). A second
# is below any scrape interval, and whoever opens the file gets a fresh snapshot and its own size.
SNAPSHOT_SIZE_TTL = 1.0

# -- what handles may make the daemon hold (issue 18) ----------------------------------------------
# Open handles per user. Legitimate readers are a handful per user (tail -f, a few cats, a metrics
# collector); several thousand is far above that, and keeps what one user's idle handles cost
# (about a kilobyte each, on top of USER_BYTES) to a few MB. Past it open() fails with EMFILE,
# "too many open files": what a process meets at its own descriptor limit, which says the limit
# is the caller's share, not something about the file (EACCES would say it is not readable).
USER_HANDLES = 4096
# Open handles of all users, root included. Past it open() fails with ENFILE, "too many open files
# in system": a table shared by everyone is full, not the caller's own share.
ALL_HANDLES = 16384
# Of ALL_HANDLES, what only root may use: other users together stop short of it, so that a few
# accounts holding their USER_HANDLES each cannot lock root's own monitoring out.
ROOT_RESERVED_HANDLES = 1024
# Rendered bytes that one user's streams may keep together. One stream keeps up to a ring's worth
# (about 220 KB of text and 700 KB of JSON lines at the default capacity of 1024), so a user's
# handles, each read once and stat()ed, held that much apiece: 15,000 handles took the daemon to
# 935 MB. A user's tail -f and a few cats keep a few rings' worth: 32 MiB is room for dozens of
# JSON rings (bytes shared by several handles count once for each). Past it the user's streams
# render nothing more (views.Budget) and its opens fail with EMFILE; a reader of a ring larger
# than that still gets every entry (or a missed line), a budget's worth ahead at a time.
USER_BYTES = 32 << 20
# The same for the streams of all users but root together (ENFILE past it): four users at their
# bound. Root is not charged: a ring's worth per handle, as it chose with capacity=.
USERS_BYTES = 128 << 20
# What root's streams are charged to: a count with no bound.
ROOT_BYTES = sys.maxsize
# glibc keeps freed heap pages for reuse: after 15,000 handles closed, the daemon stayed at its
# peak. Once closed handles have given back this many bytes, malloc_trim(0) hands the free pages
# back, TRIM_DELAY seconds after the close that crossed it: a mass close (whose RELEASE requests
# can take many seconds to arrive under a storm) costs a trim a second, not one per handle. A
# trim blocks the event loop about 0.2 ms a MB of heap: 40 ms at the bounds above.
TRIM_AFTER = 4 << 20
TRIM_DELAY = 1.0
# Seconds between two log lines about refused opens: a user looping on a refused open would
# otherwise have the daemon write a line per attempt.
REFUSED_LOG_INTERVAL = 10.0

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


def _malloc_trim() -> Callable[[], object]:
    """malloc_trim(0) of the C library this process runs on, or a no-op where it has none."""
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own libc
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim): nothing to do
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


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
        self.path = mountpoint
        self.dev: str | None = None
        self.mounted = True
        self._fd: int | None = None
        self._poll = select.poll()

    def start(self) -> None:
        self._fd = os.open(mountinfo.PATH, os.O_RDONLY | os.O_CLOEXEC)
        self._poll.register(self._fd, select.POLLPRI)
        for m in mountinfo.read(self._fd):
            if m.point == self.path and m.fstype.startswith("fuse"):
                self.dev = m.dev  # the last one listed is the one on top
        self.mounted = True

    def still_mounted(self) -> bool:
        if self._fd is None:
            return True
        if self._poll.poll(0):  # the mount table changed since the last look
            table = mountinfo.read(self._fd)
            if self.dev is not None:
                self.mounted = any(m.dev == self.dev for m in table)
            else:
                self.mounted = any(m.point == self.path for m in table)
        return self.mounted


class _Reader:
    """One process's open handles on one file, and the st_size it has been told.

    Invariant: `size` is at least the rendered size of each of its handles and every st_size
    this process was given since one of its handles last closed (a close sets it to the largest
    rendered size left, so it never goes below what a handle still open has read);
    `active` is the handle it read last, None before a read; `horizon` is the newest entry a
    size told to it covers, so its reads may go that far. `fhs` maps each open handle to its
    rendered size as last seen; `_heap` holds (-size, fh) for each of them, and stale pairs (a
    closed handle, an outgrown size) that are dropped when they come to the top.
    """

    __slots__ = ("_heap", "active", "fhs", "horizon", "key", "size")

    def __init__(self, key: tuple[int, int], horizon: int) -> None:
        self.key = key
        self.fhs: dict[int, int] = {}
        self._heap: list[tuple[int, int]] = []
        self.active: int | None = None
        self.size = 0
        self.horizon = horizon

    def grow(self, fh: int | None, size: int) -> None:
        """Handle `fh` has rendered `size` bytes, or (fh None) this process was told `size`."""
        if size > self.size:
            self.size = size
        if fh is None or self.fhs.get(fh) == size:
            return
        self.fhs[fh] = size
        heap = self._heap
        if len(heap) > 2 * len(self.fhs) + 16:  # mostly stale: rebuild, linear but amortized
            heap[:] = [(-n, f) for f, n in self.fhs.items()]
            heapq.heapify(heap)
        else:
            heapq.heappush(heap, (-size, fh))

    def close(self, fh: int) -> None:
        """Handle `fh` closed: `size` becomes the largest rendered size left, found in
        O(log n) amortized, so that a mass close of a process's handles is not quadratic."""
        del self.fhs[fh]
        if self.active == fh:
            self.active = None
        heap, fhs = self._heap, self.fhs
        while heap and fhs.get(heap[0][1]) != -heap[0][0]:
            heapq.heappop(heap)
        self.size = -heap[0][0] if heap else 0


class _Quota:
    """What the open handles of one user hold: how many there are, and the bytes their streams
    keep. Invariant: `handles.used` counts this user's open handles, `bytes.used` what their
    streams keep; both budgets are nested in those of all users but root, except root's (its
    handles count in the global budget, its bytes in none); the quota is dropped once its
    handles are back to 0 (and so are its bytes)."""

    __slots__ = ("bytes", "handles", "uid")

    def __init__(self, uid: int, handles: Budget, bytes_: Budget) -> None:
        self.uid = uid
        self.handles = handles
        self.bytes = bytes_


class _Handle:
    """An open read handle: its stream, the reader (process and file) it belongs to, and the
    quota of the user who opened it."""

    __slots__ = ("quota", "reader", "stream")

    def __init__(self, stream: Stream, reader: _Reader, quota: _Quota) -> None:
        self.stream = stream
        self.reader = reader
        self.quota = quota


class NvmeFS(pyfuse3.Operations):
    """The five files over a Recorder. Invariant: every open read handle is in `_handles` with
    its own stream and belongs to exactly one `_Reader` (its process and inode), every open
    control handle is in `_controls`; each open handle is counted in the quota of the user who
    opened it (`_quotas`), and the budgets of all handles count every one of them."""

    def __init__(
        self,
        recorder: Recorder,
        mountpoint: str | None = None,
        prom: Callable[[Recorder], bytes] | None = None,
    ) -> None:
        super().__init__()
        self.recorder = recorder
        # What nvmefs.prom holds: the daemon's metrics exposition (the outputs, peers of this
        # layer, own the metrics); empty without it.
        self.prom = prom or (lambda _recorder: b"")
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
        self._controls: dict[int, _Quota] = {}  # control handles
        self._next_fh = 1
        # The bounds of the module docstring: every user's handles count in `_all_handles`, and
        # those of users other than root in `_users_*` too (root's bytes in a budget of its own).
        self._all_handles = Budget(ALL_HANDLES)
        self._users_handles = Budget(ALL_HANDLES - ROOT_RESERVED_HANDLES, self._all_handles)
        self._users_bytes = Budget(USERS_BYTES)
        self._quotas: dict[int, _Quota] = {}  # uid -> what its open handles hold
        # The last snapshot of each snapshot file: when it was made (monotonic), its bytes.
        self._snapshots: dict[int, tuple[float, bytes]] = {}
        self._refused = 0  # opens refused by the bounds, since the mount
        self._refused_logged = -REFUSED_LOG_INTERVAL  # when one was last logged (monotonic)
        self._released = 0  # bytes given back by closed handles since the last trim
        self._trim_due = False
        self._trim = _malloc_trim()
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
            newest = self.recorder.ring.newest()
            if newest is not None:
                return newest[WALL_NS]
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
            return reader.size if reader is not None else len(self._snapshot(inode, fresh=False))
        json = inode == JSONL
        if reader is None:
            return self.recorder.fresh_size(json)  # what an open now would see
        # Whatever size is told, this process's reads may go that far.
        reader.horizon = self.recorder.ring.last_seq
        handle = self._handles.get(reader.active) if reader.active is not None else None
        # Only the handle it read last is brought up to date: idle handles hold nothing, and
        # bringing all of them up to date on every stat would make them hold a ring's worth.
        size = handle.stream.size() if handle is not None else self.recorder.fresh_size(json)
        reader.grow(reader.active if handle is not None else None, size)
        return reader.size

    def _new_stream(self, inode: int) -> Stream:
        r = self.recorder
        if inode == BUF:
            return r.text_stream()
        if inode == JSONL:
            return r.json_stream()
        return StaticStream(self._snapshot(inode, fresh=True))

    def _snapshot(self, inode: int, fresh: bool) -> bytes:
        """The content of a snapshot file (STATS or PROM): made now if `fresh` (an open), else
        the last one made if it is under SNAPSHOT_SIZE_TTL old (a size for stat)."""
        now = time.monotonic()
        last = self._snapshots.get(inode)
        if last is not None and not fresh and now - last[0] < SNAPSHOT_SIZE_TTL:
            return last[1]
        r = self.recorder
        data = self.prom(r) if inode == PROM else r.stats_stream().data
        if last is not None and data == last[1]:
            data = last[1]  # unchanged: the handles opened meanwhile share one copy
        self._snapshots[inode] = (now, data)
        return data

    def _quota(self, uid: int) -> _Quota:
        """The quota of `uid`, made on its first open handle."""
        quota = self._quotas.get(uid)
        if quota is None:
            if uid == 0:  # root: held to the global bound on handles only
                handles = Budget(ALL_HANDLES, self._all_handles)
                bytes_ = Budget(ROOT_BYTES)
            else:
                handles = Budget(USER_HANDLES, self._users_handles)
                bytes_ = Budget(USER_BYTES, self._users_bytes)
            quota = self._quotas[uid] = _Quota(uid, handles, bytes_)
        return quota

    def _admit(self, uid: int) -> _Quota:
        """The quota a new handle of `uid` is counted in; FUSEError if it holds no more."""
        quota = self._quota(uid)
        spent = quota.handles.spent() or quota.bytes.spent()
        if spent is not None:
            if not quota.handles.used:
                del self._quotas[uid]
            # The user's own share: EMFILE, as at a process's descriptor limit; a bound shared
            # with other users (or root's, which is the global one): ENFILE.
            own = spent in (quota.handles, quota.bytes) and uid != 0
            self._refused += 1
            now = time.monotonic()
            if now - self._refused_logged >= REFUSED_LOG_INTERVAL:  # a loop must not flood it
                self._refused_logged = now
                log.warning(
                    "open refused to uid %d: %d handles, %d bytes kept (%s); %d refused so far",
                    uid,
                    quota.handles.used,
                    quota.bytes.used,
                    "its own bound" if own else "the bound of all users",
                    self._refused,
                )
            raise pyfuse3.FUSEError(errno.EMFILE if own else errno.ENFILE)
        quota.handles.charge(1)
        return quota

    def _closed(self, quota: _Quota, released: int) -> None:
        """A handle of `quota` closed, giving back `released` bytes."""
        quota.handles.charge(-1)
        if not quota.handles.used:
            del self._quotas[quota.uid]
        self._released += released
        if self._released >= TRIM_AFTER and not self._trim_due:
            self._trim_due = True
            trio.lowlevel.spawn_system_task(self._trim_later)

    async def _trim_later(self) -> None:
        try:
            await trio.sleep(TRIM_DELAY)
            self._released = 0  # what closed before this trim is trimmed by it
            self._trim()
        except Exception:  # a system task's error would end the whole filesystem
            log.exception("malloc_trim failed")
        finally:
            self._trim_due = False

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
        # The read-only files refuse, as a 0444 file refuses a user, whatever would change them:
        # a write access mode, and O_TRUNC, which even an O_RDONLY open may carry (libfuse asks
        # for atomic_o_trunc, so the kernel hands it to open() instead of truncating first).
        # O_APPEND only matters to writes; O_CREAT and O_EXCL never reach a filesystem's open.
        if inode != CONTROL and (mode != os.O_RDONLY or flags & os.O_TRUNC):
            raise pyfuse3.FUSEError(errno.EACCES)
        quota = self._admit(ctx.uid)
        fh = self._next_fh
        self._next_fh += 1
        if inode == CONTROL:
            self._controls[fh] = quota
        else:
            try:
                stream = self._new_stream(inode)
            except BaseException:
                self._closed(quota, 0)
                raise
            stream.bind(quota.bytes)
            key = (self._tgid(ctx.pid), inode)
            reader = self._readers.get(key)
            if reader is None:
                reader = self._readers[key] = _Reader(key, self.recorder.ring.last_seq)
            # A snapshot's size is known and fixed; a log stream's is 0 until it is read.
            reader.grow(fh, stream.rendered_size)
            self._handles[fh] = _Handle(stream, reader, quota)
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
        reader.grow(fh, stream.rendered_size)
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
        self._polls.pop(fh, None)
        handle = self._handles.pop(fh, None)
        control = self._controls.pop(fh, None)
        if control is not None:
            self._closed(control, 0)
        if handle is not None:
            reader = handle.reader
            self._closed(handle.quota, handle.stream.close())
            if len(reader.fhs) == 1:
                del self._readers[reader.key]
            else:
                reader.close(fh)
        if self._all_handles.used == 0 and not self.attached():
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
