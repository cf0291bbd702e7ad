"""The engine for register-level transports: it owns the NVMe queues in host memory.

Theory of operation
- Bring-up is what a driver does on hardware: disable the controller, program the admin queue
  registers, enable it and wait for ready, Identify Controller, set the number of queues, create
  one I/O completion/submission queue pair, Identify the active namespaces.
- Submitting writes SQEs into queue memory and rings the SQ doorbell once per burst. One reaper
  task per completion queue waits on the queue's interrupt vector, consumes every CQE whose phase
  tag is current, rings the CQ doorbell once, and hands the attempts to the shared completion
  path (EngineBase), which applies the kernel's retry rule.
- A command not completed within its timeout is logged, aborted (Abort command), and if the abort
  does not bring it back the controller is reset: disabled, every outstanding command failed with
  CommandAborted, and brought up again.
- Leaving `Engine.running()` cancels the reapers and disables the controller; commands still in
  flight are cancelled with their tasks.
"""

from __future__ import annotations

import contextlib
import struct
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from nvmefs.engine.base import EngineBase, EngineState, Pending, Waiter
from nvmefs.engine.transport import DmaBuffer, Transport
from nvmefs.errors import CommandAborted, CommandError, CommandTimeout, EngineError
from nvmefs.nvme import commands as c
from nvmefs.nvme import prp
from nvmefs.nvme import registers as r
from nvmefs.nvme.commands import Command
from nvmefs.nvme.queue import QueuePair
from nvmefs.store import events
from nvmefs.store.events import HostEvent
from nvmefs.store.ring import DebugRing

SQE = c.SQE_FORMAT
PAGE = prp.PAGE
S = EngineState


class IoQueue:
    """A queue pair in host memory: its state machine, its memory and per-command-id buffers."""

    def __init__(self, qid: int, depth: int, vector: int, sq: DmaBuffer, cq: DmaBuffer) -> None:
        self.qid = qid
        self.qp = QueuePair(qid, depth)
        self.vector = vector
        self.sq = sq
        self.cq = cq
        self.space = trio.Event()
        self.bufs: dict[int, DmaBuffer] = {}
        self.prp_lists: dict[int, DmaBuffer] = {}


class Engine(EngineBase):
    """The engine for register-level transports: it owns the NVMe queues in host memory."""

    def __init__(
        self, transport: Transport, ring: DebugRing, *, admin_depth: int = 32, **kw: Any
    ) -> None:
        super().__init__(ring, **kw)
        self.transport = transport
        self.abort_timeout = min(self.io_timeout, 5.0)
        self.admin_depth = admin_depth
        self.admin_queue: IoQueue | None = None
        self.io_queue: IoQueue | None = None
        self._nursery: trio.Nursery | None = None
        self._reapers: trio.CancelScope | None = None
        self._recovery = trio.Lock()

    # -- lifecycle -----------------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Engine]:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self.transport.start(nursery)
                nursery.start_soon(self.fold_timer)
                try:
                    self._change_state(S.STARTING)
                    await self._bring_up()
                    self._change_state(S.READY)
                    yield self
                finally:
                    self._change_state(S.STOPPED)
                    self._disable(CommandAborted("engine stopped"))
                    await self.transport.stop()
                    nursery.cancel_scope.cancel()
        finally:
            self.sink.flush()  # the open fold, last: nothing is logged after this

    def stop_reaping(self) -> None:
        """Stop the reaper tasks: whoever drives the queues now reaps them (benchmarks)."""
        if self._reapers is not None:
            self._reapers.cancel()

    def _disable(self, error: CommandAborted) -> int:
        """Stop reaping, clear CC.EN, fail every outstanding command; returns how many."""
        self.stop_reaping()
        t = self.transport
        with contextlib.suppress(OSError):  # the device may already be gone
            t.write32(r.CC, t.read32(r.CC) & ~r.CC_EN)
        return self._fail_outstanding(error)

    async def _wait_ready(self, ready: bool) -> None:
        timeout = r.cap_ready_timeout(self.transport.read64(r.CAP))
        with trio.move_on_after(timeout):
            while True:
                csts = self.transport.read32(r.CSTS)
                if csts & r.CSTS_CFS:
                    raise EngineError(f"{self.ctrl_name}: controller fatal status (CSTS.CFS)")
                if bool(csts & r.CSTS_RDY) == ready:
                    return
                await trio.sleep(0.001)
        raise EngineError(
            f"{self.ctrl_name}: controller not {'ready' if ready else 'disabled'} "
            f"after {timeout:g} s (CSTS={self.transport.read32(r.CSTS):#x})"
        )

    async def _bring_up(self) -> None:
        t = self.transport
        if t.read32(r.CC) & r.CC_EN:
            t.write32(r.CC, 0)
        await self._wait_ready(False)
        mqes = r.cap_max_entries(t.read64(r.CAP))
        depth = min(self.admin_depth, mqes)
        admin = IoQueue(0, depth, 0, t.dma.alloc(depth * SQE.size), t.dma.alloc(depth * 16))
        self.admin_queue = admin
        t.write32(r.AQA, r.aqa(depth, depth))
        t.write64(r.ASQ, admin.sq.addr)
        t.write64(r.ACQ, admin.cq.addr)
        t.write32(r.CC, r.cc_enable())
        await self._wait_ready(True)
        self._start_reapers([admin])

        await self._identify_controller()
        await self._admin_cmd(c.set_features(c.FEAT_NUM_QUEUES, 0))  # one SQ, one CQ

        depth = min(self.queue_depth, mqes)
        io = IoQueue(1, depth, 1, t.dma.alloc(depth * SQE.size), t.dma.alloc(depth * 16))
        await self._admin_cmd(c.create_io_cq(1, depth, io.cq.addr, vector=1))
        await self._admin_cmd(c.create_io_sq(1, depth, 1, io.sq.addr))
        self.io_queue = io
        self._start_reapers([admin, io])

        ids = struct.unpack("<1024I", await self._admin_cmd(c.identify(c.CNS_ACTIVE_NS_LIST)))
        await self._identify_namespaces([nsid for nsid in ids if nsid])

    def _start_reapers(self, queues: list[IoQueue]) -> None:
        assert self._nursery is not None
        self.stop_reaping()
        scope = self._reapers = trio.CancelScope()

        async def reap_all() -> None:
            with scope:
                async with trio.open_nursery() as n:
                    for q in queues:
                        n.start_soon(self._reaper, q)

        self._nursery.start_soon(reap_all)

    # -- submission ----------------------------------------------------------------------------

    async def _issue(
        self, cmds: list[Command], attempts: Sequence[int], keep: bool, retry: bool = True
    ) -> list[Pending]:
        admin = cmds[0].admin
        q = self.admin_queue if admin else self.io_queue
        if q is None:
            raise EngineError(f"{self.ctrl_name}: not started")
        waiter = Waiter(len(cmds))
        pendings: list[Pending] = []
        pack, size, doorbell = SQE.pack_into, SQE.size, self.transport.doorbell
        room = rung = 0
        for cmd, attempt in zip(cmds, attempts, strict=True):
            if not room:
                if rung < len(pendings):
                    doorbell(r.sq_doorbell(q.qid), q.qp.sq_tail)
                    rung = len(pendings)
                while not q.qp.room:
                    q.space = trio.Event()
                    await q.space.wait()
                    q = self.admin_queue if admin else self.io_queue  # a reset may replace it
                    assert q is not None
                qp, view, room, bufs = q.qp, q.sq.view, q.qp.room, q.bufs
                t0 = time.monotonic_ns()
            p = Pending(cmd, attempt, waiter, keep, retry)
            slot, cid = qp.submit(p)
            p.cid, p.t0 = cid, t0
            n = cmd.data_len
            if not n:
                prp1, prp2 = cmd.prp1, 0
            elif n <= PAGE and not cmd.to_device and (buf := bufs.get(cid)) is not None:
                # _prps's common case, inline: it is most commands, and a call costs.
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
                doorbell(r.sq_doorbell(q.qid), q.qp.sq_tail)
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
                if retry:
                    await self._recover(q, p)
                else:
                    self._fail(p, CommandTimeout(f"no completion after {timeout:g} s"))
        return pendings

    def _prps(self, q: IoQueue, cid: int, cmd: Command) -> tuple[int, int]:
        """PRP1 and PRP2 for command id `cid`'s buffer, grown to the transfer if needed."""
        n = cmd.data_len
        dma = self.transport.dma
        buf = q.bufs.get(cid)
        if buf is None or buf.size < n:
            if buf is not None:
                dma.free(buf)
            buf = q.bufs[cid] = dma.alloc(n)
            old_list = q.prp_lists.pop(cid, None)  # it points into the buffer just freed
            if old_list is not None:
                dma.free(old_list)
        if cmd.to_device and cmd.data is not None:
            buf.view[: len(cmd.data)] = cmd.data
        entries, list_pages = prp.plan(buf.addr, n)
        if not list_pages:
            return buf.addr, (entries[0] if entries else 0)
        plist = q.prp_lists.get(cid)
        if plist is None or plist.size < list_pages * PAGE:
            if plist is not None:
                dma.free(plist)
            plist = q.prp_lists[cid] = dma.alloc(list_pages * PAGE)
        addrs = [plist.addr + PAGE * i for i in range(list_pages)]
        for i, page in enumerate(prp.list_pages(entries, addrs)):
            plist.view[i * PAGE : i * PAGE + len(page)] = page
        return buf.addr, plist.addr

    # -- completion ----------------------------------------------------------------------------

    async def _reaper(self, q: IoQueue) -> None:
        while True:
            await self.transport.wait_interrupt(q.vector)
            self._reap(q)

    def _reap(self, q: IoQueue) -> None:
        reaped, violations = q.qp.consume(q.cq.view)
        for e in violations:
            self.sink.protocol_error()
            self.sink.append(  # after the open fold, if any: entries keep their order
                HostEvent(events.HOST_ERROR, f"protocol violation: {e}", {"ctrl": self.ctrl_name})
            )
        if not reaped:
            return
        self.transport.doorbell(r.cq_doorbell(q.qid), q.qp.cq_head)
        for p, _, _ in reaped:
            if p.keep and p.cmd.data_len:  # copied now: the cid, and its buffer, is free again
                self._keep(p, q.bufs[p.cid].view)
        self._finish_many(q.qid, reaped)
        q.space.set()

    def _fail_outstanding(self, error: CommandError) -> int:
        n = 0
        for q in (self.admin_queue, self.io_queue):
            if q is not None:
                for p in q.qp.drain():
                    self._fail(p, error, qid=q.qid)
                    n += 1
                q.space.set()
        return n

    # -- recovery ------------------------------------------------------------------------------

    async def _recover(self, q: IoQueue, p: Pending) -> None:
        async with self._recovery:
            if p.done:
                return
            cmd = p.cmd
            self.sink.timeout()
            timeout = cmd.timeout or (self.admin_timeout if cmd.admin else self.io_timeout)
            self.log_command(events.TIMEOUT, f"command timed out after {timeout:g} s", cmd,
                             qid=q.qid, cid=p.cid)  # fmt: skip
            if not cmd.admin and self.admin_queue is not None:
                abort = c.abort(q.qid, p.cid)
                abort.timeout = self.abort_timeout
                (ap,) = await self._issue([abort], [0], keep=False, retry=False)
                comp = ap.completion
                if comp is not None and comp.status.ok and not comp.result & 1:
                    self.sink.abort()
                    with trio.move_on_after(self.abort_timeout):
                        while not p.done:
                            await trio.sleep(0.001)
                    if p.done:
                        self._log_host(events.ABORT, "command aborted", qid=q.qid, cid=p.cid)
                        return
            await self._reset(f"qid {q.qid} cid {p.cid} did not complete after abort")

    async def _reset(self, reason: str) -> None:
        self.sink.reset()
        self._change_state(S.RESETTING, reason)
        self._log_host(events.RESET, f"resetting controller: {reason}")
        self._disable(CommandAborted("controller reset"))
        try:
            await self._bring_up()
        except EngineError as e:
            self._change_state(S.FAILED, str(e))
            self._log_host(events.RESET, f"controller did not come back: {e}")
            return
        self._change_state(S.READY, "reset done")
        self._log_host(events.RESET, "controller ready again")
