"""The status translator: a 15-bit NVMe status word -> everything the kernel would say about it.

Theory of operation: the translation runs on every completion, so it must cost one lookup.
Each of a profile's 32768 possible results is built once, on first use, as an immutable `Status`
object, and `Translator.decode(word)` returns the shared object (building all of them up front
cost every nvmefs command a noticeable start-up delay, for words it never sees). Everything
below the table build is data from `tables.py`; the only logic is the bit layout of the word:

    bit 14 DNR | bit 13 MORE | bits 12:11 CRD | bits 10:8 SCT | bits 7:0 SC

The raw CQE status field (dword 3 bits 31:16) carries the phase tag in bit 0 and this word in
bits 15:1; `decode_cqe()` takes that form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Any

from nvmefs.errors import UsageError
from nvmefs.nvme import tables

STATUS_MASK = 0x7FFF
SCT_SC_MASK = 0x7FF
CRD_MASK = 0x1800
MORE = 0x2000
DNR = 0x4000
SCT_SHIFT = 8
CRD_SHIFT = 11
# Status code types
SCT_GENERIC, SCT_COMMAND, SCT_MEDIA, SCT_PATH, SCT_VENDOR = 0, 1, 2, 3, 7


def sct_of(word: int) -> int:
    return (word >> SCT_SHIFT) & 0x7


class StatusError(UsageError):
    """A status value that is not a valid status word (or CQE status field)."""


@dataclass(frozen=True, slots=True)
class Status:
    """Everything the kernel would say about one 15-bit status word under one profile."""

    status: int  # the 15-bit word as given, DNR/MORE/CRD included
    sct: int
    sc: int
    crd: int
    more: bool
    dnr: bool
    name: str
    blk_status: str
    blk_string: str
    errno: int  # positive errno value; the kernel hands back its negative
    profile: str
    ok: bool  # SCT/SC zero: a field, not a property, as every completion asks

    @property
    def code(self) -> int:
        """SCT/SC only: what the kernel switches on."""
        return self.status & SCT_SC_MASK

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": f"0x{self.status:x}",
            "sct": self.sct,
            "sc": self.sc,
            "crd": self.crd,
            "more": self.more,
            "dnr": self.dnr,
            "name": self.name,
            "blk_status": self.blk_status,
            "blk_string": self.blk_string,
            "errno": self.errno,
            "profile": self.profile,
        }


def _build(word: int, profile: str) -> Status:
    code = word & SCT_SC_MASK
    names = tables.NAME_OVERRIDES_BY_PROFILE[profile]
    name = names.get(code) or tables.STATUS_NAMES.get(code, "Unknown")
    blk = tables.BLK_STATUS_BY_PROFILE[profile].get(code, "IOERR")
    blk_string, err = tables.BLK_STATUS_INFO[blk]
    return Status(
        status=word,
        sct=sct_of(word),
        sc=word & 0xFF,
        crd=(word & CRD_MASK) >> CRD_SHIFT,
        more=bool(word & MORE),
        dnr=bool(word & DNR),
        name=name,
        blk_status=blk,
        blk_string=blk_string,
        errno=err,
        profile=profile,
        ok=code == 0,
    )


class Translator:
    """Decodes status words under one kernel profile; `decode` is a table lookup."""

    __slots__ = ("profile", "table")

    def __init__(self, profile: str = tables.DEFAULT_PROFILE) -> None:
        if profile not in tables.BLK_STATUS_BY_PROFILE:
            raise StatusError(
                f"unknown profile {profile!r} (choose from {', '.join(tables.PROFILES)})"
            )
        self.profile = profile
        # Indexed by a word already known to fit in 15 bits, this is decode() without its checks.
        self.table = _table_for(profile)

    def decode(self, word: int) -> Status:
        """15-bit status word -> Status. Raises StatusError outside 0..0x7fff."""
        return self.table[word]  # the table refuses words outside 15 bits

    def decode_cqe(self, field: int) -> Status:
        """Raw 16-bit CQE status field (phase tag in bit 0) -> Status."""
        if not 0 <= field <= 0xFFFF:
            raise StatusError(f"CQE status field 0x{field:x} does not fit in 16 bits")
        return self.table[field >> 1]


class _Table(dict[int, Status]):
    """Status per word of one profile, each built the first time it is asked for."""

    def __init__(self, profile: str) -> None:
        super().__init__()
        self.profile = profile

    def __missing__(self, word: int) -> Status:
        if not 0 <= word <= STATUS_MASK:
            raise StatusError(f"status {word:#x} does not fit in 15 bits")
        status = self[word] = _build(word, self.profile)
        return status


@cache
def _table_for(profile: str) -> _Table:
    return _Table(profile)


_NUMBER = re.compile(
    r"(?P<prefix>0[xX](?=[0-9a-fA-F])|0[bB](?=[01])|0[oO](?=[0-7]))?(?P<digits>[0-9a-fA-F]{1,32})"
)


def parse_status(text: str, *, cqe: bool = False) -> int:
    """Parse a user-given status ("0x281", "641", "0b1010000001") and check its width."""
    # int() also takes other scripts' digits, underscores and spaces: a status is plain ASCII.
    m = _NUMBER.fullmatch(text)
    if not m:
        raise StatusError(f"not a number: {text[:40]!r}")
    base = {"0x": 16, "0b": 2, "0o": 8}.get((m.group("prefix") or "").lower(), 10)
    try:
        value = int(m.group("digits"), base)
    except ValueError:  # a hex digit without 0x, or 8 in octal...
        raise StatusError(f"not a number: {text[:40]!r}") from None
    limit = 0xFFFF if cqe else STATUS_MASK
    if not 0 <= value <= limit:
        width = "16 bits (CQE status field)" if cqe else "15 bits (use --cqe for a raw CQE field)"
        raise StatusError(f"status {text!r} does not fit in {width}")
    return value
