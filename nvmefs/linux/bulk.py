"""The compiled submit/reap loop (bulk.c, built as nvmefs.linux.bulkext by cffi), seen from Python.

A `Loop` owns an io_uring set up by liburing and `qd` buffers. `run()` blocks (it is meant for a
worker thread: cffi releases the GIL around the call) while the C code keeps `qd` commands of its
job in flight, and returns only what Python must see: failed completions (or every completion,
when the job asks), at the latest every `max_ms`. Successes are counted in C; `take_successes()`
hands over their count and latencies.

When the extension was not built or does not load (no liburing at run time), `unavailable()`
says why and the engine keeps to its Python data path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

try:
    from nvmefs.linux.bulkext import ffi, lib

    _WHY_NOT: str | None = None
except ImportError as e:
    ffi = lib = None
    if isinstance(e, ModuleNotFoundError) and e.name == "nvmefs.linux.bulkext":
        # Built without it (setup.py: no liburing headers or C compiler), or a checkout used
        # without `pip install`.
        _WHY_NOT = (
            "nvmefs was installed without its compiled loop (liburing's headers or a C "
            "compiler were missing when it was built)"
        )
    else:  # built, but liburing2 (the shared library) is missing at run time
        _WHY_NOT = f"the compiled loop does not load ({e})"

UNLIMITED = (1 << 64) - 1  # a job's budget without a rate limit
NO_COMPLETION = -(1 << 31)  # `res` of a command the kernel did not answer within the backstop


def unavailable() -> str | None:
    """Why the compiled loop cannot be used here, or None when it can."""
    return _WHY_NOT


@dataclass(frozen=True, slots=True)
class Report:
    """A completion the loop handed back: failed, or any under a job's `report_all`."""

    tag: int  # the command's number in its loop, from 1
    slba: int
    nlb: int
    res: int  # NVMe status (>= 0), -errno from the host, or NO_COMPLETION
    result: int  # completion dwords 0 and 1
    t0_ns: int  # time.monotonic_ns() when it was sent


class Loop:
    """An io_uring with `qd` slots and a `buf_bytes` buffer each, and one job (`job`, a C struct
    whose fields Python sets before a run and reads after one).

    Invariant: the C side touches `job` only inside run(), so Python reads and writes it only
    between runs; close() frees the ring and the buffers once, even with commands in flight."""

    def __init__(self, qd: int, buf_bytes: int, backstop_s: float) -> None:
        if lib is None:
            raise OSError(0, _WHY_NOT)
        self.qd = qd
        self._loop = lib.nvmefs_bulk_new(qd, buf_bytes, int(backstop_s * 1000))
        if self._loop == ffi.NULL:
            err = ffi.errno
            raise OSError(err, f"io_uring for the compiled loop: {os.strerror(err)}")
        self.job: Any = ffi.new("struct nvmefs_job *")
        self.job.budget = UNLIMITED
        self._out = ffi.new("struct nvmefs_report[]", qd)

    def run(self, max_ms: int) -> list[Report]:
        """Submit and reap until something is to be reported, `max_ms` passed, or the job has
        nothing left in flight or to send. Blocking: call it from a worker thread."""
        n = lib.nvmefs_bulk_run(self._loop, self.job, self._out, self.qd, max_ms)
        if n < 0:
            raise OSError(-n, f"compiled loop: {os.strerror(-n)}")
        out = self._out
        return [
            Report(r.tag, r.slba, r.nlb, r.res, r.result, r.t0_ns)
            for r in (out[i] for i in range(n))
        ]

    def take_successes(self) -> tuple[int, int, int]:
        """(count, latency sum ns, latency max ns) of the successes since the last call."""
        j = self.job
        taken = (int(j.ok), int(j.ok_lat_ns), int(j.ok_lat_ns_max))
        j.ok = j.ok_lat_ns = j.ok_lat_ns_max = 0
        return taken

    def close(self) -> None:
        if self._loop is not None:
            lib.nvmefs_bulk_free(self._loop)
            self._loop = None
