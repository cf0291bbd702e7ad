"""DebugRing: order, no empty slots, exact loss accounting, reads from any sequence number."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from nvmefs.store.ring import EVENT, SEQ, DebugRing


class RingModel(RuleBasedStateMachine):
    """Any interleaving of appends, clears and reads against a list that forgets nothing."""

    @initialize(capacity=st.integers(1, 12))
    def setup(self, capacity: int) -> None:
        self.ring = DebugRing(capacity)
        self.capacity = capacity
        self.log: list[tuple[int, str]] = []  # every (seq, event) ever appended
        self.visible_from = 1  # seq of the first entry not removed by a clear
        self.cleared = 0
        self.readers: dict[int, int] = {}  # reader id -> last seq it has seen

    @rule(n=st.integers(1, 30))
    def append(self, n: int) -> None:
        for _ in range(n):
            event = f"e{len(self.log) + 1}"
            seq = self.ring.append(event)
            self.log.append((seq, event))

    @rule()
    def clear(self) -> None:
        removed = self.ring.clear()
        expected = len(self.expected_retained())
        assert removed == expected
        self.cleared += removed
        self.visible_from = len(self.log) + 1

    def expected_retained(self) -> list[tuple[int, str]]:
        alive = [e for e in self.log if e[0] >= self.visible_from]
        return alive[-self.capacity :] if alive else []

    @rule(reader=st.integers(0, 3), limit=st.none() | st.integers(1, 20))
    def read(self, reader: int, limit: int | None) -> None:
        after = self.readers.get(reader, 0)
        missed, entries = self.ring.read_after(after, limit)
        retained = self.expected_retained()
        wanted = [e for e in retained if e[0] > after]
        if limit is not None:
            wanted = wanted[:limit]
        assert [(e[SEQ], e[EVENT]) for e in entries] == wanted
        # Everything after `after` that is no longer retained is counted missed, exactly.
        retained_seqs = {e[0] for e in retained}
        gone = [e for e in self.log if e[0] > after and e[0] not in retained_seqs]
        assert missed == len(gone)
        if entries:
            self.readers[reader] = entries[-1][SEQ]
        elif missed:
            self.readers[reader] = after + missed

    @invariant()
    def accounting_is_exact(self) -> None:
        if not hasattr(self, "ring"):
            return
        ring = self.ring
        retained = self.expected_retained()
        assert ring.appended == len(self.log)
        assert ring.retained == len(retained) == len(ring)
        assert ring.appended == ring.retained + ring.dropped + ring.cleared
        assert ring.cleared == self.cleared
        if self.cleared == 0:
            assert ring.appended - ring.retained == ring.dropped
        listed = list(ring)
        assert all(e is not None for e in listed)  # never an empty slot
        assert [(e[SEQ], e[EVENT]) for e in listed] == retained  # oldest first


TestRingModel = RingModel.TestCase
TestRingModel.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)


@given(capacity=st.integers(1, 50), n=st.integers(0, 400), start=st.integers(0, 450))
def test_read_after_any_sequence_returns_exactly_what_is_left(
    capacity: int, n: int, start: int
) -> None:
    ring = DebugRing(capacity)
    for i in range(n):
        ring.append(i)
    missed, entries = ring.read_after(start)
    first_retained = max(1, n - capacity + 1)
    assert [e[SEQ] for e in entries] == list(range(max(start + 1, first_retained), n + 1))
    assert missed == max(0, min(first_retained, n + 1) - (start + 1))
    assert all(e[EVENT] == e[SEQ] - 1 for e in entries)


def test_wrap_counts_drops_and_timestamps_entries() -> None:
    ring = DebugRing(4)
    for i in range(10):
        ring.append(i)
    assert (ring.appended, ring.retained, ring.dropped) == (10, 4, 6)
    entries = list(ring)
    assert [e[SEQ] for e in entries] == [7, 8, 9, 10]
    assert all(e[1] > 0 and e[2] > 0 for e in entries)
    assert [e[1] for e in entries] == sorted(e[1] for e in entries)


def test_listeners_wake_on_every_append_until_unsubscribed() -> None:
    ring = DebugRing(2)
    woken: list[int] = []
    unsubscribe = ring.subscribe(lambda: woken.append(ring.last_seq))
    ring.append("a")
    ring.append("b")
    unsubscribe()
    ring.append("c")
    assert woken == [1, 2]


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        DebugRing(0)


def test_restore_continues_the_numbers_and_keeps_the_invariant() -> None:
    ring = DebugRing(4)
    ring.restore([(s, s, s, f"old{s}") for s in (7, 8, 9)])
    assert (ring.first_seq, ring.last_seq, ring.retained, ring.dropped) == (7, 9, 3, 6)
    assert ring.append("new") == 10
    assert [e[EVENT] for e in ring] == ["old7", "old8", "old9", "new"]
    assert ring.append("newer") == 11 and ring.first_seq == 8
    assert ring.appended == ring.retained + ring.dropped + ring.cleared
    assert ring.read_after(7) == (0, list(ring))


def test_restore_refuses_a_used_ring_gaps_and_overflow() -> None:
    with pytest.raises(ValueError, match="gap"):
        DebugRing(4).restore([(1, 0, 0, "a"), (3, 0, 0, "b")])
    with pytest.raises(ValueError, match="do not fit"):
        DebugRing(1).restore([(1, 0, 0, "a"), (2, 0, 0, "b")])
    used = DebugRing(4)
    used.append("x")
    with pytest.raises(ValueError, match="only for a ring"):
        used.restore([(5, 0, 0, "a")])
    empty = DebugRing(4)
    empty.restore([])
    assert empty.append("first") == 1


def test_a_brake_holds_while_it_says_so_and_one_that_raises_holds_nothing() -> None:
    ring = DebugRing(4)
    behind = [False]
    remove = ring.add_brake(lambda: behind[0])
    assert not ring.held()
    behind[0] = True
    assert ring.held()

    def broken() -> bool:
        raise RuntimeError("a consumer's bug")

    behind[0] = False
    ring.add_brake(broken)
    assert not ring.held() and ring.listener_errors == 1  # counted, and the engine goes on
    remove()
    behind[0] = True
    assert not ring.held() and ring.listener_errors == 2
