"""The kernel's disposition rule: what happens to a request once its completion arrives.

Theory of operation: Linux decides in `nvme_decide_disposition()` (drivers/nvme/host/core.c),
once per completion of every attempt:

    status word 0                                      -> COMPLETE
    fail-fast request (passthrough, readahead), or DNR,
      or retries already >= max_retries                -> COMPLETE
    a path error (SCT 3) under native multipath        -> FAILOVER
    anything else                                      -> RETRY, after CRDT[CRD-1] * 100 ms
                                                          when the status asks for a delay

Only COMPLETE ends a request: that is where the kernel calls `nvme_error_status()` and where
the original patch logged, so a request gets one entry however many attempts it took. The rule
looks at the whole 15-bit word, as the kernel does (a word carrying only MORE is not 0).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from nvmefs.nvme.status import CRD_MASK, CRD_SHIFT, DNR, SCT_PATH, sct_of

CRDT_UNIT_S = 0.1  # Identify Controller CRDT1..3 count 100 ms units


class Disposition(enum.Enum):
    """What the host does with a completed attempt."""

    COMPLETE = "complete"
    RETRY = "retry"
    FAILOVER = "failover"


@dataclass(frozen=True, slots=True)
class Decision:
    """A disposition and, for RETRY, the seconds to wait before the next attempt."""

    action: Disposition
    delay: float = 0.0

    @property
    def final(self) -> bool:
        return self.action is Disposition.COMPLETE


COMPLETE = Decision(Disposition.COMPLETE)
FAILOVER = Decision(Disposition.FAILOVER)
RETRY_NOW = Decision(Disposition.RETRY)


def decide(
    status: int,
    retries: int,
    max_retries: int,
    *,
    fail_fast: bool = False,
    multipath: bool = False,
    crdt: tuple[int, int, int] = (0, 0, 0),
) -> Decision:
    """The disposition of an attempt that completed with 15-bit `status` after `retries` earlier
    attempts; `crdt` is Identify Controller's CRDT1..3 (100 ms units)."""
    if status == 0:
        return COMPLETE
    if fail_fast or status & DNR or retries >= max_retries:
        return COMPLETE
    if multipath and sct_of(status) == SCT_PATH:
        return FAILOVER
    crd = (status & CRD_MASK) >> CRD_SHIFT
    if crd and crdt[crd - 1]:
        return Decision(Disposition.RETRY, crdt[crd - 1] * CRDT_UNIT_S)
    return RETRY_NOW
