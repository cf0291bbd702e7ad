"""The kernel's tracefs: private instances, event formats, and the binary pages of trace_pipe_raw.

Theory of operation
- An `Instance` is a directory under tracefs's instances/: its own events, filters and per-CPU
  ring buffers, created with mkdir and gone with rmdir. nvmefs names its instances
  `nvmefs-<pid>-<n>`, so two daemons coexist and one left by a killed daemon is recognised (its
  pid is gone) and removed by the next start.
- The kernel does not remove an instance when its maker dies: a SIGKILLed daemon's instance
  would go on tracing (its events enabled, its per-CPU buffers filling on every completion they
  match) until the next start. So `create()` starts a `Guardian`: a small `python3 -I -S`
  process, in a session of its own, whose stdin is a pipe whose write end only the daemon holds
  (close-on-exec: no program the daemon runs gets it). EOF on it means the daemon is gone,
  whatever killed it; the guardian then disables the instance's events and rmdirs it (retrying
  while EBUSY: the dying daemon's trace_pipe_raw descriptors may close after the pipe). A clean
  stop removes the instance itself and then closes the pipe: the guardian finds nothing to do
  and exits. The guardian holds no descriptor of the daemon's (no FUSE device, no mount point,
  no trace pipe), its cwd is /, and its argv names no mount point (nothing takes it for a
  daemon of one); it touches only the directory it was started for (same inode), so a later
  instance of a reused pid is safe from it.
- The residual window: from the daemon's death to the guardian's write to events/enable, the
  instance goes on recording - the time the kernel takes to tear the dead process down and
  wake the guardian, usually milliseconds (longer on a loaded machine, or while the guardian
  is still starting). A guardian that cannot be started, or that dies with the daemon (a
  cgroup killed as a whole, the OOM killer), leaves the instance to the next start's
  `Instance.remove_stale()`, as before.
- An event's fields are read from its `format` file, never assumed: offsets change between
  kernels. `EventFormat.decode()` turns an event record into a dict of the fields asked for.
- trace_pipe_raw hands out ring-buffer pages: a header (u64 timestamp, a long `commit` whose low
  27 bits are the data length and whose bits 31/30 say events were lost before this page and
  whether their count is stored after the data), then records, each behind a u32 with a 5-bit
  type_len and a 27-bit time delta. `parse_page()` walks one page; no I/O.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from nvmefs.errors import UsageError

MOUNTS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
PREFIX = "nvmefs-"

# Ring-buffer page layout (64-bit kernels: `commit` is a long).
COMMIT_MASK = (1 << 27) - 1
MISSED_EVENTS = 1 << 31
MISSED_STORED = 1 << 30
PAGE_HEADER = struct.Struct("<Qq")
TYPE_PADDING, TYPE_TIME_EXTEND, TYPE_TIME_STAMP = 29, 30, 31
_U32 = struct.Struct("<I")
_LONG = struct.Struct("<q")


class TraceError(UsageError):
    """tracefs is missing, unusable, or lacks the events nvmefs needs."""


def find(mount: bool = True) -> Path:
    """Where tracefs is mounted; mounts it at /sys/kernel/tracing if it is only unmounted."""
    for path in MOUNTS:
        if (path / "instances").is_dir():
            return path
    if mount and MOUNTS[0].is_dir():
        r = subprocess.run(
            ["mount", "-t", "tracefs", "nodev", str(MOUNTS[0])], capture_output=True, text=True
        )
        if r.returncode == 0 and (MOUNTS[0] / "instances").is_dir():
            return MOUNTS[0]
    raise TraceError("no tracefs: the kernel was built without tracing, or it cannot be mounted")


@dataclass(frozen=True, slots=True)
class Field:
    """One field of an event record: where it is and how to read it."""

    name: str
    offset: int
    size: int
    signed: bool
    array: bool  # char name[N]: a string


_FIELD = re.compile(r"field:(?P<decl>[^;]+);\s*offset:(\d+);\s*size:(\d+);\s*signed:(\d+);")


@dataclass(frozen=True)
class EventFormat:
    """An event's id and fields, as its tracefs `format` file describes them."""

    system: str
    name: str
    id: int
    fields: dict[str, Field]

    @classmethod
    def parse(cls, system: str, name: str, text: str) -> EventFormat:
        m = re.search(r"^ID:\s*(\d+)", text, re.M)
        if not m:
            raise TraceError(f"{system}:{name}: format has no ID")
        fields = {}
        for fm in _FIELD.finditer(text):
            decl = fm.group("decl").strip()
            array = decl.endswith("]")
            ident = re.sub(r"\[.*\]$", "", decl).split()[-1]
            fields[ident] = Field(
                ident, int(fm.group(2)), int(fm.group(3)), fm.group(4) == "1", array
            )
        return cls(system, name, int(m.group(1)), fields)

    def require(self, *names: str) -> None:
        missing = [n for n in names if n not in self.fields]
        if missing:
            raise TraceError(
                f"{self.system}:{self.name} has no field {', '.join(missing)} on this kernel"
            )

    def decode(self, data: bytes | memoryview, names: tuple[str, ...]) -> dict[str, int | str]:
        """The named fields of one record: integers, or strings for char arrays."""
        out: dict[str, int | str] = {}
        for n in names:
            f = self.fields[n]
            raw = bytes(data[f.offset : f.offset + f.size])
            if f.array:
                out[n] = raw.split(b"\0", 1)[0].decode(errors="replace")
            else:
                out[n] = int.from_bytes(raw, "little", signed=f.signed)
        return out


def parse_page(page: bytes | memoryview) -> tuple[int, list[memoryview]]:
    """(events lost before this page, its records' data) for one trace_pipe_raw page.

    The lost count is -1 when the kernel says events were lost but did not store how many."""
    view = memoryview(page)
    if len(view) < PAGE_HEADER.size:
        return 0, []
    _ts, commit = PAGE_HEADER.unpack_from(view)
    size = commit & COMMIT_MASK
    start = PAGE_HEADER.size
    end = min(start + size, len(view))
    lost = 0
    if commit & MISSED_EVENTS:
        lost = -1
        if commit & MISSED_STORED and end + _LONG.size <= len(view):
            lost = _LONG.unpack_from(view, end)[0]
    records = []
    pos = start
    while pos + 4 <= end:
        word = _U32.unpack_from(view, pos)[0]
        type_len = word & 0x1F
        pos += 4
        if type_len == TYPE_PADDING:
            if pos + 4 > end:
                break
            pos += _U32.unpack_from(view, pos)[0]
        elif type_len in (TYPE_TIME_EXTEND, TYPE_TIME_STAMP):
            pos += 4
        elif type_len == 0:
            if pos + 4 > end:
                break
            length = (_U32.unpack_from(view, pos)[0] - 4 + 3) & ~3
            records.append(view[pos + 4 : pos + 4 + length])
            pos += 4 + length
        else:
            length = type_len * 4
            records.append(view[pos : pos + length])
            pos += length
    return lost, records


def record_type(data: bytes | memoryview) -> int:
    """The event id of a record (its common_type, the first u16 of every record)."""
    return int.from_bytes(data[:2], "little")


# The guardian's whole program, run with `python3 -I -S -c` (no site, no nvmefs import: a few MB
# of memory, most of it the interpreter's shared pages). argv: the instance path, its inode.
# It must not name nvmefs with a blank after it: `pgrep -f 'nvmefs .*MNT'` finds daemons.
GUARD_CODE = """\
# tracefs-guard: removes a tracefs instance once the process that made it is gone
import errno, os, sys, time
path, ino = sys.argv[1], int(sys.argv[2])
while os.read(0, 64):  # nobody writes: EOF is the maker's exit (or its release)
    pass

def same():  # the directory this guard was made for, not a later one of the same name
    try:
        return os.stat(path).st_ino == ino
    except OSError:
        return False

def put(name, value):
    try:
        with open(os.path.join(path, name), "w") as f:
            f.write(value)
    except OSError:
        pass

if same():
    put("events/enable", "0")  # first: this alone ends the cost on every completion
    end = time.monotonic() + %(wait)r
    while same():
        try:
            os.rmdir(path)
        except OSError as e:
            if e.errno != errno.EBUSY:
                break
            if time.monotonic() > end:  # another reader keeps it: free the buffers at least
                put("buffer_size_kb", "1")
                break
            time.sleep(0.05)
"""
GUARD_WAIT_S = 10.0  # the guardian retries rmdir this long while a reader keeps a pipe open
GUARD_REAP_S = 2.0  # a clean stop waits this long for its guardian to exit


def guard_argv(path: Path, ino: int) -> list[str]:
    """The guardian's command line for the instance directory `path` with inode `ino`."""
    code = GUARD_CODE % {"wait": GUARD_WAIT_S}
    return [sys.executable or "python3", "-I", "-S", "-c", code, str(path), str(ino)]


class Guardian:
    """A process that removes one tracefs instance once the process that started it is gone.

    Invariant: until `release()`, this process alone holds the write end of the guardian's stdin
    pipe; the guardian acts when that end closes - at `release()`, or when the kernel closes it
    as this process dies, however it dies."""

    def __init__(self, proc: subprocess.Popen[bytes], wfd: int) -> None:
        self.proc = proc
        self._wfd: int | None = wfd

    @classmethod
    def start(cls, path: Path) -> Guardian:
        """A guardian of the instance directory `path`; OSError if it cannot be started."""
        ino = os.stat(path).st_ino
        rfd, wfd = os.pipe()  # both close-on-exec: only the guardian's stdin is a copy of rfd
        try:
            proc = subprocess.Popen(
                guard_argv(path, ino),
                stdin=rfd,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                close_fds=True,  # no FUSE device, mount point or trace pipe of the daemon's
                cwd="/",  # keeps no directory busy
                start_new_session=True,  # a terminal's ^C or hangup is not for it
            )
        except BaseException:
            os.close(wfd)
            raise
        finally:
            os.close(rfd)
        return cls(proc, wfd)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def release(self, timeout: float = GUARD_REAP_S) -> None:
        """Let the guardian go: it removes the instance if it still exists, and exits; reaped
        here if it does so within `timeout` (else init reaps it). Idempotent."""
        if self._wfd is None:
            return
        os.close(self._wfd)
        self._wfd = None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lost_events(stats: str) -> int:
    """Events lost, from the text of a CPU's per_cpu stats file (or several of them, as
    `trace-cmd report --stat` prints them): the sum of its `overrun` (overwritten) and
    `dropped events` (dropped when full) lines."""
    total = 0
    for line in stats.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("overrun", "dropped events"):
            with contextlib.suppress(ValueError):
                total += int(value.strip())
    return total


class Instance:
    """A private tracefs instance of this process. Invariant: while it exists its directory
    is instances/<name>, and once `create()` returned a guardian watches it unless `unguarded`
    says why not; `remove()` disables what it enabled, removes it and lets the guardian go
    (idempotent)."""

    _count = 0

    def __init__(self, root: Path, name: str | None = None) -> None:
        Instance._count += 1
        self.root = root
        self.name = name or f"{PREFIX}{os.getpid()}-{Instance._count}"
        self.path = root / "instances" / self.name
        self.enabled: list[str] = []
        self.guardian: Guardian | None = None
        self.unguarded: str | None = None  # why no guardian watches it (it could not start)

    @staticmethod
    def remove_stale(root: Path) -> list[str]:
        """Remove instances left by nvmefs processes that no longer run; returns their names."""
        removed = []
        for d in (root / "instances").glob(PREFIX + "*"):
            m = re.fullmatch(re.escape(PREFIX) + r"(\d+)-\d+", d.name)
            if m and not _pid_alive(int(m.group(1))):
                with contextlib.suppress(OSError):
                    _disable_all(d)
                    d.rmdir()
                    removed.append(d.name)
        return removed

    def create(self, buffer_kb: int | None = None, guard: bool = True) -> None:
        """Make the directory, with a guardian unless `guard` is false (see the module)."""
        try:
            self.path.mkdir()
        except OSError as e:
            raise TraceError(f"cannot create tracefs instance {self.path}: {e.strerror}") from None
        if guard:
            # Before anything is enabled: from here on a killed daemon's instance goes at once.
            # Not fatal: without a guardian the next start removes a dead daemon's instance.
            try:
                self.guardian = Guardian.start(self.path)
            except (OSError, subprocess.SubprocessError) as e:
                self.unguarded = getattr(e, "strerror", None) or str(e)
        try:
            if buffer_kb is not None:
                self.write("buffer_size_kb", str(buffer_kb))
            # Wake a reader as soon as any data is there, not when the buffer is half full.
            with contextlib.suppress(FileNotFoundError):
                self.write("buffer_percent", "0")
        except BaseException:
            self.remove()
            raise

    def write(self, rel: str, value: str) -> None:
        try:
            (self.path / rel).write_text(value)
        except OSError as e:
            raise TraceError(f"{self.path / rel}: {e.strerror or e}") from None

    def buffer_kb(self) -> int:
        """The per-CPU buffer size (KiB) now: "1408", or "7 (expanded: 1408)" before the
        kernel's first use of tracing expands it."""
        text = (self.path / "buffer_size_kb").read_text()
        m = re.search(r"expanded: (\d+)", text)
        return int(m.group(1) if m else text.split()[0])

    def format(self, system: str, event: str) -> EventFormat:
        path = self.path / "events" / system / event / "format"
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise TraceError(f"this kernel has no {system}:{event} trace event") from None
        return EventFormat.parse(system, event, text)

    def has_event(self, system: str, event: str) -> bool:
        return (self.path / "events" / system / event).is_dir()

    def enable(self, system: str, event: str, filter_: str | None = None) -> None:
        base = f"events/{system}/{event}"
        if filter_ is not None:
            self.write(f"{base}/filter", filter_)
        self.write(f"{base}/enable", "1")
        self.enabled.append(base)

    def set_filter(self, system: str, event: str, filter_: str) -> None:
        self.write(f"events/{system}/{event}/filter", filter_ or "0")

    def cpus(self) -> list[int]:
        return sorted(
            int(p.name[3:]) for p in (self.path / "per_cpu").glob("cpu*") if p.name[3:].isdigit()
        )

    def open_raw(self, cpu: int) -> int:
        return os.open(
            self.path / "per_cpu" / f"cpu{cpu}" / "trace_pipe_raw",
            os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC,
        )

    def lost(self, cpu: int) -> int:
        """Events this CPU's buffer lost so far: overwritten (overrun) or dropped when full."""
        try:
            text = (self.path / "per_cpu" / f"cpu{cpu}" / "stats").read_text()
        except OSError:
            return 0
        return lost_events(text)

    def remove(self) -> None:
        try:
            if self.path.exists():
                self._remove_dir()
        finally:
            # After the rmdir: the guardian then has nothing to do (or retries what failed).
            if self.guardian is not None:
                self.guardian.release()
                self.guardian = None

    def _remove_dir(self) -> None:
        with contextlib.suppress(OSError):
            _disable_all(self.path)
        for _ in range(50):  # rmdir fails with EBUSY while a reader still has a pipe open
            try:
                self.path.rmdir()
                return
            except OSError as e:
                if e.errno != errno.EBUSY:
                    return
                os.sched_yield()


def _disable_all(path: Path) -> None:
    enable = path / "events" / "enable"
    if enable.exists():
        enable.write_text("0")


def instances(root: Path) -> Iterator[str]:
    """Names of the nvmefs instances that exist now."""
    for d in (root / "instances").glob(PREFIX + "*"):
        yield d.name
