"""Prometheus metrics: what nvmefs.prom, `-o prom=PATH` and `-o metrics_listen=` export.

Theory of operation
- One `Metrics` per daemon holds what the recorder does not: host events counted by kind. It
  subscribes to the ring in `attach()`, before this run's start entry. Entries replayed from
  the journal are not counted (whether the journal replays them before the attach or after):
  the daemon that recorded them counted them, and counting them again would look like new
  events to Prometheus's increase() after every restart. The append callback does O(1) work
  per entry: it takes the entries after its cursor.
- Everything else is read from the recorder when the exposition is made, so a scrape sees the
  counters as they are at that moment: `Metrics.families()` turns the ring, the engine's Stats
  (through the counter table engine.base.COUNTERS, which `stats` reads too), the workload's
  Progress and the last SMART polls into metric families; a `RecorderCollector` in a fresh
  `CollectorRegistry` hands them to prometheus_client, which writes the exposition (nothing
  here formats a sample line). No transport here: the prom file and HTTP are exporter.py's.

Every series carries a `source` label (the daemon's SOURCE): two daemons writing their files into
one node_exporter textfile directory then never export the same series twice.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)

from nvmefs import __version__
from nvmefs.engine.base import SourceBase
from nvmefs.engine.kernel import KernelEngine
from nvmefs.engine.sink import COUNTERS
from nvmefs.linux import devices
from nvmefs.outputs.journal import STATES as JOURNAL_STATES
from nvmefs.outputs.journal import Journal
from nvmefs.outputs.kmsg import KmsgOutput
from nvmefs.outputs.syslog import SyslogOutput
from nvmefs.recorder import Recorder
from nvmefs.store import events
from nvmefs.store.events import HostEvent
from nvmefs.store.ring import EVENT, Cursor, DebugRing

log = logging.getLogger("nvmefs.metrics")

# Absolute zero: SMART reports kelvin, Prometheus's convention is celsius.
ZERO_CELSIUS_K = 273.15
# How often the exposition may look in sysfs for the serial and model of a controller the engine
# does not identify itself (the kernel source watches many): opening nvmefs.prom in a loop must
# stay cheap while a controller is gone.
SYSFS_RETRY_S = 10.0


class Metrics:
    """The metric state of one daemon, and its exposition.

    Invariant: once attached to a ring, `host_events[kind]` is the number of HostEvent entries
    of that kind appended to that ring after `attach()` and not replayed from a journal, and
    `_seen` is the sequence number of the newest entry looked at (every entry after the attach
    and up to it has been looked at exactly once).
    """

    def __init__(self) -> None:
        # Every kind has a series (at 0) from the start: increase() ignores a series' first
        # sample, so a kind that appeared only with its first event would not alert.
        self.host_events: Counter[str] = Counter(dict.fromkeys(events.HOST_KINDS, 0))
        self.ring: DebugRing | None = None
        # The daemon's other outputs, whose counters are exported when they are configured
        # (Outputs.open sets them).
        self.journal: Journal | None = None
        self.syslog: SyslogOutput | None = None
        self.kmsg: KmsgOutput | None = None
        self._cursor: Cursor | None = None
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
        self._cursor = Cursor(ring)
        ring.subscribe(self._on_append)

    def _on_append(self) -> None:
        # Called after every append, on the completion path: a count per new entry, nothing
        # else (one entry, unless another listener appended from its own callback).
        assert self._cursor is not None
        _, entries = self._cursor.take()
        for entry in entries:
            ev = entry[EVENT]
            if isinstance(ev, HostEvent) and not ev.replayed:
                self.host_events[ev.kind] += 1

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
        try:
            encoder, content_type = choose_encoder(accept)
        except Exception:
            # prometheus_client trusts the header's version= too much (a TypeError on
            # `version=a`): a header it cannot read gets what a client without one gets.
            encoder, content_type = choose_encoder("")
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
        yield from self._output_families(recorder)

    @staticmethod
    def _ring_families(recorder: Recorder) -> Iterator[Metric]:
        ring, labels = recorder.ring, [recorder.source]
        for name, doc, value in (
            ("nvmefs_ring_capacity", "Entries the ring holds at most.", ring.capacity),
            ("nvmefs_ring_entries", "Entries the ring holds now.", ring.retained),
        ):
            yield single(GaugeMetricFamily, name, doc, labels, value)
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
            yield single(CounterMetricFamily, name, doc, labels, value)

    def _engine_families(self, recorder: Recorder, engine: SourceBase) -> Iterator[Metric]:
        s, labels = engine.stats, [recorder.source]
        for counter in COUNTERS:  # the counter table `stats` shows too
            value = getattr(s, counter.field)
            yield single(CounterMetricFamily, counter.metric, counter.help, labels, value)
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
            yield single(CounterMetricFamily, name, doc, labels, value)
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

    def _output_families(self, recorder: Recorder) -> Iterator[Metric]:
        """The counters of the journal and the syslog output, those that are configured: an
        output losing entries must be one an alert can see."""
        counters: list[tuple[str, str, int]] = []
        if (j := self.journal) is not None:
            counters += [
                ("nvmefs_journal_lines_total", "Entries written to the journal.", j.written),
                (
                    "nvmefs_journal_lost_entries_total",
                    "Entries the journal never wrote (a write failed, or the ring overwrote "
                    "them first).",
                    j.lost,
                ),
                (
                    "nvmefs_journal_errors_total",
                    "Writes and syncs of the journal that failed.",
                    j.errors,
                ),
                (
                    "nvmefs_journal_rotations_total",
                    "Times the journal's live file was rotated.",
                    j.rotations,
                ),
            ]
        if (s := self.syslog) is not None:
            counters += [
                (
                    "nvmefs_syslog_messages_sent_total",
                    "Entries sent to the syslog socket.",
                    s.sent,
                ),
                (
                    "nvmefs_syslog_dropped_entries_total",
                    "Entries never sent to the syslog socket (the ring overwrote them first, "
                    "or the socket refused the message).",
                    s.dropped,
                ),
                (
                    "nvmefs_syslog_errors_total",
                    "Sends and connects to the syslog socket that failed.",
                    s.errors,
                ),
                (
                    "nvmefs_syslog_reconnects_total",
                    "Times the syslog socket was connected again after it went away.",
                    s.reconnects,
                ),
            ]
        if (k := self.kmsg) is not None:
            counters += [
                ("nvmefs_kmsg_lines_total", "Entries mirrored to the kernel log.", k.written),
                (
                    "nvmefs_kmsg_dropped_entries_total",
                    "Entries not mirrored to the kernel log: over its rate limit (10 lines per "
                    "5 s unless printk.devkmsg=on), or all of them under printk.devkmsg=off.",
                    k.dropped,
                ),
            ]
        for name, doc, value in counters:
            yield single(CounterMetricFamily, name, doc, [recorder.source], value)
        if j is not None:
            state = GaugeMetricFamily(
                "nvmefs_journal_state",
                "1 for the journal's state now: writing, stalled (its writes fail: entries are "
                "being lost) or stopped.",
                labels=["source", "state"],
            )
            now, _why = j.current_state()
            for name in JOURNAL_STATES:
                state.add_metric([recorder.source, name], 1 if now == name else 0)
            yield state


def single(
    kind: type[CounterMetricFamily] | type[GaugeMetricFamily],
    name: str,
    doc: str,
    labels: list[str],
    value: float,
) -> Metric:
    """A family of one sample, labelled with the daemon's `source` only."""
    family = kind(name, doc, labels=["source"])
    family.add_metric(labels, value)
    return family


class RecorderCollector:
    """A prometheus_client collector over one recorder: each collect() reads it anew."""

    def __init__(self, metrics: Metrics, recorder: Recorder) -> None:
        self.metrics = metrics
        self.recorder = recorder

    def collect(self) -> Iterable[Metric]:
        return self.metrics.families(self.recorder)
