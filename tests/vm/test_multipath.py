"""In the VM: the kernel source on native NVMe multipath (nvmefs-mp: one subsystem, two
controllers mpa and mpb, one shared namespace with a read error at LBA 20480; see
contrib/qemu/vm.py). The kernel traces the head's requests under the hidden path disk each went
through: entries must still name the namespace, and a path going away is the path's event, not
an error of the namespace."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nvmefs.linux import devices
from tests.mounts import stats, wait_for
from tests.vm.guest import qmp
from tests.vm.test_kernel_source import kernel_mount, nvme_records, read_lba, records

BAD_LBA = 20480  # MP_READ_ERROR_LBAS in contrib/qemu/vm.py
SUBSYSTEMS = Path("/sys/class/nvme-subsystem")


def mp() -> tuple[set[str], str, list[str]]:
    """(the two controllers, the namespace head, its path disks) of nvmefs-mp."""
    ctrls = {c.name for c in devices.controllers() if c.serial == "nvmefs-mp"}
    heads = {hc[0] for p in devices.paths() if (hc := devices.path_disk(p)) and hc[1] in ctrls}
    assert len(ctrls) == 2 and len(heads) == 1, (ctrls, heads)
    (head,) = heads
    return ctrls, head, devices.paths(head)


@contextmanager
def round_robin(head: str) -> Iterator[None]:
    """Requests of `head` alternate between its paths (the default, numa, keeps them on one)."""
    (policy,) = [p for p in SUBSYSTEMS.glob("nvme-subsys*/iopolicy")
                 if (p.parent / head).exists()]  # fmt: skip
    before = policy.read_text().strip()
    policy.write_text("round-robin")
    try:
        yield
    finally:
        policy.write_text(before)


def good_reads(
    head: str, stop: threading.Event, failed: list[str], first: int = 0, count: int = 64
) -> None:
    """Direct reads of /dev/`head`, `count` 4 KiB blocks each from block `first` on, until
    `stop`, within the first 8 MiB: far from BAD_LBA (10 MiB), so no read of them is an error
    of the namespace. What dd says of any that failed goes to `failed`."""
    lba = first
    while not stop.is_set():
        p = subprocess.run(
            ["dd", f"if=/dev/{head}", "of=/dev/null", "bs=4096", f"count={count}",
             f"skip={lba}", "iflag=direct", "status=none"],
            capture_output=True, text=True,
        )  # fmt: skip
        if p.returncode != 0:
            failed.append(p.stderr)
        lba = (lba + count) % 2048


def test_failed_reads_on_the_head_name_the_namespace_its_lbas_and_the_path_taken(
    tmp_path: Path,
) -> None:
    ctrls, head, paths = mp()
    assert len(paths) == 2
    with round_robin(head), kernel_mount(tmp_path) as mnt:
        for _ in range(3):
            read_lba(f"/dev/{head}", BAD_LBA)
        wait_for(lambda: len(nvme_records(mnt)) >= 3, 15, "three entries")
        time.sleep(1.5)  # anything more would have arrived by now
        recs = nvme_records(mnt)
        assert [(r["status"], r["disk"], r["nsid"], r["slba"], r["nlb"], r["op"]) for r in recs] \
            == [("0x281", head, 1, BAD_LBA, 1, "read")] * 3  # fmt: skip
        assert {r["ctrl"] for r in recs} <= ctrls, recs
        # A media error is retried on its path, not failed over: no path entry.
        assert int(stats(mnt)["failovers"]) == 0
        assert not [r for r in records(mnt) if r.get("path")], records(mnt)


def test_a_path_removed_while_reads_go_on_is_a_host_entry_not_an_error(tmp_path: Path) -> None:
    _, head, paths = mp()
    with round_robin(head), kernel_mount(tmp_path) as mnt:
        stop = threading.Event()
        failed: list[str] = []

        reader = threading.Thread(target=good_reads, args=(head, stop, failed))
        reader.start()
        try:
            time.sleep(2)
            assert "error" not in qmp("device_del", id="mpb")
            wait_for(lambda: len(devices.paths(head)) == 1, 60, "the path to go")
            (left,) = devices.paths(head)
            (gone,) = set(paths) - {left}
            wait_for(lambda: any(f"path {gone} of {head}" in str(r.get("message"))
                                 for r in records(mnt)), 30, "the path's entry")  # fmt: skip
            time.sleep(2)  # reads go on over the path left
        finally:
            stop.set()
            reader.join()
            reply = qmp("device_add", driver="nvme", id="mpb", serial="nvmefs-mp", subsys="mps",
                        bus="rp2")  # fmt: skip
            assert "error" not in reply, reply
            wait_for(lambda: len(devices.paths(head)) == 2, 60, "the path to come back")
        assert failed == []  # the kernel failed every request over: none reached dd as an error
        assert nvme_records(mnt) == []  # and none is an error of the namespace
        host = [r for r in records(mnt) if r.get("path") == gone]
        assert host and all(r["disk"] == head for r in host), host
        # Requests in flight on the removed path, if any, were failed over: counted, and the
        # path's entries say how many (the first at once, the rest within a slow round).
        wait_for(
            lambda: (
                int(stats(mnt)["failovers"])
                == sum(int(str(r.get("failovers") or 0)) for r in records(mnt))
            ),
            15,
            "failovers accounted",
        )
        print(f"requests failed over: {stats(mnt)['failovers']}")


@contextmanager
def set_text(path: Path, value: str) -> Iterator[None]:
    before = path.read_text().strip()
    path.write_text(value)
    try:
        yield
    finally:
        path.write_text(before)


def test_a_path_that_stops_answering_fails_its_requests_over(tmp_path: Path) -> None:
    """A controller that falls silent under load (its PCI function stops decoding memory and
    mastering the bus, as a port that dropped the link looks to its driver): its requests in
    flight time out, the kernel cancels them (0x371, a path error) and fails them over to the
    other path, then resets the controller and it comes back."""
    ctrls, head, _ = mp()
    # mpb sits behind the root port rp2: its PCI function's parent is a PCI bridge.
    behind_a_bridge = [Path(f"/sys/class/nvme/{c}/device").resolve().parent.name.count(":") == 2
                       for c in ctrls]  # fmt: skip
    (ctrl,) = [c for c, bridged in zip(ctrls, behind_a_bridge, strict=True) if bridged]
    (path,) = [p for p in devices.paths(head) if (hc := devices.path_disk(p)) and hc[1] == ctrl]
    config = Path(f"/sys/class/nvme/{ctrl}/device/config")
    state = Path(f"/sys/class/nvme/{ctrl}/state")
    stop = threading.Event()
    failed: list[str] = []

    # The kernel waits 30 s for a request by default: 1 s on this path, to keep the test short.
    with (
        round_robin(head),
        set_text(Path(f"/sys/block/{path}/queue/io_timeout"), "1000"),
        kernel_mount(tmp_path) as mnt,
    ):
        readers = [threading.Thread(target=good_reads, args=(head, stop, failed, i * 512, 16))
                   for i in range(4)]  # fmt: skip
        for r in readers:
            r.start()
        try:
            time.sleep(1)
            with config.open("r+b", buffering=0) as f:  # PCI_COMMAND: memory and bus master off
                f.seek(4)
                command = int.from_bytes(f.read(2), "little")
                f.seek(4)
                f.write((command & ~0x6).to_bytes(2, "little"))
            wait_for(lambda: int(stats(mnt)["failovers"]) > 0, 60, "a failover")
            wait_for(lambda: state.read_text().strip() == "live", 60, "the controller back")
            time.sleep(1)  # reads go on over both paths again
        finally:
            stop.set()
            for r in readers:
                r.join()
        assert failed == []  # the kernel failed those requests over: none reached dd
        # None is an error of the namespace. The only NVMe errors are the controller's admin
        # commands the reset cancelled: the Aborts the kernel sent for the timed-out requests
        # (it logs "Abort status: 0x371" for each).
        assert all((r["admin"], r["ctrl"], r["status"], r["disk"]) == (True, ctrl, "0x371", None)
                   for r in nvme_records(mnt)), nvme_records(mnt)  # fmt: skip
        # The path's entries say how many failed over.
        wait_for(
            lambda: (
                int(stats(mnt)["failovers"])
                == sum(
                    int(str(r.get("failovers") or 0)) for r in records(mnt) if r.get("path") == path
                )
            ),
            15,
            "failovers accounted",
        )
        host = [r for r in records(mnt) if r.get("path") == path]
        assert all((r["disk"], r["ctrl"], r["status"]) == (head, ctrl, "0x371") for r in host), host
        print(f"requests failed over: {stats(mnt)['failovers']}")
