"""`-o syslog=SOCKET` with Debian's rsyslog (issue 13, item 3): every ring entry arrives, whole,
as RFC 5424 that rsyslog parses (structured data, severity, facility), across an rsyslog
restart too; a socket that is not there is refused before anything starts.

rsyslog runs with contrib/rsyslog/nvmefs-syslog.conf, only its two paths changed, so the
recipe users install is the one tested. Real mounts, as a user runs them."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounts import (
    BUF,
    cleanup,
    daemon_pids,
    is_mounted,
    mounted,
    run_nvmefs,
    stats,
    wait_for,
    wait_static,
)

pytestmark = pytest.mark.fuse

RSYSLOGD = "/usr/sbin/rsyslogd"
SNIPPET = Path(__file__).resolve().parents[1] / "contrib" / "rsyslog" / "nvmefs-syslog.conf"
SNIPPET_SOCKET = "/run/nvmefs-syslog.sock"
SNIPPET_OUTPUT = "/var/log/nvmefs-syslog.jsonl"

# 16 MiB scrubbed once in 128 KiB chunks: the first half of the reads fail with a media error,
# the second half with Invalid Field in Command; DNR, so one entry per chunk.
STATIC = "sim_size=16M,passes=1,log=errors,retries=0,capacity=4096"
TWO_KINDS = """
[[fault]]
opcode = "read"
lba = [0, 16383]
status = 0x4281
[[fault]]
opcode = "read"
lba = [16384, 32767]
status = 0x4002
"""
# One failing chunk in a 1 MiB namespace scrubbed every 0.2 s: a steady trickle of entries.
TRICKLE = "sim_size=1M,passes=0,interval=0.2,log=errors,retries=0,capacity=4096"
FIRST_LBA_FAILS = '[[fault]]\nopcode = "read"\nlba = [0, 0]\nstatus = 0x4281\n'

SD_PARAM = re.compile(r' ([^= \]"]+)="((?:[^"\\\]]|\\["\\\]])*)"')


class Rsyslog:
    """A private rsyslogd: the snippet's input on `socket`, its JSON lines in `output`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "nvmefs.sock"
        self.output = root / "nvmefs-syslog.jsonl"
        (root / "work").mkdir()
        text = SNIPPET.read_text()
        assert SNIPPET_SOCKET in text and SNIPPET_OUTPUT in text
        snippet = root / "nvmefs-syslog.conf"
        snippet.write_text(
            text.replace(SNIPPET_SOCKET, str(self.socket)).replace(SNIPPET_OUTPUT, str(self.output))
        )
        # What Debian's /etc/rsyslog.conf gives the snippet: imuxsock loaded (here without
        # /dev/log) and a work directory.
        self.conf = root / "rsyslog.conf"
        self.conf.write_text(
            f'global(workDirectory="{root / "work"}")\n'
            'module(load="imuxsock" SysSock.Use="off")\n'
            f'include(file="{snippet}")\n'
        )
        check = subprocess.run(
            [RSYSLOGD, "-N1", "-f", str(self.conf)], capture_output=True, text=True, timeout=30
        )
        assert check.returncode == 0 and "error" not in check.stderr.lower(), check.stderr
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [RSYSLOGD, "-n", "-f", str(self.conf), "-i", str(self.root / "pid")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self.socket.is_socket, 10, "rsyslogd's socket")

    def stop(self) -> None:
        """SIGTERM, as a service manager stops it: it writes what it holds and removes its
        socket."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def records(self) -> list[dict[str, str]]:
        if not self.output.exists():
            return []
        return [json.loads(line) for line in self.output.read_text().splitlines()]


@pytest.fixture
def rsyslog() -> Iterator[Rsyslog]:
    if not Path(RSYSLOGD).exists():
        pytest.skip("needs Debian's rsyslog")
    # A short directory: a socket's path is limited to 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="nvmefs-rs"))
    r = Rsyslog(root)
    r.start()
    try:
        yield r
    finally:
        r.stop()
        shutil.rmtree(root, ignore_errors=True)


def params(sd: str) -> dict[str, str]:
    """rsyslog's STRUCTURED-DATA property as {name: value}: one element, nvmefs@32473."""
    assert sd.startswith("[nvmefs@32473") and sd.endswith("]") and "][" not in sd, sd
    return {k: re.sub(r'\\(["\\\]])', r"\1", v) for k, v in SD_PARAM.findall(sd)}


def ring_records(mnt: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (mnt / f"{BUF}.jsonl").read_text().splitlines()]


def wait_delivered(rs: Rsyslog, last_seq: int, timeout: float = 10) -> list[dict[str, str]]:
    wait_for(
        lambda: any(params(r["sd"]).get("seq") == str(last_seq) for r in rs.records()),
        timeout,
        f"rsyslog to write entry {last_seq}",
    )
    return rs.records()


def test_rsyslog_writes_every_entry_whole_with_structured_data_and_severity(
    tmp_path: Path, rsyslog: Rsyslog
) -> None:
    with mounted(tmp_path, f"{STATIC},syslog={rsyslog.socket}", TWO_KINDS) as mnt:
        wait_static(mnt)
        ring = ring_records(mnt)
        pid = stats(mnt)["pid"]
        got = wait_delivered(rsyslog, int(str(ring[-1]["seq"])))
    assert len(ring) == 1 + 128 and [r["seq"] for r in ring] == list(range(1, 130))
    # One line per ring entry, in order, nothing else.
    assert [int(params(g["sd"])["seq"]) for g in got] == [r["seq"] for r in ring]
    severities = {"start": "notice", "0x4281": "err", "0x4002": "warning"}
    for r, g in zip(ring, got, strict=True):
        assert g["time"] == r["wall"]  # the entry's time, to the microsecond
        assert (g["host"], g["app"], g["procid"]) == (socket.gethostname(), "nvmefs", pid)
        assert (g["facility"], g["msgid"]) == ("daemon", r["kind"])
        assert g["msg"] == r["info"]  # whole
        p = params(g["sd"])
        if r["kind"] == "start":
            assert g["severity"] == "notice" and p == {"seq": "1"}
            continue
        assert g["severity"] == severities[str(r["status"])]
        assert p == {
            "seq": str(r["seq"]),
            "status": r["status"],
            "name": r["name"],
            "ctrl": r["ctrl"],
            "nsid": str(r["nsid"]),
            "qid": str(r["qid"]),
            "cid": str(r["cid"]),
            "opcode": f"0x{r['opcode']:02x}",
            "slba": str(r["slba"]),
            "nlb": str(r["nlb"]),
            "retries": str(r["retries"]),
            "blk_status": r["blk_status"],
        }
    assert [g["severity"] for g in got].count("err") == 64
    assert [g["severity"] for g in got].count("warning") == 64


def test_every_entry_arrives_across_an_rsyslog_restart(tmp_path: Path, rsyslog: Rsyslog) -> None:
    with mounted(tmp_path, f"{TRICKLE},syslog={rsyslog.socket}", FIRST_LBA_FAILS) as mnt:
        wait_for(lambda: len(rsyslog.records()) >= 4, 10, "the first entries in rsyslog")
        rsyslog.stop()
        down = len(ring_records(mnt))
        wait_for(lambda: len(ring_records(mnt)) >= down + 5, 10, "entries while rsyslog is down")
        rsyslog.start()
        wait_for(lambda: len(ring_records(mnt)) >= down + 10, 10, "entries after the restart")
        ring = ring_records(mnt)
        got = wait_delivered(rsyslog, int(str(ring[-1]["seq"])))
    seqs = [int(params(g["sd"])["seq"]) for g in got]
    # Exactly once each, in order, nothing sent while rsyslog was down lost; no "not sent"
    # report, as the ring held everything.
    assert seqs[: len(ring)] == [r["seq"] for r in ring]
    assert all(g["msgid"] != "not-sent" for g in got)


def test_with_the_journal_a_second_mount_sends_only_its_own_entries(
    tmp_path: Path, rsyslog: Rsyslog
) -> None:
    journal = tmp_path / "nvmefs.jsonl"
    opts = f"{STATIC},journal={journal},syslog={rsyslog.socket}"
    with mounted(tmp_path, opts, TWO_KINDS) as mnt:
        wait_static(mnt)
        first = ring_records(mnt)
        wait_delivered(rsyslog, int(str(first[-1]["seq"])))
    with mounted(tmp_path, opts, TWO_KINDS, name="again") as mnt:
        wait_static(mnt)
        second = [r for r in ring_records(mnt) if not r.get("replayed")]
        got = wait_delivered(rsyslog, int(str(second[-1]["seq"])))
    # The replayed entries were sent by the first daemon: each number once, across both runs,
    # the journal's notice of the replay included.
    seqs = [int(params(g["sd"])["seq"]) for g in got]
    assert seqs == [r["seq"] for r in first + second] == list(range(1, 129 + 130 + 1))
    assert got[129]["msg"].startswith("nvmefs notice: replayed 129 entries from ")
    assert len({g["procid"] for g in got}) == 2


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("=/nonexistent", "no syslog socket at /nonexistent (is a syslog daemon running?)"),
        ("=/etc/hostname", "/etc/hostname is not a socket"),
        ("", "no syslog socket at /dev/log"),
    ],
)
def test_a_syslog_socket_that_is_not_there_is_refused_and_nothing_mounts(
    tmp_path: Path, value: str, needle: str
) -> None:
    if not value and Path("/dev/log").exists():
        pytest.skip("this host has a /dev/log")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = run_nvmefs("sim", str(mnt), "-o", f"syslog{value}", timeout=30)
    if p.returncode == 0:
        cleanup(mnt)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert p.stdout == "" and len(p.stderr.splitlines()) == 1, p.stderr
    assert needle in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not is_mounted(mnt) and daemon_pids(mnt) == []
