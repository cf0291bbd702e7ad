"""The queue engine: drives a register-level NVMe controller with trio.

Theory of operation
- Bring-up is what a driver does on hardware: disable the controller, program the admin queue
  registers, enable it and wait for ready, Identify Controller, set the number of queues, create
  one I/O completion/submission queue pair, Identify the active namespaces.
- Submitting writes SQEs into queue memory and rings the SQ doorbell once per burst. One reaper
  task per completion queue waits on the queue's interrupt vector, consumes every CQE whose phase
  tag is current, rings the CQ doorbell once, and completes the waiting commands.
- Every completion goes through the translator exactly once; counters see all of them; the log
  policy decides what becomes a ring entry. That includes each failed attempt of a retried command.
- Retries follow the kernel (nvme_decide_disposition): none when DNR is set, at most
  `max_retries`, after the Command Retry Delay the controller asks for with CRD.
- A command not completed within its timeout is logged, aborted (Abort command), and if the abort
  does not bring it back the controller is reset: disabled, every outstanding command failed with
  CommandAborted, and brought up again.
- Leaving `Engine.running()` cancels the reapers and disables the controller; commands still in
  flight are cancelled with their tasks.
"""

from __future__ import annotations

import contextlib
import math
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from nvmefs import events
from nvmefs.events import HostEvent, NvmeEvent
from nvmefs.nvme import commands as c
from nvmefs.nvme import tables
from nvmefs.nvme.commands import Command
from nvmefs.nvme.layouts import ascii_field, ffi
from nvmefs.nvme.policy import LogPolicy
from nvmefs.nvme.queue import QueuePair
from nvmefs.nvme.status import Status, Translator
from nvmefs.ring import DebugRing
from nvmefs.transport.base import (
    CC_EN,
    CSTS_CFS,
    CSTS_RDY,
    PAGE,
    REG_ACQ,
    REG_AQA,
    REG_ASQ,
    REG_CAP,
    REG_CC,
    REG_CSTS,
    DmaBuffer,
    Transport,
)

SQE = c.SQE_FORMAT


class EngineError(Exception):
    """The controller could not be brought up (or back up)."""


class CommandError(Exception):
    """A command that ended without an NVMe status: the host gave up on it."""

    kind = "host-error"
    logged = False  # True once the engine put it in the ring itself


class CommandTimeout(CommandError):
    kind = events.TIMEOUT


class CommandAborted(CommandError):
    """Failed by a controller reset (the passthrough equivalent is -EINTR)."""

    kind = events.RESET


@dataclass(slots=True)
class Completion:
    status: Status
    result: int
    qid: int | None  # None where the kernel owns the queues (passthrough)
    cid: int
    attempt: int  # 0 for the first try, n for the n-th retry
    latency_ns: int
    data: bytes | None = None


@dataclass(slots=True)
class Namespace:
    nsid: int
    nblocks: int
    lba_size: int

    @property
    def size(self) -> int:
        return self.nblocks * self.lba_size


@dataclass
class Stats:
    completions: int = 0
    logged: int = 0
    errors: int = 0
    retries: int = 0
    timeouts: int = 0
    aborts: int = 0
    resets: int = 0
    host_errors: int = 0
    protocol_errors: int = 0
    latency_ns_total: int = 0
    latency_ns_max: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    by_opcode: Counter[tuple[bool, int]] = field(default_factory=Counter)


class _Waiter:
    """Wakes one task when `remaining` commands have finished (one or a whole batch)."""

    __slots__ = ("clean", "event", "remaining")

    def __init__(self, n: int) -> None:
        self.remaining = n
        self.event = trio.Event()
        self.clean = True  # every command so far completed with success

    def done(self) -> None:
        self.remaining -= 1
        if self.remaining <= 0:
            self.event.set()


class _Pending:
    __slots__ = (
        "attempt",
        "cid",
        "cmd",
        "completion",
        "data",
        "done",
        "error",
        "keep",
        "t0",
        "waiter",
    )

    def __init__(self, cmd: Command, attempt: int, waiter: _Waiter, keep: bool) -> None:
        self.cmd = cmd
        self.attempt = attempt
        self.waiter = waiter
        self.keep = keep
        self.cid = -1
        self.t0 = 0
        self.done = False
        self.data: bytes | None = None  # what a read brought in, when `keep`
        self.completion: Completion | None = None
        self.error: CommandError | None = None


class _Queue:
    def __init__(self, qid: int, depth: int, vector: int, sq: DmaBuffer, cq: DmaBuffer) -> None:
        self.qid = qid
        self.qp = QueuePair(qid, depth)
        self.vector = vector
        self.sq = sq
        self.cq = cq
        self.space = trio.Event()
        self.bufs: dict[int, DmaBuffer] = {}
        self.prp_lists: dict[int, DmaBuffer] = {}


class EngineBase:
    """What every engine shares: the completion path, retries, counters, the ring.

    A subclass owns the queues: it brings the controller up in `running()`, puts commands on
    the wire in `_issue()`, and reports each completion with `_finish()` or `_fail()`.
    """

    def __init__(
        self,
        ring: DebugRing,
        *,
        translator: Translator | None = None,
        policy: LogPolicy | None = None,
        ctrl_name: str = "sim0",
        io_timeout: float = 30.0,
        admin_timeout: float = 60.0,
        max_retries: int = 5,
        queue_depth: int = 128,
    ) -> None:
        self.ring = ring
        self.translator = translator or Translator()
        self.policy = policy or LogPolicy()
        self.ctrl_name = ctrl_name
        self.io_timeout = io_timeout
        self.admin_timeout = admin_timeout
        self.max_retries = max_retries
        self.queue_depth = queue_depth
        self.stats = Stats()
        self.state = "stopped"
        self.serial = self.model = self.firmware = ""
        self.crdt = (0, 0, 0)
        self.elpe = 0
        self.namespaces: list[Namespace] = []

    def running(self) -> AbstractAsyncContextManager[EngineBase]:
        raise NotImplementedError

    async def _issue(
        self, cmds: list[Command], attempt: int, keep: bool, recover: bool = True
    ) -> list[_Pending]:
        raise NotImplementedError

    async def _admin_cmd(self, cmd: Command) -> bytes:
        """An admin command of bring-up: any failure is fatal to bring-up."""
        (r,) = await self.submit_batch([cmd], keep_data=True, retry=False)
        if isinstance(r, CommandError):
            raise EngineError(f"{self.ctrl_name}: {_cmd_name(cmd)} failed: {r}")
        if not r.status.ok:
            raise EngineError(
                f"{self.ctrl_name}: {_cmd_name(cmd)} failed with status 0x{r.status.status:x} "
                f"({r.status.name})"
            )
        return r.data or b""

    async def _identify_controller(self) -> None:
        data = await self._admin_cmd(c.identify(c.CNS_CONTROLLER))
        ctrl = ffi.from_buffer("struct nvme_id_ctrl *", bytearray(data))
        self.serial, self.model = ascii_field(ctrl.sn), ascii_field(ctrl.mn)
        self.firmware = ascii_field(ctrl.fr)
        self.crdt = (ctrl.crdt1, ctrl.crdt2, ctrl.crdt3)
        self.elpe = ctrl.elpe

    async def _identify_namespaces(self, nsids: list[int]) -> None:
        namespaces = []
        for nsid in nsids:
            raw = await self._admin_cmd(c.identify(c.CNS_NAMESPACE, nsid))
            ns = ffi.from_buffer("struct nvme_id_ns *", bytearray(raw))
            lbaf = ns.lbaf[ns.flbas & 0xF]
            namespaces.append(Namespace(nsid, ns.nsze, 1 << lbaf.ds))
        self.namespaces = namespaces

    async def submit(self, cmd: Command, *, keep_data: bool = False) -> Completion:
        """Run one command to its final completion (after retries); raises CommandError."""
        (r,) = await self.submit_batch([cmd], keep_data=keep_data)
        if isinstance(r, CommandError):
            raise r
        return r

    async def submit_batch(
        self, cmds: Sequence[Command], *, keep_data: bool = False, retry: bool = True
    ) -> list[Completion | CommandError]:
        """Run commands together: one doorbell per burst, one wake-up for the whole batch."""
        results: list[Completion | CommandError | None] = [None] * len(cmds)
        todo = list(range(len(cmds)))
        attempt = 0  # every command in a round is on the same attempt
        while todo:
            if self.state not in ("ready", "starting", "resetting"):
                err = CommandAborted(f"{self.ctrl_name} is {self.state}")
                for i in todo:
                    results[i] = err
                break
            done = await self._issue([cmds[i] for i in todo], attempt, keep_data)
            if done[0].waiter.clean and attempt == 0:  # all succeeded first time
                return [p.completion for p in done]  # type: ignore[misc]
            again: list[int] = []
            delay = 0.0
            for i, p in zip(todo, done, strict=True):
                comp = p.completion
                if comp is None:
                    results[i] = p.error or CommandError("no completion")
                    continue
                st = comp.status
                if st.ok or st.dnr or not retry or attempt >= self.max_retries:
                    results[i] = comp
                    continue
                self.stats.retries += 1
                again.append(i)
                if st.crd and self.crdt[st.crd - 1]:
                    delay = max(delay, self.crdt[st.crd - 1] / 10)
            if again and delay:
                await trio.sleep(delay)
            todo = again
            attempt += 1
        return results  # type: ignore[return-value]

    def _finish(
        self, p: _Pending, qid: int | None, word: int, result: int, data: bytes | None = None
    ) -> None:
        p.data = data
        self._finish_many(qid, [(p, word, result)])

    def _finish_many(self, qid: int | None, done: list[tuple[_Pending, int, int]]) -> None:
        """Account for completions reaped together; the hot path, so locals are hoisted."""
        now = time.monotonic_ns()
        table = self.translator.table
        logged = self.policy.table
        st = self.stats
        ring_append = self.ring.append
        ctrl = self.ctrl_name
        words, opcodes = [], []
        oldest = now
        t0_sum = 0
        for p, word, result in done:
            cmd = p.cmd
            status = table[word]
            words.append(word)
            opcodes.append((cmd.admin, cmd.opcode))
            t0 = p.t0
            t0_sum += t0
            if t0 < oldest:
                oldest = t0
            code = word & 0x7FF
            if code:
                st.errors += 1
                p.waiter.clean = False
            if logged[code]:
                st.logged += 1
                ring_append(
                    NvmeEvent(
                        status,
                        ctrl,
                        cmd.nsid,
                        qid,
                        p.cid,
                        cmd.opcode,
                        cmd.admin,
                        cmd.slba,
                        cmd.nlb,
                        p.attempt,
                    )
                )
            p.completion = Completion(status, result, qid, p.cid, p.attempt, now - t0, p.data)
            p.done = True
            p.waiter.done()
        n = len(words)
        st.completions += n
        st.by_status.update(words)
        st.by_opcode.update(opcodes)
        st.latency_ns_total += n * now - t0_sum
        st.latency_ns_max = max(st.latency_ns_max, now - oldest)

    def _fail(self, p: _Pending, error: CommandError) -> None:
        if not p.done:
            p.waiter.clean = False
            p.error = error
            p.done = True
            p.waiter.done()

    def _log_host(self, kind: str, message: str, **fields: Any) -> None:
        self.ring.append(HostEvent(kind, message, {"ctrl": self.ctrl_name, **fields}))

    def log_command_failure(self, error: CommandError, cmd: Command) -> None:
        """Record a host-side failure of a command (no NVMe status) in the ring."""
        if error.logged:
            return
        self.stats.host_errors += 1
        self._log_host(
            error.kind,
            str(error),
            opcode=f"0x{cmd.opcode:02x}",
            nsid=cmd.nsid,
            slba=cmd.slba,
            nlb=cmd.nlb,
        )

    # -- helpers for workloads -----------------------------------------------------------------

    async def get_log_page(self, lid: int, nbytes: int) -> bytes:
        comp = await self.submit(c.get_log_page(lid, nbytes), keep_data=True)
        if not comp.status.ok:
            raise CommandError(f"Get Log Page {lid:#x}: {comp.status.name}")
        return comp.data or b""

    @property
    def latency_avg_us(self) -> float:
        n = self.stats.completions
        return self.stats.latency_ns_total / n / 1000 if n else math.nan


class Engine(EngineBase):
    """The engine for register-level transports: it owns the NVMe queues in host memory."""

    def __init__(
        self, transport: Transport, ring: DebugRing, *, admin_depth: int = 32, **kw: Any
    ) -> None:
        super().__init__(ring, **kw)
        self.transport = transport
        self.abort_timeout = min(self.io_timeout, 5.0)
        self.admin_depth = admin_depth
        self._admin: _Queue | None = None
        self._io: _Queue | None = None
        self._nursery: trio.Nursery | None = None
        self._reapers: trio.CancelScope | None = None
        self._recovery = trio.Lock()

    # -- lifecycle -----------------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Engine]:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self.transport.start(nursery)
            try:
                await self._bring_up()
                yield self
            finally:
                self.state = "stopped"
                self._shutdown_controller()
                await self.transport.stop()
                nursery.cancel_scope.cancel()

    def _disable(self, error: CommandAborted) -> int:
        """Stop reaping, clear CC.EN, fail every outstanding command; returns how many."""
        if self._reapers is not None:
            self._reapers.cancel()
        with contextlib.suppress(OSError):  # the device may already be gone
            self.transport.write32(REG_CC, self.transport.read32(REG_CC) & ~CC_EN)
        return self._fail_outstanding(error)

    def _shutdown_controller(self) -> None:
        self._disable(CommandAborted("engine stopped"))

    async def _wait_ready(self, ready: bool) -> None:
        cap = self.transport.read64(REG_CAP)
        timeout = max(((cap >> 24) & 0xFF) * 0.5, 0.5)
        with trio.move_on_after(timeout):
            while True:
                csts = self.transport.read32(REG_CSTS)
                if csts & CSTS_CFS:
                    raise EngineError(f"{self.ctrl_name}: controller fatal status (CSTS.CFS)")
                if bool(csts & CSTS_RDY) == ready:
                    return
                await trio.sleep(0.001)
        raise EngineError(
            f"{self.ctrl_name}: controller not {'ready' if ready else 'disabled'} "
            f"after {timeout:g} s (CSTS={self.transport.read32(REG_CSTS):#x})"
        )

    async def _bring_up(self) -> None:
        assert self._nursery is not None
        self.state = "starting"
        t = self.transport
        if t.read32(REG_CC) & CC_EN:
            t.write32(REG_CC, 0)
        await self._wait_ready(False)
        mqes = (t.read64(REG_CAP) & 0xFFFF) + 1
        depth = min(self.admin_depth, mqes)
        self._admin = _Queue(0, depth, 0, t.dma.alloc(depth * SQE.size), t.dma.alloc(depth * 16))
        t.write32(REG_AQA, (depth - 1) | (depth - 1) << 16)
        t.write64(REG_ASQ, self._admin.sq.addr)
        t.write64(REG_ACQ, self._admin.cq.addr)
        t.write32(REG_CC, CC_EN | 6 << 16 | 4 << 20)  # IOSQES 2^6, IOCQES 2^4
        await self._wait_ready(True)
        self._start_reapers([self._admin])

        await self._identify_controller()
        await self._admin_cmd(c.set_features(c.FEAT_NUM_QUEUES, 0))  # one SQ, one CQ

        depth = min(self.queue_depth, mqes)
        io = _Queue(1, depth, 1, t.dma.alloc(depth * SQE.size), t.dma.alloc(depth * 16))
        await self._admin_cmd(c.create_io_cq(1, depth, io.cq.addr, vector=1))
        await self._admin_cmd(c.create_io_sq(1, depth, 1, io.sq.addr))
        self._io = io
        self._start_reapers([self._admin, io])

        ids = struct.unpack("<1024I", await self._admin_cmd(c.identify(c.CNS_ACTIVE_NS_LIST)))
        await self._identify_namespaces([nsid for nsid in ids if nsid])
        self.state = "ready"

    def _start_reapers(self, queues: list[_Queue]) -> None:
        assert self._nursery is not None
        if self._reapers is not None:
            self._reapers.cancel()
        scope = self._reapers = trio.CancelScope()

        async def reap_all() -> None:
            with scope:
                async with trio.open_nursery() as n:
                    for q in queues:
                        n.start_soon(self._reaper, q)

        self._nursery.start_soon(reap_all)

    # -- submission ----------------------------------------------------------------------------

    async def _issue(
        self, cmds: list[Command], attempt: int, keep: bool, recover: bool = True
    ) -> list[_Pending]:
        admin = cmds[0].admin
        q = self._admin if admin else self._io
        if q is None:
            raise EngineError(f"{self.ctrl_name}: not started")
        waiter = _Waiter(len(cmds))
        pendings: list[_Pending] = []
        pack, size, doorbell = SQE.pack_into, SQE.size, self.transport.doorbell
        room = rung = 0
        for cmd in cmds:
            if not room:
                if rung < len(pendings):
                    doorbell(2 * q.qid, q.qp.sq_tail)
                    rung = len(pendings)
                while not q.qp.room:
                    q.space = trio.Event()
                    await q.space.wait()
                    q = self._admin if admin else self._io  # a reset may have replaced it
                    assert q is not None
                qp, view, room, bufs = q.qp, q.sq.view, q.qp.room, q.bufs
                t0 = time.monotonic_ns()
            p = _Pending(cmd, attempt, waiter, keep)
            slot, cid = qp.submit(p)
            p.cid, p.t0 = cid, t0
            n = cmd.data_len
            if not n:
                prp1, prp2 = cmd.prp1, 0
            elif n <= PAGE and not cmd.to_device and (buf := bufs.get(cid)) is not None:
                # _prps's common case, inline: the call alone measured ~3% at QD32.
                prp1, prp2 = buf.addr, 0  # every buffer is at least a page
            else:
                prp1, prp2 = self._prps(q, cid, cmd)
            pack(view, slot * size, cmd.opcode, 0, cid, cmd.nsid, 0, 0, 0, prp1, prp2,
                 cmd.cdw10, cmd.cdw11, cmd.cdw12, cmd.cdw13, cmd.cdw14, cmd.cdw15)  # fmt: skip
            pendings.append(p)
            room -= 1
        # A controller may post completions before we would sleep (the simulated one answers
        # inside the doorbell write): reaping them here, with the queue's interrupt held back
        # meanwhile, saves the reaper's wake-up and a task switch per batch.
        self.transport.mask_interrupt(q.vector)
        try:
            if rung < len(pendings):
                doorbell(2 * q.qid, q.qp.sq_tail)
            self._reap(q)
        finally:
            self.transport.unmask_interrupt(q.vector)
        if waiter.event.is_set():
            await trio.lowlevel.checkpoint()
            return pendings
        default = self.admin_timeout if admin else self.io_timeout
        timeout = max(t or default for t in {cmd.timeout for cmd in cmds})
        with trio.move_on_after(timeout):
            await waiter.event.wait()
        for p in pendings:
            if not p.done:
                if recover:
                    await self._recover(q, p)
                else:
                    self._fail(p, CommandTimeout(f"no completion after {timeout:g} s"))
        return pendings

    def _prps(self, q: _Queue, cid: int, cmd: Command) -> tuple[int, int]:
        n = cmd.data_len
        buf = q.bufs.get(cid)
        if buf is None or buf.size < n:
            if buf is not None:
                self.transport.dma.free(buf)
            buf = q.bufs[cid] = self.transport.dma.alloc(n)
            old_list = q.prp_lists.pop(cid, None)  # it points into the buffer just freed
            if old_list is not None:
                self.transport.dma.free(old_list)
        if cmd.to_device and cmd.data is not None:
            buf.view[: len(cmd.data)] = cmd.data
        if n <= PAGE:
            return buf.addr, 0
        if n <= 2 * PAGE:
            return buf.addr, buf.addr + PAGE
        plist = q.prp_lists.get(cid)
        if plist is None:
            pages = buf.size // PAGE - 1
            if pages > PAGE // 8:
                raise ValueError(f"transfer of {n} bytes needs more than one PRP list page")
            plist = q.prp_lists[cid] = self.transport.dma.alloc(PAGE)
            struct.pack_into(
                f"<{pages}Q", plist.view, 0, *(buf.addr + PAGE * i for i in range(1, pages + 1))
            )
        return buf.addr, plist.addr

    # -- completion ----------------------------------------------------------------------------

    async def _reaper(self, q: _Queue) -> None:
        while True:
            await self.transport.wait_interrupt(q.vector)
            self._reap(q)

    def _reap(self, q: _Queue) -> None:
        reaped, violations = q.qp.consume(q.cq.view)
        for e in violations:
            self.stats.protocol_errors += 1
            self.ring.append(
                HostEvent(events.HOST_ERROR, f"protocol violation: {e}", {"ctrl": self.ctrl_name})
            )
        if not reaped:
            return
        self.transport.doorbell(2 * q.qid + 1, q.qp.cq_head)
        for p, _, _ in reaped:
            if p.keep:  # copied now: the command id, and so its buffer, is free for reuse
                cmd = p.cmd
                if cmd.data_len and not cmd.to_device:
                    p.data = bytes(q.bufs[p.cid].view[: cmd.data_len])
        self._finish_many(q.qid, reaped)
        q.space.set()

    def _fail_outstanding(self, error: CommandError) -> int:
        n = 0
        for q in (self._admin, self._io):
            if q is not None:
                for p in q.qp.drain():
                    self._fail(p, error)
                    n += 1
                q.space.set()
        return n

    # -- recovery ------------------------------------------------------------------------------

    async def _recover(self, q: _Queue, p: _Pending) -> None:
        async with self._recovery:
            if p.done:
                return
            cmd = p.cmd
            self.stats.timeouts += 1
            timeout = cmd.timeout or (self.admin_timeout if cmd.admin else self.io_timeout)
            self._log_host(
                events.TIMEOUT,
                f"command timed out after {timeout:g} s",
                qid=q.qid,
                cid=p.cid,
                opcode=f"0x{cmd.opcode:02x}",
                nsid=cmd.nsid,
                slba=cmd.slba,
                nlb=cmd.nlb,
            )
            if not cmd.admin and self._admin is not None:
                abort = c.abort(q.qid, p.cid)
                abort.timeout = self.abort_timeout
                (ap,) = await self._issue([abort], 0, keep=False, recover=False)
                comp = ap.completion
                if comp is not None and comp.status.ok and not comp.result & 1:
                    self.stats.aborts += 1
                    with trio.move_on_after(self.abort_timeout):
                        while not p.done:
                            await trio.sleep(0.001)
                    if p.done:
                        self._log_host(events.ABORT, "command aborted", qid=q.qid, cid=p.cid)
                        return
            await self._reset(f"qid {q.qid} cid {p.cid} did not complete after abort")

    async def _reset(self, reason: str) -> None:
        self.stats.resets += 1
        self.state = "resetting"
        failed = self._disable(CommandAborted("controller reset"))
        self._log_host(events.RESET, f"resetting controller: {reason}", failed=failed)
        try:
            await self._bring_up()
        except EngineError as e:
            self.state = "failed"
            self._log_host(events.RESET, f"controller did not come back: {e}")
            return
        self._log_host(events.RESET, "controller ready again")


def _cmd_name(cmd: Command) -> str:
    names = tables.ADMIN_OPCODE_NAMES if cmd.admin else tables.IO_OPCODE_NAMES
    return names.get(cmd.opcode, f"opcode {cmd.opcode:#x}")
