"""Prometheus metrics: the mount's nvmefs.prom, `-o prom=PATH` and `-o metrics_listen=`."""

from __future__ import annotations

from nvmefs.errors import UsageError
from nvmefs.options import Parsed
from nvmefs.recorder import Recorder
from nvmefs.store.ring import DebugRing


class Exporter:
    """Not yet built."""

    @classmethod
    def open(cls, opts: Parsed) -> Exporter | None:
        if opts["prom"] is None and opts["metrics_listen"] is None:
            return None
        raise UsageError("options prom and metrics_listen are not built yet")

    def attach(self, ring: DebugRing) -> None:
        pass

    async def run(self, recorder: Recorder) -> None:
        pass

    def close(self) -> None:
        pass
