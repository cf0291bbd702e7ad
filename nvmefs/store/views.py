"""Byte streams over the ring, one per open file handle. No FUSE here: fs.py adapts these.

Theory of operation: a reader's view must be a stable byte stream, so a `LogStream` takes the
entries the ring retains when it is opened, then keeps pulling entries appended after the last one
it took (`sync`). Pulled entries are held by reference, so the ring overwriting them later changes
nothing for this reader; entries overwritten *before* this reader pulled them turn into one
"N entries missed" line at that point of its stream. Entries are rendered to bytes lazily, in
order, only as far as a read or a size query needs: offsets already handed out never change.

Rendering is what costs (microseconds a line), so it is shared: sequence numbers are never
reused and an entry's bytes depend only on the entry, so the bytes of each aligned run of
`per_chunk` entries (seq k*per_chunk+1 .. (k+1)*per_chunk) are rendered once for every reader of
a view, and a stream is a list of references to such pieces rather than a copy of the text.
Entries outside a whole chunk (the live tail, the edges of a gap) go through a per-line cache.

`size()` is what this reader can read right now, which is what GNU tail -f needs from st_size:
it grows by exactly the bytes appended after what was already there.
"""

from __future__ import annotations

import bisect
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from nvmefs.store.ring import DebugRing, Entry

MissedFn = Callable[[int, int, int], str]
CHUNK = 256


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


class Rendered:
    """One view's rendering (text or JSON lines) with its shared caches: whole chunks, and
    single lines for entries outside a whole chunk."""

    __slots__ = ("_chunks", "_render", "chunk_limit", "line", "per_chunk")

    def __init__(
        self,
        render: Callable[[Entry], str],
        capacity: int,
        line_limit: int,
        per_chunk: int = CHUNK,
    ) -> None:
        self._render = render
        self.per_chunk = per_chunk
        self.line = LineCache(render, line_limit)
        self._chunks: OrderedDict[int, bytes] = OrderedDict()
        # Enough for every chunk a ring of `capacity` entries spans: older ones are unreachable
        # for new readers, and a reader still holding them renders them again.
        self.chunk_limit = capacity // per_chunk + 2

    def chunk(self, k: int, run: list[Entry], start: int) -> bytes:
        """The bytes of chunk k, whose entries are run[start : start + per_chunk]."""
        data = self._chunks.get(k)
        if data is None:
            entries = run[start : start + self.per_chunk]
            data = self._chunks[k] = "".join(map(self._render, entries)).encode()
            if len(self._chunks) > self.chunk_limit:
                self._chunks.popitem(last=False)
        return data

    def clear(self) -> None:
        self.line.clear()
        self._chunks.clear()


class _Missed:
    __slots__ = ("count", "mono_ns", "wall_ns")

    def __init__(self, count: int) -> None:
        self.count = count
        self.mono_ns = time.monotonic_ns()
        self.wall_ns = time.time_ns()


class LogStream:
    """One reader's stable byte stream over the ring (see the module docstring): offsets
    already handed out never change meaning."""

    __slots__ = (
        "_ends",
        "_last",
        "_missed",
        "_pending",
        "_pieces",
        "_pos",
        "_rendered",
        "_ring",
        "_size",
        "read_end",
    )

    def __init__(self, ring: DebugRing, rendered: Rendered, missed: MissedFn) -> None:
        self._ring = ring
        self._rendered = rendered
        self._missed = missed
        # What is still to render: runs of consecutive entries (as the ring handed them out)
        # and missed markers; `_pos` is how far into the first run rendering got.
        self._pending: deque[list[Entry] | _Missed] = deque()
        self._pos = 0
        self._last = 0
        self._pieces: list[bytes] = []  # the stream so far, in order
        self._ends: list[int] = []  # offset where each piece ends
        self._size = 0
        self.read_end = 0  # where the last read ended: poll() readiness is "more than this"
        _, entries = ring.read_after(0)
        if entries:
            self._pending.append(entries)
        self._last = ring.last_seq

    def sync(self) -> None:
        """Take every entry appended since the last sync (or a missed line for lost ones)."""
        ring = self._ring
        if ring.last_seq == self._last:
            return
        missed, entries = ring.read_after(self._last)
        if missed:
            self._pending.append(_Missed(missed))
        if entries:
            self._pending.append(entries)
        self._last = ring.last_seq

    def _add(self, piece: bytes) -> None:
        if piece:
            self._size += len(piece)
            self._pieces.append(piece)
            self._ends.append(self._size)

    def _render_until(self, end: int | None) -> None:
        pending, rendered = self._pending, self._rendered
        n = rendered.per_chunk
        while pending and (end is None or self._size < end):
            run = pending[0]
            if isinstance(run, _Missed):
                pending.popleft()
                self._add(self._missed(run.count, run.mono_ns, run.wall_ns).encode())
                continue
            i = self._pos
            k, into = divmod(run[i][0] - 1, n)
            if into == 0 and i + n <= len(run):  # a whole chunk: shared bytes
                self._add(rendered.chunk(k, run, i))
                j = i + n
            else:  # up to the next chunk boundary, one line at a time
                j = min(len(run), i + n - into)
                self._add(b"".join(map(rendered.line, run[i:j])))
            if j == len(run):
                pending.popleft()
                j = 0
            self._pos = j

    def size(self) -> int:
        self.sync()
        self._render_until(None)
        return self._size

    def read(self, off: int, size: int) -> bytes:
        self.sync()
        stop = off + size
        self._render_until(stop)
        stop = min(stop, self._size)
        parts = []
        i = bisect.bisect_right(self._ends, off)
        pos = off
        while pos < stop:
            piece, end = self._pieces[i], self._ends[i]
            start = end - len(piece)
            parts.append(piece[pos - start : stop - start] if pos > start or stop < end else piece)
            pos = end
            i += 1
        self.read_end = max(off, stop)
        return b"".join(parts)

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
