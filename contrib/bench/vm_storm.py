#!/usr/bin/env python3
"""An error storm in the test VM: the `kernel` source beside trace-cmd, and log=all's QD1 cost.

Run it through the test bed with the storm controller (nvmefs-storm: every read fails, 0x281,
five retries each; contrib/qemu/vm.py --storm), so that every figure comes from one boot:
    contrib/qemu/vm.py run --storm --timeout 1800 --stall 300 -- \\
        .venv/bin/python contrib/bench/vm_storm.py [--seconds 15] [--rounds 3] [--json F]
        [--nvmefs-opts OPTS]... [--no-storm] [--no-qd1]
(here: about 2 minutes per round with the defaults, 2.5 for the QD1 part, 20 s to boot).

The storm: `fio --rw=randread --bs=4k --iodepth=32 --ioengine=io_uring --direct=1
--continue_on_error=all --ignore_error=61,5,84:5 --time_based --runtime=S` on the storm
namespace (--time_based: without it fio stops once every block of the 64 MiB namespace has
failed once). Each round runs it three times, in an order that rotates from round to round so
that the machine's drift hits all three:
- `fio` alone;
- `nvmefs`: under `nvmefs kernel MNT -o journal=J` (the default policy; --nvmefs-opts adds
  options, e.g. trace_buffer_kb=8192; given again, each more set is one more run per round,
  its figures named with a suffix), started before fio and given 3 s to come up. After fio
  the daemon is left until it is quiet (its counters still for QUIET_S, and at least
  AFTER_S: it checks the kernel's lost-event counts every 5 s); then its `stats` and
  `nvmefs.prom` are read, it is unmounted, and its journal is read. Accounted failed requests:
  the journal's error entries of the storm disk plus their `repeats` (folded requests; the
  kernel log's entries that backfill adds at start, `origin: kmsg`, are not counted: they are
  earlier storms); also nvmefs_errors_total of the storm namespace over the storm (the counts
  the trace consumer saw, logged or not), `trace_lost_events` over the storm and the `lost`
  entries, and the daemon's vCPU: its CPU seconds (utime + stime of all its threads, and of
  children it reaped) from fio's start until it is quiet, over fio's run time;
- `trace-cmd`: `trace-cmd record -B INSTANCE` on the same two events with the same filters as
  nvmefs's instance (nvmefs.engine.kernel: `status != 0`, and the block filter), into a file
  on the guest's /tmp. Kept failed requests: the storm disk's block_rq_complete events in
  `trace-cmd report`; lost events: `overrun` + `dropped events` of `trace-cmd report --stat`
  (the same per-CPU counts nvmefs reads); its vCPU: CPU seconds of trace-cmd and its per-CPU
  recorder processes (/proc) from fio's start until SETTLE_S after fio, over fio's run time.
  Its whole life's CPU (start, idle polling, writing trace.dat at the end) is given too.

fio's failed requests are its JSON's `total_err` (with continue_on_error fio counts each
failed I/O there; every I/O fails, so it equals `read.total_ios`). It is checked against the
kernel's own count, which loses nothing: a histogram trigger (`hist:keys=error ... if error !=
0 && dev == <storm disk>`) on block:block_rq_complete, and one on nvme:nvme_complete_rq for the
attempts, in a tracefs instance of this script's that records nothing (the events stay soft
disabled there: the trigger counts in the kernel, no ring buffer is involved). It is set for
all three runs alike.

log=all at QD1: fio 4 KiB random reads, QD1, io_uring through the block layer on the healthy
`nvmefs-slow` namespace (contrib/bench/vm_iops.py's fio_iops), alternating a run without and a
run under a `log=all` mount; each traced run's IOPS over the mean of the two untraced runs
around it; the median of those ratios is vm_kernel_source_log_all_overhead_qd1.

Prints one row per run and the medians (with their spread over the rounds: the machine is
shared and the storm's rate moves by 10-20% from run to run); --json writes the figures.

The test bed's storm drive now and then stops completing commands (contrib/qemu/vm.py,
nvmefs-storm). On Debian's 6.1 the guest disables the controller about 90 s later: the run it
hit is reported as failed, no storm runs follow, the figures are those of the runs before, and
the exit status is 3 (boot again). On 6.12 (--kernel 6.12) the storm goes on after a stall of
30 s or more: a run whose fio took over STALLED_X times its --runtime is shown and not counted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import vm_iops  # noqa: E402

from nvmefs.engine.kernel import BLOCK_FILTER, KernelSpec  # noqa: E402
from nvmefs.linux import devices, tracefs  # noqa: E402
from nvmefs.nvme.policy import LogPolicy  # noqa: E402

STORM = "nvmefs-storm"
HEALTHY = vm_iops.SERIAL  # nvmefs-slow: a plain disk
# The filters nvmefs's instance sets under the default policy: trace-cmd gets the same.
NVME_FILTER = KernelSpec("kernel").nvme_filter(LogPolicy("media"))
FIO_STORM = [
    "--rw=randread", "--bs=4k", "--iodepth=32", "--ioengine=io_uring", "--direct=1",
    "--continue_on_error=all", "--ignore_error=61,5,84:5", "--time_based",
]  # fmt: skip
QUIET_S = 3.0  # the daemon is quiet once its counters stayed still this long...
AFTER_S = 6.0  # ...and this long after fio at least (its lost-event check runs every 5 s)
QUIET_MAX_S = 300.0
SETTLE_S = 2.0  # trace-cmd's recorders read what is left in the buffers
STALLED_X = 1.3  # a storm whose fio ran this many times its --runtime met the bed's stall
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- parsing (pure: tests/test_vm_storm_bench.py) -----------------------------------------------


@dataclass
class FioStorm:
    failed: int  # total_err: failed I/Os
    ios: int  # read.total_ios: every I/O issued and completed, failed or not
    runtime_s: float  # the job's run time


def parse_fio(stdout: str) -> FioStorm:
    """fio's JSON output (anything printed before the JSON object is skipped)."""
    job = json.loads(stdout[stdout.index("{") :])["jobs"][0]
    return FioStorm(
        failed=int(job.get("total_err", 0)),
        ios=int(job["read"]["total_ios"]),
        runtime_s=float(job["job_runtime"]) / 1000,
    )


def parse_hist(text: str) -> int:
    """The hits of a tracefs histogram (its `hist` file): the Totals line, else the sum of the
    entries' hitcounts."""
    m = re.search(r"^\s*Hits:\s*(\d+)", text, re.M)
    if m:
        return int(m.group(1))
    return sum(int(n) for n in re.findall(r"hitcount:\s*(\d+)", text))


def parse_hist_keys(text: str) -> dict[int, int]:
    """A one-key tracefs histogram's hitcounts by key, as signed 64-bit numbers (the kernel
    prints a negative errno as its unsigned bit pattern)."""
    out: dict[int, int] = {}
    for key, n in re.findall(r"^\{\s*\w+:\s*(\d+)\s*\}\s*hitcount:\s*(\d+)", text, re.M):
        k = int(key)
        out[k - (1 << 64) if k >= 1 << 63 else k] = int(n)
    return out


def parse_stats(text: str) -> dict[str, str]:
    """A mount's `stats` file: one `name value` a line."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key:
            out[key] = value
    return out


_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def prom_errors(text: str, ctrl: str, nsid: int) -> int:
    """nvmefs_errors_total of one namespace, every status summed, from a Prometheus text."""
    total = 0
    for line in text.splitlines():
        if not line.startswith("nvmefs_errors_total{"):
            continue
        labels_text, _, value = line.rpartition("}")
        labels = dict(_LABEL.findall(labels_text))
        if labels.get("ctrl") == ctrl and labels.get("nsid") == str(nsid):
            total += int(float(value.split()[0]))
    return total


@dataclass
class JournalCount:
    entries: int = 0  # error entries of the disk seen by the source
    repeats: int = 0  # the requests folded into them
    kmsg: int = 0  # entries of the disk from the kernel log (backfill): not counted
    lost: int = 0  # trace events the `lost` entries report
    lost_entries: int = 0
    other_disks: dict[str, int] = field(default_factory=dict)  # error entries of other disks

    @property
    def accounted(self) -> int:
        return self.entries + self.repeats


def count_journal(lines: Iterable[str], disk: str) -> JournalCount:
    """The error entries of `disk` in journal lines (JSON lines; lines cut short or not JSON
    are passed over), their `repeats`, and the `lost` entries."""
    c = JournalCount()
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict) or rec.get("replayed"):
            continue
        kind = rec.get("kind")
        if kind == "lost":
            c.lost_entries += 1
            c.lost += int(rec.get("lost", 0))
        elif kind == "nvme":
            if rec.get("disk") != disk:
                name = str(rec.get("disk"))
                c.other_disks[name] = c.other_disks.get(name, 0) + 1
            elif rec.get("origin") == "kmsg":
                c.kmsg += 1
            else:
                c.entries += 1
                c.repeats += int(rec.get("repeats", 0))
    return c


@dataclass
class ReportCount:
    block: int = 0  # block_rq_complete events of the disk: failed requests kept
    nvme: int = 0  # nvme_complete_rq events of the disk: failed attempts kept
    dropped: int = 0  # events trace-cmd says were dropped between pages
    lost_markers: int = 0  # pages marked "[LOST EVENTS]" (no count known)
    # Per CPU: the disk's block events kept and the time of the last (a loss at the end of the
    # recording shows as one CPU's stream ending early).
    per_cpu: dict[int, tuple[int, float]] = field(default_factory=dict)


_BLOCK = re.compile(r"block_rq_complete:\s+(\d+),(\d+)\s")
_CPU_TIME = re.compile(r"\[(\d+)\]\s+(\d+\.\d+):")
_DROPPED = re.compile(r"\[(\d+) EVENTS DROPPED\]")


def count_tracecmd_report(lines: Iterable[str], dev: tuple[int, int], disk: str) -> ReportCount:
    """The storm disk's events in `trace-cmd report` lines: block events by major,minor,
    nvme events by `disk=` (libtraceevent cannot print the nvme event's format, so it shows
    the fields: `[FAILED TO PARSE] disk=nvme7n1 ctrl_id=7 ...`)."""
    c = ReportCount()
    want = f"disk={disk} "
    for line in lines:
        if "block_rq_complete:" in line:
            m = _BLOCK.search(line)
            if m and (int(m.group(1)), int(m.group(2))) == dev:
                c.block += 1
                t = _CPU_TIME.search(line)
                if t:
                    cpu = int(t.group(1))
                    n, _ = c.per_cpu.get(cpu, (0, 0.0))
                    c.per_cpu[cpu] = (n + 1, float(t.group(2)))
        elif "nvme_complete_rq:" in line:
            if want in line:
                c.nvme += 1
        elif "EVENTS DROPPED" in line:
            m = _DROPPED.search(line)
            c.dropped += int(m.group(1)) if m else 0
        elif "LOST EVENTS" in line:
            c.lost_markers += 1
    return c


def proc_cpu_s(stat: str, children: bool = True) -> float:
    """CPU seconds of a process from its /proc/PID/stat: utime + stime (every thread), and
    with `children` cutime + cstime (children it waited for)."""
    fields = stat.rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def median_spread(values: list[float]) -> tuple[float, float]:
    """The median and the spread (max - min) / median, in percent."""
    med = statistics.median(values)
    return med, (max(values) - min(values)) / med * 100 if med else 0.0


# -- the guest's side ---------------------------------------------------------------------------


def storm_disk() -> tuple[devices.Controller, str, tuple[int, int]]:
    """The storm controller, its namespace's disk name and the disk's major, minor."""
    for ctrl in devices.controllers():
        if ctrl.serial == STORM:
            disk = os.path.basename(ctrl.namespaces[0].block)
            major, minor = Path(f"/sys/block/{disk}/dev").read_text().split(":")
            return ctrl, disk, (int(major), int(minor))
    sys.exit(f"vm_storm: no controller {STORM}: run me in `contrib/qemu/vm.py run --storm`")


def process_tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its descendants now (utime + stime of each)."""
    parents: dict[int, int] = {}
    stats: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            text = (d / "stat").read_text()
        except OSError:
            continue
        stats[int(d.name)] = text
        parents[int(d.name)] = int(text.rsplit(")", 1)[1].split()[1])
    tree, todo = set(), [pid]
    while todo:
        p = todo.pop()
        if p in tree or p not in stats:
            continue
        tree.add(p)
        todo += [c for c, pp in parents.items() if pp == p]
    return sum(proc_cpu_s(stats[p], children=False) for p in tree)


class KernelCount:
    """The kernel's count of the storm disk's failed requests and attempts: histogram triggers
    in an instance of our own that records nothing. Invariant: entered, the instance exists;
    left (or failed to enter), it is gone."""

    @staticmethod
    def available() -> bool:
        """Whether this kernel has histogram triggers (Debian's 5.10 is built without)."""
        return (tracefs.find(mount=True) / "events/block/block_rq_complete/hist").exists()

    def __init__(self, disk: str, dev: tuple[int, int]) -> None:
        kdev = devices.kernel_dev(*dev)
        self.path = tracefs.find(mount=True) / "instances" / f"vm-storm-count-{os.getpid()}"
        self.triggers = {
            "block/block_rq_complete": f"hist:keys=error if error != 0 && dev == {kdev}",
            "nvme/nvme_complete_rq": f'hist:keys=status if status != 0 && disk == "{disk}"',
        }

    def __enter__(self) -> KernelCount:
        self.path.mkdir()
        try:
            for event, trigger in self.triggers.items():
                (self.path / "events" / event / "trigger").write_text(trigger)
        except BaseException:
            self.__exit__()
            raise
        return self

    def read(self) -> tuple[int, int]:
        """(failed requests, failed attempts) so far."""
        ev = self.path / "events"
        return (
            parse_hist((ev / "block/block_rq_complete/hist").read_text()),
            parse_hist((ev / "nvme/nvme_complete_rq/hist").read_text()),
        )

    def failed_by_error(self) -> dict[int, int]:
        """The failed requests so far by the block layer's error (a negative errno)."""
        return parse_hist_keys((self.path / "events/block/block_rq_complete/hist").read_text())

    def __exit__(self, *exc: object) -> None:
        for event, trigger in self.triggers.items():
            with contextlib.suppress(OSError):
                (self.path / "events" / event / "trigger").write_text("!" + trigger)
        with contextlib.suppress(OSError):
            self.path.rmdir()


class RunFailed(Exception):
    """One storm run could not be measured (the others go on)."""


def fio_storm(path: str, seconds: float) -> FioStorm:
    out = subprocess.run(
        ["fio", "--name=storm", f"--filename={path}", *FIO_STORM, f"--runtime={seconds:g}",
         "--output-format=json"],
        capture_output=True, text=True,
    )  # fmt: skip
    if out.returncode != 0:
        lines = (out.stderr or out.stdout).splitlines()
        io_u = [ln for ln in lines if "io_u error" in ln]
        rest = [ln for ln in lines if "io_u error" not in ln]
        said = "; ".join(rest[:6] + io_u[:1]) + (f" ({len(io_u)} io_u error lines)" if io_u else "")
        raise RunFailed(f"fio exited with {out.returncode}: {said}")
    return parse_fio(out.stdout)


KERNEL_NOISE = ("I/O Cmd(", "critical medium error", "callbacks suppressed", "Buffer I/O error")


def bed_state(ctrl: devices.Controller, disk: str) -> str:
    """ "" while the storm controller is live and its disk has its size; else what is wrong,
    with the kernel log's last lines that are not the storm's own error reports."""
    state = Path(f"/sys/class/nvme/{ctrl.name}/state")
    size = Path(f"/sys/block/{disk}/size")
    try:
        now = state.read_text().strip(), int(size.read_text())
    except (OSError, ValueError) as e:
        now = (f"unreadable: {e}", 0)
    if now[0] == "live" and now[1] > 0:
        return ""
    log = subprocess.run(["dmesg"], capture_output=True, text=True).stdout.splitlines()
    log = [ln for ln in log if not any(n in ln for n in KERNEL_NOISE)]
    return f"{ctrl.name} state {now[0]}, {disk} {now[1]} sectors; dmesg:\n" + "\n".join(log[-25:])


@dataclass
class Run:
    variant: str
    fio: FioStorm
    kernel_failed: int  # the kernel's count over the run
    kernel_attempts: int
    kept: int | None = None  # nvmefs: accounted (entries + repeats); trace-cmd: block events
    lost: int | None = None  # trace events lost
    vcpu: float | None = None
    extra: dict[str, float | str] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.fio.failed / self.fio.runtime_s

    @property
    def ratio(self) -> float | None:
        return None if self.kept is None else self.kept / self.fio.failed


def run_fio(path: str, seconds: float, count: KernelCount) -> Run:
    k0 = count.read()
    fio = fio_storm(path, seconds)
    k1 = count.read()
    return Run("fio", fio, k1[0] - k0[0], k1[1] - k0[1])


def unmount(mnt: Path, pid: int | None) -> None:
    """Unmount a kernel mount and wait for its daemon to be gone (its instance removed, its
    journal flushed)."""
    subprocess.run(["umount", str(mnt)], check=True)
    deadline = time.monotonic() + 60
    while pid is not None and Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    with contextlib.suppress(OSError):
        mnt.rmdir()


def wait_quiet(mnt: Path, fio_end: float) -> dict[str, str]:
    """Wait until the daemon's counters stayed still for QUIET_S, AFTER_S after fio at least;
    its stats then."""
    keys = ("completions", "ring_appended", "logged", "trace_lost_events")
    last: tuple[str, ...] = ()
    still_since = time.monotonic()
    while True:
        st = parse_stats((mnt / "stats").read_text())
        now = time.monotonic()
        seen = tuple(st.get(k, "") for k in keys)
        if seen != last:
            last, still_since = seen, now
        if now - still_since >= QUIET_S and now - fio_end >= AFTER_S:
            return st
        if now - fio_end > QUIET_MAX_S:
            print(f"vm_storm: the daemon was still busy {QUIET_MAX_S:g} s after fio", flush=True)
            return st
        time.sleep(0.5)


def read_journal(journal: Path) -> Iterator[str]:
    """Every line of a journal and its rotated files (PATH, PATH.1, ...)."""
    rotated = [p for p in journal.parent.glob(journal.name + ".*") if p.suffix[1:].isdigit()]
    files = [journal, *sorted(rotated, key=lambda p: int(p.suffix[1:]))]
    for f in files:
        with open(f, errors="replace") as fh:
            yield from fh


def run_nvmefs(
    path: str, ctrl: devices.Controller, disk: str, seconds: float, count: KernelCount,
    extra_opts: str,
) -> Run:  # fmt: skip
    jdir = Path(tempfile.mkdtemp(prefix="vm-storm-journal-"))
    try:
        return _run_nvmefs(jdir, path, ctrl, disk, seconds, count, extra_opts)
    finally:
        shutil.rmtree(jdir, ignore_errors=True)


def _run_nvmefs(
    jdir: Path, path: str, ctrl: devices.Controller, disk: str, seconds: float,
    count: KernelCount, extra_opts: str,
) -> Run:  # fmt: skip
    journal = jdir / "nvmefs.jsonl"
    opts = f"journal={journal}" + (f",{extra_opts}" if extra_opts else "")
    try:
        mnt = vm_iops.kernel_mount(opts)
    except subprocess.CalledProcessError as e:
        raise RunFailed(f"nvmefs kernel -o {opts} failed ({e.returncode})") from None
    nsid = ctrl.namespaces[0].nsid
    pid = None
    try:
        st0 = parse_stats((mnt / "stats").read_text())
        pid = int(st0["pid"])
        prom0 = prom_errors((mnt / "nvmefs.prom").read_text(), ctrl.name, nsid)
        cpu0 = proc_cpu_s(Path(f"/proc/{pid}/stat").read_text())
        k0 = count.read()
        t0 = time.monotonic()
        fio = fio_storm(path, seconds)
        cpu_fio = proc_cpu_s(Path(f"/proc/{pid}/stat").read_text())
        fio_wall = time.monotonic() - t0
        st = wait_quiet(mnt, time.monotonic())
        quiet_after = time.monotonic() - t0
        cpu1 = proc_cpu_s(Path(f"/proc/{pid}/stat").read_text())
        k1 = count.read()
        prom1 = prom_errors((mnt / "nvmefs.prom").read_text(), ctrl.name, nsid)
    finally:
        unmount(mnt, pid)
    jc = count_journal(read_journal(journal), disk)
    given = dict(o.split("=", 1) for o in extra_opts.split(",") if "=" in o)
    keep = int(given.get("journal_keep", "4"))  # the option's default
    rotated_away = (jdir / f"nvmefs.jsonl.{keep}").exists()
    lost = int(st.get("trace_lost_events", 0)) - int(st0.get("trace_lost_events", 0))
    run = Run("nvmefs", fio, k1[0] - k0[0], k1[1] - k0[1], jc.accounted, lost,
              (cpu1 - cpu0) / fio.runtime_s)  # fmt: skip
    run.extra.update(
        entries=jc.entries,
        repeats=jc.repeats,
        errors_total=prom1 - prom0,
        lost_entries=jc.lost_entries,
        lost_in_entries=jc.lost,
        kmsg_entries=jc.kmsg,
        consumer=st.get("trace_consumer", "?"),
        folded=float(st.get("folded", 0)),
        ring_dropped=float(st.get("ring_dropped", 0)),
        quiet_after_s=quiet_after,
        cpu_s=cpu1 - cpu0,
        vcpu_while_fio=(cpu_fio - cpu0) / fio_wall,  # fio's start-up and end included
        cpu_ms_per_failed=(cpu1 - cpu0) / max(1, k1[0] - k0[0]) * 1000,
    )
    if rotated_away:
        print(f"vm_storm: the journal rotated past journal_keep={keep}: entries may be missing",
              flush=True)  # fmt: skip
    if jc.other_disks:
        run.extra["other_disks"] = ",".join(f"{d}:{n}" for d, n in sorted(jc.other_disks.items()))
    return run


def tracecmd_recording(proc: subprocess.Popen[bytes], instance: str, timeout: float = 60) -> None:
    """Wait until trace-cmd has enabled both events in its instance and forked its recorders."""
    events = tracefs.find(mount=True) / "instances" / instance / "events"
    ncpu = len(os.sched_getaffinity(0))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RunFailed(f"trace-cmd record ended at once ({proc.returncode})")
        with contextlib.suppress(OSError):
            on = all(
                (events / e / "enable").read_text().strip() == "1"
                for e in ("nvme/nvme_complete_rq", "block/block_rq_complete")
            )
            kids = sum(
                1 for d in Path("/proc").iterdir() if d.name.isdigit() and _ppid(d) == proc.pid
            )
            if on and kids >= ncpu:
                time.sleep(1)
                return
        time.sleep(0.2)
    raise RunFailed("trace-cmd record did not start")


def _ppid(d: Path) -> int:
    try:
        return int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def run_tracecmd(
    path: str, disk: str, dev: tuple[int, int], seconds: float, count: KernelCount
) -> Run:
    tdir = Path(tempfile.mkdtemp(prefix="vm-storm-tracecmd-"))
    try:
        return _run_tracecmd(tdir, path, disk, dev, seconds, count)
    finally:
        shutil.rmtree(tdir, ignore_errors=True)


def _run_tracecmd(
    tdir: Path, path: str, disk: str, dev: tuple[int, int], seconds: float, count: KernelCount
) -> Run:
    data = tdir / "trace.dat"
    instance = f"vm-storm-tracecmd-{os.getpid()}"
    cmd = ["trace-cmd", "record", "-B", instance, "-e", "nvme:nvme_complete_rq", "-f", NVME_FILTER,
           "-e", "block:block_rq_complete", "-f", BLOCK_FILTER, "-o", str(data)]  # fmt: skip
    with open(tdir / "record.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=tdir, stdout=log, stderr=subprocess.STDOUT)
    try:
        tracecmd_recording(proc, instance)
        cpu0 = process_tree_cpu_s(proc.pid)
        k0 = count.read()
        fio = fio_storm(path, seconds)
        time.sleep(SETTLE_S)
        cpu1 = process_tree_cpu_s(proc.pid)
        k1 = count.read()
    finally:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RunFailed(
            f"vm_storm: trace-cmd record failed ({proc.returncode}):\n"
            + (tdir / "record.log").read_text(errors="replace")[-2000:]
        )
    total_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    stat = subprocess.run(["trace-cmd", "report", "--stat", "-i", str(data)],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    report = ["trace-cmd", "report", "-i", str(data)]
    with subprocess.Popen(
        report, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, errors="replace"
    ) as rep:
        assert rep.stdout is not None
        rc = count_tracecmd_report(rep.stdout, dev, disk)
    size = data.stat().st_size
    run = Run("trace-cmd", fio, k1[0] - k0[0], k1[1] - k0[1], rc.block, tracefs.lost_events(stat),
              (cpu1 - cpu0) / fio.runtime_s)  # fmt: skip
    run.extra.update(
        nvme_events=rc.nvme,
        dropped_markers=rc.dropped,
        lost_markers=rc.lost_markers,
        total_cpu_s=total_cpu,
        cpu_s=cpu1 - cpu0,
        cpu_ms_per_failed=(cpu1 - cpu0) / max(1, k1[0] - k0[0]) * 1000,
        file_mb=size / 1e6,
        per_cpu=" ".join(f"cpu{c}:{n}@{t:.3f}" for c, (n, t) in sorted(rc.per_cpu.items())),
    )
    return run


def nvmefs_label(opts: str) -> str:
    return f"nvmefs[{opts}]" if opts else "nvmefs"


def rotated(variants: list[str], r: int) -> list[str]:
    """Round r's order: the variants rotated by r, so that each takes every place in turn."""
    n = r % len(variants)
    return variants[n:] + variants[:n]


def storm(args: argparse.Namespace, res: dict[str, float]) -> bool:
    """The storm runs, their table and medians into `res`; False if the test bed's storm
    controller broke down (see contrib/qemu/vm.py) before all of them ran."""
    ctrl, disk, dev = storm_disk()
    path = f"/dev/{disk}"
    print(f"storm: {STORM} is {ctrl.name}, {path} ({dev[0]}:{dev[1]}); fio {' '.join(FIO_STORM)}"
          f" --runtime={args.seconds:g}")  # fmt: skip
    print(f"filters (nvmefs's and trace-cmd's): nvme_complete_rq {NVME_FILTER!r};"
          f" block_rq_complete {BLOCK_FILTER!r}; nvmefs kernel MNT -o journal=J[,OPTS]"
          )  # fmt: skip
    option_sets = args.nvmefs_opts or [""]
    variants = ["fio", *(nvmefs_label(o) for o in option_sets), "trace-cmd"]
    runs: list[Run] = []
    width = max(len(v) for v in variants)
    header = (f"{'round':>5} {'run':<{width}} {'fio s':>6} {'fio failed':>10} {'kernel':>8} "
              f"{'failed/s':>8} {'kept':>8} {'ratio':>7} {'lost':>7} {'vCPU':>6}"
              "  more")  # fmt: skip
    broken = ""
    with KernelCount(disk, dev) as count:
        with contextlib.suppress(RunFailed):  # a broken bed shows below
            fio_storm(path, 2)  # warm-up: fio's and the guest's first run page in over 9p
        print(header, flush=True)
        plan = [(r, v) for r in range(args.rounds) for v in rotated(variants, r)]
        broken = bed_state(ctrl, disk)
        for r, variant in [] if broken else plan:
            try:
                if variant == "fio":
                    run = run_fio(path, args.seconds, count)
                elif variant == "trace-cmd":
                    run = run_tracecmd(path, disk, dev, args.seconds, count)
                else:
                    opts = option_sets[variants.index(variant) - 1]
                    run = run_nvmefs(path, ctrl, disk, args.seconds, count, opts)
                    run.variant = variant
                if run.fio.runtime_s > args.seconds * STALLED_X:
                    print(f"{row(r + 1, run, width)}\n      ^ fio ran {run.fio.runtime_s:.0f} s"
                          f" for {args.seconds:g}: the bed stalled (see the docstring); not"
                          " counted", flush=True)  # fmt: skip
                    continue
                runs.append(run)
                print(row(r + 1, run, width), flush=True)
            except RunFailed as e:
                print(f"{r + 1:>5} {variant:<{width}} FAILED: {e}", flush=True)
            broken = bed_state(ctrl, disk)
            if broken:  # every later run would fail at once
                print(f"vm_storm: no more runs, the storm controller is out of order: {broken}",
                      flush=True)  # fmt: skip
                break
    summarise(runs, res, [nvmefs_label(o) for o in option_sets])
    return not broken


def _fmt(v: float | str) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def row(round_no: int, run: Run, width: int = 10) -> str:
    kept = "" if run.kept is None else f"{run.kept:,}"
    ratio = "" if run.ratio is None else f"{run.ratio:.4f}"
    lost = "" if run.lost is None else f"{run.lost:,}"
    vcpu = "" if run.vcpu is None else f"{run.vcpu:.3f}"
    more = " ".join(f"{k}={_fmt(v)}" for k, v in run.extra.items())
    return (f"{round_no:>5} {run.variant:<{width}} {run.fio.runtime_s:>6.1f} "
            f"{run.fio.failed:>10,} {run.kernel_failed:>8,} {run.rate:>8,.0f} {kept:>8} "
            f"{ratio:>7} {lost:>7} {vcpu:>6}  {more}")  # fmt: skip


def _suffix(label: str) -> str:
    """The key suffix of an extra nvmefs option set: nvmefs[trace_buffer_kb=8192] ->
    __trace_buffer_kb_8192."""
    return "__" + re.sub(r"\W+", "_", label.removeprefix("nvmefs[").removesuffix("]")).strip("_")


def summarise(runs: list[Run], res: dict[str, float], nvmefs: list[str]) -> None:
    """The medians over the rounds into `res`: the standard names for the first nvmefs option
    set, the same names with a suffix for the others."""
    primary = nvmefs[0]
    figures: list[tuple[str, Callable[[Run], float], str]] = [
        ("vm_kernel_storm_fio_failed_per_s", lambda r: r.rate, "fio"),
        ("vm_kernel_storm_tracecmd_ratio", lambda r: r.ratio or 0.0, "trace-cmd"),
        ("vm_kernel_storm_tracecmd_lost_events", lambda r: float(r.lost or 0), "trace-cmd"),
        ("vm_kernel_storm_tracecmd_vcpu", lambda r: r.vcpu or 0.0, "trace-cmd"),
        ("vm_kernel_storm_tracecmd_total_cpu_s", lambda r: float(r.extra["total_cpu_s"]),
         "trace-cmd"),
        ("vm_kernel_storm_fio_failed_per_s_tracecmd", lambda r: r.rate, "trace-cmd"),
    ]  # fmt: skip
    for label in nvmefs:
        sfx = "" if label == primary else _suffix(label)
        figures += [
            ("vm_kernel_storm_accounted_ratio" + sfx, lambda r: r.ratio or 0.0, label),
            ("vm_kernel_storm_errors_total_ratio" + sfx,
             lambda r: float(r.extra["errors_total"]) / r.fio.failed, label),
            ("vm_kernel_storm_lost_events" + sfx, lambda r: float(r.lost or 0), label),
            ("vm_kernel_storm_daemon_vcpu" + sfx, lambda r: r.vcpu or 0.0, label),
            ("vm_kernel_storm_fio_failed_per_s_nvmefs" + sfx, lambda r: r.rate, label),
        ]  # fmt: skip
    print("\nmedians over the rounds (spread: (max - min) / median):")
    for key, get, variant in figures:
        values = [get(r) for r in runs if r.variant == variant]
        if not values:
            print(f"  {key:<52} no run")
            continue
        med, spread = median_spread(values)
        res[key] = med
        shown = ", ".join(f"{v:.4g}" for v in values)
        print(f"  {key:<52} {med:>12.4f}  spread {spread:5.1f}%  ({shown})")
    # fio's count against the kernel's, every run: the denominator is trustworthy if they agree.
    diffs = [r.fio.failed - r.kernel_failed for r in runs]
    if diffs:
        res["vm_kernel_storm_fio_minus_kernel_max"] = float(max(diffs, key=abs))
    print(f"  fio's failed requests minus the kernel's count, each run: {diffs}")
    alone = res.get("vm_kernel_storm_fio_failed_per_s")
    for key, what in (("nvmefs", "nvmefs"), ("tracecmd", "trace-cmd")):
        under = res.get(f"vm_kernel_storm_fio_failed_per_s_{key}")
        if alone and under:
            res[f"vm_kernel_storm_rate_vs_alone_{key}"] = under / alone
            print(f"  fio's failed requests/s under {what} / alone: {under / alone:.3f}")
    consumers = {str(r.extra.get("consumer")) for r in runs if r.variant in nvmefs}
    res["vm_kernel_storm_trace_consumer_compiled"] = float(consumers == {"compiled"})
    print(f"  trace consumer: {','.join(sorted(consumers))}")
    targets = (("vm_kernel_storm_accounted_ratio", ">=", 0.99),
               ("vm_kernel_storm_daemon_vcpu", "<=", 0.5))  # fmt: skip
    for key, op, bound in targets:
        if key in res:
            ok = res[key] >= bound if op == ">=" else res[key] <= bound
            print(f"  target {key} {op} {bound}: {'met' if ok else 'MISSED'}")
    lost, tc_lost = (
        res.get("vm_kernel_storm_lost_events"),
        res.get("vm_kernel_storm_tracecmd_lost_events"),
    )
    if lost is not None and tc_lost is not None:
        ok = lost == 0 or tc_lost > 0
        print(f"  target vm_kernel_storm_lost_events 0 where trace-cmd loses none: "
              f"{'met' if ok else 'MISSED'}")  # fmt: skip


def log_all_qd1(seconds: float, rounds: int, res: dict[str, float]) -> None:
    """fio QD1 on the healthy disk: untraced, log=all, untraced, ... (each traced run against
    the mean of its two neighbours)."""
    block = vm_iops.controller(HEALTHY).namespaces[0].block
    plain = [vm_iops.fio_iops(block, 1, seconds, "io_uring")]
    traced: list[float] = []
    for _ in range(rounds):
        mnt = vm_iops.kernel_mount("log=all")
        pid = int(parse_stats((mnt / "stats").read_text())["pid"])
        try:
            traced.append(vm_iops.fio_iops(block, 1, seconds, "io_uring"))
        finally:
            unmount(mnt, pid)
        plain.append(vm_iops.fio_iops(block, 1, seconds, "io_uring"))
    ratios = [t / ((plain[i] + plain[i + 1]) / 2) for i, t in enumerate(traced)]
    res["vm_storm_qd1_fio_iops"] = statistics.median(plain)
    res["vm_storm_qd1_log_all_iops"] = statistics.median(traced)
    res["vm_kernel_source_log_all_overhead_qd1"] = statistics.median(ratios)
    print(f"\nQD1 4 KiB random reads on {HEALTHY} (io_uring, block layer), {seconds:g} s runs:")
    print(f"  untraced IOPS {', '.join(f'{v:,.0f}' for v in plain)}")
    print(f"  log=all  IOPS {', '.join(f'{v:,.0f}' for v in traced)}")
    print(f"  ratios to the neighbours' mean {', '.join(f'{v:.3f}' for v in ratios)}")
    overhead = res["vm_kernel_source_log_all_overhead_qd1"]
    print(f"  vm_kernel_source_log_all_overhead_qd1 {overhead:.3f}"
          f" (target >= 0.95: {'met' if overhead >= 0.95 else 'MISSED'})")  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=15, help="storm length (fio --runtime)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the three storm runs")
    p.add_argument("--qd1-seconds", type=float, default=10)
    p.add_argument("--qd1-rounds", type=int, default=3)
    p.add_argument(
        "--nvmefs-opts",
        action="append",
        metavar="OPTS",
        help="more -o options for the storm's mount; given again, one more nvmefs run per round"
        " with those (the first set gives the standard figures, the others suffixed ones)",
    )
    p.add_argument("--no-storm", action="store_true")
    p.add_argument("--no-qd1", action="store_true")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args()
    if not args.no_storm and not KernelCount.available():
        p.error(
            "this kernel has no histogram triggers (CONFIG_HIST_TRIGGERS), which give the"
            " storm's reference count: boot another (--kernel 6.12) or use --no-storm"
        )
    res: dict[str, float] = {}
    started = time.monotonic()
    complete = args.no_storm or storm(args, res)
    if not args.no_qd1:
        log_all_qd1(args.qd1_seconds, args.qd1_rounds, res)
    print(f"\nelapsed {time.monotonic() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    if not complete:
        print("vm_storm: the storm controller broke down: the figures above are from the runs"
              " before; boot again for the rest (exit status 3)")  # fmt: skip
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
