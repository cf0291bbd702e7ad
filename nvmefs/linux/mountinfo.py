"""The mount table as the kernel shows it to this process (/proc/self/mountinfo), parsed here
once for every user of it (the mount daemon's checks, the filesystem's watch on its own mount).

A line is `ID PARENT MAJOR:MINOR ROOT POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER`; the
kernel writes space, tab, newline and backslash in paths as \\ooo (show_mountinfo's
mangle). Paths are decoded as the os module does (os.fsdecode), so any bytes survive.
"""

from __future__ import annotations

import os
import re
import select
import threading
from dataclasses import dataclass

PATH = "/proc/self/mountinfo"
_ESCAPE = re.compile(rb"\\([0-7]{3})")


@dataclass(frozen=True, slots=True)
class Mount:
    """One line of the table: the device (MAJOR:MINOR), where it is mounted, its filesystem
    type (`fuse.nvmefs` for a FUSE mount with a subtype) and its source."""

    dev: str
    point: str
    fstype: str
    source: str


def unescape(field: bytes) -> bytes:
    """A field as the kernel had it before writing its space, tab, newline and \\ as \\ooo."""
    return _ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field)


def parse(data: bytes) -> list[Mount]:
    """The mounts of a mountinfo text, in its order (a mount over another comes after it);
    lines that are not of its form are passed over."""
    out = []
    # Only newline ends a line and only space separates fields: the kernel escapes those in
    # paths, but not \r, \v or \f, which bytes.splitlines() and split() would also cut at.
    for line in data.split(b"\n"):
        left, sep, right = line.partition(b" - ")
        fields, tail = left.split(b" "), right.split(b" ")
        if not sep or len(fields) < 5 or len(tail) < 2:
            continue
        point = os.fsdecode(unescape(fields[4]))
        source = os.fsdecode(unescape(tail[1]))
        out.append(Mount(fields[2].decode(), point, tail[0].decode(errors="replace"), source))
    return out


def read(fd: int) -> list[Mount]:
    """The table read again from an open mountinfo descriptor (from its start)."""
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while data := os.read(fd, 1 << 16):
        chunks.append(data)
    return parse(b"".join(chunks))


def mounts(path: str = PATH) -> list[Mount]:
    """The mount table now."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return read(fd)
    finally:
        os.close(fd)


class MountTable:
    """The mount table, read again only when it changed: poll() on an open mountinfo reports
    POLLPRI once after every change of the table (proc(5)). `generation` counts
    the reads. Thread-safe.

    Invariant: `get()` returns the table as it is, at the cost of one poll() when nothing
    changed."""

    def __init__(self, path: str = PATH) -> None:
        self.path = path
        self.generation = 0
        self._fd: int | None = None
        self._poll = select.poll()
        self._table: list[Mount] = []
        self._stale = False  # a poll saw a change the table does not have yet
        self._lock = threading.Lock()

    def get(self) -> tuple[int, list[Mount]]:
        """(generation, the table now); OSError if it cannot be read."""
        with self._lock:
            if self._fd is None:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                self._poll.register(fd, select.POLLPRI)
                self._fd = fd
            elif self.generation and not self._stale and not self._poll.poll(0):
                return self.generation, self._table
            self._table = read(self._fd)
            self._stale = False
            self.generation += 1
            return self.generation, self._table

    def changed(self) -> bool:
        """Whether `get()` would read the table again (one poll()); True at once, without
        waiting, while another thread reads it."""
        if not self._lock.acquire(blocking=False):
            return True
        try:
            # A poll that reports the change consumes it (the kernel's mounts_poll): noted.
            self._stale = self._stale or bool(self._poll.poll(0))
            return self._fd is None or not self.generation or self._stale
        finally:
            self._lock.release()

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                self._poll.unregister(self._fd)
                os.close(self._fd)
                self._fd = None
                self.generation += 1


class MountWatch:
    """Whether this filesystem is still mounted anywhere, from the mount table (a MountTable
    of its own).

    `start()` (once the mount is live) notes the device number of the FUSE mount at the
    mountpoint, so a later mount at the same path does not count as ours. Invariant: `mounted`
    is what the mount table said at its last read; the table is read again only after it
    changed, so asking costs one poll() when nothing changed.
    """

    def __init__(self, mountpoint: str) -> None:
        # Resolved by the caller: once mounted, looking the path up would ask this filesystem,
        # from the thread that has to answer.
        self.path = mountpoint
        self.dev: str | None = None
        self.mounted = True
        self._table: MountTable | None = None
        self._generation = 0  # of the table `mounted` was found in

    def start(self) -> None:
        table = MountTable()
        self._generation, mounts = table.get()
        for m in mounts:
            if m.point == self.path and m.fstype.startswith("fuse"):
                self.dev = m.dev  # the last one listed is the one on top
        self.mounted = True
        self._table = table

    def still_mounted(self) -> bool:
        if self._table is None:
            return True
        generation, mounts = self._table.get()
        if generation != self._generation:  # the mount table changed since the last look
            self._generation = generation
            if self.dev is not None:
                self.mounted = any(m.dev == self.dev for m in mounts)
            else:
                self.mounted = any(m.point == self.path for m in mounts)
        return self.mounted
