"""The bulk workloads' LBA sequences (nvmefs/nvme/lbas.py)."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from nvmefs.nvme import lbas


def test_splitmix64_gives_the_reference_outputs() -> None:
    # The first outputs from state 0 of the reference splitmix64.c (Vigna, 2015).
    state, out = 0, []
    for _ in range(3):
        state, value = lbas.splitmix64(state)
        out.append(value)
    assert out == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


@given(st.integers(0, 10_000), st.integers(0, 10_000), st.integers(1, 300))
def test_in_order_covers_the_range_once_in_commands_of_nlb(start: int, size: int, nlb: int) -> None:
    chunks = list(lbas.in_order(start, start + size, nlb))
    covered = [lba for slba, n in chunks for lba in range(slba, slba + n)]
    assert covered == list(range(start, start + size))
    assert all(n == nlb for _, n in chunks[:-1]) and all(0 < n <= nlb for _, n in chunks)


@given(
    st.integers(0, (1 << 64) - 1), st.integers(0, 1000), st.integers(1, 5000), st.integers(1, 64)
)
def test_random_lbas_fall_on_whole_slots_inside_the_range(
    seed: int, start: int, size: int, nlb: int
) -> None:
    end = start + size
    slbas = list(itertools.islice(lbas.random_lbas(seed, start, end, nlb), 200))
    if size < nlb:
        assert slbas == []
        return
    assert len(slbas) == 200
    assert all(start <= s and s + nlb <= end and (s - start) % nlb == 0 for s in slbas)


def test_random_lbas_are_a_function_of_the_seed_and_resume_from_the_state() -> None:
    a = list(itertools.islice(lbas.random_lbas(7, 0, 1 << 20, 8), 100))
    assert a == list(itertools.islice(lbas.random_lbas(7, 0, 1 << 20, 8), 100))
    assert a != list(itertools.islice(lbas.random_lbas(8, 0, 1 << 20, 8), 100))
    state, first = 7, []
    for _ in range(100):
        state, slba = lbas.random_lba(state, 0, (1 << 20) // 8, 8)
        first.append(slba)
    assert first == a
