"""The recorder: the ring, the engine that feeds it and how entries are shown.

What the files of the filesystem show, and what the control file may change, is decided here;
nvmefs/fs only maps files to these calls.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from nvmefs.engine.base import SourceBase
from nvmefs.engine.kernel import KernelEngine
from nvmefs.engine.passthrough import PassthroughEngine
from nvmefs.engine.sink import COUNTERS
from nvmefs.errors import UsageError
from nvmefs.nvme import tables
from nvmefs.nvme.policy import LogPolicy, PolicyError
from nvmefs.nvme.status import Translator
from nvmefs.store import charts, events
from nvmefs.store.events import HostEvent, NvmeEvent
from nvmefs.store.render import CLOCKS, FORMATS, Clock, Renderer
from nvmefs.store.ring import EVENT, Cursor, DebugRing
from nvmefs.store.summary import summarize
from nvmefs.store.views import LogStream, Rendered, StaticStream
from nvmefs.workloads import Progress

# Single rendered lines kept per view (whole chunks are cached apart): the live tail and the
# edges of gaps, which are all that is rendered line by line.
LINE_CACHE_LIMIT = 4096
# The largest control write applied: commands are a few words, and a bound keeps a runaway write
# (or one the kernel splits into several requests) from being applied in part.
CONTROL_MAX = 4096
# The newest entries `nvme_errors.svg` is drawn from, at most: rendered at open, on the event
# loop, so its cost must stay bounded whatever `capacity` is (a few milliseconds for 16,384).
SVG_ENTRIES = 16384


class ControlError(UsageError):
    """A control write that is refused whole (nothing of it applies)."""


class Recorder:
    """The ring, the engine that feeds it and how entries are shown: what the files serve."""

    def __init__(
        self,
        ring: DebugRing,
        renderer: Renderer,
        *,
        source: str = "sim",
        engine: SourceBase | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.ring = ring
        self.renderer = renderer
        self.source = source
        self.engine = engine
        self.progress = progress or Progress()
        # Every open renders the whole ring: render each entry once for all of them.
        limit = min(ring.capacity, LINE_CACHE_LIMIT)
        self._text = Rendered(lambda e: self.renderer.line(e), ring.capacity, limit)
        self._json = Rendered(lambda e: self.renderer.json_line(e), ring.capacity, limit)
        self._generation = 0  # bumped whenever rendered bytes change meaning
        self._fresh_size: tuple[object, int] = (None, 0)
        # Lines of `stats` that parts above the recorder (the outputs) contribute.
        self._status: list[Callable[[], list[tuple[str, object]]]] = []

    # -- views ---------------------------------------------------------------------------------

    def text_stream(self) -> LogStream:
        return LogStream(self.ring, self._text, self.renderer.missed_line)

    def json_stream(self) -> LogStream:
        return LogStream(self.ring, self._json, self.renderer.missed_json_line)

    def errors_svg(self) -> bytes:
        """`nvme_errors.svg`: the charts of `nvmefs report` (store/charts.py) over the NVMe errors
        among the ring's newest SVG_ENTRIES entries, with the controller's identity."""
        ring = self.ring
        _missed, entries = Cursor(ring, max(0, ring.last_seq - SVG_ENTRIES)).take()
        record = self.renderer.record
        summary = summarize(
            record(e) for e in entries if isinstance(ev := e[EVENT], NvmeEvent) and not ev.status.ok
        )
        engine = self.engine
        if engine is not None and engine.serial:
            summary.identify(engine.ctrl_name, engine.serial, engine.model)
        return charts.svg(summary).encode()

    def fresh_size(self, json: bool) -> int:
        """The size a stream opened now would have: what stat() shows a process without the
        file open. Memoized on the ring's window, so repeated lookups cost nothing."""
        key = (json, self.ring.first_seq, self.ring.last_seq, self._generation)
        if self._fresh_size[0] != key:
            stream = self.json_stream() if json else self.text_stream()
            self._fresh_size = (key, stream.size())
        return self._fresh_size[1]

    def _set_renderer(self, **changes: Any) -> None:
        for key, value in changes.items():
            setattr(self.renderer, key, value)
        self._text.clear()
        self._json.clear()
        self._generation += 1

    def add_status(self, status: Callable[[], list[tuple[str, object]]]) -> None:
        """Have `stats` show the (name, value) lines `status()` gives when it is read."""
        self._status.append(status)

    def stats_stream(self) -> StaticStream:
        return StaticStream(self.stats_text().encode())

    def stats_text(self) -> str:
        ring = self.ring
        rows: list[tuple[str, Any]] = [
            ("source", self.source),
            ("pid", os.getpid()),
            ("ring_capacity", ring.capacity),
            ("ring_appended", ring.appended),
            ("ring_retained", ring.retained),
            ("ring_dropped", ring.dropped),
            ("ring_cleared", ring.cleared),
            ("format", self.renderer.fmt),
            ("clock", self.renderer.clock.kind),
            ("hz", self.renderer.clock.hz),
        ]
        e = self.engine
        if e is not None:
            s = e.stats
            rows += [
                ("log", e.policy.spec),
                ("profile", e.translator.profile),
                ("engine_state", e.state),
                ("controller", e.ctrl_name),
                ("serial", e.serial),
                ("model", e.model),
                ("firmware", e.firmware),
                ("namespaces", len(e.namespaces)),
                *((c.field, getattr(s, c.field)) for c in COUNTERS),
                # Logged requests in the open fold of a storm, not in the ring yet: logged ==
                # the entries written + their repeats + this.
                ("folding", e.sink.folder.pending),
                ("latency_avg_us", f"{e.latency_avg_us:.1f}"),
                ("latency_max_us", f"{s.latency_ns_max / 1000:.1f}"),
            ]
            if isinstance(e, PassthroughEngine):  # which loop reads: compiled or python
                rows.append(("datapath", e.datapath))
            elif isinstance(e, KernelEngine):  # which consumer reads its trace pages
                rows += [
                    ("trace_consumer", e.trace_consumer),
                    ("trace_lost_events", e.lost_events),  # the kernel's count, exact
                    ("failovers", e.failovers),  # attempts failed over to another path
                ]
                if e.placer is not None:
                    rows += e.placer.status()
            for word, n in sorted(s.by_status.items()):
                rows.append((f"status_0x{word:x}", n))
            for (admin, opcode), n in sorted(s.by_opcode.items()):
                name = tables.opcode_name(opcode, admin, f"0x{opcode:02x}")
                name = name.lower().replace(" ", "_")
                rows.append((f"opcode_{'admin_' if admin else ''}{name}", n))
        p = self.progress
        rows += [
            ("workload", p.workload or "none"),
            ("workload_state", p.state),
            ("workload_pass", p.pass_no),
            ("workload_passes", p.passes),
            ("workload_nsid", p.nsid),
            ("workload_lba", p.lba),
            ("workload_nblocks", p.nblocks),
            ("workload_bytes", p.bytes_done),
            ("workload_commands", p.commands),
            ("workload_failed", p.failed),
            ("workload_polls", p.polls),
        ]
        rows += [(f"workload_{k}", v) for k, v in sorted(p.extra.items())]
        for status in self._status:
            rows += status()
        return "".join(f"{k} {v}\n" for k, v in rows)

    # -- control -------------------------------------------------------------------------------

    def control(self, text: str) -> list[str]:
        """Apply control commands (one per line or word); all are checked before any applies,
        and a text over CONTROL_MAX bytes is refused whole."""
        if len(text.encode()) > CONTROL_MAX:
            raise ControlError(f"control write over {CONTROL_MAX} bytes")
        words = text.split()
        if not words:
            raise ControlError("empty control write")
        actions = [self._action(w) for w in words]
        for act in actions:
            act()
        return words

    def clear(self) -> int:
        """Empty the ring, then append a notice of how many entries went, so that a follower's
        stream says why the entries stopped (its missed line counts them too). The engine's
        open fold, if any, goes to the ring first: it stands for errors from before the clear."""
        if self.engine is not None:
            self.engine.sink.flush()
        n = self.ring.clear()
        noun = "entry" if n == 1 else "entries"
        self.ring.append(HostEvent(events.NOTICE, f"cleared {n} {noun}", {events.CLEARED: n}))
        return n

    def _action(self, word: str) -> Any:
        if word == "clear":
            return self.clear
        key, eq, value = word.partition("=")
        if not eq:
            raise ControlError(f"unknown control command {word!r}")
        e = self.engine
        if key == "log" and e is not None:
            try:
                policy = LogPolicy(value)
            except PolicyError as err:
                raise ControlError(str(err)) from None
            return lambda: setattr(e, "policy", policy)
        if key == "profile" and e is not None:
            if value not in tables.PROFILES:
                raise ControlError(f"unknown profile {value!r}")
            translator = Translator(value)
            return lambda: setattr(e, "translator", translator)
        if key == "format":
            if value not in FORMATS:
                raise ControlError(f"unknown format {value!r}")
            return lambda: self._set_renderer(fmt=value)
        if key == "clock":
            if value not in CLOCKS:
                raise ControlError(f"unknown clock {value!r}")
            clock = Clock(value, self.renderer.clock.hz)
            return lambda: self._set_renderer(clock=clock)
        raise ControlError(f"unknown control command {word!r}")
