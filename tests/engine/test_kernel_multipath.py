"""The kernel source on native NVMe multipath, without a kernel: path disks name their namespace,
failed-over requests are path events, not namespace errors."""

from __future__ import annotations

import pytest

from nvmefs.engine.kernel import KernelEngine, KernelSpec
from nvmefs.linux import devices
from nvmefs.linux.devices import Disk
from nvmefs.linux.tracefs import EventFormat
from nvmefs.nvme.policy import LogPolicy
from nvmefs.store.events import NOTICE, HostEvent, NvmeEvent
from nvmefs.store.ring import EVENT, DebugRing
from tests.linux.tracepages import BLOCK_FORMAT, NVME_FORMAT, block_record, nvme_record, page

# The test VM's layout: namespace head nvme5n1 over the paths of controllers nvme5 and nvme7.
HEAD = Disk("nvme5n1", 259 << 20 | 5, 1, 512)
PATHS = {
    "nvme5c5n1": Disk("nvme5c5n1", 0, 1, 512, head="nvme5n1", ctrl="nvme5"),
    "nvme5c7n1": Disk("nvme5c7n1", 0, 1, 512, head="nvme5n1", ctrl="nvme7"),
}
OTHER = Disk("nvme0n1", 259 << 20, 1, 4096)
HOST_PATH_ERROR = 0x370  # the kernel's NVME_SC_HOST_PATH_ERROR: a path that is going away
ABORTED = 0x371  # NVME_SC_HOST_ABORTED_CMD: cancelled by a controller reset or removal


def engine(log: str = "errors", log_attempts: bool = False) -> KernelEngine:
    table = {d.name: d for d in (HEAD, OTHER, *PATHS.values())}
    e = KernelEngine(KernelSpec("kernel"), DebugRing(64), policy=LogPolicy(log),
                     log_attempts=log_attempts, disks=lambda: table)  # fmt: skip
    e.use_formats(
        EventFormat.parse("nvme", "nvme_complete_rq", NVME_FORMAT),
        EventFormat.parse("block", "block_rq_complete", BLOCK_FORMAT),
    )
    return e


def nvme_entries(e: KernelEngine) -> list[NvmeEvent]:
    return [ev for x in e.ring if isinstance(ev := x[EVENT], NvmeEvent)]


def host_entries(e: KernelEngine) -> list[HostEvent]:
    return [ev for x in e.ring if isinstance(ev := x[EVENT], HostEvent)]


def failed_read_on(path: str, ctrl: int, sector: int = 2048) -> bytes:
    """A direct read on the head that fails on one path: six attempts, then the block error,
    whose dev is 0 (the path disk has no device number)."""
    attempts = [nvme_record(0x281, n, disk=path, ctrl=ctrl, cid=200 + n) for n in range(6)]
    return page(*attempts, block_record(sector, 1, -61, "RS", dev=0))


def test_a_failed_read_on_a_path_names_the_namespace_its_controller_and_lbas() -> None:
    e = engine()
    e.page(0, failed_read_on("nvme5c7n1", 7))
    (ev,) = nvme_entries(e)
    assert (ev.disk, ev.nsid, ev.ctrl, ev.slba, ev.nlb) == ("nvme5n1", 1, "nvme7", 2048, 1)
    assert (ev.status.status, ev.retries, ev.op) == (0x281, 5, "read")
    assert e.stats.failed == {("nvme7", 1, 0x281): 1}
    assert e.failovers == 0 and host_entries(e) == []


def test_a_dev_0_block_event_is_not_taken_for_a_path_disk() -> None:
    # An admin error: no disk name, block dev 0. Path disks also have dev 0: it must not map.
    e = engine()
    e.page(0, page(nvme_record(0x4002, 0, qid=0, disk=""), block_record(0, 0, -95, "N", dev=0)))
    (ev,) = nvme_entries(e)
    assert (ev.disk, ev.nsid, ev.admin) == (None, None, True)


def test_a_path_error_failed_over_is_a_host_entry_not_an_error_of_the_namespace() -> None:
    e = engine()
    # The request fails over from nvme7's path (no block event: the kernel ends it with
    # success and requeues its bios), then succeeds on nvme5's path (filtered out: unseen).
    e.page(0, page(nvme_record(HOST_PATH_ERROR, 0, disk="nvme5c7n1", ctrl=7)))
    e.page(0, failed_read_on("nvme5c5n1", 5))  # a later, unrelated request's error
    assert [ev.ctrl for ev in nvme_entries(e)] == ["nvme5"]
    assert e.failovers == 1 and e.stats.retries == 5 + 1
    (h,) = host_entries(e)
    assert h.kind == NOTICE and "nvme5c7n1 of nvme5n1 through nvme7" in h.message
    assert (h.fields["path"], h.fields["disk"], h.fields["ctrl"]) == ("nvme5c7n1", "nvme5n1",
                                                                      "nvme7")  # fmt: skip
    assert (h.fields["status"], h.fields["failovers"]) == ("0x370", 1)
    assert e.stats.failed == {("nvme5", 1, 0x281): 1}  # the failover is no failed request


def test_a_failover_waiting_for_its_grace_period_is_one_too() -> None:
    e = engine()
    e.page(1, page(nvme_record(ABORTED, 0, disk="nvme5c7n1", ctrl=7)))
    assert e.failovers == 0  # not yet known: a block event could still end it
    e.expire(1e12)
    assert e.failovers == 1 and e.stats.retries == 1
    assert nvme_entries(e) == [] and len(host_entries(e)) == 1


def test_failovers_of_one_path_log_the_first_at_once_and_then_how_many_more() -> None:
    e = engine()
    for n in range(10):
        e.page(n % 2, page(nvme_record(HOST_PATH_ERROR, 0, disk="nvme5c7n1", ctrl=7, cid=n)))
    e.expire(1e12)
    assert e.failovers == 10 and len(host_entries(e)) == 1
    e._flush_failovers()
    first, more = host_entries(e)
    assert (first.fields["failovers"], more.fields["failovers"]) == (1, 9)
    assert "9 more requests failed over" in more.message
    e._flush_failovers()  # nothing new: nothing logged
    assert len(host_entries(e)) == 2 and nvme_entries(e) == []


@pytest.mark.parametrize(
    ("status", "retries", "flags", "why"),
    [(HOST_PATH_ERROR, 5, 0, "out of retries"), (HOST_PATH_ERROR | 0x4000, 0, 0, "DNR"),
     (HOST_PATH_ERROR, 0, 0x2, "passthrough: fail-fast")],
)  # fmt: skip
def test_a_path_error_the_kernel_completes_is_an_entry(
    status: int, retries: int, flags: int, why: str
) -> None:
    e = engine()
    rec = nvme_record(status, retries, disk="nvme5c7n1", ctrl=7, flags=flags)
    e.page(0, page(rec, block_record(2048, 1, -5, "RS", dev=0)))
    (ev,) = nvme_entries(e)
    assert (ev.status.status, ev.disk, ev.ctrl) == (status, "nvme5n1", "nvme7"), why
    assert e.failovers == 0 and host_entries(e) == []


def test_a_retried_media_error_on_a_path_is_a_retry_not_a_failover() -> None:
    e = engine(log_attempts=True)
    e.page(0, page(nvme_record(0x281, 0, disk="nvme5c7n1", ctrl=7)))
    e.page(0, page(nvme_record(0x281, 1, disk="nvme5c7n1", ctrl=7)))
    assert e.failovers == 0 and [ev.retries for ev in nvme_entries(e)] == [0]
    # A path error on a disk that is no path (no multipath): the kernel retries it.
    e.page(0, page(nvme_record(HOST_PATH_ERROR, 0, disk="nvme0n1")))
    e.page(0, page(nvme_record(HOST_PATH_ERROR, 1, disk="nvme0n1")))
    assert e.failovers == 0 and len(nvme_entries(e)) == 3


def test_the_kernels_max_retries_decides_when_a_path_error_is_final() -> None:
    e = engine()
    e.kernel_max_retries = 0  # nvme_core.max_retries=0: nothing is retried or failed over
    e.page(0, page(nvme_record(HOST_PATH_ERROR, 0, disk="nvme5c7n1", ctrl=7)))
    e.expire(1e12)
    assert e.failovers == 0


def test_paths_appearing_and_going_are_logged(monkeypatch: pytest.MonkeyPatch) -> None:
    e = engine()
    now = ["nvme5c5n1", "nvme5c7n1"]
    monkeypatch.setattr(devices, "paths", lambda head=None: list(now))
    e._paths = set(now)
    e._check_paths()
    assert host_entries(e) == []
    now.remove("nvme5c7n1")
    e._check_paths()
    now.append("nvme5c8n1")
    e._check_paths()
    gone, new = host_entries(e)
    assert gone.message == "path nvme5c7n1 of nvme5n1 through nvme7 is gone"
    assert (gone.fields["path"], gone.fields["ctrl"]) == ("nvme5c7n1", "nvme7")
    assert new.message == "path nvme5c8n1 of nvme5n1 through nvme8 appeared"


def test_a_spec_of_a_multipath_head_filters_its_paths() -> None:
    spec = KernelSpec("kernel:/dev/nvme5n1", disk="nvme5n1", multipath=True)
    assert spec.nvme_filter(LogPolicy()) == (
        'status != 0 && (disk == "nvme5n1" || disk ~ "nvme5c*n1")'
    )
