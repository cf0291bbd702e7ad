"""The kernel-log mirror: within the kernel's /dev/kmsg budget, exact about what it leaves out."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from nvmefs.nvme.status import Translator
from nvmefs.outputs import kmsg
from nvmefs.outputs.kmsg import KmsgOutput
from nvmefs.store.events import NvmeEvent
from nvmefs.store.ring import DebugRing

ST = Translator()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(kmsg.time, "monotonic", c)
    return c


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    yield r, w
    os.close(r)


def lines(fd: int) -> list[str]:
    try:
        return os.read(fd, 1 << 20).decode().splitlines()
    except BlockingIOError:
        return []


def storm(ring: DebugRing, n: int) -> None:
    for i in range(n):
        ring.append(NvmeEvent(ST.decode(0x281), "nvme0", 1, 1, 7, 0x02, False, i, 8, 0))


def test_the_budget_is_kept_and_what_it_left_out_is_said_next_interval(
    pipe: tuple[int, int], clock: Clock
) -> None:
    r, w = pipe
    out = KmsgOutput(w, "ratelimit")
    ring = DebugRing(1024)
    out.attach(ring)
    storm(ring, 100)
    out.flush()
    first = lines(r)
    assert len(first) == kmsg.BURST and all(ln.startswith("<4>nvmefs: ") for ln in first)
    assert (out.written, out.dropped) == (10, 90)
    clock.now += kmsg.INTERVAL_S / 2
    storm(ring, 5)
    out.flush()  # still the same interval: nothing goes out, all counted
    assert lines(r) == [] and out.dropped == 95
    clock.now += kmsg.INTERVAL_S
    out.flush()
    assert lines(r) == ["<4>nvmefs: 95 entries not mirrored (the kernel log's rate limit)"]
    assert out.written + out.dropped == ring.appended
    out.close()


def test_with_devkmsg_on_every_entry_is_mirrored(pipe: tuple[int, int], clock: Clock) -> None:
    r, w = pipe
    out = KmsgOutput(w, "on")
    ring = DebugRing(1024)
    out.attach(ring)
    storm(ring, 300)
    out.flush()
    assert len(lines(r)) == 300 and (out.written, out.dropped) == (300, 0)
    out.close()


def test_with_devkmsg_off_nothing_is_written_and_all_is_counted(
    pipe: tuple[int, int], clock: Clock
) -> None:
    r, w = pipe
    out = KmsgOutput(w, "off")
    ring = DebugRing(1024)
    out.attach(ring)
    storm(ring, 30)
    out.flush()
    assert lines(r) == [] and (out.written, out.dropped) == (0, 30)
    out.close()


def test_appending_writes_nothing_until_the_task_runs(pipe: tuple[int, int], clock: Clock) -> None:
    r, w = pipe
    out = KmsgOutput(w, "on")
    ring = DebugRing(1024)
    out.attach(ring)
    storm(ring, 3)  # the completion path: a wake-up only
    assert lines(r) == []
    out.flush()
    assert len(lines(r)) == 3
    out.close()


async def test_the_task_mirrors_every_wave_of_appends(pipe: tuple[int, int]) -> None:
    import trio

    r, w = pipe
    out = KmsgOutput(w, "on")
    ring = DebugRing(1024)
    out.attach(ring)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(out.run, None)
        for wave in range(3):  # each wave must wake the task again
            storm(ring, 4)
            await trio.sleep(0.05)
            assert len(lines(r)) == 4, f"wave {wave}"
        nursery.cancel_scope.cancel()
    out.close()
