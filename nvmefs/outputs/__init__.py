"""The outputs of the mount daemon: a durable journal, syslog, Prometheus metrics, the kernel log.

Each output is opened before the daemon forks (`Outputs.open`), so a bad path, port or socket
is one line and exit 2 with nothing started; attached to the ring once it exists (`attach`: the
journal replays its newest entries into it first); then run as tasks of the daemon's nursery
(`run`) until the daemon stops, when each flushes what it holds (`close`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Protocol

import trio

from nvmefs.errors import UsageError
from nvmefs.options import Parsed
from nvmefs.outputs.exporter import Exporter
from nvmefs.outputs.journal import Journal
from nvmefs.outputs.kmsg import KmsgOutput
from nvmefs.outputs.metrics import Metrics
from nvmefs.outputs.syslog import SyslogOutput
from nvmefs.recorder import Recorder
from nvmefs.store.ring import DebugRing


class Output(Protocol):
    """What every output does between open and close."""

    def attach(self, ring: DebugRing) -> None: ...

    async def run(self, recorder: Recorder) -> None: ...

    def close(self) -> None: ...


class Outputs:
    """The outputs the options asked for (possibly none)."""

    def __init__(self, outputs: Sequence[Output], metrics: Metrics | None = None) -> None:
        self.outputs = list(outputs)
        # The daemon's metrics exist whatever the options: the mount's nvmefs.prom reads them.
        self.metrics = metrics or Metrics()

    @classmethod
    def open(cls, opts: Parsed, mountpoint: str | None = None) -> Outputs:
        """Open (and check) every output asked for; UsageError, closing what opened, if one
        cannot be. No file of theirs may be under `mountpoint`: the mount would hide it."""
        for option in ("journal", "prom"):
            path = opts[option]
            if mountpoint is not None and path is not None:
                real = os.path.realpath(path)
                if real == mountpoint or real.startswith(mountpoint.rstrip("/") + "/"):
                    raise UsageError(
                        f"option {option}={path} is inside the mountpoint {mountpoint}, "
                        "which the mount hides"
                    )
        opened: list[Output] = []
        metrics = Metrics()
        openers: list[Callable[[Parsed], Output | None]] = [
            Journal.open,
            SyslogOutput.open,
            functools.partial(Exporter.open, metrics=metrics),
            KmsgOutput.open,
        ]
        try:
            for opener in openers:
                out = opener(opts)
                if out is not None:
                    opened.append(out)
                # The metrics count what the journal and syslog lost, for alerts.
                if isinstance(out, Journal):
                    metrics.journal = out
                elif isinstance(out, SyslogOutput):
                    metrics.syslog = out
                elif isinstance(out, KmsgOutput):
                    metrics.kmsg = out
        except BaseException:
            for done in opened:
                done.close()
            raise
        return cls(opened, metrics)

    def attach(self, ring: DebugRing) -> None:
        # Metrics first: they skip the entries the journal replays (the daemon that made them
        # counted them) but count the journal's notice of the replay, which is this run's.
        self.metrics.attach(ring)
        for out in self.outputs:
            out.attach(ring)

    async def run(self, recorder: Recorder) -> None:
        """Every output's task. They end when cancelled; the daemon closes them after the
        engine has stopped, so that what the engine logs as it stops is written too."""
        async with trio.open_nursery() as nursery:
            for out in self.outputs:
                nursery.start_soon(out.run, recorder)

    def close(self) -> None:
        for out in self.outputs:
            out.close()
