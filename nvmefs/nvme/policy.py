"""Log policy: which completions become ring entries.

A policy is a 2048-entry table indexed by SCT/SC, so asking it costs one index on the hot path.
CRD/MORE/DNR never change the answer (the seed compared on the masked code as well).
"""

from __future__ import annotations

from nvmefs.errors import UsageError
from nvmefs.nvme import tables
from nvmefs.nvme.status import SCT_SC_MASK, StatusError, parse_status


class PolicyError(UsageError):
    """A log policy that names no statuses."""


class LogPolicy:
    """Which status codes become ring entries; `table[code]` is nonzero for those."""

    __slots__ = ("spec", "table")

    def __init__(self, spec: str = "media") -> None:
        codes = self._codes(spec)
        self.spec = spec
        # Indexed by SCT/SC (status word & 0x7ff): nonzero where such completions are logged.
        self.table = bytes(1 if c in codes else 0 for c in range(SCT_SC_MASK + 1))

    @staticmethod
    def _codes(spec: str) -> frozenset[int]:
        if spec == "media":
            return tables.SEED_MEDIA_STATUSES
        if spec == "errors":
            return frozenset(range(1, SCT_SC_MASK + 1))
        if spec == "all":
            return frozenset(range(SCT_SC_MASK + 1))
        parts = [p for p in spec.replace(",", ":").split(":") if p]
        if not parts:
            raise PolicyError(f"log policy {spec!r}: expected media, errors, all or statuses")
        codes = set()
        for part in parts:
            try:
                codes.add(parse_status(part) & SCT_SC_MASK)
            except StatusError as e:
                raise PolicyError(
                    f"log policy {spec!r}: {e} (expected media, errors, all or 0x281:0x285...)"
                ) from None
        return frozenset(codes)

    def logs(self, status_word: int) -> bool:
        return bool(self.table[status_word & SCT_SC_MASK])

    def __repr__(self) -> str:
        return f"LogPolicy({self.spec!r})"
