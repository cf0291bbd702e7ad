"""Prometheus metrics: the exposition's values and labels, the prom file, the options, HTTP."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from nvmefs import __version__, options, workloads
from nvmefs.engine.kernel import KernelEngine, KernelSpec
from nvmefs.errors import UsageError
from nvmefs.linux import devices
from nvmefs.linux.devices import Controller
from nvmefs.linux.safefiles import SafeDir
from nvmefs.nvme import commands as c
from nvmefs.nvme.status import Translator
from nvmefs.outputs import exporter as m
from nvmefs.outputs import journal
from nvmefs.outputs.exporter import Exporter, parse_head, write_atomically
from nvmefs.outputs.journal import Journal
from nvmefs.outputs.metrics import Metrics
from nvmefs.outputs.syslog import SyslogOutput
from nvmefs.recorder import Recorder
from nvmefs.store import events
from nvmefs.store.events import HostEvent, NvmeEvent
from nvmefs.store.render import Clock, Renderer
from nvmefs.store.ring import DebugRing
from nvmefs.workloads import Health
from tests.helpers import sim_engine

# LBAs 2048..2055 fail with Unrecovered Read Error (no DNR: retried 5 times, then final).
PLAN = '[[fault]]\nopcode = "read"\nlba = [2048, 2055]\nstatus = 0x281\n'
ST = Translator()
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str | bytes) -> Samples:
    """Every sample of an exposition, parsed back with prometheus_client's own parser."""
    if isinstance(text, bytes):
        text = text.decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


def value(got: Samples, metric: str, /, **labels: str) -> float:
    """The value of the one series of `metric` whose labels include `labels`."""
    found = [v for (n, ls), v in got.items() if n == metric and set(labels.items()) <= ls]
    assert len(found) == 1, f"{metric} {labels}: {len(found)} series"
    return found[0]


def names(got: Samples) -> set[str]:
    return {n for n, _ in got}


def recorder(ring: DebugRing, **kw: object) -> Recorder:
    return Recorder(ring, Renderer(Clock("jiffies"), "full"), **kw)  # type: ignore[arg-type]


async def test_failed_commands_are_counted_by_status_with_the_controllers_labels() -> None:
    async with sim_engine(PLAN) as (engine, _, ring):
        metrics = Metrics()
        metrics.attach(ring)
        rec = recorder(ring, source="sim", engine=engine)
        # 2 KiB chunks: 2048..2051 and 2052..2055 each fail after 5 retries; nothing else does.
        await workloads.scrub(engine, rec.progress, bs=2048, qd=8, passes=1)
        got = samples(metrics.exposition(rec))
    errors = [(dict(ls), v) for (n, ls), v in got.items() if n == "nvmefs_errors_total"]
    assert errors == [
        (
            {
                "source": "sim",
                "ctrl": "sim0",
                "serial": engine.serial,
                "model": engine.model,
                "nsid": "1",
                "status": "0x281",
                "name": "Unrecovered Read Error",
                "blk_status": "MEDIUM",
            },
            2.0,
        )
    ]
    assert engine.serial and engine.model
    assert value(got, "nvmefs_retries_total", source="sim") == 10
    assert value(got, "nvmefs_completion_errors_total") == 12
    assert value(got, "nvmefs_completions_total") == engine.stats.completions > 8192
    assert value(got, "nvmefs_logged_total") == 2
    assert value(got, "nvmefs_workload_commands_total") == 8192  # 16 MiB in 2 KiB chunks
    assert value(got, "nvmefs_workload_failed_commands_total") == 2
    assert value(got, "nvmefs_workload_bytes_total") == 16 << 20
    assert value(got, "nvmefs_scrub_passes_total") == 1
    assert value(got, "nvmefs_scrub_pass_ratio") == 1.0
    assert value(got, "nvmefs_scrub_last_pass_end_timestamp_seconds") == rec.progress.last_pass_end
    info = value(got, "nvmefs_info", source="sim", version=__version__, profile=ST.profile)
    assert info == 1


async def test_ring_counters_follow_the_ring_past_its_capacity() -> None:
    ring = DebugRing(4)
    rec = recorder(ring, source="kernel")
    metrics = Metrics()
    metrics.attach(ring)
    for i in range(10):
        ring.append(HostEvent(events.NOTICE, f"n{i}"))
    rec.clear()  # removes 4, appends a notice
    got = samples(metrics.exposition(rec))
    assert value(got, "nvmefs_ring_capacity", source="kernel") == 4
    assert value(got, "nvmefs_ring_entries") == 1
    assert value(got, "nvmefs_ring_appended_total") == 11
    assert value(got, "nvmefs_ring_dropped_total") == 6
    assert value(got, "nvmefs_ring_cleared_total") == 4
    # Every notice is counted, the 6 the ring overwrote and the 4 it cleared too.
    assert value(got, "nvmefs_host_events_total", kind="notice") == 11
    # No engine: no engine counters, and the info metric says so with an empty profile.
    assert "nvmefs_completions_total" not in names(got)
    assert value(got, "nvmefs_info", profile="") == 1


def test_host_events_are_counted_from_attach_on_by_kind_and_nvme_entries_are_not() -> None:
    ring = DebugRing(8)
    ring.append(HostEvent(events.START, "replayed from the journal: counted by its own daemon"))
    metrics = Metrics()
    metrics.attach(ring)
    metrics.attach(ring)  # again: no second subscription
    ring.append(HostEvent(events.START, "this run"))
    ring.append(HostEvent(events.NOTICE, "replayed after the attach", replayed=True))
    ring.append(NvmeEvent(ST.decode(0x281), "sim0", 1))
    for kind in (events.TIMEOUT, events.TIMEOUT, events.LOST, events.HOST_ERROR):
        ring.append(HostEvent(kind, "x"))
    expected = dict.fromkeys(events.HOST_KINDS, 0) | {
        events.START: 1,
        events.TIMEOUT: 2,
        events.LOST: 1,
        events.HOST_ERROR: 1,
    }
    assert dict(metrics.host_events) == expected
    with pytest.raises(ValueError, match="another ring"):
        metrics.attach(DebugRing(8))


def test_an_entry_appended_from_another_listener_is_counted_once() -> None:
    # A listener that appends from its callback makes the ring call the listeners again,
    # nested: each entry is still counted exactly once.
    ring = DebugRing(8)
    nested: list[int] = []

    def echo() -> None:
        if not nested:
            nested.append(1)
            ring.append(HostEvent(events.NOTICE, "echo"))

    ring.subscribe(echo)
    metrics = Metrics()
    metrics.attach(ring)
    ring.append(HostEvent(events.RESET, "first"))
    assert metrics.host_events[events.RESET] == 1
    assert metrics.host_events[events.NOTICE] == 1


async def test_smart_health_becomes_gauges_and_a_counter_per_controller() -> None:
    async with sim_engine(PLAN) as (engine, sim, ring):
        rec = recorder(ring, source="/dev/nvme0", engine=engine)
        await workloads.scrub(engine, rec.progress, bs=128 << 10, qd=8, passes=1)
        sim.critical_warning = 0x4
        await workloads.health_poll(engine, rec.progress, {})
        got = samples(Metrics().exposition(rec))
    ids = {"source": "/dev/nvme0", "ctrl": "sim0", "serial": engine.serial, "model": engine.model}
    # The sim counts a media error per failed attempt: 1 + 5 retries.
    assert value(got, "nvmefs_smart_media_errors_total", **ids) == sim.media_errors == 6
    assert value(got, "nvmefs_smart_critical_warning", **ids) == 4
    assert value(got, "nvmefs_smart_temperature_celsius", **ids) == 47.85  # 321 K
    assert value(got, "nvmefs_smart_percentage_used_ratio", **ids) == 0
    polled = value(got, "nvmefs_smart_last_poll_timestamp_seconds", **ids)
    assert polled == rec.progress.health["sim0"].polled_at > 0


def test_temperature_is_absent_when_not_reported_and_percent_used_is_a_ratio() -> None:
    rec = recorder(DebugRing(4))
    rec.progress.health["nvme1"] = Health("nvme1", "S1", "M1", percentage_used=120)
    got = samples(Metrics().exposition(rec))
    assert "nvmefs_smart_temperature_celsius" not in names(got)
    assert value(got, "nvmefs_smart_percentage_used_ratio", ctrl="nvme1", serial="S1") == 1.2


def test_scrub_metrics_appear_only_once_a_scrub_ran() -> None:
    rec = recorder(DebugRing(4))
    rec.progress.workload = "idle"
    got = samples(Metrics().exposition(rec))
    assert not {n for n in names(got) if n.startswith("nvmefs_scrub_")}
    rec.progress.workload, rec.progress.pass_ratio = "scrub", 0.25
    got = samples(Metrics().exposition(rec))
    assert value(got, "nvmefs_scrub_pass_ratio") == 0.25
    assert value(got, "nvmefs_scrub_passes_total") == 0
    # No pass has ended: no end time (a 0 would read as 1970 to an alert on its age).
    assert "nvmefs_scrub_last_pass_end_timestamp_seconds" not in names(got)


def test_kernel_source_errors_carry_serial_and_model_from_sysfs_and_lost_events_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    looked: list[int] = []

    def controllers() -> list[Controller]:
        looked.append(1)
        return [Controller("nvme0", "SER0", "MODEL0", "FW", "pcie", "0000:01:00.0")]

    monkeypatch.setattr(devices, "controllers", controllers)
    ring = DebugRing(16)
    engine = KernelEngine(KernelSpec("kernel"), ring)
    engine.stats.failed[("nvme0", 1, 0x281)] = 3
    engine.stats.failed[("nvme0", None, 0x6)] = 1  # an admin command: no namespace
    engine.stats.failed[("nvme7", 2, 0x4281)] = 2  # a controller sysfs no longer shows
    engine.lost_events = 17
    rec = recorder(ring, source="kernel", engine=engine)
    metrics = Metrics()
    got = samples(metrics.exposition(rec))
    assert value(got, "nvmefs_errors_total", ctrl="nvme0", status="0x281") == 3
    assert value(got, "nvmefs_errors_total", ctrl="nvme0", serial="SER0", model="MODEL0",
                 nsid="", status="0x6", name="Internal Error", blk_status="IOERR") == 1  # fmt: skip
    assert value(got, "nvmefs_errors_total", ctrl="nvme7", serial="", model="", nsid="2") == 2
    assert value(got, "nvmefs_kernel_lost_events_total", source="kernel") == 17
    # sysfs is asked once; a controller it did not show is asked for again only later.
    metrics.exposition(rec)
    assert len(looked) == 1


async def test_the_exposition_has_no_series_twice_and_every_series_has_a_source() -> None:
    async with sim_engine(PLAN) as (engine, _, ring):
        rec = recorder(ring, source="sim", engine=engine)
        await workloads.scrub(engine, rec.progress, bs=128 << 10, qd=8, passes=1)
        await workloads.health_poll(engine, rec.progress, {})
        got = samples(Metrics().exposition(rec))  # samples() refuses duplicates
    assert all(dict(ls).get("source") == "sim" for _, ls in got)
    assert all(n.startswith("nvmefs_") for n in names(got))


def test_no_journal_or_syslog_metrics_without_those_outputs() -> None:
    got = samples(Metrics().exposition(recorder(DebugRing(4))))
    assert not {n for n in names(got) if n.startswith(("nvmefs_journal_", "nvmefs_syslog_"))}


def test_the_journals_counters_are_exported_losses_included(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal, "FOLLOW_S", 0.0)  # a gone directory is seen at the next write
    where = tmp_path / "d"
    where.mkdir()
    j = Journal.open(opts(f"journal={where}/j.jsonl", "journal_size=64K", "capacity=16"))
    assert j is not None
    ring = DebugRing(16)
    rec = recorder(ring, source="sim")
    metrics = Metrics()
    metrics.journal = j
    j.attach(ring)
    for i in range(600):  # about 150 KB of lines in files of 64 KiB: rotated
        ring.append(HostEvent(events.NOTICE, f"entry {i} " + "x" * 200))
    j.drain()  # what the journal's task does at its next turn
    got = samples(metrics.exposition(rec))
    assert value(got, "nvmefs_journal_lines_total", source="sim") == j.written >= 600
    assert value(got, "nvmefs_journal_rotations_total", source="sim") == j.rotations >= 2
    assert value(got, "nvmefs_journal_lost_entries_total", source="sim") == 0
    assert value(got, "nvmefs_journal_errors_total", source="sim") == 0
    shutil.rmtree(where)  # from now on the journal cannot be written
    for i in range(16):
        ring.append(HostEvent(events.NOTICE, f"lost {i}"))
    j.close()
    assert j.lost >= 16 and j.errors >= 1
    got = samples(metrics.exposition(rec))
    assert value(got, "nvmefs_journal_lines_total", source="sim") == j.written
    assert value(got, "nvmefs_journal_lost_entries_total", source="sim") == j.lost
    assert value(got, "nvmefs_journal_errors_total", source="sim") == j.errors
    assert value(got, "nvmefs_journal_rotations_total", source="sim") == j.rotations
    assert not {n for n in names(got) if n.startswith("nvmefs_syslog_")}


async def test_the_syslog_outputs_counters_are_exported_drops_included(tmp_path: Path) -> None:
    path = str(tmp_path / "log")
    first = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    first.bind(path)
    out = SyslogOutput.open(opts(f"syslog={path}"))
    assert out is not None
    ring = DebugRing(4)
    rec = recorder(ring, source="sim")
    metrics = Metrics()
    metrics.syslog = out
    out.attach(ring)
    for i in range(10):  # before the sender runs: the ring keeps the last 4
        ring.append(HostEvent(events.NOTICE, f"n{i}"))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(out.run, rec)
            with trio.fail_after(5):
                while out.sent < 4:
                    await trio.sleep(0.01)
            first.close()  # the syslog daemon stops, and goes
            os.unlink(path)
            ring.append(HostEvent(events.NOTICE, "after the restart"))
            await trio.sleep(0.3)  # failed sends and connects
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as second:
                second.bind(path)  # started again
                with trio.fail_after(10):
                    while out.sent < 5:
                        await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    finally:
        out.close()
        first.close()
    assert (out.sent, out.dropped, out.reconnects) == (5, 6, 1) and out.errors >= 2
    got = samples(metrics.exposition(rec))
    assert value(got, "nvmefs_syslog_messages_sent_total", source="sim") == 5
    assert value(got, "nvmefs_syslog_dropped_entries_total", source="sim") == 6
    assert value(got, "nvmefs_syslog_errors_total", source="sim") == out.errors
    assert value(got, "nvmefs_syslog_reconnects_total", source="sim") == 1
    assert not {n for n in names(got) if n.startswith("nvmefs_journal_")}


# -- the prom file ------------------------------------------------------------------------------


def test_write_atomically_replaces_the_file_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "nvmefs.prom"
    where = SafeDir.open(str(tmp_path))
    first = write_atomically(where, path.name, b"a 1\n")
    with open(path, "rb") as old:
        second = write_atomically(where, path.name, b"b 2\n")
        assert old.read() == b"a 1\n"  # a reader of the old file reads all of it
    assert path.read_bytes() == b"b 2\n"
    assert first != second and second == (path.stat().st_dev, path.stat().st_ino)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # node_exporter's user reads it
    assert os.listdir(tmp_path) == ["nvmefs.prom"]


def test_write_atomically_fails_whole_without_a_temporary_left(tmp_path: Path) -> None:
    path = tmp_path / "nvmefs.prom"
    path.mkdir()  # a directory cannot be replaced by a file
    with pytest.raises(OSError):
        write_atomically(SafeDir.open(str(tmp_path)), path.name, b"a 1\n")
    assert os.listdir(tmp_path) == ["nvmefs.prom"]


def opts(*items: str) -> options.Parsed:
    return options.parse(list(items), allow_fuse=False)


def test_open_returns_none_without_prom_or_metrics_listen() -> None:
    assert Exporter.open(opts()) is None


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("{t}/missing/x.prom", r"^prom=.*/missing/x\.prom: directory .* does not exist$"),
        ("{t}/file/x.prom", r"^prom=.*/file/x\.prom: .*/file is not a directory$"),
        ("{t}/dir.prom", r"^prom=.*/dir\.prom: is a directory$"),
        # Not even root may create a file there.
        ("/sys/nvmefs.prom", r"^prom=/sys/nvmefs\.prom: cannot write in /sys: "),
    ],
)
def test_open_refuses_a_prom_path_it_cannot_write_in_one_line(
    tmp_path: Path, where: str, message: str
) -> None:
    (tmp_path / "file").write_text("")
    (tmp_path / "dir.prom").mkdir()
    with pytest.raises(UsageError, match=message) as e:
        Exporter.open(opts("prom=" + where.format(t=tmp_path)))
    assert "\n" not in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["dir.prom", "file"]  # its test file is gone


def test_open_refuses_a_port_in_use_in_one_line() -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        with pytest.raises(UsageError) as e:
            Exporter.open(opts(f"metrics_listen=127.0.0.1:{port}"))
    assert str(e.value) == (
        f"metrics_listen=127.0.0.1:{port}: cannot listen: Address already in use"
    )


def test_open_binds_the_port_before_anything_runs_and_close_releases_it() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    exporter = Exporter.open(opts(f"metrics_listen=127.0.0.1:{port}"))
    assert exporter is not None and exporter.listener is not None
    assert exporter.listener.getsockname() == ("127.0.0.1", port)
    with pytest.raises(UsageError):
        Exporter.open(opts(f"metrics_listen=127.0.0.1:{port}"))
    exporter.close()
    exporter.close()  # idempotent
    again = Exporter.open(opts(f"metrics_listen=127.0.0.1:{port}"))
    assert again is not None
    again.close()


async def test_an_empty_host_listens_on_every_address() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    exporter = Exporter.open(opts(f"metrics_listen=:{port}"))
    assert exporter is not None and exporter.listener is not None
    try:
        host = exporter.listener.getsockname()[0]
        assert host in ("::", "0.0.0.0")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(exporter.run, recorder(DebugRing(8)))
            code, _, _ = await request(port, get("/metrics"))  # reached through 127.0.0.1
            assert code == 200
            nursery.cancel_scope.cancel()
    finally:
        exporter.close()


async def test_run_writes_at_start_and_every_interval_and_removes_its_file_when_cancelled(
    tmp_path: Path,
) -> None:
    ring = DebugRing(8)
    rec = recorder(ring, source="sim")
    exporter = Exporter.open(opts(f"prom={tmp_path}", "prom_interval=0.1"))
    assert exporter is not None and exporter.prom == f"{tmp_path}/nvmefs.prom"
    exporter.attach(ring)
    path = tmp_path / "nvmefs.prom"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(exporter.run, rec)
        await trio.sleep(0.05)
        assert value(samples(path.read_text()), "nvmefs_ring_appended_total") == 0
        ring.append(HostEvent(events.NOTICE, "x"))
        await trio.sleep(0.15)
        got = samples(path.read_text())
        assert value(got, "nvmefs_ring_appended_total") == 1
        assert value(got, "nvmefs_host_events_total", kind="notice") == 1
        nursery.cancel_scope.cancel()
    assert os.listdir(tmp_path) == []  # a daemon that stopped exports nothing stale
    exporter.close()


async def test_close_leaves_the_prom_file_and_run_leaves_one_it_did_not_write(
    tmp_path: Path,
) -> None:
    rec = recorder(DebugRing(8))
    exporter = Exporter.open(opts(f"prom={tmp_path}"))
    assert exporter is not None
    exporter.write_prom(rec)
    exporter.close()  # the parent's copy after the fork: the daemon goes on with the file
    assert (tmp_path / "nvmefs.prom").exists()
    write_atomically(SafeDir.open(str(tmp_path)), "nvmefs.prom", b"# another writer's file\n")
    exporter.remove_prom()
    assert (tmp_path / "nvmefs.prom").read_text() == "# another writer's file\n"


def test_a_failing_write_is_noted_once_in_the_ring_and_recovers(tmp_path: Path) -> None:
    ring = DebugRing(8)
    rec = recorder(ring)
    exporter = Exporter(Metrics(), prom=str(tmp_path / "gone" / "nvmefs.prom"))
    assert not exporter.write_prom(rec)
    assert not exporter.write_prom(rec)
    notes = [e[3] for e in ring]
    assert len(notes) == 1 and notes[0].kind == events.HOST_ERROR
    assert "cannot write" in notes[0].message
    (tmp_path / "gone").mkdir()
    assert exporter.write_prom(rec)
    assert (tmp_path / "gone" / "nvmefs.prom").exists()


# -- HTTP ---------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(rec: Recorder, **kw: object) -> AsyncIterator[int]:
    """An exporter serving HTTP for `rec` on a free port of 127.0.0.1; yields the port."""
    exporter = Exporter(Metrics(), listener=socket.create_server(("127.0.0.1", 0)))
    assert exporter.listener is not None
    port: int = exporter.listener.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(exporter.run, rec)
        yield port
        nursery.cancel_scope.cancel()
    exporter.close()


async def request(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `raw`, read the whole response: (status code, headers, body)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(raw)
        data = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some():
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    line, *fields = head.decode().split("\r\n")
    headers = {k.lower(): v for k, _, v in (f.partition(": ") for f in fields)}
    return int(line.split()[1]), headers, body


def get(path: str, *headers: str) -> bytes:
    return "\r\n".join([f"GET {path} HTTP/1.1", "Host: x", *headers, "", ""]).encode()


async def test_get_metrics_answers_the_text_format_and_other_paths_404() -> None:
    ring = DebugRing(8)
    rec = recorder(ring, source="sim")
    async with serving(rec) as port:
        code, headers, body = await request(port, get("/metrics"))
        assert code == 200
        assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert int(headers["content-length"]) == len(body)
        assert value(samples(body), "nvmefs_ring_capacity", source="sim") == 8
        code, _, body = await request(port, get("/metrics?name[]=x"))
        assert code == 200 and b"nvmefs_info" in body
        for path in ("/", "/metrics/", "/metricsx", "/stats"):
            code, _, _ = await request(port, get(path))
            assert code == 404, path
        code, headers, body = await request(port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
        assert code == 200 and body == b"" and int(headers["content-length"]) > 100
        code, headers, _ = await request(port, b"POST /metrics HTTP/1.1\r\n\r\n")
        assert code == 405 and headers["allow"] == "GET, HEAD"
        assert (await request(port, b"hello\r\n\r\n"))[0] == 400
        assert (await request(port, b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 2000))[0] == 431


async def test_a_client_that_asks_for_openmetrics_gets_it() -> None:
    rec = recorder(DebugRing(8), source="sim")
    accept = "Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    async with serving(rec) as port:
        code, headers, body = await request(port, get("/metrics", accept))
    assert code == 200 and headers["content-type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n") and b"nvmefs_ring_appended_total" in body


async def closed_by_server(stream: trio.SocketStream, within: float) -> bytes:
    """What the server sent before closing `stream`, which it must do within `within` s."""
    data = b""
    with trio.fail_after(within):
        while chunk := await stream.receive_some():
            data += chunk
    return data


def server_sockets(port: int) -> int:
    """The sockets of this process (the test's and the server's) connected from `port`."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if int(local.split(":")[1], 16) == port and state != "0A":  # not the listener
            inodes.add(inode)
    mine = {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if fd.isdigit() and os.path.exists(f"/proc/self/fd/{fd}")}  # fmt: skip
    return len({f"socket:[{i}]" for i in inodes} & mine)


async def test_a_scrape_is_answered_at_once_whatever_number_of_idle_clients() -> None:
    # Idle clients once held every slot for seconds each: 100 of them kept the scrape out of
    # the accept backlog for about a minute. Now the oldest waiting one makes room.
    rec = recorder(DebugRing(8))
    async with serving(rec) as port:
        idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(100)]
        start = trio.current_time()
        with trio.fail_after(2):
            code, _, body = await request(port, get("/metrics"))
        assert code == 200 and b"nvmefs_info" in body
        assert trio.current_time() - start < 1
        await trio.sleep(0.2)  # the dropped ones closed by now
        # The server holds at most MAX_WAITING of them, whatever the number of clients.
        assert server_sockets(port) <= m.MAX_WAITING
        for s in idle:
            await s.aclose()


async def test_the_oldest_client_still_waiting_for_its_request_is_dropped_for_a_new_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(m, "MAX_WAITING", 2)
    rec = recorder(DebugRing(8))
    async with serving(rec) as port:
        first = await trio.open_tcp_stream("127.0.0.1", port)
        await first.send_all(b"GET /metr")  # and nothing more
        second = await trio.open_tcp_stream("127.0.0.1", port)
        await trio.sleep(0.1)
        third = await trio.open_tcp_stream("127.0.0.1", port)
        assert await closed_by_server(first, 1) == b""  # unanswered
        with trio.move_on_after(0.3):
            await second.receive_some()
            raise AssertionError("the second was dropped too")
        # The second one is still served when its request comes, and the third too.
        await second.send_all(get("/metrics"))
        await third.send_all(get("/metrics"))
        for s in (second, third):
            assert (await closed_by_server(s, 2)).startswith(b"HTTP/1.1 200 OK\r\n")
            await s.aclose()
        await first.aclose()


async def test_a_request_head_not_done_in_time_is_dropped_however_slowly_it_trickles(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(m, "HEAD_TIMEOUT_S", 0.5)
    rec = recorder(DebugRing(8))
    async with serving(rec) as port:
        slow = await trio.open_tcp_stream("127.0.0.1", port)
        start = trio.current_time()
        # A byte every 20 ms: 2.6 s for the whole head, were it not dropped.
        with trio.fail_after(2), contextlib.suppress(trio.BrokenResourceError):
            for byte in get("/metrics", "X-Slow: " + "x" * 100):
                await slow.send_all(bytes([byte]))  # fails once the server has closed
                await trio.sleep(0.02)
            raise AssertionError("not dropped")
        assert 0.5 <= trio.current_time() - start < 1
        await slow.aclose()


async def test_a_client_that_does_not_read_its_answer_makes_room_for_a_new_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # It is held only until the bound of connections being answered is reached: then the
    # oldest of them is dropped (its answer was sent by then, or never will be).
    monkeypatch.setattr(m, "MAX_ANSWERING", 1)
    monkeypatch.setattr(m, "LINGER_S", 30.0)
    rec = recorder(DebugRing(8))
    async with serving(rec) as port:
        deaf = await trio.open_tcp_stream("127.0.0.1", port)
        await deaf.send_all(get("/metrics"))  # and reads nothing, and does not close
        await trio.sleep(0.2)
        with trio.fail_after(1):
            code, _, _ = await request(port, get("/metrics"))
        assert code == 200
        answer = await closed_by_server(deaf, 1)  # the answer, whole, then the end
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert f"Content-Length: {len(body)}".encode() in head
        await deaf.aclose()


async def test_an_answer_not_taken_in_time_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(m, "ANSWER_TIMEOUT_S", 0.5)
    monkeypatch.setattr(m, "LINGER_S", 30.0)
    rec = recorder(DebugRing(8))
    async with serving(rec) as port:
        deaf = await trio.open_tcp_stream("127.0.0.1", port)
        await deaf.send_all(get("/metrics"))
        await trio.sleep(0.8)
        assert (await closed_by_server(deaf, 0.5)).startswith(b"HTTP/1.1 200 OK\r\n")
        await deaf.aclose()


@pytest.mark.parametrize(
    ("head", "parsed"),
    [
        (b"GET /metrics HTTP/1.1\r\nAccept: a/b\r\n\r\n", ("GET", "/metrics", {"accept": "a/b"})),
        (b"GET /metrics?x HTTP/1.0\n\n", ("GET", "/metrics", {})),
        (b"GET /metrics\r\n\r\n", None),  # HTTP/0.9
        (b"GET  /metrics HTTP/1.1\r\n\r\n", None),
        (b"GET /metrics HTTP/1.1\r\nno colon\r\n\r\n", None),
        (b"GET /metrics HTTP/1.1\r\n folded: x\r\n\r\n", None),
    ],
)
def test_parse_head(head: bytes, parsed: tuple[str, str, dict[str, str]] | None) -> None:
    r = parse_head(head)
    assert (None if r is None else (r.method, r.path, r.headers)) == parsed


async def test_stats_and_the_metrics_read_one_counter_table() -> None:
    import dataclasses

    from nvmefs.engine.sink import COUNTERS, Stats

    plain = {f.name for f in dataclasses.fields(Stats) if f.type in ("int", int)}
    assert {c.field for c in COUNTERS} == plain - {"latency_ns_total", "latency_ns_max"}
    async with sim_engine(PLAN, log="all") as (engine, _sim, ring):
        await engine.submit_batch([c.read(1, lba, 8, 512) for lba in (0, 2048)])
        rec = Recorder(ring, Renderer(), engine=engine)
        shown = dict(line.split(" ", 1) for line in rec.stats_text().splitlines())
        got = samples(Metrics().exposition(rec))
        for counter in COUNTERS:
            want = getattr(engine.stats, counter.field)
            assert int(shown[counter.field]) == want
            assert value(got, counter.metric, source=rec.source) == want


@pytest.mark.parametrize(
    "accept",
    [
        "application/openmetrics-text; version=a",
        "application/openmetrics-text; version=1.a",
        "text/plain; version=a",
        "application/openmetrics-text; version=" + "9" * 5000,
    ],
)
async def test_an_accept_header_prometheus_client_cannot_read_gets_the_text_format(
    accept: str,
) -> None:
    # Once a TypeError inside prometheus_client that ended the daemon (a hostile user's finding).
    rec = recorder(DebugRing(8), source="sim")
    async with serving(rec) as port:
        code, headers, body = await request(port, get("/metrics", f"Accept: {accept}"))
        assert code == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
        assert b"nvmefs_info" in body
        code, _, _ = await request(port, get("/metrics"))  # and the server is still there
        assert code == 200


async def test_a_bug_answering_one_request_ends_neither_the_server_nor_the_daemon(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rec = recorder(DebugRing(8), source="sim")
    exporter = Exporter(Metrics(), listener=socket.create_server(("127.0.0.1", 0)))
    assert exporter.listener is not None
    port: int = exporter.listener.getsockname()[1]
    calls = 0

    def encode(recorder: Recorder, accept: str) -> tuple[bytes, str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug of ours")
        return b"ok 1\n", "text/plain"

    monkeypatch.setattr(exporter.metrics, "encode", encode)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(exporter.run, rec)
        with pytest.raises((trio.BrokenResourceError, ValueError, IndexError)):
            await request(port, get("/metrics"))  # closed without an answer
        code, _, body = await request(port, get("/metrics", "Accept: x/y"))
        assert (code, body, exporter.failed_requests) == (200, b"ok 1\n", 1)
        nursery.cancel_scope.cancel()
    exporter.close()


async def test_a_request_flood_renders_the_exposition_once_a_second() -> None:
    rec = recorder(DebugRing(8), source="sim")
    exporter = Exporter(Metrics(), listener=socket.create_server(("127.0.0.1", 0)))
    renders = 0
    real = exporter.metrics.encode

    def counting(recorder: Recorder, accept: str) -> tuple[bytes, str]:
        nonlocal renders
        renders += 1
        return real(recorder, accept)

    exporter.metrics.encode = counting  # type: ignore[method-assign]
    assert exporter.listener is not None
    port: int = exporter.listener.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(exporter.run, rec)
        for _ in range(50):
            code, _, _ = await request(port, get("/metrics"))
            assert code == 200
        nursery.cancel_scope.cancel()
    exporter.close()
    assert renders <= 3  # 50 requests within a second or two
