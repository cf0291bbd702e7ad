"""The simulated controller at the register level: what it reports, and how it answers commands.

A minimal host drives it here (no engine): the doorbell write runs each command at once, so a
completion is in the CQ as soon as the SQ doorbell returns.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest

from nvmefs.engine.transport import DmaBuffer
from nvmefs.errors import UsageError
from nvmefs.nvme import commands as c
from nvmefs.nvme import prp, registers
from nvmefs.nvme.commands import CQE_FORMAT, SQE_FORMAT
from nvmefs.nvme.prp import PAGE
from nvmefs.nvme.status import DNR, SCT_MEDIA, sct_of
from nvmefs.nvme.tables import (
    SC_DATA_TRANSFER_ERROR,
    SC_INVALID_OPCODE,
    SC_LBA_RANGE,
    SC_READ_ERROR,
    SC_SUCCESS,
)
from nvmefs.sim import faults
from nvmefs.sim.controller import SERIAL, SimController

DEPTH = 8
UNMAPPED = 0x10  # below every DmaMemory region


class Queue:
    """One SQ/CQ pair as the host sees it."""

    def __init__(self, sim: SimController, qid: int) -> None:
        self.qid = qid
        self.sq = sim.dma.alloc(DEPTH * SQE_FORMAT.size)
        self.cq = sim.dma.alloc(DEPTH * CQE_FORMAT.size)
        self.tail = self.head = 0
        self.phase = 1


class Host:
    """Enables the controller with admin queues and submits one command at a time."""

    def __init__(self, sim: SimController) -> None:
        self.sim = sim
        self.admin = Queue(sim, 0)
        sim.write32(registers.AQA, registers.aqa(DEPTH, DEPTH))
        sim.write64(registers.ASQ, self.admin.sq.addr)
        sim.write64(registers.ACQ, self.admin.cq.addr)
        sim.write32(registers.CC, registers.cc_enable())
        assert sim.read32(registers.CSTS) & registers.CSTS_RDY

    def submit(self, q: Queue, cmd: c.Command, prp1: int = 0, prp2: int = 0) -> tuple[int, int]:
        """(status word, dword 0) of `cmd` with these PRPs."""
        cid = q.tail
        SQE_FORMAT.pack_into(
            q.sq.view, q.tail * SQE_FORMAT.size, cmd.opcode, 0, cid, cmd.nsid, 0, 0, 0,
            prp1 or cmd.prp1, prp2, cmd.cdw10, cmd.cdw11, cmd.cdw12, cmd.cdw13, cmd.cdw14,
            cmd.cdw15,
        )  # fmt: skip
        q.tail = (q.tail + 1) % DEPTH
        self.sim.write32(registers.doorbell_offset(registers.sq_doorbell(q.qid)), q.tail)
        result, _, _, sqid, got_cid, field = CQE_FORMAT.unpack_from(
            q.cq.view, q.head * CQE_FORMAT.size
        )
        assert field & 1 == q.phase and (sqid, got_cid) == (q.qid, cid)
        q.head = (q.head + 1) % DEPTH
        if q.head == 0:
            q.phase ^= 1
        self.sim.write32(registers.doorbell_offset(registers.cq_doorbell(q.qid)), q.head)
        return field >> 1, result

    def io_queue(self) -> Queue:
        q = Queue(self.sim, 1)
        assert self.submit(self.admin, c.create_io_cq(1, DEPTH, q.cq.addr))[0] == SC_SUCCESS
        assert self.submit(self.admin, c.create_io_sq(1, DEPTH, 1, q.sq.addr))[0] == SC_SUCCESS
        return q

    def prps(self, buf: DmaBuffer, offset: int, length: int) -> tuple[int, int]:
        """PRP1/PRP2 for `length` bytes at `offset` into `buf`, with PRP lists if needed."""
        addr = buf.addr + offset
        entries, npages = prp.plan(addr, length)
        if npages == 0:
            return addr, entries[0] if entries else 0
        lists = [self.sim.dma.alloc(PAGE) for _ in range(npages)]
        for page, content in zip(
            lists, prp.list_pages(entries, [b.addr for b in lists]), strict=True
        ):
            page.view[: len(content)] = content
        return addr, lists[0].addr


def test_registers_read_back_through_the_decoders() -> None:
    sim = SimController()
    cap = sim.read64(registers.CAP)
    assert registers.cap_max_entries(cap) == 1024
    assert registers.cap_ready_timeout(cap) == 1.0
    assert cap & registers.CAP_CQR and cap & registers.CAP_CSS_NVM
    assert sim.read32(registers.VS) == registers.VERSION_1_4
    assert sim.read32(registers.CSTS) == 0
    Host(sim)
    assert sim.read32(registers.CSTS) == registers.CSTS_RDY
    assert registers.aqa_sizes(sim.read32(registers.AQA)) == (DEPTH, DEPTH)
    sim.write32(registers.CC, 0)
    assert sim.read32(registers.CSTS) == 0


def test_admin_queues_in_no_memory_are_fatal() -> None:
    sim = SimController()
    sim.write32(registers.AQA, registers.aqa(DEPTH, DEPTH))
    sim.write64(registers.ASQ, UNMAPPED)
    sim.write64(registers.ACQ, UNMAPPED)
    sim.write32(registers.CC, registers.cc_enable())
    assert sim.read32(registers.CSTS) == registers.CSTS_CFS


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lba_size": 520}, "sim_lba 520"),
        ({"size": 1000}, "sim_size 1000"),
        ({"size": 0}, "sim_size 0"),
        ({"namespaces": 17}, "sim_ns 17"),
    ],
)
def test_bad_geometry_is_a_usage_error(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        SimController(**kwargs)


def test_identify_and_a_prp_to_no_memory() -> None:
    sim = SimController()
    host = Host(sim)
    buf = sim.dma.alloc(PAGE)
    assert host.submit(host.admin, c.identify(c.CNS_CONTROLLER), buf.addr) == (SC_SUCCESS, 0)
    assert SERIAL.encode() in bytes(buf.view)
    status, _ = host.submit(host.admin, c.identify(c.CNS_CONTROLLER), UNMAPPED)
    assert status == DNR | SC_DATA_TRANSFER_ERROR
    assert host.submit(host.admin, c.Command(0x7F, admin=True))[0] == DNR | SC_INVALID_OPCODE
    assert sim.error_count == 2 and sim.media_errors == 0


@pytest.mark.parametrize(
    ("offset", "length"), [(0, 4096), (512, 8192), (0, 3 << 20), (1024, 3 << 20)]
)
def test_write_read_round_trip_through_prp_lists(offset: int, length: int) -> None:
    # 3 MiB: 768 data pages, more than one list page holds, so the list is chained.
    sim = SimController()
    host = Host(sim)
    q = host.io_queue()
    data = bytes(i * 7 % 251 for i in range(length))
    src = sim.dma.alloc(offset + length)
    src.view[offset : offset + length] = data
    nlb = length // 512
    write = c.write(1, 8, nlb, 512, data)
    assert host.submit(q, write, *host.prps(src, offset, length)) == (SC_SUCCESS, 0)
    dst = sim.dma.alloc(offset + length)
    assert host.submit(q, c.read(1, 8, nlb, 512), *host.prps(dst, offset, length))[0] == 0
    assert bytes(dst.view[offset : offset + length]) == data


def test_misaligned_prp_list_entry_is_a_data_transfer_error() -> None:
    sim = SimController()
    host = Host(sim)
    q = host.io_queue()
    dst = sim.dma.alloc(4 * PAGE)
    prp1, prp2 = host.prps(dst, 0, 4 * PAGE)
    struct.pack_into("<Q", sim.dma.view(prp2, 8), 0, dst.addr + PAGE + 8)  # was dst.addr + PAGE
    status, _ = host.submit(q, c.read(1, 0, 32, 512), prp1, prp2)
    assert status == DNR | SC_DATA_TRANSFER_ERROR


def test_out_of_range_and_media_errors() -> None:
    plan = faults.parse(f"[[fault]]\nopcode = 'read'\nlba = 100\nstatus = {SC_READ_ERROR}\n", "t")
    sim = SimController(size=1 << 20, faults=plan)
    host = Host(sim)
    q = host.io_queue()
    buf = sim.dma.alloc(PAGE)
    assert host.submit(q, c.read(1, 2048, 1, 512), buf.addr)[0] == DNR | SC_LBA_RANGE
    assert sim.media_errors == 0
    status, _ = host.submit(q, c.read(1, 100, 1, 512), buf.addr)
    assert status == SC_READ_ERROR and sct_of(status) == SCT_MEDIA
    assert sim.media_errors == 1 and sim.error_count == 2
