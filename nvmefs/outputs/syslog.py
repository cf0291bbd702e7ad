"""`-o syslog[=SOCKET]`: every logged entry to the local syslog socket as RFC 5424."""

from __future__ import annotations

from nvmefs.errors import UsageError
from nvmefs.options import Parsed
from nvmefs.recorder import Recorder
from nvmefs.store.ring import DebugRing


class SyslogOutput:
    """Not yet built."""

    @classmethod
    def open(cls, opts: Parsed) -> SyslogOutput | None:
        if opts["syslog"] is None:
            return None
        raise UsageError("option syslog is not built yet")

    def attach(self, ring: DebugRing) -> None:
        pass

    async def run(self, recorder: Recorder) -> None:
        pass

    def close(self) -> None:
        pass
