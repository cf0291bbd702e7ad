#!/usr/bin/env python3
"""Micro benchmark of the kernel source's trace page consumer: compiled against Python.

    .venv/bin/python contrib/bench/tracebulk.py [--pages N] [--runs R]

Both consumers read the same synthetic trace_pipe_raw pages of a storm (every request: six
failed attempts, then its block error, as the guest traces a failing read) spread over 4 CPUs,
under two policies: `media` (every request is a final Python receives) and one that logs
nothing (counting only: what the C side costs alone). Prints trace events/s of each (the median
of R runs), their spread, and the ratio compiled / Python measured in the same run. A timing, not
a test: the machines are shared and noisy, read the medians and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from nvmefs.linux import tracebulk  # noqa: E402
from nvmefs.linux.tracefs import EventFormat  # noqa: E402
from nvmefs.nvme.policy import LogPolicy  # noqa: E402
from tests.linux.tracepages import (  # noqa: E402
    BLOCK_FORMAT,
    NVME_FORMAT,
    block_record,
    event,
    nvme_record,
    raw_page,
)

CPUS = 4
DATA = 4096 - 16  # a page's data after its header


def storm_pages(n: int) -> tuple[list[tuple[int, bytes]], int]:
    """`n` full pages (cpu, page) of failing reads, and the trace events they hold."""
    out: list[tuple[int, bytes]] = []
    events = 0
    req = 0
    while len(out) < n:
        data = b""
        while True:
            attempts = [event(nvme_record(0x281, r, cid=(req * 8 + r) & 0xFFFF)) for r in range(6)]
            done = event(block_record(req * 8 % (1 << 30), 8, -61, "RS"))
            chunk = b"".join([*attempts, done])
            if len(data) + len(chunk) > DATA:
                break
            data += chunk
            events += 7
            req += 1
        out.append((len(out) % CPUS, raw_page(data)))
    return out, events


def run_once(impl: type[tracebulk.PythonConsumer | tracebulk.CompiledConsumer],
             pages: list[tuple[int, bytes]], keep: bytes) -> tuple[float, int]:  # fmt: skip
    nvme = EventFormat.parse("nvme", "nvme_complete_rq", NVME_FORMAT)
    block = EventFormat.parse("block", "block_rq_complete", BLOCK_FORMAT)
    c = impl(nvme, block, keep)
    finals = 0
    t0 = time.perf_counter()
    for cpu, pg in pages:
        finals += len(c.feed(cpu, pg, 1.0).finals)
    c.take_counts()
    return time.perf_counter() - t0, finals


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    if not tracebulk.available():
        print(f"no compiled consumer: {tracebulk.unavailable()}", file=sys.stderr)
        return 2
    pages, events = storm_pages(args.pages)
    print(f"{args.pages} pages, {events} trace events ({events // 7} failed requests), {CPUS} CPUs")
    print(f"{'policy':<8} {'consumer':<9} {'events/s':>12} {'spread':>8} {'finals':>7}")
    for label, keep in (("media", LogPolicy("media").table), ("none", bytes(2048))):
        rates: dict[str, float] = {}
        for impl in (tracebulk.PythonConsumer, tracebulk.CompiledConsumer):
            times, finals = [], 0
            for _ in range(args.runs):
                dt, finals = run_once(impl, pages, keep)
                times.append(dt)
            rate = events / statistics.median(times)
            spread = (max(times) - min(times)) / statistics.median(times)
            rates[impl.impl] = rate
            print(f"{label:<8} {impl.impl:<9} {rate:>12,.0f} {spread:>7.0%} {finals:>7}")
        print(f"{label:<8} ratio compiled/python: {rates['compiled'] / rates['python']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
