"""Mounting checked before anything starts (issue 12, items 5, 8 and 9): exclusive mounts, dead
mounts, FUSE options, numbers, ASCII digits, ro, options a command does not use, fsname and the
ring's capacity. Real mounts, real clients."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvmefs import options
from nvmefs.mountpoint import LOCK_DIR
from tests import hostile
from tests.hostile import HostileUser
from tests.mounts import (
    BUF,
    NVMEFS,
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

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
FUSE_CONF = Path("/etc/fuse.conf")


def refused(p: subprocess.CompletedProcess[str], needle: str, mnt: Path | None = None) -> str:
    """Assert `p` was refused with one line containing `needle` (and nothing was mounted on
    `mnt`, which is cleaned up if something was); returns that line."""
    if mnt is not None and p.returncode == 0:
        cleanup(mnt)  # a regression must not leave a mount behind
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert p.stdout == "" and len(p.stderr.splitlines()) == 1, p.stderr
    assert needle in p.stderr and "Traceback" not in p.stderr, p.stderr
    return p.stderr.strip()


def mount_lines(mnt: Path) -> list[str]:
    return [ln for ln in mountinfo() if ln.split()[4] == str(mnt)]


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory a non-root user can reach (pytest's own tmp root is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="nvmefs-checks-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    for sub in path.iterdir():
        cleanup(sub)
    shutil.rmtree(path, ignore_errors=True)


# -- 5: mounting is exclusive ------------------------------------------------------------------

# Imports first, then waits for a line on stdin: the two racers reach the checks together.
RACER = (
    "import sys; from nvmefs import cli, daemon; print('ready', flush=True); sys.stdin.readline(); "
    "sys.exit(cli.main(sys.argv[1:]))"
)


def test_two_mounts_started_together_give_one_mount_and_one_daemon(tmp_path: Path) -> None:
    mnt = tmp_path / "race"
    mnt.mkdir()
    try:
        for _ in range(8):
            racers = [
                subprocess.Popen(
                    [sys.executable, "-c", RACER, "sim", str(mnt), "-o", "workload=idle"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for _ in range(2)
            ]
            for p in racers:
                assert p.stdout is not None and p.stdout.readline() == "ready\n"
            for p in racers:
                assert p.stdin is not None
                p.stdin.write("go\n")
                p.stdin.close()
            results = []
            for p in racers:
                assert p.stdout is not None and p.stderr is not None
                p.wait(timeout=60)
                results.append((p.returncode, p.stdout.read(), p.stderr.read()))
            codes = sorted(code for code, _, _ in results)
            assert codes == [0, 2], results
            (loser,) = [err for code, _, err in results if code == 2]
            assert len(loser.splitlines()) == 1, loser
            assert re.search("being mounted or served by another nvmefs|already an nvmefs", loser)
            assert len(mount_lines(mnt)) == 1 and len(daemon_pids(mnt)) == 1
            cleanup(mnt)
            wait_for(lambda: not daemon_pids(mnt), 10, "the daemon to go")
    finally:
        cleanup(mnt)


def _lock_fd(pid: int) -> tuple[int, str]:
    """The daemon's descriptor on its mountpoint's lock file (root's, in LOCK_DIR), and its path."""
    (found,) = [
        (int(fd), target)
        for fd in os.listdir(f"/proc/{pid}/fd")
        if (target := os.readlink(f"/proc/{pid}/fd/{fd}")).startswith(LOCK_DIR + "/mount-")
    ]
    return found


def test_the_daemon_holds_the_lock_for_its_life_and_no_program_inherits_it(tmp_path: Path) -> None:
    # auto_unmount: libfuse runs fusermount3 beside the daemon, a program that must not get it.
    with mounted(tmp_path, "workload=idle,auto_unmount") as mnt:
        pid = int(stats(mnt)["pid"])  # the forked daemon: the process that took the lock is gone
        fd, lock = _lock_fd(pid)
        assert stat.S_IMODE(os.stat(LOCK_DIR).st_mode) == 0o700  # root's alone
        info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        flags = int(re.search(r"flags:\s+([0-7]+)", info).group(1), 8)  # type: ignore[union-attr]
        assert flags & os.O_CLOEXEC  # programs the daemon runs do not get it
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        assert children  # fusermount3
        for child in children:
            fds = os.listdir(f"/proc/{child}/fd")
            assert all(os.readlink(f"/proc/{child}/fd/{n}") != lock for n in fds)
        assert re.search(r"lock:.*FLOCK\s+ADVISORY\s+WRITE", info), info
        # The lock file, opened anew: its lock is taken.
        other = os.open(lock, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)
        subprocess.run(["umount", str(mnt)], check=True, timeout=30)
        wait_for(lambda: gone(pid), 10, "the daemon to exit")
        # Released with the daemon: the next mount gets it.
        p = run_nvmefs("sim", str(mnt), "-o", "workload=idle")
        assert p.returncode == 0, p.stderr
        assert len(mount_lines(mnt)) == 1


# -- 8a: dead mounts ---------------------------------------------------------------------------


def _kill_daemon(mnt: Path) -> None:
    (pid,) = daemon_pids(mnt)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: gone(pid), 10, "the daemon to die")


def test_a_dead_mount_is_dead_even_while_its_root_attributes_are_cached(tmp_path: Path) -> None:
    mnt = tmp_path / "dead"
    mnt.mkdir()
    try:
        assert run_nvmefs("sim", str(mnt), "-o", "workload=idle").returncode == 0
        assert BUF in os.listdir(mnt)
        os.stat(mnt)  # after the listing (which made the atime stale): cached for 300 s
        _kill_daemon(mnt)
        assert os.stat(mnt).st_ino == 1  # the cache answers: this is the case to get right
        line = refused(run_nvmefs("sim", str(mnt)), "dead FUSE mount")
        assert "already" not in line and f"run 'umount {mnt}' first" in line
        assert not daemon_pids(mnt) and len(mount_lines(mnt)) == 1
    finally:
        cleanup(mnt)


def test_under_a_dead_mount_the_advice_names_the_dead_mount(tmp_path: Path) -> None:
    mnt = tmp_path / "dead"
    mnt.mkdir()
    try:
        assert run_nvmefs("sim", str(mnt), "-o", "workload=idle").returncode == 0
        _kill_daemon(mnt)
        advice = f"run 'umount {mnt}' first"
        for path in ("dead", "./dead/", "dead/sub", f"{mnt}/sub/deeper"):
            p = subprocess.run(
                [*NVMEFS, "sim", path], capture_output=True, text=True, timeout=60, cwd=tmp_path
            )
            line = refused(p, "dead FUSE mount")
            assert advice in line, line  # the mount as mountinfo has it, not `path`
    finally:
        cleanup(mnt)


# -- 8b, 8c: FUSE options ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "why"),
    [
        ("uid=0", "high-level API"),
        ("gid=0", "high-level API"),
        ("umask=022", "high-level API"),
        ("max_read=65536", "max_read"),
        ("allow_other=1", "takes no value: write allow_other"),
        ("default_permissions=yes", "takes no value"),
        ("subtype=other", "subtype is always nvmefs"),
    ],
)
def test_fuse_options_libfuse_would_reject_are_refused_with_the_reason(
    tmp_path: Path, option: str, why: str
) -> None:
    mnt = tmp_path / "m"
    mnt.mkdir()
    line = refused(run_nvmefs("sim", str(mnt), "-o", f"workload=idle,{option}"), why, mnt)
    assert "fuse_session_new" not in line
    assert not is_mounted(mnt) and not daemon_pids(mnt)


def test_allow_other_lets_another_user_read(public_dir: Path) -> None:
    with mounted(public_dir, "workload=idle,allow_other") as mnt:
        p = subprocess.run([*NOBODY, "cat", str(mnt / BUF)], capture_output=True, timeout=30)
        assert p.returncode == 0 and b"nvmefs start:" in p.stdout, p.stderr


@contextlib.contextmanager
def fuse_conf(user_allow_other: bool) -> Iterator[None]:
    """/etc/fuse.conf with or without its user_allow_other line, restored byte for byte after."""
    saved = FUSE_CONF.read_bytes() if FUSE_CONF.exists() else None
    kept = [
        line
        for line in (saved or b"").decode().splitlines()
        if line.split("#", 1)[0].strip() != "user_allow_other"
    ]
    try:
        FUSE_CONF.write_text("\n".join([*kept, *(["user_allow_other"] * user_allow_other), ""]))
        yield
    finally:
        if saved is None:
            FUSE_CONF.unlink(missing_ok=True)
        else:
            FUSE_CONF.write_bytes(saved)


def test_non_root_allow_other_needs_user_allow_other_and_says_so(public_dir: Path) -> None:
    mnt = public_dir / "user-mnt"
    mnt.mkdir()
    os.chown(mnt, 65534, 65534)
    saved = FUSE_CONF.read_bytes() if FUSE_CONF.exists() else None

    def as_nobody() -> subprocess.CompletedProcess[str]:
        cmd = [*NOBODY, *NVMEFS, "sim", str(mnt), "-o", "workload=idle,allow_other"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd="/")

    with fuse_conf(user_allow_other=False):
        line = refused(as_nobody(), "user_allow_other' in /etc/fuse.conf", mnt)
    assert "fuse_session_mount" not in line
    assert not is_mounted(mnt) and not daemon_pids(mnt)
    try:
        with fuse_conf(user_allow_other=True):
            p = as_nobody()
        assert p.returncode == 0, p.stderr
        assert is_mounted(mnt) and "nvmefs start:" in (mnt / BUF).read_text()  # root reads too
    finally:
        cleanup(mnt)
    assert (FUSE_CONF.read_bytes() if FUSE_CONF.exists() else None) == saved


# -- 8d, 9: numbers --------------------------------------------------------------------------

BIG = "9" * 4400


@pytest.mark.parametrize("option", ["qd", "seed", "sim_size", "interval", "capacity"])
def test_a_4400_digit_number_is_out_of_range_not_not_a_number(tmp_path: Path, option: str) -> None:
    mnt = tmp_path / "m"
    mnt.mkdir()
    p = run_nvmefs("sim", str(mnt), "-o", f"workload=idle,{option}={BIG}")
    line = refused(p, f"option {option}=", mnt)
    assert "not a number" not in line and "sys.set_int_max_str_digits" not in line
    assert "out of range" in line or "at most" in line, line
    assert len(line) < 300  # the number is not echoed whole
    assert not is_mounted(mnt) and not daemon_pids(mnt)


@pytest.mark.parametrize(
    "option",
    [
        "qd=\uff13\uff12",  # fullwidth 32
        "qd=\u0663\u0662",  # Arabic-Indic 32
        "capacity=\uff11\uff10",
        "interval=\u0661",
        "sim_size=\uff16\uff14M",
        "log=0x\uff12\uff18\uff11",
        "seed=\u06f7",  # extended Arabic-Indic 7
    ],
)
def test_only_ascii_digits_are_numbers(tmp_path: Path, option: str) -> None:
    mnt = tmp_path / "m"
    mnt.mkdir()
    refused(run_nvmefs("sim", str(mnt), "-o", f"workload=idle,{option}"), "only ASCII", mnt)
    refused(run_nvmefs("scrub", "sim", "-o", option), "only ASCII")
    assert not is_mounted(mnt) and not daemon_pids(mnt)


# -- 9: ro, fsname, options a command does not use, capacity -----------------------------------


def test_ro_mounts_read_only_and_rw_after_it_undoes_it(tmp_path: Path) -> None:
    with mounted(tmp_path, "workload=idle,ro") as mnt:
        (line,) = mount_lines(mnt)
        assert line.split()[5].split(",")[0] == "ro", line
        assert "nvmefs start:" in (mnt / BUF).read_text()
        with pytest.raises(OSError) as err:
            (mnt / "control").write_text("clear\n")
        assert err.value.errno == errno.EROFS
        assert stats(mnt)["ring_cleared"] == "0"
    with mounted(tmp_path, "workload=idle,ro,rw", name="rw") as mnt:
        assert mount_lines(mnt)[0].split()[5].split(",")[0] == "rw"
        (mnt / "control").write_text("clear\n")
        assert stats(mnt)["ring_cleared"] == "1"


def test_fsname_is_the_users_every_time_and_sim_otherwise(tmp_path: Path) -> None:
    for i in range(6):  # the order of a set of strings changes from one process to the next
        with mounted(tmp_path, "workload=idle,fsname=first,fsname=mine", name=f"m{i}") as mnt:
            (line,) = mount_lines(mnt)
            assert line.split(" - ")[1].split()[:2] == ["fuse.nvmefs", "mine"], line
    with mounted(tmp_path, "workload=idle", name="plain") as mnt:
        assert mount_lines(mnt)[0].split(" - ")[1].split()[:2] == ["fuse.nvmefs", "sim"]


def test_options_a_command_does_not_use_are_refused() -> None:
    for item in ("kmsg", "workload=randread", "health_interval=5"):
        with pytest.raises(options.OptionError, match="does not apply"):
            options.parse([item], allow_fuse=False, refuse=options.SCRUB_REFUSES)
    with pytest.raises(options.OptionError, match="does not apply"):
        options.parse(["kmsg"], allow_fuse=False, refuse=options.WATCH_REFUSES)
    assert options.parse(["qd=4"], allow_fuse=False, refuse=options.SCRUB_REFUSES)["qd"] == 4
    for item in ("journal=/tmp/j", "syslog", "prom=/tmp", "metrics_listen=:9464"):
        for refuse in (options.SCRUB_REFUSES, options.WATCH_REFUSES):
            with pytest.raises(options.OptionError, match="does not apply"):
                options.parse([item], allow_fuse=False, refuse=refuse)


@pytest.mark.parametrize(
    ("item", "key", "value"),
    [
        ("prom=/var/lib/node-exporter", "prom", "/var/lib/node-exporter/nvmefs.prom"),
        ("prom=/srv/x/", "prom", "/srv/x/nvmefs.prom"),
        ("prom=/srv/mine.prom", "prom", "/srv/mine.prom"),
        ("metrics_listen=127.0.0.1:9464", "metrics_listen", ("127.0.0.1", 9464)),
        ("metrics_listen=:9464", "metrics_listen", ("", 9464)),
        ("metrics_listen=[::1]:80", "metrics_listen", ("::1", 80)),
        ("syslog", "syslog", "/dev/log"),
        ("syslog=/run/s.sock", "syslog", "/run/s.sock"),
        ("journal=/tmp/j,journal_size=1M", "journal_size", 1 << 20),
    ],
)
def test_fleet_options_parse(item: str, key: str, value: object) -> None:
    assert options.parse([item], allow_fuse=False)[key] == value


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("metrics_listen=9464", "is not ADDR:PORT"),
        ("metrics_listen=::1:80", "in brackets"),
        ("metrics_listen=:0", "out of range"),
        ("metrics_listen=:65536", "out of range"),
        ("journal_size=4K", "smallest journal size"),
        ("journal_keep=0", "out of range"),
        ("prom_interval=0", "below"),
    ],
)
def test_bad_fleet_options_are_refused(item: str, message: str) -> None:
    with pytest.raises(options.OptionError, match=message):
        options.parse([item], allow_fuse=False)


@pytest.mark.parametrize("option", ["kmsg", "workload=randread", "health_interval=5"])
def test_scrub_refuses_what_it_would_ignore(option: str) -> None:
    refused(run_nvmefs("scrub", "sim", "-o", f"sim_size=1M,{option}"), "does not apply")


def test_watch_refuses_kmsg() -> None:
    refused(run_nvmefs("watch", "sim", "-o", "kmsg", timeout=20), "does not apply")


def test_capacity_is_bounded_by_memory(tmp_path: Path) -> None:
    limit = options.max_capacity()  # about 5 M entries with 24 GiB
    mnt = tmp_path / "m"
    mnt.mkdir()
    # The 100 M (unless this machine has more than 500 GB), and one more than the limit.
    too_many = {limit + 1, max(limit + 1, 100_000_000)}
    # workload=idle: were it mounted, the daemon would not fill its ring with a scrub.
    for cmd in (["sim", str(mnt), "-o", "workload=idle"], ["scrub", "sim"]):
        for capacity in too_many:
            p = run_nvmefs(*cmd, "-o", f"capacity={capacity}")
            assert "GiB of memory" in refused(p, f"at most {limit} entries", mnt)
    assert not is_mounted(mnt) and not daemon_pids(mnt)
    with mounted(tmp_path, f"workload=idle,capacity={limit}", name="big") as big:
        assert stats(big)["ring_capacity"] == str(limit)


@pytest.mark.fuse
def test_a_users_lock_on_the_mountpoint_keeps_nothing_from_mounting(
    tmp_path: Path, hostile_user: HostileUser, protected: str
) -> None:
    # A lock on the directory itself, which any user who can read it could take, once kept
    # nvmefs from mounting (at boot, at a restart): the lock is a file of root's now.
    with hostile.public_dir(0o755) as d:
        mnt = d / "m"
        mnt.mkdir()
        mnt.chmod(0o755)  # readable by every user, as mountpoints are
        holder = hostile_user.popen("flock", "-x", str(mnt), "sleep", "60")
        try:
            wait_for(lambda: "FLOCK" in Path("/proc/locks").read_text(), 10, "the user's lock")
            p = run_nvmefs("sim", str(mnt), "-o", "workload=idle")
            assert p.returncode == 0 and is_mounted(mnt), p.stderr
        finally:
            holder.kill()
            holder.wait()
            cleanup(mnt)
