"""Mount lifecycle: signals, umount, bad mountpoints, fstab, permissions, control, EIO guard."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
import trio

from tests.mounts import (
    BUF,
    cleanup,
    daemon_pids,
    gone,
    is_mounted,
    mounted,
    mountinfo,
    run_nvmefs,
    stats,
    wait_for,
)

pytestmark = pytest.mark.fuse


def test_first_entry_records_the_start_and_defaults_are_set(tmp_path: Path) -> None:
    with mounted(tmp_path, "workload=idle,capacity=77") as mnt:
        first = (mnt / BUF).read_text().splitlines()[0]
        assert "nvmefs start:" in first and "source=sim" in first
        assert "capacity=77" in first and "log=media" in first
        line = next(ln for ln in mountinfo() if f" {mnt} " in ln)
        assert " - fuse.nvmefs sim " in line
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in mnt.iterdir()}
        assert modes == {
            BUF: "0o444",
            f"{BUF}.jsonl": "0o444",
            "stats": "0o444",
            "nvmefs.prom": "0o444",
            "control": "0o200",
            "nvme_errors.svg": "0o444",
        }
        assert all(p.stat().st_uid == 0 and p.stat().st_gid == 0 for p in mnt.iterdir())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_end_the_daemon_with_the_mount_gone(tmp_path: Path, sig: int) -> None:
    with mounted(tmp_path, "workload=idle") as mnt:
        pid = int(stats(mnt)["pid"])
        os.kill(pid, sig)
        wait_for(lambda: not is_mounted(mnt), 10, "the mount to go")
        wait_for(lambda: gone(pid), 10, "the daemon to exit")


def test_umount_ends_the_daemon(tmp_path: Path) -> None:
    with mounted(tmp_path, "faults=demo") as mnt:
        pid = int(stats(mnt)["pid"])
        subprocess.run(["umount", str(mnt)], check=True, timeout=30)
        wait_for(lambda: gone(pid), 10, "the daemon to exit")
        assert not is_mounted(mnt)


def _refused(args: list[str], needle: str) -> None:
    p = run_nvmefs(*args)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert p.stdout == "" and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert needle in p.stderr, p.stderr


def test_bad_mountpoints_are_refused_with_nothing_left_behind(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    _refused(["sim", str(missing)], "does not exist")
    full = tmp_path / "full"
    full.mkdir()
    (full / "file").write_text("x")
    _refused(["sim", str(full)], "not empty")
    afile = tmp_path / "afile"
    afile.write_text("")
    _refused(["sim", str(afile)], "not a directory")
    for path in (missing, full, afile):
        assert not is_mounted(path) and not daemon_pids(path)


def test_bad_options_and_sources_are_refused_before_mounting(tmp_path: Path) -> None:
    mnt = tmp_path / "m"
    mnt.mkdir()
    _refused(["sim", str(mnt), "-o", "capacity=0"], "capacity=0")
    _refused(["sim", str(mnt), "-o", "colour=blue"], "unknown option 'colour'")
    _refused(["sim", str(mnt), "-o", "faults=/no/plan.toml"], "/no/plan.toml")
    _refused(["tape0", str(mnt)], "tape0")
    _refused(["/dev/null", str(mnt)], "/dev/null: not an NVMe device")
    _refused(["/dev/nvme97n1", str(mnt)], "/dev/nvme97n1: no such device")
    _refused(["/etc/hostname", str(mnt)], "/etc/hostname: not a device node")
    _refused(["sim", str(mnt), "-o", "transport=ioctl"], "device sources only")
    _refused(["sim"], "MOUNTPOINT")
    assert not is_mounted(mnt) and not daemon_pids(mnt)


def test_an_existing_nvmefs_mount_is_not_mounted_over(tmp_path: Path) -> None:
    with mounted(tmp_path, "workload=idle") as mnt:
        pid = int(stats(mnt)["pid"])
        _refused(["sim", str(mnt)], "already an nvmefs mount")
        assert int(stats(mnt)["pid"]) == pid  # the first one still serves
        assert daemon_pids(mnt) == [pid]


def test_a_dead_mount_gets_a_clear_message(tmp_path: Path) -> None:
    mnt = tmp_path / "dead"
    mnt.mkdir()
    try:
        assert run_nvmefs("sim", str(mnt), "-o", "workload=idle").returncode == 0
        pid = daemon_pids(mnt)[0]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: gone(pid), 10, "the daemon to die")
        with pytest.raises(OSError) as err:
            os.stat(mnt)
        assert err.value.errno == errno.ENOTCONN
        _refused(["sim", str(mnt)], "Transport endpoint is not connected")
        assert not daemon_pids(mnt)
    finally:
        cleanup(mnt)


def test_writes_to_read_only_files_fail_and_control_rejects_junk(tmp_path: Path) -> None:
    with mounted(tmp_path, "workload=idle") as mnt:
        for name in (BUF, f"{BUF}.jsonl", "stats", "nvmefs.prom"):
            with pytest.raises(PermissionError):
                os.open(mnt / name, os.O_WRONLY)
            with pytest.raises(PermissionError):
                os.open(mnt / name, os.O_RDWR)
        with pytest.raises(PermissionError):
            os.open(mnt / "control", os.O_RDONLY)
        with pytest.raises(OSError):
            os.unlink(mnt / BUF)
        before = (mnt / BUF).read_text()
        for junk in (b"reboot\n", b"log=sometimes\n", b"clear log=nope\n", b"\xff\n"):
            fd = os.open(mnt / "control", os.O_WRONLY)
            with pytest.raises(OSError) as err:
                os.write(fd, junk)
            os.close(fd)
            assert err.value.errno == errno.EINVAL
        assert (mnt / BUF).read_text() == before  # "clear log=nope" cleared nothing
        (mnt / "control").write_text("log=all\nformat=seed\n")
        assert stats(mnt)["log"] == "all" and stats(mnt)["format"] == "seed"
        subprocess.run(f"echo clear > {mnt / 'control'}", shell=True, check=True)
        # The start entry went; what is left says so.
        assert re.fullmatch(r"\[\d+\] nvmefs notice: cleared 1 entry\n", (mnt / BUF).read_text())
        assert stats(mnt)["ring_cleared"] == "1"


def test_kmsg_mirrors_entries_to_the_kernel_log(tmp_path: Path) -> None:
    with mounted(tmp_path, f"workload=idle,kmsg,capacity=33,log={'0x281'}") as mnt:
        assert (mnt / BUF).read_text()
        wait_for(
            lambda: b"capacity=33" in subprocess.run(["dmesg"], capture_output=True).stdout,
            5,
            "the start entry in dmesg",
        )
        out = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
        assert any("nvmefs: nvmefs start:" in ln for ln in out.splitlines())


FSTAB_OPTS = "allow_other,faults=demo,log=errors,interval=1"


@pytest.fixture
def public_dir() -> object:
    """A directory a non-root user can reach (pytest's own tmp root is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="nvmefs-test-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    for sub in path.iterdir():
        cleanup(sub)
    shutil.rmtree(path, ignore_errors=True)


def test_fstab_mount_mount_a_twice_umount_and_a_non_root_reader(public_dir: Path) -> None:
    tmp_path = public_dir
    mnt = tmp_path / "fstab-mnt"
    mnt.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# test fstab\nsim {mnt} fuse.nvmefs {FSTAB_OPTS} 0 0\n")
    try:
        p = subprocess.run(
            ["mount", "-T", str(fstab), str(mnt)], capture_output=True, text=True, timeout=60
        )
        assert p.returncode == 0, p.stderr
        assert is_mounted(mnt)
        wait_for(lambda: "Specific NVMe error" in (mnt / BUF).read_text(), 20, "demo errors")
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        p = subprocess.run([*as_nobody, "cat", str(mnt / BUF)], capture_output=True, timeout=30)
        assert p.returncode == 0 and b"Specific NVMe error" in p.stdout, p.stderr
        p = subprocess.run(
            [*as_nobody, "sh", "-c", f"echo clear > {mnt}/control"], capture_output=True, timeout=30
        )
        assert p.returncode != 0  # 0200 root: a reader cannot clear the ring
        subprocess.run(["umount", str(mnt)], check=True, timeout=30)
        wait_for(lambda: not daemon_pids(mnt), 10, "the daemon to exit")

        for _ in range(2):  # mount -a twice: mounted once
            p = subprocess.run(
                ["mount", "-a", "-T", str(fstab)], capture_output=True, text=True, timeout=60
            )
            assert p.returncode == 0, p.stderr
        mounts = [ln for ln in mountinfo() if f" {mnt} " in ln]
        assert len(mounts) == 1 and len(daemon_pids(mnt)) == 1
        subprocess.run(["umount", str(mnt)], check=True, timeout=30)
        wait_for(lambda: not daemon_pids(mnt), 10, "the daemon to exit")
        assert not is_mounted(mnt)
    finally:
        cleanup(mnt)


def test_without_allow_other_non_root_readers_are_refused(public_dir: Path) -> None:
    with mounted(public_dir, "workload=idle") as mnt:
        assert (
            subprocess.run(
                [
                    "setpriv",
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                    "ls",
                    str(public_dir),
                ],
                capture_output=True,
            ).returncode
            == 0
        )
        p = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", str(mnt / BUF)],
            capture_output=True,
            timeout=30,
        )
        assert p.returncode != 0 and b"Permission denied" in p.stderr


async def test_a_handler_bug_answers_eio_and_the_mount_stays_up(tmp_path: Path) -> None:
    """In-process mount: break one view, check EIO, check the rest still serves."""
    import pyfuse3

    from nvmefs.fs import NvmeFS
    from nvmefs.recorder import Recorder
    from nvmefs.store.events import HostEvent
    from nvmefs.store.render import Clock, Renderer
    from nvmefs.store.ring import DebugRing

    ring = DebugRing(8)
    ring.append(HostEvent("notice", "hello"))
    recorder = Recorder(ring, Renderer(Clock("jiffies", 1000)))

    def broken() -> object:
        raise ZeroDivisionError("a bug")

    recorder.stats_stream = broken  # type: ignore[method-assign]
    mnt = tmp_path / "inproc"
    mnt.mkdir()
    pyfuse3.init(NvmeFS(recorder), str(mnt), {"fsname=test", "subtype=nvmefs"})
    try:
        async with trio.open_nursery() as n:
            n.start_soon(pyfuse3.main)

            def client() -> tuple[int, str, str]:
                try:
                    (mnt / "stats").read_text()
                    code = 0
                except OSError as e:
                    code = e.errno or 0
                return code, (mnt / BUF).read_text(), (mnt / BUF).read_text()

            code, text, again = await trio.to_thread.run_sync(client)
            assert code == errno.EIO
            assert "hello" in text
            assert re.search(r"host-error: filesystem \w+ failed: ZeroDivisionError", again)
            pyfuse3.terminate()
    finally:
        pyfuse3.close(unmount=True)
    assert not is_mounted(mnt)
