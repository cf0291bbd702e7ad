"""The kernel source's logic without a kernel: pairing, entries, policy, specs, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from nvmefs.engine import kernel
from nvmefs.engine.kernel import Attempt, KernelEngine, KernelSpec, Pairing, operation
from nvmefs.errors import UsageError
from nvmefs.linux.devices import Disk, kernel_dev
from nvmefs.linux.tracefs import EventFormat, Instance
from nvmefs.nvme.policy import LogPolicy
from nvmefs.store.events import NvmeEvent
from nvmefs.store.ring import EVENT, DebugRing
from tests.linux.test_tracefs import real_tracefs
from tests.linux.tracepages import BLOCK_FORMAT, NVME_FORMAT, block_record, nvme_record, page

DISK = Disk("nvme0n1", 259 << 20, 1, 4096)


def engine(log: str = "media", log_attempts: bool = False) -> KernelEngine:
    e = KernelEngine(KernelSpec("kernel"), DebugRing(64), policy=LogPolicy(log),
                     log_attempts=log_attempts, disks=lambda: {DISK.name: DISK})  # fmt: skip
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
    assert ok.status.ok and ok.slba is None


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


@pytest.mark.parametrize(
    ("rwbs", "qid", "flags", "op"),
    [("RS", 1, 0, "read"), ("WS", 1, 0, "write"), ("FWS", 1, 0, "write"), ("F", 1, 0, "flush"),
     ("D", 1, 0, "discard"), ("RA", 1, 0, "read"), ("N", 0, 2, "admin"),
     ("RS", 1, 2, "passthrough")],
)  # fmt: skip
def test_operation_names(rwbs: str, qid: int, flags: int, op: str) -> None:
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
