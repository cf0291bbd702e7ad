"""Command builders: what goes in the 64-byte SQE for each command nvmefs sends. No I/O.

A `Command` carries the SQE fields except command_id and PRPs (the engine owns those), the size of
its data transfer and its direction, and what a ring entry needs to say about it (slba, nlb).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# Admin opcodes
ADMIN_DELETE_SQ = 0x00
ADMIN_CREATE_SQ = 0x01
ADMIN_GET_LOG_PAGE = 0x02
ADMIN_DELETE_CQ = 0x04
ADMIN_CREATE_CQ = 0x05
ADMIN_IDENTIFY = 0x06
ADMIN_ABORT = 0x08
ADMIN_SET_FEATURES = 0x09
ADMIN_GET_FEATURES = 0x0A

# NVM opcodes
NVM_FLUSH = 0x00
NVM_WRITE = 0x01
NVM_READ = 0x02
NVM_COMPARE = 0x05
NVM_WRITE_ZEROES = 0x08
NVM_DSM = 0x09
NVM_VERIFY = 0x0C

# Identify CNS values
CNS_NAMESPACE = 0x00
CNS_CONTROLLER = 0x01
CNS_ACTIVE_NS_LIST = 0x02

# Log page identifiers and feature identifiers
LOG_ERROR = 0x01
LOG_SMART = 0x02
FEAT_ERROR_RECOVERY = 0x05
FEAT_NUM_QUEUES = 0x07
DULBE = 1 << 16

# Commands whose cdw10-12 are SLBA/NLB (the read/write family).
LBA_OPCODES = frozenset({NVM_WRITE, NVM_READ, NVM_COMPARE, NVM_WRITE_ZEROES, NVM_VERIFY, 0x04})

# The SQE as struct.pack sees it: opcode, flags, cid, nsid, cdw2, cdw3, mptr, prp1, prp2, cdw10-15.
SQE_FORMAT = struct.Struct("<BBHIIIQQQIIIIII")
CQE_FORMAT = struct.Struct("<IIHHHH")  # result, dw1, sq_head, sq_id, command_id, status
# Indexes of SQE_FORMAT's unpacked fields.
SQE_OPCODE, SQE_FLAGS, SQE_CID, SQE_NSID, SQE_MPTR, SQE_PRP1, SQE_PRP2 = 0, 1, 2, 3, 6, 7, 8
SQE_CDW10, SQE_CDW11, SQE_CDW12, SQE_CDW13, SQE_CDW14, SQE_CDW15 = range(9, 15)


@dataclass(slots=True)
class Command:
    """An NVMe command as nvmefs sends it: the SQE fields but command id and PRPs, and what
    the host needs to know about its data transfer."""

    opcode: int
    nsid: int = 0
    cdw10: int = 0
    cdw11: int = 0
    cdw12: int = 0
    cdw13: int = 0
    cdw14: int = 0
    cdw15: int = 0
    admin: bool = False
    data_len: int = 0  # bytes transferred through PRP1/PRP2
    to_device: bool = False  # host -> controller (write, compare, dsm ranges)
    data: bytes | None = None  # what to send when to_device
    timeout: float | None = None  # seconds; None takes the engine's io_timeout
    prp1: int = 0  # queue memory for Create I/O SQ/CQ (data buffers are the engine's)
    metadata: bytes | None = None  # separate metadata (protection information), passthrough only

    @property
    def slba(self) -> int | None:
        if self.admin or self.opcode not in LBA_OPCODES:
            return None
        return self.cdw10 | self.cdw11 << 32

    @property
    def nlb(self) -> int | None:
        if self.admin or self.opcode not in LBA_OPCODES:
            return None
        return (self.cdw12 & 0xFFFF) + 1


def _lba_cmd(opcode: int, nsid: int, slba: int, nlb: int, lba_size: int, **kw: object) -> Command:
    if not 1 <= nlb <= 0x10000:
        raise ValueError(f"nlb {nlb} outside 1..65536")
    return Command(opcode, nsid, slba & 0xFFFFFFFF, slba >> 32, nlb - 1, **kw)  # type: ignore[arg-type]


def read(nsid: int, slba: int, nlb: int, lba_size: int) -> Command:
    return _lba_cmd(NVM_READ, nsid, slba, nlb, lba_size, data_len=nlb * lba_size)


def write(nsid: int, slba: int, nlb: int, lba_size: int, data: bytes) -> Command:
    if len(data) != nlb * lba_size:
        raise ValueError(f"write of {nlb} blocks needs {nlb * lba_size} bytes, got {len(data)}")
    return _lba_cmd(
        NVM_WRITE, nsid, slba, nlb, lba_size, data_len=len(data), to_device=True, data=data
    )


def compare(nsid: int, slba: int, nlb: int, lba_size: int, data: bytes) -> Command:
    return _lba_cmd(
        NVM_COMPARE, nsid, slba, nlb, lba_size, data_len=len(data), to_device=True, data=data
    )


def verify(nsid: int, slba: int, nlb: int) -> Command:
    return _lba_cmd(NVM_VERIFY, nsid, slba, nlb, 0)


def write_zeroes(nsid: int, slba: int, nlb: int) -> Command:
    return _lba_cmd(NVM_WRITE_ZEROES, nsid, slba, nlb, 0)


def flush(nsid: int) -> Command:
    return Command(NVM_FLUSH, nsid)


def deallocate(nsid: int, ranges: list[tuple[int, int]]) -> Command:
    """Dataset Management with the Attribute-Deallocate bit, ranges as (slba, nlb)."""
    if not 1 <= len(ranges) <= 256:
        raise ValueError("DSM takes 1..256 ranges")
    data = b"".join(struct.pack("<IIQ", 0, nlb, slba) for slba, nlb in ranges)
    return Command(
        NVM_DSM, nsid, len(ranges) - 1, 1 << 2, data_len=len(data), to_device=True, data=data
    )


def identify(cns: int, nsid: int = 0) -> Command:
    return Command(ADMIN_IDENTIFY, nsid, cns, admin=True, data_len=4096)


def get_log_page(lid: int, nbytes: int, nsid: int = 0xFFFFFFFF, offset: int = 0) -> Command:
    numd = nbytes // 4 - 1
    return Command(
        ADMIN_GET_LOG_PAGE,
        nsid,
        lid | (numd & 0xFFFF) << 16,
        numd >> 16,
        offset & 0xFFFFFFFF,
        offset >> 32,
        admin=True,
        data_len=nbytes,
    )


def set_features(fid: int, cdw11: int, nsid: int = 0) -> Command:
    return Command(ADMIN_SET_FEATURES, nsid, fid, cdw11, admin=True)


def get_features(fid: int, nsid: int = 0) -> Command:
    return Command(ADMIN_GET_FEATURES, nsid, fid, admin=True)


def create_io_cq(qid: int, qsize: int, addr: int, vector: int = 0) -> Command:
    # cdw11: PC (physically contiguous) | IEN (interrupts enabled) | IV
    return Command(
        ADMIN_CREATE_CQ, 0, qid | (qsize - 1) << 16, 0b11 | vector << 16, admin=True, prp1=addr
    )


def create_io_sq(qid: int, qsize: int, cqid: int, addr: int) -> Command:
    return Command(
        ADMIN_CREATE_SQ, 0, qid | (qsize - 1) << 16, 0b1 | cqid << 16, admin=True, prp1=addr
    )


def delete_io_sq(qid: int) -> Command:
    return Command(ADMIN_DELETE_SQ, 0, qid, admin=True)


def delete_io_cq(qid: int) -> Command:
    return Command(ADMIN_DELETE_CQ, 0, qid, admin=True)


def abort(sqid: int, cid: int) -> Command:
    return Command(ADMIN_ABORT, 0, sqid | cid << 16, admin=True)
