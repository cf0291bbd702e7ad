"""Controller registers (BAR0) and their fields: offsets, bits and encodings as data. No I/O.

What a register-level host (the engine) writes and what a device model (the simulated
controller) decodes come from here, so the two cannot disagree about a bit.
"""

from __future__ import annotations

from nvmefs.nvme.prp import PAGE

# Offsets
CAP = 0x00
VS = 0x08
INTMS = 0x0C
INTMC = 0x10
CC = 0x14
CSTS = 0x1C
AQA = 0x24
ASQ = 0x28
ACQ = 0x30
DOORBELL_BASE = 0x1000

# CC: enable, and the queue entry sizes as powers of two (SQE 64 = 2^6, CQE 16 = 2^4)
CC_EN = 1
CC_IOSQES_SHIFT = 16
CC_IOCQES_SHIFT = 20
SQE_SHIFT = 6
CQE_SHIFT = 4

# CSTS: ready, controller fatal status
CSTS_RDY = 1
CSTS_CFS = 2

# CAP fields
CAP_MQES_MASK = 0xFFFF  # largest queue, 0-based
CAP_CQR = 1 << 16  # physically contiguous queues required
CAP_TO_SHIFT = 24  # ready timeout in 500 ms units
CAP_CSS_NVM = 1 << 37
TO_UNIT_S = 0.5

VERSION_1_4 = 0x00010400
MEMORY_PAGE = PAGE  # CC.MPS 0: 4 KiB


def cc_enable() -> int:
    """CC to enable a controller with 64-byte SQEs and 16-byte CQEs (and 4 KiB pages)."""
    return CC_EN | SQE_SHIFT << CC_IOSQES_SHIFT | CQE_SHIFT << CC_IOCQES_SHIFT


def aqa(sq_entries: int, cq_entries: int) -> int:
    """AQA for admin queues of these sizes (the register holds them 0-based)."""
    return (sq_entries - 1) | (cq_entries - 1) << 16


def aqa_sizes(value: int) -> tuple[int, int]:
    """(admin SQ entries, admin CQ entries) from an AQA value."""
    return (value & 0xFFF) + 1, (value >> 16 & 0xFFF) + 1


def cap(mqes: int, timeout_units: int) -> int:
    """CAP of a controller with queues up to `mqes + 1` entries and a ready timeout."""
    return mqes | CAP_CQR | timeout_units << CAP_TO_SHIFT | CAP_CSS_NVM


def cap_max_entries(value: int) -> int:
    return (value & CAP_MQES_MASK) + 1


def cap_ready_timeout(value: int) -> float:
    """Seconds a host waits for CSTS.RDY to follow CC.EN (at least one unit)."""
    return max((value >> CAP_TO_SHIFT & 0xFF), 1) * TO_UNIT_S


def sq_doorbell(qid: int) -> int:
    """Doorbell index of SQ `qid`'s tail (stride 0: doorbells 4 bytes apart)."""
    return 2 * qid


def cq_doorbell(qid: int) -> int:
    """Doorbell index of CQ `qid`'s head."""
    return 2 * qid + 1


def doorbell_offset(index: int) -> int:
    return DOORBELL_BASE + 4 * index
