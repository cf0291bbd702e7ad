"""The fleet outputs of the mount daemon: a durable journal, syslog, Prometheus metrics.

Each output is opened before the daemon forks (`Outputs.open`), so a bad path, port or socket
is one line and exit 2 with nothing started; attached to the ring once it exists (`attach`: the
journal replays its newest entries into it first); then run as tasks of the daemon's nursery
(`run`) until the daemon stops, when each flushes what it holds (`close`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Protocol

import trio

from nvmefs.options import Parsed
from nvmefs.outputs.journal import Journal
from nvmefs.outputs.metrics import Exporter, Metrics
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
    def open(cls, opts: Parsed) -> Outputs:
        """Open (and check) every output asked for; UsageError, closing what opened, if one
        cannot be."""
        opened: list[Output] = []
        metrics = Metrics()
        openers: list[Callable[[Parsed], Output | None]] = [
            Journal.open,
            SyslogOutput.open,
            functools.partial(Exporter.open, metrics=metrics),
        ]
        try:
            for opener in openers:
                out = opener(opts)
                if out is not None:
                    opened.append(out)
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
