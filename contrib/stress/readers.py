"""Readers against an error storm: does every reader stay bounded, and does `cat` end?

    .venv/bin/python contrib/stress/readers.py [--tail-seconds 60] [--slow-seconds 40]
                                               [--handles 1000] [--json FILE] [--help: more]

Mounts nvmefs on the simulated controller with every read failing (the storm of issue 12:
`log=all,workload=randread,bs=4K,qd=32,retries=0`, so entries arrive as fast as the engine runs)
and measures, printing each figure:

1. `cat` of the ring (text and JSON lines), several times: how long it takes, how many entries
   and missed lines it printed (at most a capacity of entries plus missed lines).
2. Together: a `tail -f` of the ring, a slow reader (100 bytes every 10 ms) of the JSON lines, and
   a process holding many idle open handles; the daemon's RSS is sampled all along (its peak),
   then again once they have all closed.
3. That tail saw no "file truncated", that every line anyone got is whole, and that the slow
   reader's stream is in order with every gap counted in a missed line.

Exit status 0 when every bound holds, 1 otherwise (the failed bounds are printed), 2 on a setup
failure. Needs root and /dev/fuse. The durations and bounds are flags; the defaults are the
issue's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
NVMEFS = [sys.executable, "-m", "nvmefs"]
BUF = "nvme_circular_buffer"
STORM_PLAN = '[[fault]]\nopcode = "read"\nlba = [0, 1000000]\nstatus = 0x281\n'
STORM_OPTS = "log=all,fold=0,workload=randread,bs=4K,qd=32,retries=0"  # every entry its own
LINE = re.compile(rb"^\[[0-9TZ:.+ -]+\] [^\n\x00]+\n$")
MISSED = re.compile(rb"nvmefs: (\d+) entr(?:y|ies) missed")

# Run as separate processes, so that the daemon sees ordinary clients.
SLOW_READER = r"""
import json, os, sys, time
path, seconds, size, pause = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
fd = os.open(path, os.O_RDONLY)
data = bytearray()
eofs = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    chunk = os.read(fd, size)
    if not chunk:
        eofs += 1
    data += chunk
    time.sleep(pause)
os.close(fd)
expect, missed, entries, bad = None, 0, 0, 0
for line in bytes(data).split(b"\n")[:-1]:
    try:
        rec = json.loads(line)
    except ValueError:
        bad += 1
        continue
    if rec.get("kind") == "missed":
        missed += rec["missed"]
        if expect is not None:
            expect += rec["missed"]
        continue
    entries += 1
    if expect is not None and rec["seq"] != expect:
        bad += 1
    expect = rec["seq"] + 1
print(json.dumps({"bytes": len(data), "eofs": eofs, "entries": entries, "missed": missed,
                  "bad": bad}))
"""

IDLE_HANDLES = r"""
import os, resource, sys
path, n = sys.argv[1], int(sys.argv[2])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, n + 64)), hard))
fds = [os.open(path, os.O_RDONLY) for _ in range(n)]
print(len(fds), flush=True)
sys.stdin.read()
for fd in fds:
    os.close(fd)
print("closed", flush=True)
"""


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stats(mnt: Path) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in (mnt / "stats").read_text().splitlines())


def is_mounted(mnt: Path) -> bool:
    real = os.path.realpath(mnt)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise SystemExit(f"readers: timed out waiting for {what}")
        time.sleep(0.05)


@contextlib.contextmanager
def storm_mount(capacity: int) -> Iterator[tuple[Path, int]]:
    tmp = Path(tempfile.mkdtemp(prefix="nvmefs-stress-"))
    mnt = tmp / "mnt"
    mnt.mkdir()
    plan = tmp / "storm.toml"
    plan.write_text(STORM_PLAN)
    opts = f"faults={plan},{STORM_OPTS},capacity={capacity}"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run(
        [*NVMEFS, "sim", str(mnt), "-o", opts], cwd=REPO, env=env, capture_output=True, text=True
    )
    if p.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SystemExit(f"readers: cannot mount: {p.stderr.strip()}")
    pid = int(stats(mnt)["pid"])
    try:
        yield mnt, pid
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        end = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < end:
            time.sleep(0.05)
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGKILL)
        while is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


class Sampler:
    """The daemon's RSS every `period` seconds, in a thread, with the peak."""

    def __init__(self, pid: int, period: float = 0.2) -> None:
        self.pid = pid
        self.period = period
        self.peak = 0.0
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                mb = rss_mb(self.pid)
                self.samples.append(mb)
                self.peak = max(self.peak, mb)
            self._stop.wait(self.period)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def count_lines(data: bytes) -> tuple[int, int, int, int]:
    """(entries, missed lines, entries counted missed, malformed lines) of text ring output."""
    entries = missed_lines = missed = bad = 0
    for line in data.splitlines(keepends=True):
        m = MISSED.search(line)
        if m:
            missed_lines += 1
            missed += int(m.group(1))
        elif LINE.match(line):
            entries += 1
        else:
            bad += 1
    return entries, missed_lines, missed, bad


def json_counts(data: bytes) -> tuple[int, int, int]:
    entries = missed_lines = bad = 0
    for line in data.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if rec.get("kind") == "missed":
            missed_lines += 1
        else:
            entries += 1
    return entries, missed_lines, bad


def run_cats(mnt: Path, reps: int, timeout: float) -> dict[str, Any]:
    worst: dict[str, Any] = {"seconds": 0.0, "entries": 0, "missed_lines": 0, "bad": 0}
    worst["timed_out"] = False
    for rep in range(reps):
        name = BUF if rep % 2 == 0 else f"{BUF}.jsonl"
        t0 = time.monotonic()
        try:
            p = subprocess.run(["cat", str(mnt / name)], capture_output=True, timeout=timeout)
            out = p.stdout
        except subprocess.TimeoutExpired as e:
            worst["timed_out"] = True
            out = e.stdout or b""
        seconds = time.monotonic() - t0
        if name == BUF:
            entries, missed_lines, _, bad = count_lines(out)
        else:
            entries, missed_lines, bad = json_counts(out)
        worst["seconds"] = max(worst["seconds"], seconds)
        worst["entries"] = max(worst["entries"], entries)
        worst["missed_lines"] = max(worst["missed_lines"], missed_lines)
        worst["bad"] += bad + (b"\0" in out)
        worst["bytes"] = max(worst.get("bytes", 0), len(out))
    return worst


class TailCounter:
    """Counts what a `tail -f` prints as it prints it (a minute of a storm is hundreds of MB)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.bytes = self.entries = self.missed_lines = self.missed = self.bad = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        rest = b""
        while data := os.read(fd, 1 << 20):
            self.bytes += len(data)
            data = rest + data
            cut = data.rfind(b"\n") + 1
            rest = data[cut:]
            entries, missed_lines, missed, bad = count_lines(data[:cut])
            self.entries += entries
            self.missed_lines += missed_lines
            self.missed += missed
            self.bad += bad + (b"\0" in data[:cut])

    def join(self) -> None:
        self._thread.join(30)


def readers_phase(mnt: Path, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    fig: dict[str, Any] = {}
    before = rss_mb(pid)
    appended0 = int(stats(mnt)["ring_appended"])
    t0 = time.monotonic()
    with Sampler(pid) as sampler:
        tail = subprocess.Popen(
            ["tail", "-f", str(mnt / BUF)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        counter = TailCounter(tail)
        slow = subprocess.Popen(
            [
                sys.executable,
                "-c",
                SLOW_READER,
                str(mnt / f"{BUF}.jsonl"),
                str(args.slow_seconds),
                str(args.slow_bytes),
                str(args.slow_pause),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        idle = subprocess.Popen(
            [sys.executable, "-c", IDLE_HANDLES, str(mnt / BUF), str(args.handles)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert idle.stdout is not None and idle.stdin is not None and tail.stderr is not None
        fig["idle_handles_open"] = int(idle.stdout.readline() or 0)
        fig["rss_with_idle_handles_mb"] = rss_mb(pid)
        time.sleep(max(0.0, t0 + args.tail_seconds - time.monotonic()))
        tail.send_signal(signal.SIGTERM)
        tail.wait(10)
        counter.join()
        err = tail.stderr.read()
        slow_out, _ = slow.communicate(timeout=args.slow_seconds + 60)
        idle.stdin.close()
        idle.stdout.readline()
        idle.wait(30)
        fig["phase_seconds"] = time.monotonic() - t0
        fig["appended_per_s"] = (int(stats(mnt)["ring_appended"]) - appended0) / (
            time.monotonic() - t0
        )
    fig["rss_before_mb"] = before
    fig["rss_peak_mb"] = sampler.peak
    # Let the daemon finish the releases, then take the lowest of a few samples: a sample can
    # land in the middle of one request's rendering.
    time.sleep(args.settle)
    after = []
    for _ in range(5):
        after.append(rss_mb(pid))
        time.sleep(0.1)
    fig["rss_after_close_mb"] = min(after)
    fig["tail"] = {
        "bytes": counter.bytes,
        "entries": counter.entries,
        "missed_lines": counter.missed_lines,
        "missed": counter.missed,
        "bad_lines": counter.bad,
        "truncated": b"truncated" in err,
        "stderr": err.decode(errors="replace").strip()[:200],
    }
    fig["slow"] = json.loads(slow_out)
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--capacity", type=int, default=1024, help="ring entries (default 1024)")
    p.add_argument("--tail-seconds", type=float, default=60.0)
    p.add_argument("--slow-seconds", type=float, default=40.0)
    p.add_argument("--slow-bytes", type=int, default=100, help="bytes per slow read")
    p.add_argument("--slow-pause", type=float, default=0.01, help="seconds between slow reads")
    p.add_argument("--handles", type=int, default=1000, help="idle open handles")
    p.add_argument("--cats", type=int, default=6, help="cat runs (text and JSON alternately)")
    p.add_argument("--cat-limit", type=float, default=2.0, help="seconds a cat may take")
    p.add_argument("--rss-limit", type=float, default=80.0, help="MB while the readers run")
    p.add_argument("--rss-after-limit", type=float, default=40.0, help="MB once they closed")
    p.add_argument("--settle", type=float, default=2.0, help="seconds to wait after closing")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("readers: needs root (FUSE mounts)", file=sys.stderr)
        return 2

    with storm_mount(args.capacity) as (mnt, pid):
        wait_until(lambda: int(stats(mnt)["ring_appended"]) > 2 * args.capacity, 60, "a full ring")
        fig: dict[str, Any] = {"capacity": args.capacity}
        fig["cat"] = run_cats(mnt, args.cats, timeout=max(10.0, 5 * args.cat_limit))
        fig.update(readers_phase(mnt, pid, args))
        fig["ring_appended"] = int(stats(mnt)["ring_appended"])

    cat, tail, slow = fig["cat"], fig["tail"], fig["slow"]
    print(f"storm: {fig['appended_per_s']:,.0f} entries/s, capacity {args.capacity}")
    print(
        f"cat x{args.cats}: longest {cat['seconds']:.3f} s, at most {cat['entries']} entries and "
        f"{cat['missed_lines']} missed lines ({cat['bytes']:,} bytes)"
    )
    print(
        f"tail -f {args.tail_seconds:g} s: {tail['entries']:,} entries, {tail['missed_lines']:,} "
        f"missed lines ({tail['missed']:,} entries missed), {tail['bytes']:,} bytes"
    )
    print(
        f"slow reader {args.slow_seconds:g} s ({args.slow_bytes} B / {args.slow_pause * 1000:g} "
        f"ms): {slow['bytes']:,} bytes, {slow['entries']:,} entries, {slow['missed']:,} missed, "
        f"{slow['eofs']} EOFs"
    )
    print(f"idle handles: {fig['idle_handles_open']}")
    print(
        f"daemon RSS: {fig['rss_before_mb']:.1f} MB before, {fig['rss_with_idle_handles_mb']:.1f} "
        f"MB with the idle handles open, peak {fig['rss_peak_mb']:.1f} MB, "
        f"{fig['rss_after_close_mb']:.1f} MB after they closed"
    )

    failed = []
    if cat["timed_out"] or cat["seconds"] > args.cat_limit:
        failed.append(f"cat took {cat['seconds']:.2f} s (limit {args.cat_limit:g})")
    if cat["entries"] > args.capacity:
        failed.append(f"cat printed {cat['entries']} entries (capacity {args.capacity})")
    if cat["bad"]:
        failed.append(f"cat printed {cat['bad']} malformed lines")
    if fig["rss_peak_mb"] > args.rss_limit:
        failed.append(f"peak RSS {fig['rss_peak_mb']:.1f} MB (limit {args.rss_limit:g})")
    if fig["rss_after_close_mb"] > args.rss_after_limit:
        failed.append(
            f"RSS after close {fig['rss_after_close_mb']:.1f} MB (limit {args.rss_after_limit:g})"
        )
    if tail["truncated"] or tail["bad_lines"]:
        failed.append(f"tail: truncated={tail['truncated']} bad lines={tail['bad_lines']}")
    if slow["bad"]:
        failed.append(f"slow reader: {slow['bad']} lines out of order or malformed")
    if fig["idle_handles_open"] != args.handles:
        failed.append(f"only {fig['idle_handles_open']} of {args.handles} handles opened")
    fig["failed"] = failed
    if args.json:
        args.json.write_text(json.dumps(fig, indent=2) + "\n")
    for f in failed:
        print(f"FAILED: {f}")
    print("all bounds held" if not failed else f"{len(failed)} bound(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
