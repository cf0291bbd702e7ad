"""The simulated controller: an in-process NVMe controller behind the register-level interface.

It consumes the same 64-byte SQEs and posts the same 16-byte CQEs as hardware, through queue
memory at bus addresses: the engine cannot tell it from a PCIe device, which is the point.

Theory of operation: a write to an SQ tail doorbell makes the controller consume every new SQE of
that queue at once (batching is free); each command is executed against sparse in-memory
namespaces and completed by writing a CQE with the current phase tag into the CQ and firing the
CQ's interrupt vector. A fault-plan rule can replace a command's status, delay its completion (a
trio task posts it later) or hang it (held until an Abort or a controller reset). Every error
completion it returns also goes into its Error Information log (newest first, ELPE+1 entries) and
media errors into the SMART/health log, as a real controller's would.
"""

from __future__ import annotations

import random
import struct
from collections import deque
from dataclasses import dataclass, field

import trio

from nvmefs.faults import FaultPlan
from nvmefs.nvme import commands as c
from nvmefs.nvme.commands import LBA_OPCODES, NVM_READ
from nvmefs.nvme.layouts import ERROR_LOG_ENTRY_SIZE, ffi, set_u128
from nvmefs.transport.base import (
    CC_EN,
    CSTS_RDY,
    DOORBELL_BASE,
    PAGE,
    REG_ACQ,
    REG_AQA,
    REG_ASQ,
    REG_CAP,
    REG_CC,
    REG_CSTS,
    REG_VS,
    Transport,
)

SQE = c.SQE_FORMAT
CQE = c.CQE_FORMAT

# Statuses the controller produces by itself (DNR set where QEMU sets it).
SC_SUCCESS = 0x0
SC_INVALID_OPCODE = 0x4001
SC_INVALID_FIELD = 0x4002
SC_ABORT_REQ = 0x0007
SC_INVALID_NS = 0x400B
SC_LBA_RANGE = 0x4080
SC_CQ_INVALID = 0x4100
SC_QID_INVALID = 0x4101
SC_QUEUE_SIZE = 0x4102
SC_INVALID_QUEUE_DELETION = 0x410C
SC_COMPARE_FAILED = 0x0285
SC_UNWRITTEN_BLOCK = 0x4287

MQES = 1023  # CAP.MQES: largest queue is 1024 entries
ELPE = 63  # error log holds 64 entries
MAX_QUEUES = 16
CHUNK_BLOCKS = 256
SERIAL = "NVMEFS-SIM-0001"
MODEL = "nvmefs simulated controller"
FIRMWARE = "0.1"


_ZEROS = memoryview(bytes(CHUNK_BLOCKS * 512))


class SparseNamespace:
    """Blocks in memory, allocated in chunks on first write; unwritten blocks read as zeros."""

    def __init__(self, nsid: int, nblocks: int, lba_size: int) -> None:
        self.nsid = nsid
        self.nblocks = nblocks
        self.lba_size = lba_size
        self.dulbe = False
        self._data: dict[int, bytearray] = {}
        self._written: dict[int, bytearray] = {}

    def _spans(self, slba: int, nlb: int) -> list[tuple[int, int, int, int]]:
        """(chunk, first block in chunk, blocks, byte offset in the transfer) per chunk touched."""
        spans = []
        done = 0
        while done < nlb:
            lba = slba + done
            chunk, first = divmod(lba, CHUNK_BLOCKS)
            n = min(CHUNK_BLOCKS - first, nlb - done)
            spans.append((chunk, first, n, done * self.lba_size))
            done += n
        return spans

    def read(self, slba: int, nlb: int, dest: memoryview) -> None:
        bs = self.lba_size
        chunk, first = divmod(slba, CHUNK_BLOCKS)
        if first + nlb <= CHUNK_BLOCKS:  # the common case: one chunk, no span list
            n = nlb * bs
            data = self._data.get(chunk)
            if data is None:
                dest[:n] = _ZEROS[:n] if n <= len(_ZEROS) else bytes(n)
            else:
                dest[:n] = memoryview(data)[first * bs : first * bs + n]
            return
        for chunk, first, n, off in self._spans(slba, nlb):
            data = self._data.get(chunk)
            if data is None:
                dest[off : off + n * bs] = bytes(n * bs)
            else:
                dest[off : off + n * bs] = data[first * bs : (first + n) * bs]

    def write(self, slba: int, nlb: int, src: memoryview | bytes) -> None:
        bs = self.lba_size
        for chunk, first, n, off in self._spans(slba, nlb):
            data = self._data.get(chunk)
            if data is None:
                data = self._data[chunk] = bytearray(CHUNK_BLOCKS * bs)
                self._written[chunk] = bytearray(CHUNK_BLOCKS)
            data[first * bs : (first + n) * bs] = src[off : off + n * bs]
            self._written[chunk][first : first + n] = b"\x01" * n

    def deallocate(self, slba: int, nlb: int) -> None:
        bs = self.lba_size
        for chunk, first, n, _ in self._spans(slba, nlb):
            if chunk in self._data:
                self._data[chunk][first * bs : (first + n) * bs] = bytes(n * bs)
                self._written[chunk][first : first + n] = bytes(n)

    def all_written(self, slba: int, nlb: int) -> bool:
        for chunk, first, n, _ in self._spans(slba, nlb):
            flags = self._written.get(chunk)
            if flags is None or 0 in flags[first : first + n]:
                return False
        return True


@dataclass(slots=True)
class _SimQueue:
    qid: int
    addr: int
    size: int
    cqid: int = 0  # SQ: its CQ
    head: int = 0  # SQ: controller's head; CQ: host's head (from the doorbell)
    tail: int = 0  # SQ: host's tail (doorbell); CQ: controller's tail
    phase: int = 1  # CQ only
    vector: int = 0  # CQ only
    view: memoryview = field(default_factory=lambda: memoryview(b""))


@dataclass(slots=True)
class _Held:
    """A command whose completion the fault plan delayed or hung."""

    sqid: int
    cid: int
    opcode: int
    nsid: int
    slba: int | None
    status: int


class SimController(Transport):
    name = "sim"

    def __init__(
        self,
        size: int = 64 << 20,
        lba_size: int = 512,
        namespaces: int = 1,
        faults: FaultPlan | None = None,
        seed: int = 0,
        abort_works: bool = True,
    ) -> None:
        super().__init__()
        if lba_size not in (512, 1024, 2048, 4096):
            raise ValueError(f"sim_lba {lba_size}: expected 512, 1024, 2048 or 4096")
        if size < lba_size or size % lba_size:
            raise ValueError(f"sim_size {size}: must be a positive multiple of sim_lba {lba_size}")
        if not 1 <= namespaces <= 16:
            raise ValueError(f"sim_ns {namespaces}: expected 1..16")
        self.namespaces = {
            n: SparseNamespace(n, size // lba_size, lba_size) for n in range(1, namespaces + 1)
        }
        self.faults = faults
        self.rng = random.Random(seed)
        self.abort_works = abort_works
        self.cc = 0
        self.csts = 0
        self.aqa = 0
        self.asq = 0
        self.acq = 0
        self.sqs: dict[int, _SimQueue] = {}
        self.cqs: dict[int, _SimQueue] = {}
        self.held: list[_Held] = []
        self.error_log: deque[bytes] = deque(maxlen=ELPE + 1)
        self.error_count = 0
        self.media_errors = 0
        self.critical_warning = 0
        self.num_queues_granted = 0
        self.commands = 0
        self._irq: dict[int, trio.Event] = {}
        self._irq_pending: set[int] = set()
        self._irq_masked: set[int] = set()
        self._nursery: trio.Nursery | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    async def stop(self) -> None:
        self._nursery = None

    # -- registers ------------------------------------------------------------------------------

    def read32(self, offset: int) -> int:
        if offset == REG_VS:
            return 0x00010400  # NVMe 1.4
        if offset == REG_CC:
            return self.cc
        if offset == REG_CSTS:
            return self.csts
        if offset == REG_AQA:
            return self.aqa
        return self.read64(offset) & 0xFFFFFFFF

    def read64(self, offset: int) -> int:
        if offset == REG_CAP:
            # MQES, CQR (contiguous queues required), TO = 1 s (2 x 500 ms), CSS: NVM.
            return MQES | 1 << 16 | 2 << 24 | 1 << 37
        if offset == REG_ASQ:
            return self.asq
        if offset == REG_ACQ:
            return self.acq
        return 0

    def write32(self, offset: int, value: int) -> None:
        if offset == REG_CC:
            was = self.cc & CC_EN
            self.cc = value
            if value & CC_EN and not was:
                self._enable()
            elif was and not value & CC_EN:
                self._disable()
        elif offset == REG_AQA:
            self.aqa = value
        elif offset >= DOORBELL_BASE:
            self.doorbell((offset - DOORBELL_BASE) // 4, value)

    def write64(self, offset: int, value: int) -> None:
        if offset == REG_ASQ:
            self.asq = value
        elif offset == REG_ACQ:
            self.acq = value

    def _enable(self) -> None:
        asqs = (self.aqa & 0xFFF) + 1
        acqs = ((self.aqa >> 16) & 0xFFF) + 1
        try:
            self.cqs[0] = self._queue(0, self.acq, acqs, CQE.size)
            self.sqs[0] = self._queue(0, self.asq, asqs, SQE.size)
        except ValueError:
            self.csts = 2  # CFS: controller fatal status
            return
        self.csts = CSTS_RDY

    def _disable(self) -> None:
        # A reset forgets every queue and every held command: their hosts will not hear back.
        self.sqs.clear()
        self.cqs.clear()
        self.held.clear()
        self.csts = 0

    def _queue(self, qid: int, addr: int, size: int, entry: int) -> _SimQueue:
        q = _SimQueue(qid, addr, size)
        q.view = self.dma.view(addr, size * entry)
        return q

    # -- interrupts -----------------------------------------------------------------------------

    def _fire(self, vector: int) -> None:
        # Latched until the host waits: an interrupt raised before the reaper runs is not lost.
        self._irq_pending.add(vector)
        if vector in self._irq_masked:
            return
        ev = self._irq.get(vector)
        if ev is not None:
            ev.set()

    def mask_interrupt(self, vector: int) -> None:
        self._irq_masked.add(vector)

    def unmask_interrupt(self, vector: int) -> None:
        # Level semantics, as INTMC: fire now only if entries are still waiting for the host.
        self._irq_masked.discard(vector)
        if vector in self._irq_pending:
            if any(cq.vector == vector and cq.head != cq.tail for cq in self.cqs.values()):
                self._fire(vector)
            else:
                self._irq_pending.discard(vector)

    async def wait_interrupt(self, vector: int) -> None:
        while vector not in self._irq_pending:
            ev = self._irq[vector] = trio.Event()
            await ev.wait()
        self._irq_pending.discard(vector)

    # -- doorbells and command processing -------------------------------------------------------

    def doorbell(self, index: int, value: int) -> None:
        qid, is_cq = divmod(index, 2)
        if is_cq:
            cq = self.cqs.get(qid)
            if cq is not None:
                cq.head = value
            return
        sq = self.sqs.get(qid)
        if sq is None or not self.csts & CSTS_RDY:
            return
        sq.tail = value
        cq = self.cqs[sq.cqid]
        unpack, size, execute = SQE.unpack_from, SQE.size, self._execute
        posted = False
        while sq.head != sq.tail:
            raw = unpack(sq.view, sq.head * size)
            sq.head = (sq.head + 1) % sq.size
            self.commands += 1
            status, result = execute(sq, raw)
            if status is not None:
                self._post(cq, sq, raw[2], status, result)
                posted = True
        if posted:
            self._fire(cq.vector)

    def _post(self, cq: _SimQueue, sq: _SimQueue, cid: int, status: int, result: int) -> None:
        CQE.pack_into(
            cq.view, cq.tail * CQE.size, result, 0, sq.head, sq.qid, cid, status << 1 | cq.phase
        )
        cq.tail += 1
        if cq.tail == cq.size:
            cq.tail = 0
            cq.phase ^= 1

    def _execute(self, sq: _SimQueue, raw: tuple[int, ...]) -> tuple[int | None, int]:
        """Run one command; (None, 0) when its completion is held back by a fault rule."""
        opcode, _flags, cid, nsid = raw[0], raw[1], raw[2], raw[3]
        admin = sq.qid == 0
        slba = nlb = None
        if not admin and opcode in LBA_OPCODES:
            slba, nlb = raw[9] | raw[10] << 32, (raw[11] & 0xFFFF) + 1
        rule = None
        if not admin and self.faults is not None:
            rule = self.faults.pick(opcode, nsid, slba, nlb, self.rng)
        if rule is not None and not rule.hang and rule.delay_ms == 0:
            status, result = rule.status, 0
        else:
            try:
                status, result = (self._admin if admin else self._io)(sq, raw)
            except ValueError:  # a PRP pointing nowhere
                status, result = 0x4004, 0  # Data Transfer Error
            if rule is not None:
                status = rule.status
        if status & 0x7FF:
            self._log_error(sq.qid, cid, status, opcode, nsid, slba)
        if rule is not None and (rule.hang or rule.delay_ms):
            held = _Held(sq.qid, cid, opcode, nsid, slba, status)
            self.held.append(held)
            if not rule.hang and self._nursery is not None:
                self._nursery.start_soon(self._release_later, held, rule.delay_ms / 1000)
            return None, 0
        return status, result

    async def _release_later(self, held: _Held, delay: float) -> None:
        await trio.sleep(delay)
        if held in self.held:  # not aborted or reset meanwhile
            self.held.remove(held)
            self._complete_held(held, held.status)

    def _complete_held(self, held: _Held, status: int) -> None:
        sq = self.sqs.get(held.sqid)
        if sq is None:
            return
        cq = self.cqs[sq.cqid]
        self._post(cq, sq, held.cid, status, 0)
        self._fire(cq.vector)

    def _log_error(
        self, sqid: int, cid: int, status: int, opcode: int, nsid: int, lba: int | None
    ) -> None:
        self.error_count += 1
        entry = ffi.new("struct nvme_error_log_entry *")
        entry.error_count = self.error_count
        entry.sqid, entry.cmdid = sqid, cid
        entry.status_field = status << 1
        entry.parm_error_location = 0xFFFF
        entry.lba = lba or 0
        entry.nsid = nsid
        entry.opcode = opcode
        self.error_log.appendleft(bytes(ffi.buffer(entry)))
        if status >> 8 & 7 == 2:  # SCT 2: media and data integrity errors
            self.media_errors += 1

    # -- data transfer --------------------------------------------------------------------------

    def _prp_pages(self, prp1: int, prp2: int, length: int) -> list[memoryview]:
        """The host memory a command's PRPs describe, as views in transfer order."""
        first = min(length, PAGE - prp1 % PAGE)
        views = [self.dma.view(prp1, first)]
        left = length - first
        if left <= 0:
            return views
        if left <= PAGE:
            views.append(self.dma.view(prp2, left))
            return views
        npages = -(-left // PAGE)
        entries = struct.unpack_from(f"<{npages}Q", self.dma.view(prp2, npages * 8))
        for addr in entries:
            n = min(PAGE, left)
            views.append(self.dma.view(addr, n))
            left -= n
        return views

    def _to_host(self, raw: tuple[int, ...], data: bytes | memoryview) -> None:
        off = 0
        for view in self._prp_pages(raw[7], raw[8], len(data)):
            view[:] = data[off : off + len(view)]
            off += len(view)

    def _from_host(self, raw: tuple[int, ...], length: int) -> bytes:
        return b"".join(bytes(v) for v in self._prp_pages(raw[7], raw[8], length))

    # -- NVM command set ------------------------------------------------------------------------

    def _io(self, sq: _SimQueue, raw: tuple[int, ...]) -> tuple[int, int]:
        opcode, nsid = raw[0], raw[3]
        ns = self.namespaces.get(nsid)
        if ns is None:
            return SC_INVALID_NS, 0
        if opcode == NVM_READ:  # the hot path, ahead of the other commands
            slba, nlb, prp1 = raw[9] | raw[10] << 32, (raw[11] & 0xFFFF) + 1, raw[7]
            if slba + nlb > ns.nblocks:
                return SC_LBA_RANGE, 0
            if ns.dulbe and not ns.all_written(slba, nlb):
                return SC_UNWRITTEN_BLOCK, 0
            nbytes = nlb * ns.lba_size
            if nbytes <= PAGE - prp1 % PAGE:  # one host page: read straight into it
                ns.read(slba, nlb, self.dma.view(prp1, nbytes))
            else:
                buf = memoryview(bytearray(nbytes))
                ns.read(slba, nlb, buf)
                self._to_host(raw, buf)
            return SC_SUCCESS, 0
        if opcode == c.NVM_FLUSH:
            return SC_SUCCESS, 0
        if opcode == c.NVM_DSM:
            nr = (raw[9] & 0xFF) + 1
            raw_ranges = self._from_host(raw, nr * 16)
            ranges = [struct.unpack_from("<IIQ", raw_ranges, i * 16)[1:] for i in range(nr)]
            if any(start + count > ns.nblocks for count, start in ranges):
                return SC_LBA_RANGE, 0
            if raw[10] & 1 << 2:  # AD: deallocate
                for count, start in ranges:
                    ns.deallocate(start, count)
            return SC_SUCCESS, 0
        if opcode not in (c.NVM_WRITE, c.NVM_COMPARE, c.NVM_VERIFY, c.NVM_WRITE_ZEROES):
            return SC_INVALID_OPCODE, 0
        slba, nlb = raw[9] | raw[10] << 32, (raw[11] & 0xFFFF) + 1
        if slba + nlb > ns.nblocks:
            return SC_LBA_RANGE, 0
        nbytes = nlb * ns.lba_size
        if opcode == c.NVM_WRITE:
            ns.write(slba, nlb, self._from_host(raw, nbytes))
        elif opcode == c.NVM_WRITE_ZEROES:
            ns.write(slba, nlb, bytes(nbytes))
        elif opcode == c.NVM_COMPARE:
            stored = memoryview(bytearray(nbytes))
            ns.read(slba, nlb, stored)
            if stored != self._from_host(raw, nbytes):
                return SC_COMPARE_FAILED, 0
        elif opcode == c.NVM_VERIFY and ns.dulbe and not ns.all_written(slba, nlb):
            return SC_UNWRITTEN_BLOCK, 0
        return SC_SUCCESS, 0

    # -- admin command set ----------------------------------------------------------------------

    def _admin(self, sq: _SimQueue, raw: tuple[int, ...]) -> tuple[int, int]:
        opcode, nsid, cdw10, cdw11 = raw[0], raw[3], raw[9], raw[10]
        if opcode == c.ADMIN_IDENTIFY:
            return self._identify(raw, cdw10 & 0xFF, nsid)
        if opcode == c.ADMIN_CREATE_CQ:
            qid, qsize = cdw10 & 0xFFFF, (cdw10 >> 16) + 1
            if not 1 <= qid < MAX_QUEUES or qid in self.cqs:
                return SC_QID_INVALID, 0
            if not 2 <= qsize <= MQES + 1:
                return SC_QUEUE_SIZE, 0
            cq = self._queue(qid, raw[7], qsize, CQE.size)
            cq.vector = cdw11 >> 16
            self.cqs[qid] = cq
            return SC_SUCCESS, 0
        if opcode == c.ADMIN_CREATE_SQ:
            qid, qsize, cqid = cdw10 & 0xFFFF, (cdw10 >> 16) + 1, cdw11 >> 16
            if not 1 <= qid < MAX_QUEUES or qid in self.sqs:
                return SC_QID_INVALID, 0
            if cqid not in self.cqs or cqid == 0:
                return SC_CQ_INVALID, 0
            if not 2 <= qsize <= MQES + 1:
                return SC_QUEUE_SIZE, 0
            q = self._queue(qid, raw[7], qsize, SQE.size)
            q.cqid = cqid
            self.sqs[qid] = q
            return SC_SUCCESS, 0
        if opcode == c.ADMIN_DELETE_SQ:
            qid = cdw10 & 0xFFFF
            if qid == 0 or qid not in self.sqs:
                return SC_QID_INVALID, 0
            del self.sqs[qid]
            self.held = [h for h in self.held if h.sqid != qid]
            return SC_SUCCESS, 0
        if opcode == c.ADMIN_DELETE_CQ:
            qid = cdw10 & 0xFFFF
            if qid == 0 or qid not in self.cqs:
                return SC_QID_INVALID, 0
            if any(s.cqid == qid for s in self.sqs.values()):
                return SC_INVALID_QUEUE_DELETION, 0
            del self.cqs[qid]
            return SC_SUCCESS, 0
        if opcode == c.ADMIN_GET_LOG_PAGE:
            return self._get_log_page(raw)
        if opcode in (c.ADMIN_SET_FEATURES, c.ADMIN_GET_FEATURES):
            return self._features(opcode == c.ADMIN_SET_FEATURES, cdw10 & 0xFF, cdw11, nsid)
        if opcode == c.ADMIN_ABORT:
            sqid, cid = cdw10 & 0xFFFF, cdw10 >> 16
            for held in self.held:
                if held.sqid == sqid and held.cid == cid and self.abort_works:
                    self.held.remove(held)
                    self._complete_held(held, SC_ABORT_REQ)
                    return SC_SUCCESS, 0  # dword 0 bit 0 clear: the command was aborted
            return SC_SUCCESS, 1  # not aborted
        return SC_INVALID_OPCODE, 0

    def _identify(self, raw: tuple[int, ...], cns: int, nsid: int) -> tuple[int, int]:
        if cns == c.CNS_CONTROLLER:
            ctrl = ffi.new("struct nvme_id_ctrl *")
            ctrl.vid = ctrl.ssvid = 0x1B36  # QEMU's vendor id: a virtual device
            ffi.memmove(ctrl.sn, SERIAL.ljust(20).encode(), 20)
            ffi.memmove(ctrl.mn, MODEL.ljust(40).encode(), 40)
            ffi.memmove(ctrl.fr, FIRMWARE.ljust(8).encode(), 8)
            ctrl.mdts = 7  # 2^7 pages: 512 KiB transfers
            ctrl.ver = 0x00010400
            ctrl.crdt1, ctrl.crdt2, ctrl.crdt3 = 1, 5, 10  # 100 ms units
            ctrl.acl = 3
            ctrl.elpe = ELPE
            ctrl.lpa = 0
            ctrl.sqes, ctrl.cqes = 0x66, 0x44
            ctrl.nn = len(self.namespaces)
            ctrl.oncs = 0b1101  # Compare, DSM, Write Zeroes
            self._to_host(raw, ffi.buffer(ctrl))
            return SC_SUCCESS, 0
        if cns == c.CNS_NAMESPACE:
            ns = self.namespaces.get(nsid)
            if ns is None:
                return SC_INVALID_NS, 0
            idns = ffi.new("struct nvme_id_ns *")
            idns.nsze = idns.ncap = ns.nblocks
            idns.nuse = ns.nblocks
            idns.nsfeat = 1 << 2  # DAE: deallocated or unwritten logical block error supported
            idns.nlbaf = 0
            idns.flbas = 0
            idns.dlfeat = 1  # deallocated blocks read as zeros
            idns.lbaf[0].ds = ns.lba_size.bit_length() - 1
            self._to_host(raw, ffi.buffer(idns))
            return SC_SUCCESS, 0
        if cns == c.CNS_ACTIVE_NS_LIST:
            ids = sorted(n for n in self.namespaces if n > nsid)
            self._to_host(raw, struct.pack(f"<{len(ids)}I", *ids).ljust(4096, b"\0"))
            return SC_SUCCESS, 0
        return SC_INVALID_FIELD, 0

    def _get_log_page(self, raw: tuple[int, ...]) -> tuple[int, int]:
        cdw10, cdw11 = raw[9], raw[10]
        lid = cdw10 & 0xFF
        nbytes = ((cdw10 >> 16 | (cdw11 & 0xFFFF) << 16) + 1) * 4
        offset = raw[11] | raw[12] << 32
        if lid == c.LOG_ERROR:
            page = b"".join(self.error_log).ljust((ELPE + 1) * ERROR_LOG_ENTRY_SIZE, b"\0")
        elif lid == c.LOG_SMART:
            smart = ffi.new("struct nvme_smart_log *")
            smart.critical_warning = self.critical_warning
            smart.temperature[0], smart.temperature[1] = 0x41, 0x01  # 321 K
            smart.avail_spare, smart.spare_thresh = 100, 10
            set_u128(smart.media_errors, self.media_errors)
            set_u128(smart.num_err_log_entries, self.error_count)
            set_u128(smart.power_cycles, 1)
            page = bytes(ffi.buffer(smart))
        else:
            return SC_INVALID_FIELD, 0
        if offset % 4 or offset >= len(page):
            return SC_INVALID_FIELD, 0
        self._to_host(raw, page[offset : offset + nbytes].ljust(nbytes, b"\0"))
        return SC_SUCCESS, 0

    def _features(self, set_: bool, fid: int, cdw11: int, nsid: int) -> tuple[int, int]:
        if fid == c.FEAT_NUM_QUEUES:
            if set_:
                want = min(cdw11 & 0xFFFF, MAX_QUEUES - 2)
                self.num_queues_granted = want | want << 16
            return SC_SUCCESS, self.num_queues_granted
        if fid == c.FEAT_ERROR_RECOVERY:
            if nsid in (0, 0xFFFFFFFF):
                targets = list(self.namespaces.values())
            else:
                targets = [self.namespaces[nsid]] if nsid in self.namespaces else []
            if not targets:
                return SC_INVALID_NS, 0
            if set_:
                for ns in targets:
                    ns.dulbe = bool(cdw11 & c.DULBE)
            return SC_SUCCESS, c.DULBE if targets[0].dulbe else 0
        return SC_INVALID_FIELD, 0
