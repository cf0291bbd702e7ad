"""`-o journal=PATH`: every ring entry as a JSON line in a durable, size-rotated file.

Theory of operation. The journal holds every entry the ring gets, in sequence order, one JSON
object per line (the JSON-lines file's record, always with the full info text). Put it on
another disk than the ones watched. A file never grows past `journal_size`: the line that
would pass it goes to a new file, after the logrotate convention: PATH.(k) becomes PATH.(k+1),
PATH becomes PATH.1, and PATH.(journal_keep) is the oldest kept; the next live file is made
as .PATH.new first, out of the way of shippers' PATH* patterns. A line is never changed or
removed once written, so shippers that follow files by inode and offset read every line once
while they keep up (contrib/rsyslog/nvmefs-journal.conf gives rsyslog's imfile the settings
for that, and says where it stops: a shipper that falls behind during a rotation may see a
renamed file twice).

When lines are written: the ring calls the journal after every append; the journal takes the
new entries when the event loop next turns (a wake-up per burst, not per entry), or at once
once half a ring is waiting, so that no entry is overwritten before it is written. Each write
goes to the kernel with write(2): a crash or SIGKILL of the daemon loses nothing written. A
line cut short by one stays at the end of its file, without a newline, and the next start
writes to a new file (replay does not count it; its number is given again). fdatasync(2), in a
worker thread, follows every `journal_fsync` seconds when something was written (0: after
every write), and at exit: that bounds what a power failure or kernel crash can take.

At start the newest `capacity` entries (fewer if the journal has fewer, or where its sequence
numbers have a gap) are replayed into the ring, marked as replayed, and the ring's sequence
numbers continue after them: a restart loses nothing already journaled, and no number is used
twice. A lock on the file keeps a second daemon from writing the same journal.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import stat
import time
from typing import Any

import trio

from nvmefs.errors import UsageError
from nvmefs.nvme import tables
from nvmefs.nvme.status import Translator
from nvmefs.options import Parsed
from nvmefs.recorder import Recorder
from nvmefs.store import events
from nvmefs.store.events import HostEvent, NvmeEvent
from nvmefs.store.render import Clock, Renderer
from nvmefs.store.ring import EVENT, SEQ, DebugRing, Entry

log = logging.getLogger("nvmefs")

# Bytes read at a time from a file's end when replaying.
READ_BLOCK = 1 << 20
# The most that a journal error is reported in the ring: once per this many seconds.
ERROR_REPORT_S = 60.0
# How every journal line starts (render.Renderer.record's first key).
RECORD_START = b'{"seq":'
# How often PATH is checked to still name the file written (see Journal._follow_path).
FOLLOW_S = 1.0
# Where a journal may not go: files there are the kernel's settings and devices.
KERNEL_TREES = ("/proc", "/sys", "/dev")
# The keys of a record that say what an entry is rather than carry a host event's fields.
RECORD_KEYS = frozenset(
    {"seq", "ticks", "jiffies", "monotonic_ns", "wall_ns", "wall", "kind", "info", "message"}
    | {"replayed"}
)


class JournalError(UsageError):
    """A journal path nvmefs cannot write to."""


def rotated(path: str, k: int) -> str:
    """The name of the k-th rotated file (k = 0 is the live one)."""
    return path if k == 0 else f"{path}.{k}"


def tail_lines(path: str, n: int) -> list[bytes]:
    """The last `n` complete lines of a file (without newlines), oldest first; reads from the
    end a block at a time, so a large file costs what the lines cost. A last line without
    its newline is no line (the write that made it was cut short)."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, read backwards
    except FileNotFoundError:
        return []
    with f:
        end = os.fstat(f.fileno()).st_size
        pos, tail = end, b""
        lines: list[bytes] = []
        while pos > 0 and len(lines) < n + 1:
            step = min(READ_BLOCK, pos)
            pos -= step
            f.seek(pos)
            parts = (f.read(step) + tail).split(b"\n")
            tail = parts[0]
            lines = parts[1:] + lines
        if pos == 0 and tail:
            lines = [tail, *lines]
        # What follows the last newline is a cut line (or b"" when the file ends with one).
        complete = lines[:-1] if lines else []
        return complete[-n:] if n else []


MAX_U64 = (1 << 64) - 1
MAX_I64 = (1 << 63) - 1
# A journal line longer than this is not one of ours (they are under 1 KiB): not parsed.
MAX_LINE = 64 << 10
# The ranges of a record's integer fields (the NVMe fields' own widths).
NVME_INTS = {
    "nsid": MAX_U64 >> 32,
    "qid": 0xFFFF,
    "cid": 0xFFFF,
    "opcode": 0xFF,
    "slba": MAX_U64,
    "nlb": MAX_U64 >> 32,
    "retries": MAX_U64 >> 32,
}
NVME_STRS = ("ctrl", "disk", "op")
_STATUS = re.compile(r"0x[0-9a-f]{1,4}")


def _int(rec: dict[str, Any], key: str, lo: int, hi: int) -> int:
    value = rec[key]
    if type(value) is not int or not lo <= value <= hi:  # bool is an int too: not here
        raise ValueError(f"{key} is not an integer in {lo}..{hi}")
    return value


def _opt_int(rec: dict[str, Any], key: str, hi: int) -> int | None:
    return None if rec.get(key) is None else _int(rec, key, 0, hi)


def _opt_str(rec: dict[str, Any], key: str) -> str | None:
    value = rec.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{key} is not a string")
    return value


class Replay:
    """Turns journal records back into ring entries, marked as replayed. Every field is
    checked for its type and range: a line that is not what nvmefs writes must not reach the
    ring, whose renderers trust their entries."""

    def __init__(self, profile: str) -> None:
        self.profile = profile
        self._translators: dict[str, Translator] = {}

    def _translator(self, profile: Any) -> Translator:
        name = profile if profile in tables.PROFILES else self.profile
        t = self._translators.get(name)
        if t is None:
            t = self._translators[name] = Translator(name)
        return t

    def entry(self, line: bytes) -> Entry:
        """The entry a journal line records; ValueError if it is not one."""
        if len(line) > MAX_LINE:
            raise ValueError("line too long")
        try:
            rec = json.loads(line)
        except RecursionError:  # nested beyond what the parser takes
            raise ValueError("nested too deep") from None
        if not isinstance(rec, dict):
            raise ValueError("not a JSON object")
        seq = _int(rec, "seq", 1, MAX_I64)
        mono = _int(rec, "monotonic_ns", 0, MAX_I64)
        wall = _int(rec, "wall_ns", 0, MAX_I64)
        kind = rec["kind"]
        if not isinstance(kind, str):
            raise ValueError("kind is not a string")
        event: NvmeEvent | HostEvent
        if kind == NvmeEvent.kind:
            word = rec["status"]
            if not isinstance(word, str) or not _STATUS.fullmatch(word) or int(word, 16) > 0x7FFF:
                raise ValueError("status is not a 15-bit word")
            status = self._translator(rec.get("profile")).decode(int(word, 16))
            event = NvmeEvent(status, replayed=True, admin=rec.get("admin") is True)
            for key, hi in NVME_INTS.items():
                setattr(event, key, _opt_int(rec, key, hi))
            for key in NVME_STRS:
                setattr(event, key, _opt_str(rec, key))
        else:
            message = rec["message"]
            if not isinstance(message, str):
                raise ValueError("message is not a string")
            fields = {k: v for k, v in rec.items() if k not in RECORD_KEYS}
            if not all(v is None or isinstance(v, str | int | float) for v in fields.values()):
                raise ValueError("a field is not a plain value")
            event = HostEvent(kind, message, fields, replayed=True)
        return (seq, mono, wall, event)


def read_newest(path: str, keep: int, capacity: int, profile: str) -> tuple[list[Entry], int]:
    """The newest entries of the journal, oldest first, and how many lines in their range
    did not parse. At most `capacity`, with consecutive sequence numbers, and none older than
    the newest clear (whose notice is the first): what the ring held when the journal ended."""
    replay = Replay(profile)
    newest: list[Entry] = []  # newest first while collecting
    bad = 0
    for k in range(keep + 1):
        want = capacity - len(newest)
        if want <= 0:
            break
        # A missing file (a rotation cut short by a kill) is skipped: the sequence numbers
        # say whether what follows it continues the history.
        lines = tail_lines(rotated(path, k), want + 16)  # a few spare for bad lines
        for line in reversed(lines):
            if not line.strip():
                continue
            try:
                entry = replay.entry(line)
            except (ValueError, KeyError, TypeError):
                bad += 1
                continue
            if newest and entry[SEQ] != newest[-1][SEQ] - 1:
                return newest[::-1], bad  # a gap: what is older is not this run's history
            newest.append(entry)
            ev = entry[EVENT]
            if len(newest) == capacity or (
                isinstance(ev, HostEvent)
                and ev.kind == events.NOTICE
                and events.CLEARED in ev.fields
            ):
                return newest[::-1], bad
    return newest[::-1], bad


class Journal:
    """The journal of one daemon: the open live file, its lock, and what is left to write.

    Invariant: every entry the ring got after `attach`, up to `_last`, was written to the
    journal or counted in `lost` (and reported); `_fd` is the live file, locked."""

    def __init__(self, path: str, fd: int, opts: Parsed, replayed: list[Entry], bad: int) -> None:
        self.path = path
        self.limit: int = opts["journal_size"]
        self.keep: int = opts["journal_keep"]
        self.fsync_interval: float = opts["journal_fsync"]
        self.replayed = replayed
        self.bad_lines = bad
        self._fd: int | None = fd
        st = os.fstat(fd)
        self._size, self._ident = st.st_size, (st.st_dev, st.st_ino)
        # A line cut short ends the live file: the next write starts a new file rather than
        # cut it off, since a shipper may have read its start (lines never change once there).
        self._fresh_file = _ends_cut(path)
        self._renderer = Renderer(Clock("jiffies"), "full")
        self._ring: DebugRing | None = None
        self._last = 0  # the last sequence number written
        self._threshold = 1
        self.dirty = False  # written since the last fdatasync
        self._synced = time.monotonic()
        self._checked = time.monotonic()  # when PATH was last seen to name the live file
        self._pending_syncs: list[int] = []  # duplicates of rotated files' descriptors
        self._wake = trio.Event()
        self._busy = False  # in _drain: an entry the drain appends waits for the next
        self._error_reported = -ERROR_REPORT_S
        self._episode = 0  # entries lost since writing last failed (reported at recovery)
        self._failing = False  # the last write failed: the next that succeeds says so
        # Public counters (metrics): lines written, rotations, write errors, entries lost.
        self.written = 0
        self.rotations = 0
        self.errors = 0
        self.lost = 0

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, opts: Parsed) -> Journal | None:
        """Open, lock and check the journal and read what is to be replayed; JournalError
        (one line) if it cannot be written or is not a journal."""
        path = opts["journal"]
        if path is None:
            return None
        if not path:
            raise JournalError("option journal needs a file path")
        path = os.path.abspath(path)
        real = os.path.realpath(path)
        if any(real == d or real.startswith(d + "/") for d in KERNEL_TREES):
            raise JournalError(f"journal {path}: {real} is a kernel interface, not a file")
        fd = _open_locked(path)
        try:
            # A rotation's new file, left by a daemon killed in it (PATH's lock is ours now).
            with contextlib.suppress(FileNotFoundError):
                os.unlink(new_name(path))
            _check_is_journal(path)
            replayed, bad = read_newest(
                path, opts["journal_keep"], opts["capacity"], opts["profile"]
            )
        except OSError as e:
            os.close(fd)
            raise JournalError(f"journal {path}: {e.strerror}") from None
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, opts, replayed, bad)

    def attach(self, ring: DebugRing) -> None:
        """Replay into the fresh ring, then journal every entry appended from here on."""
        self._ring = ring
        self._threshold = max(1, ring.capacity // 2)
        ring.restore(self.replayed)
        self._last = ring.last_seq
        ring.subscribe(self._on_append)
        ring.before_clear(self._drain)  # what a clear takes away is journaled first
        if self.replayed or self.bad_lines:
            text = f"replayed {len(self.replayed)} entries from {self.path}"
            if self.replayed:
                text += f" (seq {self.replayed[0][SEQ]}..{self.replayed[-1][SEQ]})"
            if self.bad_lines:
                text += f", {self.bad_lines} unreadable lines skipped"
            ring.append(HostEvent(events.NOTICE, text))
        self.replayed = []  # the ring holds them now

    # -- writing -------------------------------------------------------------------------------

    def _on_append(self) -> None:
        ring = self._ring
        assert ring is not None
        if ring.last_seq - self._last >= self._threshold and not self._busy:
            self._drain()
        else:
            self._wake.set()

    def _drain(self) -> None:
        """Write every entry not yet written (the ring still holds them: see _on_append and
        the before-clear hook)."""
        ring = self._ring
        if ring is None or self._fd is None or self._busy:
            return
        self._busy = True
        try:
            missed, entries = ring.read_after(self._last)
            if missed:  # cannot happen (see the invariant); counted and reported if it does
                self._lose(missed, "entries overtaken before they were written")
            if not entries:
                return
            self._last = entries[-1][SEQ]
            record = self._renderer.json_line
            written = self.written
            try:
                self._follow_path()
                self._write([record(e).encode() for e in entries])
            except OSError as e:
                self.errors += 1
                self._failing = True
                self._lose(len(entries) - (self.written - written), f"cannot write: {e.strerror}")
                return
            if self._failing:
                self._failing = False
                self._note(f"writing again; {self._episode} entries lost in all")
                self._episode = 0
        finally:
            self._busy = False

    def _follow_path(self) -> None:
        """Reopen PATH if it no longer names the live file (logrotate or a person moved or
        removed it, or its directory): nvmefs writes where the user looks. Looked at once a
        second at most."""
        now = time.monotonic()
        if now - self._checked < FOLLOW_S:
            return
        self._checked = now
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:
                return
        except FileNotFoundError:
            pass
        try:
            fd = _open_locked(self.path)
        except JournalError as e:  # the directory is gone, say: a write error like another
            raise OSError(errno.EIO, str(e)) from None
        self._replace_fd(fd)
        self._note(f"{self.path} was moved or removed: writing to a new {self.path}")

    def _replace_fd(self, fd: int) -> None:
        old = self._fd
        st = os.fstat(fd)
        self._fd, self._size, self._ident = fd, st.st_size, (st.st_dev, st.st_ino)
        if old is not None:
            os.close(old)

    def _write(self, lines: list[bytes]) -> None:
        if self._fresh_file:
            self._rotate()
            self._fresh_file = False
        batch: list[bytes] = []
        size = self._size
        for line in lines:
            if size and size + len(line) > self.limit:
                self._flush(batch)
                batch, size = [], 0
                self._rotate()
            batch.append(line)
            size += len(line)
        self._flush(batch)
        if self.fsync_interval == 0:
            self._wake.set()  # the task syncs, off the event loop

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

    def _rotate(self) -> None:
        """PATH.(k) -> PATH.(k+1) down to PATH -> PATH.1, and a new, locked PATH. The new file
        is made and locked before any rename, so PATH always names a locked journal; if a step
        fails, the new file is taken away again and the live file stays as it was."""
        new_path = new_name(self.path)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        fd = os.open(new_path, flags, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            for k in range(self.keep - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.rename(rotated(self.path, k), rotated(self.path, k + 1))
            with contextlib.suppress(FileNotFoundError):  # moved away behind our back
                os.rename(self.path, rotated(self.path, 1))
            os.rename(new_path, self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(new_path)
            raise
        # What was written to the old file goes to disk with the next sync, from a duplicate.
        old = self._dup_for_sync()
        if old is not None:
            self._pending_syncs.append(old)
        self._replace_fd(fd)
        self.rotations += 1
        _sync_dir(self.path)

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
        if self._ring is not None:
            self._ring.append(HostEvent(events.NOTICE, f"journal: {text}"))

    def _report(self, text: str) -> None:
        """A journal problem, in the daemon's log and the ring, at most once a minute (the
        count of entries lost goes on, and the notice of recovery gives the total)."""
        now = time.monotonic()
        if now - self._error_reported >= ERROR_REPORT_S:
            self._error_reported = now
            log.warning("journal: %s", text)
            if self._ring is not None:
                self._ring.append(HostEvent(events.HOST_ERROR, f"journal: {text}"))

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
        """Write what the ring gets, and sync it every journal_fsync seconds, until cancelled."""
        while True:
            due = self._synced + self.fsync_interval - time.monotonic()
            with trio.move_on_after(max(due, 0) if self.dirty else FOLLOW_S):
                await self._wake.wait()
            self._wake = trio.Event()
            self._drain()
            if self.dirty and time.monotonic() - self._synced >= self.fsync_interval:
                await self._sync()

    def close(self) -> None:
        """Write what is left, sync and close; idempotent. The last sync is on the caller's
        thread: the daemon is ending, and what it wrote should be on disk when it has."""
        if self._fd is None:
            return
        self._drain()
        fds = self._take_syncs()
        if fds and _datasync_all(fds):
            self.errors += 1
        os.close(self._fd)
        self._fd = None


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


def _open_locked(path: str) -> int:
    """The live journal file, opened for appending and locked; JournalError if it is not a
    regular file in an existing directory, or another nvmefs writes it."""
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise JournalError(f"journal {path}: directory {parent} does not exist")
    try:
        # O_NONBLOCK: a FIFO in its place must not hang the mount before the check below.
        fd = os.open(
            path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK, 0o640
        )
    except OSError as e:
        if e.errno == errno.ENXIO:  # a FIFO nobody reads
            raise JournalError(f"journal {path} is not a regular file") from None
        raise JournalError(f"journal {path}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise JournalError(f"journal {path} is not a regular file")
        os.set_blocking(fd, True)
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


def _check_is_journal(path: str) -> None:
    """JournalError unless the file is empty or ends as a journal does: its last line an
    nvmefs record (or the start of one, cut short). nvmefs appends to the file and renames it:
    that must never happen to a file that is something else."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return
        f.seek(max(0, size - MAX_LINE))
        tail = f.read()
    lines = tail.split(b"\n")
    cut = lines.pop()  # after the last newline: b"" or a line cut short
    if lines:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            Replay(tables.DEFAULT_PROFILE).entry(lines[-1])
            return
    elif cut.startswith(RECORD_START):
        return
    raise JournalError(
        f"journal {path} exists and is not an nvmefs journal (its last line is not an entry): "
        "nvmefs appends to a journal and rotates it"
    )


def new_name(path: str) -> str:
    """The name a rotation gives the next live file until it becomes PATH: hidden, so that
    shippers following PATH* never pick it up under a name it will not keep."""
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.new")


def _ends_cut(path: str) -> bool:
    """Whether the file's last line has no newline: a write cut short by a kill."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        return size > 0 and os.pread(f.fileno(), 1, size - 1) != b"\n"


def _sync_dir(path: str) -> None:
    """Make the renames of a rotation durable."""
    with contextlib.suppress(OSError):
        dfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
