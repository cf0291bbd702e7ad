"""The queue-pair state machine, without I/O.

Theory of operation: a submission queue of `depth` slots and its completion queue. The host owns
the SQ tail and the CQ head; the controller owns the SQ head (reported in every CQE) and the CQ
tail (visible only through the phase tag). One slot of the SQ always stays empty so that a full
queue (tail + 1 == head) differs from an empty one (tail == head): at most depth - 1 commands are
in flight.

    submit():  take a free command id, note its context, return (slot, cid); advance the tail
    complete(cqe fields): check the phase tag, check the cid is in flight and the SQ head is in
               range, free the cid, advance the CQ head (flipping the phase on wrap)

Command ids come from a FIFO of free ids, so an id is reused as late as possible: a late or
duplicate completion for an id finds it free and is reported, not matched to the wrong command.
Every violation raises ProtocolError; the state is unchanged when it does.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from nvmefs.errors import ProtocolError, QueueFull
from nvmefs.nvme.commands import CQE_FORMAT

__all__ = ["ProtocolError", "QueueFull", "QueuePair"]


class QueuePair:
    """The host's side of one SQ/CQ pair: slots, command ids, phase. See the module docstring."""

    __slots__ = (
        "_free",
        "cq_head",
        "depth",
        "inflight",
        "phase",
        "qid",
        "sq_head",
        "sq_tail",
    )

    def __init__(self, qid: int, depth: int) -> None:
        if not 2 <= depth <= 65536:
            raise ValueError(f"queue depth {depth} outside 2..65536")
        self.qid = qid
        self.depth = depth
        self.sq_tail = 0
        self.sq_head = 0
        self.cq_head = 0
        self.phase = 1
        # Command ids 0..depth-2 are enough for depth-1 commands in flight.
        self._free: deque[int] = deque(range(depth - 1))
        self.inflight: dict[int, Any] = {}

    @property
    def free_slots(self) -> int:
        return (self.sq_head - self.sq_tail - 1) % self.depth

    @property
    def can_submit(self) -> bool:
        """A free SQ slot (the controller consumed enough) and a free command id (enough
        completed): the two free up at different times."""
        return self.room > 0

    @property
    def room(self) -> int:
        """How many commands submit() takes before the queue is full."""
        return min(self.free_slots, len(self._free))

    @property
    def busy(self) -> int:
        return len(self.inflight)

    def submit(self, context: Any) -> tuple[int, int]:
        """Claim a slot and a command id for `context`; returns (sq slot index, cid)."""
        if not self._free or (self.sq_head - self.sq_tail - 1) % self.depth == 0:
            raise QueueFull(f"queue {self.qid} full ({self.depth - 1} in flight)")
        cid = self._free.popleft()
        self.inflight[cid] = context
        slot = self.sq_tail
        self.sq_tail = (slot + 1) % self.depth
        return slot, cid

    def phase_matches(self, status_field: int) -> bool:
        """Is the CQE at cq_head new? (its phase tag equals the expected phase)"""
        return status_field & 1 == self.phase

    def complete(self, cid: int, sq_head: int, status_field: int) -> Any:
        """Account for one new CQE; returns the context given at submit()."""
        if status_field & 1 != self.phase:
            raise ProtocolError(f"queue {self.qid}: CQE at head {self.cq_head} has a stale phase")
        problem = self._violation(cid, sq_head)
        if problem:
            raise ProtocolError(problem)
        context = self.inflight.pop(cid)
        self._free.append(cid)
        self.sq_head = sq_head
        self.advance_cq()
        return context

    def consume(self, cq: memoryview) -> tuple[list[tuple[Any, int, int]], list[ProtocolError]]:
        """Take every new CQE from the completion queue memory `cq`, as complete() would one by
        one; returns ([(context, status word, result)], [violations, each CQE skipped])."""
        done: list[tuple[Any, int, int]] = []
        errors: list[ProtocolError] = []
        unpack, depth, inflight, free = (
            CQE_FORMAT.unpack_from,
            self.depth,
            self.inflight,
            self._free,
        )
        head, phase = self.cq_head, self.phase
        while True:
            result, _dw1, sq_head, _sqid, cid, field = unpack(cq, head * 16)
            if field & 1 != phase:
                break
            head += 1
            if head == depth:
                head, phase = 0, phase ^ 1
            outstanding = (self.sq_tail - self.sq_head) % depth
            if sq_head < depth and (sq_head - self.sq_head) % depth <= outstanding:
                context = inflight.pop(cid, _MISSING)
                if context is not _MISSING:
                    free.append(cid)
                    self.sq_head = sq_head
                    done.append((context, field >> 1, result))
                    continue
            errors.append(ProtocolError(self._violation(cid, sq_head)))
        self.cq_head, self.phase = head, phase
        return done, errors

    def _violation(self, cid: int, sq_head: int) -> str:
        if not 0 <= sq_head < self.depth:
            return f"queue {self.qid}: SQ head {sq_head} out of range (depth {self.depth})"
        # The head may only move forward over slots the host has filled.
        outstanding = (self.sq_tail - self.sq_head) % self.depth
        if (sq_head - self.sq_head) % self.depth > outstanding:
            return (
                f"queue {self.qid}: SQ head {sq_head} beyond tail {self.sq_tail}"
                f" (was {self.sq_head})"
            )
        if cid not in self.inflight:
            return f"queue {self.qid}: completion for command id {cid} that is not in flight"
        return ""

    def advance_cq(self) -> None:
        """Consume the CQE at the head (also used to skip a CQE that broke the protocol)."""
        self.cq_head += 1
        if self.cq_head == self.depth:
            self.cq_head = 0
            self.phase ^= 1

    def drain(self) -> list[Any]:
        """Forget every command in flight (controller reset); returns their contexts."""
        contexts = list(self.inflight.values())
        self.inflight.clear()
        self._free = deque(range(self.depth - 1))
        self.sq_tail = self.sq_head = self.cq_head = 0
        self.phase = 1
        return contexts


_MISSING = object()
