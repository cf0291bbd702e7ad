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

from nvmefs.engine.transport import Transport
from nvmefs.errors import UsageError
from nvmefs.nvme import commands as c
from nvmefs.nvme import prp
from nvmefs.nvme.commands import (
    LBA_OPCODES,
    NVM_READ,
    SQE_CDW10,
    SQE_CDW11,
    SQE_CDW12,
    SQE_CDW13,
    SQE_CID,
    SQE_NSID,
    SQE_OPCODE,
    SQE_PRP1,
    SQE_PRP2,
)
from nvmefs.nvme.layouts import ERROR_LOG_ENTRY_SIZE, ffi, set_u128
from nvmefs.nvme.prp import PAGE, PrpError
from nvmefs.nvme.registers import (
    ACQ,
    AQA,
    ASQ,
    CAP,
    CC,
    CC_EN,
    CQE_SHIFT,
    CSTS,
    CSTS_CFS,
    CSTS_RDY,
    DOORBELL_BASE,
    SQE_SHIFT,
    VERSION_1_4,
    VS,
    aqa_sizes,
    cap,
    doorbell_offset,
)
from nvmefs.nvme.status import DNR, SCT_MEDIA, SCT_SC_MASK, sct_of
from nvmefs.nvme.tables import (
    SC_ABORT_REQ,
    SC_COMPARE_FAILED,
    SC_CQ_INVALID,
    SC_DATA_TRANSFER_ERROR,
    SC_INVALID_FIELD,
    SC_INVALID_NS,
    SC_INVALID_OPCODE,
    SC_INVALID_QUEUE_DELETION,
    SC_LBA_RANGE,
    SC_QID_INVALID,
    SC_QUEUE_SIZE,
    SC_SUCCESS,
    SC_UNWRITTEN_BLOCK,
)
from nvmefs.sim.faults import FaultPlan

SQE = c.SQE_FORMAT
CQE = c.CQE_FORMAT

# The statuses the controller produces by itself are SC_* codes from nvme.tables, with DNR set
# where QEMU sets it: on every one but Command Abort Requested and Compare Failure.

MQES = 1023  # CAP.MQES: largest queue is 1024 entries
READY_TIMEOUT_UNITS = 2  # CAP.TO: 1 s, in 500 ms units
CAP_VALUE = cap(MQES, READY_TIMEOUT_UNITS)  # with CQR (contiguous queues) and CSS: NVM
DOORBELL_STRIDE = doorbell_offset(1) - doorbell_offset(0)
ELPE = 63  # error log holds 64 entries
MDTS = 7  # largest transfer: 2^7 pages, 512 KiB
MAX_TRANSFER = (1 << MDTS) * PAGE
MAX_QUEUES = 16
CHUNK_BLOCKS = 256
SERIAL = "NVMEFS-SIM-0001"
MODEL = "nvmefs simulated controller"
FIRMWARE = "0.1"


_ZEROS = memoryview(bytes(CHUNK_BLOCKS * 512))


class SparseNamespace:
    """One namespace's blocks in memory, allocated in chunks of CHUNK_BLOCKS on first write.

    Invariant: a chunk is in `_data` exactly when it is in `_written` (its per-block written
    flags); blocks of an absent chunk, or deallocated ones, read as zeros.
    """

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
    """One submission or completion queue as the controller tracks it; `view` is its memory."""

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
    """An in-process NVMe controller behind the register-level Transport interface.

    Invariant: commands are consumed only while CSTS.RDY is set, that is from an enable (CC.EN
    0 -> 1) that found the admin queues in host memory until the next disable; every consumed
    command is completed exactly once, unless the fault plan held it (`held`) and a reset or the
    deletion of its SQ dropped it first.
    """

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
            raise UsageError(f"sim_lba {lba_size}: expected 512, 1024, 2048 or 4096")
        if size < lba_size or size % lba_size:
            raise UsageError(f"sim_size {size}: must be a positive multiple of sim_lba {lba_size}")
        if not 1 <= namespaces <= 16:
            raise UsageError(f"sim_ns {namespaces}: expected 1..16")
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
        if offset == VS:
            return VERSION_1_4
        if offset == CC:
            return self.cc
        if offset == CSTS:
            return self.csts
        if offset == AQA:
            return self.aqa
        return self.read64(offset) & 0xFFFFFFFF

    def read64(self, offset: int) -> int:
        if offset == CAP:
            return CAP_VALUE
        if offset == ASQ:
            return self.asq
        if offset == ACQ:
            return self.acq
        return 0

    def write32(self, offset: int, value: int) -> None:
        if offset == CC:
            was = self.cc & CC_EN
            self.cc = value
            if value & CC_EN and not was:
                self._enable()
            elif was and not value & CC_EN:
                self._disable()
        elif offset == AQA:
            self.aqa = value
        elif offset >= DOORBELL_BASE:
            self.doorbell((offset - DOORBELL_BASE) // DOORBELL_STRIDE, value)

    def write64(self, offset: int, value: int) -> None:
        if offset == ASQ:
            self.asq = value
        elif offset == ACQ:
            self.acq = value

    def _enable(self) -> None:
        asqs, acqs = aqa_sizes(self.aqa)
        try:
            self.cqs[0] = self._queue(0, self.acq, acqs, CQE.size)
            self.sqs[0] = self._queue(0, self.asq, asqs, SQE.size)
        except PrpError:  # admin queues in no host memory
            self.csts = CSTS_CFS
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
        qid, is_cq = divmod(index, 2)  # registers.sq_doorbell / cq_doorbell
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
                self._post(cq, sq, raw[SQE_CID], status, result)
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
        opcode, cid, nsid = raw[SQE_OPCODE], raw[SQE_CID], raw[SQE_NSID]
        admin = sq.qid == 0
        slba = nlb = None
        if not admin and opcode in LBA_OPCODES:
            slba, nlb = raw[SQE_CDW10] | raw[SQE_CDW11] << 32, (raw[SQE_CDW12] & 0xFFFF) + 1
        rule = None
        if not admin and self.faults is not None:
            rule = self.faults.pick(opcode, nsid, slba, nlb, self.rng)
        if rule is not None and not rule.hang and rule.delay_ms == 0:
            status, result = rule.status, 0
        else:
            try:
                status, result = (self._admin if admin else self._io)(sq, raw)
            except PrpError:  # a PRP misaligned or pointing nowhere
                status, result = DNR | SC_DATA_TRANSFER_ERROR, 0
            if rule is not None:
                status = rule.status
        if status & SCT_SC_MASK:
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
        if sct_of(status) == SCT_MEDIA:
            self.media_errors += 1

    # -- data transfer --------------------------------------------------------------------------

    def _to_host(self, raw: tuple[int, ...], data: bytes | memoryview) -> None:
        """Copy `data` into the host memory the command's PRPs describe; raises PrpError."""
        view = self.dma.view
        off = 0
        for addr, n in prp.walk(raw[SQE_PRP1], raw[SQE_PRP2], len(data), view):
            view(addr, n)[:] = data[off : off + n]
            off += n

    def _from_host(self, raw: tuple[int, ...], length: int) -> bytes:
        """The `length` bytes of host memory the command's PRPs describe; raises PrpError."""
        view = self.dma.view
        segments = prp.walk(raw[SQE_PRP1], raw[SQE_PRP2], length, view)
        return b"".join([view(addr, n) for addr, n in segments])

    # -- NVM command set ------------------------------------------------------------------------

    def _io(self, sq: _SimQueue, raw: tuple[int, ...]) -> tuple[int, int]:
        opcode, nsid = raw[SQE_OPCODE], raw[SQE_NSID]
        ns = self.namespaces.get(nsid)
        if ns is None:
            return DNR | SC_INVALID_NS, 0
        if opcode == NVM_READ:  # the hot path, ahead of the other commands
            slba = raw[SQE_CDW10] | raw[SQE_CDW11] << 32
            nlb, prp1 = (raw[SQE_CDW12] & 0xFFFF) + 1, raw[SQE_PRP1]
            if slba + nlb > ns.nblocks:
                return DNR | SC_LBA_RANGE, 0
            if ns.dulbe and not ns.all_written(slba, nlb):
                return DNR | SC_UNWRITTEN_BLOCK, 0
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
            nr = (raw[SQE_CDW10] & 0xFF) + 1
            raw_ranges = self._from_host(raw, nr * 16)
            ranges = [struct.unpack_from("<IIQ", raw_ranges, i * 16)[1:] for i in range(nr)]
            if any(start + count > ns.nblocks for count, start in ranges):
                return DNR | SC_LBA_RANGE, 0
            if raw[SQE_CDW11] & 1 << 2:  # AD: deallocate
                for count, start in ranges:
                    ns.deallocate(start, count)
            return SC_SUCCESS, 0
        if opcode not in (c.NVM_WRITE, c.NVM_COMPARE, c.NVM_VERIFY, c.NVM_WRITE_ZEROES):
            return DNR | SC_INVALID_OPCODE, 0
        slba, nlb = raw[SQE_CDW10] | raw[SQE_CDW11] << 32, (raw[SQE_CDW12] & 0xFFFF) + 1
        if slba + nlb > ns.nblocks:
            return DNR | SC_LBA_RANGE, 0
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
            return DNR | SC_UNWRITTEN_BLOCK, 0
        return SC_SUCCESS, 0

    # -- admin command set ----------------------------------------------------------------------

    def _admin(self, sq: _SimQueue, raw: tuple[int, ...]) -> tuple[int, int]:
        opcode, nsid = raw[SQE_OPCODE], raw[SQE_NSID]
        cdw10, cdw11 = raw[SQE_CDW10], raw[SQE_CDW11]
        if opcode == c.ADMIN_IDENTIFY:
            return self._identify(raw, cdw10 & 0xFF, nsid)
        if opcode == c.ADMIN_CREATE_CQ:
            qid, qsize = cdw10 & 0xFFFF, (cdw10 >> 16) + 1
            if not 1 <= qid < MAX_QUEUES or qid in self.cqs:
                return DNR | SC_QID_INVALID, 0
            if not 2 <= qsize <= MQES + 1:
                return DNR | SC_QUEUE_SIZE, 0
            cq = self._queue(qid, raw[SQE_PRP1], qsize, CQE.size)
            cq.vector = cdw11 >> 16
            self.cqs[qid] = cq
            return SC_SUCCESS, 0
        if opcode == c.ADMIN_CREATE_SQ:
            qid, qsize, cqid = cdw10 & 0xFFFF, (cdw10 >> 16) + 1, cdw11 >> 16
            if not 1 <= qid < MAX_QUEUES or qid in self.sqs:
                return DNR | SC_QID_INVALID, 0
            if cqid not in self.cqs or cqid == 0:
                return DNR | SC_CQ_INVALID, 0
            if not 2 <= qsize <= MQES + 1:
                return DNR | SC_QUEUE_SIZE, 0
            q = self._queue(qid, raw[SQE_PRP1], qsize, SQE.size)
            q.cqid = cqid
            self.sqs[qid] = q
            return SC_SUCCESS, 0
        if opcode == c.ADMIN_DELETE_SQ:
            qid = cdw10 & 0xFFFF
            if qid == 0 or qid not in self.sqs:
                return DNR | SC_QID_INVALID, 0
            del self.sqs[qid]
            self.held = [h for h in self.held if h.sqid != qid]
            return SC_SUCCESS, 0
        if opcode == c.ADMIN_DELETE_CQ:
            qid = cdw10 & 0xFFFF
            if qid == 0 or qid not in self.cqs:
                return DNR | SC_QID_INVALID, 0
            if any(s.cqid == qid for s in self.sqs.values()):
                return DNR | SC_INVALID_QUEUE_DELETION, 0
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
        return DNR | SC_INVALID_OPCODE, 0

    def _identify(self, raw: tuple[int, ...], cns: int, nsid: int) -> tuple[int, int]:
        if cns == c.CNS_CONTROLLER:
            ctrl = ffi.new("struct nvme_id_ctrl *")
            ctrl.vid = ctrl.ssvid = 0x1B36  # QEMU's vendor id: a virtual device
            ffi.memmove(ctrl.sn, SERIAL.ljust(20).encode(), 20)
            ffi.memmove(ctrl.mn, MODEL.ljust(40).encode(), 40)
            ffi.memmove(ctrl.fr, FIRMWARE.ljust(8).encode(), 8)
            ctrl.mdts = MDTS
            ctrl.ver = VERSION_1_4
            ctrl.crdt1, ctrl.crdt2, ctrl.crdt3 = 1, 5, 10  # 100 ms units
            ctrl.acl = 3
            ctrl.elpe = ELPE
            ctrl.lpa = 0
            # Required (low nibble) and largest (high nibble) entry sizes, as powers of two.
            ctrl.sqes, ctrl.cqes = SQE_SHIFT << 4 | SQE_SHIFT, CQE_SHIFT << 4 | CQE_SHIFT
            ctrl.nn = len(self.namespaces)
            ctrl.oncs = 0b1101  # Compare, DSM, Write Zeroes
            self._to_host(raw, ffi.buffer(ctrl))
            return SC_SUCCESS, 0
        if cns == c.CNS_NAMESPACE:
            ns = self.namespaces.get(nsid)
            if ns is None:
                return DNR | SC_INVALID_NS, 0
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
        return DNR | SC_INVALID_FIELD, 0

    def _get_log_page(self, raw: tuple[int, ...]) -> tuple[int, int]:
        cdw10, cdw11 = raw[SQE_CDW10], raw[SQE_CDW11]
        lid = cdw10 & 0xFF
        nbytes = ((cdw10 >> 16 | (cdw11 & 0xFFFF) << 16) + 1) * 4
        offset = raw[SQE_CDW12] | raw[SQE_CDW13] << 32
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
            return DNR | SC_INVALID_FIELD, 0
        if offset % 4 or offset >= len(page):
            return DNR | SC_INVALID_FIELD, 0
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
                return DNR | SC_INVALID_NS, 0
            if set_:
                for ns in targets:
                    ns.dulbe = bool(cdw11 & c.DULBE)
            return SC_SUCCESS, c.DULBE if targets[0].dulbe else 0
        return DNR | SC_INVALID_FIELD, 0
