"""A local user against the files the root daemon writes (issue 18, items 1-4 and 8).

Each test plays an unprivileged user (tests/hostile.py: a real account, commands through
setpriv) against a real mount, under the kernel's fs.protected_* settings both as a stock host
has them and all off: nvmefs must hold without them. A victim file of root's outside the
journal's directory must never change (content, size, inode and mtime compared).

A directory other users can write in (a sticky /tmp included) is refused for every output: there
a user takes any name that is free for a moment, and hard links bring in other files of root's.
What is left at the outputs' names in a directory only root writes (by an administrator, a
package, a script: planted here by root) is never followed, adopted or written through either.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import hostile
from tests.hostile import HostileUser
from tests.mounts import (
    daemon_pids,
    is_mounted,
    mounted,
    run_nvmefs,
    stats,
    unmount,
    wait_for,
)

pytestmark = pytest.mark.fuse

STORM = '[[fault]]\nopcode = "read"\nlba = [0, 1000000]\nstatus = 0x281\n'
# As fast as the engine goes: the journal's brake holds it to what the journal writes.
# fold=0: every failed read an entry of its own (a storm that folded would not turn the
# ring over).
STORM_OPTS = "log=all,workload=randread,bs=4K,qd=32,retries=0,fold=0"
SECRET = b"root's secret\n"


@pytest.fixture
def victim(tmp_path: Path) -> Iterator[Path]:
    path, before = hostile.victim(tmp_path, SECRET)
    yield path
    assert hostile.unchanged(path, before, SECRET), "the victim file was written"


def consecutive(seqs: list[int]) -> bool:
    return seqs == list(range(seqs[0], seqs[0] + len(seqs))) if seqs else True


def journal_seqs(d: Path, name: str, keep: int) -> list[int]:
    out: list[int] = []
    for k in range(keep, -1, -1):
        f = d / (f"{name}.{k}" if k else name)
        if f.exists() and not f.is_symlink():
            out += [json.loads(line)["seq"] for line in f.read_bytes().split(b"\n")[:-1]]
    return out


@contextlib.contextmanager
def storm(tmp_path: Path, journal: Path, extra: str = "") -> Iterator[Path]:
    with mounted(tmp_path, f"{STORM_OPTS},journal={journal},journal_keep=3{extra}", STORM) as mnt:
        yield mnt


def rotations(mnt: Path) -> int:
    return int(stats(mnt)["journal_rotations"])


def test_links_at_every_name_foreseen_never_redirect_a_write(
    tmp_path: Path, protected: str, victim: Path
) -> None:
    with hostile.public_dir(0o755) as d:
        # The names earlier versions used for a rotation's new file, and the rotated names.
        for name in (".hj.jsonl.new", "hj.jsonl.1", "hj.jsonl.2", "hj.jsonl.3", "hj.jsonl.4"):
            os.symlink(victim, d / name)
        with storm(tmp_path, d / "hj.jsonl", ",journal_size=64K") as mnt:
            wait_for(lambda: rotations(mnt) >= 6, 60, "six rotations")
            s = stats(mnt)
            assert s["journal_state"] == "writing" and s["journal_lost"] == "0", s
            unmount(mnt)  # the chain is looked at once no rotation renames along it
        # The chain holds journals only: each link in it was replaced by a rotation.
        for k in (1, 2, 3):
            st = (d / f"hj.jsonl.{k}").lstat()
            assert stat.S_ISREG(st.st_mode) and st.st_uid == 0
        assert (d / "hj.jsonl.4").is_symlink()  # past journal_keep: never touched
        assert consecutive(journal_seqs(d, "hj.jsonl", 3))


PLANTS = {
    "symlink": "is a symbolic link",
    "user-file": "owned by uid",
    "hardlink": "hard links",
    "fifo": "not a regular file",
    "dir-symlink": "is a symbolic link owned by uid",
    "user-dir": "owned by uid",
    "world-writable-dir": "writable by every user",
    "sticky-dir": "writable by every user",
}
# Where the file is found, not what is at its name: the prom file is only ever replaced by a
# rename, a syslog socket only connected to.
DIR_PLANTS = ("dir-symlink", "user-dir", "world-writable-dir", "sticky-dir")


@pytest.mark.parametrize(
    ("option", "plant"),
    [("journal", p) for p in PLANTS] + [(o, p) for o in ("prom", "syslog") for p in DIR_PLANTS],
)
def test_a_path_a_user_could_turn_is_refused_before_mounting(
    tmp_path: Path,
    hostile_user: HostileUser,
    protected: str,
    victim: Path,
    plant: str,
    option: str,
) -> None:
    message = PLANTS[plant]
    name = {"journal": "hj.jsonl", "prom": "h.prom", "syslog": "log.sock"}[option]
    owner = hostile_user.uid if plant == "user-dir" else 0
    mode = {"world-writable-dir": 0o777, "sticky-dir": 0o1777, "dir-symlink": 0o1777}.get(
        plant, 0o755
    )
    with hostile.public_dir(mode, owner) as d:
        path = d / name
        if plant == "symlink":  # left by someone root trusted: never followed all the same
            os.symlink(victim, path)
        elif plant == "user-file":
            path.write_bytes(b"")
            os.chown(path, hostile_user.uid, hostile_user.gid)
            path.chmod(0o666)
        elif plant == "hardlink":
            os.link(victim, path)
        elif plant == "fifo":
            os.mkfifo(path)
        elif plant == "dir-symlink":
            hostile_user.run("ln", "-s", str(victim.parent), str(d / "link"))
            path = d / "link" / name
        if option == "syslog" and plant != "dir-symlink":  # the user's own socket there
            bind = f"socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).bind({str(path)!r})"
            hostile_user.run("/usr/bin/python3", "-c", f"import socket; {bind}")
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        started = time.monotonic()
        p = run_nvmefs("sim", str(mnt), "-o", f"workload=idle,{option}={path}", timeout=30)
        assert time.monotonic() - started < 20  # a FIFO never blocks the start
        assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
        assert message in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert not is_mounted(mnt) and not daemon_pids(mnt)
        if plant == "hardlink":
            os.unlink(path)


def test_after_a_move_a_link_at_path_is_replaced_never_written(
    tmp_path: Path, protected: str, victim: Path
) -> None:
    with hostile.public_dir(0o755) as d:
        path = d / "hj.jsonl"
        with storm(tmp_path, path, ",journal_size=64M") as mnt:
            wait_for(lambda: path.stat().st_size > 10_000, 30, "journal lines")
            for i in range(3):
                # What logrotate does, and a user quick enough to take the name at once.
                os.rename(path, d / f"moved.{i}")
                with contextlib.suppress(FileExistsError):  # unless the journal was quicker
                    os.symlink(victim, path)
                wait_for(
                    lambda: not path.is_symlink() and path.exists() and path.stat().st_size > 0,
                    10,
                    "a new journal at PATH",
                )
            st = path.lstat()
            assert stat.S_ISREG(st.st_mode) and st.st_uid == 0 and st.st_nlink == 1
            s = stats(mnt)
            assert s["journal_state"] == "writing" and s["journal_lost"] == "0", s


def test_a_directory_at_a_foreseeable_name_stops_nothing(tmp_path: Path, protected: str) -> None:
    with hostile.public_dir(0o755) as d:
        path = d / "hj.jsonl"
        for name in (".hj.jsonl.new", "hj.jsonl.1", ".hj.jsonl.0.new"):
            (d / name).mkdir()
        with storm(tmp_path, path, ",journal_size=64K") as mnt:
            wait_for(lambda: rotations(mnt) >= 4, 60, "four rotations")
            s = stats(mnt)
            assert s["journal_state"] == "writing" and s["journal_lost"] == "0", s
            assert int(s["journal_squatted"]) >= 1  # hj.jsonl.1 could not be had: said so
        assert (d / "hj.jsonl.1").is_dir()  # not the journal's: left alone
        # The history is the live file alone now (each rotation had to drop the one before):
        # the next start replays its complete lines and goes on after them.
        kept = [json.loads(ln)["seq"] for ln in path.read_bytes().split(b"\n")[:-1]]
        with mounted(tmp_path, f"workload=idle,journal={path}", name="again") as mnt:
            recs = [json.loads(ln) for ln in (mnt / "nvme_circular_buffer.jsonl").open()]
        replayed = [r["seq"] for r in recs if r.get("replayed")]
        assert replayed == kept
        assert consecutive([*replayed, recs[len(replayed)]["seq"]])


def test_a_fifo_and_a_huge_line_in_rotated_files_cost_nothing_at_start(
    tmp_path: Path, protected: str
) -> None:
    from nvmefs.nvme.status import Translator
    from nvmefs.store.events import NvmeEvent
    from nvmefs.store.render import Renderer

    r = Renderer()
    status = Translator().decode(0x281)

    def line(seq: int) -> bytes:
        ev = NvmeEvent(status, "sim0", 1, 1, 7, 0x02, False, seq, 8, 0)
        return r.json_line((seq, 1, 2, ev)).encode()

    with hostile.public_dir(0o755) as d:
        path = d / "hj.jsonl"
        path.write_bytes(line(6) + line(7))
        path.chmod(0o640)
        # PATH.1: root's, with a 256 MiB line (sparse) between its entries.
        with open(d / "hj.jsonl.1", "wb") as f:
            f.write(line(1) + line(2) + line(3))
            f.seek(256 << 20, os.SEEK_CUR)
            f.write(b"x\n" + line(4) + line(5))
        (d / "hj.jsonl.1").chmod(0o640)
        os.mkfifo(d / "hj.jsonl.2")
        started = time.monotonic()
        with mounted(tmp_path, f"workload=idle,journal={path}") as mnt:
            took = time.monotonic() - started
            (pid,) = daemon_pids(mnt)
            hwm = int(
                next(
                    ln.split()[1]
                    for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if ln.startswith("VmHWM:")
                )
            )
            recs = [json.loads(ln) for ln in (mnt / "nvme_circular_buffer.jsonl").open()]
        assert took < 20, took
        assert hwm < 200 << 10, f"{hwm} kB at the peak"  # the line was never held
        assert [x["seq"] for x in recs if x.get("replayed")] == [1, 2, 3, 4, 5, 6, 7]
        notice = recs[7]["message"]
        assert "1 unreadable lines skipped" in notice and "hj.jsonl.2" in notice, notice


def test_a_journal_that_cannot_rotate_stops_at_twice_its_size_and_says_so(
    tmp_path: Path, protected: str
) -> None:
    with hostile.public_dir(0o755) as d:
        path = d / "hj.jsonl"
        with storm(tmp_path, path, ",journal_size=64K") as mnt:
            wait_for(lambda: path.exists() and path.stat().st_size > 1000, 30, "journal lines")
            os.rename(path, d / "moved")  # logrotate...
            path.mkdir()  # ...and something in the way of every new file at PATH
            wait_for(lambda: stats(mnt)["journal_state"] == "stalled", 60, "the journal to stall")
            s = stats(mnt)
            assert int(s["journal_lost"]) > 0 and "cannot rotate" in s["journal_problem"], s
            assert (d / "moved").stat().st_size <= 2 * (64 << 10)  # bounded: no unbounded growth
            path.rmdir()  # out of the way: it writes again, to a new PATH
            last: list[dict[str, str]] = [{}]

            def writing() -> bool:
                last[0] = stats(mnt)
                return last[0]["journal_state"] == "writing"

            try:
                wait_for(writing, 30, "writing again")
            except AssertionError:
                raise AssertionError(f"not writing again: {last[0]}") from None
            wait_for(lambda: path.is_file(), 10, "a new journal at PATH")
