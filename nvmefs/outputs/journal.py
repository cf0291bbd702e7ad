"""`-o journal=PATH`: every ring entry as a JSON line in a durable, size-rotated file.

Theory of operation. The journal holds every entry the ring gets, in sequence order, one JSON
object per line (the JSON-lines file's record, always with the full info text). Put it on
another disk than the ones watched. A file never grows past `journal_size`: the line that
would pass it goes to a new file, after the logrotate convention: PATH.(k) becomes PATH.(k+1),
PATH becomes PATH.1, and PATH.(journal_keep) is the oldest kept; the next live file is made
as .PATH.<random>.new first, out of the way of shippers' PATH* patterns. A line is never changed or
removed once written, so shippers that follow files by inode and offset read every line once
while they keep up (contrib/rsyslog/nvmefs-journal.conf gives rsyslog's imfile the settings
for that, and says where it stops: a shipper that falls behind during a rotation may see a
renamed file twice).

When lines are written: nothing is written on the completion path. The ring's listener wakes
the journal's task, and once half a ring is waiting it moves the entries' references into a
backlog (at most BACKLOG_MAX), so the ring does not overwrite them while the task is busy. The
task renders the lines on the event loop (between the engine's turns, which keeps it up with a
storm) and hands them to a worker thread that writes (and rotates). While it writes but is
behind by half its backlog, it holds the ring's brake: the source's own workload (scrub,
randread) waits for it at its next batch, so a storm of our own making loses nothing. A stalled
disk (a write failing, or not returning for STALL_S) holds up the journal alone: the brake is
let go, and what its backlog cannot hold is counted lost and reported. Each write
goes to the kernel with write(2): a crash or SIGKILL of the daemon loses nothing written. A
line cut short by one stays at the end of its file, without a newline, and the next start
writes to a new file (replay does not count it; its number is given again). fdatasync(2), in a
worker thread, follows every `journal_fsync` seconds when something was written (0: after
every write), and at exit: that bounds what a power failure or kernel crash can take.

At start the newest `capacity` entries (fewer if the journal has fewer, or where its sequence
numbers have a gap) are replayed into the ring, marked as replayed, and the ring's sequence
numbers continue after them: a restart loses nothing already journaled, and no number is used
twice. A lock on the file keeps a second daemon from writing the same journal.

Other users. The daemon is root and the journal's directory may be one other users can write
in (a sticky /tmp): every file is opened through the directory checked at start
(nvmefs/linux/safefiles.py), never through a link; a new file gets a name nobody can foresee;
an existing file is adopted only if it is a journal of root's; a rotation renames only files
that are ours, and a name in the chain another user holds with a directory costs that rotated
file, not the journal. Replay reads only regular files of root's, a bounded block at a time,
and passes over lines longer than MAX_LINE. `state` (writing, stalled, stopped) and its reason
are in `stats` and the metrics, not only in a ring entry that scrolls away.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import time

import trio

from nvmefs.errors import UsageError
from nvmefs.linux.safefiles import SafeDir, UnsafePath
from nvmefs.options import Parsed
from nvmefs.outputs.replay import (
    BLANK,
    MAX_LINE,
    RECORD_START,
    SEQ_RESTART,
    History,
    is_record,
    read_newest,
    rotated,
)
from nvmefs.recorder import Recorder
from nvmefs.store import events
from nvmefs.store.events import HostEvent
from nvmefs.store.render import Clock, Renderer
from nvmefs.store.ring import SEQ, Cursor, DebugRing, Entry

log = logging.getLogger("nvmefs")
# The most that a journal error is reported in the ring: once per this many seconds.
ERROR_REPORT_S = 60.0
# How often PATH is checked to still name the file written (see Journal._follow_path).
FOLLOW_S = 1.0
# How a journal file is opened: appended to, and read for the checks at start.
LIVE_FLAGS = os.O_RDWR | os.O_APPEND
FILE_MODE = 0o640
# What the names of rotations' new files end with.
NEW_SUFFIX = ".new"
# The most entries the journal holds in memory beyond the ring while its task is behind (a
# storm, a stalled disk): references to the ring's entries, about 20 MiB at the most.
BACKLOG_MAX = 1 << 16
# The most entries one write (one turn of the task, one worker-thread call) takes: a turn's
# length is bounded, so STALL_S measures the disk, not how far behind the journal is, and
# "writing again" shows as soon as a turn has gone through.
WRITE_BATCH = 4096
# How far past journal_size the live file may grow while it cannot be rotated (a name in the way,
# a failing rename): then writing stops, counting what is lost, until a rotation works again.
OVERRUN = 2
# A write that has not returned after this many seconds makes the journal's state "stalled".
STALL_S = 2.0
# The states of the journal (stats, metrics).
WRITING, STALLED, STOPPED = "writing", "stalled", "stopped"
STATES = (WRITING, STALLED, STOPPED)
# Where a journal may not go: files there are the kernel's settings and devices.
KERNEL_TREES = ("/proc", "/sys", "/dev")


class JournalError(UsageError):
    """A journal path nvmefs cannot write to."""


class Journal:
    """The journal of one daemon: its checked directory, the open live file, its lock, and
    what is left to write.

    Invariant: every entry the ring got after `attach`, up to the cursor's place, was written to
    the journal, or is in `_backlog` or in the batch being written, or was counted in `lost`
    (and reported); nothing here writes on the completion path (the ring's listener and its
    before-clear hook only move entries into `_backlog`); `_fd` is the live file, locked, and a file
    this process created or adopted as a journal of root's (see nvmefs/linux/safefiles.py);
    every file operation goes through `_dir`, never through a path.
    """

    def __init__(self, path: str, where: SafeDir, fd: int, opts: Parsed, found: History) -> None:
        self.path = path
        self.name = os.path.basename(path)
        self._dir = where
        self.limit: int = opts["journal_size"]
        self.keep: int = opts["journal_keep"]
        self.fsync_interval: float = opts["journal_fsync"]
        self.found = found
        self._fd: int | None = fd
        st = os.fstat(fd)
        self._size, self._ident = st.st_size, (st.st_dev, st.st_ino)
        # A line cut short ends the live file: the next write starts a new file rather than
        # cut it off, since a shipper may have read its start (lines never change once there).
        self._fresh_file = _ends_cut(fd)
        self._renderer = Renderer(Clock("jiffies"), "full")
        self._ring: DebugRing | None = None
        self._cursor: Cursor | None = None
        self._threshold = 1
        # Entries taken from the ring before the task could write them (a storm filling half
        # the ring, a clear): references only, at most BACKLOG_MAX.
        self._backlog: list[Entry] = []
        # Notices for the ring from the worker thread, appended by the task (the ring is not
        # thread-safe): (kind, text).
        self._notes: list[tuple[str, str]] = []
        self.dirty = False  # written since the last fdatasync
        self._synced = time.monotonic()
        self._checked = time.monotonic()  # when PATH was last seen to name the live file
        self._pending_syncs: list[int] = []  # duplicates of rotated files' descriptors
        self._wake = trio.Event()
        self._error_reported = -ERROR_REPORT_S
        self._episode = 0  # entries lost since writing last failed (reported at recovery)
        # What `stats` and the metrics show: WRITING, STALLED (the last write failed; `why`
        # says why) or STOPPED (closed).
        self.state = WRITING
        self.why = ""
        # While a turn writes: when it began, or when its last write or rotation returned (a
        # turn that goes on writing is not a stalled disk, however long it takes).
        self._writing_since: float | None = None
        self._rotate_after = 0.0  # a failed rotation is tried again from then on (monotonic)
        # Public counters (metrics): lines written, rotations, write errors, entries lost.
        self.written = 0
        self.rotations = 0
        self.errors = 0
        self.lost = 0
        self.squatted = 0  # rotated files removed early: another user held the next name

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, opts: Parsed) -> Journal | None:
        """Open, lock and check the journal and read what is to be replayed; JournalError
        (one line) if it cannot be written safely or is not a journal."""
        path = opts["journal"]
        if path is None:
            return None
        if not path:
            raise JournalError("option journal needs a file path")
        path = os.path.abspath(path)
        head, name = os.path.split(path)
        real = os.path.realpath(path)
        if any(real == d or real.startswith(d + "/") for d in KERNEL_TREES):
            raise JournalError(f"journal {path}: {real} is a kernel interface, not a file")
        try:
            where = SafeDir.open_for(f"journal {path}", head)
        except UnsafePath as e:
            raise JournalError(str(e)) from None
        try:
            fd = _open_live(where, name)
            try:
                # Rotations' new files left by a daemon killed in one (the lock is ours now).
                for stale in _stale_new_files(where, name):
                    where.unlink_if_ours(stale)
                found = read_newest(
                    where, name, opts["journal_keep"], opts["capacity"], opts["profile"]
                )
            except BaseException:
                os.close(fd)
                raise
        except OSError as e:
            where.close()
            raise JournalError(f"journal {path}: {e.strerror}") from None
        except BaseException:
            where.close()
            raise
        return cls(path, where, fd, opts, found)

    def attach(self, ring: DebugRing) -> None:
        """Replay into the fresh ring, then journal every entry appended from here on."""
        self._ring = ring
        self._threshold = max(1, ring.capacity // 2)
        found = self.found
        restart = bool(found.entries) and found.entries[-1][SEQ] > SEQ_RESTART
        if found.entries and not restart:
            ring.restore(found.entries)
        self._cursor = Cursor(ring)
        ring.subscribe(self._on_append)
        ring.before_clear(self._before_clear)
        ring.add_brake(self._behind)
        if found.entries or found.bad or found.refused:
            text = f"replayed {0 if restart else len(found.entries)} entries from {self.path}"
            if found.entries and not restart:
                text += f" (seq {found.entries[0][SEQ]}..{found.entries[-1][SEQ]})"
            if restart:
                text += (
                    f"; its sequence numbers reached {found.entries[-1][SEQ]}, near their "
                    "limit: this run starts again at 1"
                )
            if found.bad:
                text += f", {found.bad} unreadable lines skipped"
            if found.refused:
                text += f"; not read: {'; '.join(found.refused)}"
            ring.append(HostEvent(events.NOTICE, text))
        self.found = History()  # the ring holds them now

    def current_state(self) -> tuple[str, str]:
        """(state, why): STALLED also while a write has not returned for STALL_S or more (a
        disk that does not answer), which no error says."""
        since = self._writing_since
        if self.state == WRITING and since is not None:
            took = time.monotonic() - since
            if took >= STALL_S:
                return STALLED, f"a write has not returned for {took:.0f} s"
        return self.state, self.why

    def status(self) -> list[tuple[str, object]]:
        """The journal's lines of `stats`: its state, why it is not writing, its counters."""
        state, why = self.current_state()
        return [
            ("journal_state", state),
            ("journal_problem", why or "none"),
            ("journal_written", self.written),
            ("journal_lost", self.lost),
            ("journal_errors", self.errors),
            ("journal_rotations", self.rotations),
            ("journal_squatted", self.squatted),
        ]

    # -- writing -------------------------------------------------------------------------------

    def _behind(self) -> bool:
        """The ring's brake: half the backlog waits while the journal is writing (not stalled,
        not closed)."""
        cursor = self._cursor
        if cursor is None or self._fd is None:
            return False
        waiting = len(self._backlog) + cursor.pending
        return waiting >= BACKLOG_MAX // 2 and self.current_state()[0] == WRITING

    def _on_append(self) -> None:
        # On the completion path: a wake-up, and past half a ring the entries' references
        # moved aside so the ring cannot overtake them while the task is busy. Never a write.
        cursor = self._cursor
        assert cursor is not None
        if cursor.pending >= self._threshold:
            self._keep_all()
        self._wake.set()

    def _before_clear(self) -> None:
        # What a clear takes away is journaled all the same.
        self._keep_all()
        self._wake.set()

    def _keep_all(self) -> None:
        """Move what the cursor has into the backlog (bounded: the oldest beyond BACKLOG_MAX
        are counted lost)."""
        assert self._cursor is not None
        missed, entries = self._cursor.take()
        if missed:  # the ring overtook the journal
            self._lose(missed, "entries overtaken before they were written")
        self._backlog += entries
        over = len(self._backlog) - BACKLOG_MAX
        if over > 0:
            del self._backlog[:over]
            self._lose(over, "the journal fell too far behind")

    def _collect(self) -> list[Entry]:
        """The entries to write next, oldest first, WRITE_BATCH at most: from the backlog,
        after what the cursor has has joined it. If more wait, the task goes on at once."""
        self._keep_all()
        entries = self._backlog[:WRITE_BATCH]
        del self._backlog[:WRITE_BATCH]
        if self._backlog:
            self._wake.set()
        return entries

    def _render(self, entries: list[Entry]) -> tuple[list[bytes], int]:
        """The lines of entries (on the event loop, between the engine's turns: the fair share
        of the loop that keeps the journal up with a storm), and how many entries they are."""
        record = self._renderer.json_line
        return [record(e).encode() for e in entries], len(entries)

    def _write_lines(self, batch: tuple[list[bytes], int]) -> None:
        """Write rendered lines (in the task's worker thread, or at close): following PATH,
        rotating, counting what cannot be written."""
        lines, n = batch
        if self._fd is None:
            self._lose(n, "the journal is closed")
            return
        written = self.written
        self._writing_since = time.monotonic()
        try:
            self._follow_path()
            if lines:
                self._write(lines)
        except OSError as e:
            self.errors += 1
            self.state, self.why = STALLED, f"cannot write: {e.strerror or e}"
            self._lose(n - (self.written - written), self.why)
            return
        finally:
            self._writing_since = None

    def _post_notes(self) -> None:
        """Append the notices the writing made to the ring (on the event loop's thread)."""
        notes, self._notes = self._notes, []
        if self._ring is not None:
            for kind, text in notes:
                self._ring.append(HostEvent(kind, text))

    def _follow_path(self) -> None:
        """Write to a new PATH if PATH no longer names the live file (logrotate or a person
        moved or removed it, or its directory): nvmefs writes where the user looks. Looked at
        once a second at most; the directory is looked up again then (with its checks), so
        one removed and made again is followed too. Whatever another user put at PATH is
        replaced, never written to; if PATH cannot be had, the moved file goes on being
        written; if the directory cannot be had, writing fails (and is reported) until it can.
        """
        now = time.monotonic()
        if now - self._checked < FOLLOW_S:
            return
        self._checked = now
        head = os.path.dirname(self.path)
        try:
            where = SafeDir.open(head)
        except UnsafePath as e:
            raise OSError(errno.EACCES, str(e)) from None
        except OSError as e:
            raise OSError(e.errno, f"directory {head}: {e.strerror}") from None
        if where.ident == self._dir.ident:
            where.close()
        else:
            self._dir.close()
            self._dir = where
        st = self._dir.lstat(self.name)
        if st is not None and (st.st_dev, st.st_ino) == self._ident:
            return
        try:
            fd = self._new_live_file()
        except OSError as e:
            self.errors += 1
            self._report(
                f"{self.path} was moved or removed and cannot be made again "
                f"({e.strerror or e}): writing on to the moved file"
            )
            return
        self._replace_fd(fd)
        self._note(f"{self.path} was moved or removed: writing to a new {self.path}")

    def _new_live_file(self) -> int:
        """A new, empty, locked live file renamed to PATH (over whatever is there)."""
        fd, tmp = self._dir.create_temp(f".{self.name}.", NEW_SUFFIX, LIVE_FLAGS, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._dir.rename(tmp, self.name)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                self._dir.unlink(tmp)
            raise
        return fd

    def _replace_fd(self, fd: int) -> None:
        old = self._fd
        st = os.fstat(fd)
        self._fd, self._size, self._ident = fd, st.st_size, (st.st_dev, st.st_ino)
        if old is not None:
            os.close(old)

    def _write(self, lines: list[bytes]) -> None:
        if self._fresh_file and self._try_rotate():
            self._fresh_file = False
        batch: list[bytes] = []
        size = self._size
        for line in lines:
            if size and size + len(line) > self.limit:
                self._flush(batch)
                batch = []
                if self._try_rotate():
                    size = 0
                elif size + len(line) > OVERRUN * self.limit:
                    # It cannot rotate: stop here rather than grow a file without bound (what
                    # is not written is counted lost, and the state says why).
                    raise OSError(
                        errno.EFBIG,
                        f"cannot rotate, and the file is at {OVERRUN}x journal_size",
                    )
            batch.append(line)
            size += len(line)
        self._flush(batch)

    def _flush(self, batch: list[bytes]) -> None:
        if not batch or self._fd is None:
            return
        data = b"".join(batch)
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError:
            # Take back what of the batch got in: a line cut short would be followed by the
            # next write's lines and spoil one.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise
        self._size += len(data)
        self.written += len(batch)
        self.dirty = True
        self._progress()
        if self.state == STALLED:  # it writes again: said at once, not at the end of the turn
            self.state, self.why = WRITING, ""
            self._note(f"writing again; {self._episode} entries lost in all")
            self._episode = 0

    def _progress(self) -> None:
        if self._writing_since is not None:
            self._writing_since = time.monotonic()

    def _try_rotate(self) -> bool:
        """Rotate; if that fails, go on writing the live file past journal_size (up to OVERRUN
        times it) rather than lose entries, reported with the reason and tried again at most
        once per FOLLOW_S; whether it rotated."""
        now = time.monotonic()
        if now < self._rotate_after:
            return False
        try:
            self._rotate()
        except OSError as e:
            self._rotate_after = now + FOLLOW_S
            self.errors += 1
            self._report(
                f"cannot rotate {self.path} ({e.strerror or e}): writing on past journal_size"
            )
            return False
        return True

    def _rotate(self) -> None:
        """PATH.(k) -> PATH.(k+1) down to PATH -> PATH.1, and a new, locked PATH. The new file
        is made (under a name nobody can foresee) and locked before any rename, so PATH always
        names a locked journal; if a step fails, the new file is taken away again and the live
        file stays as it was. Only files that are ours are renamed: a name another user took
        in the chain is replaced by the rename into it, never moved along it."""
        d, name = self._dir, self.name
        fd, tmp = d.create_temp(f".{name}.", NEW_SUFFIX, LIVE_FLAGS, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            for k in range(self.keep - 1, 0, -1):
                if d.is_ours(rotated(name, k)):
                    self._move(rotated(name, k), rotated(name, k + 1))
            st = d.lstat(name)
            if st is not None and (st.st_dev, st.st_ino) == self._ident:
                self._move(name, rotated(name, 1), replaced_next=True)
            d.rename(tmp, name)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                d.unlink(tmp)
            raise
        # What was written to the old file goes to disk with the next sync, from a duplicate.
        old = self._dup_for_sync()
        if old is not None:
            self._pending_syncs.append(old)
        self._replace_fd(fd)
        self.rotations += 1
        d.sync()
        self._progress()

    def _move(self, old: str, new: str, replaced_next: bool = False) -> None:
        """Rename a journal file of the chain one place on. If another user holds the new
        name with what a rename cannot replace (a directory), the file is removed instead:
        the chain is shorter than journal_keep there, and the journal goes on (reported).
        `replaced_next`: the caller renames a file over `old` next, which removes it then: the
        live name is never missing, even to a crash between the two steps."""
        try:
            self._dir.rename(old, new)
        except OSError as e:
            st = self._dir.lstat(new)
            if st is None or self._dir.is_ours(new):
                raise
            if not replaced_next:
                self._dir.unlink(old)
            self.squatted += 1
            self._report(
                f"{self._dir.join(new)} is held by uid {st.st_uid} ({e.strerror}): "
                f"{self._dir.join(old)} was removed instead of rotated"
            )

    def _take_syncs(self) -> list[int]:
        """The descriptors the next sync is to sync (and close): duplicates, all of them."""
        fds, self._pending_syncs = self._pending_syncs, []
        live = self._dup_for_sync()
        return fds if live is None else [*fds, live]

    def _dup_for_sync(self) -> int | None:
        if self._fd is None or not self.dirty:
            return None
        return os.dup(self._fd)

    def _lose(self, n: int, why: str) -> None:
        self.lost += n
        self._episode += n
        self._report(f"{why} ({self._episode} entries lost so far)")

    def _note(self, text: str) -> None:
        log.warning("journal: %s", text)
        self._notes.append((events.NOTICE, f"journal: {text}"))

    def _report(self, text: str) -> None:
        """A journal problem, in the daemon's log and the ring, at most once a minute (the
        count of entries lost goes on, and the notice of recovery gives the total; `state`
        and `why` say it at any time)."""
        now = time.monotonic()
        if now - self._error_reported >= ERROR_REPORT_S:
            self._error_reported = now
            log.warning("journal: %s", text)
            self._notes.append((events.HOST_ERROR, f"journal: {text}"))

    # -- syncing -------------------------------------------------------------------------------

    async def _sync(self) -> None:
        """fdatasync what was written, in a worker thread: a slow or hung disk must not stop
        the event loop (the FUSE files, the engine). Duplicates of the descriptors are synced,
        so a rotation meanwhile may close the originals."""
        fds = self._take_syncs()
        self.dirty = False
        self._synced = time.monotonic()
        if fds:
            failed = await trio.to_thread.run_sync(_datasync_all, fds, abandon_on_cancel=True)
            if failed:
                self.errors += 1
                self._report(f"cannot sync {self.path}: {failed}")

    async def run(self, recorder: Recorder) -> None:
        """Write what the ring gets, and sync it every journal_fsync seconds, until cancelled.
        Lines are rendered here, on the loop; writing them (and rotating, following PATH)
        happens in a worker thread: a slow or stalled disk holds up this task only, never the
        engine or the FUSE files; the ring and the backlog hold what comes meanwhile, and what
        they cannot is counted lost."""
        recorder.add_status(self.status)
        while True:
            due = self._synced + self.fsync_interval - time.monotonic()
            with trio.move_on_after(max(due, 0) if self.dirty else FOLLOW_S):
                await self._wake.wait()
            self._wake = trio.Event()
            batch = self._render(self._collect())
            # Only the system calls go to the thread; not abandoned on cancel: the thread
            # owns the file until it returns.
            await trio.to_thread.run_sync(self._write_lines, batch)
            self._post_notes()
            if self.dirty and time.monotonic() - self._synced >= self.fsync_interval:
                await self._sync()
            self._post_notes()

    def drain(self) -> None:
        """Write what is waiting, on the caller's thread (what one turn of the task does, less
        the worker thread): for the end of the daemon and for tests."""
        if self._cursor is not None:
            while batch := self._collect():
                self._write_lines(self._render(batch))
        self._post_notes()

    def close(self) -> None:
        """Write what is left, sync and close; idempotent. This last write and sync are on the
        caller's thread: the daemon is ending, and what it wrote should be on disk when it
        has."""
        if self._fd is None:
            return
        self.drain()
        self.drain()  # the notices the first one appended
        fds = self._take_syncs()
        if fds and _datasync_all(fds):
            self.errors += 1
        os.close(self._fd)
        self._fd = None
        self._dir.close()
        self.state, self.why = STOPPED, ""


def _datasync_all(fds: list[int]) -> str:
    """fdatasync each descriptor and close it; the first error's text, or ""."""
    failed = ""
    for fd in fds:
        try:
            os.fdatasync(fd)
        except OSError as e:
            failed = failed or str(e.strerror)
        finally:
            os.close(fd)
    return failed


def _open_live(where: SafeDir, name: str) -> int:
    """The live journal file, opened for appending and locked: the file at `name` if it may be
    adopted (a regular file of root's, one link, not writable by others, and a journal), or a
    new one if there is none; JournalError with the reason otherwise."""
    path = where.join(name)
    for _ in range(2):  # once more if a file appears between the look and the create
        try:
            fd = where.open_existing(name, LIVE_FLAGS)
        except FileNotFoundError:
            try:
                fd = where.create_new(name, LIVE_FLAGS, FILE_MODE)
            except FileExistsError:
                continue
        except UnsafePath as e:
            raise JournalError(f"journal {e}") from None
        try:
            _check_is_journal(fd, path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise JournalError(f"journal {path} is being written by another nvmefs") from None
            except OSError as e:
                raise JournalError(f"journal {path}: cannot lock it: {e.strerror}") from None
        except BaseException:
            os.close(fd)
            raise
        return fd
    raise JournalError(f"journal {path}: another process keeps creating it")


def _check_is_journal(fd: int, path: str) -> None:
    """JournalError unless the file is empty or ends as a journal does: its last line that is
    not blank (NUL bytes, which a crash can leave at a file's end, count as blank) an nvmefs
    record, or the start of one cut short. nvmefs appends to the file and renames it: that
    must never happen to a file that is something else."""
    size = os.fstat(fd).st_size
    if size == 0:
        return
    start = max(0, size - MAX_LINE)
    lines = os.pread(fd, size - start, start).split(b"\n")
    if start > 0:
        lines.pop(0)  # begins inside a line
    cut = lines.pop()  # after the last newline: b"" or a line cut short
    if cut.strip(BLANK) and cut.startswith(RECORD_START):
        return
    for line in reversed(lines):
        if not line.strip(BLANK):
            continue
        if is_record(line):
            return
        break
    raise JournalError(
        f"journal {path} exists and is not an nvmefs journal (its last line is not an entry): "
        "nvmefs appends to a journal and rotates it"
    )


def _stale_new_files(where: SafeDir, name: str) -> list[str]:
    """Names of rotations' new files (`.NAME.<random>.new`, or the `.NAME.new` of older
    versions) in the journal's directory."""
    prefix = f".{name}."
    return [
        n
        for n in os.listdir(where.fd)
        if n.startswith(prefix) and n.endswith(NEW_SUFFIX) and len(n) > len(prefix)
    ]


def new_name(path: str) -> str:
    """The pattern of the names a rotation gives the next live file until it becomes PATH
    (`*` stands for a random part): hidden, so that shippers following PATH* never pick it
    up under a name it will not keep."""
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.*{NEW_SUFFIX}")


def _ends_cut(fd: int) -> bool:
    """Whether the file's last line has no newline: a write cut short by a kill."""
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"
