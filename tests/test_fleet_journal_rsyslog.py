"""`-o journal=PATH` shipped by Debian's rsyslog (issue 13): imfile in inotify mode, as
contrib/rsyslog/nvmefs-journal.conf sets it up, ships every journal line exactly once, while
the journal rotates, and across an rsyslog stop during which it rotates.

rsyslog runs the snippet with only its path changed, so the recipe users install is the one
tested; real mounts, as a user runs them. Every line of every journal file (PATH, PATH.1, ...)
must arrive once, byte for byte, and nothing else."""

from __future__ import annotations

import collections
import contextlib
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounts import daemon_pids, mounted, stats, wait_for

pytestmark = pytest.mark.fuse

RSYSLOGD = "/usr/sbin/rsyslogd"
SNIPPET = Path(__file__).resolve().parents[1] / "contrib" / "rsyslog" / "nvmefs-journal.conf"
SNIPPET_JOURNAL = "/var/lib/nvmefs/journal.jsonl"

# Every read fails with a media error, once (no retries): one entry per read. Random 4 KiB
# reads at 0.8 MB/s, one at a time: about 200 entries a second, each a JSON line of about
# 750 bytes, so a 128 KiB journal file rotates about once a second. journal_keep (100, the
# most it takes) holds all that a test writes: the files are the whole record to compare with.
FAILS = '[[fault]]\nopcode = "read"\nlba = [0, 1000000]\nstatus = 0x281\n'
WORKLOAD = "log=all,workload=randread,bs=4K,qd=1,retries=0,rate=0.8"
ROTATION = "journal_size=128K,journal_keep=100"
# What the snippet's input gives each message: "TAG|FACILITY|SEVERITY|line".
FIELDS = "%syslogtag%|%syslogfacility-text%|%syslogseverity-text%|%msg%\\n"


class Rsyslog:
    """A private rsyslogd running the snippet on `journal`; the messages it ships go to
    `output`, one per line, in FIELDS."""

    def __init__(self, root: Path, journal: Path) -> None:
        self.root = root
        self.output = root / "shipped"
        self.log = root / "rsyslogd.log"
        self.work = root / "work"
        self.work.mkdir()
        text = SNIPPET.read_text()
        assert text.count(SNIPPET_JOURNAL) == 1
        snippet = root / "nvmefs-journal.conf"
        snippet.write_text(text.replace(SNIPPET_JOURNAL, str(journal)))
        # What Debian's /etc/rsyslog.conf gives the snippet: a work directory, and a default
        # ruleset (the snippet's calls it), here writing the shipped messages to a file and
        # rsyslog's own messages to another. No imuxsock, no imklog: no /dev/log here.
        self.conf = root / "rsyslog.conf"
        self.conf.write_text(
            f'global(workDirectory="{self.work}")\n'
            f'include(file="{snippet}")\n'
            f'template(name="fields" type="string" string="{FIELDS}")\n'
            'if $programname == "nvmefs" then {\n'
            f'    action(type="omfile" file="{self.output}" template="fields")\n'
            "    stop\n"
            "}\n"
            f'action(type="omfile" file="{self.log}")\n'
        )
        check = subprocess.run(
            [RSYSLOGD, "-N1", "-f", str(self.conf)], capture_output=True, text=True, timeout=30
        )
        assert check.returncode == 0 and "error" not in check.stderr.lower(), check.stderr
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        pidfile = self.root / "rsyslogd.pid"
        with (self.root / "rsyslogd.out").open("ab") as out:
            self.proc = subprocess.Popen(
                [RSYSLOGD, "-n", "-f", str(self.conf), "-i", str(pidfile)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for(pidfile.exists, 10, "rsyslogd to start")

    def stop(self) -> None:
        """SIGTERM, as a service manager stops it; then it has written what it holds and saved
        its offsets."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def shipped(self) -> list[bytes]:
        if not self.output.exists():
            return []
        return self.output.read_bytes().splitlines()

    def messages(self) -> str:
        """What rsyslogd said about itself, for failure reports."""
        files = (self.log, self.root / "rsyslogd.out")
        return "".join(p.read_text(errors="replace") for p in files if p.exists())[-3000:]


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    """The journal's path, in a directory of its own (the snippet follows PATH and PATH.N)."""
    d = tmp_path / "journal"
    d.mkdir()
    return d / "nvmefs.jsonl"


@pytest.fixture
def rsyslog(tmp_path: Path, journal: Path) -> Iterator[Rsyslog]:
    root = tmp_path / "rsyslog"
    root.mkdir()
    r = Rsyslog(root, journal)
    try:
        yield r
    finally:
        r.stop()


def journal_files(journal: Path) -> list[Path]:
    """PATH and its rotations, oldest first."""
    rotated = [p for p in journal.parent.iterdir() if p.name.startswith(f"{journal.name}.")]
    numbered = sorted((int(p.name.rsplit(".", 1)[1]), p) for p in rotated if p.suffix[1:].isdigit())
    return [p for _, p in reversed(numbered)] + [journal]


def inode(journal: Path) -> int:
    """The live file's inode (a rotation renames PATH away an instant before the next file
    takes the name)."""
    end = time.monotonic() + 5
    while True:
        try:
            return journal.stat().st_ino
        except FileNotFoundError:
            if time.monotonic() > end:
                raise
        time.sleep(0.001)


def rotations(journal: Path) -> int:
    return len(journal_files(journal)) - 1


def journal_lines(journal: Path) -> list[bytes]:
    return [line for f in journal_files(journal) for line in f.read_bytes().splitlines()]


def unmount(mnt: Path) -> None:
    """A clean unmount: the daemon writes its last entries to the journal and exits."""
    subprocess.run(["umount", str(mnt)], check=True, timeout=30)
    wait_for(lambda: not daemon_pids(mnt), 15, "the daemon to exit")


def shipped_when_caught_up(rs: Rsyslog, lines: list[bytes]) -> list[bytes]:
    """rsyslog's output once it has shipped as many lines as the journal holds, and stopped
    (so that it holds nothing back)."""
    with contextlib.suppress(AssertionError):  # if not, the comparison says what is missing
        wait_for(lambda: len(rs.shipped()) >= len(lines), 10, "rsyslog to catch up")
    rs.stop()
    return rs.shipped()


def assert_exactly_once(lines: list[bytes], shipped: list[bytes], rs: Rsyslog) -> None:
    seqs = [json.loads(line)["seq"] for line in lines]
    # The journal itself: every entry of the run, each once (numbers from the first, 1, on).
    assert seqs == list(range(1, len(seqs) + 1))
    messages = []
    for got in shipped:
        tag, facility, severity, msg = got.split(b"|", 3)
        assert (tag, facility, severity) == (b"nvmefs:", b"daemon", b"notice"), got[:200]
        messages.append(msg)
    want, have = collections.Counter(lines), collections.Counter(messages)
    twice = sorted(
        json.loads(m)["seq"] for m, n in (have - want).items() for _ in range(n) if m in want
    )
    lost = sorted(json.loads(m)["seq"] for m in want - have)
    foreign = [m[:200] for m in have if m not in want]
    report = (
        f"{len(lines)} journal lines, {len(messages)} shipped: {len(twice)} twice {twice[:20]}, "
        f"{len(lost)} lost {lost[:20]}, {len(foreign)} not in the journal {foreign[:3]}\n"
        f"rsyslogd:\n{rs.messages()}"
    )
    assert have == want, report


def test_every_journal_line_shipped_once_while_the_journal_rotates(
    tmp_path: Path, journal: Path, rsyslog: Rsyslog
) -> None:
    with mounted(tmp_path, f"{WORKLOAD},journal={journal},{ROTATION}", FAILS) as mnt:
        # rsyslog starts on a journal nvmefs has begun, before its first rotation.
        wait_for(lambda: journal.stat().st_size > 1000, 10, "the first journal lines")
        assert rotations(journal) == 0
        rsyslog.start()
        wait_for(lambda: rotations(journal) >= 8, 20, "8 rotations")
        unmount(mnt)
    lines = journal_lines(journal)
    shipped = shipped_when_caught_up(rsyslog, lines)
    assert rotations(journal) >= 8 and len(lines) > 700
    assert_exactly_once(lines, shipped, rsyslog)


def test_every_journal_line_shipped_once_across_an_rsyslog_stop_with_rotations(
    tmp_path: Path, journal: Path, rsyslog: Rsyslog
) -> None:
    rsyslog.start()  # there first: it finds the journal when nvmefs creates it
    with mounted(tmp_path, f"{WORKLOAD},journal={journal},{ROTATION}", FAILS) as mnt:
        wait_for(lambda: rotations(journal) >= 2, 20, "2 rotations")
        wait_for(lambda: len(rsyslog.shipped()) > 0, 10, "rsyslog to ship")
        rsyslog.stop()
        # Stopped mid-file: while it is down, the file it was reading is renamed again and
        # again, and whole files are written and rotated that it has never seen.
        live, before, stopped = inode(journal), rotations(journal), time.monotonic()
        wait_for(lambda: rotations(journal) >= before + 3, 20, "rotations while rsyslog is down")
        time.sleep(max(0.0, 2 - (time.monotonic() - stopped)))
        down = int(stats(mnt)["ring_appended"]) - len(rsyslog.shipped())
        assert inode(journal) != live
        rsyslog.start()  # the same work directory: its saved offsets
        again = rotations(journal)
        wait_for(lambda: rotations(journal) >= again + 2, 20, "rotations after the restart")
        unmount(mnt)
    lines = journal_lines(journal)
    shipped = shipped_when_caught_up(rsyslog, lines)
    assert down > 150  # entries written while rsyslog was down (two files or more)
    assert_exactly_once(lines, shipped, rsyslog)
