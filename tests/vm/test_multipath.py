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

        def reads() -> None:  # good blocks only: no read of this loop is an error
            lba = 0
            while not stop.is_set():
                p = subprocess.run(
                    ["dd", f"if=/dev/{head}", "of=/dev/null", "bs=4096", "count=64",
                     f"skip={lba}", "iflag=direct", "status=none"],
                    capture_output=True, text=True,
                )  # fmt: skip
                if p.returncode != 0:
                    failed.append(p.stderr)
                lba = (lba + 64) % 2048  # the first 8 MiB: far from LBA 20480 (10 MiB)

        reader = threading.Thread(target=reads)
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
