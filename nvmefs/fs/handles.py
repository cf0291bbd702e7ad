"""The filesystem's open handles and what they hold: per-process st_size bookkeeping, and the
bounds on what the handles of each user (and of all of them) may make the daemon hold.

What handles of users other than root can make the daemon hold is bounded, per user (the uid
that opened them) and for all of them together; root is held to the global bound on handles:
  - open handles: USER_HANDLES per user, ALL_HANDLES in all, root's included, of which
    ROOT_RESERVED_HANDLES only root may use (other users together stop short of them);
  - rendered bytes kept by their streams (views.Budget): USER_BYTES per user, USERS_BYTES for
    all users but root. A stream whose budget is spent renders nothing more: what does not fit
    waits in the ring, or becomes a missed line, never daemon memory. Root's streams keep up to
    a ring's worth each: root chose the ring's size.
An open past a user's own bound fails with EMFILE, past a bound shared with others with ENFILE.
A closed handle gives back what it held, and once closed handles have given back TRIM_AFTER bytes
the freed heap is handed back to the system (malloc_trim), so the daemon returns near its idle
size after a mass close.

st_size is per reading process: a FUSE request names the calling thread, not its process, so
the thread id is mapped to its thread group id through /proc (`HandleTable.tgid`), and each
(process, file) has a `Reader` that remembers the largest size it was told.
"""

from __future__ import annotations

import ctypes
import errno
import heapq
import logging
import os
import re
import sys
import time
from collections import OrderedDict
from collections.abc import Callable

import trio

from nvmefs.store.views import Budget, Stream

log = logging.getLogger("nvmefs.fs")

# Thread id -> process id, remembered for this many threads (most recently added kept).
TGID_CACHE = 4096
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


def malloc_trim() -> Callable[[], object]:
    """malloc_trim(0) of the C library this process runs on, or a no-op where it has none."""
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own libc
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim): nothing to do
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


class Reader:
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


class Quota:
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


class Handle:
    """An open read handle: its stream, the reader (process and file) it belongs to, and the
    quota of the user who opened it."""

    __slots__ = ("quota", "reader", "stream")

    def __init__(self, stream: Stream, reader: Reader, quota: Quota) -> None:
        self.stream = stream
        self.reader = reader
        self.quota = quota


class Refused(Exception):
    """An open the bounds refuse; `errno` is EMFILE (the user's own bound) or ENFILE (a bound
    shared with other users, or root's, which is the global one)."""

    def __init__(self, err: int) -> None:
        super().__init__(os.strerror(err))
        self.errno = err


class HandleTable:
    """Every open handle of one mount and what it holds.

    Invariant: every open read handle is in `_handles` with its own stream and belongs to
    exactly one `Reader` (its process and inode), every open control handle is in `_controls`;
    each open handle is counted in the quota of the user who opened it (`_quotas`), and the
    budgets of all handles count every one of them."""

    def __init__(self) -> None:
        self._handles: dict[int, Handle] = {}  # read handles
        self._readers: dict[tuple[int, int], Reader] = {}  # (tgid, inode) -> reader
        self._tgids: OrderedDict[int, int] = OrderedDict()  # tid -> tgid
        self._controls: dict[int, Quota] = {}  # control handles
        self._next_fh = 1
        # The bounds of the module docstring: every user's handles count in `_all_handles`, and
        # those of users other than root in `_users_*` too (root's bytes in a budget of its own).
        self._all_handles = Budget(ALL_HANDLES)
        self._users_handles = Budget(ALL_HANDLES - ROOT_RESERVED_HANDLES, self._all_handles)
        self._users_bytes = Budget(USERS_BYTES)
        self._quotas: dict[int, Quota] = {}  # uid -> what its open handles hold
        self._refused = 0  # opens refused by the bounds, since the mount
        self._refused_logged = -REFUSED_LOG_INTERVAL  # when one was last logged (monotonic)
        self._released = 0  # bytes given back by closed handles since the last trim
        self._trim_due = False
        self._trim = malloc_trim()

    @property
    def open_count(self) -> int:
        """Open handles, read and control."""
        return self._all_handles.used

    def tgid(self, tid: int) -> int:
        """The process of thread `tid` (cached: see TGID_CACHE)."""
        tgids = self._tgids
        tgid = tgids.get(tid)
        if tgid is None:
            # A thread id is reused only after pid_max others: a stale entry is that unlikely,
            # and would only lend one process another's st_size.
            tgid = tgids[tid] = tgid_of(tid)
            if len(tgids) > TGID_CACHE:
                tgids.popitem(last=False)
        return tgid

    def handle(self, fh: int) -> Handle | None:
        """The read handle `fh`, or None (a control handle, or none)."""
        return self._handles.get(fh)

    def reader(self, tgid: int, inode: int) -> Reader | None:
        """Process `tgid`'s reader of `inode`, None if it has no handle open on it."""
        return self._readers.get((tgid, inode))

    def open_read(
        self, uid: int, tgid: int, inode: int, stream: Callable[[], Stream], horizon: int
    ) -> int:
        """A new read handle of user `uid`, process `tgid`, on `inode`, over the stream that
        `stream()` makes (called once admitted); `horizon` is the newest entry its reader may
        read up to for now. Refused if the bounds hold no more."""
        quota = self._admit(uid)
        try:
            s = stream()
        except BaseException:
            self._closed(quota, 0)
            raise
        s.bind(quota.bytes)
        key = (tgid, inode)
        reader = self._readers.get(key)
        if reader is None:
            reader = self._readers[key] = Reader(key, horizon)
        fh = self._new_fh()
        # A snapshot's size is known and fixed; a log stream's is 0 until it is read.
        reader.grow(fh, s.rendered_size)
        self._handles[fh] = Handle(s, reader, quota)
        return fh

    def open_control(self, uid: int) -> int:
        """A new control handle of user `uid`; Refused if the bounds hold no more."""
        quota = self._admit(uid)
        fh = self._new_fh()
        self._controls[fh] = quota
        return fh

    def release(self, fh: int) -> None:
        """Handle `fh` closed: what it held is given back. Unknown handles are ignored."""
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

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _quota(self, uid: int) -> Quota:
        """The quota of `uid`, made on its first open handle."""
        quota = self._quotas.get(uid)
        if quota is None:
            if uid == 0:  # root: held to the global bound on handles only
                handles = Budget(ALL_HANDLES, self._all_handles)
                bytes_ = Budget(ROOT_BYTES)
            else:
                handles = Budget(USER_HANDLES, self._users_handles)
                bytes_ = Budget(USER_BYTES, self._users_bytes)
            quota = self._quotas[uid] = Quota(uid, handles, bytes_)
        return quota

    def _admit(self, uid: int) -> Quota:
        """The quota a new handle of `uid` is counted in; Refused if it holds no more."""
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
            raise Refused(errno.EMFILE if own else errno.ENFILE)
        quota.handles.charge(1)
        return quota

    def _closed(self, quota: Quota, released: int) -> None:
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
