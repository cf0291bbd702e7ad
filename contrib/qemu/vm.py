#!/usr/bin/env python3
"""The real-NVMe test bed: QEMU's emulated NVMe controllers, driven by the Debian kernel in a VM.

    contrib/qemu/vm.py run [--timeout S] [--kernel K] [--storm] -- COMMAND...
                                        run COMMAND in a fresh VM; its exit status
    contrib/qemu/vm.py shell [--kernel K] [--storm]
                                        an interactive VM with the same devices
    contrib/qemu/vm.py fetch-kernel SUITE  download a Debian kernel (bullseye: 5.10,
                                        bookworm-backports: 6.12) into WORK/kernels/VERSION
    contrib/qemu/vm.py kernels             the kernels --kernel can name

--kernel K: a path to a kernel image, or a version (6.1.0-57-amd64) or its prefix (5.10, 6.12)
of a kernel in /boot or fetched into WORK/kernels; by default the newest kernel in /boot.
A fetched kernel stays out of /boot: its modules are in WORK/kernels/VERSION/lib/modules, where
virtme-ng finds them (it walks up from the image to the nearest lib/modules) and links them into
the guest's /lib/modules.

The VM (virtme-ng, TCG, 2 vCPUs run by one host thread (see qemu_opts), 2 GiB: with 1 GiB the
guest, whose programs page in over 9p, was seen to freeze for good now and then) shares the
host's root filesystem read-only, and this checkout read-write at the same path, so the
checkout's virtual environment runs in the guest.
Its controllers, found in the guest by serial number (/sys/class/nvme/*/serial):

    nvmefs-err   64 MiB, blkdebug read errors at LBAs 2048 and 40960, write errors at LBA 8192,
                 discard=unmap (DULBE after deallocate); behind a hot-pluggable PCIe root port
    nvmefs-pi    protection information namespace (ms=8, pi=1)
    nvmefs-zns   zoned namespace (1 MiB zones, 768 KiB capacity, 2 open, 4 active)
    nvmefs-ro    read-only drive
    nvmefs-slow  an ordinary disk whose drive `slow` can be throttled to stall commands
    nvmefs-big   256 MiB, an ordinary sparse disk: sequential throughput (contrib/bench)
    nvmefs-mp    TWO controllers (ids mpa, mpb) of one NVMe subsystem (nqn nvmefs-mp) sharing
                 namespace 1 (16 MiB, blkdebug read errors at LBA 20480): native multipath, the
                 kernel's head nvmeXn1 over the hidden path disks nvmeXcYn1; mpb sits behind
                 the hot-pluggable root port rp2 (mpa holds the namespace device: it stays)
    nvmefs-fs    320 MiB, blkdebug read errors at LBA 400000 (195 MiB in): for filesystems

With --storm (opt-in: not in the test suite's boots), one more:

    nvmefs-storm 64 MiB, EVERY read fails (a blkdebug rule with no sector: 0x281 Unrecovered
                 Read Error, retried 5 times by the kernel); writes succeed. An error storm
                 (contrib/bench/vm_storm.py). The guest's partition scan and udev probes of it
                 fail at boot, and QEMU reports each failed read on stderr ("aio failed", cut
                 out of the output here): that is why it is not there by default.
                 A defect of the bed: now and then (on 6.1 about once in eight 15 s storms at
                 QD32, ~4,000 failed requests/s; `immediately = "on"` in the rule does not
                 help) the commands in flight on one I/O queue stop completing, all of them,
                 while a read of another namespace of the controller on that queue still
                 completes (seen in the guest's debugfs: every request in_flight). Whether
                 QEMU or the guest loses them is not known. 6.1 times them out after 30 s,
                 resets the controller, they hang again, and it disables the controller for
                 the rest of the boot (vm_storm.py then stops its storms); 6.12 went through
                 30 storms without losing the controller, but 7 of them stalled (fio ran
                 62-73 s instead of 15).

QMP: a guest can ask the host to run a QMP command (block_set_io_throttle, device_del, ...) by
writing {"execute": ...} to WORK/qmp/req-N.json; the reply lands in WORK/qmp/rep-N.json.
(tests/vm/guest.py's qmp() wraps this.) WORK is contrib/qemu/work, at the same path in the guest.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import fcntl
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TextIO

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
WORK = HERE / "work"
DISK_MB = 64

READ_ERROR_LBAS = (2048, 40960)
WRITE_ERROR_LBAS = (8192,)
# Far from what a partition or signature probe reads (the head is probed whenever a path
# comes back): LBA 2048 there would fail every such probe.
MP_READ_ERROR_LBAS = (20480,)
# nvmefs-fs (320 MiB: XFS wants 300): a read error in the middle, where a filesystem's data goes.
FS_MB = 320
FS_READ_ERROR_LBAS = (400000,)
# nvmefs-storm (--storm only): every read fails.
STORM_MB = 64
# QEMU reports each injected failure on its stderr ("qemu-system-x86_64: aio failed: ..."; the
# guest's own partition scan reads sector 2048 at every boot). Written into the same pipe as
# the guest's output, the report can land inside a guest line: it is cut out, the rest kept.
QEMU_NOISE = re.compile(r"qemu-system-[\w-]+: [^\n]*(?:aio failed|blkdebug)[^\n]*\n?")
# The guest kernel's console is shown at this level (below 4: errors and worse - soft lockups,
# RCU stalls, hung tasks, oopses), so a guest that stalls says why where it can. What the
# kernel prints at boot before it reads the level (earlyprintk) is cut: lines from time 0 and
# the decompressor's.
CONSOLE_LOGLEVEL = 4
BOOT_NOISE = ("[    0.000000] ", "Memory KASLR", "Poking KASLR", " (edd=off", "Probing EDD")
# A line of the guest kernel's console (printk's timestamp first).
KERNEL_LINE = re.compile(r"\[ *\d+\.\d+\] ")
# The kernel's reports of the I/O errors the tests inject on purpose (each one ratelimited).
KERNEL_IO_ERRORS = re.compile(
    KERNEL_LINE.pattern + r".*(I/O Cmd\(|Admin Cmd\(|I/O error|medium error|protection error|"
    r"target error|space allocation error|Buffer I/O error)"
)
# Hung tasks are reported after this long: before the runner's stall limit ends the guest.
HUNG_TASK_S = 40


KERNELS = WORK / "kernels"
# The kernel --kernel chose (a version, its prefix or a path); None: the newest in /boot.
KERNEL: str | None = None

# Debian suites fetch-kernel knows: their archive lines, and the suite's kernel metapackage.
SUITES = {
    "bullseye": (
        "deb http://deb.debian.org/debian bullseye main",
        "deb http://deb.debian.org/debian-security bullseye-security main",
    ),
    "bookworm-backports": ("deb http://deb.debian.org/debian bookworm-backports main",),
}
META = "linux-image-amd64"


def fetched_kernels() -> dict[str, Path]:
    """Kernel version -> image of every kernel fetch-kernel unpacked into WORK/kernels."""
    out = {}
    for d in sorted(KERNELS.glob("*/boot")):
        version = d.parent.name
        image = d / f"vmlinuz-{version}"
        if image.is_file() and (d.parent / "lib" / "modules" / version).is_dir():
            out[version] = image
    return out


def kernel(choice: str | None = None) -> str:
    """The image to boot: `choice` (else KERNEL) as a path, a version or a version prefix of a
    kernel in /boot or WORK/kernels; without one, the newest kernel in /boot."""
    choice = choice if choice is not None else KERNEL
    if choice is None:
        kernels = sorted(glob.glob("/boot/vmlinuz-*"))
        if not kernels:
            sys.exit("vm: no kernel in /boot (apt-get install linux-image-amd64)")
        return kernels[-1]
    if os.sep in choice:
        if not Path(choice).is_file():
            sys.exit(f"vm: no kernel image {choice}")
        return str(Path(choice).resolve())
    known = {Path(k).name.removeprefix("vmlinuz-"): k for k in glob.glob("/boot/vmlinuz-*")}
    known.update((v, str(p)) for v, p in fetched_kernels().items())
    if choice in known:
        return known[choice]
    # A prefix must be one at a dot or dash boundary: 6.1 is not 6.12.
    matches = sorted(v for v in known if v.startswith(choice) and v[len(choice)] in ".-+")
    if not matches:
        sys.exit(f"vm: no kernel {choice} (have: {', '.join(sorted(known)) or 'none'};"
                 " contrib/qemu/vm.py fetch-kernel SUITE)")  # fmt: skip
    return known[matches[-1]]


def _apt_opts(suite_dir: Path) -> list[str]:
    """apt options for a private sources list and state under `suite_dir`: the host's own apt
    sources and lists are neither read nor changed, and its installed packages are not seen
    (an empty dpkg status: the host's newer linux-image-amd64 would be the candidate)."""
    return [
        f"-oDir::Etc::sourcelist={suite_dir / 'sources.list'}",
        "-oDir::Etc::sourceparts=-",
        f"-oDir::State::Lists={suite_dir / 'lists'}",
        f"-oDir::State::status={suite_dir / 'status'}",
        f"-oDir::Cache={suite_dir / 'cache'}",
        "-oAcquire::Languages=none",
        "-oAPT::Get::List-Cleanup=0",
    ]


def _apt(suite_dir: Path, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool, *_apt_opts(suite_dir), *args], capture_output=True, text=True, cwd=suite_dir
    )


def fetch_kernel(suite: str) -> Path:
    """Download SUITE's current amd64 kernel package by name and unpack it into
    WORK/kernels/VERSION (boot/vmlinuz-VERSION, lib/modules/VERSION with modules.dep); the
    image's path. Nothing is installed and /boot is not touched. Idempotent: a kernel
    already unpacked is kept."""
    if suite not in SUITES:
        sys.exit(f"vm: fetch-kernel: unknown suite {suite} (know: {', '.join(SUITES)})")
    suite_dir = KERNELS / "apt" / suite
    for sub in ("lists/partial", "cache/archives/partial"):
        (suite_dir / sub).mkdir(parents=True, exist_ok=True)
    (suite_dir / "sources.list").write_text("\n".join(SUITES[suite]) + "\n")
    (suite_dir / "status").touch()
    p = _apt(suite_dir, "apt-get", "update", "-q")
    if p.returncode != 0:
        sys.exit(f"vm: fetch-kernel {suite}: apt-get update failed:\n{p.stderr}")
    # The metapackage's candidate names this suite's current kernel package.
    p = _apt(suite_dir, "apt-cache", "show", "--no-all-versions", META)
    deps = [ln for ln in p.stdout.splitlines() if ln.startswith("Depends:")]
    pkgs = [d.strip().split()[0] for ln in deps for d in ln[len("Depends:") :].split(",")]
    images = [d for d in pkgs if d.startswith("linux-image-") and d != META]
    if p.returncode != 0 or not images:
        sys.exit(f"vm: fetch-kernel {suite}: no kernel package behind {META}:\n{p.stdout}"
                 f"{p.stderr}")  # fmt: skip
    package = images[0]
    version = package.removeprefix("linux-image-")
    dest = KERNELS / version
    image = dest / "boot" / f"vmlinuz-{version}"
    if image.is_file() and (dest / "lib/modules" / version / "modules.dep").is_file():
        print(f"vm: {version} already fetched: {image}")
        return image
    debs = suite_dir / "debs"
    debs.mkdir(exist_ok=True)
    for old in debs.glob("*.deb"):
        old.unlink()
    p = subprocess.run(["apt-get", *_apt_opts(suite_dir), "download", package],
                       capture_output=True, text=True, cwd=debs)  # fmt: skip
    found = sorted(debs.glob(f"{package}_*.deb"))
    if p.returncode != 0 or len(found) != 1:
        sys.exit(f"vm: fetch-kernel {suite}: apt-get download {package} failed:\n{p.stderr}")
    deb = found[0]
    tmp = KERNELS / f".{version}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
    # A .deb ships no modules.dep (its postinst runs depmod): virtme-ng needs one to find the
    # modules the guest loads (9p, virtio, nvme).
    subprocess.run(["depmod", "-a", "-b", str(tmp), version], check=True)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    deb.unlink()
    print(f"vm: fetched {package} from {suite}: {dest / 'boot' / f'vmlinuz-{version}'}")
    return image


def make_disks(storm: bool = False) -> None:
    WORK.mkdir(exist_ok=True)
    sizes = [("err", DISK_MB), ("pi", 16), ("zns", 16), ("ro", 16), ("slow", 16), ("big", 256),
             ("mp", 16), ("fs", FS_MB)]  # fmt: skip
    (WORK / "storm.img").unlink(missing_ok=True)  # an earlier --storm boot's, if any
    if storm:
        sizes.append(("storm", STORM_MB))
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
    mp_rules = [f'[inject-error]\nevent = "read_aio"\nerrno = "5"\nsector = "{lba}"\n'
                'once = "off"\n' for lba in MP_READ_ERROR_LBAS]  # fmt: skip
    (WORK / "blkdebug-mp.conf").write_text("\n".join(mp_rules))
    # A rule's event only arms it; from then on it fails reads and writes of its sector alike,
    # unless iotype says which: a filesystem must be able to write where reads fail.
    fs_rules = [f'[inject-error]\nevent = "read_aio"\niotype = "read"\nerrno = "5"\n'
                f'sector = "{lba}"\nonce = "off"\n' for lba in FS_READ_ERROR_LBAS]  # fmt: skip
    (WORK / "blkdebug-fs.conf").write_text("\n".join(fs_rules))
    # No sector: the rule fails every read of the drive (iotype: reads only, writes succeed).
    (WORK / "blkdebug-storm.conf").write_text(
        '[inject-error]\nevent = "read_aio"\niotype = "read"\nerrno = "5"\nonce = "off"\n'
    )
    qmp = WORK / "qmp"
    shutil.rmtree(qmp, ignore_errors=True)
    qmp.mkdir()


# The trees every guest process reads code from and nothing in the guest writes: exported once
# more, read-only, and mounted by the guest (see guest_script) with 9p's cache=loose over
# virtme-ng's uncached view. Uncached, every stat and open is a round trip to QEMU, a slow one
# under TCG: `import trio` took 23-27 s on a 5.10 guest (8-13 ms a stat, in the guest's 9p
# client) and 3.8 s with these cached; every nvmefs process a test starts imports again. A
# host-side change while a VM runs may go unseen by it (loose: no revalidation).
CACHED = {
    "nvmefs-usr": Path("/usr"),  # python3 and its standard library
    "nvmefs-venv": REPO / ".venv",  # the dependencies
    "nvmefs-pkg": REPO / "nvmefs",  # nvmefs itself (editable install), its compiled modules
}


def cached_exports() -> list[str]:
    return [
        f"-fsdev local,id={tag},path={path},security_model=none,readonly=on,multidevs=remap "
        f"-device virtio-9p-pci,fsdev={tag},mount_tag={tag}"
        for tag, path in CACHED.items()
    ]


def qemu_opts(qmp_sock: Path, storm: bool = False) -> str:
    w = WORK
    storm_opts = [
        f"-blockdev driver=raw,node-name=storm,file.driver=blkdebug,"
        f"file.config={w}/blkdebug-storm.conf,file.image.driver=file,"
        f"file.image.filename={w}/storm.img",
        "-device nvme,id=storm0,serial=nvmefs-storm,drive=storm",
    ]
    return " ".join(
        [
            f"-qmp unix:{qmp_sock},server=on,wait=off",
            # One host thread runs both vCPUs in turn. With a thread each (TCG's default), a
            # vCPU can run code another is patching: the kernel patches its text whenever a
            # tracepoint or static key is switched (the kernel source does), and a 6.12 guest
            # died of it ("Oops: int3" at a patched site, during a kernel-source test); the
            # guests that froze for good in kernel-source tests on a loaded machine fit it too.
            "-accel tcg,thread=single",
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
            # Native multipath: one subsystem, two controllers (QEMU 7.2 wants one serial for
            # both), one shared namespace. mpb can be unplugged; mpa holds the namespace
            # device, which would go with it.
            "-device pcie-root-port,id=rp2,chassis=2,slot=2",
            f"-blockdev driver=raw,node-name=mp,file.driver=blkdebug,"
            f"file.config={w}/blkdebug-mp.conf,file.image.driver=file,"
            f"file.image.filename={w}/mp.img",
            "-device nvme-subsys,id=mps,nqn=nvmefs-mp",
            "-device nvme,id=mpa,serial=nvmefs-mp,subsys=mps",
            "-device nvme,id=mpb,serial=nvmefs-mp,subsys=mps,bus=rp2",
            "-device nvme-ns,drive=mp,nsid=1,shared=on,bus=mpa",
            f"-blockdev driver=raw,node-name=fs,file.driver=blkdebug,"
            f"file.config={w}/blkdebug-fs.conf,file.image.driver=file,"
            f"file.image.filename={w}/fs.img",
            "-device nvme,serial=nvmefs-fs,drive=fs",
            *(storm_opts if storm else []),
            *cached_exports(),
        ]
    )


class QmpRelay(threading.Thread):
    """Runs the guest's QMP requests (files in WORK/qmp) against QEMU's QMP socket."""

    def __init__(self, sock_path: Path) -> None:
        super().__init__(daemon=True)
        self.sock_path = sock_path
        self.stop = threading.Event()
        self._sock: socket.socket | None = None
        self._file: TextIO | None = None
        self._lock = threading.Lock()  # the relay's thread and a stall report share the socket

    def hmp(self, command: str, cpu: int | None = None) -> str:
        """A human-monitor command's output ("" if QEMU cannot be reached)."""
        args: dict[str, object] = {"command-line": command}
        if cpu is not None:
            args["cpu-index"] = cpu
        with self._lock:
            if not self._connect():
                return ""
            reply = self._call({"execute": "human-monitor-command", "arguments": args})
        return str(reply.get("return", ""))

    def _connect(self) -> bool:
        if self._sock is not None:
            return True
        if not self.sock_path.exists():
            return False
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(30)  # a QEMU that stopped answering is an error, not a hang of the runner
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
                    with self._lock:
                        reply = self._call(json.loads(req.read_text()))
                except (OSError, ValueError) as e:
                    reply = {"error": {"class": "RelayError", "desc": str(e)}}
                tmp = rep.with_suffix(".tmp")
                tmp.write_text(json.dumps(reply))
                tmp.rename(rep)
                req.unlink()


# The guest copies its kernel's symbols here at start (the stall report names addresses with
# them: Debian's System.map is a stub, and KASLR moves the kernel at every boot).
KALLSYMS = WORK / "kallsyms.txt"


class Monitor(Protocol):
    def hmp(self, command: str, cpu: int | None = None) -> str: ...


def stall_report(
    relay: Monitor, kallsyms: Path = KALLSYMS, samples: int = 3, pause: float = 1.0
) -> list[str]:
    """Where a stalled guest's vCPUs are: each one's instruction pointer, sampled `samples`
    times `pause` seconds apart, and the kernel text addresses on its stack at the first,
    named from `kallsyms` (the guest's /proc/kallsyms). Spinning in one function and sleeping
    in the idle loop tell different stories."""
    names = symbols(kallsyms)
    out = []
    for i in range(samples):
        regs = relay.hmp("info registers -a")
        rips = re.findall(r"\bRIP=([0-9a-f]+)", regs)
        rsps = re.findall(r"\bRSP=([0-9a-f]+)", regs)
        where = ", ".join(f"cpu{n} {names(int(r, 16))}" for n, r in enumerate(rips))
        out.append(f"vm: stalled guest, sample {i + 1}: {where or 'no registers'}")
        if i == 0:
            for n, rsp in enumerate(rsps):
                words = re.findall(r"0x([0-9a-f]{16})", relay.hmp(f"x /96gx 0x{rsp}", cpu=n))
                calls = [names(int(w, 16)) for w in words]
                calls = [c for c in calls if not c.startswith("0x")]
                out.append(f"vm:   cpu{n} stack: {' < '.join(calls[:24]) or '?'}")
        if i + 1 < samples:
            time.sleep(pause)
    return out


def symbols(kallsyms: Path) -> Callable[[int], str]:
    """address -> "symbol+0xoff [module]" from a /proc/kallsyms copy (its text symbols), or
    the address in hex if no symbol starts within 64 KiB below it."""
    table: list[tuple[int, str, str]] = []
    with contextlib.suppress(OSError):
        for line in kallsyms.read_text(errors="replace").splitlines():
            fields = line.split()  # address, type, name, [module]
            if len(fields) >= 3 and fields[1] in ("t", "T"):
                with contextlib.suppress(ValueError):
                    module = f" {fields[3]}" if len(fields) > 3 else ""
                    table.append((int(fields[0], 16), fields[2], module))
    table.sort()
    starts = [t[0] for t in table]

    def name(addr: int) -> str:
        i = bisect.bisect_right(starts, addr) - 1
        if i < 0 or addr - starts[i] > 0x10000:
            return hex(addr)
        start, symbol, module = table[i]
        return f"{symbol}+{addr - start:#x}{module}"

    return name


def vng_command(command: list[str], interactive: bool = False, storm: bool = False) -> list[str]:
    qmp_sock = WORK / "qmp.sock"
    vng = shutil.which("vng") or str(Path(sys.executable).parent / "vng")
    image = kernel()
    cmd = [
        vng, "--run", image, "--disable-kvm", "--force-9p", "--memory", "2G", "--cpus", "2",
        f"--rwdir={REPO}", "--cwd", str(REPO),
        "--append=nvme_core.io_timeout=30",
        # --verbose puts the kernel console on stderr; the level after it keeps it to errors.
        "--verbose", f"--append=loglevel={CONSOLE_LOGLEVEL}",
        f"--append=sysctl.kernel.hung_task_timeout_secs={HUNG_TASK_S}",
        # Under TCG every Debian kernel (5.10, 6.1, 6.12) finds the vCPUs' TSCs unsynchronized
        # and falls back to the HPET clocksource, every read of which is a device QEMU emulates
        # under its big lock: 5.10's boot took 95 s instead of 15 and its tests were several
        # times slower, and while QEMU is busy elsewhere (a drive reset draining throttled I/O)
        # every clock read of the guest waits for it. QEMU's TSC follows host time: declared
        # reliable.
        "--append=tsc=reliable",
        # = form: the value starts with a dash and must not be taken for an option
        f"--qemu-opts={qemu_opts(qmp_sock, storm)}",
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
# With --stall, the command runs beside a loop printing this line every HEARTBEAT_S seconds
# (filtered from the output): a long test is not a silent guest, a guest that stopped is.
HEARTBEAT = "nvmefs-vm-heartbeat"
HEARTBEAT_S = 15
# What a boot may take before the first line, on top of --stall (TCG on a loaded machine).
BOOT_S = 240


def alive(line: str) -> bool:
    """Whether a line of the VM's output shows the guest's programs running: not the kernel's
    console (a locked-up kernel goes on reporting the lockup) nor QEMU's reports alone."""
    return not KERNEL_LINE.match(line) and bool(QEMU_NOISE.sub("", line).strip())


def shown(line: str) -> str:
    """What of a line of the VM's output is shown ("" for nothing). The heartbeat and QEMU's
    reports land inside pytest's lines ("test_x <beat>\nPASSED"): they are cut out, the rest
    kept; boot chatter and the kernel's reports of injected I/O errors are dropped whole."""
    line = QEMU_NOISE.sub("", line.replace(HEARTBEAT + "\n", ""))
    if line.startswith(BOOT_NOISE) or KERNEL_IO_ERRORS.match(line):
        return ""
    return line


# What the guest runs (guest_script's text): a file in the checkout, not the command line
# itself, which virtme-ng passes on the kernel's command line (base64), cut at 2048 bytes: a
# long pytest command (a retry's --deselect of every test that passed) came out truncated, and
# the guest ran nothing.
GUEST_SCRIPT = WORK / "guest-command.sh"


def guest_script(command: list[str], heartbeat: bool) -> str:
    """A shell script that runs `command` once the CACHED trees are mounted, with the heartbeat
    loop beside it if `heartbeat` (it ends with the command); it exits with the command's
    status."""
    mount = "mount -t 9p -o ro,trans=virtio,version=9p2000.L,access=any,msize=512000,cache=loose"
    lines = [f"{mount} {tag} {_quote(str(path))} || exit 1" for tag, path in CACHED.items()]
    lines.append(f"cat /proc/kallsyms > {_quote(str(KALLSYMS))} 2>/dev/null")
    if heartbeat:
        lines.append(f"(while sleep {HEARTBEAT_S}; do echo {HEARTBEAT}; done) & beat=$!")
    lines.append(" ".join(_quote(c) for c in command))
    lines.append("rc=$?")
    if heartbeat:
        lines.append("kill $beat")
    lines.append("exit $rc")
    return "\n".join(lines) + "\n"


def run(
    command: list[str],
    timeout: float,
    interactive: bool = False,
    stall: float = 0,
    storm: bool = False,
) -> int:
    lock = _lock()
    try:
        return _run(command, timeout, interactive, stall, storm)
    finally:
        os.close(lock)


def _run(command: list[str], timeout: float, interactive: bool, stall: float, storm: bool) -> int:
    make_disks(storm)
    relay = QmpRelay(WORK / "qmp.sock")
    relay.start()
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    try:
        if interactive:
            return subprocess.call(vng_command(command, True, storm), env=env)
        GUEST_SCRIPT.write_text(guest_script(command, heartbeat=bool(stall)))
        command = ["sh", str(GUEST_SCRIPT)]
        proc = subprocess.Popen(
            vng_command(command, storm=storm), env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
            start_new_session=True,
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
            try:
                report = stall_report(relay)
            except (OSError, ValueError) as e:
                report = [f"vm: no stall report: {e}"]
            print("\n".join(report), file=sys.stderr, flush=True)
            kill_all()

        # Started before the first line too: a guest that never boots is a stalled one.
        watchdog: threading.Timer | None = None
        if stall:
            watchdog = threading.Timer(stall + BOOT_S, on_stall)
            watchdog.start()
        try:
            for line in proc.stdout:
                if stall and alive(line):  # the guest's programs restart the watchdog
                    if watchdog is not None:
                        watchdog.cancel()
                    watchdog = threading.Timer(stall, on_stall)
                    watchdog.start()
                line = shown(line)
                if line:
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
    global KERNEL
    p = argparse.ArgumentParser(prog="contrib/qemu/vm.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("run", help="run a command in a fresh VM")
    r.add_argument("--timeout", type=float, default=900)
    r.add_argument("--stall", type=float, default=0, help="end a guest silent for S s (125)")
    kernel_help = "a kernel image, or a version or version prefix (5.10, 6.12): see `kernels`"
    r.add_argument("--kernel", help=kernel_help)
    storm_help = "add the nvmefs-storm controller, whose every read fails (see the docstring)"
    r.add_argument("--storm", action="store_true", help=storm_help)
    r.add_argument("command", nargs=argparse.REMAINDER)
    sh = sub.add_parser("shell", help="an interactive VM with the test devices")
    sh.add_argument("--kernel", help=kernel_help)
    sh.add_argument("--storm", action="store_true", help=storm_help)
    f = sub.add_parser("fetch-kernel", help="download a Debian suite's kernel by package name")
    f.add_argument("suite", choices=sorted(SUITES))
    sub.add_parser("kernels", help="the kernels --kernel can name")
    args = p.parse_args(argv)
    if args.what == "fetch-kernel":
        fetch_kernel(args.suite)
        return 0
    if args.what == "kernels":
        fetched = [str(i) for i in fetched_kernels().values()]
        for k in sorted(glob.glob("/boot/vmlinuz-*")) + fetched:
            print(k)
        return 0
    if args.kernel is not None:
        KERNEL = args.kernel
        print(f"vm: booting {kernel()}", file=sys.stderr)  # refuses an unknown one before the lock
    if args.what == "shell":
        return run([], 0, interactive=True, storm=args.storm)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("run: no COMMAND")
    return run(command, args.timeout, stall=args.stall, storm=args.storm)


if __name__ == "__main__":
    sys.exit(main())
