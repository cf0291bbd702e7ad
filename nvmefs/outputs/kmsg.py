"""`-o kmsg`: logged entries mirrored to the kernel log (/dev/kmsg), as the seed patch's printk did.

Theory of operation: one more consumer of the ring, with a cursor and a task of its own; the
ring's append only wakes it (a write per entry on the completion path would put the kernel log's
cost into every completion). Each entry becomes one line `nvmefs: <info>` at level warning (4)
for errors and host events, info (6) for successes.

The kernel's rate limit. Unless the kernel runs with printk.devkmsg=on, a process's writes to
/dev/kmsg pass a rate limit of 10 lines per 5 seconds per open file (devkmsg_write's
DEFAULT_RATELIMIT_BURST and DEFAULT_RATELIMIT_INTERVAL), and what is over it is dropped
silently: the write still returns its length. In an error storm that would leave the kernel log
with a few lines and no trace of the rest. So nvmefs keeps that budget itself and counts what it
leaves out: at most BURST lines per INTERVAL_S, and when entries were left out, the first line
of the next interval says how many (`nvmefs: N entries not mirrored ...`); `written` and
`dropped` count them (metrics). With printk.devkmsg=on there is no limit; with =off the kernel
takes nothing, and every entry counts as dropped. The ring, the journal and syslog keep every
entry either way: the kernel log is a pointer to them, not the record.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import trio

from nvmefs.options import Parsed
from nvmefs.recorder import Recorder
from nvmefs.store.events import NvmeEvent
from nvmefs.store.render import info
from nvmefs.store.ring import EVENT, Cursor, DebugRing

log = logging.getLogger("nvmefs")

DEVICE = "/dev/kmsg"
SETTING = "/proc/sys/kernel/printk_devkmsg"
# The kernel's per-writer limit on /dev/kmsg under printk.devkmsg=ratelimit (its default).
BURST = 10
INTERVAL_S = 5.0


def kernel_setting(path: str = SETTING) -> str:
    """printk.devkmsg: "on", "off" or "ratelimit" (the default, also when it cannot be read)."""
    try:
        with open(path) as f:
            return f.read().strip() or "ratelimit"
    except OSError:
        return "ratelimit"


class KmsgOutput:
    """The mirror of one daemon: /dev/kmsg open for writing, its cursor and its budget.

    Invariant: every entry after the cursor's start was written (`written`), or counted in
    `dropped` and reported in the kernel log once the budget allowed, or is still pending in
    the ring; at most `burst` lines go out per INTERVAL_S (unlimited when `burst` is None).
    """

    def __init__(self, fd: int, setting: str) -> None:
        self._fd: int | None = fd
        self.setting = setting
        self.burst: int | None = None if setting == "on" else BURST
        self._cursor: Cursor | None = None
        self._wake = trio.Event()
        self._window = -INTERVAL_S  # when the current interval began
        self._used = 0  # lines written in it
        self._unreported = 0  # entries left out that no line has told of yet
        self.written = 0
        self.dropped = 0

    @classmethod
    def open(cls, opts: Parsed) -> KmsgOutput | None:
        """The mirror `-o kmsg` asks for; None without it, or (with a warning: the ring has the
        entries anyway) when /dev/kmsg cannot be opened."""
        if not opts["kmsg"]:
            return None
        try:
            fd = os.open(DEVICE, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as e:
            log.warning("kmsg: cannot open %s: %s", DEVICE, e.strerror)
            return None
        return cls(fd, kernel_setting())

    def attach(self, ring: DebugRing) -> None:
        """Mirror what is appended from now on (this run's start entry first)."""
        self._cursor = Cursor(ring)
        ring.subscribe(self._on_append)

    def _on_append(self) -> None:
        # On the completion path: wake the task (the event is replaced after each wake-up, so
        # it is looked up at every call), nothing more.
        self._wake.set()

    async def run(self, recorder: Recorder) -> None:
        """Mirror entries as they come, within the budget, until cancelled."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            self.flush()
            while self._unreported:
                # Entries were left out: say how many as soon as the next interval begins.
                await trio.sleep(max(0.0, self._window + INTERVAL_S - time.monotonic()))
                self.flush()

    def flush(self) -> None:
        """Write what the budget allows of the entries waiting; count what it cannot take."""
        cursor, fd = self._cursor, self._fd
        if cursor is None or fd is None:
            return
        missed, entries = cursor.take()
        if missed:
            self._leave_out(missed)
        if self.setting == "off":
            self.dropped += len(entries)
            self._unreported = 0  # the kernel takes no line: nothing could tell of them
            return
        if self._unreported and self._room():
            self._write(4, f"{self._unreported} entries not mirrored (the kernel log's rate limit)")
            self._unreported = 0
        for i, entry in enumerate(entries):
            if not self._room():
                self._leave_out(len(entries) - i)
                return
            ev = entry[EVENT]
            level = 6 if isinstance(ev, NvmeEvent) and ev.status.ok else 4
            self._write(level, info(ev))
            self.written += 1

    def _room(self) -> bool:
        now = time.monotonic()
        if now - self._window >= INTERVAL_S:
            self._window, self._used = now, 0
        return self.burst is None or self._used < self.burst

    def _leave_out(self, n: int) -> None:
        self.dropped += n
        self._unreported += n

    def _write(self, level: int, text: str) -> None:
        assert self._fd is not None
        self._used += 1
        with contextlib.suppress(OSError):  # best effort: the ring has the entry anyway
            os.write(self._fd, f"<{level}>nvmefs: {text}\n".encode())

    def close(self) -> None:
        """Mirror what the budget still allows, then close; idempotent."""
        if self._fd is None:
            return
        self.flush()
        os.close(self._fd)
        self._fd = None
