"""The filesystem: four files over the recorder. Thin on purpose; the logic is in views.py.

    nvme_circular_buffer        0444  the ring as text lines
    nvme_circular_buffer.jsonl  0444  the same entries as JSON lines
    stats                       0444  name value lines
    control                     0200  clear, log=..., profile=..., format=..., clock=...

Every file is opened direct_io (reads come to us, never from a stale page cache) and a file's
attributes are never cached (attr_timeout 0); only names and the root's attributes, which never
change, are left to the kernel. st_size is per reader: the size of the stream of the newest
handle the asking thread has open on that file, so GNU tail -f sees exactly the appended bytes.
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

from nvmefs.recorder import ControlError, Recorder
from nvmefs.store import events
from nvmefs.store.events import HostEvent
from nvmefs.store.ring import WALL_NS
from nvmefs.store.views import Stream

log = logging.getLogger("nvmefs.fs")

ROOT = pyfuse3.ROOT_INODE
BUF, JSONL, STATS, CONTROL = range(2, 6)
FILES = {
    b"nvme_circular_buffer": (BUF, 0o444),
    b"nvme_circular_buffer.jsonl": (JSONL, 0o444),
    b"stats": (STATS, 0o444),
    b"control": (CONTROL, 0o200),
}
MODES = {ino: mode for ino, mode in FILES.values()}
NAMES = sorted(FILES)

# The preferred I/O size stat() reports; cat and cp read max(128 KiB, this) per call. Larger
# saves FUSE requests, but with direct_io the kernel pins the reader's whole buffer, and a fresh
# large one costs more in page faults than it saves.
BLKSIZE = 1 << 17
STATIC_TIMEOUT = 300.0

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
    """The four files over a Recorder. Invariant: every open read handle has its own stream
    in `_streams`, and `_newest` lists, per (reader, inode), that reader's handles in open
    order."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self.recorder = recorder
        self.mounted_ns = time.time_ns()
        self._streams: dict[int, tuple[int, Stream]] = {}  # fh -> (inode, stream)
        self._newest: dict[tuple[int, int], list[int]] = {}  # (tid, inode) -> fhs, newest last
        self._owner: dict[int, tuple[int, int]] = {}  # fh -> (tid, inode)
        self._polls: dict[int, pyfuse3.PollHandle] = {}  # fh -> handle to notify
        self._next_fh = 1
        recorder.ring.subscribe(self._on_append)

    # -- attributes ----------------------------------------------------------------------------

    def _attr(self, inode: int, size: int = 0) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        if inode == ROOT:
            a.st_mode = stat.S_IFDIR | 0o555
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
        if inode in (BUF, JSONL):
            ring = self.recorder.ring
            _, newest = ring.read_after(ring.last_seq - 1)
            if newest:
                return newest[0][WALL_NS]
        return self.mounted_ns

    def _size_for(self, inode: int, tid: int) -> int:
        if inode in (ROOT, CONTROL):
            return 0
        fhs = self._newest.get((tid, inode))
        if fhs:
            return self._streams[fhs[-1]][1].size()
        if inode == STATS:
            return self._new_stream(inode).size()
        return self.recorder.fresh_size(json=inode == JSONL)  # what an open now would see

    def _new_stream(self, inode: int) -> Stream:
        r = self.recorder
        if inode == BUF:
            return r.text_stream()
        if inode == JSONL:
            return r.json_stream()
        return r.stats_stream()

    @guarded
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode != ROOT and inode not in MODES:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode, self._size_for(inode, ctx.pid))

    @guarded
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT or name not in FILES:
            raise pyfuse3.FUSEError(errno.ENOENT)
        inode = FILES[name][0]
        return self._attr(inode, self._size_for(inode, ctx.pid))

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
        if inode == CONTROL and only_size and attr.st_size == 0:
            return self._attr(inode)
        raise pyfuse3.FUSEError(errno.EACCES if inode != ROOT else errno.EPERM)

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
        # Root passes the kernel's permission check on any mode: refuse here as the mode says.
        if inode == CONTROL and mode != os.O_WRONLY:
            raise pyfuse3.FUSEError(errno.EACCES)
        if inode != CONTROL and mode != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EACCES)
        fh = self._next_fh
        self._next_fh += 1
        if inode != CONTROL:
            self._streams[fh] = (inode, self._new_stream(inode))
            key = (ctx.pid, inode)
            self._newest.setdefault(key, []).append(fh)
            self._owner[fh] = key
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    @guarded
    async def read(self, fh: int, off: int, size: int) -> bytes:
        item = self._streams.get(fh)
        if item is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return item[1].read(off, size)

    @guarded
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if fh in self._streams:
            raise pyfuse3.FUSEError(errno.EBADF)
        try:
            self.recorder.control(buf.decode("utf-8"))
        except (ControlError, UnicodeDecodeError) as e:
            log.warning("control: %s", e)
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        return len(buf)

    @guarded
    async def release(self, fh: int) -> None:
        self._streams.pop(fh, None)
        self._polls.pop(fh, None)
        key = self._owner.pop(fh, None)
        if key is not None:
            fhs = self._newest.get(key, [])
            if fh in fhs:
                fhs.remove(fh)
            if not fhs:
                self._newest.pop(key, None)

    @guarded
    async def poll(
        self,
        inode: int,
        fh: int,
        poll_handle: pyfuse3.PollHandle | None,
        ctx: pyfuse3.RequestContext,
    ) -> int:
        item = self._streams.get(fh)
        if item is None:
            return select.POLLOUT if inode == CONTROL else 0
        if item[1].has_unread:
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
