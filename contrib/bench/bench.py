"""nvmefs benchmarks: every figure beside a baseline measured in the same run.

    contrib/bench/run [--quick] [--json FILE] [--no-vm]

Prints a table (median and spread of several repetitions, the baseline, the ratio) and writes the
same figures as JSON. Needs root (FUSE mounts) and, for the vm_* figures, the QEMU test bed.
These machines are shared and noisy: read the ratios and medians, not single runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from nvmefs.engine.register import Engine  # noqa: E402
from nvmefs.nvme import commands as c  # noqa: E402
from nvmefs.nvme.policy import LogPolicy  # noqa: E402
from nvmefs.nvme.status import Translator  # noqa: E402
from nvmefs.sim.controller import SimController  # noqa: E402
from nvmefs.store.events import NvmeEvent  # noqa: E402
from nvmefs.store.ring import DebugRing  # noqa: E402

NVMEFS = [sys.executable, "-m", "nvmefs"]
ALL_READS_FAIL = '[[fault]]\nopcode = "read"\nstatus = 0x4281\n'

TARGETS = {  # key: (comparison, bound, what)
    "translator_decodes_per_s": (">=", 10_000_000, "decodes/s"),
    "ring_appends_per_s": (">=", 1_000_000, "appends/s"),
    "engine_sim_completions_per_s_qd32": (">=", 200_000, "completions/s"),
    "fuse_cat_1024_vs_tmpfs": ("<=", 1.5, "x tmpfs time"),
    "fuse_cat_large_vs_tmpfs": (">=", 0.25, "x tmpfs MB/s"),
    "completion_to_reader_us_p99": ("<=", 1000, "us"),
    "ring_bytes_per_entry": ("<=", 400, "bytes"),
    "daemon_rss_mb": ("<=", 80, "MB"),
    "vm_uring_vs_fio_qd1": (">=", 0.9, "x fio"),
    "vm_uring_vs_fio_qd32": (">=", 0.9, "x fio"),
    "vm_scrub_vs_fio_128k_qd8": (">=", 0.95, "x fio MB/s"),
    "vm_scrub_cpu_vs_fio": ("<=", 1.2, "x fio CPU/GiB"),
    "vm_kernel_source_overhead_qd1": (">=", 0.97, "x untraced"),
    "vm_kernel_source_overhead_qd32": (">=", 0.97, "x untraced"),
}


class Results:
    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.rows: list[tuple[str, float, float, str, float | None]] = []

    def add(
        self,
        key: str,
        samples: list[float],
        baseline_key: str | None = None,
        baseline: list[float] | None = None,
        unit: str = "",
    ) -> float:
        med = statistics.median(samples)
        spread = (max(samples) - min(samples)) / med * 100 if med else 0.0
        self.values[key] = med
        base_med = None
        if baseline is not None and baseline_key is not None:
            base_med = statistics.median(baseline)
            self.values[baseline_key] = base_med
        self.rows.append((key, med, spread, unit, base_med))
        print(
            f"  {key:<40} {med:>14,.1f} {unit:<12} ±{spread:4.0f}%"
            + (f"   baseline {base_med:,.1f} ({med / base_med:.2f}x)" if base_med else ""),
            flush=True,
        )
        return med


def repeat(fn: Callable[[], float], n: int) -> list[float]:
    return [fn() for _ in range(n)]


# -- pure Python hot paths ----------------------------------------------------------------------


def bench_translator(r: Results, reps: int) -> None:
    t = Translator()
    words = [random.Random(1).randrange(0x8000) for _ in range(200_000)]
    table = [0] * 0x8000

    def ours() -> float:
        decode = t.decode
        t0 = time.perf_counter()
        for w in words:
            decode(w)
        return len(words) / (time.perf_counter() - t0)

    def floor() -> float:  # a bare list index of the same words: the cheapest lookup there is
        t0 = time.perf_counter()
        for w in words:
            table[w]
        return len(words) / (time.perf_counter() - t0)

    r.add(
        "translator_decodes_per_s",
        repeat(ours, reps),
        "baseline_list_index_per_s",
        repeat(floor, reps),
        "decodes/s",
    )


def bench_ring(r: Results, reps: int) -> None:
    st = Translator().decode(0x281)
    events = [NvmeEvent(st, "sim0", 1, 1, i % 100, 2, False, i, 8, 0) for i in range(1000)]
    policy = LogPolicy("all")
    n = 200_000

    def ours() -> float:
        ring = DebugRing(1024)
        append, logs = ring.append, policy.logs
        t0 = time.perf_counter()
        for i in range(n):
            if logs(0x281):
                append(events[i % 1000])
        return n / (time.perf_counter() - t0)

    def floor() -> float:  # a deque with maxlen: wraps, but no sequence numbers or timestamps
        d: deque[object] = deque(maxlen=1024)
        append = d.append
        t0 = time.perf_counter()
        for i in range(n):
            append(events[i % 1000])
        return n / (time.perf_counter() - t0)

    r.add(
        "ring_appends_per_s",
        repeat(ours, reps),
        "baseline_deque_appends_per_s",
        repeat(floor, reps),
        "appends/s",
    )

    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    ring = DebugRing(1024)
    for i in range(1024):  # distinct events, as real completions are
        ring.append(NvmeEvent(st, "sim0", 1, 1, i, 2, False, i * 256, 256, 0))
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    size = sum(s.size_diff for s in after.compare_to(before, "filename"))
    r.add("ring_bytes_per_entry", [size / 1024], unit="bytes")


async def _engine_rate(qd: int, seconds: float) -> float:
    sim = SimController(size=64 << 20)
    engine = Engine(sim, DebugRing(1024), queue_depth=max(qd + 1, 2))
    async with engine.running():
        cmds = [c.read(1, (i * 8) % 131000, 8, 512) for i in range(qd)]
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            await engine.submit_batch(cmds)
            n += qd
        return n / (time.perf_counter() - t0)


async def _sim_only_rate(qd: int, seconds: float) -> float:
    """The simulated controller driven by the thinnest possible host: no engine at all."""
    sim = SimController(size=64 << 20)
    depth = max(qd + 1, 2)
    engine = Engine(sim, DebugRing(16), queue_depth=depth)
    async with engine.running():
        # Bring-up is the engine's; after it, this loop alone drives the queue pair.
        assert engine.io_queue is not None
        engine.stop_reaping()
        await trio.sleep(0)
        q = engine.io_queue
        sqe, cqe = c.SQE_FORMAT, c.CQE_FORMAT
        buf = sim.dma.alloc(4096)
        n, t0 = 0, time.perf_counter()
        tail = head = 0
        phase = 1
        view = q.cq.view
        while time.perf_counter() - t0 < seconds:
            for i in range(qd):
                sqe.pack_into(
                    q.sq.view,
                    tail * 64,
                    2,
                    0,
                    i,
                    1,
                    0,
                    0,
                    0,
                    buf.addr,
                    0,
                    (i * 8) % 131000,
                    0,
                    7,
                    0,
                    0,
                    0,
                )
                tail = (tail + 1) % depth
            sim.doorbell(2, tail)
            for _ in range(qd):
                status = cqe.unpack_from(view, head * 16)[5]
                assert status & 1 == phase
                head += 1
                if head == depth:
                    head, phase = 0, phase ^ 1
            sim.doorbell(3, head)
            n += qd
        q.qp.sq_tail = tail  # keep the engine's view consistent for shutdown
        return n / (time.perf_counter() - t0)


def bench_engine(r: Results, reps: int, seconds: float) -> None:
    for qd in (1, 32, 128):
        ours = [trio.run(_engine_rate, qd, seconds) for _ in range(reps)]
        floor = [trio.run(_sim_only_rate, qd, seconds) for _ in range(reps)]
        r.add(
            f"engine_sim_completions_per_s_qd{qd}",
            ours,
            f"baseline_sim_only_completions_per_s_qd{qd}",
            floor,
            "completions/s",
        )


# -- the mounted filesystem ---------------------------------------------------------------------


@contextlib.contextmanager
def mounted(opts: str, plan: str | None = None) -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix="nvmefs-bench-"))
    mnt = tmp / "mnt"
    mnt.mkdir()
    if plan is not None:
        (tmp / "plan.toml").write_text(plan)
        opts += f",faults={tmp / 'plan.toml'}"
    subprocess.run([*NVMEFS, "sim", str(mnt), "-o", opts], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def stats(mnt: Path) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in (mnt / "stats").read_text().splitlines())


def wait_until(cond: Callable[[], bool], timeout: float) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise SystemExit("bench: timed out preparing a mount")
        time.sleep(0.05)


def cat_seconds(path: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    out = subprocess.run(["cat", str(path)], stdout=subprocess.PIPE, check=True).stdout
    return time.perf_counter() - t0, len(out)


def bench_fuse_cat(r: Results, reps: int, large: int) -> None:
    shm = Path(tempfile.mkdtemp(prefix="nvmefs-bench-", dir="/dev/shm"))
    try:
        # 1024 chunks of 64 KiB, every read failing once: a full default ring (fold=0: an
        # entry each, as in a storm below the folding rate).
        opts = "sim_size=64M,bs=64K,passes=1,log=errors,fold=0,retries=0"
        with mounted(opts, ALL_READS_FAIL) as mnt:
            wait_until(lambda: stats(mnt)["workload"] == "idle", 120)
            data = (mnt / "nvme_circular_buffer").read_bytes()
            (shm / "ring").write_bytes(data)
            fuse = [cat_seconds(mnt / "nvme_circular_buffer")[0] * 1000 for _ in range(reps * 5)]
            tmpfs = [cat_seconds(shm / "ring")[0] * 1000 for _ in range(reps * 5)]
            r.add("fuse_cat_1024_ms", fuse, "tmpfs_cat_1024_ms", tmpfs, "ms")
            r.values["fuse_cat_1024_vs_tmpfs"] = statistics.median(fuse) / statistics.median(tmpfs)
            r.values["daemon_rss_mb"] = _rss_mb(int(stats(mnt)["pid"]))
            print(f"  {'daemon_rss_mb':<40} {r.values['daemon_rss_mb']:>14,.1f} MB (full ring)")
        # One pass of 512-byte reads, every one failing once: `large` entries, then idle.
        opts = (
            f"sim_size={large * 512},bs=512,qd=64,passes=1,log=errors,fold=0,retries=0,"
            f"capacity={large}"
        )
        with mounted(opts, ALL_READS_FAIL) as mnt:
            wait_until(lambda: stats(mnt)["workload"] == "idle", 900)
            data = (mnt / "nvme_circular_buffer").read_bytes()
            (shm / "large").write_bytes(data)
            mb = len(data) / 1e6

            def fuse_rate() -> float:
                return mb / cat_seconds(mnt / "nvme_circular_buffer")[0]

            def tmpfs_rate() -> float:
                return mb / cat_seconds(shm / "large")[0]

            fuse_r, tmpfs_r = repeat(fuse_rate, reps), repeat(tmpfs_rate, reps)
            r.add("fuse_cat_large_MBps", fuse_r, "tmpfs_cat_large_MBps", tmpfs_r, "MB/s")
            r.values["fuse_cat_large_entries"] = large
            r.values["fuse_cat_large_vs_tmpfs"] = statistics.median(fuse_r) / statistics.median(
                tmpfs_r
            )
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_latency(r: Results, samples: int) -> None:
    # One failing chunk per 0.05 s scrub pass of a 1 MiB namespace: a steady trickle.
    plan = '[[fault]]\nopcode = "read"\nlba = [0, 0]\nstatus = 0x4281\n'
    with mounted("sim_size=1M,interval=0.05,log=errors,retries=0", plan) as mnt:
        fd = os.open(mnt / "nvme_circular_buffer.jsonl", os.O_RDONLY)
        try:
            while os.read(fd, 1 << 20):
                pass
            p = select.poll()
            p.register(fd, select.POLLIN)
            lat: list[float] = []
            while len(lat) < samples:
                if not p.poll(5000):
                    raise SystemExit("bench: poll never woke")
                data = os.read(fd, 1 << 20)
                now = time.monotonic_ns()
                for line in data.splitlines():
                    lat.append((now - json.loads(line)["monotonic_ns"]) / 1000)
        finally:
            os.close(fd)
    lat.sort()
    r.add("completion_to_reader_us_p50", [lat[len(lat) // 2]], unit="us")
    r.add("completion_to_reader_us_p99", [lat[int(len(lat) * 0.99) - 1]], unit="us")


def bench_baseline_rss(r: Results) -> None:
    code = "import trio, pyfuse3, cffi, os; print(open('/proc/self/status').read())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    rss = next(int(x.split()[1]) for x in out.splitlines() if x.startswith("VmRSS:")) / 1024
    r.values["baseline_python_imports_rss_mb"] = rss
    print(f"  {'baseline_python_imports_rss_mb':<40} {rss:>14,.1f} MB (python + trio + pyfuse3)")


def bench_vm(r: Results, seconds: float) -> None:
    out = REPO / "contrib" / "qemu" / "work" / "vm_iops.json"
    out.unlink(missing_ok=True)
    code = subprocess.call(
        [
            sys.executable,
            str(REPO / "contrib/qemu/vm.py"),
            "run",
            "--timeout",
            "1800",
            "--",
            sys.executable,
            "contrib/bench/vm_iops.py",
            "--seconds",
            str(seconds),
            "--json",
            str(out),
        ]
    )
    if code != 0 or not out.exists():
        print("  vm: the VM part failed; no vm_* figures", flush=True)
        return
    r.values.update(json.loads(out.read_text()))


def check_targets(r: Results) -> None:
    print("\ntargets:")
    for key, (op, bound, unit) in TARGETS.items():
        if key not in r.values:
            print(f"  {key:<40} not measured")
            continue
        v = r.values[key]
        ok = v >= bound if op == ">=" else v <= bound
        print(f"  {key:<40} {v:>14,.2f} {op} {bound:,} {unit:<14} {'met' if ok else 'MISSED'}")


def main() -> int:
    p = argparse.ArgumentParser(prog="contrib/bench/run")
    p.add_argument("--quick", action="store_true", help="fewer repetitions, smaller rings")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--no-vm", action="store_true", help="skip the figures measured in the VM")
    args = p.parse_args()
    reps = 3 if args.quick else 7
    r = Results()
    started = time.monotonic()
    print(
        f"nvmefs benchmarks ({'quick' if args.quick else 'full'}), {os.cpu_count()} CPUs, "
        f"Python {sys.version.split()[0]}"
    )
    bench_translator(r, reps)
    bench_ring(r, reps)
    bench_engine(r, reps, 0.5 if args.quick else 2.0)
    bench_fuse_cat(r, reps, 100_000 if args.quick else 1_000_000)
    bench_latency(r, 60 if args.quick else 400)
    bench_baseline_rss(r)
    if not args.no_vm:
        bench_vm(r, 3 if args.quick else 10)
    check_targets(r)
    r.values["elapsed_s"] = time.monotonic() - started
    print(f"\nelapsed {r.values['elapsed_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(r.values, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
