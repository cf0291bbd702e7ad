"""The engine for kernel passthrough: /dev/ngXnY for I/O, /dev/nvmeX for admin commands.

Theory of operation: the kernel owns the NVMe queues, so this engine owns none; it hands each
command to the kernel and gets back either the 15-bit NVMe status (>= 0), which goes through the
shared completion path like any completion, or a negative errno, which is a host error (-EINTR
cancelled by a controller reset, -EINVAL refused) and becomes a ring entry of its own kind.

I/O goes through io_uring (`uring`: IORING_OP_URING_CMD, batched submission, one reaper woken by
an eventfd) or ioctl (`ioctl`: NVME_IOCTL_IO64_CMD in worker threads). Admin commands always use
NVME_IOCTL_ADMIN64_CMD. The kernel applies the timeout (timeout_ms in each command) and never
retries passthrough commands, so retries are ours, by the same rule as every engine.

A watcher notices the controller disappearing (hot-unplug) and moves the engine to DETACHED:
commands wait, and those that the removal failed with -ENODEV are sent again, once a controller
with the same serial number comes back and the engine has reattached to its new nodes.

The bulk data path (`run_bulk`: scrub's and randread's reads) has two forms. `compiled`: a C loop
(nvmefs.linux.bulk, liburing) keeps the queue full from a worker thread and hands back only
failed completions and counts; Python takes each failure from there exactly as if its own first
attempt had failed (translation, counters, the disposition rule, retries through the per-command
path, one ring entry at its final disposition, hot-unplug requeues). `python`: the workloads
send batches through submit_batch. Both give the same ring entries and counters.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from nvmefs.engine.base import (
    ACCEPTING,
    Completion,
    EngineBase,
    EngineState,
    Namespace,
    Pending,
    Waiter,
)
from nvmefs.errors import CommandError, CommandTimeout, EngineError, HostError, UsageError
from nvmefs.linux import bulk, devices, passthru, uring
from nvmefs.linux.devices import DeviceSource
from nvmefs.linux.passthru import PASSTHRU64, RESULT_MASK, BufferPool, HostBuffer
from nvmefs.nvme import commands as c
from nvmefs.nvme import lbas
from nvmefs.nvme.commands import Command
from nvmefs.nvme.status import STATUS_MASK
from nvmefs.store import events
from nvmefs.store.ring import DebugRing

log = logging.getLogger("nvmefs.engine")

TRANSPORTS = ("uring", "ioctl")
# auto: compiled where it can run (transport uring and the extension loads), else python.
DATAPATHS = ("auto", "compiled", "python")
WATCH_INTERVAL_S = 0.25
# The compiled loop comes back to Python at least this often: progress, pacing, cancellation.
TURN_MS = 100
# How long a stopping bulk run waits for its commands in flight before it lets them go (a hung
# device: the kernel still owns their pages, see nvmefs/linux/bulk.c).
DRAIN_S = 0.5
# The kernel enforces each command's timeout; this is only a backstop if it never answers.
BACKSTOP_S = 10.0
S = EngineState


@dataclass
class Bulk:
    """A bulk job for `PassthroughEngine.run_bulk`: Read (or Verify) commands of `nlb` blocks on
    one namespace, in LBA order over [start, end), or `count` (0: no end) at random slots of
    [start, end) from `seed`; and how far it got, updated after every turn of the loop.

    Invariant: `commands` counts commands at their final disposition, `failed` those of them
    that ended with an error status or a host error."""

    nsid: int
    opcode: int  # c.NVM_READ or c.NVM_VERIFY
    nlb: int
    start: int = 0
    end: int = 0
    random: bool = False
    count: int = 0
    seed: int = 0
    lba: int = 0  # in order: every LBA below it has completed
    bytes_done: int = 0
    commands: int = 0
    failed: int = 0


class PassthroughEngine(EngineBase):
    """An engine over the kernel's NVMe passthrough nodes of one controller.

    Invariant: every command handed to the kernel is in `_inflight` (io_uring) or a worker
    thread (ioctl) until its completion, and its buffers go back to the pool exactly once.
    """

    def __init__(
        self,
        source: DeviceSource,
        ring: DebugRing,
        *,
        transport: str = "uring",
        datapath: str = "auto",
        **kw: Any,
    ) -> None:
        kw.setdefault("ctrl_name", source.controller.name)
        super().__init__(ring, **kw)
        if transport not in TRANSPORTS:
            raise UsageError(f"transport {transport!r}: expected uring or ioctl")
        if datapath not in DATAPATHS:
            raise UsageError(f"datapath {datapath!r}: expected auto, compiled or python")
        if datapath == "compiled" and transport != "uring":
            raise UsageError("datapath=compiled needs transport=uring")
        self.source = source
        self.transport = transport
        self._datapath_wanted = datapath
        # Which path run_bulk takes, "compiled" or "python": decided when the engine starts.
        self.datapath = "python"
        self.serial = source.controller.serial
        self._nsids = [n.nsid for n in source.namespaces]
        self._ctrl_fd = -1
        self._ns_fds: dict[int, int] = {}
        self._ring: uring.Uring | None = None
        self._inflight: dict[int, tuple[Pending, HostBuffer | None, HostBuffer | None]] = {}
        self._next_tag = 1
        self._space = trio.Event()
        self._gone = trio.Event()  # set by an -ENODEV completion: look now, not at the next tick
        self._pool = BufferPool()
        self._threads = trio.CapacityLimiter(max(1, self.queue_depth))
        # How often the watcher looks for the controller (an -ENODEV makes it look at once).
        self.watch_interval = WATCH_INTERVAL_S

    # -- lifecycle -----------------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[PassthroughEngine]:
        self._change_state(S.STARTING)
        try:
            self._open(self.source)
            await self._identify()
            async with trio.open_nursery() as nursery:
                if self.transport == "uring":
                    entries = 1 << max(1, (self.queue_depth - 1).bit_length())
                    try:
                        self._ring = uring.Uring(entries)
                    except OSError as e:
                        raise EngineError(
                            f"io_uring passthrough unavailable: {e.strerror} (try transport=ioctl)"
                        ) from None
                    nursery.start_soon(self._reaper, self._ring)
                self.datapath = self._choose_datapath()
                nursery.start_soon(self._watch)
                self._change_state(S.READY)
                try:
                    yield self
                finally:
                    self._change_state(S.STOPPED)
                    nursery.cancel_scope.cancel()
        finally:
            self._change_state(S.STOPPED)
            self._close()

    def _choose_datapath(self) -> str:
        wanted = self._datapath_wanted
        if wanted == "python" or self.transport != "uring":
            return "python"
        why = bulk.unavailable()
        if why is None:
            log.info("%s: data path compiled (liburing)", self.ctrl_name)
            return "compiled"
        if wanted == "compiled":
            raise EngineError(f"datapath=compiled: {why}")
        log.warning("%s: %s: scrub and randread take the Python data path", self.ctrl_name, why)
        return "python"

    def _open(self, source: DeviceSource) -> None:
        try:
            self._ctrl_fd = os.open(source.controller.node, os.O_RDWR | os.O_CLOEXEC)
            for ns in source.namespaces:
                self._ns_fds[ns.nsid] = os.open(ns.generic, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            self._close()
            raise EngineError(f"{e.filename}: cannot open: {e.strerror}") from None

    def _close(self) -> None:
        self._close_fds()
        if self._ring is not None:
            self._ring.close()
            self._ring = None

    async def _identify(self) -> None:
        await self._identify_controller()
        await self._identify_namespaces(self._nsids)

    # -- submission ----------------------------------------------------------------------------

    def _fields(
        self, cmd: Command, buf: HostBuffer | None, meta: HostBuffer | None
    ) -> tuple[int, ...]:
        timeout = cmd.timeout or (self.admin_timeout if cmd.admin else self.io_timeout)
        return passthru.fields(cmd, buf.addr if buf else 0, meta, timeout)

    def _buffers(self, cmd: Command) -> tuple[HostBuffer | None, HostBuffer | None]:
        """A data buffer (filled for a write) and a metadata buffer, where the command has them."""
        buf = meta = None
        if cmd.data_len:
            buf = self._pool.take(cmd.data_len)
            if cmd.to_device and cmd.data is not None:
                buf.view[: len(cmd.data)] = cmd.data
        if cmd.metadata:
            meta = self._pool.take(len(cmd.metadata))
            meta.view[: len(cmd.metadata)] = cmd.metadata
        return buf, meta

    def _ns_fd(self, nsid: int) -> int:
        # A command for a namespace we did not open goes to our first node anyway: the kernel,
        # not nvmefs, decides that it refuses it (-EINVAL), and that is what gets logged.
        fd = self._ns_fds.get(nsid)
        return fd if fd is not None else next(iter(self._ns_fds.values()), -1)

    async def _issue(
        self, cmds: list[Command], attempts: Sequence[int], keep: bool, retry: bool = True
    ) -> list[Pending]:
        waiter = Waiter(len(cmds))
        pendings = [
            Pending(cmd, attempt, waiter, keep, retry)
            for cmd, attempt in zip(cmds, attempts, strict=True)
        ]
        for p in pendings:
            p.generation = self.detaches
        if cmds[0].admin or self.transport == "ioctl" or self._ring is None:
            async with trio.open_nursery() as n:
                for p in pendings:
                    n.start_soon(self._run_ioctl, p)
            return pendings
        ring = self._ring
        for p in pendings:
            while len(self._inflight) >= ring.entries:
                ring.submit()
                self._space = trio.Event()
                await self._space.wait()
            buf, meta = self._buffers(p.cmd)
            tag = self._next_tag
            self._next_tag += 1
            p.cid = tag
            self._inflight[tag] = (p, buf, meta)
            ring.prep_nvme(self._ns_fd(p.cmd.nsid), False, tag, self._fields(p.cmd, buf, meta))
            p.t0 = time.monotonic_ns()
        ring.submit()
        # The kernel enforces timeout_ms; this is only a backstop if it never answers.
        backstop = max(t or self.io_timeout for t in {cmd.timeout for cmd in cmds}) + 10
        with trio.move_on_after(backstop):
            await waiter.event.wait()
        for p in pendings:
            if not p.done:
                self._inflight.pop(p.cid, None)
                self.sink.timeout()
                self._fail(p, CommandTimeout(f"no completion from the kernel after {backstop:g} s"))
        return pendings

    async def _run_ioctl(self, p: Pending) -> None:
        cmd = p.cmd
        fd = self._ctrl_fd if cmd.admin else self._ns_fd(cmd.nsid)
        buf, meta = self._buffers(cmd)
        arg = bytearray(PASSTHRU64.size)
        PASSTHRU64.pack_into(arg, 0, *self._fields(cmd, buf, meta), 0)
        p.t0 = time.monotonic_ns()
        ret = await trio.to_thread.run_sync(passthru.ioctl, fd, cmd.admin, arg,
                                            limiter=self._threads)  # fmt: skip
        self._complete(p, ret, PASSTHRU64.unpack_from(arg)[-1] & RESULT_MASK, buf, meta)

    async def _reaper(self, ring: uring.Uring) -> None:
        while True:
            await trio.lowlevel.wait_readable(ring.eventfd)
            ring.drain_eventfd()
            done: list[tuple[Pending, int, int]] = []
            for tag, res, result in ring.completions():
                item = self._inflight.pop(tag, None)
                if item is None:  # answered after our backstop gave up on it
                    continue
                p, buf, meta = item
                if res >= 0:  # an NVMe status: accounted for together, below
                    if buf is not None:
                        self._keep(p, buf.view)
                    self._pool.give(buf)
                    self._pool.give(meta)
                    done.append((p, res & STATUS_MASK, result & RESULT_MASK))
                else:
                    if done:  # keep the ring in completion order
                        self._finish_many(None, done)
                        done = []
                    self._complete(p, res, result & RESULT_MASK, buf, meta)
            if done:
                self._finish_many(None, done)
            self._space.set()

    def _complete(
        self, p: Pending, res: int, result: int, buf: HostBuffer | None, meta: HostBuffer | None
    ) -> None:
        """One command back from the kernel: a status, or a host error."""
        if res >= 0:
            if buf is not None:
                self._keep(p, buf.view)
            self._finish_many(None, [(p, res & STATUS_MASK, result)])
        else:
            if res == -errno.ENODEV:
                self._gone.set()
            self._fail(p, HostError(-res))
        self._pool.give(buf)
        self._pool.give(meta)

    # -- the compiled bulk data path -----------------------------------------------------------

    async def run_bulk(
        self,
        job: Bulk,
        *,
        qd: int,
        rate: float = 0.0,
        on_turn: Callable[[], None] | None = None,
    ) -> None:
        """Run `job` through the compiled loop, `qd` commands in flight, under `rate` MB/s (0: no
        cap); `on_turn` is called after every turn (at least every TURN_MS), with `job` updated.

        Every completion is counted; a failed one is taken from there as a first attempt of
        submit_batch's would be, so the ring gets what the Python path would have written. On
        cancellation the loop stops sending and waits up to DRAIN_S for what is in flight."""
        ns = self._namespace(job.nsid)
        cmd_bytes = job.nlb * ns.lba_size
        buf_bytes = cmd_bytes if job.opcode == c.NVM_READ else 0
        try:
            loop = bulk.Loop(qd, buf_bytes, self.io_timeout + BACKSTOP_S)
        except OSError as e:
            raise EngineError(f"{self.ctrl_name}: {e.strerror}") from None
        j = loop.job
        j.nsid, j.opcode, j.lba_size, j.nlb = job.nsid, job.opcode, ns.lba_size, job.nlb
        j.timeout_ms = int(self.io_timeout * 1000)
        j.start, j.end, j.next, j.low = job.start, job.end, job.start, job.start
        j.random, j.count, j.seed = int(job.random), job.count, job.seed
        job.lba = job.start
        bps = rate * 1_000_000
        burst = max(cmd_bytes, bps * TURN_MS / 1000)  # what a paced job may send at once
        began, granted = trio.current_time(), 0
        generation = self.detaches
        try:
            while True:
                if j.inflight == 0:  # nothing older in flight: see _first_attempts
                    generation = self.detaches
                if self.state not in ACCEPTING and j.inflight == 0:
                    # Detached: the next commands wait (and fail) as submit_batch's do.
                    cmds = self._take_commands(job, loop, ns)
                    if not cmds:
                        break
                    self._account(job, await self.submit_batch(cmds))
                    j.bytes_done += sum((cmd.nlb or 0) * ns.lba_size for cmd in cmds)
                    job.lba, job.bytes_done = int(j.low), int(j.bytes_done)
                    if on_turn is not None:
                        on_turn()
                    continue
                if bps:
                    due = int((trio.current_time() - began) * bps + burst)
                    if due - granted < cmd_bytes and j.inflight == 0 and not self._finished(j):
                        wait = (granted + cmd_bytes - burst) / bps - (trio.current_time() - began)
                        await trio.sleep(max(0.0, wait))
                        continue
                    j.budget = max(0, due - granted)
                j.fd = self._ns_fd(job.nsid)  # new nodes after a reattach
                # Detached with commands in flight: reap them (they fail, to be sent again
                # later), send nothing new to the old nodes.
                j.stop = int(self.state not in ACCEPTING)
                j.report_all = int(bool(self.policy.table[0]))  # a policy that logs successes
                budget = int(j.budget)
                reports = await trio.to_thread.run_sync(loop.run, TURN_MS)
                if bps:
                    granted += budget - int(j.budget)
                job.commands += self._count_successes(loop, job.opcode)
                if reports:
                    self._account(job, await self._settle_bulk(job, ns, reports, generation))
                job.lba, job.bytes_done = int(j.low), int(j.bytes_done)
                if on_turn is not None:
                    on_turn()
                if j.inflight == 0 and self._finished(j):
                    break
        finally:
            try:
                await self._drain(job, ns, loop)
            finally:
                loop.close()

    def _namespace(self, nsid: int) -> Namespace:
        for ns in self.namespaces:
            if ns.nsid == nsid:
                return ns
        raise UsageError(f"{self.ctrl_name}: no namespace {nsid}")

    @staticmethod
    def _finished(j: Any) -> bool:
        """Nothing left for the loop to send (it may still have commands in flight)."""
        if j.random:
            return bool(j.count) and j.sent >= j.count
        return bool(j.next >= j.end)

    @staticmethod
    def _command(job: Bulk, ns: Namespace, slba: int, nlb: int) -> Command:
        if job.opcode == c.NVM_VERIFY:
            return c.verify(job.nsid, slba, nlb)
        return c.read(job.nsid, slba, nlb, ns.lba_size)

    def _take_commands(self, job: Bulk, loop: bulk.Loop, ns: Namespace) -> list[Command]:
        """The next commands the loop would have sent (up to its qd), taken from it."""
        j = loop.job
        cmds: list[Command] = []
        if job.random:
            # Where the loop's generator stands (nvme/lbas.py): the LBAs it would have sent.
            state = int(j.seed)
            slots = lbas.random_slot_count(job.start, job.end, job.nlb)
            while len(cmds) < loop.qd and slots and not self._finished(j):
                state, slba = lbas.random_lba(state, job.start, slots, job.nlb)
                cmds.append(self._command(job, ns, slba, job.nlb))
                j.sent += 1
            j.seed = state
        else:
            for slba, nlb in itertools.islice(
                lbas.in_order(int(j.next), int(j.end), job.nlb), loop.qd
            ):
                cmds.append(self._command(job, ns, slba, nlb))
                j.next = slba + nlb
            j.low = j.next
        return cmds

    def _count_successes(self, loop: bulk.Loop, opcode: int) -> int:
        """Successes the loop counted since the last call, into the engine's counters."""
        ok, lat_total, lat_max = loop.take_successes()
        self.sink.successes(ok, False, opcode, lat_total, lat_max)
        return ok

    @staticmethod
    def _account(job: Bulk, results: Sequence[Completion | CommandError]) -> None:
        job.commands += len(results)
        job.failed += sum(1 for r in results if isinstance(r, CommandError) or not r.status.ok)

    def _first_attempts(
        self, job: Bulk, ns: Namespace, reports: list[bulk.Report], generation: int, retry: bool
    ) -> list[Pending]:
        """The loop's reports as first attempts that completed or failed, in completion order,
        through the completion path every attempt takes (_finish_many, _fail)."""
        waiter = Waiter(len(reports))
        pendings = []
        done: list[tuple[Pending, int, int]] = []
        for r in reports:
            p = Pending(self._command(job, ns, r.slba, r.nlb), 0, waiter, False, retry)
            # Issued when at most `generation` detaches had happened: an -ENODEV after a
            # removal since then is sent again once the controller is back.
            p.cid, p.t0, p.generation = r.tag, r.t0_ns, generation
            pendings.append(p)
            if r.res >= 0:
                done.append((p, r.res & STATUS_MASK, r.result & RESULT_MASK))
                continue
            if done:  # keep the ring in completion order
                self._finish_many(None, done)
                done = []
            if r.res == bulk.NO_COMPLETION:
                self.sink.timeout()
                backstop = self.io_timeout + BACKSTOP_S
                self._fail(p, CommandTimeout(f"no completion from the kernel after {backstop:g} s"))
            else:
                if r.res == -errno.ENODEV:
                    self._gone.set()
                self._fail(p, HostError(-r.res))
        if done:
            self._finish_many(None, done)
        return pendings

    async def _settle_bulk(
        self, job: Bulk, ns: Namespace, reports: list[bulk.Report], generation: int
    ) -> list[Completion | CommandError]:
        """Take the loop's reports to their final dispositions (retries, requeues)."""
        return await self._carry_on(self._first_attempts(job, ns, reports, generation, True))

    async def _carry_on(self, done: list[Pending]) -> list[Completion | CommandError]:
        """The compiled loop's failed first attempts, on to their final results as any batch."""
        cmds = [p.cmd for p in done]
        return await self._rounds(cmds, [p.attempt for p in done], done, False, True)

    async def _drain(self, job: Bulk, ns: Namespace, loop: bulk.Loop) -> None:
        """Stop the loop and wait (up to DRAIN_S, whatever cancelled us) for its commands in
        flight; what fails now is accounted and logged, without retries or requeues."""
        j = loop.job
        j.stop = 1
        with trio.CancelScope(shield=True, deadline=trio.current_time() + DRAIN_S):
            while j.inflight:
                reports = await trio.to_thread.run_sync(loop.run, TURN_MS // 2)
                job.commands += self._count_successes(loop, job.opcode)
                pendings = self._first_attempts(job, ns, reports, self.detaches, False)
                for p in pendings:
                    if p.requeue and p.error is not None:  # no later send: the error stands
                        self._log_failure(p.cmd, p.error, p.attempt)
                self._account(job, [p.completion or p.error or CommandError("no completion")
                                    for p in pendings])  # fmt: skip
        self._count_successes(loop, job.opcode)
        job.lba, job.bytes_done = int(j.low), int(j.bytes_done)

    # -- hot-unplug ----------------------------------------------------------------------------

    async def _watch(self) -> None:
        name = self.source.controller.name
        while True:
            with trio.move_on_after(self.watch_interval):
                await self._gone.wait()
            if devices.controller_serial(name) == self.serial:
                self._gone = trio.Event()
                continue
            self._change_state(S.DETACHED, f"{name} removed")
            self._log_host(
                events.NOTICE,
                f"controller {name} (serial {self.serial}) removed; waiting for it to come back",
            )
            name = await self._wait_for_serial()
            self._gone = trio.Event()

    async def _wait_for_serial(self) -> str:
        while True:
            await trio.sleep(self.watch_interval)
            for ctrl in devices.controllers():
                if ctrl.serial != self.serial:
                    continue
                wanted = [n for n in ctrl.namespaces if n.nsid in self._nsids]
                if len(wanted) != len(self._nsids):
                    continue
                try:
                    source = devices.DeviceSource(ctrl.node, ctrl, wanted)
                    self._close_fds()
                    self._open(source)
                except (EngineError, OSError):
                    continue
                self.source = source
                self.ctrl_name = ctrl.name
                self._log_host(
                    events.NOTICE, f"controller serial {self.serial} reattached as {ctrl.name}"
                )
                self._change_state(S.READY, f"reattached as {ctrl.name}")
                return ctrl.name

    def _close_fds(self) -> None:
        for fd in [self._ctrl_fd, *self._ns_fds.values()]:
            if fd >= 0:
                os.close(fd)
        self._ctrl_fd = -1
        self._ns_fds = {}
