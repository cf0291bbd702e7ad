"""The front of the ring that gives entries the owner of their LBA (engine/owners.py): every
entry reaches the ring once, in order, with its own times; none waits past its bound."""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from nvmefs.engine.owners import Placer
from nvmefs.nvme.status import Translator
from nvmefs.outputs.replay import Replay
from nvmefs.store.events import HostEvent, NvmeEvent, Place
from nvmefs.store.render import Clock, Renderer
from nvmefs.store.ring import DebugRing

STATUS = Translator().decode(0x281)
FILE = Place("file", "/dev/nvme0n1p1", "ext4", 100, "/data/a", (4096, 8192))


def error(lba: int | None, disk: str | None = "nvme0n1") -> NvmeEvent:
    return NvmeEvent(STATUS, ctrl="nvme0", nsid=1, disk=disk, slba=lba, nlb=1)


def events(ring: DebugRing) -> list[object]:
    return [e[3] for e in ring]


def test_entries_without_an_lba_go_straight_to_the_ring() -> None:
    ring = DebugRing(64)
    p = Placer(ring, lambda d, lba, t: FILE)
    note = HostEvent("notice", "hello")
    p.append(note)
    p.append(error(None))
    p.append(error(5, disk=None))
    assert events(ring) == [note, error(None), error(5, disk=None)]
    assert not p.held and p.lookups == 0


async def test_an_entry_gets_its_owner_and_what_came_after_stays_after() -> None:
    ring = DebugRing(64)
    asked: list[tuple[str, int]] = []

    def look(disk: str, lba: int, timeout: float) -> Place:
        asked.append((disk, lba))
        time.sleep(0.05)
        return FILE

    p = Placer(ring, look, wait_s=5)
    note = HostEvent("notice", "after")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(p.run)
        p.append(error(7), 111, 222)
        p.append(note, 333, 444)
        assert len(ring) == 0  # the note waits behind the entry
        with trio.fail_after(5):
            while len(ring) < 2:
                await trio.sleep(0.01)
        p.append(error(7))  # cached now: no second lookup, no wait
        nursery.cancel_scope.cancel()
    entries = list(ring)
    assert [(e[1], e[2]) for e in entries[:2]] == [(111, 222), (333, 444)]
    first, second, third = (e[3] for e in entries)
    assert isinstance(first, NvmeEvent) and first.place == FILE and first.slba == 7
    assert second is note
    assert isinstance(third, NvmeEvent) and third.place == FILE
    assert asked == [("nvme0n1", 7)]
    assert (p.lookups, p.placed, p.late) == (1, 2, 0)


async def test_a_slow_lookup_never_holds_an_entry_past_its_wait() -> None:
    ring = DebugRing(64)
    gate = threading.Event()

    def look(disk: str, lba: int, timeout: float) -> Place:
        gate.wait(10)
        time.sleep(0.05)
        return FILE

    p = Placer(ring, look, wait_s=0.2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(p.run)
        t0 = time.monotonic()
        p.append(error(9))
        p.append(error(10))  # queued behind the slow one
        with trio.fail_after(5):
            while len(ring) < 2:
                await trio.sleep(0.01)
        took = time.monotonic() - t0
        late = Place("unresolved", reason="the lookup took over 0.2 s")
        assert all(isinstance(e, NvmeEvent) and e.place == late for e in events(ring))
        assert p.late == 2
        gate.set()  # the lookup ends: the next error at that LBA has its owner at once
        with trio.fail_after(5):
            while p.lookups < 2:
                await trio.sleep(0.01)
        p.append(error(9))
        nursery.cancel_scope.cancel()
    assert took < 2, took
    last = events(ring)[-1]
    assert isinstance(last, NvmeEvent) and last.place == FILE
    # stats says how long lookups take: the slow one waited for the gate, the second did not.
    status = dict(p.status())
    assert status["locate_lookup_ms_max"] >= took * 1000 > 0, status
    assert 50 <= status["locate_lookup_ms_last"] < status["locate_lookup_ms_max"], status


def test_lookups_beyond_the_rate_are_skipped_and_counted() -> None:
    ring = DebugRing(256)
    p = Placer(ring, lambda d, lba, t: FILE, lookups_per_s=3)
    for lba in range(10):
        p.append(error(lba))
    # Three wait for their lookup; the rest are not looked up, and wait only behind those.
    assert p.skipped == 7 and len(p.held) == 10
    p.flush()
    got = events(ring)
    assert [e.slba for e in got] == list(range(10))  # type: ignore[attr-defined]
    assert p.late == 3 and not p.held
    over = Place("unresolved", reason="not looked up: over 3/s")
    assert [e.place for e in got[3:]] == [over] * 7  # type: ignore[attr-defined]


async def test_every_entry_reaches_the_ring_once_in_order_with_its_times() -> None:
    rng = random.Random(7)
    ring = DebugRing(1 << 14)

    def look(disk: str, lba: int, timeout: float) -> Place:
        time.sleep(rng.random() * 0.03)
        return Place("free") if lba % 2 else FILE

    p = Placer(ring, look, wait_s=0.05, lookups_per_s=50)
    given = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(p.run)
        for i in range(600):
            ev: object = (
                error(rng.randrange(40)) if rng.random() < 0.7 else HostEvent("notice", str(i))
            )
            p.append(ev, i, i + 1)
            given.append(ev)
            if rng.random() < 0.1:
                await trio.sleep(0.005)
        with trio.fail_after(10):
            while len(ring) < len(given):
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    entries = list(ring)
    assert [(e[1], e[2]) for e in entries] == [(i, i + 1) for i in range(600)]
    for (_s, _m, _w, got), ev in zip(entries, given, strict=True):
        if isinstance(ev, NvmeEvent):
            assert isinstance(got, NvmeEvent) and got.slba == ev.slba
            found = FILE if ev.slba % 2 == 0 else Place("free")  # type: ignore[operator]
            assert got.place is not None
            assert got.place == found or got.place.owner == "unresolved", got.place
        else:
            assert got is ev
    assert p.placed + p.late + p.skipped >= sum(isinstance(e, NvmeEvent) for e in given)
    assert p.placed > 0


async def test_what_is_held_goes_to_the_ring_when_the_task_ends() -> None:
    ring = DebugRing(64)
    gate = threading.Event()
    p = Placer(ring, lambda d, lba, t: (gate.wait(5), FILE)[1], wait_s=60)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(p.run)
        p.append(error(1))
        p.append(HostEvent("notice", "x"))
        await trio.sleep(0.05)
        assert len(ring) == 0
        nursery.cancel_scope.cancel()
    gate.set()
    assert len(ring) == 2 and not p.held


def test_the_owner_is_in_both_files_and_comes_back_from_the_journal() -> None:
    renderer = Renderer(Clock("uptime"))
    entry = (3, 1_000, 2_000, replace(error(2048), place=FILE))
    assert "file=/data/a bytes=4096..8192" in renderer.line(entry)
    rec = renderer.record(entry)
    assert (rec["owner"], rec["file"], rec["file_range"], rec["fs_block"]) == (
        "file", "/data/a", [4096, 8192], 100
    )  # fmt: skip
    assert (rec["partition"], rec["fs"], rec["owner_reason"]) == ("/dev/nvme0n1p1", "ext4", None)
    back = Replay("linux-7.1").entry(json.dumps(rec).encode())[3]
    assert isinstance(back, NvmeEvent) and back.place == FILE and back.replayed
    for owner in ("free", "metadata"):
        line = renderer.line((3, 1, 2, replace(error(1), place=Place(owner))))
        assert f"owner={owner}" in line
    unresolved = replace(error(1), place=Place("unresolved", reason="/dev/x is not mounted"))
    assert "owner" not in renderer.line((3, 1, 2, unresolved))  # JSON says why, not the line
    assert renderer.record((3, 1, 2, unresolved))["owner_reason"] == "/dev/x is not mounted"
    # What replay takes from a journal is checked like every other field.
    for bad in ({"owner": "mine"}, {"file_range": [9, 1]}, {"file_range": "0-9"}, {"file": 7}):
        with pytest.raises(ValueError):
            Replay("linux-7.1").entry(json.dumps({**rec, **bad}).encode())


async def test_a_lookup_that_breaks_answers_unresolved_and_the_next_one_runs() -> None:
    ring = DebugRing(64)

    def look(disk: str, lba: int, timeout: float) -> Place:
        if lba == 1:
            raise ValueError("a sysfs file changed under the lookup")
        return FILE

    p = Placer(ring, look, wait_s=5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(p.run)
        p.append(error(1))
        p.append(error(2))
        with trio.fail_after(5):
            while len(ring) < 2:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    broken, fine = events(ring)
    assert isinstance(broken, NvmeEvent) and broken.place is not None
    assert broken.place.owner == "unresolved" and "ValueError" in (broken.place.reason or "")
    assert isinstance(fine, NvmeEvent) and fine.place == FILE


async def test_lookups_slower_than_the_rate_do_not_pile_up() -> None:
    ring = DebugRing(1 << 12)

    def look(disk: str, lba: int, timeout: float) -> Place:
        time.sleep(0.2)
        return FILE

    p = Placer(ring, look, wait_s=0.05, lookups_per_s=5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(p.run)
        for second in range(3):
            for i in range(40):
                p.append(error(second * 1000 + i))
                assert p.lookups_queued <= 5
                await trio.sleep(0.025)
        nursery.cancel_scope.cancel()
    assert p.skipped > 0 and len(ring) == 120


@pytest.mark.root
async def test_a_storm_on_an_unmounted_disk_is_answered_from_what_the_lookups_keep(
    tmp_path: Path,
) -> None:
    """After one lookup of a disk with no filesystem mounted, its other LBAs are answered in
    append, with no lookup and no wait: a storm there costs the recorder next to nothing."""
    from tests.linux.test_locate import loop_disk

    with loop_disk(tmp_path, "64M") as disk:
        name = disk.dev.removeprefix("/dev/")
        ring = DebugRing(1024)
        p = Placer(ring, wait_s=5)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(p.run)
            p.append(error(8, disk=name))
            with trio.fail_after(10):
                while len(ring) < 1:
                    await trio.sleep(0.01)
            for lba in range(16, 16 + 8 * 300, 8):
                p.append(error(lba, disk=name))
            assert len(ring) == 301 and not p.held  # none waited
            nursery.cancel_scope.cancel()
        places = [e.place for e in events(ring) if isinstance(e, NvmeEvent)]
        assert all(pl is not None and "not mounted" in str(pl.reason) for pl in places)
        assert (p.lookups, p.known, p.skipped) == (1, 300, 0)
