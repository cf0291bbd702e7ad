#!/usr/bin/env python3
"""Passthrough speed inside the test VM: nvmefs beside fio's io_uring_cmd, same boot, same device.

Run it through the test bed, so every figure comes from the same VM boot and the same device:
    contrib/qemu/vm.py run -- .venv/bin/python contrib/bench/vm_iops.py [--seconds 10] [--json F]
4 KiB random reads on the plain `nvmefs-slow` controller (a raw file, no injected errors): nvmefs
through each data path (`uring` is the default one, compiled where it loads; `uring_python` the
Python fallback; `ioctl`), nvmefs and fio alternating. Sequential 128 KiB reads at QD8 of the
256 MiB `nvmefs-big`: a scrub beside fio, MB/s and CPU seconds per GiB read (nvmefs: the whole
process over the scrub, every thread; fio: its job's usr+sys). Prints tables and the ratios
nvmefs/fio, and says which data path ran; the ceiling is QEMU's CPU emulation, so only ratios
mean much.

The kernel source's cost: fio 4 KiB random reads through the block layer on the same device,
without and with a `nvmefs kernel` mount (default policy, and log=all), alternating runs so that
drift hits both; and the daemon's CPU seconds per 1000 error events (direct reads of a bad LBA
of `nvmefs-err`, six trace events each).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from nvmefs import workloads
from nvmefs.engine.passthrough import PassthroughEngine
from nvmefs.linux import devices
from nvmefs.nvme.policy import LogPolicy
from nvmefs.store.ring import DebugRing

SERIAL = "nvmefs-slow"
BIG = "nvmefs-big"  # 256 MiB: sequential throughput
SEQ_PASSES = 4  # passes over BIG per sample: 1 GiB read


def node() -> str:
    for ctrl in devices.controllers():
        if ctrl.serial == SERIAL:
            return ctrl.namespaces[0].generic
    sys.exit(f"vm_iops: no controller {SERIAL}: run me inside contrib/qemu/vm.py")


async def nvmefs_iops(
    path: str,
    transport: str,
    qd: int,
    seconds: float,
    datapath: str = "auto",
    ran: list[str] | None = None,
) -> float:
    """Completions per second of a randread; `ran` gets the data path that ran."""
    engine = PassthroughEngine(
        devices.resolve(path),
        DebugRing(1024),
        transport=transport,
        datapath=datapath,
        policy=LogPolicy("media"),
        queue_depth=qd + 1,
    )
    async with engine.running():
        if ran is not None:
            ran.append(engine.datapath)
        progress = workloads.Progress()
        with trio.move_on_after(1):  # warm-up
            await workloads.randread(engine, progress, bs=4096, qd=qd)
        before, t0 = engine.stats.completions, time.monotonic()
        with trio.move_on_after(seconds):
            await workloads.randread(engine, progress, bs=4096, qd=qd, seed=1)
        return (engine.stats.completions - before) / (time.monotonic() - t0)


def fio_iops(path: str, qd: int, seconds: float, engine: str = "io_uring_cmd") -> float:
    extra = ["--cmd_type=nvme"] if engine == "io_uring_cmd" else ["--direct=1"]
    out = subprocess.run(
        [
            "fio",
            "--name=r",
            f"--filename={path}",
            f"--ioengine={engine}",
            *extra,
            "--rw=randread",
            "--bs=4k",
            f"--iodepth={qd}",
            f"--runtime={seconds}",
            "--time_based",
            "--ramp_time=1",
            "--output-format=json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(json.loads(out.stdout)["jobs"][0]["read"]["iops"])


async def nvmefs_scrub(path: str, ran: list[str]) -> tuple[float, float]:
    """(MB/s, CPU s per GiB) of SEQ_PASSES scrub passes, 128 KiB at QD8."""
    engine = PassthroughEngine(
        devices.resolve(path), DebugRing(1024), policy=LogPolicy("media"), queue_depth=9
    )
    async with engine.running():
        ran.append(engine.datapath)
        progress = workloads.Progress()
        t0, cpu0 = time.monotonic(), time.process_time()
        await workloads.scrub(engine, progress, bs=128 << 10, qd=8, passes=SEQ_PASSES)
        wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
        return progress.bytes_done / wall / 1e6, cpu / (progress.bytes_done / (1 << 30))


def fio_seq(path: str) -> tuple[float, float]:
    """(MB/s, CPU s per GiB) of fio reading the device SEQ_PASSES times, 128 KiB at QD8."""
    out = subprocess.run(
        ["fio", "--name=s", f"--filename={path}", "--ioengine=io_uring_cmd", "--cmd_type=nvme",
         "--rw=read", "--bs=128k", "--iodepth=8", f"--loops={SEQ_PASSES}",
         "--output-format=json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    job = json.loads(out.stdout)["jobs"][0]
    cpu = (job["usr_cpu"] + job["sys_cpu"]) / 100 * job["job_runtime"] / 1000
    return float(job["read"]["bw_bytes"]) / 1e6, cpu / (job["read"]["io_bytes"] / (1 << 30))


def sequential(res: dict[str, float], rounds: int) -> str:
    """The scrub against fio, alternating (after one warm-up of each: the host's page cache)."""
    path = controller(BIG).namespaces[0].generic
    ran: list[str] = []
    fio_seq(path)
    trio.run(nvmefs_scrub, path, ran)
    fio: list[tuple[float, float]] = []
    ours: list[tuple[float, float]] = []
    for _ in range(rounds):
        fio.append(fio_seq(path))
        ours.append(trio.run(nvmefs_scrub, path, ran))
    res["vm_fio_read_MBps_128k_qd8"] = statistics.median(m for m, _ in fio)
    res["vm_scrub_MBps_128k_qd8"] = statistics.median(m for m, _ in ours)
    res["vm_fio_read_cpu_s_per_GiB"] = statistics.median(c for _, c in fio)
    res["vm_scrub_cpu_s_per_GiB"] = statistics.median(c for _, c in ours)
    res["vm_scrub_vs_fio_128k_qd8"] = (
        res["vm_scrub_MBps_128k_qd8"] / res["vm_fio_read_MBps_128k_qd8"]
    )
    res["vm_scrub_cpu_vs_fio"] = res["vm_scrub_cpu_s_per_GiB"] / res["vm_fio_read_cpu_s_per_GiB"]
    return ",".join(sorted(set(ran)))


NVMEFS = [sys.executable, "-m", "nvmefs"]


def controller(serial: str) -> devices.Controller:
    return next(c for c in devices.controllers() if c.serial == serial)


def kernel_mount(opts: str) -> Path:
    mnt = Path(tempfile.mkdtemp(prefix="nvmefs-bench-"))
    subprocess.run([*NVMEFS, "kernel", str(mnt), "-o", opts], check=True)
    time.sleep(3)  # past start-up (imports, health pollers' Identify): the steady cost counts
    return mnt


def daemon_cpu_s(mnt: Path) -> float:
    pid = int(dict(ln.split(" ", 1) for ln in (mnt / "stats").read_text().splitlines())["pid"])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


LOGS = ("media", "all")


def kernel_source_cost(seconds: float, res: dict[str, float], rounds: int = 2) -> None:
    block = controller(SERIAL).namespaces[0].block
    qds = (1, 32)
    plain: dict[int, list[float]] = {qd: [] for qd in qds}
    traced: dict[tuple[str, int], list[float]] = {(log, qd): [] for log in LOGS for qd in qds}
    for _ in range(rounds):  # alternating, so that the test bed's drift hits all three
        for qd in qds:
            plain[qd].append(fio_iops(block, qd, seconds, "io_uring"))
        for log in LOGS:
            mnt = kernel_mount(f"log={log}")
            try:
                for qd in qds:
                    traced[log, qd].append(fio_iops(block, qd, seconds, "io_uring"))
            finally:
                subprocess.run(["umount", str(mnt)], check=True)
    for qd in qds:
        plain[qd].append(fio_iops(block, qd, seconds, "io_uring"))
        base = statistics.median(plain[qd])
        res[f"vm_fio_block_iops_qd{qd}"] = base
        res[f"vm_kernel_source_overhead_qd{qd}"] = statistics.median(traced["media", qd]) / base
        res[f"vm_kernel_source_log_all_overhead_qd{qd}"] = (
            statistics.median(traced["all", qd]) / base
        )
    # CPU per error event: direct reads of a bad LBA, each six nvme_complete_rq and a block event.
    bad = controller("nvmefs-err").namespaces[0].block
    mnt = kernel_mount("log=media")
    try:
        cpu0 = daemon_cpu_s(mnt)
        n = 100
        for _ in range(n):
            subprocess.run(["dd", f"if={bad}", "of=/dev/null", "bs=512", "skip=2048", "count=1",
                            "iflag=direct", "status=none"], capture_output=True)  # fmt: skip
        time.sleep(2)
        st = dict(ln.split(" ", 1) for ln in (mnt / "stats").read_text().splitlines())
        events = int(st["completions"]) + int(st["logged"])  # attempts, and one block event each
        res["vm_kernel_source_cpu_s_per_1000_error_events"] = (
            (daemon_cpu_s(mnt) - cpu0) / events * 1000
        )
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--kernel-only", action="store_true", help="only the kernel source's cost")
    args = p.parse_args()
    path = node()
    res: dict[str, float] = {}
    if args.kernel_only:
        kernel_source_cost(args.seconds, res, rounds=4)
        print(" ".join(f"{k}={v:.3f}" for k, v in res.items()))
        return 0
    ran: list[str] = []
    rounds = 3
    for qd in (1, 32):
        fio: list[float] = []
        ours: list[float] = []
        for _ in range(rounds):  # alternating, so that the test bed's drift hits both
            fio.append(fio_iops(path, qd, args.seconds / 2))
            ours.append(trio.run(nvmefs_iops, path, "uring", qd, args.seconds / 2, "auto", ran))
        res[f"vm_fio_uring_cmd_iops_qd{qd}"] = statistics.median(fio)
        res[f"vm_uring_iops_qd{qd}"] = statistics.median(ours)
        res[f"vm_uring_python_iops_qd{qd}"] = trio.run(
            nvmefs_iops, path, "uring", qd, args.seconds / 2, "python"
        )
        res[f"vm_ioctl_iops_qd{qd}"] = trio.run(nvmefs_iops, path, "ioctl", qd, args.seconds / 2)
    datapath = ",".join(sorted(set(ran)))
    res["vm_uring_datapath_compiled"] = float(datapath == "compiled")
    print(f"{'load':<28} {'QD1':>10} {'QD32':>10}")
    labels = {"uring": f"uring ({datapath})", "uring_python": "uring (python)"}
    for name in ("fio_uring_cmd", "uring", "uring_python", "ioctl"):
        print(
            f"{labels.get(name, name):<28} {res[f'vm_{name}_iops_qd1']:>10.0f}"
            f" {res[f'vm_{name}_iops_qd32']:>10.0f}"
        )
    for t in ("uring", "uring_python", "ioctl"):
        for qd in (1, 32):
            res[f"vm_{t}_vs_fio_qd{qd}"] = (
                res[f"vm_{t}_iops_qd{qd}"] / res[f"vm_fio_uring_cmd_iops_qd{qd}"]
            )
    print(" ".join(f"{k}={v:.2f}" for k, v in res.items() if "_vs_" in k))
    seq_path = sequential(res, 5 if args.seconds >= 5 else 3)
    print(f"{'128 KiB reads, QD8':<28} {'MB/s':>10} {'CPU s/GiB':>10}")
    print(f"{'fio io_uring_cmd':<28} {res['vm_fio_read_MBps_128k_qd8']:>10.0f}"
          f" {res['vm_fio_read_cpu_s_per_GiB']:>10.2f}")  # fmt: skip
    print(f"{f'nvmefs scrub ({seq_path})':<28} {res['vm_scrub_MBps_128k_qd8']:>10.0f}"
          f" {res['vm_scrub_cpu_s_per_GiB']:>10.2f}")  # fmt: skip
    print(f"vm_scrub_vs_fio_128k_qd8={res['vm_scrub_vs_fio_128k_qd8']:.2f}"
          f" vm_scrub_cpu_vs_fio={res['vm_scrub_cpu_vs_fio']:.2f}")  # fmt: skip
    kernel_source_cost(args.seconds / 2, res, rounds=2 if args.seconds < 5 else 3)
    print(" ".join(f"{k}={v:.3f}" for k, v in res.items() if "kernel_source" in k))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
