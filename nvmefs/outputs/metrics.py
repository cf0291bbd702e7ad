"""Prometheus metrics: the mount's nvmefs.prom, `-o prom=PATH` and `-o metrics_listen=ADDR:PORT`.

Theory of operation
- One `Metrics` per daemon holds what the recorder does not: host events counted by kind. It
  subscribes to the ring in `attach()`, before this run's start entry. Entries replayed from
  the journal are not counted (whether the journal replays them before the attach or after):
  the daemon that recorded them counted them, and counting them again would look like new
  events to Prometheus's increase() after every restart. The append callback does O(1) work
  per entry: it looks at the entries after the last one it looked at.
- Everything else is read from the recorder when the exposition is made, so a scrape sees the
  counters as they are at that moment: `Metrics.families()` turns the ring, the engine's Stats,
  the workload's Progress and the last SMART polls into metric families; a `RecorderCollector`
  in a fresh `CollectorRegistry` hands them to prometheus_client, which writes the exposition
  (nothing here formats a sample line).
- `Exporter` is the output behind the two options. `open()` checks everything before the daemon
  forks (the prom directory is there and takes a new file; the listening socket is bound, so a
  port in use is one line and exit 2); `run()` writes the prom file at start and every
  prom_interval seconds (temporary file in the same directory, then rename: node_exporter never
  reads half a file) and serves HTTP; `close()` closes the socket.
- The prom file is removed when run() ends (the daemon stopped cleanly): metrics that vanish
  say "nvmefs is not running" (absent() alerts), where a file left behind would go on exporting
  the last values as if they were live. A daemon that was killed leaves it; its age shows in
  node_exporter's node_textfile_mtime_seconds. close() never removes it: the parent closes its
  copy of the output after the fork while the daemon goes on writing.
- The HTTP server is a trio accept loop on the socket open() bound, with no threads. It answers
  GET and HEAD of /metrics (any query string ignored) and 404 for any other path, one request per
  connection (Connection: close). Slow or hostile clients cost bounded memory and time: a
  request head over MAX_HEAD bytes is refused, a connection that is not done within
  CONNECTION_TIMEOUT_S seconds is dropped, and at most MAX_CONNECTIONS are served at once (the
  next wait in the kernel's accept backlog, not in the daemon).

Every series carries a `source` label (the daemon's SOURCE): two daemons writing their files into
one node_exporter textfile directory then never export the same series twice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)

from nvmefs import __version__
from nvmefs.engine.base import EngineBase
from nvmefs.engine.kernel import KernelEngine
from nvmefs.errors import UsageError
from nvmefs.linux import devices
from nvmefs.options import Parsed
from nvmefs.recorder import Recorder
from nvmefs.store import events
from nvmefs.store.events import HostEvent
from nvmefs.store.ring import EVENT, DebugRing

log = logging.getLogger("nvmefs.metrics")

# Every kind of host event, so each has a series (at 0) from the start: increase() over a series
# ignores its first sample, so a kind that appeared only with its first event would not alert.
HOST_KINDS = (
    events.START,
    events.HOST_ERROR,
    events.TIMEOUT,
    events.ABORT,
    events.RESET,
    events.NOTICE,
    events.LOST,
)
# Absolute zero: SMART reports kelvin, Prometheus's convention is celsius.
ZERO_CELSIUS_K = 273.15
# How often the exposition may look in sysfs for the serial and model of a controller the engine
# does not identify itself (the kernel source watches many): opening nvmefs.prom in a loop must
# stay cheap while a controller is gone.
SYSFS_RETRY_S = 10.0

# The HTTP server's bounds (see the module docstring).
MAX_HEAD = 8192
CONNECTION_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 16
# After the response, what the client still sends is read (and thrown away) for this long before
# the socket closes: closing with unread data resets the connection, which can destroy the
# response in flight.
LINGER_S = 1.0
LINGER_BYTES = 64 << 10
# The pause after accept() failed for want of descriptors or memory, before trying again.
ACCEPT_RETRY_S = 0.1
# The mode of the prom file: node_exporter runs as its own user and must be able to read it.
PROM_MODE = 0o644


class Metrics:
    """The metric state of one daemon, and its exposition.

    Invariant: once attached to a ring, `host_events[kind]` is the number of HostEvent entries
    of that kind appended to that ring after `attach()` and not replayed from a journal, and
    `_seen` is the sequence number of the newest entry looked at (every entry after the attach
    and up to it has been looked at exactly once).
    """

    def __init__(self) -> None:
        self.host_events: Counter[str] = Counter(dict.fromkeys(HOST_KINDS, 0))
        self.ring: DebugRing | None = None
        self._seen = 0
        # Controller name -> (serial, model) from sysfs, for controllers the engine does not
        # identify itself; only found ones are kept (a controller may appear later).
        self._identities: dict[str, tuple[str, str]] = {}
        self._sysfs_at: float | None = None  # monotonic time sysfs was last looked at

    def attach(self, ring: DebugRing) -> None:
        """Count the host events appended to `ring` from now on. Attaching again to the same
        ring changes nothing (the daemon's outputs and the FUSE layer may both ask)."""
        if self.ring is ring:
            return
        if self.ring is not None:
            raise ValueError("Metrics is attached to another ring already")
        self.ring = ring
        self._seen = ring.last_seq
        ring.subscribe(self._on_append)

    def _on_append(self) -> None:
        # Called after every append, on the completion path: only the new entries are looked
        # at (one, unless another listener appended from its own callback).
        assert self.ring is not None
        _, entries = self.ring.read_after(self._seen)
        for entry in entries:
            ev = entry[EVENT]
            if isinstance(ev, HostEvent) and not ev.replayed:
                self.host_events[ev.kind] += 1
        self._seen = self.ring.last_seq

    # -- the exposition ------------------------------------------------------------------------

    def registry(self, recorder: Recorder) -> CollectorRegistry:
        """A fresh registry whose one collector reads `recorder` (and this object) when it is
        collected."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(RecorderCollector(self, recorder))
        return registry

    def exposition(self, recorder: Recorder) -> bytes:
        """The Prometheus text format (0.0.4) of the metrics now: what nvmefs.prom holds."""
        return generate_latest(self.registry(recorder))

    def encode(self, recorder: Recorder, accept: str) -> tuple[bytes, str]:
        """The metrics in the format an HTTP Accept header asks for, and its content type
        (the text format 0.0.4 unless the client prefers OpenMetrics)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry(recorder)), content_type

    def families(self, recorder: Recorder) -> Iterator[Metric]:
        """Every metric family of the daemon behind `recorder`, as it is now."""
        source = recorder.source
        engine = recorder.engine
        info = InfoMetricFamily("nvmefs", "The nvmefs daemon: its version, SOURCE and profile.")
        info.add_metric(
            [],
            {
                "source": source,
                "version": __version__,
                "profile": engine.translator.profile if engine is not None else "",
            },
        )
        yield info
        yield from self._ring_families(recorder)
        kinds = CounterMetricFamily(
            "nvmefs_host_events_total",
            "Host events appended to the ring by kind (start, host-error, timeout, abort, "
            "reset, notice, lost), counted since the daemon started.",
            labels=["source", "kind"],
        )
        for kind, n in sorted(self.host_events.items()):
            kinds.add_metric([source, kind], n)
        yield kinds
        if engine is not None:
            yield from self._engine_families(recorder, engine)
        yield from self._health_families(recorder)
        yield from self._workload_families(recorder)

    @staticmethod
    def _ring_families(recorder: Recorder) -> Iterator[Metric]:
        ring, labels = recorder.ring, [recorder.source]
        for name, doc, value in (
            ("nvmefs_ring_capacity", "Entries the ring holds at most.", ring.capacity),
            ("nvmefs_ring_entries", "Entries the ring holds now.", ring.retained),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=["source"])
            gauge.add_metric(labels, value)
            yield gauge
        for name, doc, value in (
            ("nvmefs_ring_appended_total", "Entries appended to the ring.", ring.appended),
            (
                "nvmefs_ring_dropped_total",
                "Entries overwritten by newer ones once the ring was full.",
                ring.dropped,
            ),
            (
                "nvmefs_ring_cleared_total",
                "Entries removed by the control file's clear.",
                ring.cleared,
            ),
        ):
            counter = CounterMetricFamily(name, doc, labels=["source"])
            counter.add_metric(labels, value)
            yield counter

    def _engine_families(self, recorder: Recorder, engine: EngineBase) -> Iterator[Metric]:
        s, labels = engine.stats, [recorder.source]
        for name, doc, value in (
            (
                "nvmefs_completions_total",
                "Command attempts that completed with an NVMe status, success or not.",
                s.completions,
            ),
            (
                "nvmefs_completion_errors_total",
                "Command attempts that completed with a failing NVMe status, retried or not.",
                s.errors,
            ),
            ("nvmefs_retries_total", "Command attempts that were retried.", s.retries),
            ("nvmefs_logged_total", "Completions the log policy wrote to the ring.", s.logged),
            ("nvmefs_timeouts_total", "Commands that timed out.", s.timeouts),
            ("nvmefs_aborts_total", "Commands that were aborted.", s.aborts),
            ("nvmefs_resets_total", "Commands that ended in a controller reset.", s.resets),
            (
                "nvmefs_host_errors_total",
                "Commands that ended without an NVMe status (the host gave up on them).",
                s.host_errors,
            ),
            (
                "nvmefs_protocol_errors_total",
                "Completions that broke the NVMe protocol (register-level engine).",
                s.protocol_errors,
            ),
        ):
            counter = CounterMetricFamily(name, doc, labels=["source"])
            counter.add_metric(labels, value)
            yield counter
        errors = CounterMetricFamily(
            "nvmefs_errors_total",
            "Commands that ended with a failing NVMe status (after their retries), logged or "
            "not, by controller, namespace and status word.",
            labels=["source", "ctrl", "serial", "model", "nsid", "status", "name", "blk_status"],
        )
        decode = engine.translator.decode
        for (ctrl, nsid, word), n in sorted(s.failed.items(), key=lambda kv: str(kv[0])):
            serial, model = self._identity(recorder, ctrl)
            st = decode(word)
            nsid_label = "" if nsid is None else str(nsid)
            errors.add_metric(
                [recorder.source, ctrl, serial, model, nsid_label, f"0x{word:x}", st.name,
                 st.blk_status],
                n,
            )  # fmt: skip
        yield errors
        if isinstance(engine, KernelEngine):
            lost = CounterMetricFamily(
                "nvmefs_kernel_lost_events_total",
                "Trace events the kernel dropped before nvmefs read them (its buffer was "
                "full): errors among them are in no other metric.",
                labels=["source"],
            )
            lost.add_metric(labels, engine.lost_events)
            yield lost

    def _identity(self, recorder: Recorder, ctrl: str) -> tuple[str, str]:
        """(serial, model) of controller `ctrl`: from its last health poll, from the engine
        when it is the engine's own controller, else from sysfs; ("", "") when unknown."""
        health = recorder.progress.health.get(ctrl)
        if health is not None:
            return health.serial, health.model
        engine = recorder.engine
        if engine is not None and ctrl == engine.ctrl_name:
            return engine.serial, engine.model
        found = self._identities.get(ctrl)
        now = time.monotonic()
        if found is None and (self._sysfs_at is None or now - self._sysfs_at >= SYSFS_RETRY_S):
            self._sysfs_at = now
            for c in devices.controllers():
                if c.serial:
                    self._identities[c.name] = (c.serial, c.model)
            found = self._identities.get(ctrl)
        return found or ("", "")

    @staticmethod
    def _health_families(recorder: Recorder) -> Iterator[Metric]:
        names = ["source", "ctrl", "serial", "model"]
        media = CounterMetricFamily(
            "nvmefs_smart_media_errors_total",
            "SMART Media and Data Integrity Errors: the controller's lifetime count of "
            "unrecovered data integrity errors, as its last health poll said.",
            labels=names,
        )
        warning = GaugeMetricFamily(
            "nvmefs_smart_critical_warning",
            "SMART Critical Warning bits at the last health poll (0: none; 0x1 spare, 0x2 "
            "temperature, 0x4 reliability, 0x8 read-only, 0x10 volatile backup, 0x20 PMR).",
            labels=names,
        )
        used = GaugeMetricFamily(
            "nvmefs_smart_percentage_used_ratio",
            "SMART Percentage Used as a ratio: 1 is the rated endurance used (it may exceed 1).",
            labels=names,
        )
        temperature = GaugeMetricFamily(
            "nvmefs_smart_temperature_celsius",
            "SMART Composite Temperature at the last health poll (absent when not reported).",
            labels=names,
        )
        polled = GaugeMetricFamily(
            "nvmefs_smart_last_poll_timestamp_seconds",
            "Wall-clock time of the last SMART health poll, in seconds since the epoch.",
            labels=names,
        )
        for ctrl, h in sorted(recorder.progress.health.items()):
            values = [recorder.source, ctrl, h.serial, h.model]
            media.add_metric(values, h.media_errors)
            warning.add_metric(values, h.critical_warning)
            used.add_metric(values, h.percentage_used / 100)
            if h.temperature_k:
                temperature.add_metric(values, round(h.temperature_k - ZERO_CELSIUS_K, 2))
            polled.add_metric(values, h.polled_at)
        yield from (media, warning, used, temperature, polled)

    @staticmethod
    def _workload_families(recorder: Recorder) -> Iterator[Metric]:
        p, labels = recorder.progress, [recorder.source]
        for name, doc, value in (
            ("nvmefs_workload_commands_total", "Commands the workload completed.", p.commands),
            (
                "nvmefs_workload_failed_commands_total",
                "Commands of the workload that failed (an error status or no status).",
                p.failed,
            ),
            (
                "nvmefs_workload_bytes_total",
                "Bytes the workload's commands covered (read or verified).",
                p.bytes_done,
            ),
        ):
            counter = CounterMetricFamily(name, doc, labels=["source"])
            counter.add_metric(labels, value)
            yield counter
        if p.workload != "scrub" and not p.passes_done:
            return  # no scrub in this daemon: no scrub metrics
        ratio = GaugeMetricFamily(
            "nvmefs_scrub_pass_ratio",
            "How much of the current (or last) scrub pass is done, 0 to 1.",
            labels=["source"],
        )
        ratio.add_metric(labels, p.pass_ratio)
        passes = CounterMetricFamily(
            "nvmefs_scrub_passes_total", "Scrub passes completed.", labels=["source"]
        )
        passes.add_metric(labels, p.passes_done)
        yield from (ratio, passes)
        if p.last_pass_end:
            end = GaugeMetricFamily(
                "nvmefs_scrub_last_pass_end_timestamp_seconds",
                "Wall-clock time the last completed scrub pass ended, in seconds since the epoch.",
                labels=["source"],
            )
            end.add_metric(labels, p.last_pass_end)
            yield end


class RecorderCollector:
    """A prometheus_client collector over one recorder: each collect() reads it anew."""

    def __init__(self, metrics: Metrics, recorder: Recorder) -> None:
        self.metrics = metrics
        self.recorder = recorder

    def collect(self) -> Iterable[Metric]:
        return self.metrics.families(self.recorder)


# -- the output ---------------------------------------------------------------------------------


def _shown_listen(host: str, port: int) -> str:
    """ADDR:PORT as the option is written: [v6]:PORT, and :PORT for every address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_prom(path: str) -> None:
    """UsageError unless a prom file can be written at `path` (as run() writes it)."""
    where = os.path.dirname(path) or "."
    if not os.path.exists(where):
        raise UsageError(f"prom={path}: directory {where} does not exist")
    if not os.path.isdir(where):
        raise UsageError(f"prom={path}: {where} is not a directory")
    if os.path.isdir(path):
        raise UsageError(f"prom={path}: is a directory")
    try:  # what run() does, so a read-only filesystem or an ACL is found now, not later
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=where)
    except OSError as e:
        raise UsageError(f"prom={path}: cannot write in {where}: {e.strerror}") from None
    os.close(fd)
    os.unlink(tmp)


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port ("" every address, IPv6 too where there is IPv6);
    UsageError in one line if it cannot be had."""
    shown = _shown_listen(host, port)
    try:
        if not host:
            if socket.has_dualstack_ipv6():
                return socket.create_server(
                    ("", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=128
                )
            return socket.create_server(("", port), backlog=128)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        return socket.create_server(address[:2], family=family, backlog=128)
    except socket.gaierror as e:
        raise UsageError(f"metrics_listen={shown}: cannot resolve {host}: {e.strerror}") from None
    except OSError as e:
        # create_server's strerror says the address again, in Python's syntax: not ours.
        why = os.strerror(e.errno) if e.errno else str(e)
        raise UsageError(f"metrics_listen={shown}: cannot listen: {why}") from None


class Exporter:
    """The prom file and the HTTP listener the options asked for (one of them at least).

    Invariant: `listener` is the socket open() bound, until close(); `_written` is the
    (device, inode) of the last prom file this process wrote and has not removed, so that run()
    removes only its own file.
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        prom: str | None = None,
        interval: float = 15.0,
        listener: socket.socket | None = None,
    ) -> None:
        self.metrics = metrics
        self.prom = prom
        self.interval = interval
        self.listener = listener
        self._written: tuple[int, int] | None = None
        self._failing = False  # the last write of the prom file failed
        self._slots = trio.Semaphore(MAX_CONNECTIONS)

    @classmethod
    def open(cls, opts: Parsed, metrics: Metrics | None = None) -> Exporter | None:
        """The exporter of `-o prom=` and `-o metrics_listen=`, checked and bound; None when
        neither was given. `metrics` is the daemon's (a new one when None)."""
        prom: str | None = opts["prom"]
        listen: tuple[str, int] | None = opts["metrics_listen"]
        if prom is None and listen is None:
            return None
        if prom is not None:
            _check_prom(prom)
        listener = _bind(*listen) if listen is not None else None
        return cls(
            metrics or Metrics(), prom=prom, interval=opts["prom_interval"], listener=listener
        )

    def attach(self, ring: DebugRing) -> None:
        self.metrics.attach(ring)

    def close(self) -> None:
        """Close the listening socket (idempotent). The prom file stays: see run()."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    async def run(self, recorder: Recorder) -> None:
        """Write the prom file now and every `interval` seconds, and serve HTTP, until
        cancelled; then remove the prom file this process wrote last."""
        try:
            async with trio.open_nursery() as nursery:
                if self.listener is not None:
                    nursery.start_soon(self.serve, recorder)
                if self.prom is not None:
                    nursery.start_soon(self._write_every_interval, recorder)
        finally:
            self.remove_prom()

    # -- the prom file -------------------------------------------------------------------------

    async def _write_every_interval(self, recorder: Recorder) -> None:
        while True:
            self.write_prom(recorder)
            await trio.sleep(self.interval)

    def write_prom(self, recorder: Recorder) -> bool:
        """Replace the prom file with the metrics now, atomically; False (logged, and noted in
        the ring when it starts failing) if it cannot be written."""
        assert self.prom is not None
        try:
            self._written = write_atomically(self.prom, self.metrics.exposition(recorder))
        except OSError as e:
            if not self._failing:
                self._failing = True
                message = f"prom={self.prom}: cannot write: {e.strerror or e}"
                log.warning("%s", message)
                recorder.ring.append(HostEvent(events.HOST_ERROR, message))
            return False
        if self._failing:
            self._failing = False
            log.info("prom=%s: written again", self.prom)
        return True

    def remove_prom(self) -> None:
        """Remove the prom file if it is still the one this process wrote last."""
        if self.prom is None or self._written is None:
            return
        with contextlib.suppress(OSError):
            st = os.stat(self.prom)
            if (st.st_dev, st.st_ino) == self._written:
                os.unlink(self.prom)
        self._written = None

    # -- HTTP ----------------------------------------------------------------------------------

    async def serve(self, recorder: Recorder) -> None:
        """Accept connections on the listener until cancelled, MAX_CONNECTIONS at a time."""
        assert self.listener is not None
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(self.listener))
        async with trio.open_nursery() as nursery:
            while True:
                await self._slots.acquire()
                try:
                    stream = await listener.accept()
                except OSError as e:  # out of descriptors or memory: not the listener's fault
                    self._slots.release()
                    log.warning("metrics: accept failed: %s", e.strerror or e)
                    await trio.sleep(ACCEPT_RETRY_S)
                    continue
                except BaseException:
                    self._slots.release()
                    raise
                nursery.start_soon(self._connection, stream, recorder)

    async def _connection(self, stream: trio.SocketStream, recorder: Recorder) -> None:
        try:
            # A client that went away is owed no answer.
            gone = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
            with trio.move_on_after(CONNECTION_TIMEOUT_S), contextlib.suppress(*gone):
                await self._exchange(stream, recorder)
        finally:
            self._slots.release()
            await trio.aclose_forcefully(stream)

    async def _exchange(self, stream: trio.SocketStream, recorder: Recorder) -> None:
        head = bytearray()
        while b"\r\n\r\n" not in head and b"\n\n" not in head:
            if len(head) >= MAX_HEAD:
                await _respond(stream, 431, "request head over 8 KiB\n")
                await _linger(stream)
                return
            chunk = await stream.receive_some(MAX_HEAD - len(head))
            if not chunk:
                return  # closed before a whole request: nothing to answer
            head += chunk
        request = parse_head(bytes(head))
        if request is None:
            await _respond(stream, 400, "not an HTTP/1.x request\n")
        elif request.method not in ("GET", "HEAD"):
            await _respond(stream, 405, "only GET and HEAD\n", [("Allow", "GET, HEAD")])
        elif request.path != "/metrics":
            await _respond(stream, 404, "not found: the metrics are at /metrics\n",
                           head_only=request.method == "HEAD")  # fmt: skip
        else:
            body, content_type = self.metrics.encode(recorder, request.headers.get("accept", ""))
            await _respond(stream, 200, body, [("Content-Type", content_type)],
                           head_only=request.method == "HEAD")  # fmt: skip
        await _linger(stream)


class Request:
    """The parts of an HTTP/1.x request head the server looks at. Header names are lower case;
    of a repeated header the last one counts."""

    def __init__(self, method: str, path: str, headers: dict[str, str]) -> None:
        self.method = method
        self.path = path
        self.headers = headers


def parse_head(head: bytes) -> Request | None:
    """The request line and headers of `head` (up to the blank line); None if it is not an
    HTTP/1.x request."""
    text = head.decode("latin-1").replace("\r\n", "\n").split("\n\n", 1)[0]
    line, *rest = text.split("\n")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[0].isalpha():
        return None
    headers = {}
    for field in rest:
        name, colon, value = field.partition(":")
        if not colon or not name or name != name.strip():
            return None
        headers[name.lower()] = value.strip()
    return Request(parts[0], parts[1].split("?", 1)[0], headers)


REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
}


async def _respond(
    stream: trio.SocketStream,
    code: int,
    body: bytes | str,
    headers: list[tuple[str, str]] | None = None,
    *,
    head_only: bool = False,
) -> None:
    data = body.encode() if isinstance(body, str) else body
    fields = headers or [("Content-Type", "text/plain; charset=utf-8")]
    fields = [*fields, ("Content-Length", str(len(data))), ("Connection", "close")]
    lines = [f"HTTP/1.1 {code} {REASONS[code]}"] + [f"{k}: {v}" for k, v in fields]
    await stream.send_all("\r\n".join(lines).encode() + b"\r\n\r\n" + (b"" if head_only else data))


async def _linger(stream: trio.SocketStream) -> None:
    """Say we are done sending, and read what the client still sends for a moment (bounded),
    so closing does not reset a connection whose response is still on its way."""
    with contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_eof()
        with trio.move_on_after(LINGER_S):
            got = 0
            while got < LINGER_BYTES:
                chunk = await stream.receive_some(LINGER_BYTES - got)
                if not chunk:
                    break
                got += len(chunk)


def write_atomically(path: str, data: bytes) -> tuple[int, int]:
    """Replace the file at `path` with `data`, readable by all: a temporary file in the same
    directory, renamed over it, so a reader sees the old file or the new one, never a part.
    Returns the new file's (device, inode). The temporary name does not end in .prom, so
    node_exporter never reads it; it is removed if anything fails."""
    where = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=where)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, PROM_MODE)  # mkstemp makes it 0600
            f.write(data)
            st = os.fstat(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return st.st_dev, st.st_ino
