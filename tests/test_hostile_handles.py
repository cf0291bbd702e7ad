"""A local user against the root daemon's handles (issue 18, items 6, 7 and 9).

Each FUSE test plays an unprivileged user (tests/hostile.py: a real account, commands through
setpriv) against a real `allow_other` mount, under the kernel's fs.protected_* settings both as
a stock host has them and all off:
  - item 6: handles, idle or each read once and stat()ed (so each keeps up to a ring's worth),
    stop at the documented bound with EMFILE; the daemon's RSS stays within what the bounds
    allow and comes back near its idle size once they close;
  - item 7: a stat loop on the snapshot files renders them at most once per SNAPSHOT_SIZE_TTL;
  - item 9: O_RDONLY|O_TRUNC on a read-only file is refused.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pyfuse3
import pytest

from nvmefs.fs import NvmeFS, handles, ops
from nvmefs.recorder import Recorder
from nvmefs.store.events import HostEvent
from nvmefs.store.render import Clock, Renderer
from nvmefs.store.ring import DebugRing
from tests import hostile
from tests.hostile import HostileUser
from tests.mounts import BUF, daemon_pids, is_mounted, mounted, stats, wait_for

pytestmark = pytest.mark.fuse

REPO = Path(__file__).resolve().parents[1]
STORM = '[[fault]]\nopcode = "read"\nlba = [0, 1000000]\nstatus = 0x281\n'
# fold=0: every failed read an entry of its own (a storm that folded would not turn the
# ring over).
STORM_OPTS = "log=all,workload=randread,bs=4K,qd=32,retries=0,fold=0"
READ_ONLY = (BUF, f"{BUF}.jsonl", "stats", "nvmefs.prom")
MiB = 1 << 20
# What one open handle costs the daemon beyond the bytes its stream keeps (the stream object and
# its lists, its place in the handle tables): measured at about 0.7 KB; with a margin, and some
# slack for the allocators on top of the bounds.
HANDLE_COST = 1200
SLACK_MB = 12.0
# How near its idle size the daemon must come back once every handle closed: the bytes streams
# kept go back to the system (malloc_trim), while the small objects of the handles stay in
# CPython's arenas for the next ones (pinned there by what the storm allocated meanwhile).
AFTER_CLOSE_MB = handles.USER_HANDLES * HANDLE_COST / MiB + 4.0

# Run by the hostile user: open handles until refused (or `want` of them), each read once and
# stat()ed if asked, report how many and the errno, then close them all when told.
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
    if touch:  # the attack of issue 18: each handle renders and keeps up to a ring's worth
        os.read(fd, 1)
        os.fstat(fd)
print(len(fds), err, flush=True)
sys.stdin.readline()
for fd in fds:
    os.close(fd)
print("closed", flush=True)
sys.stdin.readline()
"""


@contextlib.contextmanager
def public_mount(opts: str, plan: str | None = None) -> Iterator[Path]:
    """The daemon on the simulated controller, `allow_other`, where the hostile user can reach
    it (pytest's own tmp root is 0700)."""
    with hostile.public_dir(0o755) as d, mounted(d, f"allow_other,{opts}", plan) as mnt:
        yield mnt


@contextlib.contextmanager
def open_files(n: int) -> Iterator[None]:
    """Let this process (and the user processes it starts, which keep its rlimit through
    setpriv) hold `n` descriptors and some more."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 256
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def settled_rss(pid: int, seconds: float = 1.0) -> float:
    """The median of the daemon's RSS over `seconds` (a storm makes it move a little)."""
    samples = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        samples.append(rss_mb(pid))
        time.sleep(0.05)
    return statistics.median(samples)


def the_daemon(mnt: Path) -> int:
    pid = int(stats(mnt)["pid"])
    assert pid in daemon_pids(mnt)
    return pid


# -- item 6: what one user's handles can make the daemon hold ---------------------------------


@pytest.mark.parametrize("touch", ["idle", "read"])
def test_a_users_handles_stop_at_its_bound_and_the_daemon_returns_near_idle_after_close(
    hostile_user: HostileUser, protected: str, touch: str
) -> None:
    with public_mount(STORM_OPTS, STORM) as mnt, open_files(handles.USER_HANDLES + 16):
        pid = the_daemon(mnt)
        wait_for(lambda: int(stats(mnt)["ring_appended"]) > 8192, 30, "a storm")
        idle = settled_rss(pid)
        holder = hostile_user.popen(
            sys.executable,
            "-c",
            HOLDER,
            str(mnt / BUF),
            str(handles.USER_HANDLES + 16),
            touch,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert holder.stdin is not None and holder.stdout is not None
        try:
            opened, err = map(int, holder.stdout.readline().split())
            held = settled_rss(pid, 0.5)
            # Idle handles keep nothing: the count is the bound. Handles read and stat()ed keep
            # up to a ring's worth each: the bytes bound comes first.
            assert err == errno.EMFILE, (opened, err)
            if touch == "idle":
                assert opened == handles.USER_HANDLES
            else:
                assert 0 < opened < handles.USER_HANDLES
            bound = (handles.USER_BYTES + handles.USER_HANDLES * HANDLE_COST) / MiB + SLACK_MB
            assert held - idle < bound, (idle, held, bound)
            holder.stdin.write("\n")
            holder.stdin.flush()
            assert holder.stdout.readline() == "closed\n"
            # Back near idle once the deferred trim has run.
            wait_for(lambda: rss_mb(pid) - idle < AFTER_CLOSE_MB, 10, "the memory to go back")
        finally:
            holder.kill()
            holder.wait()
        assert "nvme_circular_buffer" in os.listdir(mnt)  # still serving


def test_root_is_held_to_the_global_bound_that_users_handles_count_in(
    hostile_user: HostileUser, protected: str
) -> None:
    with public_mount("workload=idle") as mnt, open_files(handles.ALL_HANDLES):
        holder = hostile_user.popen(
            sys.executable,
            "-c",
            HOLDER,
            str(mnt / BUF),
            str(handles.USER_HANDLES),
            "idle",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert holder.stdin is not None and holder.stdout is not None
        fds: list[int] = []
        try:
            assert holder.stdout.readline().split() == [str(handles.USER_HANDLES), "0"]
            with pytest.raises(OSError) as refused:
                while len(fds) <= handles.ALL_HANDLES:
                    fds.append(os.open(mnt / BUF, os.O_RDONLY))
            assert refused.value.errno == errno.ENFILE
            assert len(fds) == handles.ALL_HANDLES - handles.USER_HANDLES
        finally:
            for fd in fds:
                os.close(fd)
            holder.kill()
            holder.wait()
        assert (mnt / "stats").read_text()  # everything closed: root opens again


class Ctx(SimpleNamespace):
    uid: int
    gid: int
    pid: int


async def test_users_together_leave_roots_reserve_and_each_gets_back_what_it_closes() -> None:
    """Without FUSE: several users at their own bound fill what all users but root may hold
    (ENFILE), root still opens its reserve, and a close gives a handle back."""
    ring = DebugRing(64)
    ring.append(HostEvent("notice", "hello"))
    nvme = NvmeFS(Recorder(ring, Renderer(Clock("jiffies", 1000))))

    async def open_as(uid: int) -> int:
        ctx = cast(Any, Ctx(uid=uid, gid=uid, pid=os.getpid()))
        info = await nvme.open(ops.BUF, os.O_RDONLY, ctx)
        return int(info.fh)

    async def fill(uid: int) -> tuple[list[int], int]:
        """Open handles as `uid` until refused: them, and the errno (0: never refused)."""
        fhs: list[int] = []
        while len(fhs) <= handles.ALL_HANDLES:
            try:
                fhs.append(await open_as(uid))
            except pyfuse3.FUSEError as e:
                return fhs, e.errno
        return fhs, 0

    users = handles.ALL_HANDLES - handles.ROOT_RESERVED_HANDLES
    got: dict[int, list[int]] = {}
    uid = 1000
    while sum(map(len, got.values())) < users:
        fhs, err = await fill(uid)
        got[uid] = fhs
        if len(fhs) < handles.USER_HANDLES:
            assert err == errno.ENFILE  # the users' share is full, not this user's own
        else:
            assert err == errno.EMFILE
        uid += 1
    assert sum(map(len, got.values())) == users and len(got[1003]) < handles.USER_HANDLES
    root, err = await fill(0)
    assert err == errno.ENFILE and len(root) == handles.ROOT_RESERVED_HANDLES
    with pytest.raises(pyfuse3.FUSEError) as e:
        await open_as(0)  # root is held to the global bound too
    assert e.value.errno == errno.ENFILE
    await nvme.release(got[1000].pop())
    got[1000].append(await open_as(1000))  # the user's handle came back to it
    await nvme.release(root.pop())
    with pytest.raises(pyfuse3.FUSEError) as e:
        await open_as(1003)  # below its own bound, but root's reserve is not for users
    assert e.value.errno == errno.ENFILE
    root.append(await open_as(0))
    for fh in [*root, *(f for fhs in got.values() for f in fhs)]:
        await nvme.release(fh)
    got[1000] = [await open_as(1000)]  # everything was given back
    await nvme.release(got[1000][0])


# -- item 7: a stat loop does not render the snapshot files ------------------------------------

# NvmeFS mounted by a process of its own, counting what the snapshot files cost to render: the
# count of each goes to stdout when it ends. A task appends an entry every 50 ms, so that every
# snapshot differs from the last.
COUNTING_FS = r"""
import signal, sys, time
import pyfuse3, trio
from nvmefs.fs import NvmeFS
from nvmefs.outputs.metrics import Metrics
from nvmefs.recorder import Recorder
from nvmefs.store.events import HostEvent
from nvmefs.store.render import Clock, Renderer
from nvmefs.store.ring import DebugRing

renders = {"prom": 0, "stats": 0}


class CountingMetrics(Metrics):
    def exposition(self, recorder):
        renders["prom"] += 1
        return super().exposition(recorder)


class CountingRecorder(Recorder):
    def stats_text(self):
        renders["stats"] += 1
        return super().stats_text()


mnt = sys.argv[1]
ring = DebugRing(64)
ring.append(HostEvent("notice", "hello"))
recorder = CountingRecorder(ring, Renderer(Clock("jiffies", 1000)))
fs = NvmeFS(recorder, mountpoint=mnt, prom=CountingMetrics().exposition)
pyfuse3.init(fs, mnt, {"fsname=test", "subtype=nvmefs", "allow_other"})


async def main() -> None:
    async with trio.open_nursery() as n:
        async def signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM) as received:
                async for _ in received:
                    pyfuse3.terminate()

        async def workload() -> None:
            i = 0
            while True:
                await trio.sleep(0.05)
                i += 1
                ring.append(HostEvent("notice", f"tick {i}"))

        n.start_soon(signals)
        n.start_soon(workload)
        print("ready", flush=True)
        await pyfuse3.main()
        n.cancel_scope.cancel()


t0 = time.monotonic()
try:
    trio.run(main)
finally:
    pyfuse3.close(unmount=True)
print(renders["prom"], renders["stats"], time.monotonic() - t0, flush=True)
"""

# Run by the hostile user: stat() the given files in a loop for `seconds`; print how many.
STAT_LOOP = r"""
import os, sys, time
seconds, paths = float(sys.argv[1]), sys.argv[2:]
n = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    for p in paths:
        os.stat(p)
        n += 1
print(n, flush=True)
"""


@contextlib.contextmanager
def counting_fs(mnt: Path) -> Iterator[subprocess.Popen[str]]:
    mnt.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", COUNTING_FS, str(mnt)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        wait_for(lambda: is_mounted(mnt), 10, "the mount")
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        while is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_stat_loop_renders_the_snapshot_files_at_most_once_per_interval(
    hostile_user: HostileUser, protected: str
) -> None:
    seconds = 3.0
    with hostile.public_dir(0o755) as d:
        mnt = d / "mnt"
        with counting_fs(mnt) as proc:
            loops = [
                hostile_user.popen(
                    sys.executable,
                    "-c",
                    STAT_LOOP,
                    str(seconds),
                    str(mnt / "nvmefs.prom"),
                    str(mnt / "stats"),
                    stdout=subprocess.PIPE,
                )
                for _ in range(2)
            ]
            statted = 0
            for loop in loops:
                out, _ = loop.communicate(timeout=60)
                assert loop.returncode == 0
                statted += int(out)
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=10)
        prom, stats_, alive = out.split()
        # Each file: at most one render per interval of the daemon's life (and one to start).
        most = float(alive) / ops.SNAPSHOT_SIZE_TTL + 1
        assert statted > 20 * most, (statted, most)  # the loops did stat, and often
        assert int(prom) <= most and int(stats_) <= most, (prom, stats_, most, err)


# -- item 9: O_TRUNC on a read-only file ------------------------------------------------------

TRUNC = r"""
import os, sys
for path in sys.argv[1:]:
    for flags in (os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_TRUNC):
        try:
            os.close(os.open(path, flags))
            print("opened", flush=True)
        except OSError as e:
            print(e.errno, flush=True)
"""


def test_o_trunc_on_a_read_only_file_is_refused_to_a_user_and_to_root(
    hostile_user: HostileUser, protected: str
) -> None:
    with public_mount("workload=idle") as mnt:
        paths = [str(mnt / name) for name in READ_ONLY]
        before = [(mnt / name).read_bytes() for name in (BUF, f"{BUF}.jsonl")]
        p = hostile_user.run(sys.executable, "-c", TRUNC, *paths)
        answers = p.stdout.split()
        assert len(answers) == 2 * len(READ_ONLY)
        assert all(a in (str(errno.EACCES), str(errno.EPERM)) for a in answers), answers
        for path in paths:  # root too: the modes hold for everyone here
            with pytest.raises(PermissionError):
                os.open(path, os.O_RDONLY | os.O_TRUNC)
        assert [(mnt / name).read_bytes() for name in (BUF, f"{BUF}.jsonl")] == before
        # Control is written with O_TRUNC by every shell (`echo clear > control`): still fine.
        fd = os.open(mnt / "control", os.O_WRONLY | os.O_TRUNC)
        try:
            assert os.write(fd, b"clear\n") == 6
        finally:
            os.close(fd)
        assert stats(mnt)["ring_cleared"] != "0"
