"""A reader's stream is bounded in memory and in length, whatever the append rate (issue 12)."""

from __future__ import annotations

import re

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from nvmefs.recorder import CONTROL_MAX, ControlError, Recorder
from nvmefs.store.events import HostEvent
from nvmefs.store.render import Clock, Renderer
from nvmefs.store.ring import DebugRing, Entry
from nvmefs.store.views import Budget, Dropped, LogStream, Rendered

MISSED = re.compile(r"^missed (\d+)$")


def render(e: Entry) -> str:
    seq = e[0]
    return f"entry {seq} " + "x" * (seq % 5) + "\n"


def missed(n: int, _m: int, _w: int) -> str:
    return f"missed {n}\n"


def setup(capacity: int, per_chunk: int = 4) -> tuple[DebugRing, Rendered]:
    ring = DebugRing(capacity)
    return ring, Rendered(render, capacity, line_limit=capacity, per_chunk=per_chunk)


def append(ring: DebugRing, n: int) -> None:
    for _ in range(n):
        ring.append(HostEvent("notice", "x"))


def parse(data: bytes) -> tuple[list[int], int, int]:
    """(sequence numbers shown, entries counted missed, missed lines) of a stream's bytes."""
    seqs, lost, lines = [], 0, 0
    for line in data.decode().splitlines():
        m = MISSED.match(line)
        if m:
            lost += int(m.group(1))
            lines += 1
        else:
            seqs.append(int(line.split()[1]))
    return seqs, lost, lines


def test_an_idle_handle_holds_nothing_and_what_the_ring_overwrote_is_a_missed_line() -> None:
    ring, rendered = setup(8)
    append(ring, 8)
    stream = LogStream(ring, rendered, missed)
    append(ring, 1000)
    assert stream.held == 0 and stream.rendered_size == 0
    first = stream.read(0, 1 << 20)
    assert parse(first) == ([], 8, 1)  # what the ring held at open went before the first read
    assert stream.read(len(first), 1 << 20) == b""  # and that was the end of it
    more = b""
    while data := stream.read(len(first) + len(more), 1 << 20):  # a follower reads on
        more += data
    assert parse(more) == (list(range(1001, 1009)), 992, 1)


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("append"), st.integers(1, 200)),
            st.tuples(st.just("read"), st.integers(1, 300)),
            st.tuples(st.just("size"), st.just(0)),
            st.tuples(st.just("clear"), st.just(0)),
        ),
        max_size=60,
    ),
    capacity=st.integers(1, 40),
    per_chunk=st.integers(1, 8),
)
def test_a_reader_holds_at_most_a_capacity_of_entries_and_loses_none_silently(
    ops: list[tuple[str, int]], capacity: int, per_chunk: int
) -> None:
    ring, rendered = setup(capacity, per_chunk)
    stream = LogStream(ring, rendered, missed)
    longest = len(render((10_000, 0, 0, None)))
    seen = b""
    for op, arg in ops:
        if op == "append":
            append(ring, arg)
        elif op == "read":
            seen += stream.read(len(seen), arg)
        elif op == "size":
            assert stream.size() >= len(seen)
        else:
            ring.clear()
        # The bound: entries (missed lines count one) in what the stream keeps, its bytes.
        assert stream.held <= capacity
        assert stream.rendered_size - stream.low <= capacity * max(longest, 20)
        assert stream.low <= len(seen) <= stream.rendered_size
    while data := stream.read(len(seen), 1000):
        seen += data
    while data := stream.read(len(seen), 1000):
        seen += data
    seqs, lost, _ = parse(seen)
    assert seqs == sorted(set(seqs))
    assert len(seqs) + lost == ring.appended  # each shown once or counted, never both


def test_cat_ends_at_the_horizon_while_entries_arrive_faster_than_it_reads() -> None:
    ring, rendered = setup(64)
    append(ring, 64)
    stream = LogStream(ring, rendered, missed)
    out = b""
    reads = 0
    while data := stream.read(len(out), 100):
        out += data
        append(ring, 50)  # a storm: half a ring per read
        reads += 1
        assert reads < 200, "cat never reached its end"
    seqs, _, lines = parse(out)
    assert len(seqs) <= 64 and seqs == sorted(set(seqs)) and seqs[-1] <= 64 + 50 * reads
    assert lines >= 1  # it fell behind and says so


def test_the_read_after_an_eof_goes_on_to_what_arrived_meanwhile() -> None:
    ring, rendered = setup(16)
    append(ring, 3)
    stream = LogStream(ring, rendered, missed)
    first = stream.read(0, 1 << 20)
    assert stream.read(len(first), 1 << 20) == b""  # EOF at the horizon
    append(ring, 2)
    more = stream.read(len(first), 1 << 20)
    assert parse(more)[0] == [4, 5]
    assert stream.read(len(first) + len(more), 1 << 20) == b""
    assert stream.read(len(first) + len(more), 1 << 20) == b""  # nothing new: EOF again


@settings(max_examples=100, deadline=None)
@given(bursts=st.lists(st.integers(0, 120), min_size=1, max_size=30), capacity=st.integers(1, 50))
def test_size_grows_by_exactly_what_a_tail_f_then_reads(bursts: list[int], capacity: int) -> None:
    """GNU tail -f: fstat, read st_size - shown bytes at its offset, repeat. The size never goes
    below what was shown, and what it reads is one gap-accounted run with no repeats."""
    ring, rendered = setup(capacity)
    append(ring, capacity)
    stream = LogStream(ring, rendered, missed)
    shown = b""
    for burst in bursts:
        size = stream.size()
        assert size >= len(shown), "file truncated"
        want = size - len(shown)
        while want:
            data = stream.read(len(shown), want)
            if not data:
                break
            shown += data
            want -= len(data)
        assert want == 0  # what st_size promised can be read
        append(ring, burst)
    seqs, lost, _ = parse(shown)
    assert seqs == sorted(set(seqs))
    assert seqs[-1] + lost >= len(seqs)


def test_bytes_behind_the_reader_are_kept_while_they_fit_then_refused_not_replaced() -> None:
    ring, rendered = setup(8, per_chunk=2)
    append(ring, 8)
    stream = LogStream(ring, rendered, missed)
    whole = stream.read(0, 1 << 20)
    # A fresh handle keeps a ring's worth: backward reads (tail, less, pread) still work.
    assert stream.read(0, 10) == whole[:10] and stream.read(5, 7) == whole[5:12]
    pos = len(whole)
    for _ in range(4):
        append(ring, 8)
        while data := stream.read(pos, 9):
            pos += len(data)
    assert stream.low > 0 and stream.held <= 8
    with pytest.raises(Dropped):
        stream.read(0, 10)
    tail = stream.read(stream.low, 1 << 20)  # from the oldest kept byte on: still readable
    assert tail and pos == stream.low + len(tail)


def test_a_long_follow_drops_pieces_by_the_thousand_and_still_refuses_the_start() -> None:
    ring, rendered = setup(8, per_chunk=1)  # one piece per entry: the piece lists compact often
    append(ring, 8)
    stream = LogStream(ring, rendered, missed)
    seen = b""
    low = 0
    for _ in range(500):
        append(ring, 3)
        while data := stream.read(len(seen), 7):
            seen += data
            assert stream.low >= low  # what was dropped stays dropped
            low = stream.low
            if low:
                with pytest.raises(Dropped):
                    stream.read(low - 1, 1)
    assert stream.held <= 8 and stream.low > len(seen) // 2
    for off in (0, 1, stream.low - 1):
        with pytest.raises(Dropped):
            stream.read(off, 3)
    assert stream.read(stream.low, 1 << 20) == seen[stream.low :]
    seqs, lost, _ = parse(seen)
    # 1..3 went before the first read; after that, the reader kept up.
    assert seqs == list(range(4, ring.appended + 1)) and lost == 3


def test_shared_chunk_cache_keeps_at_most_a_ring_of_chunks() -> None:
    ring, rendered = setup(8, per_chunk=2)
    assert rendered.chunk_limit == 8 // 2 + 2
    stream = LogStream(ring, rendered, missed)
    pos = 0
    for _ in range(50):
        append(ring, 8)
        while data := stream.read(pos, 1 << 20):
            pos += len(data)
    top = (ring.last_seq - 1) // 2
    kept = [k for k in range(top + 1) if rendered.cached(k) is not None]
    assert 0 < len(kept) <= rendered.chunk_limit and kept[-1] >= top - rendered.chunk_limit


def test_poll_readiness_is_new_entries_or_unread_bytes() -> None:
    ring, rendered = setup(8)
    append(ring, 2)
    stream = LogStream(ring, rendered, missed)
    assert stream.has_unread
    data = stream.read(0, 1 << 20)
    assert stream.read(len(data), 10) == b"" and not stream.has_unread
    append(ring, 1)
    assert stream.has_unread


def recorder() -> Recorder:
    return Recorder(DebugRing(8), Renderer(Clock("jiffies", 1000)))


def test_clear_leaves_a_notice_a_follower_sees() -> None:
    r = recorder()
    for i in range(3):
        r.ring.append(HostEvent("notice", f"event {i}"))
    stream = r.text_stream()
    seen = stream.read(0, 1 << 20)
    assert stream.read(len(seen), 1 << 20) == b""
    r.control("clear")
    assert stream.has_unread
    more = stream.read(len(seen), 1 << 20).decode()
    assert re.fullmatch(r"\[\d+\] nvmefs notice: cleared 3 entries\n", more)
    assert r.ring.cleared == 3 and len(r.ring) == 1


def test_a_control_write_over_the_limit_is_refused_whole() -> None:
    r = recorder()
    with pytest.raises(ControlError):
        r.control("format=seed clear" + " " * CONTROL_MAX)
    assert r.renderer.fmt == "full" and r.ring.cleared == 0
    r.control("format=seed".ljust(CONTROL_MAX))  # exactly the limit applies
    assert r.renderer.fmt == "seed"


# -- budgets: what a group of streams (one user's handles) keeps together (issue 18) ------------


def test_a_budget_counts_up_its_chain_and_names_the_outermost_spent() -> None:
    top = Budget(10)
    mid = Budget(6, top)
    low = Budget(4, mid)
    other = Budget(100, top)
    low.charge(3)
    assert (low.used, mid.used, top.used) == (3, 3, 3) and low.spent() is None
    low.charge(1)
    assert low.spent() is low
    other.charge(6)
    assert low.spent() is top and other.spent() is top  # the shared bound, not their own
    low.charge(-4)
    other.charge(-6)
    assert (low.used, mid.used, top.used, other.used) == (0, 0, 0, 0) and top.spent() is None


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("append"), st.integers(1, 60)),
            st.tuples(st.just("open"), st.just(0)),
            st.tuples(st.just("read"), st.integers(0, 10_000)),
            st.tuples(st.just("size"), st.integers(0, 10_000)),
            st.tuples(st.just("close"), st.integers(0, 10_000)),
        ),
        max_size=60,
    ),
    capacity=st.integers(1, 30),
    per_chunk=st.integers(1, 6),
    limit=st.integers(1, 600),
)
def test_streams_sharing_a_budget_keep_within_it_and_still_lose_no_entry_silently(
    ops: list[tuple[str, int]], capacity: int, per_chunk: int, limit: int
) -> None:
    ring, rendered = setup(capacity, per_chunk)
    budget = Budget(limit)
    longest = len(render((10_000, 0, 0, None)))
    step = max(longest * per_chunk, 20) + 20  # one step: a missed line and a chunk or a run

    def opened() -> tuple[LogStream, bytearray]:
        s = LogStream(ring, rendered, missed)
        s.bind(budget)
        return s, bytearray()

    first = opened()  # opened before any entry: it must account for all of them
    open_ = [first]
    for op, arg in ops:
        if op == "append":
            append(ring, arg)
        elif op == "open":
            open_.append(opened())
        else:
            stream, seen = open_[arg % len(open_)]
            if op == "read":
                seen += stream.read(len(seen), 1 + arg % 300)
            elif op == "size":
                assert stream.size() >= len(seen)
            elif stream is not first[0]:
                open_.remove((stream, seen))
                assert stream.close() >= 0
        kept = sum(s.rendered_size - s.low for s, _ in open_)
        assert budget.used == kept  # every kept byte is charged, and only those
        assert budget.used <= limit + step
    for stream, _ in open_[1:]:
        stream.close()
    # Once the others are gone the first reads on: every entry shown or counted missed.
    stream, seen = first
    data = bytes(seen)
    eofs = 0
    while eofs < 2:
        more = stream.read(len(data), 1000)
        eofs = 0 if more else eofs + 1
        data += more
    seqs, lost, _ = parse(data)
    assert seqs == sorted(set(seqs)) and len(seqs) + lost == ring.appended
    stream.close()
    assert budget.used == 0


def test_a_spent_budget_holds_a_reader_back_and_what_it_missed_is_counted() -> None:
    ring, rendered = setup(8, per_chunk=2)
    append(ring, 8)
    budget = Budget(1)  # one byte: spent by the first step
    hog = LogStream(ring, rendered, missed)
    hog.bind(budget)
    assert hog.size() > 0 and budget.spent() is budget
    reader = LogStream(ring, rendered, missed)
    reader.bind(budget)
    assert reader.size() == 0 and reader.read(0, 1 << 20) == b""  # held back, not memory
    append(ring, 20)  # the ring moves on meanwhile
    hog.close()
    budget.limit = 1 << 20
    data = b""
    while more := reader.read(len(data), 1 << 20):
        data += more
    seqs, lost, _ = parse(data)
    assert lost > 0 and len(seqs) + lost == ring.appended  # each shown or counted missed
    assert budget.used == reader.rendered_size - reader.low
