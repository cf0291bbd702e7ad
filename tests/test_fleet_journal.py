"""The journal of a real mount: SIGKILL during a storm loses no number and repeats none."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
from pathlib import Path

import pytest

from tests.mounts import (
    cleanup,
    daemon_pids,
    gone,
    is_mounted,
    mounted,
    run_nvmefs,
    stats,
    wait_for,
)

pytestmark = pytest.mark.fuse

STORM = '[[fault]]\nopcode = "read"\nlba = [0, 1000000]\nstatus = 0x281\n'
# fold=0: every failed read an entry of its own (a storm that folded would not turn the
# ring over).
STORM_OPTS = "log=all,workload=randread,bs=4K,qd=32,retries=0,fold=0"
KEEP = 3
SIZE = 256 << 10


def journal_records(path: Path) -> list[dict[str, object]]:
    """Every record of the journal, oldest file first."""
    out = []
    for k in range(KEEP, -1, -1):
        f = Path(f"{path}.{k}" if k else str(path))
        if f.exists():  # a line cut short by the kill, with no newline, is no entry
            out += [json.loads(line) for line in f.read_bytes().split(b"\n")[:-1]]
    return out


def test_sigkill_in_a_storm_then_mount_again_replays_and_continues(tmp_path: Path) -> None:
    jdir = tmp_path / "journal"
    jdir.mkdir()
    path = jdir / "nvmefs.jsonl"
    jopts = f"journal={path},journal_size={SIZE // 1024}K,journal_keep={KEEP}"
    with mounted(tmp_path, f"{STORM_OPTS},{jopts}", STORM) as mnt:
        wait_for(lambda: int(stats(mnt)["ring_appended"]) > 20_000, 30, "a storm")
        # Rotation holds the size bound while the storm goes on.
        for f in jdir.iterdir():
            with contextlib.suppress(FileNotFoundError):  # renamed since it was listed
                assert f.stat().st_size <= SIZE, f
        # The journal's brake holds the storm to what it writes: nothing lost on the way.
        assert stats(mnt)["journal_lost"] == "0", stats(mnt)
        (pid,) = daemon_pids(mnt)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: gone(pid), 10, "the daemon to die")
    # A kill in a rotation may leave its new file, a number missing, or (between the renames of
    # PATH to PATH.1 and of the new file to PATH) no PATH: the next start copes.
    names = {f.name for f in jdir.iterdir()}
    new_files = {n for n in names if re.fullmatch(r"\.nvmefs\.jsonl\.[0-9a-f]{16}\.new", n)}
    assert len(new_files) <= 1 and len(names) >= KEEP
    assert "nvmefs.jsonl" in names or new_files, names
    assert names - new_files <= {"nvmefs.jsonl", *(f"nvmefs.jsonl.{k}" for k in range(1, KEEP + 1))}
    assert all(f.stat().st_size <= SIZE for f in jdir.iterdir())
    before = [r["seq"] for r in journal_records(path)]
    # The files kept hold the newest entries, each number once and in order (a line cut short
    # by the kill may end the live file: the next start cuts it off).
    assert before == list(range(before[0], before[0] + len(before)))
    last = before[-1]

    with mounted(tmp_path, f"workload=idle,capacity=512,{jopts}", name="again") as mnt:
        recs = [json.loads(line) for line in (mnt / "nvme_circular_buffer.jsonl").open("rb")]
    replayed = [r for r in recs if r.get("replayed")]
    assert recs[: len(replayed)] == replayed  # the ring starts with them
    # The newest 512 were replayed; this run's first entries have pushed the oldest out.
    assert len(recs) == 512 and [r["seq"] for r in replayed] == list(
        range(last - len(replayed) + 1, last + 1)
    )
    notice = recs[len(replayed)]
    assert notice["seq"] == last + 1
    assert f"replayed 512 entries from {path} (seq {last - 511}..{last})" == notice["message"]
    assert recs[len(replayed) + 1]["kind"] == "start"
    seqs = [r["seq"] for r in recs]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert not [f for f in jdir.iterdir() if f.name.endswith(".new")]  # the start removed it
    after = [r["seq"] for r in journal_records(path)]
    assert after == list(range(after[0], after[0] + len(after)))  # no number lost or repeated
    assert after[-1] == seqs[-1]


@pytest.mark.parametrize(
    ("journal", "message"),
    [
        ("{tmp}/missing/j.jsonl", "directory {tmp}/missing does not exist"),
        ("{tmp}", "Is a directory"),
        ("{tmp}/mnt/j.jsonl", "is inside the mountpoint {tmp}/mnt, which the mount hides"),
        ("{tmp}/j.jsonl,journal_size=64K,journal=", "option journal needs a file path"),
    ],
)
def test_a_journal_that_cannot_be_written_is_refused_before_mounting(
    tmp_path: Path, journal: str, message: str
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = run_nvmefs("sim", str(mnt), "-o", f"journal={journal.format(tmp=tmp_path)}")
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and message.format(tmp=tmp_path) in p.stderr, p.stderr
    assert not is_mounted(mnt) and not daemon_pids(mnt)


@pytest.mark.parametrize("option", ["journal_size=1M", "journal_keep=2", "prom_interval=5"])
def test_options_of_an_output_not_asked_for_are_refused(tmp_path: Path, option: str) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = run_nvmefs("sim", str(mnt), "-o", option)
    assert p.returncode == 2 and "applies only with" in p.stderr and p.stderr.count("\n") == 1
    assert not is_mounted(mnt)


def test_two_mounts_cannot_share_a_journal(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    with mounted(tmp_path, f"workload=idle,journal={path}"):
        mnt2 = tmp_path / "mnt2"
        mnt2.mkdir()
        try:
            p = run_nvmefs("sim", str(mnt2), "-o", f"journal={path}")
            assert p.returncode == 2 and "being written by another nvmefs" in p.stderr
            assert not is_mounted(mnt2)
        finally:
            cleanup(mnt2)
