"""`-o journal=PATH`: every ring entry as a JSON line in a durable, size-rotated file.

Theory of operation. The journal holds every entry the ring gets, in sequence order, one JSON
object per line (the JSON-lines file's record, always with the full info text). Put it on
another disk than the ones watched. A file never grows past `journal_size`: the line that
would pass it goes to a new file, after the logrotate convention: PATH.(k) becomes PATH.(k+1),
PATH becomes PATH.1, and PATH.(journal_keep) is the oldest kept. Shippers that follow files by
inode and offset (rsyslog imfile, with inotify or by polling) read every line once, since
a line is never changed or moved within a file once written.

When lines are written: the ring calls the journal after every append; the journal takes the
new entries when the event loop next turns (a wake-up per burst, not per entry), or at once
once half a ring is waiting, so that no entry is overwritten before it is written. Each write
goes to the kernel with write(2): a crash or SIGKILL of the daemon loses nothing written,
and a line cut short by one is cut off at the next start. fdatasync(2) follows every
`journal_fsync` seconds when something was written (0: after every write), and at exit:
that bounds what a power failure or kernel crash can take.

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
from nvmefs.store.ring import SEQ, DebugRing, Entry

log = logging.getLogger("nvmefs")

# Bytes read at a time from a file's end when replaying.
READ_BLOCK = 1 << 20
# The most that a journal error is reported in the ring: once per this many seconds.
ERROR_REPORT_S = 60.0
# The keys of a record that say what an entry is rather than carry a host event's fields.
RECORD_KEYS = frozenset(
    {"seq", "ticks", "jiffies", "monotonic_ns", "wall_ns", "wall", "kind", "info", "message"}
    | {"replayed"}
)
NVME_KEYS = ("ctrl", "nsid", "qid", "cid", "opcode", "slba", "nlb", "retries", "disk", "op")


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


class Replay:
    """Turns journal records back into ring entries, marked as replayed."""

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
        """The entry a journal line records; ValueError (or KeyError, TypeError) if it is not
        one."""
        rec = json.loads(line)
        if not isinstance(rec, dict):
            raise ValueError("not a JSON object")
        seq, mono, wall = int(rec["seq"]), int(rec["monotonic_ns"]), int(rec["wall_ns"])
        kind = rec["kind"]
        event: NvmeEvent | HostEvent
        if kind == NvmeEvent.kind:
            word = int(rec["status"], 16)
            status = self._translator(rec.get("profile")).decode(word)
            known: dict[str, Any] = {k: rec.get(k) for k in NVME_KEYS}
            event = NvmeEvent(status, **known)
            event.admin, event.replayed = bool(rec.get("admin")), True
        else:
            fields = {k: v for k, v in rec.items() if k not in RECORD_KEYS}
            event = HostEvent(str(kind), str(rec["message"]), fields, replayed=True)
        return (seq, mono, wall, event)


def read_newest(path: str, keep: int, capacity: int, profile: str) -> tuple[list[Entry], int]:
    """The newest entries of the journal (at most `capacity`, with consecutive sequence
    numbers, oldest first) and how many lines in their range did not parse."""
    replay = Replay(profile)
    newest: list[Entry] = []  # newest first while collecting
    bad = 0
    for k in range(keep + 1):
        want = capacity - len(newest)
        if want <= 0:
            break
        lines = tail_lines(rotated(path, k), want + 16)  # a few spare for bad lines
        for line in reversed(lines):
            if not line.strip():
                continue
            try:
                entry = replay.entry(line)
            except (ValueError, KeyError, TypeError, AttributeError):
                bad += 1
                continue
            if newest and entry[SEQ] != newest[-1][SEQ] - 1:
                return newest[::-1], bad  # a gap: what is older is not this run's history
            newest.append(entry)
            if len(newest) == capacity:
                return newest[::-1], bad
        if not os.path.exists(rotated(path, k)):
            break
    return newest[::-1], bad


class Journal:
    """The journal of one daemon: the open live file, its lock, and what is left to write."""

    def __init__(self, path: str, fd: int, opts: Parsed, replayed: list[Entry], bad: int) -> None:
        self.path = path
        self.limit: int = opts["journal_size"]
        self.keep: int = opts["journal_keep"]
        self.fsync_interval: float = opts["journal_fsync"]
        self.replayed = replayed
        self.bad_lines = bad
        self._fd: int | None = fd
        self._size = os.fstat(fd).st_size
        self._renderer = Renderer(Clock("jiffies"), "full")
        self._ring: DebugRing | None = None
        self._last = 0  # the last sequence number written
        self._threshold = 1
        self.dirty = False  # written since the last fdatasync
        self._synced = time.monotonic()
        self._wake = trio.Event()
        self._busy = False  # in _drain: an entry the drain appends waits for the next
        self._error_reported = -ERROR_REPORT_S
        # Public counters (metrics): lines written, rotations, write errors, entries lost.
        self.written = 0
        self.rotations = 0
        self.errors = 0
        self.lost = 0

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, opts: Parsed) -> Journal | None:
        """Open, lock and check the journal, cut a line left cut short, and read what is to be
        replayed; JournalError (one line) if it cannot be written."""
        path = opts["journal"]
        if path is None:
            return None
        if not path:
            raise JournalError("option journal needs a file path")
        path = os.path.abspath(path)
        fd = _open_locked(path)
        try:
            _cut_partial_line(fd, path)
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
        if self.replayed or self.bad_lines:
            first, last = (
                (self.replayed[0][SEQ], self.replayed[-1][SEQ]) if self.replayed else (0, 0)
            )
            text = f"replayed {len(self.replayed)} entries from {self.path}"
            if self.replayed:
                text += f" (seq {first}..{last})"
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
        """Write every entry not yet written (the ring still holds them: see _on_append)."""
        ring, fd = self._ring, self._fd
        if ring is None or fd is None or self._busy:
            return
        self._busy = True
        try:
            missed, entries = ring.read_after(self._last)
            if missed:  # cannot happen while _on_append drains at half a ring; counted if so
                self.lost += missed
            if not entries:
                return
            self._last = entries[-1][SEQ]
            record = self._renderer.json_line
            written = self.written
            try:
                self._write([record(e).encode() for e in entries])
            except OSError as e:
                self.errors += 1
                lost = len(entries) - (self.written - written)
                self.lost += lost
                self._report(f"cannot write {self.path}: {e.strerror} ({lost} entries lost)")
        finally:
            self._busy = False

    def _write(self, lines: list[bytes]) -> None:
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
            self._sync()

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
        is made and locked before any rename, so PATH always names a locked journal."""
        old = self._fd
        assert old is not None
        new_path = f"{self.path}.new"
        fd = os.open(
            new_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise
        self._sync()
        for k in range(self.keep - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.rename(rotated(self.path, k), rotated(self.path, k + 1))
        os.rename(self.path, rotated(self.path, 1))
        os.rename(new_path, self.path)
        os.close(old)
        self._fd, self._size = fd, 0
        self.rotations += 1
        _sync_dir(self.path)

    def _sync(self) -> None:
        if self.dirty and self._fd is not None:
            try:
                os.fdatasync(self._fd)
            except OSError as e:
                self.errors += 1
                self._report(f"cannot sync {self.path}: {e.strerror}")
            self.dirty = False
        self._synced = time.monotonic()

    def _report(self, text: str) -> None:
        """A journal problem, in the daemon's log and the ring, at most once a minute."""
        now = time.monotonic()
        if now - self._error_reported >= ERROR_REPORT_S:
            self._error_reported = now
            log.warning("journal: %s", text)
            if self._ring is not None:
                self._ring.append(HostEvent(events.HOST_ERROR, f"journal: {text}"))

    # -- the task ------------------------------------------------------------------------------

    async def run(self, recorder: Recorder) -> None:
        """Write what the ring gets, and sync it every journal_fsync seconds, until cancelled."""
        while True:
            timeout = self.fsync_interval if self.dirty else float("inf")
            with trio.move_on_after(timeout):
                await self._wake.wait()
            self._wake = trio.Event()
            self._drain()
            if self.dirty and time.monotonic() - self._synced >= self.fsync_interval:
                self._sync()

    def close(self) -> None:
        """Write what is left, sync and close; idempotent."""
        if self._fd is None:
            return
        self._drain()
        self._sync()
        os.close(self._fd)
        self._fd = None


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


def _cut_partial_line(fd: int, path: str) -> None:
    """Cut a last line that has no newline: its write was cut short (the daemon was killed
    in it), and its entry's number is given again by this run."""
    size = os.fstat(fd).st_size
    if size == 0:
        return
    with open(path, "rb") as f:
        pos = size
        while pos > 0:
            step = min(READ_BLOCK, pos)
            f.seek(pos - step)
            block = f.read(step)
            i = block.rfind(b"\n")
            if i >= 0:
                end = pos - step + i + 1
                break
            pos -= step
        else:
            end = 0
    if end != size:
        os.ftruncate(fd, end)


def _sync_dir(path: str) -> None:
    """Make the renames of a rotation durable."""
    with contextlib.suppress(OSError):
        dfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
