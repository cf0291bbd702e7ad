"""Folding (issue 20): in a storm, like failures over the rate fold into one entry with an exact
count; nothing is dropped, nothing counted twice, order is kept, and every source gets it."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
import trio

from nvmefs import options, sources, workloads
from nvmefs.engine.base import SourceBase
from nvmefs.engine.sink import FOLD_BURST, FOLD_NS, FOLD_RATE, Folder, Sink, Stats
from nvmefs.nvme.policy import LogPolicy
from nvmefs.nvme.status import Translator
from nvmefs.recorder import Recorder
from nvmefs.sim import faults
from nvmefs.sim.controller import SimController
from nvmefs.store import events
from nvmefs.store.events import HostEvent, NvmeEvent
from nvmefs.store.render import Renderer
from nvmefs.store.ring import EVENT, MONO_NS, DebugRing
from nvmefs.store.summary import summarize

TABLE = Translator().table
T0 = 10**12  # a monotonic time, ns
STEP_AT_RATE = 1_000_000_000 // FOLD_RATE  # the time between failures at exactly the rate


def ev(slba: int | None = 0, word: int = 0x281, **kw: Any) -> NvmeEvent:
    """A read of 8 blocks at `slba` that failed with `word` on sim0's namespace 1."""
    fields: dict[str, Any] = {
        "ctrl": "sim0",
        "nsid": 1,
        "qid": 1,
        "cid": 7,
        "opcode": 0x02,
        "slba": slba,
        "nlb": None if slba is None else 8,
        "retries": 0,
    }
    fields.update(kw)
    return NvmeEvent(TABLE[word], **fields)


class Out:
    """A Folder's `send`: what it sent, with the times given."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, int | None, int | None]] = []

    def __call__(self, event: Any, mono_ns: int | None, wall_ns: int | None) -> None:
        self.sent.append((event, mono_ns, wall_ns))

    @property
    def events(self) -> list[Any]:
        return [e for e, _, _ in self.sent]


def folder(rate: float = FOLD_RATE, burst: int = FOLD_BURST) -> tuple[Folder, Out, Stats]:
    out, stats = Out(), Stats()
    return Folder(out, stats, rate, burst), out, stats


def drain_bucket(f: Folder, now: int = T0) -> None:
    """Use up the bucket's burst at `now` (each failure going on unfolded)."""
    for i in range(int(f.burst)):
        f.add(ev(100_000 + i), now)


# -- the rule ------------------------------------------------------------------------------------


def test_under_the_rate_and_within_a_burst_nothing_folds() -> None:
    f, out, stats = folder()
    # A burst of FOLD_BURST at one instant, then a long run at exactly the rate.
    for i in range(FOLD_BURST):
        f.add(ev(i), T0)
    now = T0
    for i in range(5 * FOLD_RATE):
        now += STEP_AT_RATE + 1
        f.add(ev(i), now)
    f.close()
    assert len(out.sent) == FOLD_BURST + 5 * FOLD_RATE
    assert all(e.repeats == 0 and e.lba_range is None for e in out.events)
    assert all(m is None and w is None for _, m, w in out.sent)  # timed by the ring, as ever
    assert stats.folded == 0 and f.pending == 0


def test_over_the_rate_like_failures_fold_into_one_entry_with_their_exact_count_and_range() -> None:
    f, out, stats = folder()
    drain_bucket(f)
    first = ev(5000, cid=3, qid=2, retries=1)
    f.add(first, T0)  # over the bound: opens a fold, held
    assert len(out.sent) == FOLD_BURST and f.pending == 1 and f.deadline == T0 + FOLD_NS
    # Like ones differ only in LBA, blocks, cid, qid and retries.
    f.add(ev(4096, nlb=16, cid=9, qid=1, retries=0), T0 + 1)
    f.add(ev(7000, nlb=1, cid=4, qid=3, retries=5), T0 + 2)
    f.add(ev(None, nlb=None), T0 + 3)  # no LBA: counted, the range unchanged
    assert len(out.sent) == FOLD_BURST and f.pending == 4
    f.close()
    fold, mono, wall = out.sent[-1]
    assert fold is first  # the first event itself: its own slba, cid, qid, retries
    assert (fold.slba, fold.cid, fold.qid, fold.retries) == (5000, 3, 2, 1)
    assert fold.repeats == 3 and fold.lba_range == (4096, 7000)
    # Timed when it opened, as the ring times an entry (the ring's own clocks).
    assert mono is not None and abs(mono - time.monotonic_ns()) < 10**9
    assert wall is not None and abs(wall - time.time_ns()) < 10**9
    assert stats.folded == 3 and f.pending == 0 and f.deadline is None


@pytest.mark.parametrize(
    "unlike",
    [
        {"word": 0x4281},  # another status word (DNR set)
        {"word": 0x287},
        {"opcode": 0x01},
        {"admin": True},
        {"ctrl": "sim1"},
        {"nsid": 2},
        {"disk": "nvme0n1"},
        {"op": "write"},
        {"origin": events.KMSG},
        {"replayed": True},
    ],
)
def test_an_unlike_entry_ends_the_fold_which_goes_first(unlike: dict[str, Any]) -> None:
    f, out, _ = folder()
    drain_bucket(f)
    a = ev(0)
    f.add(a, T0)
    f.add(ev(8), T0)
    b = ev(16, **unlike)
    f.add(b, T0)
    f.close()
    assert out.events[FOLD_BURST:] == [a, b]
    assert (a.repeats, a.lba_range) == (1, (0, 15))
    assert (b.repeats, b.lba_range) == (0, None)


def test_successes_fold_over_a_bucket_of_their_own_and_end_a_fold_of_failures() -> None:
    f, out, stats = folder()
    drain_bucket(f)  # the failures' bucket only
    f.add(ev(0), T0)  # a failure over the rate: a fold opens
    ok = [ev(8 * i, word=0) for i in range(3000)]  # log=all: a stream of successes
    for e in ok:
        f.add(e, T0)
    # The first success ends the failures' fold (which goes first); the successes' own bucket,
    # a second's worth deep (no burst: how I/O starts is no episode), sends that many of them
    # unfolded; the rest fold into one entry with their exact count.
    assert out.events[FOLD_BURST].repeats == 0 and out.events[FOLD_BURST].status.code
    assert out.events[FOLD_BURST + 1 :] == ok[:FOLD_RATE]
    assert f.pending == 3000 - FOLD_RATE and f.first is ok[FOLD_RATE]
    f.close()
    assert out.events[-1] is ok[FOLD_RATE] and ok[FOLD_RATE].repeats == 3000 - FOLD_RATE - 1
    assert stats.folded == 3000 - FOLD_RATE - 1
    # A second later the successes' bucket holds a second's worth again, and no more.
    for e in [ev(8 * i, word=0) for i in range(3000)]:
        f.add(e, T0 + 10 * FOLD_NS)
    f.close()
    assert len(out.events) == FOLD_BURST + 1 + FOLD_RATE + 1 + FOLD_RATE + 1
    # A failure now: its bucket refilled for the time since (none), successes took nothing of it.
    f2, out2, _ = folder()
    for e in [ev(8 * i, word=0) for i in range(3000)]:
        f2.add(e, T0)
    f2.close()
    f2.add(ev(0), T0)
    assert out2.events[-1].status.code and out2.events[-1].repeats == 0 and f2.pending == 0


def test_a_source_counts_like_events_into_the_open_fold_by_the_many() -> None:
    """add_many: what a source counted itself (the kernel source's trace consumer) joins the
    fold whose first event it saw open, with its LBAs; into no other fold."""
    f, out, stats = folder()
    drain_bucket(f)
    first = ev(800)
    f.add(first, T0)
    assert f.add_many(first, 40, 16, 1 << 64) and f.add_many(first, 2, None, None)
    assert not f.add_many(ev(800), 5, 0, 0)  # not the open fold's first event: nothing counted
    f.add(ev(808), T0)
    f.close()
    assert out.events[-1] is first and first.repeats == 43 and stats.folded == 43
    assert first.lba_range == (16, 1 << 64)
    assert not f.add_many(first, 1, None, None)  # its fold went on: nothing counted


def test_the_time_bound_sends_the_fold_on_and_the_refilled_bucket_logs_again() -> None:
    f, out, _ = folder()
    drain_bucket(f)
    f.add(ev(0), T0)
    f.add(ev(8), T0 + FOLD_NS - 1)  # still within the second: folded
    f.tick(T0 + FOLD_NS - 1)
    assert f.pending == 2 and len(out.sent) == FOLD_BURST
    f.tick(T0 + FOLD_NS)  # the source's timer, at the deadline
    assert f.pending == 0 and out.events[-1].repeats == 1
    # A second's worth of tokens came meanwhile: the next FOLD_RATE go on unfolded.
    now = T0 + FOLD_NS
    for i in range(FOLD_RATE):
        f.add(ev(i), now)
    assert len(out.sent) == FOLD_BURST + 1 + FOLD_RATE and f.pending == 0
    f.add(ev(0), now)
    assert f.pending == 1


def test_a_like_entry_past_the_deadline_closes_the_fold_itself() -> None:
    f, out, _ = folder()
    drain_bucket(f)
    f.add(ev(0), T0)
    f.add(ev(8), T0 + 1)
    late = ev(16)
    f.add(late, T0 + FOLD_NS)  # no timer ran: the next entry sends the fold on
    assert out.events[FOLD_BURST].repeats == 1
    assert out.events[-1] is late and late.repeats == 0  # a second's tokens: unfolded


def test_fold_0_never_folds() -> None:
    f, out, stats = folder(rate=0)
    for i in range(10 * FOLD_BURST):
        f.add(ev(i), T0)
    assert len(out.sent) == 10 * FOLD_BURST and f.pending == 0 and stats.folded == 0


def test_a_negative_rate_is_refused() -> None:
    with pytest.raises(ValueError):
        Folder(Out(), Stats(), -1)


def test_every_logged_request_is_in_exactly_one_entry_in_order_over_random_storms() -> None:
    """The accounting invariant: sum(1 + repeats) over the entries sent == the requests
    logged, exactly; the entries are the requests in the order given (a fold where its first
    one was), and each entry stands for exactly the requests from it to the next entry."""
    statuses = [0x281, 0x281, 0x281, 0x4281, 0x287, 0]
    for seed in range(300):
        rnd = random.Random(seed)
        rate = rnd.choice([0, 1, 50, 200])
        f, out, stats = folder(rate=rate, burst=rnd.choice([1, 5, 50]))
        given: list[NvmeEvent] = []
        now = T0
        for _ in range(rnd.randrange(1, 600)):
            now += rnd.choice([0, 0, 1000, 10**6, 10**8, FOLD_NS // 3, 2 * FOLD_NS])
            r = rnd.random()
            if r < 0.02:
                f.close()  # a host event (Sink.append) or a clear
                continue
            if r < 0.04:
                f.tick(now)
                continue
            e = ev(
                rnd.choice([None, *range(0, 1 << 20, 4096)]),
                word=rnd.choice(statuses),
                nsid=rnd.choice([1, 1, 1, 2]),
                nlb=rnd.randrange(1, 257),
                cid=rnd.randrange(1 << 16),
            )
            if e.slba is None:
                e.nlb = None
            given.append(e)
            f.add(e, now)
        f.close()
        sent = out.events
        assert sum(1 + e.repeats for e in sent) == len(given), seed
        assert stats.folded == sum(e.repeats for e in sent), seed
        # The entries sent are some of the requests, in order; the rest were counted into
        # the entry before them, whose range covers theirs and which they are like.
        where = {id(e): i for i, e in enumerate(given)}
        at = [where[id(e)] for e in sent]
        assert at == sorted(at) and at[0] == 0, seed
        for k, e in enumerate(sent):
            end = at[k + 1] if k + 1 < len(at) else len(given)
            members = given[at[k] : end]
            assert e.repeats == len(members) - 1, seed
            lbas = [(m.slba, m.slba + (m.nlb or 1) - 1) for m in members if m.slba is not None]
            if e.repeats and lbas:
                assert e.lba_range == (min(a for a, _ in lbas), max(b for _, b in lbas)), seed
            else:
                assert e.lba_range is None, seed
            assert all(m.status is e.status and m.nsid == e.nsid for m in members), seed
        # Times given to the ring never go backwards (a fold carries its first one's).
        times = [m for _, m, _ in out.sent if m is not None]
        assert times == sorted(times), seed
        if rate == 0:
            assert stats.folded == 0


# -- the sink -----------------------------------------------------------------------------------


def sink(capacity: int = 1 << 14, fold: float = FOLD_RATE) -> Sink:
    return Sink(DebugRing(capacity), Translator(), LogPolicy("errors"), fold=fold)


def nvme_entries(ring: DebugRing) -> list[NvmeEvent]:
    return [e[EVENT] for e in ring if isinstance(e[EVENT], NvmeEvent)]


def test_a_host_event_ends_the_fold_and_follows_it_in_the_ring() -> None:
    s = sink()
    for i in range(FOLD_BURST + 50):
        s.log(ev(8 * i))
    assert s.stats.logged == FOLD_BURST + 50
    pending = s.folder.pending
    assert pending >= 40  # a few tokens came while logging: at most those went on
    s.append(HostEvent(events.NOTICE, "a host event"))
    entries = [e[EVENT] for e in s.ring]
    assert isinstance(entries[-1], HostEvent)
    fold = entries[-2]
    assert isinstance(fold, NvmeEvent) and fold.repeats == pending - 1
    assert sum(1 + e.repeats for e in nvme_entries(s.ring)) == s.stats.logged
    assert s.stats.folded == pending - 1 and s.folder.pending == 0


def test_a_fold_goes_through_front_with_the_time_it_opened() -> None:
    s = sink()
    got: list[tuple[Any, int | None, int | None]] = []

    class Front:
        def append(
            self, event: Any, mono_ns: int | None = None, wall_ns: int | None = None
        ) -> object:
            got.append((event, mono_ns, wall_ns))
            return None

    s.front = Front()
    for i in range(FOLD_BURST + 10):
        s.log(ev(8 * i))
    opened = s.folder.mono_ns
    s.flush()
    event, mono, wall = got[-1]
    assert event.repeats > 0 and mono == opened and wall is not None
    assert not list(s.ring)  # everything went to the front


def test_stats_folded_is_a_counter_of_stats_and_of_the_metrics() -> None:
    from nvmefs.engine.sink import COUNTERS

    spec = {c.field: c for c in COUNTERS}["folded"]
    assert spec.metric == "nvmefs_folded_total"


# -- the sources --------------------------------------------------------------------------------


async def test_the_fold_timer_sends_an_idle_storms_last_fold_within_its_bound() -> None:
    ring = DebugRing(1 << 14)
    source = SourceBase(ring)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(source.fold_timer)
        await trio.sleep(0)
        for i in range(FOLD_BURST + 100):
            source.sink.log(ev(8 * i))
        assert source.sink.folder.pending > 0  # then the storm stops
        t0 = time.monotonic()
        with trio.fail_after(5):
            while source.sink.folder.pending:
                await trio.sleep(0.01)
        took = time.monotonic() - t0
        nursery.cancel_scope.cancel()
    assert took < FOLD_NS / 1e9 + 0.5
    assert nvme_entries(ring)[-1].repeats > 0
    assert sum(1 + e.repeats for e in nvme_entries(ring)) == source.stats.logged
    assert source.sink.folder.on_open is None  # the timer let go of the folder


async def test_a_storm_of_the_simulated_controller_is_counted_exactly_folded_or_not() -> None:
    """End to end through the one sink: the sim source built from options, every read failing
    (DNR: no retries) as fast as the engine goes, for more than a fold's time bound."""
    opts = options.parse(
        ["sim_size=16M", "log=errors", "retries=0", "qd=32", "capacity=65536"], allow_fuse=False
    )
    src = sources.open_source("sim", opts)
    assert src.sim is not None and src.opts["fold"] == FOLD_RATE
    # Every read fails: a drive dying, one 0x4281 after another at LBAs of their own.
    src.sim = SimController(
        size=16 << 20,
        faults=faults.parse('[[fault]]\nopcode = "read"\nstatus = 0x4281\n', "<test>"),
    )
    ring = DebugRing(src.opts["capacity"])
    engine = sources.build_engine(src, src.opts, ring)
    progress = workloads.Progress()
    async with engine.running():
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.5 * FOLD_NS / 1e9:
            await workloads.randread(engine, progress, bs=512, qd=32, count=2000, seed=1)
        # The storm stops: its last fold reaches the ring by the timer, within the bound.
        with trio.fail_after(5):
            while engine.sink.folder.pending:
                await trio.sleep(0.02)
        elapsed = time.monotonic() - t0
        text = Recorder(ring, Renderer(), engine=engine).stats_text()
    st = engine.stats
    entries = nvme_entries(ring)
    assert ring.dropped == 0
    assert st.folded > 0 and any(e.repeats for e in entries)
    # Every failed request is counted once: in stats, in nvmefs_errors_total's counter, and
    # in the ring as 1 + repeats of exactly one entry.
    assert st.logged == progress.failed == sum(st.failed.values())
    assert sum(1 + e.repeats for e in entries) == st.logged
    assert st.folded == sum(e.repeats for e in entries)
    # What the entries cost is bounded by the rate, whatever the storm's: the bucket's, and
    # one fold per time bound (every failure here is like the others).
    assert len(entries) <= FOLD_BURST + FOLD_RATE * elapsed + elapsed / (FOLD_NS / 1e9) + 1
    print(f"{st.logged} failed reads in {elapsed:.2f} s: {len(entries)} entries")
    assert f"\nfolded {st.folded}\n" in text and "\nfolding 0\n" in text
    # The entries' JSON records and the report's summary count the same.
    renderer = Renderer()
    records = [renderer.record(e) for e in ring if isinstance(e[EVENT], NvmeEvent)]
    assert sum(1 + r["repeats"] for r in records) == st.logged
    assert summarize(records).errors == st.logged
    folds = [e for e in entries if e.repeats]
    assert all(
        e.lba_range is not None and e.lba_range[0] <= e.slba <= e.lba_range[1] for e in folds
    )
    times = [e[MONO_NS] for e in ring]
    assert times == sorted(times)  # a fold carries its first request's time, in order


async def test_the_kernel_source_logs_through_the_same_folder() -> None:
    """Sink.log (the kernel source's path) folds as complete() does; the engine stopping
    flushes what is open."""
    from nvmefs.engine.kernel import KernelEngine, KernelSpec

    ring = DebugRing(1 << 14)
    e = KernelEngine(KernelSpec("kernel"), ring)
    for i in range(FOLD_BURST + 20):
        e.sink.log(ev(8 * i, ctrl="nvme0", disk="nvme0n1", op="read", opcode=None))
    assert e.sink.folder.pending > 0
    e.sink.flush()
    assert sum(1 + x.repeats for x in nvme_entries(ring)) == e.stats.logged == FOLD_BURST + 20
