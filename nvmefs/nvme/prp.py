"""Physical Region Page lists: how a command describes host memory, built and walked. No I/O.

Theory of operation: PRP1 points at the first byte of the transfer (it may start inside a page);
every further page is whole and page aligned. A transfer that ends within PRP1's page needs
nothing more; one that ends in the next page puts that page in PRP2; a longer one puts in PRP2
the address of a PRP list: page-sized arrays of 64-bit page addresses, where the last slot of a
full list page points to the next list page when more entries follow (chaining).

`plan()` tells the host how many list pages a transfer needs and `list_pages()` what goes in
them; `walk()` is the controller's side: the (address, length) segments a PRP pair describes,
reading list pages through a callback. The two are inverses, which the tests pin down.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

from nvmefs.errors import NvmefsError

PAGE = 4096
ENTRY = 8
PER_LIST = PAGE // ENTRY  # entries in one list page, the last one a chain pointer if needed


class PrpError(NvmefsError):
    """A PRP entry or list a controller must refuse: misaligned, or pointing at no memory."""


def data_pages(addr: int, length: int) -> list[int]:
    """The page addresses a transfer of `length` bytes from `addr` touches after PRP1's page."""
    first_end = (addr // PAGE + 1) * PAGE
    return list(range(first_end, addr + length, PAGE)) if length > first_end - addr else []


def list_pages_needed(entries: int) -> int:
    """List pages for `entries` data-page entries: each full page but the last gives one slot
    to the chain pointer."""
    if entries <= 1:  # PRP2 itself holds the one entry, or there is none
        return 0
    pages = 1
    while entries > pages * PER_LIST - (pages - 1):
        pages += 1
    return pages


def plan(addr: int, length: int) -> tuple[list[int], int]:
    """(data-page entries after PRP1, list pages needed): 0 list pages means PRP2 is the single
    entry (or 0 when there is none)."""
    pages = data_pages(addr, length)
    return pages, (list_pages_needed(len(pages)) if len(pages) > 1 else 0)


def list_pages(entries: Sequence[int], list_addrs: Sequence[int]) -> list[bytes]:
    """The contents of each list page (at `list_addrs`, in order) holding `entries`."""
    out: list[bytes] = []
    i = 0
    for n, _ in enumerate(list_addrs):
        left = len(entries) - i
        if left <= PER_LIST:
            out.append(struct.pack(f"<{left}Q", *entries[i:]))
            i = len(entries)
            continue
        chunk = [*entries[i : i + PER_LIST - 1], list_addrs[n + 1]]
        out.append(struct.pack(f"<{PER_LIST}Q", *chunk))
        i += PER_LIST - 1
    if i != len(entries):
        need = list_pages_needed(len(entries))
        raise ValueError(f"{len(entries)} entries need {need} list pages, not {len(list_addrs)}")
    return out


def walk(
    prp1: int, prp2: int, length: int, read: Callable[[int, int], bytes | memoryview]
) -> list[tuple[int, int]]:
    """The (address, length) segments of a transfer, in order; `read(addr, n)` reads host
    memory for list pages. Raises PrpError for a misaligned entry."""
    first = min(length, PAGE - prp1 % PAGE)
    segments = [(prp1, first)]
    left = length - first
    if left <= 0:
        return segments
    if left <= PAGE:
        if prp2 % PAGE:
            raise PrpError(f"PRP2 {prp2:#x} is not page aligned")
        segments.append((prp2, left))
        return segments
    if prp2 % ENTRY:
        raise PrpError(f"PRP list pointer {prp2:#x} is not 8-byte aligned")
    pointer = prp2
    while left > 0:
        # A list may start inside a page; it runs to that page's end.
        slots = (PAGE - pointer % PAGE) // ENTRY
        need = -(-left // PAGE)
        chained = need > slots
        count = slots if chained else need
        entries = struct.unpack_from(f"<{count}Q", read(pointer, count * ENTRY))
        data = entries[:-1] if chained else entries
        for page in data:
            if page % PAGE:
                raise PrpError(f"PRP entry {page:#x} is not page aligned")
            n = min(PAGE, left)
            segments.append((page, n))
            left -= n
        if chained:
            pointer = entries[-1]
            if pointer % ENTRY:
                raise PrpError(f"PRP list chain pointer {pointer:#x} is not 8-byte aligned")
    return segments
