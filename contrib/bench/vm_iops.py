#!/usr/bin/env python3
"""4 KiB random-read IOPS inside the test VM: nvmefs (uring, ioctl) beside fio's io_uring_cmd.

Run it through the test bed, so every figure comes from the same VM boot and the same device:
    contrib/qemu/vm.py run -- .venv/bin/python contrib/bench/vm_iops.py [--seconds 10] [--json F]
The device is the plain `nvmefs-slow` controller (a raw file, no injected errors). Prints a table
and the ratios nvmefs/fio; the ceiling is QEMU's CPU emulation, so only ratios mean much.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
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


def node() -> str:
    for ctrl in devices.controllers():
        if ctrl.serial == SERIAL:
            return ctrl.namespaces[0].generic
    sys.exit(f"vm_iops: no controller {SERIAL}: run me inside contrib/qemu/vm.py")


async def nvmefs_iops(path: str, transport: str, qd: int, seconds: float) -> float:
    engine = PassthroughEngine(
        devices.resolve(path),
        DebugRing(1024),
        transport=transport,
        policy=LogPolicy("media"),
        queue_depth=qd + 1,
    )
    async with engine.running():
        progress = workloads.Progress()
        with trio.move_on_after(1):  # warm-up
            await workloads.randread(engine, progress, bs=4096, qd=qd)
        before, t0 = engine.stats.completions, time.monotonic()
        with trio.move_on_after(seconds):
            await workloads.randread(engine, progress, bs=4096, qd=qd, seed=1)
        return (engine.stats.completions - before) / (time.monotonic() - t0)


def fio_iops(path: str, qd: int, seconds: float) -> float:
    out = subprocess.run(
        [
            "fio",
            "--name=r",
            f"--filename={path}",
            "--ioengine=io_uring_cmd",
            "--cmd_type=nvme",
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


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args()
    path = node()
    res: dict[str, float] = {}
    for qd in (1, 32):
        res[f"vm_fio_uring_cmd_iops_qd{qd}"] = fio_iops(path, qd, args.seconds)
        for transport in ("uring", "ioctl"):
            res[f"vm_{transport}_iops_qd{qd}"] = trio.run(
                nvmefs_iops, path, transport, qd, args.seconds
            )
    print(f"{'load':<28} {'QD1':>10} {'QD32':>10}")
    for name in ("fio_uring_cmd", "uring", "ioctl"):
        print(
            f"{name:<28} {res[f'vm_{name}_iops_qd1']:>10.0f} {res[f'vm_{name}_iops_qd32']:>10.0f}"
        )
    for t in ("uring", "ioctl"):
        for qd in (1, 32):
            res[f"vm_{t}_vs_fio_qd{qd}"] = (
                res[f"vm_{t}_iops_qd{qd}"] / res[f"vm_fio_uring_cmd_iops_qd{qd}"]
            )
    print(" ".join(f"{k}={v:.2f}" for k, v in res.items() if "_vs_" in k))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
