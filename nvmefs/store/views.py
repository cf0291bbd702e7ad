"""Byte streams over the ring, one per open file handle. No FUSE here: nvmefs/fs adapts these.

Theory of operation. A `LogStream` is one reader's stable byte stream: the entries the ring held
when it was opened, then every entry appended after, each rendered once and in order, with one
"N entries missed" line wherever entries this stream had not taken yet were overwritten or
cleared first. Bytes are only ever appended to a stream, so an offset handed out keeps its meaning.

Bounded memory per handle. A stream copies no entries: it takes them from the ring only when a
read or a size query needs their bytes, so an idle handle holds nothing, and whatever the ring
overwrites before the reader gets there becomes a missed line instead of daemon memory. The
rendered bytes a stream keeps are at most `limit` entries' worth (the ring's capacity; a missed
line counts as one entry), ahead of the reader and behind it together:
  - it renders ahead of the reader only within that budget (the rest waits in the ring, or is
    missed);
  - the rule for what a reader may still ask for: bytes from the offset of its last read on are
    never dropped; bytes before it are kept only while they fit in the budget and are the first
    to go. So sequential readers (cat, tail, dd) lose nothing, and a reader that steps back a
    little (tail's backward scan for the last lines, less, pread) still gets its bytes.
A read at an offset whose bytes were dropped raises `Dropped` (the filesystem answers it with an
error); it never returns other bytes in their place.

Bounded memory per group of handles. A ring's worth per handle is still a ring's worth times the
handles a user can open: each stream may also be charged to a `Budget` (fs/handles.py gives each
user but root one, nested in one for all of them), which counts the bytes its streams keep. While a
budget on a stream's chain is spent the stream renders nothing more: it first lets go of its own
bytes behind its last read, and what still does not fit waits in the ring (and becomes a missed
line if the ring overwrites it first), exactly as entries past the stream's own limit do. A
stream's bytes go back to its budget when they are dropped or when the stream is closed.

Horizon. A reader must reach an end even while entries arrive faster than it reads (`cat` during
an error storm). Reads render no entry past the stream's horizon, at open the newest entry the ring
held. A read that finds nothing more up to the horizon returns b"" (EOF), and the read after it
sets a new horizon: the newest entry the ring holds by then. So `cat` ends at its first EOF, and a
follower (`tail -f`, `less +F`, a loop that sleeps and reads again) goes on, seeing on each read
after an EOF whatever arrived meanwhile. `size()` takes everything appended so far (within the
budget) and moves the horizon with it, so whatever size a reader is told, it can read.

Shared rendering. Rendering is what costs (microseconds a line), so it is shared by every reader of
a view: sequence numbers are never reused and an entry's bytes depend only on the entry, so the
bytes of each aligned run of `per_chunk` entries (seq k*per_chunk+1 .. (k+1)*per_chunk) are
rendered once (`Rendered`), and a stream's pieces are references to those bytes rather than copies.
Entries outside a whole chunk (the live tail, the edges of a gap) go through a per-line cache, and
the run of them a step joins is cached too (the last RUN_LIMIT runs), so handles opened on the same
ring share those bytes as well. The caches are bounded: chunks by what a ring of the view's
capacity can span, lines and runs by a count.
"""

from __future__ import annotations

import bisect
import time
from collections import OrderedDict
from collections.abc import Callable

from nvmefs.store.ring import Cursor, DebugRing, Entry

MissedFn = Callable[[int, int, int], str]
CHUNK = 256
# Runs of single lines (less than a whole chunk) kept per view, so that handles opened on the same
# ring share the bytes at its unaligned ends instead of each joining a copy: a few suffice, as the
# handles of one moment all see the same ends.
RUN_LIMIT = 8
# Dropped pieces leave a hole at the front of a stream's lists; compact once it is this long and
# at least half of them, so dropping stays O(1) amortized and bisect stays on a short list.
COMPACT_AT = 64


class Dropped(LookupError):
    """A read at an offset whose bytes the stream no longer keeps (see the module docstring)."""


class Budget:
    """A bound on a sum that a group may hold (bytes kept by streams, or open handles), nested in
    the budget of a larger group: whatever is charged here is charged to every budget above.

    Invariant: `used` is what was charged and not yet given back, to this budget and the budgets
    nested in it. Nothing checks on charging: a holder asks `spent()` before it takes more, so
    `used` passes `limit` by at most the one step taken while it was still below.
    """

    __slots__ = ("limit", "parent", "used")

    def __init__(self, limit: int, parent: Budget | None = None) -> None:
        self.limit = limit
        self.parent = parent
        self.used = 0

    def spent(self) -> Budget | None:
        """The outermost budget on the chain from here up that is used up, or None."""
        found = None
        b: Budget | None = self
        while b is not None:
            if b.used >= b.limit:
                found = b
            b = b.parent
        return found

    def charge(self, n: int) -> None:
        """Add `n` (negative: give back) here and to every budget above."""
        b: Budget | None = self
        while b is not None:
            b.used += n
            b = b.parent


class LineCache:
    """Rendered bytes per entry, shared by every reader of one view.

    Invariant: the bytes kept for a sequence number are that entry's rendering under the current
    way of showing entries; `clear()` when that changes (format, clock). At most `limit` lines
    are kept, the oldest evicted first.
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
    """One view's rendering (text or JSON lines) with its shared caches: whole chunks, single
    lines for entries outside a whole chunk, and the runs of such lines a stream last joined.

    Invariant: a cached chunk k holds the bytes of entries k*per_chunk+1 .. (k+1)*per_chunk and a
    cached run (after, n) those of entries after+1 .. after+n, under the current way of showing
    entries; at most `chunk_limit` chunks (enough to span a ring of `capacity` entries) and
    RUN_LIMIT runs are kept, the oldest evicted first.
    """

    __slots__ = ("_chunks", "_render", "_runs", "chunk_limit", "line", "per_chunk")

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
        self._runs: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        # Enough for every chunk a ring of `capacity` entries spans: older ones are unreachable
        # for new readers, and a reader that still needs them renders them again.
        self.chunk_limit = capacity // per_chunk + 2

    def cached(self, k: int) -> bytes | None:
        """The bytes of chunk k if they are cached."""
        return self._chunks.get(k)

    def chunk(self, k: int, entries: list[Entry]) -> bytes:
        """The bytes of chunk k, whose entries are `entries` (exactly per_chunk of them)."""
        data = self._chunks.get(k)
        if data is None:
            data = self._chunks[k] = "".join(map(self._render, entries)).encode()
            if len(self._chunks) > self.chunk_limit:
                self._chunks.popitem(last=False)
        return data

    def run(self, after: int, entries: list[Entry]) -> bytes:
        """The bytes of the entries after+1 .. after+len(entries), which are `entries`."""
        key = (after, len(entries))
        data = self._runs.get(key)
        if data is None:
            data = self._runs[key] = b"".join(map(self.line, entries))
            if len(self._runs) > RUN_LIMIT:
                self._runs.popitem(last=False)
        return data

    def clear(self) -> None:
        self.line.clear()
        self._chunks.clear()
        self._runs.clear()


class LogStream:
    """One reader's byte stream over the ring (see the module docstring).

    Invariants: bytes are only appended (`size()` never decreases and an offset's bytes never
    change); the kept pieces cover [`low`, `rendered_size`) and hold at most `limit` entries'
    worth (a missed line counts as one); pieces from the last read's offset on are never
    dropped; every entry after the stream's start is rendered once or counted in a missed line;
    once bound to a budget, the bytes it keeps (`rendered_size - low`) are charged to it, and no
    step is taken while that budget, or one above it, is spent.
    """

    __slots__ = (
        "_base",
        "_budget",
        "_counts",
        "_cursor",
        "_ends",
        "_held",
        "_horizon",
        "_keep",
        "_low",
        "_missed",
        "_pieces",
        "_rendered",
        "_ring",
        "_size",
        "limit",
        "read_end",
    )

    def __init__(
        self, ring: DebugRing, rendered: Rendered, missed: MissedFn, limit: int | None = None
    ) -> None:
        self._ring = ring
        self._rendered = rendered
        self._missed = missed
        self.limit = max(1, ring.capacity if limit is None else limit)
        # The stream's place in the ring (the last entry taken): from the oldest retained on.
        self._cursor = Cursor(ring, ring.first_seq - 1)
        self._horizon = ring.last_seq  # -1: set at the next read (the last one was an EOF)
        # The kept pieces are _pieces[_base:]; _ends[i] is the offset where piece i ends and
        # _counts[i] the entries it holds. Dropped pieces are b"" until compaction.
        self._pieces: list[bytes] = []
        self._ends: list[int] = []
        self._counts: list[int] = []
        self._base = 0
        self._low = 0  # where the first kept piece starts: bytes before it were dropped
        self._held = 0  # entries (missed lines count one) in the kept pieces
        self._size = 0
        self._keep = 0  # the offset of the last read: nothing from here on is dropped
        self.read_end = 0  # where the last read ended: poll() readiness is "more than this"
        self._budget: Budget | None = None

    def bind(self, budget: Budget) -> None:
        """Charge what this stream keeps, from now on, to `budget` (see the module docstring)."""
        if self._budget is not None:
            self._budget.charge(self._low - self._size)
        self._budget = budget
        budget.charge(self._size - self._low)

    def close(self) -> int:
        """Let go of every kept byte and give it back to the budget; how many bytes that was.
        The stream is not read again after this."""
        kept = self._size - self._low
        if self._budget is not None:
            self._budget.charge(-kept)
            self._budget = None
        self._pieces, self._ends, self._counts = [], [], []
        self._base = 0
        self._low = self._size
        self._held = 0
        return kept

    # -- taking entries from the ring -----------------------------------------------------------

    def _add(self, piece: bytes, count: int) -> None:
        if self._budget is not None:
            self._budget.charge(len(piece))
        self._size += len(piece)
        self._pieces.append(piece)
        self._ends.append(self._size)
        self._counts.append(count)
        self._held += count

    def _room(self, want: int) -> int:
        """Free room for `want` more entries by dropping pieces wholly behind the last read: the
        entries it may take now (0 when its budget is spent even after dropping them)."""
        budget = self._budget
        if self._held + want > self.limit or (budget is not None and budget.spent()):
            pieces, ends, counts = self._pieces, self._ends, self._counts
            base, n = self._base, len(pieces)
            low = self._low
            while (
                base < n
                and ends[base] <= self._keep
                and (self._held + want > self.limit or (budget is not None and budget.spent()))
            ):
                self._held -= counts[base]
                if budget is not None:
                    budget.charge(low - ends[base])
                low = ends[base]
                pieces[base] = b""
                base += 1
            self._low = low
            if base >= COMPACT_AT and base * 2 >= n:
                del pieces[:base], ends[:base], counts[:base]
                base = 0
            self._base = base
            if budget is not None and budget.spent():
                return 0
        return self.limit - self._held

    def _step(self, horizon: int) -> bool:
        """Render one more step of entries up to `horizon`: a shared chunk or a run of lines up
        to the next chunk boundary, after a missed line if entries were lost first. False when
        there is nothing to render or no budget left."""
        ring, rendered = self._ring, self._rendered
        per = rendered.per_chunk
        room = self._room(per)
        if room <= 0:
            return False
        last = self._cursor.last
        if last >= horizon:
            return False
        first = ring.first_seq
        end = min(horizon, ring.last_seq)
        if first > last + 1:  # overwritten or cleared before this stream took them
            # Only those up to the horizon: the rest are counted after the next EOF, or a
            # reader slower than the ring would get a new missed line on every read, never EOF.
            upto = min(first - 1, horizon)
            lost = upto - last
            self._cursor.last = last = upto
            self._add(self._missed(lost, time.monotonic_ns(), time.time_ns()).encode(), 1)
            room -= 1
            # Go on with the entries after the gap in the same step: a reader slower than the
            # ring would otherwise get a fresh missed line on every read and never an entry.
            if end <= last or room <= 0:
                return True
        elif end <= last:
            return False
        k, into = divmod(last, per)
        if into == 0 and end - last >= per and room >= per:  # a whole chunk: shared bytes
            data = rendered.cached(k)
            if data is None:
                data = rendered.chunk(k, self._take(per))
            else:
                self._cursor.last = last + per  # the shared bytes stand for these entries
            self._add(data, per)
            return True
        n = min(end - last, per - into, room)
        self._add(rendered.run(last, self._take(n)), n)
        return True

    def _take(self, n: int) -> list[Entry]:
        """The next `n` entries from the cursor: all still in the ring (a gap was made a missed
        line before, in the same step)."""
        missed, entries = self._cursor.take(n)
        assert missed == 0 and len(entries) == n
        return entries

    # -- what readers see -----------------------------------------------------------------------

    @property
    def rendered_size(self) -> int:
        """The stream's size so far, without taking anything new from the ring."""
        return self._size

    @property
    def held(self) -> int:
        """Entries (a missed line counts one) in the pieces this stream keeps."""
        return self._held

    @property
    def low(self) -> int:
        """The lowest offset this stream can still read."""
        return self._low

    def size(self) -> int:
        """Take what the ring has appended (within the budget): what this reader can read now."""
        self._horizon = horizon = self._ring.last_seq
        step = self._step
        while step(horizon):
            pass
        return self._size

    def read(self, off: int, size: int, horizon: int = 0) -> bytes:
        """The stream's bytes at [off, off + size), rendering no entry past the stream's horizon
        or `horizon`, whichever is later; b"" at the end (see the module docstring)."""
        if off < self._low:
            raise Dropped(f"offset {off} is before {self._low}, the oldest byte still kept")
        self._keep = off
        stop = off + size
        if stop > self._size:
            if self._horizon < 0:  # the first read after an EOF
                self._horizon = self._ring.last_seq
            horizon = max(self._horizon, horizon)
            step = self._step
            while self._size < stop and step(horizon):
                pass
            if off >= self._size:
                # EOF at the horizon; the next read may go as far as the ring has got by then.
                self._horizon = -1
                self.read_end = max(self.read_end, off)
                return b""
            stop = min(stop, self._size)
        pieces, ends = self._pieces, self._ends
        i = bisect.bisect_right(ends, off, self._base)
        piece, end = pieces[i], ends[i]
        start = end - len(piece)
        self.read_end = stop
        if stop <= end:  # the common case: one piece
            return piece if off == start and stop == end else piece[off - start : stop - start]
        parts = [piece[off - start :]]
        pos = end
        while pos < stop:
            i += 1
            piece, end = pieces[i], ends[i]
            parts.append(piece if stop >= end else piece[: stop - pos])
            pos = end
        return b"".join(parts)

    @property
    def has_unread(self) -> bool:
        """Whether a read at `read_end` would return bytes (or a missed line) right now."""
        ring = self._ring
        return self._size > self.read_end or ring.last_seq > self._cursor.last


class StaticStream:
    """A snapshot taken at open (stats, nvmefs.prom). Invariant: its bytes never change; once
    bound to a budget, their length is charged to it until the stream is closed."""

    __slots__ = ("_budget", "_data", "read_end")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.read_end = 0
        self._budget: Budget | None = None

    @property
    def data(self) -> bytes:
        """The snapshot's bytes (shared, never copied: bytes do not change)."""
        return self._data

    def bind(self, budget: Budget) -> None:
        """Charge the snapshot's bytes to `budget` until the stream is closed."""
        if self._budget is not None:
            self._budget.charge(-len(self._data))
        self._budget = budget
        budget.charge(len(self._data))

    def close(self) -> int:
        """Give the snapshot's bytes back to its budget and let go of them; their count."""
        kept = len(self._data)
        if self._budget is not None:
            self._budget.charge(-kept)
            self._budget = None
        self._data = b""
        return kept

    @property
    def rendered_size(self) -> int:
        return len(self._data)

    def size(self) -> int:
        return len(self._data)

    def read(self, off: int, size: int, horizon: int = 0) -> bytes:
        data = self._data[off : off + size]
        self.read_end = off + len(data)
        return data

    @property
    def has_unread(self) -> bool:
        return len(self._data) > self.read_end


Stream = LogStream | StaticStream
