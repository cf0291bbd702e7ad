#!/usr/bin/env python3
"""Where nvmefs spends its time on a real device: cProfile of the uring randread in the test VM.

    contrib/qemu/vm.py run -- .venv/bin/python contrib/bench/vm_profile.py [--qd 1] [--seconds 5]
Prints the top entries by own time, as a note on where the VM IOPS go.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vm_iops import node, nvmefs_iops


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--qd", type=int, default=1)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--transport", default="uring")
    p.add_argument("--datapath", default="auto", choices=("auto", "compiled", "python"))
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()
    prof = cProfile.Profile()
    prof.enable()
    ran: list[str] = []
    iops = trio.run(nvmefs_iops, node(), args.transport, args.qd, args.seconds, args.datapath, ran)
    prof.disable()
    # The compiled loop's own time shows as one C call in a worker thread, which cProfile
    # does not see: the profile is of the Python around it.
    print(f"{args.transport} ({ran[0]}) QD{args.qd}: {iops:.0f} IOPS under the profiler")
    pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
