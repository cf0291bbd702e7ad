"""`-o syslog`: RFC 5424 messages, every entry delivered in order, a full or vanished syslog
socket neither blocking the loop nor growing memory, and sockets refused before anything starts.

The receiving end is an AF_UNIX datagram socket bound in a temporary directory, as a syslog
daemon's is; the real rsyslog is in tests/test_fleet_syslog.py."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import hypothesis.strategies as st
import pytest
import trio
from hypothesis import given

from nvmefs import options
from nvmefs.errors import UsageError
from nvmefs.nvme import commands as c
from nvmefs.nvme.status import Translator
from nvmefs.outputs import syslog
from nvmefs.outputs.syslog import (
    MESSAGE_MAX,
    SyslogOutput,
    connect,
    entry_message,
    message,
    not_sent_message,
)
from nvmefs.recorder import Recorder
from nvmefs.store import events
from nvmefs.store.events import HostEvent, NvmeEvent
from nvmefs.store.render import Renderer, info
from nvmefs.store.ring import DebugRing
from tests.helpers import sim_engine

# RFC 5424 section 6, strictly: the header fields, then structured data, then an ASCII MSG.
SD_NAME = rb"[!#-<>-\\^-~]{1,32}"  # PRINTUSASCII except '=', ' ', ']' and '"'
SD_VALUE = rb'(?:[^"\\\]]|\\["\\\]])*'  # '"', '\' and ']' only escaped
SD_ELEMENT = rb"\[" + SD_NAME + rb"(?: " + SD_NAME + rb'="' + SD_VALUE + rb'")*\]'
RFC5424 = re.compile(
    rb"<(?P<pri>[0-9]{1,3})>1 "
    rb"(?P<ts>[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z) "
    rb"(?P<host>[!-~]{1,255}) (?P<app>[!-~]{1,48}) (?P<procid>[!-~]{1,128}) "
    rb"(?P<msgid>[!-~]{1,32}) (?P<sd>-|(?:" + SD_ELEMENT + rb")+)"
    rb"(?: (?P<msg>[ -~]*))?"
)
PARAM = re.compile(rb" (" + SD_NAME + rb')="(' + SD_VALUE + rb')"')
UNESCAPE = re.compile(rb'\\(["\\\]])')

MEDIA = 0x4281  # Unrecovered Read Error, DNR: SCT 2
T = Translator()


def parse(msg: bytes) -> dict[str, object]:
    """A message's fields; the structured data as {name: value} with escapes undone."""
    m = RFC5424.fullmatch(msg)
    assert m is not None, msg
    fields: dict[str, object] = {k: v.decode() for k, v in m.groupdict().items() if v is not None}
    sd = m.group("sd")
    assert sd.startswith(b"[nvmefs@32473"), sd
    fields["params"] = {
        name.decode(): UNESCAPE.sub(rb"\1", value).decode() for name, value in PARAM.findall(sd)
    }
    return fields


def nvme(word: int = MEDIA, **kw: object) -> NvmeEvent:
    ctx: dict[str, object] = dict(ctrl="nvme0", nsid=1, qid=3, cid=17, opcode=2, slba=2048)
    ctx.update(nlb=8, retries=0)
    ctx.update(kw)
    return NvmeEvent(T.decode(word), **ctx)  # type: ignore[arg-type]


WALL = 1_764_672_000_123_456_789  # 2025-12-02T10:40:00.123456789Z


# -- the message ---------------------------------------------------------------------------------


def test_a_media_error_is_one_rfc5424_message_of_severity_err_with_its_context() -> None:
    ev = nvme()
    raw = entry_message((42, 0, WALL, ev), "db7", 4242)
    f = parse(raw)
    assert f["pri"] == "27"  # daemon (3) * 8 + err (3)
    assert f["ts"] == "2025-12-02T10:40:00.123456Z"  # microseconds, truncated, UTC
    assert (f["host"], f["app"], f["procid"], f["msgid"]) == ("db7", "nvmefs", "4242", "nvme")
    assert f["params"] == {
        "seq": "42",
        "status": "0x4281",
        "name": "Unrecovered Read Error",
        "ctrl": "nvme0",
        "nsid": "1",
        "qid": "3",
        "cid": "17",
        "opcode": "0x02",
        "slba": "2048",
        "nlb": "8",
        "retries": "0",
        "blk_status": "MEDIUM",
    }
    assert f["msg"] == info(ev)
    assert raw.startswith(b"<27>1 2025-12-02T10:40:00.123456Z db7 nvmefs 4242 nvme [nvmefs@32473 ")


def test_the_kernel_sources_context_disk_and_op_are_params_too() -> None:
    ev = nvme(0x4281, opcode=None, qid=None, cid=None, disk="nvme0n1", op="READ", retries=2)
    params = parse(entry_message((1, 0, WALL, ev), "h", 1))["params"]
    assert params == {
        "seq": "1",
        "status": "0x4281",
        "name": "Unrecovered Read Error",
        "ctrl": "nvme0",
        "disk": "nvme0n1",
        "nsid": "1",
        "op": "READ",
        "slba": "2048",
        "nlb": "8",
        "retries": "2",
        "blk_status": "MEDIUM",
    }


def test_a_folded_entry_says_how_many_more_and_their_lbas_in_params_and_text() -> None:
    ev = nvme(repeats=4999, lba_range=(2048, 90111))
    f = parse(entry_message((7, 0, WALL, ev), "h", 1))
    params = f["params"]
    assert isinstance(params, dict)
    assert (params["repeats"], params["lba_range"]) == ("4999", "2048..90111")
    assert list(params)[-3:] == ["repeats", "lba_range", "blk_status"]
    assert str(f["msg"]).endswith(" (4999 more, LBA 2048..90111)")
    # An entry of its own has neither.
    assert "repeats" not in parse(entry_message((8, 0, WALL, nvme()), "h", 1))["params"]  # type: ignore[operator]


@pytest.mark.parametrize(
    ("event", "pri", "severity"),
    [
        (nvme(0x4281), 27, "err"),  # media and data integrity errors: SCT 2
        (nvme(0x0286), 27, "err"),  # without DNR, and another code of SCT 2
        (nvme(0x4002), 28, "warning"),  # generic: Invalid Field in Command
        (nvme(0x4182), 28, "warning"),  # command specific
        (nvme(0x0371), 28, "warning"),  # path related
        (nvme(0x0000), 30, "info"),  # success (log=all)
        (HostEvent(events.HOST_ERROR, "x"), 28, "warning"),
        (HostEvent(events.TIMEOUT, "x"), 28, "warning"),
        (HostEvent(events.ABORT, "x"), 28, "warning"),
        (HostEvent(events.RESET, "x"), 28, "warning"),
        (HostEvent(events.LOST, "x"), 28, "warning"),
        (HostEvent(events.START, "x"), 29, "notice"),
        (HostEvent(events.NOTICE, "x"), 29, "notice"),
        (HostEvent("some-new-kind", "x"), 28, "warning"),  # not in the table: shown
    ],
)
def test_pri_is_facility_daemon_and_the_severity_of_the_table(
    event: object, pri: int, severity: str
) -> None:
    f = parse(entry_message((1, 0, WALL, event), "h", 1))
    assert int(str(f["pri"])) == pri and pri // 8 == 3
    names = ["emerg", "alert", "crit", "err", "warning", "notice", "info", "debug"]
    assert names[pri % 8] == severity
    assert f["msgid"] == getattr(event, "kind", None)


def test_the_severity_table_is_data_naming_every_kind_of_entry() -> None:
    assert set(events.HOST_KINDS) <= syslog.SEVERITY.keys()
    assert {syslog.MEDIA_ERROR, syslog.NVME_ERROR, syslog.NVME_OK} <= syslog.SEVERITY.keys()


def test_host_event_fields_become_params_and_values_are_escaped() -> None:
    ev = HostEvent(
        events.NOTICE,
        'controller error log entry 3: "quoted" \\ [bracketed]',
        {"ctrl": "nvme0", "odd": 'a"b\\c]d', "bad name=x": 1, "none": None, "seq": 99},
    )
    raw = entry_message((7, 0, WALL, ev), "h", 1)
    # RFC 5424 section 6.3.3 escapes '"', '\\' and ']' of the value in the text outputs' form,
    # where the backslash is \\\\ already: a value's "\\x0a" and its newline stay apart.
    assert b'odd="a\\"b\\\\\\\\c\\]d"' in raw
    f = parse(raw)
    # A key that is no SD-NAME loses what SD-NAMEs cannot hold; None is left out; the
    # entry's own seq is not overridden by a field of that name.
    assert f["params"] == {"seq": "7", "ctrl": "nvme0", "odd": 'a"b\\\\c]d', "badnamex": "1"}
    assert f["msg"] == info(ev)


def test_a_value_with_a_backslash_and_one_with_a_newline_stay_apart() -> None:
    ev = HostEvent(events.NOTICE, "m", {"a": "x\\x0ay", "b": "x\ny"})
    f = parse(entry_message((1, 0, WALL, ev), "h", 1))
    assert f["params"] == {"seq": "1", "a": "x\\\\x0ay", "b": "x\\x0ay"}
    assert f["msg"] == "nvmefs notice: m a=x\\\\x0ay b=x\\x0ay"


def test_the_forged_ctrl_of_issue_18_is_one_message_with_no_control_character() -> None:
    ev = nvme(ctrl="nvme0\n[1] Specific NVMe error encountered: FORGED2\x1b[31m")
    raw = entry_message((1, 0, WALL, ev), "h", 1)
    assert raw.isascii() and all(0x20 <= b < 0x7F for b in raw)
    f = parse(raw)
    ctrl = "nvme0\\x0a[1] Specific NVMe error encountered: FORGED2\\x1b[31m"
    assert f["params"]["ctrl"] == ctrl  # type: ignore[index]
    assert f" ctrl={ctrl} " in str(f["msg"])


def test_text_outside_printable_ascii_is_escaped_not_sent_raw() -> None:
    ev = HostEvent(events.HOST_ERROR, "dévice\ngone", {"path": "/dev/\x00é"})
    raw = entry_message((1, 0, WALL, ev), "hôst name", 1)
    assert raw.isascii()
    f = parse(raw)
    assert f["host"] == "h\\xf4stname"
    assert f["msg"] == "nvmefs host-error: d\\xe9vice\\x0agone path=/dev/\\x00\\xe9"
    assert f["params"] == {"seq": "1", "path": "/dev/\\x00\\xe9"}  # type: ignore[comparison-overlap]


def test_the_not_sent_message_names_the_count() -> None:
    f = parse(not_sent_message(17, WALL, "h", 9))
    assert (f["pri"], f["msgid"], f["msg"]) == (
        "28",
        "not-sent",
        "nvmefs: 17 entries not sent to syslog",
    )
    assert f["params"] == {"not_sent": "17"}
    assert parse(not_sent_message(1, WALL, "h", 9))["msg"] == "nvmefs: 1 entry not sent to syslog"


def test_timestamps_truncate_to_microseconds_in_utc() -> None:
    assert syslog.timestamp(0) == "1970-01-01T00:00:00.000000Z"
    assert syslog.timestamp(1_999_999_999) == "1970-01-01T00:00:01.999999Z"


ANY_TEXT = st.text(max_size=400)


@given(
    host=ANY_TEXT,
    kind=ANY_TEXT,
    text=ANY_TEXT,
    fields=st.dictionaries(ANY_TEXT, st.one_of(ANY_TEXT, st.integers(), st.none()), max_size=40),
)
def test_any_event_is_a_valid_message_within_the_bound(
    host: str, kind: str, text: str, fields: dict[str, object]
) -> None:
    ev = HostEvent(kind, text, fields)
    params = [("seq", 1), *fields.items()]
    raw = message(4, WALL, syslog.hostname(host), 2**22, kind, params, info(ev, ascii_only=True))
    assert len(raw) <= MESSAGE_MAX
    assert parse(raw).get("msg", "") == info(ev, ascii_only=True)  # the entry's info, in ASCII
    for msg in (info(ev), text):  # not ASCII, or raw: still one valid message
        raw = message(4, WALL, syslog.hostname(host), 2**22, kind, params, msg)
        assert len(raw) <= MESSAGE_MAX
        parse(raw)


def test_the_worst_case_message_is_within_the_bound() -> None:
    worst = "\x00" * 400
    fields = {f"{i:02d}" + "k" * 40: '"]\\' * 100 for i in range(40)}
    raw = message(3, WALL, syslog.hostname("x" * 400), 2**22, "k" * 40, fields.items(), worst)
    assert len(raw) <= MESSAGE_MAX  # well under rsyslog's default maxMessageSize, 8 KiB
    assert len(parse(raw)["params"]) == syslog.PARAMS_MAX  # type: ignore[arg-type]


# -- delivery ------------------------------------------------------------------------------------


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket in a temporary directory: a syslog daemon's end."""
    path = str(tmp_path / "log")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    yield sock, path
    sock.close()


def drain(sock: socket.socket) -> list[bytes]:
    got = []
    while True:
        try:
            got.append(sock.recv(65536))
        except BlockingIOError:
            return got


async def collect(sock: socket.socket, got: list[bytes]) -> None:
    """Read datagrams as they come, until cancelled."""
    while True:
        await trio.lowlevel.wait_readable(sock)
        got.extend(drain(sock))


def recorder_of(ring: DebugRing) -> Recorder:
    return Recorder(ring, Renderer())


async def test_every_entry_of_a_sim_run_reaches_the_socket_in_order(
    receiver: tuple[socket.socket, str],
) -> None:
    rsock, path = receiver
    plan = '[[fault]]\nopcode = "read"\nlba = [0, 4095]\nstatus = 0x4281\n'
    got: list[bytes] = []
    async with sim_engine(plan, fold=0) as (e, _sim, ring):  # an entry each, however fast
        out = SyslogOutput(path, connect(path))
        out.attach(ring)
        first = ring.next_seq
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect, rsock, got)
            nursery.start_soon(out.run, recorder_of(ring))
            for slba in range(0, 8192, 8):  # half of them fail
                await e.submit(c.read(1, slba, 8, 512))
            with trio.fail_after(10):
                while len(got) < ring.last_seq - first + 1:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        out.close()
    entries = ring.read_after(first - 1)[1]
    assert len(entries) == 512 and ring.dropped == 0
    assert got == [entry_message(en, syslog.hostname(), os.getpid()) for en in entries]
    assert [parse(m)["params"]["slba"] for m in got] == [str(s) for s in range(0, 4096, 8)]  # type: ignore[index]
    assert (out.sent, out.dropped, out.errors) == (512, 0, 0)


async def test_replayed_entries_are_not_sent_and_this_runs_earlier_ones_are(
    receiver: tuple[socket.socket, str],
) -> None:
    rsock, path = receiver
    ring = DebugRing(16)
    ring.restore([(s, 0, WALL, HostEvent(events.NOTICE, "earlier", replayed=True)) for s in (5, 6)])
    ring.append(HostEvent(events.NOTICE, "replayed 2 entries"))  # the journal's notice: ours
    out = SyslogOutput(path, connect(path))
    out.attach(ring)  # after the journal's attach, as the daemon does
    ring.append(HostEvent(events.START, "this run"))  # before run(), as the daemon's start entry
    ring.append(HostEvent(events.NOTICE, "late", replayed=True))  # the flag decides, not the order
    async with trio.open_nursery() as nursery:
        nursery.start_soon(out.run, recorder_of(ring))
        with trio.fail_after(5):
            while out.sent < 2:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    got = [parse(m) for m in drain(rsock)]
    assert [(p["params"]["seq"], p["msgid"]) for p in got] == [("7", "notice"), ("8", "start")]  # type: ignore[index]
    assert (out.sent, out.dropped) == (2, 0)


async def test_a_full_socket_blocks_neither_the_loop_nor_memory_and_the_gap_is_reported(
    receiver: tuple[socket.socket, str],
) -> None:
    rsock, path = receiver
    ring = DebugRing(32)
    out = SyslogOutput(path, connect(path))
    out.attach(ring)
    total = 2000
    async with trio.open_nursery() as nursery:
        nursery.start_soon(out.run, recorder_of(ring))
        with trio.fail_after(5):  # a blocked loop would never get here
            for i in range(total):
                ring.append(HostEvent(events.NOTICE, f"n{i}"))
                await trio.sleep(0)
        # The receiver has read nothing: the socket's queue is full, the sender waits, what
        # the ring let go is counted.
        assert out.sent < 100 and out.sent + out.dropped < total
        got: list[bytes] = []
        nursery.start_soon(collect, rsock, got)
        with trio.fail_after(10):
            while out.sent + out.dropped < total or not any(b"not-sent" in m for m in got):
                await trio.sleep(0.01)
            await trio.sleep(0.1)
            got.extend(drain(rsock))
        nursery.cancel_scope.cancel()
    parsed = [parse(m) for m in got]
    reports = [p for p in parsed if p["msgid"] == "not-sent"]
    sent = [p for p in parsed if p["msgid"] != "not-sent"]
    assert len(reports) == 1 and out.dropped > 0
    missing = int(reports[0]["params"]["not_sent"])  # type: ignore[index]
    assert missing == out.dropped and len(sent) == out.sent == total - missing
    assert reports[0]["msg"] == f"nvmefs: {missing} entries not sent to syslog"
    # Before the gap: the first entries, in order; after it: the newest ones, to the last.
    seqs = [int(p["params"]["seq"]) for p in sent]  # type: ignore[index]
    at = parsed.index(reports[0])
    assert seqs == [*range(1, at + 1), *range(at + missing + 1, total + 1)]
    assert out.errors == 0


async def test_the_dropped_count_grows_while_the_receiver_is_stalled_not_when_it_resumes(
    receiver: tuple[socket.socket, str],
) -> None:
    rsock, path = receiver
    ring = DebugRing(32)
    out = SyslogOutput(path, connect(path))
    out.attach(ring)

    def invariant() -> None:
        assert out.sent + out.dropped + out.skipped + out.pending == ring.last_seq

    async with trio.open_nursery() as nursery:
        nursery.start_soon(out.run, recorder_of(ring))
        for i in range(500):  # far past what the socket and the ring hold
            ring.append(HostEvent(events.NOTICE, f"n{i}"))
            await trio.sleep(0)
            invariant()
        # The receiver reads nothing: the sender is parked on the full socket, and the ring
        # has let go of entries it never sent. They are dropped now, not at the next read.
        stalled_sent = out.sent
        assert stalled_sent < 100
        assert out.dropped > 0
        assert out.dropped >= ring.first_seq - 1 - stalled_sent - syslog.BATCH
        before = out.dropped
        for i in range(50):
            ring.append(HostEvent(events.NOTICE, f"m{i}"))  # each overwrites one not sent
            assert out.dropped == before + i + 1
            invariant()
        await trio.sleep(0.05)
        assert out.sent == stalled_sent and out.dropped == before + 50  # still parked
        stalled_dropped = out.dropped
        got: list[bytes] = []
        nursery.start_soon(collect, rsock, got)  # the receiver resumes
        with trio.fail_after(10):
            while out.pending or not any(b"not-sent" in m for m in got):
                assert out.dropped == stalled_dropped  # no jump: they were counted already
                await trio.sleep(0.001)
            await trio.sleep(0.1)
            got.extend(drain(rsock))
        nursery.cancel_scope.cancel()
    invariant()
    assert out.dropped == stalled_dropped and out.sent == 550 - stalled_dropped
    reports = [p for p in map(parse, got) if p["msgid"] == "not-sent"]
    assert [r["params"]["not_sent"] for r in reports] == [str(stalled_dropped)]  # type: ignore[index]


def test_replayed_entries_are_skipped_and_the_counters_add_up(
    receiver: tuple[socket.socket, str],
) -> None:
    _rsock, path = receiver
    ring = DebugRing(8)
    ring.restore([(s, 0, WALL, HostEvent(events.NOTICE, "earlier", replayed=True)) for s in (1, 2)])
    out = SyslogOutput(path, connect(path))
    out.attach(ring)
    ring.append(HostEvent(events.NOTICE, "this run"))
    assert (out.sent, out.dropped, out.skipped, out.pending) == (0, 0, 0, 3)
    out.close()
    assert (out.sent, out.dropped, out.skipped, out.pending) == (1, 0, 2, 0)


async def test_a_restarted_syslog_daemon_gets_every_entry_after_a_reconnect(tmp_path: Path) -> None:
    path = str(tmp_path / "log")
    first = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    first.bind(path)
    ring = DebugRing(64)
    out = SyslogOutput(path, connect(path))
    out.attach(ring)
    got: list[bytes] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(out.run, recorder_of(ring))
        ring.append(HostEvent(events.NOTICE, "one"))
        with trio.fail_after(5):
            while out.sent < 1:
                await trio.sleep(0.01)
        got += [first.recv(65536)]
        first.close()  # the daemon stops: its socket file stays, refusing
        ring.append(HostEvent(events.NOTICE, "two"))
        await trio.sleep(0.05)
        os.unlink(path)  # and goes (ENOENT while reconnecting)
        ring.append(HostEvent(events.NOTICE, "three"))
        await trio.sleep(0.3)
        second = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        second.bind(path)  # started again
        second.setblocking(False)
        nursery.start_soon(collect, second, got)
        with trio.fail_after(10):
            while out.sent < 3:
                await trio.sleep(0.01)
            await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    second.close()
    assert [parse(m)["msg"] for m in got] == [
        f"nvmefs notice: {n}" for n in ("one", "two", "three")
    ]
    assert out.dropped == 0 and out.reconnects == 1 and out.errors >= 2


async def test_close_sends_what_is_left_without_waiting_and_is_idempotent(
    receiver: tuple[socket.socket, str],
) -> None:
    rsock, path = receiver
    ring = DebugRing(16)
    out = SyslogOutput(path, connect(path))
    out.attach(ring)
    for i in range(3):
        ring.append(HostEvent(events.NOTICE, f"n{i}"))  # the sender never ran
    out.close()
    out.close()
    assert out.sock is None and out.sent == 3
    assert [parse(m)["msg"] for m in drain(rsock)] == [f"nvmefs notice: n{i}" for i in range(3)]
    ring.append(HostEvent(events.NOTICE, "after close"))  # no longer listened to
    assert drain(rsock) == []


def test_a_full_socket_at_close_is_left_as_it_is(receiver: tuple[socket.socket, str]) -> None:
    _rsock, path = receiver
    ring = DebugRing(256)
    out = SyslogOutput(path, connect(path))
    out.attach(ring)
    for i in range(200):
        ring.append(HostEvent(events.NOTICE, f"n{i}"))
    out.close()  # returns at once though the receiver reads nothing
    assert 0 < out.sent < 200


# -- open ----------------------------------------------------------------------------------------


def opts(*given: str) -> options.Parsed:
    return options.parse(list(given), allow_fuse=True)


def refused(*given: str) -> str:
    with pytest.raises(UsageError) as info_:
        SyslogOutput.open(opts(*given))
    text = str(info_.value)
    assert "\n" not in text and text.startswith("option syslog: ")
    return text


def test_no_option_no_output() -> None:
    assert SyslogOutput.open(opts()) is None


def test_open_connects_a_nonblocking_close_on_exec_socket(
    receiver: tuple[socket.socket, str],
) -> None:
    rsock, path = receiver
    out = SyslogOutput.open(opts(f"syslog={path}"))
    assert out is not None and out.sock is not None
    try:
        assert out.sock.getblocking() is False and not out.sock.get_inheritable()
        out.sock.send(b"x")
        assert rsock.recv(10) == b"x"
    finally:
        out.close()
    assert out.sock is None


def test_open_makes_a_relative_path_absolute(
    receiver: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _rsock, path = receiver
    monkeypatch.chdir(os.path.dirname(path))
    out = SyslogOutput.open(opts("syslog=log"))
    assert out is not None and out.path == path
    out.close()


def test_open_refuses_a_missing_socket(tmp_path: Path) -> None:
    missing = tmp_path / "nothing"
    assert refused(f"syslog={missing}") == (
        f"option syslog: no syslog socket at {missing} (is a syslog daemon running?)"
    )


def test_the_flag_alone_means_dev_log() -> None:
    if os.path.exists("/dev/log"):
        pytest.skip("this host has a /dev/log")
    assert "no syslog socket at /dev/log" in refused("syslog")


def test_open_refuses_what_is_not_a_socket(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    assert refused(f"syslog={tmp_path / 'file'}").endswith(" is not a socket")
    assert refused(f"syslog={tmp_path}").endswith(" is not a socket")


def test_open_refuses_a_socket_nobody_listens_on(tmp_path: Path) -> None:
    path = str(tmp_path / "stale")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.close()  # the file stays: a syslog daemon that died
    assert "nothing listens on" in refused(f"syslog={path}")


def test_open_refuses_a_stream_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "stream")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen()
    try:
        assert refused(f"syslog={path}").endswith(" is not a datagram socket")
    finally:
        s.close()


def test_a_path_with_a_newline_is_still_one_line(tmp_path: Path) -> None:
    assert "\\x0a" in refused(f"syslog={tmp_path}/a\nb")
