"""The file behind an error: an entry with a namespace LBA waits here, a bounded while, for what
owns that LBA (nvmefs.linux.locate: the file and byte range, metadata, free space), and enters
the ring with it.

Theory of operation
- `append` takes what a source appends to the ring (the kernel source's entries and notes). An
  NVMe entry naming a disk and an LBA is held and its LBA queued for a lookup; anything else goes
  to the ring at once when nothing is held, and behind what is held otherwise: the ring gets the
  source's entries in the order the source made them, each timed when it was made.
- One task (`run`) looks LBAs up, one at a time, in a worker thread: a lookup is bounded by
  LOOKUP_S (nvmefs.linux.locate stops its tools and its walk by then) and its answer is cached
  for CACHE_S (a file may be moved or removed), CACHE_SIZE answers at most. At most
  LOOKUPS_PER_S lookups start a second: in a storm of distinct LBAs the others are not looked up
  and their entries go on as unresolved, saying so (counted), so the recorder's cost stays bounded
  whatever the rate of errors; at most a second's worth of lookups wait at once (lookups slower
  than the rate do not pile up). A lookup that fails in any way answers "unresolved" and why.
  The lookups share the disks' layouts and the mount table (locate.Layouts): an LBA whose
  answer needs no filesystem (an unmounted partition, a disk with none: a storm's usual case)
  is answered from them in `append`, with no lookup and no wait (`known`).
- An entry waits `wait_s` at most (the option locate_wait); then it goes to the ring with an
  "unresolved" place that says so (counted as late); a lookup still under way fills the cache
  for the next error there. An entry whose LBA is over the rate says that. At most HELD_MAX
  entries wait: past that the oldest goes at once. `flush` sends everything held (at the end of
  the source).
- Nothing here blocks: `append` is O(1), and neither it nor the completion path ever waits for a
  lookup; the task is the only one that does.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import trio

from nvmefs.errors import UsageError
from nvmefs.linux import locate
from nvmefs.store.events import OWNERS, NvmeEvent, Place
from nvmefs.store.ring import DebugRing

# How long an entry waits for its LBA's owner before it goes to the ring without (locate_wait).
WAIT_S = 2.0
# How long one lookup may take (the tools' timeouts, the walk's deadline), or locate_wait if
# that is longer.
LOOKUP_S = 10.0
# The most lookups started in a second.
LOOKUPS_PER_S = 20
# Answers kept, and for how long.
CACHE_SIZE = 1024
CACHE_S = 60.0
# The most entries waiting at once.
HELD_MAX = 4096

log = logging.getLogger(__name__)

UNRESOLVED = OWNERS[-1]
Key = tuple[str, int]  # (disk, LBA)
Lookup = Callable[[str, int, float], Place]


def locate_owner(
    disk: str, lba: int, timeout: float, layouts: locate.Layouts | None = None
) -> Place:
    """What owns `lba` of /dev/`disk` (blocking: for a worker thread), with the disks' layouts
    and the mount table from `layouts` when given."""
    try:
        return locate.locate(f"/dev/{disk}", lba, timeout=timeout, layouts=layouts).place()
    except UsageError as e:  # an LBA beyond the disk, a disk gone
        return Place("unresolved", reason=str(e))
    except OSError as e:
        return Place("unresolved", reason=f"/dev/{disk}: {e.strerror or e}")


@dataclass(slots=True)
class Held:
    """An entry waiting: the event, its times, until when it waits, the LBA it waits for."""

    event: Any
    mono_ns: int
    wall_ns: int
    until: float
    key: Key | None


class Placer:
    """The front of a ring for one source: entries with an LBA get their owner on the way.

    Invariant: every event given to `append` reaches the ring exactly once, in the order given,
    with the times it was given; `held` is oldest first and holds at most HELD_MAX; a held
    entry with a key whose answer is cached is released with it by the next `_release`."""

    def __init__(
        self,
        ring: DebugRing,
        lookup: Lookup | None = None,
        *,
        wait_s: float = WAIT_S,
        lookups_per_s: int = LOOKUPS_PER_S,
    ) -> None:
        self.ring = ring
        # By default the lookups of one Placer share the disks' layouts and the mount table:
        # in a storm they are of one disk, many a second.
        self._layouts = locate.Layouts() if lookup is None else None
        self._lookup: Lookup = lookup or functools.partial(locate_owner, layouts=self._layouts)
        self.wait_s = wait_s
        self.lookups_per_s = lookups_per_s
        self.held: collections.deque[Held] = collections.deque()
        self._queue: collections.deque[Key] = collections.deque()  # keys to look up, in order
        self._queued: set[Key] = set()
        self._cache: collections.OrderedDict[Key, tuple[float, Place]] = collections.OrderedDict()
        self._wake = trio.Event()  # something was held or looked up
        self._lookup_wake = trio.Event()  # something was queued
        self._window = (0.0, 0)  # (second it started, lookups started in it)
        self.lookups = 0  # lookups done
        self.known = 0  # LBAs answered from what the lookups keep, with no lookup
        self.placed = 0  # entries that went to the ring with their LBA's owner found
        self.late = 0  # entries that waited wait_s (or were pushed out) and went unresolved
        self.skipped = 0  # LBAs not looked up: over lookups_per_s, or a second's worth queued
        self.lookup_ms_last = 0  # how long the last lookup took, and the longest one
        self.lookup_ms_max = 0

    # -- the source's side ---------------------------------------------------------------------

    def append(self, event: Any, mono_ns: int | None = None, wall_ns: int | None = None) -> None:
        """Take an entry as DebugRing.append does (timed now unless times are given)."""
        if mono_ns is None or wall_ns is None:
            mono_ns, wall_ns = time.monotonic_ns(), time.time_ns()
        key = self._key(event)
        if key is not None:
            place = self._cached(key) or self._known(key)
            if place is None and not self._start_lookup(key):
                place = Place(UNRESOLVED, reason=f"not looked up: over {self.lookups_per_s}/s")
            if place is not None:
                key, event = None, replace(event, place=place)
        h = Held(event, mono_ns, wall_ns, time.monotonic() + self.wait_s, key)
        if key is None and not self.held:
            self._send(h)
            return
        self.held.append(h)
        if len(self.held) > HELD_MAX:
            self._send(self.held.popleft())
        self._wake.set()

    def flush(self) -> None:
        """Send everything held to the ring now, with what is known (the source is ending)."""
        while self.held:
            self._send(self.held.popleft())
        if self._layouts is not None:  # its mount table's descriptor (opened again if needed)
            self._layouts.table.close()

    @property
    def lookups_queued(self) -> int:
        """LBAs waiting for their lookup to start (at most a second's worth)."""
        return len(self._queue)

    def status(self) -> list[tuple[str, object]]:
        """The lines of `stats` about lookups."""
        return [
            ("locate_lookups", self.lookups),
            ("locate_known", self.known),
            ("locate_placed", self.placed),
            ("locate_late", self.late),
            ("locate_skipped", self.skipped),
            ("locate_waiting", len(self.held)),
            ("locate_lookup_ms_last", self.lookup_ms_last),
            ("locate_lookup_ms_max", self.lookup_ms_max),
        ]

    # -- the task ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Look the queued LBAs up and send held entries on as they may go, until cancelled
        (then everything held is sent: `flush`)."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._look_up)
                await self._send_on()
        finally:
            self.flush()

    async def _look_up(self) -> None:
        # One lookup at a time: a slow one delays the next lookups, never an entry (_send_on
        # sends it on at its deadline meanwhile).
        while True:
            while not self._queue:
                await self._lookup_wake.wait()
                self._lookup_wake = trio.Event()
            key = self._queue.popleft()
            start = time.monotonic()
            try:
                place = await trio.to_thread.run_sync(
                    self._guarded, key, max(LOOKUP_S, self.wait_s), abandon_on_cancel=True
                )
            finally:
                self._queued.discard(key)
            self.lookups += 1
            self.lookup_ms_last = round((time.monotonic() - start) * 1000)
            self.lookup_ms_max = max(self.lookup_ms_max, self.lookup_ms_last)
            self._remember(key, place)
            self._wake.set()

    def _guarded(self, key: Key, timeout: float) -> Place:
        """The lookup of `key` (in the worker thread); whatever goes wrong in it is the answer,
        unresolved, never the end of the source."""
        try:
            return self._lookup(key[0], key[1], timeout)
        except Exception as e:  # a bug, or the system changing under the lookup: reported
            log.warning("looking up %s LBA %d failed", key[0], key[1], exc_info=True)
            return Place(UNRESOLVED, reason=f"the lookup failed ({type(e).__name__}: {e})")

    async def _send_on(self) -> None:
        while True:
            self._release()
            until = self.held[0].until if self.held else math.inf
            with trio.move_on_at(trio.current_time() + max(until - time.monotonic(), 0.0)):
                await self._wake.wait()
            self._wake = trio.Event()

    # -- inside --------------------------------------------------------------------------------

    @staticmethod
    def _key(event: Any) -> Key | None:
        if (
            isinstance(event, NvmeEvent)
            and event.disk is not None
            and event.slba is not None
            and event.place is None
            and event.origin is None
            and not event.replayed
        ):
            return (event.disk, event.slba)
        return None

    def _cached(self, key: Key) -> Place | None:
        hit = self._cache.get(key)
        if hit is None:
            return None
        if time.monotonic() - hit[0] > max(CACHE_S, 2 * self.wait_s):  # kept for its waiters
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return hit[1]

    def _known(self, key: Key) -> Place | None:
        """The answer what the lookups keep gives at once, with no filesystem to ask (an
        unmounted partition, a disk without a filesystem: a storm's usual case); None when a
        lookup must tell (or this Placer was given its own lookup)."""
        if self._layouts is None:
            return None
        place = self._layouts.known(f"/dev/{key[0]}", key[1])
        if place is not None:
            self.known += 1
        return place

    def _remember(self, key: Key, place: Place) -> None:
        self._cache[key] = (time.monotonic(), place)
        self._cache.move_to_end(key)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)

    def _start_lookup(self, key: Key) -> bool:
        """Queue a lookup of `key` (once); False if the rate allows none now, or a second's
        worth wait already (lookups slower than the rate: the queue stays bounded)."""
        if key in self._queued:
            return True
        if len(self._queue) >= self.lookups_per_s:
            self.skipped += 1
            return False
        now = time.monotonic()
        second, n = self._window
        if now - second >= 1.0:
            second, n = now, 0
        if n >= self.lookups_per_s:
            self.skipped += 1
            return False
        self._window = (second, n + 1)
        self._queue.append(key)
        self._queued.add(key)
        self._lookup_wake.set()
        return True

    def _release(self) -> None:
        """Send the held entries from the oldest on that may go: no lookup to wait for, its
        answer known, or waited long enough."""
        now = time.monotonic()
        while self.held:
            h = self.held[0]
            if h.key is not None and h.key not in self._cache and now < h.until:
                return
            self._send(self.held.popleft())

    def _send(self, h: Held) -> None:
        event = h.event
        if h.key is not None:
            place = self._cached(h.key)
            if place is None:  # the lookup goes on, for the next error there
                self.late += 1
                place = Place(UNRESOLVED, reason=f"the lookup took over {self.wait_s:g} s")
            event = replace(event, place=place)
        place = event.place if isinstance(event, NvmeEvent) else None
        if place is not None and place.owner != UNRESOLVED:
            self.placed += 1
        self.ring.append(event, h.mono_ns, h.wall_ns)
