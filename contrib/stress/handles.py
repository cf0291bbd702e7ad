"""Many handles from one unprivileged user: what do they cost the root daemon, and does it get
the memory back once they close? (issue 18, item 6)

    .venv/bin/python contrib/stress/handles.py [--handles 15000] [--touch read|idle] [--runs 3]
                                               [--user nobody] [--user-handles N]
                                               [--user-bytes N] [--quiet] [--json FILE]

Mounts nvmefs `allow_other` on the simulated controller, by default under an error storm
(every read fails, `log=all,workload=randread,bs=4K,qd=32,retries=0`: the ring turns over
thousands of times a second, so no two handles see the same window and nothing they keep is
shared), and per run:

1. the daemon's RSS once the storm has filled the ring (idle: no handle open);
2. one process of an unprivileged user (setpriv; `nobody` by default) opens `--handles` handles
   on nvme_circular_buffer, each read once (1 byte) and fstat()ed with `--touch read` (so each
   renders and keeps up to a ring's worth), or left untouched with `--touch idle`, until an open
   fails: how many it got and the errno, and the daemon's RSS with them all open;
3. it closes them all: the daemon's RSS once it has settled (no change over 3 s; the kernel
   sends the daemon a RELEASE per handle, which a daemon busy with a storm takes a while to
   serve), and how long that took.

The daemon's per-user bounds stop the opens below 15,000: USER_BYTES (rendered bytes kept) when
each handle is read, USER_HANDLES when they are idle. `--user-handles N` and `--user-bytes N` set
them (and the global ones, if need be) in the daemon for this run only, to measure past them.
The user process keeps this process's open-files limit through setpriv, so it is raised here
first (RLIMIT_NOFILE, soft and hard: needs root). Prints each run and the medians; exit status
0, or 2 on a setup failure. Needs root and /dev/fuse.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BUF = "nvme_circular_buffer"
STORM_PLAN = '[[fault]]\nopcode = "read"\nlba = [0, 1000000]\nstatus = 0x281\n'
STORM_OPTS = "log=all,fold=0,workload=randread,bs=4K,qd=32,retries=0"  # every entry its own

# The daemon, with the per-user bounds of nvmefs.fs.handles set for this run (the global ones
# raised to match when they would otherwise stop the opens first); 0 leaves a bound as it is.
DAEMON = r"""
import sys
import nvmefs.fs.handles as fs
handles, nbytes = int(sys.argv[1]), int(sys.argv[2])
if handles > 0:
    fs.USER_HANDLES = handles
    fs.ALL_HANDLES = max(fs.ALL_HANDLES, handles + fs.ROOT_RESERVED_HANDLES)
if nbytes > 0:
    fs.USER_BYTES = nbytes
    fs.USERS_BYTES = max(fs.USERS_BYTES, nbytes)
from nvmefs.cli import main
sys.exit(main(sys.argv[3:]))
"""

# The user's process: open handles until refused or `want` of them, report, close when told.
HOLDER = r"""
import os, sys
path, want, touch = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "read"
fds, err = [], 0
while len(fds) < want:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        err = e.errno
        break
    fds.append(fd)
    if touch:
        os.read(fd, 1)
        os.fstat(fd)
print(len(fds), err, flush=True)
sys.stdin.readline()
for fd in fds:
    os.close(fd)
print("closed", flush=True)
sys.stdin.readline()
"""


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def settled(pid: int, seconds: float) -> float:
    """The median of the daemon's RSS sampled over `seconds`."""
    samples = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        samples.append(rss_mb(pid))
        time.sleep(0.05)
    return statistics.median(samples)


def settle(pid: int, quiet_for: float = 3.0, limit: float = 300.0) -> tuple[float, float]:
    """Wait until the daemon's RSS has moved by less than 1 MB for `quiet_for` seconds (at most
    `limit`): that RSS, and the seconds it took."""
    t0 = time.monotonic()
    last, since = rss_mb(pid), t0
    while time.monotonic() - t0 < limit:
        time.sleep(0.25)
        now = rss_mb(pid)
        if abs(now - last) >= 1.0:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_for:
            break
    return settled(pid, 1.0), since - t0


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
            raise SystemExit(f"handles: timed out waiting for {what}")
        time.sleep(0.05)


@contextlib.contextmanager
def mount(quiet: bool, user_handles: int, user_bytes: int) -> Iterator[tuple[Path, int]]:
    """The daemon `allow_other` in a directory every user can reach, and its pid."""
    tmp = Path(tempfile.mkdtemp(prefix="nvmefs-handles-"))
    tmp.chmod(0o755)
    mnt = tmp / "mnt"
    mnt.mkdir()
    opts = "allow_other,workload=idle"
    if not quiet:
        plan = tmp / "storm.toml"
        plan.write_text(STORM_PLAN)
        opts = f"allow_other,faults={plan},{STORM_OPTS}"
    bounds = [str(user_handles), str(user_bytes)]
    p = subprocess.run(
        [sys.executable, "-c", DAEMON, *bounds, "sim", str(mnt), "-o", opts],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if p.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"handles: cannot mount: {p.stderr.strip()}", file=sys.stderr)
        raise SystemExit(2)
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


def one_run(args: argparse.Namespace, uid: int, gid: int) -> dict[str, Any]:
    with mount(args.quiet, args.user_handles, args.user_bytes) as (mnt, pid):
        if not args.quiet:
            wait_until(lambda: int(stats(mnt)["ring_appended"]) > 8192, 60, "the storm")
        idle = settled(pid, 2.0)
        holder = subprocess.Popen(
            [
                "setpriv",
                f"--reuid={uid}",
                f"--regid={gid}",
                "--clear-groups",
                "--",
                sys.executable,
                "-c",
                HOLDER,
                str(mnt / BUF),
                str(args.handles),
                args.touch,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdin is not None and holder.stdout is not None
        try:
            t0 = time.monotonic()
            opened, err = map(int, holder.stdout.readline().split())
            open_s = time.monotonic() - t0
            held = settled(pid, 1.0)
            t0 = time.monotonic()
            holder.stdin.write("\n")
            holder.stdin.flush()
            if holder.stdout.readline() != "closed\n":
                raise SystemExit("handles: the user's process did not close its handles")
            close_s = time.monotonic() - t0
            after, settle_s = settle(pid)
        finally:
            holder.kill()
            holder.wait()
    return {
        "opened": opened,
        "errno": err,
        "error": os.strerror(err) if err else "",
        "open_seconds": round(open_s, 2),
        "close_seconds": round(close_s, 2),
        "settle_seconds": round(settle_s, 1),
        "rss_idle_mb": round(idle, 1),
        "rss_open_mb": round(held, 1),
        "rss_after_close_mb": round(after, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--handles", type=int, default=15000, help="handles to try to open")
    ap.add_argument("--touch", choices=("read", "idle"), default="read")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--user", default="nobody", help="the unprivileged account to open them as")
    ap.add_argument(
        "--user-handles", type=int, default=0, help="the daemon's per-user bound (0: its own)"
    )
    ap.add_argument(
        "--user-bytes",
        type=int,
        default=0,
        help="the daemon's per-user bound on rendered bytes kept (0: its own)",
    )
    ap.add_argument("--quiet", action="store_true", help="no storm: workload=idle")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("handles: needs root (mount, setpriv, RLIMIT_NOFILE)", file=sys.stderr)
        return 2
    pw = pwd.getpwnam(args.user)
    want = args.handles + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))
    print(
        f"{args.handles} handles ({args.touch}) as {args.user} (uid {pw.pw_uid}), "
        f"{'idle daemon' if args.quiet else 'storm'}, RLIMIT_NOFILE "
        f"{resource.getrlimit(resource.RLIMIT_NOFILE)[0]}",
        flush=True,
    )
    runs = []
    for i in range(args.runs):
        r = one_run(args, pw.pw_uid, pw.pw_gid)
        runs.append(r)
        print(
            f"run {i + 1}: opened {r['opened']} ({r['error'] or 'all'}) in {r['open_seconds']} s, "
            f"closed in {r['close_seconds']} s; daemon RSS idle {r['rss_idle_mb']} MB, "
            f"open {r['rss_open_mb']} MB, after close {r['rss_after_close_mb']} MB "
            f"(settled {r['settle_seconds']} s after)",
            flush=True,
        )
    med = {
        k: statistics.median(r[k] for r in runs)
        for k in ("opened", "rss_idle_mb", "rss_open_mb", "rss_after_close_mb")
    }
    print(
        f"median of {len(runs)}: opened {med['opened']:.0f}; daemon RSS idle "
        f"{med['rss_idle_mb']:.1f} MB, open {med['rss_open_mb']:.1f} MB, after close "
        f"{med['rss_after_close_mb']:.1f} MB"
    )
    if args.json is not None:
        args.json.write_text(json.dumps({"runs": runs, "median": med}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
