#!/usr/bin/env python3
"""The real-NVMe test bed: QEMU's emulated NVMe controllers, driven by the Debian kernel in a VM.

    contrib/qemu/vm.py run [--timeout S] -- COMMAND...  run COMMAND in a fresh VM; its exit status
    contrib/qemu/vm.py shell                             an interactive VM with the same devices

The VM (virtme-ng, TCG, 2 vCPUs, 2 GiB: with 1 GiB the guest, whose programs page in over
9p, was seen to freeze for good now and then) shares the host's root filesystem read-only, and this
checkout read-write at the same path, so the checkout's virtual environment runs in the guest.
Its controllers, found in the guest by serial number (/sys/class/nvme/*/serial):

    nvmefs-err   64 MiB, blkdebug read errors at LBAs 2048 and 40960, write errors at LBA 8192,
                 discard=unmap (DULBE after deallocate); behind a hot-pluggable PCIe root port
    nvmefs-pi    protection information namespace (ms=8, pi=1)
    nvmefs-zns   zoned namespace (1 MiB zones, 768 KiB capacity, 2 open, 4 active)
    nvmefs-ro    read-only drive
    nvmefs-slow  an ordinary disk whose drive `slow` can be throttled to stall commands
    nvmefs-big   256 MiB, an ordinary sparse disk: sequential throughput (contrib/bench)

QMP: a guest can ask the host to run a QMP command (block_set_io_throttle, device_del, ...) by
writing {"execute": ...} to WORK/qmp/req-N.json; the reply lands in WORK/qmp/rep-N.json.
(tests/vm/guest.py's qmp() wraps this.) WORK is contrib/qemu/work, at the same path in the guest.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
WORK = HERE / "work"
DISK_MB = 64

READ_ERROR_LBAS = (2048, 40960)
WRITE_ERROR_LBAS = (8192,)
# The guest's own partition scan reads sector 2048 at boot; QEMU reports each failure.
NOISE = ("aio failed", "blkdebug")


def kernel() -> str:
    kernels = sorted(glob.glob("/boot/vmlinuz-*"))
    if not kernels:
        sys.exit("vm: no kernel in /boot (apt-get install linux-image-amd64)")
    return kernels[-1]


def make_disks() -> None:
    WORK.mkdir(exist_ok=True)
    sizes = (("err", DISK_MB), ("pi", 16), ("zns", 16), ("ro", 16), ("slow", 16), ("big", 256))
    for name, size_mb in sizes:
        path = WORK / f"{name}.img"
        path.unlink(missing_ok=True)
        with open(path, "wb") as f:
            f.truncate(size_mb << 20)
    rules = []
    for event, lbas in (("read_aio", READ_ERROR_LBAS), ("write_aio", WRITE_ERROR_LBAS)):
        for lba in lbas:
            rules.append(f'[inject-error]\nevent = "{event}"\nerrno = "5"\nsector = "{lba}"\n'
                         'once = "off"\n')  # fmt: skip
    (WORK / "blkdebug.conf").write_text("\n".join(rules))
    qmp = WORK / "qmp"
    shutil.rmtree(qmp, ignore_errors=True)
    qmp.mkdir()


def qemu_opts(qmp_sock: Path) -> str:
    w = WORK
    return " ".join(
        [
            f"-qmp unix:{qmp_sock},server=on,wait=off",
            "-device pcie-root-port,id=rp1,chassis=1,slot=1",
            # -blockdev, not -drive: a -drive is deleted with its device on device_del, and the
            # hot-unplug test plugs the same disk back in.
            f"-blockdev driver=raw,node-name=err,discard=unmap,file.driver=blkdebug,"
            f"file.config={w}/blkdebug.conf,file.image.driver=file,"
            f"file.image.filename={w}/err.img,file.image.discard=unmap",
            "-device nvme,id=hot0,serial=nvmefs-err,drive=err,bus=rp1",
            f"-drive file={w}/pi.img,if=none,id=pi,format=raw",
            "-device nvme,id=pi0,serial=nvmefs-pi",
            "-device nvme-ns,bus=pi0,drive=pi,nsid=1,ms=8,mset=0,pi=1",
            f"-drive file={w}/zns.img,if=none,id=zns,format=raw",
            "-device nvme,id=zns0,serial=nvmefs-zns",
            "-device nvme-ns,bus=zns0,drive=zns,nsid=1,zoned=true,zoned.zone_size=1M,"
            "zoned.zone_capacity=768K,zoned.max_open=2,zoned.max_active=4",
            f"-drive file={w}/ro.img,if=none,id=ro,format=raw,readonly=on",
            "-device nvme,serial=nvmefs-ro,drive=ro",
            f"-drive file={w}/slow.img,if=none,id=slow,format=raw",
            "-device nvme,serial=nvmefs-slow,drive=slow",
            f"-drive file={w}/big.img,if=none,id=big,format=raw",
            "-device nvme,serial=nvmefs-big,drive=big",
        ]
    )


class QmpRelay(threading.Thread):
    """Runs the guest's QMP requests (files in WORK/qmp) against QEMU's QMP socket."""

    def __init__(self, sock_path: Path) -> None:
        super().__init__(daemon=True)
        self.sock_path = sock_path
        self.stop = threading.Event()
        self._sock: socket.socket | None = None
        self._file = None

    def _connect(self) -> bool:
        if self._sock is not None:
            return True
        if not self.sock_path.exists():
            return False
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(str(self.sock_path))
        except OSError:
            s.close()
            return False
        self._sock, self._file = s, s.makefile("rw")
        self._file.readline()  # greeting
        self._call({"execute": "qmp_capabilities"})
        return True

    def _call(self, request: dict[str, object]) -> dict[str, object]:
        assert self._file is not None
        self._file.write(json.dumps(request) + "\n")
        self._file.flush()
        while True:
            reply = json.loads(self._file.readline())
            if "return" in reply or "error" in reply:
                return reply  # type: ignore[no-any-return]

    def run(self) -> None:
        qdir = WORK / "qmp"
        while not self.stop.wait(0.1):
            for req in sorted(qdir.glob("req-*.json")):
                if not self._connect():
                    continue
                rep = qdir / req.name.replace("req-", "rep-")
                try:
                    reply = self._call(json.loads(req.read_text()))
                except (OSError, ValueError) as e:
                    reply = {"error": {"class": "RelayError", "desc": str(e)}}
                tmp = rep.with_suffix(".tmp")
                tmp.write_text(json.dumps(reply))
                tmp.rename(rep)
                req.unlink()


def vng_command(command: list[str], interactive: bool = False) -> list[str]:
    qmp_sock = WORK / "qmp.sock"
    vng = shutil.which("vng") or str(Path(sys.executable).parent / "vng")
    cmd = [
        vng, "--run", kernel(), "--disable-kvm", "--force-9p", "--memory", "2G", "--cpus", "2",
        f"--rwdir={REPO}", "--cwd", str(REPO),
        "--append=nvme_core.io_timeout=30",
        # = form: the value starts with a dash and must not be taken for an option
        f"--qemu-opts={qemu_opts(qmp_sock)}",
    ]  # fmt: skip
    if not interactive:
        cmd += ["--exec", " ".join(_quote(c) for c in command)]
    return cmd


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def _lock() -> int:
    """Wait for the test bed: one VM at a time uses WORK's disks and QMP socket."""
    WORK.mkdir(parents=True, exist_ok=True)
    fd = os.open(WORK / "vm.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("vm: waiting for another VM run of this checkout to end", file=sys.stderr)
        fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


# The exit status of a run whose guest printed nothing for --stall seconds (it is killed).
STALLED = 125


def run(command: list[str], timeout: float, interactive: bool = False, stall: float = 0) -> int:
    lock = _lock()
    try:
        return _run(command, timeout, interactive, stall)
    finally:
        os.close(lock)


def _run(command: list[str], timeout: float, interactive: bool, stall: float) -> int:
    make_disks()
    relay = QmpRelay(WORK / "qmp.sock")
    relay.start()
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    try:
        if interactive:
            return subprocess.call(vng_command(command, True), env=env)
        proc = subprocess.Popen(
            vng_command(command), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True,
        )  # fmt: skip
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout

        def kill_all() -> None:
            # vng's qemu (and whatever else it started) holds our pipe open: killing vng alone
            # would leave the loop below waiting for a qemu that never ends.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        killer = threading.Timer(timeout, kill_all)
        killer.start()
        stalled = threading.Event()

        def on_stall() -> None:
            stalled.set()
            kill_all()

        watchdog: threading.Timer | None = None
        try:
            for line in proc.stdout:
                if stall:  # every line the guest prints restarts the watchdog
                    if watchdog is not None:
                        watchdog.cancel()
                    watchdog = threading.Timer(stall, on_stall)
                    watchdog.start()
                if not any(n in line for n in NOISE):
                    sys.stdout.write(line)
                    sys.stdout.flush()
            code = proc.wait()
        finally:
            killer.cancel()
            if watchdog is not None:
                watchdog.cancel()
            kill_all()  # nothing of this VM outlives it, whatever vng left behind
        if stalled.is_set():
            print(f"vm: the guest printed nothing for {stall:g} s: stalled", file=sys.stderr)
            return STALLED
        if time.monotonic() > deadline:
            print(f"vm: timed out after {timeout:g} s", file=sys.stderr)
            return 124
        return code
    finally:
        relay.stop.set()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="contrib/qemu/vm.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("run", help="run a command in a fresh VM")
    r.add_argument("--timeout", type=float, default=900)
    r.add_argument("--stall", type=float, default=0, help="end a guest silent for S s (125)")
    r.add_argument("command", nargs=argparse.REMAINDER)
    sub.add_parser("shell", help="an interactive VM with the test devices")
    args = p.parse_args(argv)
    if args.what == "shell":
        return run([], 0, interactive=True)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("run: no COMMAND")
    return run(command, args.timeout, stall=args.stall)


if __name__ == "__main__":
    sys.exit(main())
