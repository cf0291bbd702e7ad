"""Byte streams over the ring, one per open file handle. No FUSE here: fs.py adapts these.

Theory of operation: a reader's view must be a stable byte stream, so a `LogStream` takes the
entries the ring retains when it is opened, then keeps pulling entries appended after the last one
it took (`sync`). Pulled entries are held by reference, so the ring overwriting them later changes
nothing for this reader; entries overwritten *before* this reader pulled them turn into one
"N entries missed" line at that point of its stream. Entries are rendered to bytes lazily, in
order, only as far as a read or a size query needs: offsets already handed out never change.

`size()` is what this reader can read right now, which is what GNU tail -f needs from st_size:
it grows by exactly the bytes appended after what was already there.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable

from nvmefs.ring import DebugRing, Entry

LineFn = Callable[[Entry], bytes]
MissedFn = Callable[[int, int, int], str]


class LineCache:
    """Rendered bytes per entry, shared by every reader of one view.

    Sequence numbers are never reused, so an entry's bytes stay right until the way entries
    are shown changes (format, clock): then `clear()`. The oldest are evicted past `limit`.
    """

    __slots__ = ("_lines", "_render", "limit")

    def __init__(self, render: Callable[[Entry], str], limit: int) -> None:
        self._render = render
        # OrderedDict: popping the oldest is O(1); `del d[next(iter(d))]` on a dict is not.
        self._lines: OrderedDict[int, bytes] = OrderedDict()
        self.limit = limit

    def __call__(self, entry: Entry) -> bytes:
        line = self._lines.get(entry[0])
        if line is None:
            line = self._lines[entry[0]] = self._render(entry).encode()
            if len(self._lines) > self.limit:
                self._lines.popitem(last=False)
        return line

    def clear(self) -> None:
        self._lines.clear()


class _Missed:
    __slots__ = ("count", "mono_ns", "wall_ns")

    def __init__(self, count: int) -> None:
        self.count = count
        self.mono_ns = time.monotonic_ns()
        self.wall_ns = time.time_ns()


class LogStream:
    __slots__ = ("_last", "_line", "_missed", "_pending", "_ring", "_text", "read_end")

    def __init__(self, ring: DebugRing, line: LineFn, missed: MissedFn) -> None:
        self._ring = ring
        self._line = line
        self._missed = missed
        _, entries = ring.read_after(0)
        self._pending: deque[Entry | _Missed] = deque(entries)
        self._last = ring.last_seq
        self._text = bytearray()
        self.read_end = 0  # where the last read ended: poll() readiness is "more than this"

    def sync(self) -> None:
        """Take every entry appended since the last sync (or a missed line for lost ones)."""
        ring = self._ring
        if ring.last_seq == self._last:
            return
        missed, entries = ring.read_after(self._last)
        if missed:
            self._pending.append(_Missed(missed))
        self._pending.extend(entries)
        self._last = ring.last_seq

    def _render_until(self, end: int | None) -> None:
        text, pending = self._text, self._pending
        while pending and (end is None or len(text) < end):
            item = pending.popleft()
            if isinstance(item, _Missed):
                text += self._missed(item.count, item.mono_ns, item.wall_ns).encode()
            else:
                text += self._line(item)

    def size(self) -> int:
        self.sync()
        self._render_until(None)
        return len(self._text)

    def read(self, off: int, size: int) -> bytes:
        self.sync()
        self._render_until(off + size)
        data = bytes(self._text[off : off + size])
        self.read_end = off + len(data)
        return data

    @property
    def has_unread(self) -> bool:
        return self.size() > self.read_end


class StaticStream:
    """A snapshot taken at open (the stats file)."""

    __slots__ = ("_data", "read_end")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.read_end = 0

    def sync(self) -> None:
        pass

    def size(self) -> int:
        return len(self._data)

    def read(self, off: int, size: int) -> bytes:
        data = self._data[off : off + size]
        self.read_end = off + len(data)
        return data

    @property
    def has_unread(self) -> bool:
        return len(self._data) > self.read_end


Stream = LogStream | StaticStream
