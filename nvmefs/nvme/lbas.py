"""The LBAs the bulk workloads visit: one definition for every data path.

- In order (scrub): [start, end) in commands of `nlb` blocks, the last one shorter if it must.
- At random (randread): slots of `nlb` blocks from `start` (as many as fit before `end`), each
  command's slot `splitmix64(state) % slots`, so slba = start + slot * nlb.

splitmix64 (Steele, Lea and Flood, 2014) is the generator because the compiled loop
(nvmefs/linux/bulk.c) uses it too, with the same 64-bit state: a `seed=` means the same LBAs
under datapath=python and datapath=compiled, and a run handed from one to the other (the
compiled loop's failed commands are retried in Python) goes on from the state where it stood.
Written here rather than taken from `random`: Python's Mersenne Twister has no C twin in
bulk.c, and its state is not one integer that a C struct can hold.
"""

from __future__ import annotations

from collections.abc import Iterator

GAMMA = 0x9E3779B97F4A7C15
MASK = (1 << 64) - 1


def splitmix64(state: int) -> tuple[int, int]:
    """The generator's next (state, value): what bulk.c's splitmix64() does to its state."""
    state = (state + GAMMA) & MASK
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return state, z ^ (z >> 31)


def random_slot_count(start: int, end: int, nlb: int) -> int:
    """How many whole slots of `nlb` blocks [start, end) has."""
    return max(0, end - start) // nlb


def random_lba(state: int, start: int, slots: int, nlb: int) -> tuple[int, int]:
    """The next random command's (state, slba); `slots` must be positive."""
    state, value = splitmix64(state)
    return state, start + (value % slots) * nlb


def random_lbas(seed: int, start: int, end: int, nlb: int) -> Iterator[int]:
    """The slbas of the random commands of a job from `seed`, without end (none if not even one
    slot fits)."""
    slots = random_slot_count(start, end, nlb)
    state = seed & MASK
    while slots:
        state, slba = random_lba(state, start, slots, nlb)
        yield slba


def in_order(start: int, end: int, nlb: int) -> Iterator[tuple[int, int]]:
    """The (slba, blocks) of the in-order commands over [start, end)."""
    lba = start
    while lba < end:
        count = min(nlb, end - lba)
        yield lba, count
        lba += count
