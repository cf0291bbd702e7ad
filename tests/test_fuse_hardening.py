"""Issue 12, reader side, on real mounts with real clients: bounded readers, `cat` ends, whole
control writes, st_size per process, `clear` leaves a trace, lazy unmount, a fixed namespace."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.mounts import BUF, LINE, gone, is_mounted, mounted, stats, wait_for

pytestmark = pytest.mark.fuse

REPO = Path(__file__).resolve().parents[1]
# The storm of issue 12: every read fails, every completion logged, as fast as the engine goes.
STORM = '[[fault]]\nopcode = "read"\nlba = [0, 1000000]\nstatus = 0x281\n'
# fold=0: every failed read an entry of its own (a storm that folded would not turn the
# ring over).
STORM_OPTS = "log=all,workload=randread,bs=4K,qd=32,retries=0,fold=0"
MISSED = re.compile(rb"nvmefs: (\d+) entr(?:y|ies) missed")
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

# NvmeFS mounted by a process of its own, without daemon.py: to set what daemon.py does not
# (the mountpoint for the lazy-unmount check, no default_permissions). A task appends an entry
# every 50 ms, as a workload would.
FS_ONLY = r"""
import signal, sys
import pyfuse3, trio
from nvmefs.fs import NvmeFS
from nvmefs.recorder import Recorder
from nvmefs.store.events import HostEvent
from nvmefs.store.render import Clock, Renderer
from nvmefs.store.ring import DebugRing

mnt, opts = sys.argv[1], set(filter(None, sys.argv[2].split(",")))
ring = DebugRing(64)
ring.append(HostEvent("notice", "hello"))
fs = NvmeFS(Recorder(ring, Renderer(Clock("jiffies", 1000))), mountpoint=mnt)
pyfuse3.init(fs, mnt, {"fsname=test", "subtype=nvmefs", *opts})


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


try:
    trio.run(main)
finally:
    pyfuse3.close(unmount=True)
print("stopped", flush=True)
"""


@contextlib.contextmanager
def fs_only(mnt: Path, opts: str = "") -> Iterator[subprocess.Popen[str]]:
    mnt.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", FS_ONLY, str(mnt), opts],
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


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory a non-root user can reach (pytest's own tmp root is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="nvmefs-test-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def read_all(fd: int) -> bytes:
    out = b""
    while data := os.read(fd, 1 << 16):
        out += data
    return out


# -- 1, 2: bounded readers, and cat ends --------------------------------------------------------


def test_cat_ends_within_2s_on_a_storm_with_at_most_a_capacity_of_entries(tmp_path: Path) -> None:
    with mounted(tmp_path, STORM_OPTS, STORM) as mnt:
        wait_for(lambda: int(stats(mnt)["ring_appended"]) > 4096, 30, "a storm")
        for name in (BUF, f"{BUF}.jsonl"):
            for _ in range(3):
                t0 = time.monotonic()
                out = subprocess.run(
                    ["cat", str(mnt / name)], capture_output=True, check=True, timeout=30
                ).stdout
                assert time.monotonic() - t0 < 2.0
                assert b"\0" not in out and out.endswith(b"\n")
                lines = out.splitlines(keepends=True)
                if name == BUF:
                    assert all(LINE.match(line) for line in lines)
                    entries = sum(1 for line in lines if not MISSED.search(line))
                else:
                    records = [json.loads(line) for line in lines]
                    seqs = [r["seq"] for r in records if r["kind"] != "missed"]
                    assert seqs == sorted(set(seqs))
                    entries = len(seqs)
                assert 0 < entries <= 1024


def test_storm_followers_keep_the_daemon_small_and_a_dropped_offset_is_refused(
    tmp_path: Path,
) -> None:
    with mounted(tmp_path, STORM_OPTS, STORM) as mnt:
        wait_for(lambda: int(stats(mnt)["ring_appended"]) > 4096, 30, "a storm")
        pid = int(stats(mnt)["pid"])
        before = rss_mb(pid)
        out = (tmp_path / "tail.out").open("wb")
        tail = subprocess.Popen(
            ["tail", "-f", str(mnt / f"{BUF}.jsonl")], stdout=out, stderr=subprocess.PIPE
        )
        got = {"slow": 0}

        def slow() -> None:  # 100 bytes every 10 ms: far behind the storm
            fd = os.open(mnt / f"{BUF}.jsonl", os.O_RDONLY)
            end = time.monotonic() + 4
            while time.monotonic() < end:
                got["slow"] += len(os.read(fd, 100))
                time.sleep(0.01)
            os.close(fd)

        reader = threading.Thread(target=slow)
        reader.start()
        peak = before
        end = time.monotonic() + 4
        while time.monotonic() < end:
            peak = max(peak, rss_mb(pid))
            time.sleep(0.1)
        reader.join()
        tail.terminate()
        _, err = tail.communicate(timeout=10)
        out.close()
        assert b"truncated" not in err
        # What tail printed is one stream: no repeats, and every gap is a missed line's count.
        text = (tmp_path / "tail.out").read_bytes()
        records = [json.loads(line) for line in text[: text.rfind(b"\n") + 1].splitlines()]
        expect, entries = None, 0
        for r in records:
            if r["kind"] == "missed":
                expect = None if expect is None else expect + r["missed"]
                continue
            assert expect is None or r["seq"] == expect, (r["seq"], expect)
            expect = r["seq"] + 1
            entries += 1
        assert entries > 1000
        assert got["slow"] > 10_000
        assert peak < before + 20, (before, peak)  # it was GBs: every handle kept everything

        # A handle that went far ahead keeps only a ring's worth: the start is refused (ENODATA),
        # never answered with other bytes.
        fd = os.open(mnt / BUF, os.O_RDONLY)
        try:
            read = 0
            while read < 3 << 20:
                n = len(os.read(fd, 1 << 17))
                if not n:
                    time.sleep(0.01)  # at the horizon: the storm goes on
                read += n
            with pytest.raises(OSError) as e:
                os.pread(fd, 100, 0)
            assert e.value.errno == errno.ENODATA
        finally:
            os.close(fd)


def test_the_stress_program_holds_its_bounds_with_small_numbers(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    p = subprocess.run(
        [
            sys.executable,
            str(REPO / "contrib/stress/readers.py"),
            "--tail-seconds=4",
            "--slow-seconds=4",
            "--handles=1000",
            "--cats=4",
            f"--json={out}",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    fig = json.loads(out.read_text())
    assert fig["failed"] == []
    assert fig["cat"]["seconds"] < 2 and 0 < fig["cat"]["entries"] <= 1024
    assert fig["rss_peak_mb"] < 80 and fig["rss_after_close_mb"] < 40
    assert fig["idle_handles_open"] == 1000
    assert fig["tail"]["entries"] > 0 and not fig["tail"]["truncated"]
    assert fig["slow"]["entries"] > 0 and fig["slow"]["bad"] == 0
    assert "daemon RSS:" in p.stdout and "cat x4:" in p.stdout


# -- 6: control ----------------------------------------------------------------------------------


def _refused(fd: int, data: bytes, offset: int | None = None) -> None:
    with pytest.raises(OSError) as e:
        if offset is None:
            os.write(fd, data)
        else:
            os.pwrite(fd, data, offset)
    assert e.value.errno == errno.EINVAL


def test_control_applies_only_a_whole_small_write_at_offset_0(tmp_path: Path) -> None:
    with mounted(tmp_path, "workload=idle") as mnt:
        ctl = mnt / "control"
        fd = os.open(ctl, os.O_WRONLY)
        try:
            # 1 MB: the kernel splits it into several requests; none of them applies.
            _refused(fd, b"profile=linux-5.14\n" + b" " * (1 << 20))
            _refused(fd, b"log=" + b":".join([b"0x281"] * 300_000))  # 1.8 MB
            _refused(fd, b"clear\n", offset=5)
            _refused(fd, b"format=seed".ljust(4097))
            s = stats(mnt)
            assert (s["profile"], s["log"], s["format"]) == ("linux-7.1", "media", "full")
            assert s["ring_cleared"] == "0"
            assert os.write(fd, b"format=seed".ljust(4096)) == 4096  # the limit itself applies
            assert stats(mnt)["format"] == "seed"
            _refused(fd, b"format=full\n")  # a second write on the handle is at offset 4096
            assert stats(mnt)["format"] == "seed"
        finally:
            os.close(fd)
        p = subprocess.run(f"head -c 5000000 /dev/zero > {ctl}", shell=True, capture_output=True)
        assert p.returncode != 0 and b"Invalid argument" in p.stderr
        assert stats(mnt)["ring_cleared"] == "0"


# -- 10: st_size per process ---------------------------------------------------------------------


def test_st_size_is_per_process_and_never_below_what_a_handle_has_read(tmp_path: Path) -> None:
    with mounted(tmp_path, "workload=idle") as mnt:
        path = mnt / BUF
        old = os.open(path, os.O_RDONLY)
        try:
            seen = read_all(old)
            assert seen
            (mnt / "control").write_bytes(b"clear\n")
            new = os.open(path, os.O_RDONLY)  # a newer handle with a smaller stream
            try:
                fresh = read_all(new)
                assert 0 < len(fresh) < len(seen)
                assert os.fstat(old).st_size >= len(seen)
                assert os.lseek(old, 0, os.SEEK_END) >= len(seen)
                sizes: list[int] = []
                other = threading.Thread(target=lambda: sizes.append(os.stat(path).st_size))
                other.start()
                other.join()
                assert sizes[0] >= len(seen)  # another thread of this process
                # Another process has no handle open: it sees what an open would.
                p = subprocess.run(["stat", "-c", "%s", str(path)], capture_output=True)
                assert int(p.stdout) == len(fresh)
            finally:
                os.close(new)
        finally:
            os.close(old)


def test_a_second_thread_of_a_tailer_never_sees_a_size_below_what_was_read(
    tmp_path: Path,
) -> None:
    plan = '[[fault]]\nopcode = "read"\nlba = [0, 0]\nstatus = 0x4281\n'
    # A small ring: what the reader has read soon exceeds what an open now would see.
    opts = "sim_size=1M,passes=0,interval=0.05,log=errors,retries=0,capacity=16"
    with mounted(tmp_path, opts, plan) as mnt:
        path = mnt / BUF
        wait_for(lambda: int(stats(mnt)["ring_appended"]) > 16, 10, "a full ring")
        fd = os.open(path, os.O_RDONLY)
        stop = threading.Event()
        done = {"read": 0}
        low: list[tuple[int, int]] = []

        def stat_loop() -> None:
            while not stop.is_set():
                before = done["read"]
                size = os.stat(path).st_size
                if size < before:
                    low.append((size, before))

        t = threading.Thread(target=stat_loop)
        t.start()
        try:
            end = time.monotonic() + 2
            while time.monotonic() < end:
                done["read"] += len(os.read(fd, 1000))
        finally:
            stop.set()
            t.join()
            os.close(fd)
        assert done["read"] > path.stat().st_size and not low


# -- 11: clear leaves a trace; a lazily unmounted filesystem stops ------------------------------


def test_clear_appends_a_notice_that_wakes_and_reaches_a_follower(tmp_path: Path) -> None:
    with mounted(tmp_path, "workload=idle") as mnt:
        fd = os.open(mnt / BUF, os.O_RDONLY)
        try:
            read_all(fd)
            p = select.poll()
            p.register(fd, select.POLLIN)
            assert p.poll(300) == []
            (mnt / "control").write_bytes(b"clear\n")
            assert p.poll(2000)
            line = os.read(fd, 1 << 16)
            assert re.fullmatch(rb"\[\d+\] nvmefs notice: cleared 1 entry\n", line), line
        finally:
            os.close(fd)
        jl = [json.loads(x) for x in (mnt / f"{BUF}.jsonl").read_text().splitlines()]
        assert [(r["kind"], r["message"]) for r in jl] == [("notice", "cleared 1 entry")]


def test_a_lazily_unmounted_filesystem_stops_when_its_last_handle_closes(tmp_path: Path) -> None:
    mnt = tmp_path / "lazy"
    with fs_only(mnt) as proc:
        follower = subprocess.Popen(
            ["tail", "-f", str(mnt / BUF)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        # A process whose working directory is in the mount keeps it alive without any open
        # handle: only our own check can end the daemon then, not the kernel dropping it.
        holder = subprocess.Popen(["sleep", "60"], cwd=mnt)
        try:
            wait_for(lambda: os.path.exists(f"/proc/{follower.pid}/fd/3"), 5, "tail to open")
            subprocess.run(["umount", "-l", str(mnt)], check=True)
            assert not is_mounted(mnt)
            time.sleep(1)
            assert proc.poll() is None  # the follower still reads: keep serving it
            follower.terminate()
            follower.wait(5)
            proc.wait(10)  # the last handle closed: the filesystem stops
            assert proc.stdout is not None and "stopped" in proc.stdout.read()
        finally:
            for p in (follower, holder):
                p.kill()
                p.wait()


def test_a_lazily_unmounted_daemon_exits_when_its_last_handle_closes(tmp_path: Path) -> None:
    with mounted(tmp_path, "workload=randread,faults=demo") as mnt:
        pid = int(stats(mnt)["pid"])
        follower = subprocess.Popen(
            ["tail", "-f", str(mnt / BUF)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        holder = subprocess.Popen(["sleep", "60"], cwd=mnt)
        try:
            wait_for(lambda: os.path.exists(f"/proc/{follower.pid}/fd/3"), 5, "tail to open")
            subprocess.run(["umount", "-l", str(mnt)], check=True)
            time.sleep(1)
            assert not gone(pid)
            follower.terminate()
            follower.wait(5)
            wait_for(lambda: gone(pid), 5, "the daemon to exit")
        finally:
            for p in (follower, holder):
                p.kill()
                p.wait()


# -- 12: a fixed namespace, access() by the modes ------------------------------------------------


def test_creating_removing_renaming_and_linking_fail_with_eperm(tmp_path: Path) -> None:
    with mounted(tmp_path, "workload=idle") as mnt:
        buf = str(mnt / BUF)
        for cmd in (
            ["rm", "-f", buf],
            ["mv", buf, str(mnt / "moved")],
            ["mkdir", str(mnt / "dir")],
            ["ln", "-s", BUF, str(mnt / "symlink")],
            ["ln", buf, str(mnt / "hardlink")],
            ["mkfifo", str(mnt / "fifo")],
            ["mknod", str(mnt / "node"), "p"],
            ["touch", str(mnt / "new")],
        ):
            p = subprocess.run(cmd, capture_output=True, timeout=30)
            assert p.returncode != 0 and b"Operation not permitted" in p.stderr, (cmd, p.stderr)
        calls: list[Callable[[], object]] = [
            lambda: os.unlink(buf),
            lambda: os.rename(buf, mnt / "moved"),
            lambda: os.mkdir(mnt / "dir"),
            lambda: os.symlink(BUF, mnt / "symlink"),
            lambda: os.link(buf, mnt / "hardlink"),
            lambda: os.mknod(mnt / "fifo", stat.S_IFIFO | 0o600),
            lambda: open(mnt / "new", "x").close(),
        ]
        for call in calls:
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno == errno.EPERM
        assert sorted(os.listdir(mnt)) == sorted(
            [BUF, f"{BUF}.jsonl", "stats", "nvmefs.prom", "control", "nvme_errors.svg"]
        )


def _shell_checks(path: Path, flag: str) -> list[int]:
    """Exit statuses of `test FLAG path` as coreutils, dash and bash run it."""
    return [
        subprocess.run(cmd, capture_output=True).returncode
        for cmd in (
            ["test", flag, str(path)],
            ["sh", "-c", f'test {flag} "$0"', str(path)],
            ["bash", "-c", f'[ {flag} "$0" ]', str(path)],
        )
    ]


def test_access_follows_the_modes_even_for_root(public_dir: Path) -> None:
    """Without default_permissions the kernel asks the filesystem; root gets no override."""
    mnt = public_dir / "modes"
    with fs_only(mnt, "allow_other"):
        for name in (BUF, f"{BUF}.jsonl", "stats", "nvmefs.prom"):
            path = mnt / name
            assert not os.access(path, os.W_OK) and os.access(path, os.R_OK)
            assert _shell_checks(path, "-w") == [1, 1, 1]
            assert _shell_checks(path, "-r") == [0, 0, 0]
            with pytest.raises(PermissionError):
                os.open(path, os.O_WRONLY)
        ctl = mnt / "control"
        assert os.access(ctl, os.W_OK) and not os.access(ctl, os.R_OK)
        assert _shell_checks(ctl, "-w") == [0, 0, 0]
        script = 'test -r "$0" && ! test -w "$1" && ! echo clear > "$1"'
        as_nobody = subprocess.run(
            [*NOBODY, "sh", "-c", script, str(mnt / BUF), str(ctl)],
            capture_output=True,
        )
        assert as_nobody.returncode == 0, as_nobody.stderr
        assert os.access(mnt, os.R_OK | os.X_OK) and not os.access(mnt, os.W_OK)


def test_access_w_ok_is_false_for_root_on_the_daemon_mount(tmp_path: Path) -> None:
    with mounted(tmp_path, "workload=idle") as mnt:
        assert not os.access(mnt / BUF, os.W_OK)
