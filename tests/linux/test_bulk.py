"""The compiled loop's mechanics, on the host: which commands it sends, what it hands back.

No NVMe device here: a regular file refuses every passthrough command (-EOPNOTSUPP), so each
command comes back as a report; /dev/null, on kernels where it takes them, completes them all.
What the commands do on a real controller is the VM's part (tests/vm/test_bulk.py).
"""

from __future__ import annotations

import errno
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvmefs.linux import bulk, uring
from nvmefs.linux.bulk import Loop, Report
from nvmefs.nvme import lbas

pytestmark = pytest.mark.skipif(not uring.supported(), reason="no io_uring passthrough rings")


def test_the_compiled_loop_is_built_and_loads() -> None:
    assert bulk.unavailable() is None


@pytest.fixture
def refusing(tmp_path: Path) -> Iterator[int]:
    """A descriptor every passthrough command fails on."""
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    yield fd
    os.close(fd)


def loop_for(fd: int, qd: int = 4, nlb: int = 8, end: int = 100, **job: int) -> Loop:
    loop = Loop(qd, nlb * 512, 0)
    j = loop.job
    j.fd, j.nsid, j.opcode, j.lba_size, j.nlb, j.end, j.timeout_ms = (
        fd,
        1,
        0x02,
        512,
        nlb,
        end,
        1000,
    )
    for k, v in job.items():
        setattr(j, k, v)
    j.next = j.low = j.start
    return loop


def run_all(loop: Loop) -> list[Report]:
    out: list[Report] = []
    for _ in range(10_000):
        reports = loop.run(100)
        assert len(reports) <= loop.qd
        out += reports
        j = loop.job
        finished = j.sent >= j.count if j.random else j.next >= j.end
        if j.inflight == 0 and finished:
            return out
    raise AssertionError("the loop never finished its job")


def test_in_order_job_sends_each_block_of_its_range_once(refusing: int) -> None:
    loop = loop_for(refusing, start=4, end=100)
    reports = run_all(loop)
    loop.close()
    assert sorted((r.slba, r.nlb) for r in reports) == [(lba, 8) for lba in range(4, 100, 8)]
    assert {r.res for r in reports} == {-errno.EOPNOTSUPP}
    assert sorted(r.tag for r in reports) == list(range(1, 13))
    j = loop.job
    assert (j.next, j.low, j.sent, j.done, j.bytes_done) == (100, 100, 12, 12, 96 * 512)
    assert loop.take_successes() == (0, 0, 0)


def test_uneven_range_ends_with_a_short_command(refusing: int) -> None:
    loop = loop_for(refusing, end=21)
    reports = run_all(loop)
    loop.close()
    assert sorted((r.slba, r.nlb) for r in reports) == [(0, 8), (8, 8), (16, 5)]


def test_random_job_sends_count_commands_on_slot_boundaries(refusing: int) -> None:
    loop = loop_for(refusing, qd=8, start=16, end=16 + 8 * 50, random=1, count=300, seed=3)
    reports = run_all(loop)
    loop.close()
    assert len(reports) == 300 == loop.job.sent
    assert all(16 <= r.slba < 416 and (r.slba - 16) % 8 == 0 and r.nlb == 8 for r in reports)
    assert len({r.slba for r in reports}) > 40  # spread over the 50 slots


def test_random_job_sends_the_lbas_the_python_sequence_gives(refusing: int) -> None:
    # One seed, the same LBAs on both data paths (nvmefs/nvme/lbas.py is the definition).
    loop = loop_for(refusing, qd=8, start=16, end=16 + 8 * 1000, random=1, count=500, seed=99)
    reports = run_all(loop)
    state = int(loop.job.seed)
    loop.close()
    sent = [r.slba for r in sorted(reports, key=lambda r: r.tag)]
    assert sent == list(itertools.islice(lbas.random_lbas(99, 16, 16 + 8 * 1000, 8), 500))
    s = 99  # and the loop's state is where the Python generator stands after as many draws
    for _ in range(500):
        s, _slba = lbas.random_lba(s, 16, 1000, 8)
    assert state == s


def test_in_order_job_sends_the_python_sequence(refusing: int) -> None:
    loop = loop_for(refusing, start=3, end=101)
    reports = run_all(loop)
    loop.close()
    sent = [(r.slba, r.nlb) for r in sorted(reports, key=lambda r: r.tag)]
    assert sent == list(lbas.in_order(3, 101, 8))


def test_budget_and_stop_hold_back_submission(refusing: int) -> None:
    loop = loop_for(refusing, budget=3 * 8 * 512)
    run_all_until_idle(loop)
    assert loop.job.sent == 3 and loop.job.budget == 0
    loop.job.budget = bulk.UNLIMITED
    loop.job.stop = 1
    assert loop.run(100) == [] and loop.job.sent == 3
    loop.job.stop = 0
    run_all(loop)
    assert loop.job.sent == 13
    loop.close()
    loop.close()  # twice is harmless


def run_all_until_idle(loop: Loop) -> None:
    while True:
        loop.run(100)
        if loop.job.inflight == 0:
            return


def test_successes_are_counted_not_reported_unless_all_are_asked_for() -> None:
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        probe = loop_for(fd, end=8)
        refused = run_all(probe)
        probe.close()
        if refused:
            pytest.skip(f"this kernel refuses passthrough on /dev/null ({refused[0].res})")
        loop = loop_for(fd, end=96)
        assert run_all(loop) == []
        ok, lat_total, lat_max = loop.take_successes()
        assert ok == 12 and 0 < lat_max <= lat_total
        assert loop.take_successes() == (0, 0, 0)
        loop.close()
        loop = loop_for(fd, end=96, report_all=1)
        reports = run_all(loop)
        loop.close()
        assert sorted(r.slba for r in reports) == list(range(0, 96, 8))
        assert {r.res for r in reports} == {0}
    finally:
        os.close(fd)


def test_a_read_larger_than_its_buffer_is_refused(refusing: int) -> None:
    loop = Loop(4, 4096, 0)
    j = loop.job
    j.fd, j.nlb, j.opcode, j.lba_size, j.end = refusing, 16, 0x02, 512, 64  # 8 KiB reads
    with pytest.raises(OSError) as err:
        loop.run(100)
    assert err.value.errno == errno.EINVAL and j.sent == 0
    loop.close()
