"""A journal whose disk stalls holds up nothing but itself (issue 19): the engine completes, the
files are read, and the journal catches up or says what it lost."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from nvmefs import options, workloads
from nvmefs.nvme.status import Translator
from nvmefs.outputs import journal as journal_mod
from nvmefs.outputs.journal import Journal
from nvmefs.recorder import Recorder
from nvmefs.store.events import NvmeEvent
from nvmefs.store.render import Renderer
from nvmefs.store.ring import DebugRing
from nvmefs.workloads import Progress
from tests.helpers import sim_engine

# The backlog a journal has (the test's second run makes it tiny).
BACKLOG = journal_mod.BACKLOG_MAX
STORM = '[[fault]]\nopcode = "read"\nlba = [0, 1000000]\nstatus = 0x4281\n'
# Folding off: every failed read is an entry of its own, as fast as the engine goes (the storm
# the journal must keep up with; folding would spare it that).
NO_FOLD = 0


def stalling_write(
    monkeypatch: pytest.MonkeyPatch, journal: Journal, gate: threading.Event
) -> Callable[[], int]:
    """Make the journal's writes block until `gate` is set (a disk that does not answer);
    returns how many writes were held."""
    real = os.write
    held = 0

    def write(fd: int, data: bytes) -> int:
        nonlocal held
        if fd == journal._fd and not gate.is_set():
            held += 1
            gate.wait(60)
        return real(fd, data)

    monkeypatch.setattr(journal_mod.os, "write", write)
    return lambda: held


def held_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backlog: int, stall_s: float
) -> tuple[Journal, threading.Event, Callable[[], int]]:
    """A journal of `backlog` entries' backlog, stalled after `stall_s` seconds of a write,
    whose writes wait for the gate returned (and how many writes were held)."""
    monkeypatch.setattr(journal_mod, "BACKLOG_MAX", backlog)
    monkeypatch.setattr(journal_mod, "STALL_S", stall_s)
    opts = options.parse(
        [f"journal={tmp_path / 'j.jsonl'}", "capacity=256", "journal_fsync=0"], allow_fuse=False
    )
    j = Journal.open(opts)
    assert j is not None
    gate = threading.Event()
    return j, gate, stalling_write(monkeypatch, j, gate)


@pytest.mark.parametrize("backlog", [BACKLOG, 64])
async def test_a_stalled_journal_disk_stops_neither_completions_nor_readers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backlog: int
) -> None:
    j, gate, held = held_journal(tmp_path, monkeypatch, backlog, 0.2)

    async with sim_engine(STORM, log="all", fold=NO_FOLD) as (engine, _sim, ring):
        j.attach(ring)
        base = ring.last_seq  # the journal takes what comes after it is attached
        rec = Recorder(ring, Renderer(), engine=engine)
        progress = Progress()
        reads = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(j.run, rec)

            async def reader() -> None:  # a FUSE reader: a stream over the ring, read on
                nonlocal reads
                stream = rec.text_stream()
                off = 0
                while True:
                    data = stream.read(off, 1 << 16)
                    off += len(data)
                    reads += 1
                    await trio.sleep(0.01)

            nursery.start_soon(reader)
            with trio.fail_after(60):  # generous: a loaded machine is slow, not wrong
                while not held():  # reads failing until the journal's write is stuck
                    await workloads.randread(engine, progress, bs=4096, qd=32, count=32)
                appended, read = ring.appended, reads
                # Completions go on, and so do reads, while the write does not return (past
                # the journal's brake, which it lets go once it is stalled).
                await workloads.randread(engine, progress, bs=4096, qd=32, count=2000)
                while reads - read < 5:
                    await trio.sleep(0.01)
            assert ring.appended - appended >= 2000
            with trio.fail_after(60):
                while dict(j.status())["journal_state"] != "stalled":
                    await trio.sleep(0.01)
            gate.set()
            await workloads.randread(engine, progress, bs=4096, qd=32, count=500)
            with trio.fail_after(30):
                while j.written + j.lost < ring.appended - base - 2:  # notices may follow
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    j.close()
    assert j.written + j.lost == ring.appended - base
    if backlog == BACKLOG:
        assert j.lost == 0  # it caught up: every entry is in the journal
    else:
        assert j.lost > 0  # it could not: said so, in the ring and the counters
        messages = [e[3].message for e in ring if hasattr(e[3], "message")]
        assert any("entries lost" in m for m in messages), messages[-5:]
    lines = (tmp_path / "j.jsonl").read_bytes().count(b"\n") + sum(
        p.read_bytes().count(b"\n") for p in tmp_path.glob("j.jsonl.*")
    )
    assert lines == j.written


async def test_the_journal_brakes_the_engines_own_storm_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A small backlog, so that the brake is met at every few batches; STALL_S far away: a slow
    # disk holds the storm back (gate closed), and a storm as fast as the engine goes is
    # written whole once the disk answers.
    j, gate, held = held_journal(tmp_path, monkeypatch, 512, 600)
    async with sim_engine(STORM, log="all", fold=NO_FOLD) as (engine, _sim, ring):
        j.attach(ring)
        base = ring.last_seq
        rec = Recorder(ring, Renderer(), engine=engine)
        progress = Progress()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(j.run, rec)
            storm = trio.Event()

            async def run_storm() -> None:
                await workloads.randread(engine, progress, bs=4096, qd=32, count=20_000)
                storm.set()

            nursery.start_soon(run_storm)
            with trio.fail_after(60):
                while not held():
                    await trio.sleep(0.01)
            await trio.sleep(0.5)  # the storm meets the brake and waits there
            assert not storm.is_set() and ring.held()
            # Held at the brake: half the backlog, the ring's half before the move, one batch.
            assert ring.appended - base <= 256 + 256 + 32 + 64, ring.appended - base
            waiting = ring.appended
            await trio.sleep(0.3)
            assert ring.appended == waiting  # nothing more while the disk does not answer
            gate.set()
            with trio.fail_after(120):
                await storm.wait()
                while j.written < ring.appended - base:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    j.close()
    assert progress.commands == 20_000 and progress.failed == 20_000
    assert j.lost == 0 and j.written == ring.appended - base >= 20_000


def test_a_long_turn_that_goes_on_writing_is_not_a_stall(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A slow disk is not a stalled one: a turn of many rotations, each of whose directory syncs
    # takes a while, keeps the state "writing" while every write and rotation returns.
    monkeypatch.setattr(journal_mod, "STALL_S", 0.4)
    real_sync = journal_mod.SafeDir.sync

    def slow_sync(self: journal_mod.SafeDir) -> None:
        time.sleep(0.15)
        real_sync(self)

    monkeypatch.setattr(journal_mod.SafeDir, "sync", slow_sync)
    opts = options.parse(
        [f"journal={tmp_path / 'j.jsonl'}", "capacity=4096", "journal_size=64K", "journal_fsync=0"],
        allow_fuse=False,
    )
    j = Journal.open(opts)
    assert j is not None
    ring = DebugRing(4096)
    j.attach(ring)
    status = Translator().decode(0x281)
    for lba in range(3000):  # about 1 MB of lines: a dozen rotations in one turn
        ring.append(NvmeEvent(status, ctrl="nvme0", nsid=1, slba=lba, nlb=1, disk="nvme0n1"))
    states: list[str] = []
    turn = threading.Thread(target=j.drain)
    turn.start()
    while turn.is_alive():
        states.append(j.current_state()[0])
        time.sleep(0.02)
    turn.join()
    j.close()
    assert j.rotations >= 8 and j.lost == 0
    assert len(states) > 40 and set(states) == {"writing"}, states


async def test_an_idle_journal_sleeps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing to write: a turn a FOLLOW_S (to follow PATH), not a worker thread call per loop
    # turn (each one the machine's CPU, on a machine in trouble).
    opts = options.parse([f"journal={tmp_path / 'j.jsonl'}"], allow_fuse=False)
    j = Journal.open(opts)
    assert j is not None
    ring = DebugRing(64)
    j.attach(ring)
    turns = 0
    real = j._write_lines

    def counted(batch: tuple[list[bytes], int]) -> None:
        nonlocal turns
        turns += 1
        real(batch)

    monkeypatch.setattr(j, "_write_lines", counted)
    rec = Recorder(ring, Renderer())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(j.run, rec)
        ring.append(NvmeEvent(Translator().decode(0x281), ctrl="nvme0", nsid=1, slba=1, nlb=1))
        await trio.sleep(1.5)
        nursery.cancel_scope.cancel()
    j.close()
    assert j.written == 1
    assert turns <= 5, turns
