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

The bulk data path (scrub's and randread's reads) is engine/compiled.py's: the compiled loop, or
batches through submit_batch (`datapath=python`), with the same ring entries and counters.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from nvmefs.engine.base import (
    EngineState,
    Pending,
    Waiter,
)
from nvmefs.engine.compiled import BulkEngine
from nvmefs.errors import CommandTimeout, EngineError, HostError, UsageError
from nvmefs.linux import bulk, devices, passthru, uring
from nvmefs.linux.devices import DeviceSource
from nvmefs.linux.passthru import PASSTHRU64, RESULT_MASK, BufferPool, HostBuffer
from nvmefs.nvme.commands import Command
from nvmefs.nvme.status import STATUS_MASK
from nvmefs.store import events
from nvmefs.store.ring import DebugRing

log = logging.getLogger("nvmefs.engine")

TRANSPORTS = ("uring", "ioctl")
# auto: compiled where it can run (transport uring and the extension loads), else python.
DATAPATHS = ("auto", "compiled", "python")
WATCH_INTERVAL_S = 0.25
S = EngineState


class PassthroughEngine(BulkEngine):
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
                nursery.start_soon(self.fold_timer)
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
            self.sink.flush()  # the open fold, last: nothing is logged after this

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
