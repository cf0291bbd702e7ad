"""The engine against the simulated controller: bring-up, retries, timeouts, recovery, shutdown.

Timeouts run on trio's autojump clock: a 30 s io_timeout costs no wall time.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from nvmefs import workloads
from nvmefs.engine.register import Engine
from nvmefs.errors import CommandAborted
from nvmefs.nvme import commands as c
from nvmefs.sim.controller import SERIAL
from nvmefs.store import events
from nvmefs.store.events import HostEvent, NvmeEvent
from nvmefs.store.ring import EVENT
from tests.helpers import sim_engine

READ_FAIL = """
[[fault]]
opcode = "read"
lba = [100, 100]
status = {status}
"""


def nvme_entries(ring: object) -> list[NvmeEvent]:
    return [e[EVENT] for e in ring if isinstance(e[EVENT], NvmeEvent)]  # type: ignore[attr-defined]


def host_entries(ring: object, kind: str) -> list[HostEvent]:
    return [
        e[EVENT]
        for e in ring  # type: ignore[attr-defined]
        if isinstance(e[EVENT], HostEvent) and e[EVENT].kind == kind
    ]


async def test_bring_up_identifies_controller_and_namespaces() -> None:
    async with sim_engine(size=8 << 20, sim_kw={"namespaces": 2, "lba_size": 4096}) as (e, sim, _):
        assert e.state == "ready" and e.serial == SERIAL
        assert [(n.nsid, n.nblocks, n.lba_size) for n in e.namespaces] == [
            (1, 2048, 4096),
            (2, 2048, 4096),
        ]
        assert sim.csts & 1 and set(sim.sqs) == {0, 1} and set(sim.cqs) == {0, 1}
    assert not sim.csts & 1  # leaving running() disables the controller


async def test_write_read_compare_round_trip_and_errors() -> None:
    async with sim_engine() as (e, _sim, _ring):
        data = bytes(range(256)) * 64  # 16 KiB: needs a PRP list
        assert (await e.submit(c.write(1, 10, 32, 512, data))).status.ok
        got = await e.submit(c.read(1, 10, 32, 512), keep_data=True)
        assert got.data == data
        assert (await e.submit(c.compare(1, 10, 32, 512, data))).status.ok
        bad = await e.submit(c.compare(1, 10, 32, 512, bytes(len(data))))
        assert bad.status.code == 0x285 and bad.attempt == 5  # no DNR: retried five times
        out = await e.submit(c.read(1, e.namespaces[0].nblocks - 1, 2, 512))
        assert out.status.status == 0x4080 and out.attempt == 0  # DNR: no retry
        assert (await e.submit(c.read(9, 0, 1, 512))).status.status == 0x400B
        assert (await e.submit(c.Command(0x7F, 1))).status.status == 0x4001


async def test_dulbe_reads_of_unwritten_blocks_and_deallocate() -> None:
    async with sim_engine() as (e, _sim, _):
        assert (await e.submit(c.read(1, 0, 8, 512))).status.ok
        await e.submit(c.set_features(c.FEAT_ERROR_RECOVERY, c.DULBE, nsid=1))
        assert (await e.submit(c.read(1, 0, 8, 512))).status.status == 0x4287
        await e.submit(c.write(1, 0, 8, 512, b"\1" * 4096))
        assert (await e.submit(c.read(1, 0, 8, 512))).status.ok
        assert (await e.submit(c.deallocate(1, [(4, 2)]))).status.ok
        assert (await e.submit(c.read(1, 0, 8, 512))).status.status == 0x4287
        await e.submit(c.write_zeroes(1, 4, 2))
        assert (await e.submit(c.read(1, 0, 8, 512))).status.ok


async def test_dnr_suppresses_retries() -> None:
    async with sim_engine(READ_FAIL.format(status=0x4281)) as (e, _sim, ring):
        comp = await e.submit(c.read(1, 96, 8, 512))
        assert comp.status.status == 0x4281 and comp.attempt == 0
        assert [(ev.status.status, ev.retries, ev.slba) for ev in nvme_entries(ring)] == [
            (0x4281, 0, 96)
        ]
        assert e.stats.retries == 0


async def test_five_retries_without_dnr_give_one_entry_at_the_final_completion() -> None:
    async with sim_engine(READ_FAIL.format(status=0x281)) as (e, _sim, ring):
        comp = await e.submit(c.read(1, 100, 1, 512))
        assert comp.status.status == 0x281 and comp.attempt == 5
        assert [(ev.status.status, ev.retries) for ev in nvme_entries(ring)] == [(0x281, 5)]
        # The counters still see every attempt.
        assert e.stats.retries == 5 and e.stats.by_status[0x281] == 6
        assert e.stats.completions == e.stats.errors + sum(
            n for w, n in e.stats.by_status.items() if not w & 0x7FF
        )


async def test_log_attempts_logs_every_attempt_as_the_tracepoint() -> None:
    async with sim_engine(READ_FAIL.format(status=0x281), log_attempts=True) as (e, _sim, ring):
        comp = await e.submit(c.read(1, 100, 1, 512))
        assert comp.status.status == 0x281 and comp.attempt == 5
        assert [ev.retries for ev in nvme_entries(ring)] == [0, 1, 2, 3, 4, 5]
        assert e.stats.logged == 6


async def test_retry_succeeds_when_the_fault_stops() -> None:
    plan = READ_FAIL.format(status=0x281) + "count = 2\n"
    async with sim_engine(plan) as (e, _sim, ring):
        comp = await e.submit(c.read(1, 100, 1, 512))
        assert comp.status.ok and comp.attempt == 2
        # The command ended well: nothing to log under log=errors, as the patch would not.
        assert nvme_entries(ring) == [] and e.stats.retries == 2
    async with sim_engine(plan, log_attempts=True) as (e, _sim, ring):
        await e.submit(c.read(1, 100, 1, 512))
        assert [ev.retries for ev in nvme_entries(ring)] == [0, 1]


async def test_crd_delays_are_honoured(autojump_clock: trio.testing.MockClock) -> None:
    # CRD=2 selects CRDT2, which the simulated controller reports as 5 (x 100 ms).
    plan = READ_FAIL.format(status=0x1281) + "count = 1\n"
    async with sim_engine(plan) as (e, _sim, _):
        t0 = trio.current_time()
        comp = await e.submit(c.read(1, 100, 1, 512))
        assert comp.status.ok and comp.attempt == 1
        assert trio.current_time() - t0 == pytest.approx(0.5, abs=0.01)


async def test_hung_command_times_out_into_abort_and_engine_recovers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    plan = READ_FAIL.format(status=0).replace("status = 0", "hang = true\ncount = 1")
    async with sim_engine(plan) as (e, sim, ring):
        t0 = trio.current_time()
        comp = await e.submit(c.read(1, 100, 1, 512))
        assert trio.current_time() - t0 == pytest.approx(30, abs=0.1)  # the kernel's io_timeout
        # Aborted with Command Abort Requested, then retried and successful.
        assert comp.status.ok and comp.attempt == 1
        assert len(host_entries(ring, events.TIMEOUT)) == 1
        assert len(host_entries(ring, events.ABORT)) == 1
        assert nvme_entries(ring) == []  # the abort's 0x0007 was not final: the retry was
        assert e.stats.timeouts == 1 and e.stats.aborts == 1 and e.stats.resets == 0
        assert not sim.held


async def test_hung_command_resets_controller_when_abort_fails(
    autojump_clock: trio.testing.MockClock,
) -> None:
    plan = READ_FAIL.format(status=0).replace("status = 0", "hang = true\ncount = 1")
    async with sim_engine(plan, sim_kw={"abort_works": False}) as (e, sim, ring):
        other = [c.read(1, lba, 1, 512) for lba in (0, 1, 2)]
        results = await e.submit_batch([c.read(1, 100, 1, 512), *other])
        assert isinstance(results[0], CommandAborted)
        assert all(not isinstance(r, Exception) and r.status.ok for r in results[1:])
        resets = host_entries(ring, events.RESET)
        assert "resetting controller" in resets[0].message
        assert resets[-1].message == "controller ready again"
        assert e.stats.resets == 1 and e.state == "ready"
        # The engine works after the reset: new queues, same namespaces.
        assert (await e.submit(c.read(1, 100, 1, 512))).status.ok
        assert sim.commands > 10


async def test_shutdown_with_commands_in_flight_cancels_cleanly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    plan = READ_FAIL.format(status=0).replace("status = 0", "hang = true")
    finished: list[str] = []
    async with sim_engine(plan) as (e, sim, _):

        async def stuck() -> None:
            try:
                await e.submit(c.read(1, 100, 1, 512))
            finally:
                finished.append("stuck")

        async with trio.open_nursery() as n:
            for _ in range(4):
                n.start_soon(stuck)
            await trio.sleep(1)
            assert len(sim.held) == 4
            n.cancel_scope.cancel()
    assert finished == ["stuck"] * 4
    assert not sim.csts & 1 and sim.sqs == {}


async def test_batch_larger_than_queue_waits_for_space() -> None:
    async with sim_engine(queue_depth=4) as (e, _sim, _):
        results = await e.submit_batch([c.read(1, i, 1, 512) for i in range(50)])
        assert all(not isinstance(r, Exception) and r.status.ok for r in results)
        assert e.stats.completions >= 50


async def test_policy_decides_ring_entries_counters_see_everything() -> None:
    async with sim_engine(READ_FAIL.format(status=0x4281), log="media") as (e, _sim, ring):
        await e.submit_batch([c.read(1, lba, 1, 512) for lba in range(98, 103)])
        await e.submit(c.read(1, 10**9, 1, 512))  # LBA out of range: not a media error
        assert [ev.slba for ev in nvme_entries(ring)] == [100]
        assert e.stats.by_status[0] >= 4 and e.stats.by_status[0x4080] == 1
        assert e.stats.by_opcode[(False, c.NVM_READ)] == 6
        # Failed commands are counted whether logged or not, by controller, nsid and status.
        assert e.stats.failed == {(e.ctrl_name, 1, 0x4281): 1, (e.ctrl_name, 1, 0x4080): 1}


async def test_a_retried_command_counts_as_one_failure() -> None:
    async with sim_engine(READ_FAIL.format(status=0x281)) as (e, _sim, _ring):
        await e.submit(c.read(1, 100, 1, 512))
        assert e.stats.failed == {(e.ctrl_name, 1, 0x281): 1} and e.stats.retries == 5


async def test_error_log_page_after_scrub_matches_the_ring() -> None:
    plan = """
[[fault]]
opcode = "read"
lba = [2048, 2055]
status = 0x4281
[[fault]]
opcode = "read"
lba = [9000, 9000]
status = 0x4287
"""
    async with sim_engine(plan) as (e, _sim, ring):
        await workloads.scrub(e, workloads.Progress(), bs=128 << 10, qd=8, passes=1)
        logged = [(ev.status.status, ev.slba, ev.nsid, ev.cid) for ev in nvme_entries(ring)]
        assert [s for s, *_ in logged] == [0x4281, 0x4287]
        page = await e.get_log_page(c.LOG_ERROR, (e.elpe + 1) * 64)
        log = workloads.parse_error_log(page)
        controller = [(x["status"], x["lba"], x["nsid"], x["cmdid"]) for x in reversed(log)]
        assert controller == logged
        smart = await e.get_log_page(c.LOG_SMART, 512)
        assert int.from_bytes(smart[160:176], "little") == 2  # media errors


async def test_scrub_progress_says_how_far_the_pass_is_and_when_passes_ended() -> None:
    async with sim_engine(sim_kw={"namespaces": 2}) as (e, _sim, _ring):
        progress = workloads.Progress()
        ratios: list[float] = []
        submit = e.submit_batch

        async def watch(cmds: list[c.Command]) -> list[object]:
            ratios.append(progress.pass_ratio)
            return await submit(cmds)  # type: ignore[return-value]

        e.submit_batch = watch  # type: ignore[method-assign]
        await workloads.scrub(e, progress, bs=1 << 20, qd=4, passes=2)
        assert progress.passes_done == 2 and progress.pass_ratio == 1.0
        assert progress.last_pass_end > 0
        first = ratios[: len(ratios) // 2]  # one pass: rising from 0 to below 1
        assert first[0] == 0.0 and first == sorted(first) and first[-1] < 1.0


async def test_idle_health_poll_turns_new_controller_errors_into_entries(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with sim_engine(READ_FAIL.format(status=0x4281)) as (e, _sim, ring):
        async with trio.open_nursery() as n:
            progress = workloads.Progress()
            n.start_soon(lambda: workloads.idle(e, progress, interval=10))
            await trio.sleep(1)
            await e.submit(c.read(1, 100, 1, 512))
            await trio.sleep(15)
            n.cancel_scope.cancel()
        notices = host_entries(ring, events.NOTICE)
        assert len(notices) == 1 and "Status = 0x4281" in notices[0].message
        assert notices[0].fields["lba"] == 100 and progress.polls == 1
        health = progress.health[e.ctrl_name]
        assert (health.serial, health.model) == (e.serial, e.model) and health.serial
        assert (health.media_errors, health.critical_warning) == (1, 0)
        assert health.temperature_k == 321 and health.polled_at > 0


def test_engine_construction_does_no_io() -> None:
    from nvmefs.sim.controller import SimController
    from nvmefs.store.ring import DebugRing

    sim = SimController()
    Engine(sim, DebugRing())
    assert sim.commands == 0 and sim.csts == 0


async def test_delayed_completion_arrives_after_its_delay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    plan = READ_FAIL.format(status=0x4281) + "delay_ms = 1500\n"
    async with sim_engine(plan) as (e, _sim, _ring):
        t0 = trio.current_time()
        comp = await e.submit(c.read(1, 100, 1, 512))
        assert comp.status.status == 0x4281
        assert trio.current_time() - t0 == pytest.approx(1.5, abs=0.01)
        assert comp.latency_ns >= 0


async def test_queue_deletion_rules() -> None:
    async with sim_engine() as (e, sim, _ring):
        # The CQ still has its SQ: the controller refuses (Invalid Queue Deletion).
        assert (await e.submit(c.delete_io_cq(1))).status.status == 0x410C
        assert (await e.submit(c.delete_io_sq(7))).status.status == 0x4101
        assert (await e.submit(c.delete_io_sq(1))).status.ok and 1 not in sim.sqs
        assert (await e.submit(c.delete_io_cq(1))).status.ok and 1 not in sim.cqs
        assert (await e.submit(c.identify(0x55))).status.status == 0x4002  # unknown CNS


async def test_scrub_rate_cap_and_interval(autojump_clock: trio.testing.MockClock) -> None:
    async with sim_engine(size=16 << 20) as (e, _sim, _ring):
        progress = workloads.Progress()
        t0 = trio.current_time()
        await workloads.scrub(e, progress, bs=128 << 10, qd=4, passes=2, interval=10, rate=8)
        elapsed = trio.current_time() - t0
        # 2 passes of 16 MiB at 8 MB/s, and 10 s between them.
        assert elapsed == pytest.approx(2 * 16.777216 / 8 + 10, rel=0.05)
        assert progress.bytes_done == 2 * (16 << 20) and progress.state == "done"


@pytest.mark.parametrize("qd", [1, 3, 8])
async def test_randread_runs_exactly_count_commands(qd: int) -> None:
    async with sim_engine(READ_FAIL.format(status=0x4281)) as (e, sim, _ring):
        before = sim.commands
        progress = workloads.Progress()
        await workloads.randread(e, progress, bs=4096, qd=qd, count=21, seed=3)
        assert progress.commands == 21 and progress.bytes_done == 21 * 4096
        assert sim.commands - before >= 21  # failed reads are retried on top
        assert progress.state == "done"


async def test_completions_reaped_by_the_submitter_do_not_wake_the_reaper() -> None:
    async with sim_engine() as (e, sim, _ring):
        await trio.testing.wait_all_tasks_blocked()
        for i in range(20):
            wake = sim._irq[1]  # what the idle I/O reaper is waiting on
            results = await e.submit_batch([c.read(1, i * 4 + k, 1, 512) for k in range(4)])
            assert all(not isinstance(r, Exception) and r.status.ok for r in results)
            assert not wake.is_set()  # held back while the submitter reaped, then not needed


async def test_an_interrupt_held_back_fires_on_unmask_while_entries_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    plan = READ_FAIL.format(status=0x4281) + "delay_ms = 1000\n"
    async with sim_engine(plan) as (e, sim, _ring):
        done = trio.Event()

        async def reader() -> None:
            await e.submit(c.read(1, 100, 1, 512))
            done.set()

        async with trio.open_nursery() as n:
            n.start_soon(reader)
            await trio.sleep(0.1)  # submitted; the controller holds the completion for 1 s
            sim.mask_interrupt(1)
            await trio.sleep(2)  # the completion is posted, its interrupt held back
            assert not done.is_set()
            sim.unmask_interrupt(1)  # the entry still waits: the interrupt fires now
            with trio.fail_after(1):
                await done.wait()


async def test_a_listener_that_raises_mid_batch_breaks_nothing() -> None:
    # Every read fails once, without retries: each command of the batch is one entry.
    plan = '[[fault]]\nopcode = "read"\nlba = [0, 100000]\nstatus = 0x4281\n'
    async with sim_engine(plan) as (engine, _sim, ring):
        calls = 0

        def flaky() -> None:  # a consumer's bug: raises on every third append
            nonlocal calls
            calls += 1
            if calls % 3 == 0:
                raise RuntimeError("a consumer's bug")

        ring.subscribe(flaky)
        before_entries, before = ring.appended, engine.stats.completions
        cmds = [c.read(1, lba * 8, 8, 512) for lba in range(32)]
        results = await engine.submit_batch(cmds)
        assert len(results) == 32
        entries = [e for e in ring if isinstance(e[EVENT], NvmeEvent)][-32:]
        assert ring.appended - before_entries == 32 and calls == 32
        assert sorted(e[EVENT].slba for e in entries) == [lba * 8 for lba in range(32)]
        assert engine.stats.completions - before == 32
        assert sum(engine.stats.failed.values()) >= 32
        assert ring.listener_errors == 32 // 3
