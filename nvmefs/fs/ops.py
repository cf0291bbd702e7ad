"""The filesystem: six files over the recorder. Thin on purpose: the streams are views.py's,
the handles' bookkeeping and bounds handles.py's.

    nvme_circular_buffer        0444  the ring as text lines
    nvme_circular_buffer.jsonl  0444  the same entries as JSON lines
    stats                       0444  name value lines
    nvmefs.prom                 0444  the metrics in Prometheus's text format (what `prom` makes)
    nvme_errors.svg             0444  the errors of the ring as `nvmefs report --svg` draws them
    control                     0200  clear, log=..., profile=..., format=..., clock=...

stats, nvmefs.prom and nvme_errors.svg are snapshots taken at open, so reads at any offset and
size agree (and a handle's st_size is its own snapshot's). Rendering one costs far more than a
FUSE request, so the st_size a stat() or lookup shows a process without the file open is that of
the last snapshot made, if it is under SNAPSHOT_SIZE_TTL old: a stat loop renders at most once
per interval. The mtime of nvmefs.prom is the moment it is looked at: its content is that fresh, and
node_exporter's textfile collector, which reads the mount directly, exports that mtime (an
alert on a stale textfile then means the daemon is gone, not that it is idle).

Every file is opened direct_io (reads come to us, never from a stale page cache) and a file's
attributes are never cached (attr_timeout 0); only names and the root's attributes, which never
change, are left to the kernel. Each read handle is a bounded stream (views.py): a read at an
offset whose bytes it no longer keeps fails with ENODATA, and a read at its horizon is an EOF.

st_size is per reading process (`_size_for`): the largest stream size among that process's
handles on the file, after bringing the handle it read last up to date, so GNU tail -f sees
exactly the appended bytes and no handle, whichever thread asks, sees a size below what it has
read.

Nothing here can be created, removed, renamed or linked (EPERM), and the permission checks follow
the modes whoever asks, root included, when the kernel leaves them to us (without
default_permissions): `access(W_OK)` on a 0444 file is false, and an open of one for writing or
with O_TRUNC (O_RDONLY|O_TRUNC included) fails with EACCES.

What handles may make the daemon hold is bounded per user and in all (handles.py).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import select
import stat
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3

from nvmefs.fs.handles import HandleTable, Refused
from nvmefs.linux.mountinfo import MountWatch
from nvmefs.recorder import ControlError, Recorder
from nvmefs.store import events
from nvmefs.store.events import HostEvent
from nvmefs.store.ring import WALL_NS
from nvmefs.store.views import Dropped, StaticStream, Stream

log = logging.getLogger("nvmefs.fs")

ROOT = pyfuse3.ROOT_INODE
BUF, JSONL, STATS, CONTROL, PROM, SVG = range(2, 8)
FILES = {
    b"nvme_circular_buffer": (BUF, 0o444),
    b"nvme_circular_buffer.jsonl": (JSONL, 0o444),
    b"stats": (STATS, 0o444),
    b"nvmefs.prom": (PROM, 0o444),
    b"control": (CONTROL, 0o200),
    b"nvme_errors.svg": (SVG, 0o444),
}
SNAPSHOTS = (STATS, PROM, SVG)  # files whose content is made whole at open
MODES = {ino: mode for ino, mode in FILES.values()}
ROOT_MODE = 0o555
NAMES = sorted(FILES)

# The preferred I/O size stat() reports; cat and cp read max(128 KiB, this) per call. Larger
# saves FUSE requests, but with direct_io the kernel pins the reader's whole buffer, and a fresh
# large one costs more in page faults than it saves.
BLKSIZE = 1 << 17
STATIC_TIMEOUT = 300.0
# The answer to a read at an offset whose bytes the handle no longer keeps (views.Dropped).
DROPPED_ERRNO = errno.ENODATA
# How old the st_size of a snapshot file shown to a process without it open may be, in seconds.
# Rendering nvmefs.prom costs a few hundred microseconds, several FUSE requests' worth: rendering
# per stat let two stat loops take three quarters of the engine's completions (issue 18). A second
# is below any scrape interval, and whoever opens the file gets a fresh snapshot and its own size.
SNAPSHOT_SIZE_TTL = 1.0

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


class NvmeFS(pyfuse3.Operations):
    """The six files over a Recorder. Invariant: every open handle is in `handles` (and so in
    its user's bounds); a handle blocked in poll() is in `_polls` until notified or closed."""

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
        self.handles = HandleTable()
        self._polls: dict[int, pyfuse3.PollHandle] = {}  # fh -> handle to notify
        # The last snapshot of each snapshot file: when it was made (monotonic), its bytes.
        self._snapshots: dict[int, tuple[float, bytes]] = {}
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

    def _size_for(self, inode: int, tgid: int) -> int:
        if inode in (ROOT, CONTROL):
            return 0
        reader = self.handles.reader(tgid, inode)
        if inode in SNAPSHOTS:
            return reader.size if reader is not None else len(self._snapshot(inode, fresh=False))
        json = inode == JSONL
        if reader is None:
            return self.recorder.fresh_size(json)  # what an open now would see
        # Whatever size is told, this process's reads may go that far.
        reader.horizon = self.recorder.ring.last_seq
        handle = self.handles.handle(reader.active) if reader.active is not None else None
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
        if inode == PROM:
            data = self.prom(r)
        elif inode == SVG:
            data = r.errors_svg()
        else:
            data = r.stats_stream().data
        if last is not None and data == last[1]:
            data = last[1]  # unchanged: the handles opened meanwhile share one copy
        self._snapshots[inode] = (now, data)
        return data

    @guarded
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode != ROOT and inode not in MODES:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode, self._size_for(inode, self.handles.tgid(ctx.pid)))

    @guarded
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT or name not in FILES:
            raise pyfuse3.FUSEError(errno.ENOENT)
        inode = FILES[name][0]
        return self._attr(inode, self._size_for(inode, self.handles.tgid(ctx.pid)))

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
        try:
            if inode == CONTROL:
                fh = self.handles.open_control(ctx.uid)
            else:
                tgid = self.handles.tgid(ctx.pid)
                last = self.recorder.ring.last_seq
                fh = self.handles.open_read(
                    ctx.uid, tgid, inode, functools.partial(self._new_stream, inode), last
                )
        except Refused as e:
            raise pyfuse3.FUSEError(e.errno) from None
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    @guarded
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self.handles.handle(fh)
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
        if self.handles.handle(fh) is not None:
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
        self.handles.release(fh)
        if self.handles.open_count == 0 and not self.attached():
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
        handle = self.handles.handle(fh)
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
