"""PRP lists: what the host builds (plan, list_pages) the controller walks back exactly."""

from __future__ import annotations

import random
import struct

import hypothesis.strategies as st
import pytest
from hypothesis import example, given, settings

from nvmefs.nvme import prp
from nvmefs.nvme.prp import ENTRY, PAGE, PER_LIST, PrpError

DATA_BASE = 0x1_0000_0000  # where transfers start
SCATTER_BASE = 0x4_0000_0000  # where data pages are moved to, to check their order
LIST_BASE = 0x8_0000_0000  # where list pages live
MAX_LENGTH = 8 << 20  # 2048 data pages: five chained list pages

offsets = st.one_of(st.just(0), st.integers(1, PAGE - 1))
lengths = st.integers(1, MAX_LENGTH + PAGE)


class ListMemory:
    """List pages in a dict keyed by address; `read` is walk's callback and records its reads."""

    def __init__(self, pages: dict[int, bytes]) -> None:
        self.pages = pages
        self.read_pages: set[int] = set()

    def read(self, addr: int, n: int) -> bytes:
        base = addr - addr % PAGE
        page = self.pages[base]  # KeyError: walk read memory no list page is in
        off = addr - base
        assert off + n <= len(page), "walk read past the end of a list page"
        self.read_pages.add(base)
        return page[off : off + n]


def build(addr: int, length: int, entries: list[int] | None = None) -> tuple[int, ListMemory]:
    """(PRP2, list memory) for a transfer from `addr`, as a host builds them; `entries` replaces
    the data pages plan() gives (same count) to put them anywhere."""
    planned, npages = prp.plan(addr, length)
    if entries is None:
        entries = planned
    assert len(entries) == len(planned)
    if npages == 0:
        return (entries[0] if entries else 0), ListMemory({})
    list_addrs = [LIST_BASE + i * 3 * PAGE for i in range(npages)]  # not contiguous, on purpose
    pages = prp.list_pages(entries, list_addrs)
    return list_addrs[0], ListMemory(dict(zip(list_addrs, pages, strict=True)))


def expected(addr: int, length: int, entries: list[int]) -> list[tuple[int, int]]:
    first = min(length, PAGE - addr % PAGE)
    segments = [(addr, first)]
    left = length - first
    for page in entries:
        segments.append((page, min(PAGE, left)))
        left -= min(PAGE, left)
    assert left == 0
    return segments


# Page counts at the edges: PRP2 as data, one full list page, the first chain, two full pages.
EDGE_PAGES = [1, 2, 3, PER_LIST, PER_LIST + 1, PER_LIST + 2, 2 * PER_LIST - 1, 2 * PER_LIST]


@settings(max_examples=300, deadline=None)
@given(offset=offsets, length=lengths, page=st.integers(0, 1 << 20))
@example(offset=0, length=1, page=0)
@example(offset=PAGE - 1, length=2, page=0)  # one byte in each of two pages
@example(offset=0, length=MAX_LENGTH, page=0)
@example(offset=512, length=MAX_LENGTH, page=0)
def test_walk_returns_the_planned_pages(offset: int, length: int, page: int) -> None:
    addr = DATA_BASE + page * PAGE + offset
    prp2, memory = build(addr, length)
    entries, npages = prp.plan(addr, length)
    segments = prp.walk(addr, prp2, length, memory.read)
    assert segments == expected(addr, length, entries)
    assert sum(n for _, n in segments) == length
    assert memory.read_pages == set(memory.pages)  # every list page, and nothing else
    assert len(memory.pages) == npages


@pytest.mark.parametrize("offset", [0, 8, PAGE - 8])
@pytest.mark.parametrize("pages", EDGE_PAGES)
def test_walk_at_list_page_edges(offset: int, pages: int) -> None:
    # `pages` data pages after PRP1's page, the last one only partly used.
    addr = DATA_BASE + offset
    length = (PAGE - offset) + (pages - 1) * PAGE + 1
    entries, npages = prp.plan(addr, length)
    assert len(entries) == pages
    assert npages == (prp.list_pages_needed(pages) if pages > 1 else 0)
    prp2, memory = build(addr, length)
    assert prp.walk(addr, prp2, length, memory.read) == expected(addr, length, entries)
    assert memory.read_pages == set(memory.pages)


@settings(max_examples=100, deadline=None)
@given(offset=offsets, length=lengths, rng=st.randoms(use_true_random=False))
def test_walk_keeps_the_order_of_scattered_pages(
    offset: int, length: int, rng: random.Random
) -> None:
    addr = DATA_BASE + offset
    planned, _ = prp.plan(addr, length)
    scattered = [SCATTER_BASE + i * PAGE for i in range(len(planned))]
    rng.shuffle(scattered)
    prp2, memory = build(addr, length, scattered)
    assert prp.walk(addr, prp2, length, memory.read) == expected(addr, length, scattered)


@given(offset=offsets, misalign=st.integers(1, PAGE - 1))
def test_misaligned_prp2_data_page_is_refused(offset: int, misalign: int) -> None:
    addr = DATA_BASE + offset
    length = PAGE - offset + 1  # ends in the next page: PRP2 is that page
    prp2, memory = build(addr, length)
    with pytest.raises(PrpError, match="PRP2"):
        prp.walk(addr, prp2 + misalign, length, memory.read)


@given(offset=offsets, misalign=st.integers(1, ENTRY - 1))
def test_misaligned_list_pointer_is_refused(offset: int, misalign: int) -> None:
    addr = DATA_BASE + offset
    length = PAGE - offset + 2 * PAGE  # two more pages: PRP2 is a list pointer
    prp2, memory = build(addr, length)
    with pytest.raises(PrpError, match="PRP list pointer"):
        prp.walk(addr, prp2 + misalign, length, memory.read)


@settings(max_examples=100, deadline=None)
@given(
    offset=offsets,
    length=st.integers(3 * PAGE, MAX_LENGTH),
    which=st.floats(0, 1, exclude_max=True),
    misalign=st.integers(1, PAGE - 1),
)
def test_misaligned_list_entry_is_refused(
    offset: int, length: int, which: float, misalign: int
) -> None:
    addr = DATA_BASE + offset
    entries, _ = prp.plan(addr, length)
    entries[int(which * len(entries))] += misalign
    prp2, memory = build(addr, length, entries)
    with pytest.raises(PrpError, match="PRP entry"):
        prp.walk(addr, prp2, length, memory.read)


@given(misalign=st.integers(1, ENTRY - 1), extra=st.integers(1, 3 * PER_LIST))
def test_misaligned_chain_pointer_is_refused(misalign: int, extra: int) -> None:
    addr = DATA_BASE
    length = PAGE + (PER_LIST + extra) * PAGE  # more entries than one list page holds
    prp2, memory = build(addr, length)
    first = bytearray(memory.pages[prp2])
    (chain,) = struct.unpack_from("<Q", first, PAGE - ENTRY)
    assert chain in memory.pages
    struct.pack_into("<Q", first, PAGE - ENTRY, chain + misalign)
    memory.pages[prp2] = bytes(first)
    with pytest.raises(PrpError, match="chain pointer"):
        prp.walk(addr, prp2, length, memory.read)
