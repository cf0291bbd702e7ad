"""The journal: every entry once, in order, in size-bounded files, and replayed at start."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import trio

from nvmefs import options
from nvmefs.linux.safefiles import SafeDir
from nvmefs.nvme.status import Translator
from nvmefs.outputs.journal import Journal, JournalError
from nvmefs.outputs.replay import History, read_newest, rotated, tail_lines
from nvmefs.recorder import Recorder
from nvmefs.store import events
from nvmefs.store.events import HostEvent, NvmeEvent
from nvmefs.store.render import Renderer
from nvmefs.store.ring import EVENT, SEQ, DebugRing
from tests.helpers import sim_engine

ST = Translator()
PLAN = '[[fault]]\nopcode = "read"\nlba = [0, 1000000]\nstatus = 0x4281\n'


def opts(path: Path, extra: str = "") -> options.Parsed:
    return options.parse([f"journal={path}", *([extra] if extra else [])], allow_fuse=False)


def nvme(slba: int) -> NvmeEvent:
    return NvmeEvent(ST.decode(0x281), "sim0", 1, 1, 7, 0x02, False, slba, 8, 5)


def journal_seqs(path: Path, keep: int) -> list[int]:
    """Every seq in the journal's files, oldest file first (a line cut short by a kill, at
    the end of a file with no newline, is no entry)."""
    out: list[int] = []
    for k in range(keep, -1, -1):
        f = Path(rotated(str(path), k))
        if f.exists():
            lines = f.read_bytes().split(b"\n")[:-1]
            out += [json.loads(line)["seq"] for line in lines]
    return out


def attached(path: Path, capacity: int = 64, extra: str = "") -> tuple[Journal, DebugRing]:
    j = Journal.open(opts(path, f"capacity={capacity}" + (f",{extra}" if extra else "")))
    assert j is not None
    ring = DebugRing(capacity)
    j.attach(ring)
    return j, ring


def tail(path: Path, n: int) -> list[bytes]:
    """tail_lines of a file, asserting that no line was too long."""
    fd = os.open(path, os.O_RDONLY)
    try:
        lines, skipped = tail_lines(fd, n)
    finally:
        os.close(fd)
    assert skipped == 0
    return lines


def newest(path: Path, keep: int = 4, capacity: int = 100) -> History:
    with contextlib.closing(SafeDir.open(str(path.parent))) as where:
        return read_newest(where, path.name, keep, capacity, "linux-7.1")


def test_tail_lines_gives_complete_lines_only(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"a\nbb\nccc\ncut")
    assert tail(f, 2) == [b"bb", b"ccc"]
    assert tail(f, 10) == [b"a", b"bb", b"ccc"]
    f.write_bytes(b"")
    assert tail(f, 3) == []
    f.write_bytes(b"no newline at all")
    assert tail(f, 3) == []


def test_tail_lines_across_read_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nvmefs.outputs import replay

    monkeypatch.setattr(replay, "READ_BLOCK", 7)
    lines = [f"line {i}".encode() * (i % 4 + 1) for i in range(50)]
    (tmp_path / "f").write_bytes(b"\n".join(lines) + b"\n")
    for n in (1, 3, 17, 50, 80):
        assert tail(tmp_path / "f", n) == lines[-n:]


def test_every_entry_is_written_once_in_order(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    j, ring = attached(path, capacity=16)
    for i in range(1000):  # far more than the ring holds: the journal never falls behind it
        ring.append(nvme(i))
    j.close()
    recs = [json.loads(line) for line in path.read_bytes().splitlines()]
    assert [r["seq"] for r in recs] == list(range(1, 1001))
    assert [r["slba"] for r in recs] == list(range(1000))
    assert recs[0]["status"] == "0x281" and recs[0]["retries"] == 5
    assert j.written == 1000 and j.lost == 0


def test_rotation_keeps_every_file_under_the_size_and_keep_files(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    j, ring = attached(path, capacity=32, extra="journal_size=64K,journal_keep=3")
    for i in range(2000):
        ring.append(nvme(i))
    j.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["j.jsonl", "j.jsonl.1", "j.jsonl.2", "j.jsonl.3"]
    assert all((tmp_path / f).stat().st_size <= 64 << 10 for f in files)
    seqs = journal_seqs(path, 3)
    assert seqs == list(range(seqs[0], 2001))  # the newest, in order, none twice
    assert seqs[0] > 1 and j.rotations >= 4


async def test_replay_continues_the_sequence_and_marks_entries(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    async with sim_engine(PLAN, log="media") as (engine, _sim, ring1):
        j1 = Journal.open(opts(path, "capacity=64"))
        assert j1 is not None
        ring1 = DebugRing(64)
        engine.ring = ring1
        j1.attach(ring1)
        ring1.append(HostEvent(events.TIMEOUT, "a timeout", {"ctrl": "sim0", "qid": 3}))
        await engine.submit_batch([engine_read(lba) for lba in range(0, 800, 8)])
        j1.close()
    before = list(ring1)
    j2, ring2 = attached(path, capacity=64)
    after = list(ring2)
    # The newest 64 entries come back with their numbers, then the replay notice follows.
    assert [e[SEQ] for e in after[:-1]] == [e[SEQ] for e in before[-63:]]
    assert after[-1][SEQ] == before[-1][SEQ] + 1
    assert "replayed 64 entries" in after[-1][EVENT].message
    r = Renderer()
    for old, new in zip(before[-63:], after[:-1], strict=True):
        assert new[EVENT].replayed and not old[EVENT].replayed
        new_rec, old_rec = r.record(new), r.record(old)
        assert new_rec.pop("replayed") is True
        assert new_rec == old_rec
        assert r.line(new) == r.line(old).replace("\n", " (replayed)\n")
    assert ring2.appended == ring2.retained + ring2.dropped + ring2.cleared
    ring2.append(nvme(1))
    j2.close()
    seqs = journal_seqs(path, 4)
    assert seqs == list(range(1, seqs[-1] + 1))  # a restart neither skips nor repeats a number


def engine_read(lba: int) -> object:
    from nvmefs.nvme import commands

    return commands.read(1, lba, 8, 512)


def test_host_events_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    j, ring = attached(path)
    ring.append(HostEvent(events.LOST, "lost 3 events", {"cpu": 1, "lost": 3}))
    j.close()
    j2, ring2 = attached(path)
    ev = list(ring2)[-2][EVENT]
    assert isinstance(ev, HostEvent) and ev.replayed
    assert (ev.kind, ev.message, ev.fields) == (events.LOST, "lost 3 events", {"cpu": 1, "lost": 3})
    j2.close()


def test_a_line_cut_short_stays_and_the_next_entries_go_to_a_new_file(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    j, ring = attached(path)
    for i in range(5):
        ring.append(nvme(i))
    j.close()
    whole = path.read_bytes()
    cut = whole + whole.splitlines(keepends=True)[-1][:40]  # a 6th, cut short by a kill
    path.write_bytes(cut)
    j2, ring2 = attached(path)
    assert [e[SEQ] for e in ring2] == [1, 2, 3, 4, 5, 6]  # 6: the replay notice
    j2.close()
    # Nothing a shipper may have read changes: the cut line stays where it was.
    assert Path(f"{path}.1").read_bytes() == cut
    assert journal_seqs(path, 4) == [1, 2, 3, 4, 5, 6]
    j3, ring3 = attached(path)  # and a third start replays across both files
    assert [e[SEQ] for e in ring3] == [1, 2, 3, 4, 5, 6, 7]
    j3.close()


def test_replay_stops_at_a_gap_and_skips_unreadable_lines(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    r = Renderer()
    lines = [r.json_line((s, 1, 2, nvme(s))) for s in (1, 2, 5, 6)]
    path.write_text(lines[0] + lines[1] + lines[2] + "not json\n" + lines[3])
    found = newest(path)
    assert [e[SEQ] for e in found.entries] == [5, 6] and found.bad == 1


def test_a_second_daemon_cannot_write_the_same_journal(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    j = Journal.open(opts(path))
    with pytest.raises(JournalError, match="being written by another nvmefs"):
        Journal.open(opts(path))
    assert j is not None
    j.close()
    j2 = Journal.open(opts(path))
    assert j2 is not None
    j2.close()


def test_paths_that_cannot_be_a_journal_are_refused(tmp_path: Path) -> None:
    with pytest.raises(JournalError, match="does not exist"):
        Journal.open(opts(tmp_path / "no" / "j.jsonl"))
    with pytest.raises(JournalError, match="Is a directory"):
        Journal.open(opts(tmp_path))
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(JournalError, match="not a regular file"):
        Journal.open(opts(tmp_path / "fifo"))
    with pytest.raises(options.OptionError, match="smallest journal size"):
        opts(tmp_path / "j", "journal_size=4K")


async def test_the_task_writes_and_syncs_without_a_reader(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    j, ring = attached(path, capacity=1024, extra="journal_fsync=0.05")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(j.run, Recorder(ring, Renderer()))
        ring.append(nvme(1))  # below the drain threshold: the task writes it
        await trio.sleep(0.2)
        assert journal_seqs(path, 4) == [1]
        assert not j.dirty  # synced by the task
        nursery.cancel_scope.cancel()
    j.close()


@pytest.mark.fuse  # root: it mounts a tiny tmpfs to run out of space on
def test_write_errors_are_counted_and_reported_not_raised(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", str(small)], check=True
    )
    try:
        (small / "filler").write_bytes(b"x" * (192 << 10))
        j, ring = attached(small / "j.jsonl", capacity=4, extra="journal_size=1M")
        seen: dict[int, object] = {}  # by seq: a listener sees the newest entry when it is called
        ring.subscribe(lambda: seen.setdefault(ring.last_seq, list(ring)[-1][EVENT]))
        for i in range(400):  # about 300 KB of lines: most find no room
            ring.append(nvme(i))  # the engine's append never sees the error
            j.drain()  # a turn of the journal's task
        assert j.errors >= 1 and j.lost > 0
        texts = [e.message for e in seen.values() if isinstance(e, HostEvent)]
        reports = [t for t in texts if "No space left" in t]
        assert len(reports) == 1  # reported in the ring once, not once per failed write
        (small / "filler").unlink()
        ring.append(nvme(400))
        j.drain()
        j.close()
        texts = [e.message for e in seen.values() if isinstance(e, HostEvent)]
        (again,) = [t for t in texts if "writing again" in t]
        assert again == f"journal: writing again; {j.lost} entries lost in all"
        assert j.written + j.lost == 403  # the 401, the report and the notice
        lines = (small / "j.jsonl").read_bytes().splitlines(keepends=True)
        assert len(lines) == j.written and all(line.endswith(b"}\n") for line in lines)
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_a_journal_moved_away_or_its_directory_recreated_is_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nvmefs.outputs import journal

    monkeypatch.setattr(journal, "FOLLOW_S", 0.0)
    d = tmp_path / "d"
    d.mkdir()
    path = d / "j.jsonl"
    j, ring = attached(path, capacity=4, extra="journal_size=64K")
    ring.append(nvme(1))
    j.drain()
    path.rename(d / "j.jsonl.by-logrotate")  # logrotate's rename, without copytruncate
    ring.append(nvme(2))
    j.drain()
    assert [json.loads(x)["slba"] for x in path.read_text().splitlines()[-1:]] == [2]
    for p in d.iterdir():
        p.unlink()
    d.rmdir()
    d.mkdir()  # a person cleaning up
    for i in range(3, 400):  # rotations too
        ring.append(nvme(i))
        j.drain()
    j.close()
    slbas = [
        r["slba"]
        for f in sorted(d.iterdir())
        for r in map(json.loads, f.read_text().splitlines())
        if r["kind"] == "nvme"
    ]
    assert sorted(slbas)[-1] == 399 and j.lost == 0 and j.errors == 0
    assert not [f for f in d.iterdir() if f.name.endswith(".new")]


@pytest.mark.parametrize(
    "line",
    [
        '{"seq":1e400,"monotonic_ns":1,"wall_ns":1,"kind":"x","message":"m"}',
        "[" * 100_000,
        '{"seq":-1,"monotonic_ns":1,"wall_ns":1,"kind":"x","message":"m"}',
        '{"seq":true,"monotonic_ns":1,"wall_ns":1,"kind":"x","message":"m"}',
        '{"seq":3,"monotonic_ns":1,"wall_ns":100000000000000000000000,"kind":"x","message":"m"}',
        '{"seq":3,"monotonic_ns":1,"wall_ns":1,"kind":"nvme","status":"-1"}',
        '{"seq":3,"monotonic_ns":1,"wall_ns":1,"kind":"nvme","status":"0x' + "f" * 40 + '"}',
        '{"seq":3,"monotonic_ns":1,"wall_ns":1,"kind":"nvme","status":"0x281","opcode":"abc"}',
        '{"seq":3,"monotonic_ns":1,"wall_ns":1,"kind":"nvme","status":"0x281","ctrl":[1]}',
        '{"seq":3,"monotonic_ns":1,"wall_ns":1,"kind":"notice","message":"m","x":{"a":1}}',
        '{"seq":3,"monotonic_ns":1,"wall_ns":1,"kind":7,"message":"m"}',
        '{"seq":3,"monotonic_ns":1,"wall_ns":1,"kind":"notice","message":"m","x":NaN}',
        "x" * 100_000,
    ],
)
def test_a_line_that_is_not_an_entry_is_skipped_and_counted(tmp_path: Path, line: str) -> None:
    path = tmp_path / "j.jsonl"
    r = Renderer()
    path.write_text(r.json_line((1, 1, 2, nvme(1))) + r.json_line((2, 1, 2, nvme(2))) + line + "\n")
    with pytest.raises(JournalError, match="not an nvmefs journal"):
        Journal.open(opts(path))  # its last line is not an entry: not a journal of ours
    path.write_text(line + "\n" + r.json_line((1, 1, 2, nvme(1))))
    j, ring = attached(path)
    (replayed, notice) = list(ring)
    assert replayed[SEQ] == 1 and "1 unreadable lines skipped" in notice[EVENT].message
    for entry in ring:  # every renderer takes what was replayed
        r.line(entry), r.json_line(entry), Renderer(fmt="seed").line(entry)
    j.close()


def test_a_clear_is_journaled_whole_and_replay_starts_at_it(tmp_path: Path) -> None:
    from nvmefs.recorder import Recorder

    path = tmp_path / "j.jsonl"
    j, ring = attached(path, capacity=64)
    recorder = Recorder(ring, Renderer())
    for i in range(10):
        ring.append(nvme(i))  # below the drain threshold: waiting for the task
    recorder.clear()
    ring.append(nvme(100))
    j.close()
    assert journal_seqs(path, 4) == list(range(1, 13))  # nothing the clear took is missing
    j2, ring2 = attached(path, capacity=64)
    replayed = [e[EVENT] for e in ring2][:-1]
    assert [getattr(e, "slba", None) for e in replayed] == [None, 100]  # the notice, then 100
    assert "cleared 10 entries" in replayed[0].message
    j2.close()


def test_kernel_files_and_files_that_are_not_journals_are_refused(tmp_path: Path) -> None:
    for path in ("/proc/sys/kernel/hostname", "/sys/kernel/mm/x", "/dev/shm/j"):
        with pytest.raises(JournalError, match="kernel interface"):
            Journal.open(opts(Path(path)))
    other = tmp_path / "notes.txt"
    other.write_text("line one\nimportant text without a newline")
    with pytest.raises(JournalError, match="not an nvmefs journal"):
        Journal.open(opts(other))
    assert other.read_text() == "line one\nimportant text without a newline"
    cut = tmp_path / "cut.jsonl"  # a journal whose first line was cut short by a kill
    cut.write_bytes(b'{"seq":1,"ticks":')
    j, ring = attached(cut)
    ring.append(nvme(1))
    j.close()
    assert len(ring) == 1 and journal_seqs(cut, 4) == [1]  # the cut line is no entry


def test_replay_goes_on_past_a_rotated_file_a_kill_left_missing(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    r = Renderer()
    Path(f"{path}.2").write_text("".join(r.json_line((s, 1, 2, nvme(s))) for s in (1, 2)))
    path.write_text("".join(r.json_line((s, 1, 2, nvme(s))) for s in (3, 4)))
    found = newest(path)
    assert [e[SEQ] for e in found.entries] == [1, 2, 3, 4] and found.bad == 0


def test_a_journal_near_the_end_of_its_numbers_starts_a_new_run(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    r = Renderer()
    top = (1 << 63) - 1
    path.write_text("".join(r.json_line((s, 1, 2, nvme(s))) for s in (top - 2, top - 1, top)))
    j, ring = attached(path)
    (notice,) = list(ring)
    assert notice[SEQ] == 1 and "this run starts again at 1" in notice[EVENT].message
    ring.append(nvme(1))
    j.close()
    j, ring = attached(path)  # the next start replays the new run only
    assert [e[SEQ] for e in ring][:2] == [1, 2] and len(ring) == 3
    j.close()


def test_a_journal_whose_numbers_outgrew_replay_is_still_a_journal(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    line = Renderer().json_line((1 << 63, 1, 2, nvme(1)))
    path.write_text(line)
    j, ring = attached(path)  # an earlier version went past 2**63 - 1: not refused
    assert "1 unreadable lines skipped" in next(iter(ring))[EVENT].message
    j.close()


@pytest.mark.parametrize("tail", [b"\0\0\0\0\n", b"\0" * 5000, b"\n\0\0\n\n"])
def test_nul_bytes_a_crash_left_at_the_end_are_skipped_not_refused(
    tmp_path: Path, tail: bytes
) -> None:
    path = tmp_path / "j.jsonl"
    r = Renderer()
    path.write_bytes("".join(r.json_line((s, 1, 2, nvme(s))) for s in (1, 2)).encode() + tail)
    j, ring = attached(path)
    assert [e[SEQ] for e in ring][:2] == [1, 2]
    ring.append(nvme(3))
    j.close()
    # What follows the NULs starts a new file (the last line had no newline) or follows them.
    written = [
        json.loads(line)["seq"]
        for f in (path, Path(f"{path}.1"))
        if f.exists()
        for line in f.read_bytes().split(b"\n")
        if line.strip(b"\0")
    ]
    assert sorted(written) == [1, 2, 3, 4]  # 3 is the notice of the replay


def test_journal_keep_is_bounded() -> None:
    with pytest.raises(options.OptionError, match="journal_keep"):
        options.parse(["journal=/tmp/x.jsonl", "journal_keep=1000"], allow_fuse=False)


def test_a_rotated_file_of_another_user_is_not_replayed(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    r = Renderer()
    Path(f"{path}.1").write_text("".join(r.json_line((s, 1, 2, nvme(s))) for s in (1, 2)))
    os.chown(f"{path}.1", 12345, 12345)  # as if another user had put it there
    path.write_text("".join(r.json_line((s, 1, 2, nvme(s))) for s in (3, 4)))
    j, ring = attached(path)
    entries = list(ring)
    assert [e[SEQ] for e in entries][:2] == [3, 4]
    assert "not read: j.jsonl.1: " in entries[2][EVENT].message
    assert "owned by uid 12345" in entries[2][EVENT].message
    j.close()
