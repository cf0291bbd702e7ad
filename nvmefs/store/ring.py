"""The debug ring: fixed capacity, sequence numbered, exact about what it lost.

Theory of operation: every entry gets the next sequence number (the first is 1) and lives in slot
`seq % capacity`. The retained entries are exactly the sequence numbers in [start, next): a slot
outside that window is never looked at, so readers cannot see empty or stale slots. Wrap-around
moves `start` forward one entry at a time and counts it as dropped; `clear()` moves `start` to
`next` and counts what it removed as cleared. So at every moment

    appended == retained + dropped + cleared

Every consumer of the ring (the FUSE views, the journal, syslog, the metrics, the kmsg mirror,
the CLI printer) reads it through a `Cursor`: its place in the ring, the last sequence number it
took. `take()` hands back how many entries after that place are gone (it was overtaken) and the
ones still there, and moves the place past both. A consumer is woken after appends by a
listener (`subscribe`), which must only note that there is work (set an event, add to a count):
it runs on the completion path. A listener that raises is isolated: the others still run, the
append and the batch it belongs to go on, and the failure is counted (`listener_errors`) and
logged at most once a minute.

A consumer that must keep every entry (the journal) may also hold a brake (`add_brake`): while
it says it is behind, `held()` is true, and the producers that can wait - an engine's own
workload, at its batch boundaries on the submit side - wait for it instead of outrunning it.
The completion path never waits on a brake; the machine's own I/O (the kernel source) cannot.

An entry is the tuple (seq, monotonic_ns, wall_ns, event): nothing is formatted on append.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("nvmefs")

Entry = tuple[int, int, int, Any]
SEQ, MONO_NS, WALL_NS, EVENT = range(4)

DEFAULT_CAPACITY = 1024
# A failing listener is logged at most once per this many seconds (it is counted every time).
LISTENER_LOG_S = 60.0


class DebugRing:
    """The ring of entries; see the module docstring for its invariant."""

    __slots__ = (
        "_before_clear",
        "_brakes",
        "_buf",
        "_listener_logged",
        "_listeners",
        "_next",
        "_start",
        "capacity",
        "cleared",
        "dropped",
        "listener_errors",
    )

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"ring capacity must be at least 1, not {capacity}")
        self.capacity = capacity
        self._buf: list[Entry | None] = [None] * capacity
        self._next = 1
        self._start = 1
        self.dropped = 0
        self.cleared = 0
        self._listeners: list[Callable[[], None]] = []
        self._before_clear: list[Callable[[], None]] = []
        self._brakes: list[Callable[[], bool]] = []
        self.listener_errors = 0  # listeners that raised (see the module docstring)
        self._listener_logged = -LISTENER_LOG_S

    # -- writing -------------------------------------------------------------------------------

    def append(self, event: Any, mono_ns: int | None = None, wall_ns: int | None = None) -> int:
        """Append `event`, timed now (or at the given times: what the kernel log says of an
        error from before this run); returns its sequence number."""
        seq = self._next
        if mono_ns is None or wall_ns is None:
            mono_ns, wall_ns = time.monotonic_ns(), time.time_ns()
        self._buf[seq % self.capacity] = (seq, mono_ns, wall_ns, event)
        self._next = seq + 1
        if seq - self._start >= self.capacity:
            self._start += 1
            self.dropped += 1
        if self._listeners:
            for wake in self._listeners:
                try:
                    wake()
                except Exception:  # a consumer's bug must not break the producer's batch
                    self._listener_failed(wake)
        return seq

    def _listener_failed(self, wake: Callable[[], object]) -> None:
        self.listener_errors += 1
        now = time.monotonic()
        if now - self._listener_logged >= LISTENER_LOG_S:
            self._listener_logged = now
            log.exception(
                "a ring listener (%r) failed (%d failures so far)", wake, self.listener_errors
            )

    def restore(self, entries: list[Entry]) -> None:
        """Fill an unused ring with entries of an earlier run (oldest first, consecutive
        sequence numbers, at most `capacity`), so that sequence numbers continue after them.
        The entries before the first restored one count as dropped: this ring never held
        them, and the invariant above holds with appended counting the earlier runs too."""
        if self._next != 1:
            raise ValueError("restore() is only for a ring nothing was appended to")
        if len(entries) > self.capacity:
            raise ValueError(f"{len(entries)} entries do not fit in a ring of {self.capacity}")
        if not entries:
            return
        first = entries[0][SEQ]
        for i, entry in enumerate(entries):
            if entry[SEQ] != first + i:
                raise ValueError(f"entry {entry[SEQ]} follows {first + i - 1}: seqs have a gap")
            self._buf[entry[SEQ] % self.capacity] = entry
        self._start = first
        self._next = first + len(entries)
        self.dropped = first - 1

    def clear(self) -> int:
        """Forget every retained entry; returns how many were removed. The hooks of
        `before_clear` run first, while the entries are still there."""
        for hook in self._before_clear:
            hook()
        removed = self._next - self._start
        self.cleared += removed
        self._start = self._next
        # Release the events now rather than when their slots are reused.
        self._buf = [None] * self.capacity
        return removed

    def before_clear(self, hook: Callable[[], None]) -> None:
        """Call `hook()` before every clear: for a reader that must see every entry (the
        journal), which a clear would otherwise take away before it got to them."""
        self._before_clear.append(hook)

    def subscribe(self, wake: Callable[[], None]) -> Callable[[], None]:
        """Call `wake()` after every append; returns the function that unsubscribes."""
        self._listeners.append(wake)
        return lambda: self._listeners.remove(wake)

    def add_brake(self, holding: Callable[[], bool]) -> Callable[[], None]:
        """Make `held()` true while `holding()` is (see the module docstring); returns the
        function that removes the brake."""
        self._brakes.append(holding)
        return lambda: self._brakes.remove(holding)

    def held(self) -> bool:
        """Whether a consumer that must keep every entry is behind. A brake that raises is
        counted as a failed listener and does not hold: a bug there must not stop the engine."""
        for holding in self._brakes:
            try:
                if holding():
                    return True
            except Exception:
                self._listener_failed(holding)
        return False

    # -- reading -------------------------------------------------------------------------------

    @property
    def first_seq(self) -> int:
        """Sequence number of the oldest retained entry (== next_seq when empty)."""
        return self._start

    @property
    def next_seq(self) -> int:
        return self._next

    @property
    def last_seq(self) -> int:
        """Sequence number of the newest entry ever appended (0 before the first)."""
        return self._next - 1

    @property
    def appended(self) -> int:
        return self._next - 1

    @property
    def retained(self) -> int:
        return self._next - self._start

    def __len__(self) -> int:
        return self._next - self._start

    def __iter__(self) -> Iterator[Entry]:
        """Oldest first, retained entries only."""
        return iter(self.read_after(0)[1])

    def newest(self) -> Entry | None:
        """The newest retained entry (a look, not a read: it moves no one's place)."""
        return None if self._next == self._start else self._buf[(self._next - 1) % self.capacity]

    def read_after(self, seq: int, limit: int | None = None) -> tuple[int, list[Entry]]:
        """Entries with sequence number > seq, oldest first, at most `limit` of them.

        Returns (missed, entries): `missed` counts the entries after `seq` that are no longer
        retained (overwritten or cleared before this reader got to them).
        """
        first = seq + 1
        missed = 0
        if first < self._start:
            missed = self._start - first
            first = self._start
        end = self._next
        if limit is not None and end - first > limit:
            end = first + limit
        n = end - first
        if n <= 0:
            return missed, []
        buf, cap = self._buf, self.capacity
        lo = first % cap
        if lo + n <= cap:
            entries = buf[lo : lo + n]
        else:
            entries = buf[lo:] + buf[: lo + n - cap]
        return missed, entries  # type: ignore[return-value]  # window slots are never None


class Cursor:
    """One consumer's place in a ring: every entry after `last` is still to be taken.

    Invariant: each entry with a sequence number up to `last` was either handed to this
    consumer by `take()` or counted in the missed count `take()` returned (and in `missed`).
    """

    __slots__ = ("last", "missed", "ring")

    def __init__(self, ring: DebugRing, last: int | None = None) -> None:
        self.ring = ring
        # From now on, unless told where to start (0: every entry the ring still holds).
        self.last = ring.last_seq if last is None else last
        self.missed = 0

    def take(self, limit: int | None = None) -> tuple[int, list[Entry]]:
        """(missed, entries): how many entries after `last` are gone, and those still there
        (oldest first, at most `limit`); `last` moves past both."""
        missed, entries = self.ring.read_after(self.last, limit)
        self.last += missed + len(entries)
        self.missed += missed
        return missed, entries

    @property
    def pending(self) -> int:
        """Entries after `last` the ring still holds: what `take()` would hand back."""
        return self.ring.last_seq - max(self.last, self.ring.first_seq - 1)

    @property
    def overtaken(self) -> int:
        """Entries after `last` the ring no longer holds: what `take()` would count missed."""
        return max(0, self.ring.first_seq - 1 - self.last)
