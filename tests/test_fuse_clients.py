"""Real clients on a real mount: GNU coreutils, less, Python readers, poll."""

from __future__ import annotations

import json
import os
import pty
import random
import re
import select
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.mounts import ALL_READS_FAIL, BUF, LINE, mounted, stats, wait_for, wait_static

pytestmark = pytest.mark.fuse

STATIC = "sim_size=64M,passes=1,log=errors,retries=0,capacity=4096,fold=0"
# One failing chunk in a 1 MiB namespace scrubbed every 0.3 s: a steady trickle of entries.
TRICKLE = "sim_size=1M,passes=0,interval=0.3,log=errors,retries=0,clock=realtime,capacity=4096"
FIRST_LBA_FAILS = '[[fault]]\nopcode = "read"\nlba = [0, 0]\nstatus = 0x4281\n'
# randread with every read failing: entries as fast as the engine can go.
# fold=0: every failed read an entry of its own (a storm that folded would not turn the
# ring over).
FLOOD = "workload=randread,bs=512,qd=32,log=errors,retries=0,fold=0"


def sh(*cmd: str, **kw: object) -> bytes:
    return subprocess.run(cmd, check=True, capture_output=True, timeout=60, **kw).stdout  # type: ignore[call-overload, no-any-return]


def test_cat_dd_head_wc_cp_agree_on_a_static_ring(tmp_path: Path) -> None:
    with mounted(tmp_path, STATIC, ALL_READS_FAIL) as mnt:
        wait_static(mnt)
        path = str(mnt / BUF)
        text = sh("cat", path)
        lines = text.splitlines(keepends=True)
        assert len(lines) == 1 + 512  # the start entry, then one entry per 128 KiB chunk
        assert all(LINE.match(line) for line in lines)
        assert b"nvmefs start:" in lines[0]
        slbas = [int(re.search(rb"slba=(\d+)", ln).group(1)) for ln in lines[1:]]  # type: ignore[union-attr]
        assert slbas == list(range(0, 131072, 256))  # oldest first, in scrub order
        assert sh("dd", f"if={path}", "bs=1", "status=none") == text
        assert sh("dd", f"if={path}", "bs=7", "status=none") == text
        assert sh("head", "-n", "5", path) == b"".join(lines[:5])
        assert sh("head", "-c", "1000", path) == text[:1000]
        assert sh("tail", "-n", "3", path) == b"".join(lines[-3:])
        assert sh("wc", "-c", path).split()[0] == str(len(text)).encode()
        assert sh("wc", "-l", path).split()[0] == str(len(lines)).encode()
        assert sh("stat", "-c", "%s", path).strip() == str(len(text)).encode()
        sh("cp", path, str(tmp_path / "copy"))
        assert (tmp_path / "copy").read_bytes() == text
        jl = [json.loads(x) for x in sh("cat", str(mnt / f"{BUF}.jsonl")).splitlines()]
        assert [r["seq"] for r in jl] == list(range(1, 514))
        assert jl[1]["status"] == "0x4281" and jl[1]["dnr"] and jl[1]["slba"] == 0
        assert len(sh("ls", str(mnt)).split()) == 6  # five files and nvme_errors.svg


def _collect(proc: subprocess.Popen[bytes], out: list[tuple[float, bytes]]) -> None:
    assert proc.stdout is not None
    for line in iter(proc.stdout.readline, b""):
        out.append((time.time(), line))


@pytest.mark.parametrize("flag", ["-f", "-F"])
def test_tail_follows_new_entries_within_2s_without_repeats(tmp_path: Path, flag: str) -> None:
    with mounted(tmp_path, TRICKLE, FIRST_LBA_FAILS) as mnt:
        path = str(mnt / BUF)
        wait_for(lambda: len((mnt / BUF).read_bytes().splitlines()) > 12, 10, "some entries")
        tail = subprocess.Popen(
            ["tail", flag, path], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        got: list[tuple[float, bytes]] = []
        reader = threading.Thread(target=_collect, args=(tail, got), daemon=True)
        reader.start()
        time.sleep(5)
        tail.terminate()
        _, err = tail.communicate(timeout=10)
        reader.join(5)
        assert b"truncated" not in err, err
        whole = (mnt / BUF).read_bytes().splitlines(keepends=True)
        lines = [line for _, line in got]
        assert len(lines) > 10 + 8, "tail saw too few new entries"
        # What tail printed is one contiguous run of the file: no repeats, no gaps.
        start = whole.index(lines[0])
        assert whole[start : start + len(lines)] == lines
        for arrived, line in got[10:]:
            stamp = line[1 : line.index(b"]")].decode()
            made = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
            assert arrived - made < 2.0, (arrived - made, line)


def test_less_follow_mode_shows_new_entries(tmp_path: Path) -> None:
    with mounted(tmp_path, TRICKLE, FIRST_LBA_FAILS) as mnt:
        wait_for(lambda: (mnt / BUF).stat().st_size > 0, 10, "entries")
        pid, fd = pty.fork()
        if pid == 0:
            os.environ.update(TERM="xterm", LESSSECURE="1", LINES="50", COLUMNS="400")
            os.execvp("less", ["less", "+F", str(mnt / BUF)])
        screen = b""
        try:
            end = time.monotonic() + 8
            seen_at_start: set[bytes] = set()
            while time.monotonic() < end:
                r, _, _ = select.select([fd], [], [], 0.2)
                if r:
                    try:
                        screen += os.read(fd, 65536)
                    except OSError:
                        break
                if not seen_at_start and time.monotonic() > end - 6:
                    seen_at_start = set(re.findall(rb"\[(\d{4}-[^\]]+)\]", screen))
            stamps = set(re.findall(rb"\[(\d{4}-[^\]]+)\]", screen))
            assert seen_at_start and stamps - seen_at_start, "less +F showed nothing new"
        finally:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            os.close(fd)


def test_random_pread_on_one_handle_matches_that_handles_stream(tmp_path: Path) -> None:
    with mounted(tmp_path, TRICKLE, FIRST_LBA_FAILS) as mnt:
        wait_for(lambda: (mnt / BUF).stat().st_size > 2000, 10, "entries")
        rng = random.Random(4)
        fd = os.open(mnt / BUF, os.O_RDONLY)
        try:
            early = [
                (off, os.pread(fd, size, off))
                for off, size in ((rng.randrange(4000), rng.randrange(1, 700)) for _ in range(50))
            ]
            time.sleep(1)  # more entries arrive; the stream only grows
            stream = b""
            while chunk := os.pread(fd, 1 << 20, len(stream)):
                stream += chunk
            for off, data in early:
                assert stream[off : off + len(data)] == data
            for _ in range(300):
                off = rng.randrange(len(stream) + 100)
                size = rng.choice([1, 2, 17, 4096, 1 << 20, rng.randrange(1, 9000)])
                data = os.pread(fd, size, off)
                assert data[: max(0, len(stream) - off)] == stream[off : off + size]
            assert b"\0" not in stream and all(
                LINE.match(x) for x in stream.splitlines(keepends=True)
            )
        finally:
            os.close(fd)


def _json_reader(path: Path, seconds: float, chunk: int, out: list[object]) -> None:
    """Read the JSON view for a while; check it is one gap-free stream or fail loudly."""
    rng = random.Random(chunk)
    buf = b""
    with open(path, "rb", buffering=0) as f:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            data = f.read(rng.randrange(1, chunk))
            if not data:
                time.sleep(0.001)
            buf += data
    lines = buf.split(b"\n")
    tail = lines.pop()  # an incomplete last line is fine: the reader stopped mid-line
    expect = None
    missed_lines = 0
    for line in lines:
        assert b"\0" not in line
        rec = json.loads(line)
        if rec["kind"] == "missed":
            # First too, when the flood overwrote entries between the open and the first read
            # (a handle holds nothing before it is read).
            if expect is not None:
                expect += rec["missed"]
            missed_lines += 1
            continue
        if expect is not None:
            assert rec["seq"] == expect, (rec["seq"], expect)
        expect = rec["seq"] + 1
    out.append((len(lines), missed_lines, tail))


def test_eight_concurrent_readers_while_appending_fast(tmp_path: Path) -> None:
    with mounted(tmp_path, FLOOD, ALL_READS_FAIL) as mnt:
        wait_for(lambda: int(stats(mnt)["ring_appended"]) > 2000, 20, "a flood of entries")
        results: list[object] = []
        threads = [
            threading.Thread(
                target=_json_reader, args=(mnt / f"{BUF}.jsonl", 3.0, 1 + 4000 * (i + 1), results)
            )
            for i in range(8)
        ]
        text_lines: list[int] = []

        def text_reader() -> None:
            data = b""
            with open(mnt / BUF, "rb", buffering=0) as f:
                end = time.monotonic() + 3
                while time.monotonic() < end:
                    data += f.read(random.randrange(1, 5000))
            whole = data[: data.rfind(b"\n") + 1]
            lines = whole.splitlines(keepends=True)
            assert all(LINE.match(x) for x in lines)
            text_lines.append(len(lines))

        texts = [threading.Thread(target=text_reader) for _ in range(2)]
        for t in threads + texts:
            t.start()
        for t in threads + texts:
            t.join(30)
        assert len(results) == 8 and len(text_lines) == 2
        appended = int(stats(mnt)["ring_appended"])
        assert appended > 5000, "entries were not appended at a high rate"
        assert all(n > 100 for n, _, _ in results)  # type: ignore[misc]


def test_reader_overtaken_by_wrap_around_gets_a_missed_line(tmp_path: Path) -> None:
    with mounted(tmp_path, FLOOD + ",capacity=16", ALL_READS_FAIL) as mnt:
        wait_for(lambda: int(stats(mnt)["ring_appended"]) > 100, 20, "entries")
        with open(mnt / BUF, "rb", buffering=0) as f:
            first = f.read(200)
            time.sleep(0.5)  # hundreds of entries overwrite what this reader had not reached
            rest = b""
            while len(rest) < 20000:
                rest += f.read(4096)
        text = first + rest
        lines = text[: text.rfind(b"\n") + 1].splitlines(keepends=True)
        missed = [ln for ln in lines if b"entries missed" in ln or b"entry missed" in ln]
        assert missed, "no missed-entries line"
        assert all(LINE.match(ln) for ln in lines) and b"\0" not in text
        n = int(re.search(rb"nvmefs: (\d+) entr", missed[0]).group(1))  # type: ignore[union-attr]
        assert n >= 1
        assert lines.index(missed[0]) < len(lines) - 1  # and the stream goes on after it


@pytest.mark.parametrize("api", ["poll", "select", "epoll"])
def test_poll_wakes_when_a_new_entry_arrives(tmp_path: Path, api: str) -> None:
    with mounted(tmp_path, TRICKLE.replace("interval=0.3", "interval=1"), FIRST_LBA_FAILS) as mnt:
        wait_for(lambda: (mnt / BUF).stat().st_size > 0, 10, "entries")
        fd = os.open(mnt / BUF, os.O_RDONLY)
        try:
            while os.read(fd, 65536):
                pass
            t0 = time.monotonic()
            if api == "poll":
                p = select.poll()
                p.register(fd, select.POLLIN)
                ready = bool(p.poll(5000))
            elif api == "select":
                ready = bool(select.select([fd], [], [], 5)[0])
            else:
                ep = select.epoll()
                ep.register(fd, select.EPOLLIN)
                ready = bool(ep.poll(5))
                ep.close()
            waited = time.monotonic() - t0
            assert ready and waited < 2.5
            assert LINE.match(os.read(fd, 65536).splitlines(keepends=True)[0])
        finally:
            os.close(fd)


def test_poll_blocks_while_nothing_new_arrives(tmp_path: Path) -> None:
    with mounted(tmp_path, "workload=idle") as mnt:
        fd = os.open(mnt / BUF, os.O_RDONLY)
        try:
            while os.read(fd, 65536):
                pass
            p = select.poll()
            p.register(fd, select.POLLIN)
            assert p.poll(500) == []
        finally:
            os.close(fd)
