"""Per-handle streams and the shared rendered-line cache, without FUSE."""

from __future__ import annotations

import tracemalloc

import hypothesis.strategies as st
from hypothesis import given, settings

from nvmefs.nvme.status import Translator
from nvmefs.recorder import ControlError, Recorder
from nvmefs.store.events import HostEvent, NvmeEvent
from nvmefs.store.render import Clock, Renderer
from nvmefs.store.ring import DebugRing, Entry
from nvmefs.store.views import Dropped, LineCache, LogStream, Rendered


def recorder(capacity: int = 8) -> Recorder:
    return Recorder(DebugRing(capacity), Renderer(Clock("jiffies", 1000)))


def test_line_cache_renders_once_and_evicts_the_oldest() -> None:
    calls: list[int] = []

    def render(e: Entry) -> str:
        calls.append(e[0])
        return f"line {e[0]}\n"

    cache = LineCache(render, limit=2)
    for seq in (1, 2, 1, 3, 1):
        assert cache((seq, 0, 0, None)) == f"line {seq}\n".encode()
    assert calls == [1, 2, 3, 1]  # 1 rendered again only after eviction


def test_format_change_applies_to_new_lines_and_keeps_old_streams_stable() -> None:
    r = recorder()
    r.ring.append(NvmeEvent(Translator().decode(0x281), "sim0", 1, 1, 1, 2, False, 0, 1, 0))
    before = r.text_stream()
    first = before.read(0, 10_000)
    r.control("format=seed")
    assert before.read(0, 10_000) == first  # a stream never changes bytes it handed out
    after = r.text_stream().read(0, 10_000)
    assert after.endswith(b"] Specific NVMe error encountered: Status = 0x281\n")
    assert first != after
    try:
        r.control("format=fancy")
    except ControlError:
        pass
    else:
        raise AssertionError("bad format accepted")


def drain(stream: LogStream, seen: bytes, chunk: int) -> bytes:
    """Read on from len(seen) as tail -f does: past an EOF (the horizon moves), until a second
    EOF in a row says nothing more is there."""
    eofs = 0
    while eofs < 2:
        data = stream.read(len(seen), chunk)
        eofs = 0 if data else eofs + 1
        seen += data
    return seen


@settings(max_examples=100, deadline=None)
@given(
    ops=st.lists(st.one_of(st.integers(1, 30), st.just("clear"), st.just("read")), max_size=40),
    chunk=st.integers(1, 500),
)
def test_a_stream_is_append_only_and_accounts_for_every_entry(
    ops: list[object], chunk: int
) -> None:
    r = recorder(capacity=8)
    n = 0
    stream = r.text_stream()
    seen = b""
    for op in ops:
        if op == "clear":
            r.control("clear")
        elif op == "read":
            seen = drain(stream, seen, chunk)
        else:
            for _ in range(op):  # type: ignore[call-overload]
                n += 1
                r.ring.append(HostEvent("notice", f"event {n}"))
    seen = drain(stream, seen, chunk)
    lines = seen.decode().splitlines()
    got = [int(x.rsplit(" ", 1)[1]) for x in lines if "event" in x]
    notices = [x for x in lines if "notice: cleared" in x]
    missed = sum(int(x.split("nvmefs: ")[1].split()[0]) for x in lines if "missed" in x)
    assert got == sorted(got) and len(set(got)) == len(got)
    # Every entry (the test's and each clear's notice) shown once or counted missed, never both.
    assert len(got) + len(notices) + missed == r.ring.appended
    assert stream.size() == len(seen)


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("append"), st.integers(1, 12)),
            st.tuples(st.just("clear"), st.just(0)),
            st.tuples(st.just("open"), st.just(0)),
            st.tuples(st.just("read"), st.integers(0, 10_000)),
            st.tuples(st.just("back"), st.integers(0, 10_000)),
        ),
        max_size=40,
    ),
    per_chunk=st.integers(1, 5),
    capacity=st.integers(1, 16),
)
def test_chunked_streams_read_the_same_at_any_offset_and_render_each_entry_at_most_twice(
    ops: list[tuple[str, int]], per_chunk: int, capacity: int
) -> None:
    """Streams built from shared chunks and single lines must read back as the plain
    line-by-line text, wherever reads start and end (or refuse an offset they dropped, never
    answer other bytes), while other streams share the pieces."""
    ring = DebugRing(capacity)
    renders: dict[int, int] = {}

    def render(e: Entry) -> str:
        seq = e[0]
        renders[seq] = renders.get(seq, 0) + 1
        return f"entry {seq} " + "x" * (seq % 7) + "\n"

    rendered = Rendered(render, capacity, line_limit=10_000, per_chunk=per_chunk)
    rendered.chunk_limit = 10_000  # keep everything: any second render is a sharing bug

    def missed(n: int, _m: int, _w: int) -> str:
        return f"missed {n}\n"

    streams: list[tuple[LogStream, bytearray]] = [(LogStream(ring, rendered, missed), bytearray())]
    n = 0
    for op, arg in ops:
        if op == "append":
            for _ in range(arg):
                n += 1
                ring.append(HostEvent("notice", str(n)))
        elif op == "clear":
            ring.clear()
        elif op == "open":
            streams.append((LogStream(ring, rendered, missed), bytearray()))
        elif op == "read":  # a read at the next offset of one stream, as a reader would
            stream, seen = streams[arg % len(streams)]
            seen += stream.read(len(seen), 1 + arg % 97)
        else:  # a step back into what it has read: the same bytes, or refused if dropped
            stream, seen = streams[arg % len(streams)]
            off = arg % (len(seen) + 1)
            try:
                data = stream.read(off, 1 + arg % 31)
            except Dropped:
                assert off < stream.low
            else:
                known = bytes(seen[off:])  # the bytes past `seen` are new to this check
                assert data[: len(known)] == known[: len(data)]
                assert data or off == len(seen)
    for i, (stream, seen) in enumerate(streams):
        before = bytes(seen)
        full = drain(stream, before, 1 << 30)
        assert full.startswith(before)  # what was handed out never changed
        assert len(full) == stream.size()
        assert stream.held <= stream.limit
        for off in range(0, len(full), 5):  # every offset still kept reads the same bytes
            if off < stream.low:
                try:
                    stream.read(off, 11)
                except Dropped:
                    continue
                raise AssertionError("a dropped offset was answered")
            assert stream.read(off, 11) == full[off : off + 11]
        seqs, lost = [], 0
        for line in full.decode().splitlines():
            kind, value = line.split()[:2]
            if kind == "entry":
                seqs.append(int(value))
            else:
                lost += int(value)
        assert seqs == sorted(set(seqs))
        if i == 0:  # open before anything was appended: every entry shown or counted missed
            assert lost + len(seqs) == n
    assert all(count <= 2 for count in renders.values())


def test_streams_opened_on_the_same_ring_share_its_bytes_rather_than_copy_them() -> None:
    """Issue 18: a thousand handles each read and stat()ed kept a ring's worth apiece. On the
    same ring they share the rendered bytes: whole chunks, and the runs of lines at its ends."""
    r = recorder(capacity=1024)
    for i in range(1000):  # three whole chunks, then a run of 232 lines: not aligned
        r.ring.append(HostEvent("notice", f"event {i} " + "x" * 100))
    worth = r.text_stream().size()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        streams = [r.text_stream() for _ in range(200)]
        assert all(s.size() == worth for s in streams)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < len(streams) * worth / 20, (grown, worth)
