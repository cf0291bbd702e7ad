"""The queue-pair state machine: ids, wrap-around, phase, back-pressure, protocol violations."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given

from nvmefs.nvme.commands import CQE_FORMAT
from nvmefs.nvme.queue import ProtocolError, QueueFull, QueuePair


class FakeController:
    """Completes commands in any order the test picks, as a controller would."""

    def __init__(self, qp: QueuePair) -> None:
        self.qp = qp
        self.phase = 1
        self.cq_tail = 0
        self.sq_head = 0

    def consume(self, n: int) -> None:
        self.sq_head = (self.sq_head + n) % self.qp.depth

    def post(self, cid: int) -> tuple[int, int, int]:
        entry = (cid, self.sq_head, 0x281 << 1 | self.phase)
        self.cq_tail += 1
        if self.cq_tail == self.qp.depth:
            self.cq_tail, self.phase = 0, self.phase ^ 1
        return entry


def test_queue_full_leaves_one_slot_empty() -> None:
    qp = QueuePair(1, 4)
    for i in range(3):
        qp.submit(i)
    assert qp.free_slots == 0
    with pytest.raises(QueueFull):
        qp.submit("x")
    assert qp.busy == 3 and qp.sq_tail == 3


def test_completion_frees_the_slot_and_the_id() -> None:
    qp = QueuePair(1, 4)
    ctrl = FakeController(qp)
    ids = [qp.submit(f"c{i}")[1] for i in range(3)]
    ctrl.consume(3)
    assert qp.complete(*ctrl.post(ids[1])) == "c1"
    assert qp.free_slots == 3 and qp.busy == 2
    slot, cid = qp.submit("c3")
    assert slot == 3 and cid not in (ids[0], ids[2])


@given(order=st.lists(st.integers(0, 1000), min_size=1, max_size=400), depth=st.integers(2, 9))
def test_ids_reuse_and_phase_flips_over_many_passes(order: list[int], depth: int) -> None:
    qp = QueuePair(1, depth)
    ctrl = FakeController(qp)
    inflight: dict[int, int] = {}
    completed = 0
    for n, pick in enumerate(order):
        while qp.can_submit:
            _slot, cid = qp.submit(n)
            assert cid not in inflight  # an id is never handed out twice at once
            assert 0 <= cid < depth - 1
            inflight[cid] = n
            ctrl.consume(1)
        cid = sorted(inflight)[pick % len(inflight)]
        entry = ctrl.post(cid)
        assert qp.phase_matches(entry[2])
        assert qp.complete(*entry) == inflight.pop(cid)
        completed += 1
    assert qp.cq_head == completed % depth
    assert qp.phase == 1 ^ (completed // depth) % 2


def test_stale_phase_unknown_and_duplicate_ids_are_protocol_errors() -> None:
    qp = QueuePair(1, 8)
    _, cid = qp.submit("a")
    with pytest.raises(ProtocolError, match="stale phase"):
        qp.complete(cid, 1, 0)  # phase 0 while expecting 1
    with pytest.raises(ProtocolError, match="not in flight"):
        qp.complete(cid + 1, 1, 1)
    assert qp.complete(cid, 1, 1) == "a"
    with pytest.raises(ProtocolError, match="not in flight"):
        qp.complete(cid, 1, 1)  # the same completion again
    # nothing was consumed by the failed calls
    assert qp.cq_head == 1 and qp.busy == 0


def test_sq_head_out_of_range_or_beyond_tail_is_a_protocol_error() -> None:
    qp = QueuePair(1, 8)
    _, cid = qp.submit("a")
    with pytest.raises(ProtocolError, match="out of range"):
        qp.complete(cid, 8, 1)
    with pytest.raises(ProtocolError, match="beyond tail"):
        qp.complete(cid, 3, 1)  # only one command was ever submitted
    assert qp.busy == 1 and qp.cq_head == 0


def test_drain_forgets_everything_in_flight() -> None:
    qp = QueuePair(1, 4)
    qp.submit("a")
    qp.submit("b")
    assert sorted(qp.drain()) == ["a", "b"]
    assert (qp.busy, qp.sq_tail, qp.cq_head, qp.phase, qp.free_slots) == (0, 0, 0, 1, 3)


@given(
    order=st.lists(st.integers(0, 1000), min_size=1, max_size=300),
    burst=st.integers(1, 8),
    depth=st.integers(2, 9),
)
def test_consume_takes_cq_memory_as_complete_would(
    order: list[int], burst: int, depth: int
) -> None:
    """Two queue pairs see the same completions: one through consume() on CQ memory in bursts,
    one through complete() per CQE. Their contexts, words and states must agree."""
    qp, ref = QueuePair(1, depth), QueuePair(1, depth)
    ctrl = FakeController(qp)
    cq = memoryview(bytearray(depth * 16))
    posted: list[tuple[int, int, int]] = []
    n = 0
    for pick in order:
        while qp.can_submit:
            assert qp.submit(n) == ref.submit(n)
            ctrl.consume(1)
            n += 1
        candidates = sorted(set(qp.inflight) - {cid for cid, _, _ in posted})
        if candidates:
            entry = ctrl.post(candidates[pick % len(candidates)])
            CQE_FORMAT.pack_into(cq, (ctrl.cq_tail - 1) % depth * 16, pick, 0, entry[1], 1,
                                 entry[0], entry[2])  # fmt: skip
            posted.append(entry)
        if len(posted) >= burst or not candidates:
            done, errors = qp.consume(cq)
            assert not errors
            expected = [(ref.complete(*e), e[2] >> 1) for e in posted]
            assert [(ctx, word) for ctx, word, _ in done] == expected
            posted.clear()
            assert (qp.cq_head, qp.phase, qp.sq_head) == (ref.cq_head, ref.phase, ref.sq_head)


def test_consume_skips_and_reports_each_bad_cqe() -> None:
    qp = QueuePair(1, 8)
    _, a = qp.submit("a")
    _, b = qp.submit("b")
    cq = memoryview(bytearray(8 * 16))
    CQE_FORMAT.pack_into(cq, 0, 0, 0, 2, 1, 7, 1)  # command id 7 was never submitted
    CQE_FORMAT.pack_into(cq, 16, 0, 0, 6, 1, a, 1)  # SQ head beyond the tail
    CQE_FORMAT.pack_into(cq, 32, 0, 0, 2, 1, b, 0x281 << 1 | 1)
    done, errors = qp.consume(cq)
    assert done == [("b", 0x281, 0)]
    assert ["not in flight" in str(errors[0]), "beyond tail" in str(errors[1])] == [True, True]
    assert qp.cq_head == 3 and qp.busy == 1 and qp.inflight == {a: "a"}
    assert qp.consume(cq) == ([], [])  # the next slot still has phase 0: nothing new
