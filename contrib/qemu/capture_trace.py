#!/usr/bin/env python3
"""Record the guest kernel's own trace pages of known NVMe errors: the unit fixtures of the
trace consumers (tests/linux/test_trace_fixtures.py), one directory per kernel.

Run it inside the test VM, once per kernel:
    contrib/qemu/vm.py run [--kernel 6.12|5.10] -- .venv/bin/python contrib/qemu/capture_trace.py

In a tracefs instance of its own with the kernel source's events and filters as `log=all` sets
them (every nvme_complete_rq; block_rq_complete with an error, on NVMe disks or none), it does
on `nvmefs-err` (contrib/qemu/vm.py): successful direct reads, failed direct reads of a bad
LBA, failed direct writes of a bad LBA, a failed passthrough read of the bad LBA and a failed
admin command (Get Log Page of a log no controller has), udev's work held meanwhile; then
reads every CPU's trace_pipe_raw until it is empty. It writes, under tests/linux/traces/<release>/:
    nvme_complete_rq.format, block_rq_complete.format   the kernel's format files
    cpuN.pages                                           the pages of CPU N as read, each with
                                                         a u32 length before it
    manifest.json                                        what was done: the disk and controller,
                                                         the counts of each request, the kernel's
                                                         nvme_core max_retries, events lost
What the consumers must make of the pages follows from the manifest alone.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from nvmefs.engine.kernel import BLOCK_FILTER  # noqa: E402
from nvmefs.linux import devices, passthru, tracefs  # noqa: E402
from nvmefs.linux.passthru import HostBuffer  # noqa: E402
from nvmefs.nvme import commands  # noqa: E402

SERIAL = "nvmefs-err"
BAD_READ = 2048  # contrib/qemu/vm.py READ_ERROR_LBAS
BAD_WRITE = 8192  # WRITE_ERROR_LBAS
OK_READS, BAD_READS, BAD_WRITES = 8, 3, 2
NO_SUCH_LOG = 0xBF  # a vendor-specific log id QEMU's controller does not have


def dd(*args: str) -> int:
    return subprocess.run(["dd", *args, "status=none"], capture_output=True).returncode


def udev(args: list[str]) -> None:
    subprocess.run(["udevadm", *args], capture_output=True, timeout=60)


def passthrough(node: str, admin: bool, cmd: commands.Command) -> int:
    buf = HostBuffer(max(cmd.data_len, 4096))
    arg = bytearray(passthru.PASSTHRU64.size)
    passthru.PASSTHRU64.pack_into(arg, 0, *passthru.fields(cmd, buf.addr, None, 10.0), 0)
    fd = os.open(node, os.O_RDONLY)
    try:
        return passthru.ioctl(fd, admin, arg)
    finally:
        os.close(fd)


def main() -> int:
    ctrl = next(c for c in devices.controllers() if c.serial == SERIAL)
    ns = ctrl.namespaces[0]
    disk = os.path.basename(ns.block)
    lba_size = int(Path(f"/sys/block/{disk}/queue/logical_block_size").read_text())
    out = REPO / "tests" / "linux" / "traces" / os.uname().release
    out.mkdir(parents=True, exist_ok=True)
    root = tracefs.find(mount=True)
    inst = tracefs.Instance(root)
    inst.create(1024, guard=False)
    # udev probes a disk whose device node was closed after a write (its "watch"): blkid's
    # reads would fail at the bad LBA too, requests the manifest does not count. They wait
    # until the recording is over.
    udev(["control", "--stop-exec-queue"])
    try:
        for system, event in (("nvme", "nvme_complete_rq"), ("block", "block_rq_complete")):
            src = root / "events" / system / event / "format"
            (out / f"{event}.format").write_text(src.read_text())
        inst.enable("nvme", "nvme_complete_rq", "")
        inst.enable("block", "block_rq_complete", BLOCK_FILTER)
        done = {"ok_reads": 0, "bad_reads": 0, "bad_writes": 0}
        for i in range(OK_READS):
            rc = dd(f"if={ns.block}", "of=/dev/null", f"bs={lba_size}", f"skip={i}", "count=1",
                    "iflag=direct")  # fmt: skip
            done["ok_reads"] += rc == 0
        for _ in range(BAD_READS):
            rc = dd(f"if={ns.block}", "of=/dev/null", f"bs={lba_size}", f"skip={BAD_READ}",
                    "count=1", "iflag=direct")  # fmt: skip
            done["bad_reads"] += rc != 0
        for _ in range(BAD_WRITES):
            rc = dd("if=/dev/zero", f"of={ns.block}", f"bs={lba_size}", f"seek={BAD_WRITE}",
                    "count=1", "oflag=direct", "conv=notrunc")  # fmt: skip
            done["bad_writes"] += rc != 0
        read = commands.read(ns.nsid, BAD_READ, 1, lba_size)
        pt_read = passthrough(ns.block, False, read)
        log = commands.get_log_page(NO_SUCH_LOG, 512)
        pt_admin = passthrough(ctrl.node, True, log)
        time.sleep(1)
        pages: dict[int, list[bytes]] = {}
        for cpu in inst.cpus():
            fd = inst.open_raw(cpu)
            os.set_blocking(fd, False)
            got = pages.setdefault(cpu, [])
            try:
                while True:
                    try:
                        page = os.read(fd, 4096)
                    except OSError as e:
                        if e.errno != errno.EAGAIN:
                            raise
                        break
                    if not page:
                        break
                    got.append(page)
            finally:
                os.close(fd)
        lost = {cpu: inst.lost(cpu) for cpu in pages}
    finally:
        inst.remove()
        udev(["control", "--start-exec-queue"])
    for cpu, got in pages.items():
        (out / f"cpu{cpu}.pages").write_bytes(b"".join(struct.pack("<I", len(p)) + p for p in got))
    manifest = {
        "release": os.uname().release,
        "disk": disk,
        "ctrl_id": int(ctrl.name.removeprefix("nvme")),
        "nsid": ns.nsid,
        "lba_size": lba_size,
        "max_retries": devices.kernel_max_retries(),
        **done,
        "passthrough_read_status": pt_read,
        "admin_status": pt_admin,
        "lost_events": lost,
        "pages": {cpu: len(got) for cpu, got in pages.items()},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
