"""The kernel source's logic without a kernel: pairing, entries, policy, specs, refusals, and
the same entries and counters whichever trace consumer reads the pages.

The tests that run the compiled consumer fail when it was not built (the test setup builds it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from nvmefs.engine import kernel
from nvmefs.engine.kernel import KernelEngine, KernelSpec, operation
from nvmefs.engine.owners import Placer
from nvmefs.errors import UsageError
from nvmefs.linux import tracebulk
from nvmefs.linux.devices import Disk, kernel_dev
from nvmefs.linux.tracebulk import USER_CMD, Attempt, Fed, Pairing
from nvmefs.linux.tracefs import EventFormat, Instance
from nvmefs.nvme.policy import LogPolicy
from nvmefs.recorder import Recorder
from nvmefs.store.events import HostEvent, NvmeEvent, Place
from nvmefs.store.render import Clock, Renderer
from nvmefs.store.ring import EVENT, DebugRing
from tests.linux.test_tracefs import real_tracefs
from tests.linux.tracepages import BLOCK_FORMAT, NVME_FORMAT, block_record, nvme_record, page

DISK = Disk("nvme0n1", 259 << 20, 1, 4096)
# A native-multipath namespace (head nvme5n1) and its path through controller nvme7.
HEAD = Disk("nvme5n1", 259 << 20 | 5, 1, 512)
PATH = Disk("nvme5c7n1", 0, 1, 512, head="nvme5n1", ctrl="nvme7")


def engine(
    log: str = "media", log_attempts: bool = False, compiled: bool | None = None
) -> KernelEngine:
    disks = {d.name: d for d in (DISK, HEAD, PATH)}
    e = KernelEngine(KernelSpec("kernel"), DebugRing(256), policy=LogPolicy(log),
                     log_attempts=log_attempts, disks=lambda: disks,
                     compiled=compiled)  # fmt: skip
    e.use_formats(
        EventFormat.parse("nvme", "nvme_complete_rq", NVME_FORMAT),
        EventFormat.parse("block", "block_rq_complete", BLOCK_FORMAT),
    )
    return e


def entries(e: KernelEngine) -> list[NvmeEvent]:
    return [x[EVENT] for x in e.ring]


def a_failed_read() -> list[bytes]:
    """A direct read of LBA 256 (sector 2048 of a 4 KiB-block disk): six attempts, then the block
    error, as the guest's trace shows them."""
    attempts = [nvme_record(0x281, n, cid=100 + n) for n in range(6)]
    return [*attempts, block_record(2048, 8, -61, "RS")]


def test_six_attempts_and_one_block_error_make_one_entry() -> None:
    e = engine()
    e.page(0, page(*a_failed_read()))
    (ev,) = entries(e)
    assert (ev.status.status, ev.retries, ev.slba, ev.nlb, ev.op) == (0x281, 5, 256, 1, "read")
    assert (ev.ctrl, ev.disk, ev.nsid, ev.cid) == ("nvme0", "nvme0n1", 1, 105)
    assert e.stats.completions == 6 and e.stats.retries == 5 and e.stats.logged == 1
    assert e.stats.failed == {("nvme0", 1, 0x281): 1}  # the request, not its attempts


def test_a_disk_that_went_away_still_names_its_last_requests() -> None:
    """The kernel removed the controller (a reset that failed): the requests it failed on its
    way out are read after the disk is gone from sysfs, and are still its namespace's."""
    present = {d.name: d for d in (DISK, HEAD, PATH)}
    e = KernelEngine(KernelSpec("kernel"), DebugRing(256), disks=lambda: dict(present))
    e.use_formats(
        EventFormat.parse("nvme", "nvme_complete_rq", NVME_FORMAT),
        EventFormat.parse("block", "block_rq_complete", BLOCK_FORMAT),
    )
    e.page(0, page(*a_failed_read()))
    del present[DISK.name]
    present["nvme9n1"] = Disk("nvme9n1", 259 << 20 | 9, 2, 512)
    e._refresh_disks()  # as when the controller is seen gone
    e.page(0, page(nvme_record(0x371, 5, cid=7), block_record(2048, 8, -5, "RS")))
    assert e.stats.failed == {("nvme0", 1, 0x281): 1, ("nvme0", 1, 0x371): 1}
    # A name given again is the new disk's.
    present[DISK.name] = Disk("nvme0n1", 259 << 20 | 3, 4, 512)
    e._refresh_disks()
    e.page(1, page(*a_failed_read()))
    assert e.stats.failed[("nvme0", 4, 0x281)] == 1


def test_log_attempts_logs_each_attempt() -> None:
    e = engine(log_attempts=True)
    e.page(0, page(*a_failed_read()))
    assert [ev.retries for ev in entries(e)] == [0, 1, 2, 3, 4, 5]
    assert entries(e)[-1].slba == 256 and entries(e)[0].slba is None


def test_pairing_is_per_cpu() -> None:
    e = engine()
    # CPU 1's attempt is not ended by CPU 0's block event.
    e.page(1, page(nvme_record(0x281, 5, cid=1)))
    e.page(0, page(nvme_record(0x280, 5, cid=2), block_record(64, 8, -61, "WS")))
    assert [(ev.status.status, ev.op) for ev in entries(e)] == [(0x280, "write")]
    e.page(1, page(block_record(2048, 8, -61)))
    assert [ev.status.status for ev in entries(e)] == [0x280, 0x281]


def test_a_split_pair_across_two_reads_still_pairs() -> None:
    e = engine()
    e.page(0, page(nvme_record(0x281, 5)))
    e.page(0, page(block_record(2048, 8, -61)))
    assert len(entries(e)) == 1


def test_policy_decides_and_log_all_logs_successes() -> None:
    e = engine("media")
    e.page(0, page(nvme_record(0x4002, 0, qid=0, disk=""), block_record(0, 0, -95, "N", dev=0)))
    assert entries(e) == [] and e.stats.errors == 1
    e = engine("all")
    e.page(0, page(nvme_record(0)))
    (ok,) = entries(e)
    # Its block event is not traced (only failures' are): no LBA, and no operation either.
    assert ok.status.ok and ok.slba is None and ok.op is None


def test_passthrough_and_admin_are_marked() -> None:
    e = engine("errors")
    pt = [nvme_record(0x281, 0, flags=0x2), block_record((1 << 64) - 1, 1, -61, "RS")]
    adm = [nvme_record(0x4002, 0, qid=0, disk="", flags=0x2), block_record(0, 0, -95, "N", 0)]
    e.page(0, page(*pt, *adm))
    (p, a) = entries(e)
    assert (p.op, p.slba, p.disk) == ("passthrough", None, "nvme0n1")
    assert (a.op, a.qid, a.nsid, a.disk, a.admin) == ("admin", 0, None, None, True)


def test_an_attempt_with_no_block_event_expires_as_retried() -> None:
    p = Pairing()
    a = Attempt(0, 0, "nvme0n1", 1, 5, 0, 0, 0x281, seen=10.0)
    assert p.attempt(a) is None
    assert p.expire(10.5) == [] and p.expire(11.0) == [a] and p.pending == {}
    e = engine(log_attempts=True)
    e.page(0, page(nvme_record(0x281, 0)))
    assert e.consumer is not None and e.consumer.pending() == 1 and e.stats.retries == 0
    e.expire(1e12)
    assert e.consumer.pending() == 0 and e.stats.retries == 1
    assert [(ev.retries, ev.slba) for ev in entries(e)] == [(0, None)]


def test_a_policy_change_reaches_the_consumer() -> None:
    admin = page(nvme_record(0x4002, 0, qid=0, disk=""), block_record(0, 0, -95, "N", dev=0))
    e = engine("media")
    e.page(0, admin)
    assert entries(e) == []
    e.policy = LogPolicy("errors")
    e.page(0, admin)
    assert [ev.status.status for ev in entries(e)] == [0x4002]
    assert e.stats.failed == {("nvme0", None, 0x4002): 2}  # counted under either policy


@pytest.mark.parametrize(
    ("rwbs", "qid", "flags", "op"),
    [("RS", 1, 0, "read"), ("WS", 1, 0, "write"), ("FWS", 1, 0, "write"), ("F", 1, 0, "flush"),
     ("D", 1, 0, "discard"), ("RA", 1, 0, "read"), ("N", 0, 2, "admin"),
     ("RS", 1, 2, "passthrough"), (None, 1, 0, None), (None, 0, 0, "admin")],
)  # fmt: skip
def test_operation_names(rwbs: str | None, qid: int, flags: int, op: str | None) -> None:
    assert operation(rwbs, qid, flags) == op


def test_filters_follow_the_spec_and_policy() -> None:
    assert KernelSpec("kernel").nvme_filter(LogPolicy("media")) == "status != 0"
    assert KernelSpec("kernel").nvme_filter(LogPolicy("all")) == ""
    spec = KernelSpec("kernel:nvme3", ctrl="nvme3")
    assert spec.nvme_filter(LogPolicy()) == "status != 0 && ctrl_id == 3"
    spec = KernelSpec("kernel:/dev/nvme0n1", disk="nvme0n1")
    assert spec.nvme_filter(LogPolicy()) == 'status != 0 && disk == "nvme0n1"'


def test_bad_specs_are_refused() -> None:
    for bad in ("kernel:sda", "kernel:", "kernel:nvme"):
        with pytest.raises(UsageError, match="expected kernel"):
            KernelSpec.parse(bad)
    with pytest.raises(UsageError, match="no NVMe controller nvme99"):
        KernelSpec.parse("kernel:nvme99")


def test_a_kernel_without_the_nvme_events_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "tracing"
    (root / "instances").mkdir(parents=True)
    (root / "events" / "block" / "block_rq_complete").mkdir(parents=True)
    monkeypatch.setattr(kernel.tracefs, "MOUNTS", (root,))
    with pytest.raises(UsageError, match="no nvme:nvme_complete_rq trace event"):
        kernel.check("kernel")


def block_filter_passes(error: int, dev: int) -> bool:
    """What the kernel's filter BLOCK_FILTER lets through, as Python reads the same expression."""
    expr = kernel.BLOCK_FILTER.replace("&&", "and").replace("||", "or")
    return bool(eval(expr, {}, {"error": error, "dev": dev}))


def test_only_nvme_block_errors_are_traced() -> None:
    # What a killed daemon's instance records until it goes: NVMe errors, nothing of other disks.
    assert block_filter_passes(-61, kernel_dev(259, 0))  # nvme0n1
    assert block_filter_passes(-61, kernel_dev(259, (1 << 20) - 1))
    assert block_filter_passes(-95, 0)  # an admin or passthrough request without a disk
    assert not block_filter_passes(0, kernel_dev(259, 0))  # a success
    for major in (8, 254, 253, 7, 260):  # sd, virtio, device mapper, loop, the next major
        assert not block_filter_passes(-5, kernel_dev(major, 0))


def test_the_block_filter_is_one_this_kernel_accepts(tmp_path: Path) -> None:
    with real_tracefs(tmp_path) as root:
        if not (root / "events" / "block" / "block_rq_complete").is_dir():
            pytest.skip("this kernel has no block:block_rq_complete")
        inst = Instance(root)
        inst.create(guard=False)
        try:
            inst.set_filter("block", "block_rq_complete", kernel.BLOCK_FILTER)
            text = (inst.path / "events/block/block_rq_complete/filter").read_text()
            assert text.strip() == kernel.BLOCK_FILTER
        finally:
            inst.remove()


# -- the same entries and counters from either trace consumer ----------------------------------


def consumer_built() -> None:
    """The compiled consumer is built wherever the tests are set up: its absence is a failure
    here, not a reason to skip."""
    if not tracebulk.available():
        pytest.fail(f"no compiled consumer: {tracebulk.unavailable()}")


def mixed_pages() -> list[tuple[int, bytes]]:
    """Pages of every kind the engine meets: failed reads and writes paired across CPUs and
    pages, retried attempts, admin and passthrough errors, successes, path errors that fail
    over, a record too short to read, a page after lost events."""
    path_error = nvme_record(0x370, 0, disk="nvme5c7n1", ctrl=7, cid=40)
    aborted = nvme_record(0x371, 1, disk="nvme5c7n1", ctrl=7)
    return [
        (0, page(*a_failed_read())),
        (1, page(nvme_record(0x281, 5, cid=1))),
        (0, page(nvme_record(0x280, 0, cid=2), nvme_record(0x280, 1, cid=3))),
        (0, page(block_record(64, 8, -61, "WS"), nvme_record(0x4002, qid=0, disk=""))),
        (1, page(block_record(2048, 8, -61), block_record(2048, 8, -61), path_error, lost=3)),
        (0, page(block_record(0, 0, -95, "N", dev=0), nvme_record(0), nvme_record(0, cid=9))),
        (2, page(nvme_record(0x281, 0, flags=0x2), block_record((1 << 64) - 1, 1, -61, "RS"))),
        (2, page(nvme_record(0x281, 5, disk="nvme5c7n1", ctrl=7), nvme_record(0x281)[:40])),
        (2, page(block_record(2048, 1, -61, "RS", dev=0), aborted)),
        (3, page(nvme_record(0x2, 0, disk="nvme0n1"), nvme_record(0x2, 1, disk="nvme0n1"))),
    ]


def run_pages(e: KernelEngine) -> list[NvmeEvent | HostEvent]:
    """The pages into `e`, the log policy changed halfway, then every pending attempt expired:
    the ring's entries."""
    pages = mixed_pages()
    for cpu, pg in pages[:5]:
        e.page(cpu, pg)
    e.policy = LogPolicy("errors" if e.policy.spec != "errors" else "media")
    for cpu, pg in pages[5:]:
        e.page(cpu, pg)
    e.expire(1e12)
    e._flush_failovers()
    return [x[EVENT] for x in e.ring]


@pytest.mark.parametrize(
    ("log", "log_attempts"), [("media", False), ("errors", True), ("all", False), ("all", True)]
)
def test_the_compiled_and_the_python_consumer_give_the_same_entries_and_counters(
    log: str, log_attempts: bool
) -> None:
    consumer_built()
    c, py = engine(log, log_attempts, compiled=True), engine(log, log_attempts, compiled=False)
    assert (c.trace_consumer, py.trace_consumer) == ("compiled", "python")
    ring = run_pages(c)
    assert ring == run_pages(py) and any(isinstance(ev, NvmeEvent) for ev in ring)
    assert c.stats == py.stats and c.failovers == py.failovers == 2
    assert c.stats.completions == 18 and c.stats.failed.total() > 0


def test_stats_say_which_consumer_reads_the_trace() -> None:
    consumer_built()
    for compiled, impl in ((None, "compiled"), (True, "compiled"), (False, "python")):
        e = KernelEngine(KernelSpec("kernel"), DebugRing(4), compiled=compiled)
        rec = Recorder(e.ring, Renderer(Clock("jiffies"), "full"), source="kernel", engine=e)
        assert f"\ntrace_consumer {impl}\n" in rec.stats_text()
        e.use_formats(
            EventFormat.parse("nvme", "nvme_complete_rq", NVME_FORMAT),
            EventFormat.parse("block", "block_rq_complete", BLOCK_FORMAT),
        )
        assert f"\ntrace_consumer {impl}\n" in rec.stats_text()


def test_stats_count_lost_trace_events_and_failovers() -> None:
    e = engine("errors", False)
    rec = Recorder(e.ring, Renderer(Clock("jiffies"), "full"), source="kernel", engine=e)
    assert "\ntrace_lost_events 0\nfailovers 0\n" in rec.stats_text()
    run_pages(e)
    assert e.failovers == 2
    e.lost_events = 7  # as _check_lost adds the instance's counts
    assert "\ntrace_lost_events 7\nfailovers 2\n" in rec.stats_text()


async def test_entries_get_the_owner_of_their_lba_on_the_way_to_the_ring() -> None:
    asked: list[tuple[str, int]] = []

    def look(disk: str, lba: int, timeout: float) -> Place:
        asked.append((disk, lba))
        return Place("file", "/dev/nvme0n1", "ext4", 32, "/srv/a", (0, 4096))

    disks = {DISK.name: DISK}
    e = KernelEngine(KernelSpec("kernel"), DebugRing(256), disks=lambda: disks,
                     placer=lambda ring: Placer(ring, look))  # fmt: skip
    e.use_formats(
        EventFormat.parse("nvme", "nvme_complete_rq", NVME_FORMAT),
        EventFormat.parse("block", "block_rq_complete", BLOCK_FORMAT),
    )
    assert e.placer is not None
    async with trio.open_nursery() as nursery:
        e.sink.front = e.placer  # as running() sets it up
        nursery.start_soon(e.placer.run)
        e.page(0, page(*a_failed_read()))
        e._log_host("notice", "after the error")
        with trio.fail_after(5):
            while len(e.ring) < 2:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    first, note = (x[EVENT] for x in e.ring)
    assert isinstance(first, NvmeEvent) and first.place is not None
    assert (first.place.file, first.slba) == ("/srv/a", 256)
    assert isinstance(note, HostEvent) and note.message == "after the error"
    assert asked == [("nvme0n1", 256)] and e.stats.logged == 1
    text = Recorder(e.ring, Renderer(Clock("uptime")), engine=e).stats_text()
    assert "locate_lookups 1\n" in text and "locate_placed 1\n" in text


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
@pytest.mark.parametrize("log", ["media", "all"])
def test_a_storm_folds_in_the_kernel_source_as_the_sink_folds_its_entries(
    monkeypatch: pytest.MonkeyPatch, log: str, compiled: bool, request: pytest.FixtureRequest
) -> None:
    """The kernel source counts a request like the one that opened the fold without making
    its entry: its trace consumer counts most (Consumer.fold), _log_entry the rest. The ring
    holds what the sink's folder makes of every entry, with either consumer."""
    import random

    from nvmefs.engine.sink import Folder, Stats

    if compiled:
        request.getfixturevalue("compiled_built")
    rnd = random.Random(5)
    recs: list[bytes] = []
    disk, rwbs, status = "nvme0n1", "R", 0x281
    for i in range(3000):  # runs of like failures: reads, writes, two disks, two statuses
        if rnd.random() < 0.1:
            disk, rwbs = ("nvme0n1", "R") if rnd.random() < 0.7 else ("nvme5c7n1", "W")
            status = 0x281 if rnd.random() < 0.9 else 0x280
        sector = rnd.randrange(0, 1 << 20) * 8
        ctrl = 0 if disk == "nvme0n1" else 7
        if rnd.random() < 0.1:  # a success (log=all logs it), or a passthrough failure
            recs.append(nvme_record(0 if rnd.random() < 0.9 else 0x281, 0, cid=i % 1000,
                                    flags=USER_CMD if rnd.random() < 0.1 else 0))  # fmt: skip
            continue
        recs += [nvme_record(status, 0, disk=disk, cid=i % 1000, ctrl=ctrl),
                 block_record(sector, 8, -61, rwbs + "S")]  # fmt: skip
    pages = [page(*recs[i : i + 40]) for i in range(0, len(recs), 40)]
    # No refill, no expiry: the same folds whenever the test runs.
    monkeypatch.setattr("nvmefs.engine.sink.time.monotonic_ns", lambda: 10**12)

    def folded_entries(e: KernelEngine) -> list[tuple[Any, ...]]:
        e.sink.flush()
        return [(ev.status.status, ev.ctrl, ev.disk, ev.slba, ev.nlb, ev.cid, ev.op,
                 ev.repeats, ev.lba_range)
                for x in e.ring if isinstance(ev := x[EVENT], NvmeEvent)]  # fmt: skip

    in_consumer = 0

    def run(fold: int) -> KernelEngine:
        nonlocal in_consumer
        disks = {d.name: d for d in (DISK, HEAD, PATH)}
        e = KernelEngine(KernelSpec("kernel"), DebugRing(10000), policy=LogPolicy(log),
                         disks=lambda: disks, fold=fold, compiled=compiled)  # fmt: skip
        e.use_formats(
            EventFormat.parse("nvme", "nvme_complete_rq", NVME_FORMAT),
            EventFormat.parse("block", "block_rq_complete", BLOCK_FORMAT),
        )
        assert e.consumer is not None and e.trace_consumer == ("compiled" if compiled else "python")
        feed = e.consumer.feed

        def counted(cpu: int, pg: bytes, now: float | None = None) -> Fed:
            nonlocal in_consumer
            fed = feed(cpu, pg, now)
            in_consumer += fed.folded.n if fed.folded else 0
            return fed

        e.consumer.feed = counted  # type: ignore[method-assign,assignment]
        for pg in pages:
            e.page(0, pg)
        return e

    each = run(0)  # every entry made: the folder's input
    folded = run(200)
    reference = DebugRing(10000)

    def send(event: Any, mono_ns: int | None, wall_ns: int | None) -> None:
        reference.append(event, mono_ns, wall_ns)

    folder = Folder(send, Stats(), 200)
    for x in each.ring:
        if isinstance(ev := x[EVENT], NvmeEvent):
            folder.add(ev, 10**12)
    folder.close()
    expected = [(ev.status.status, ev.ctrl, ev.disk, ev.slba, ev.nlb, ev.cid, ev.op,
                 ev.repeats, ev.lba_range)
                for x in reference if isinstance(ev := x[EVENT], NvmeEvent)]  # fmt: skip
    got = folded_entries(folded)
    assert got == expected
    logged = each.stats.logged
    assert folded.stats.folded > 500 and folded.stats.logged == logged > 2000
    assert sum(1 + r[7] for r in got) == logged
    # Most folded requests never reached Python one by one: the consumer counted them.
    assert in_consumer > folded.stats.folded // 4
