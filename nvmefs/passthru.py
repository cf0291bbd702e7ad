"""The engine for kernel passthrough: /dev/ngXnY for I/O, /dev/nvmeX for admin commands.

Theory of operation: the kernel owns the NVMe queues, so this engine owns none; it hands each
command to the kernel and gets back either the 15-bit NVMe status (>= 0), which goes through the
translator like any completion, or a negative errno, which is a host error (-ENODEV device gone,
-EINTR cancelled by a controller reset, -EINVAL refused) and becomes a ring entry of its own kind.

I/O goes through io_uring (`uring`: IORING_OP_URING_CMD, batched submission, one reaper woken by
an eventfd) or ioctl (`ioctl`: NVME_IOCTL_IO64_CMD in worker threads). Admin commands always use
NVME_IOCTL_ADMIN64_CMD. The kernel applies the timeout (timeout_ms in each command) and never
retries passthrough commands, so retries are ours, as with every engine.

A watcher notices the controller disappearing (hot-unplug), logs it, and holds new commands until
a controller with the same serial number comes back, then reattaches to its new nodes.
"""

from __future__ import annotations

import errno as errno_mod
import fcntl
import mmap
import os
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from nvmefs import events
from nvmefs.engine import (
    CommandError,
    CommandTimeout,
    EngineBase,
    EngineError,
    _Pending,
    _Waiter,
)
from nvmefs.nvme.commands import Command
from nvmefs.nvme.layouts import ffi
from nvmefs.ring import DebugRing
from nvmefs.transport import devices, uring
from nvmefs.transport.devices import DeviceSource

NVME_IOCTL_ADMIN64_CMD = 0xC0504E47
NVME_IOCTL_IO64_CMD = 0xC0504E48
# struct nvme_passthru_cmd64, 80 bytes: nvme_uring_cmd's 72 and the 64-bit result.
PASSTHRU64 = struct.Struct("<BBHIIIQQIIIIIIIIIIQ")
TRANSPORTS = ("uring", "ioctl")


class HostError(CommandError):
    """A negative passthrough result: the host, not the controller, failed the command."""

    kind = events.HOST_ERROR

    def __init__(self, err: int) -> None:
        self.errno = err
        name = errno_mod.errorcode.get(err, str(err))
        super().__init__(f"-{name} ({os.strerror(err)})")


_Buf = tuple[mmap.mmap, int] | None  # a pooled buffer and its address, or no buffer


class _BufferPool:
    """Page-aligned buffers for data transfers, reused by size."""

    def __init__(self) -> None:
        self._free: dict[int, list[tuple[mmap.mmap, int]]] = {}

    def take(self, size: int) -> tuple[mmap.mmap, int]:
        size = max(4096, -(-size // 4096) * 4096)
        free = self._free.get(size)
        if free:
            return free.pop()
        buf = mmap.mmap(-1, size)
        addr = int(ffi.cast("uintptr_t", ffi.from_buffer(buf)))
        return buf, addr

    def give(self, item: tuple[mmap.mmap, int]) -> None:
        self._free.setdefault(len(item[0]), []).append(item)


def _ioctl(fd: int, request: int, arg: bytearray) -> int:
    """Runs in a worker thread: returns the NVMe status or -errno."""
    try:
        return int(fcntl.ioctl(fd, request, arg, True))
    except OSError as e:
        return -(e.errno or errno_mod.EIO)


class PassthroughEngine(EngineBase):
    def __init__(
        self, source: DeviceSource, ring: DebugRing, *, transport: str = "uring", **kw: Any
    ) -> None:
        kw.setdefault("ctrl_name", source.controller.name)
        super().__init__(ring, **kw)
        if transport not in TRANSPORTS:
            raise EngineError(f"transport {transport!r}: expected uring or ioctl")
        self.source = source
        self.transport = transport
        self.serial = source.controller.serial
        self._nsids = [n.nsid for n in source.namespaces]
        self._ctrl_fd = -1
        self._ns_fds: dict[int, int] = {}
        self._ring: uring.Uring | None = None
        self._inflight: dict[int, tuple[_Pending, _Buf, _Buf]] = {}
        self._next_tag = 1
        self._space = trio.Event()
        self._attached = trio.Event()
        self._gone = trio.Event()  # set by an -ENODEV completion: look now, not at the next tick
        self._pool = _BufferPool()
        self._threads = trio.CapacityLimiter(max(1, self.queue_depth))

    # -- lifecycle -----------------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[PassthroughEngine]:
        self.state = "starting"
        self._open(self.source)
        try:
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
                nursery.start_soon(self._watch)
                self.state = "ready"
                self._attached.set()
                try:
                    yield self
                finally:
                    self.state = "stopped"
                    nursery.cancel_scope.cancel()
        finally:
            self._close()

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
        self, cmd: Command, addr: int, meta: tuple[mmap.mmap, int] | None
    ) -> tuple[int, ...]:
        """The fields nvme_uring_cmd and nvme_passthru_cmd64 share (the latter adds the result)."""
        timeout = cmd.timeout or (self.admin_timeout if cmd.admin else self.io_timeout)
        maddr, mlen = (meta[1], len(cmd.metadata or b"")) if meta is not None else (0, 0)
        return (
            cmd.opcode,
            0,
            0,
            cmd.nsid,
            0,
            0,
            maddr,
            addr if cmd.data_len else 0,
            mlen,
            cmd.data_len,
            cmd.cdw10,
            cmd.cdw11,
            cmd.cdw12,
            cmd.cdw13,
            cmd.cdw14,
            cmd.cdw15,
            int(timeout * 1000),
            0,
        )

    def _buffer(self, cmd: Command) -> tuple[mmap.mmap, int] | None:
        if not cmd.data_len:
            return None
        item = self._pool.take(cmd.data_len)
        if cmd.to_device and cmd.data is not None:
            item[0][: len(cmd.data)] = cmd.data
        return item

    def _meta(self, cmd: Command) -> tuple[mmap.mmap, int] | None:
        if not cmd.metadata:
            return None
        item = self._pool.take(len(cmd.metadata))
        item[0][: len(cmd.metadata)] = cmd.metadata
        return item

    def _ns_fd(self, nsid: int) -> int:
        # A command for a namespace we did not open goes to our first node anyway: the kernel,
        # not nvmefs, decides that it refuses it (-EINVAL), and that is what gets logged.
        fd = self._ns_fds.get(nsid)
        return fd if fd is not None else next(iter(self._ns_fds.values()), -1)

    async def _issue(
        self, cmds: list[Command], attempt: int, keep: bool, recover: bool = True
    ) -> list[_Pending]:
        while self.state == "detached":
            await self._attached.wait()
        waiter = _Waiter(len(cmds))
        pendings = [_Pending(cmd, attempt, waiter, keep) for cmd in cmds]
        admin = cmds[0].admin
        if admin or self.transport == "ioctl" or self._ring is None:
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
            buf, meta = self._buffer(p.cmd), self._meta(p.cmd)
            tag = self._next_tag
            self._next_tag += 1
            p.cid = tag
            self._inflight[tag] = (p, buf, meta)
            ring.prep_nvme(
                self._ns_fd(p.cmd.nsid), False, tag, self._fields(p.cmd, buf[1] if buf else 0, meta)
            )
            p.t0 = time.monotonic_ns()
        ring.submit()
        # The kernel enforces timeout_ms; this is only a backstop if it never answers.
        backstop = max(t or self.io_timeout for t in {cmd.timeout for cmd in cmds}) + 10
        with trio.move_on_after(backstop):
            await waiter.event.wait()
        for p in pendings:
            if not p.done:
                self._inflight.pop(p.cid, None)
                self.stats.timeouts += 1
                self._log_host(
                    events.TIMEOUT,
                    f"no completion from the kernel after {backstop:g} s",
                    nsid=p.cmd.nsid,
                    slba=p.cmd.slba,
                )
                err = CommandTimeout(f"no completion after {backstop:g} s")
                err.logged = True
                self._fail(p, err)
        return pendings

    async def _run_ioctl(self, p: _Pending) -> None:
        cmd = p.cmd
        fd = self._ctrl_fd if cmd.admin else self._ns_fd(cmd.nsid)
        request = NVME_IOCTL_ADMIN64_CMD if cmd.admin else NVME_IOCTL_IO64_CMD
        buf, meta = self._buffer(cmd), self._meta(cmd)
        arg = bytearray(PASSTHRU64.size)
        PASSTHRU64.pack_into(arg, 0, *self._fields(cmd, buf[1] if buf else 0, meta), 0)
        p.t0 = time.monotonic_ns()
        ret = await trio.to_thread.run_sync(_ioctl, fd, request, arg, limiter=self._threads)
        result = PASSTHRU64.unpack_from(arg)[-1] & 0xFFFFFFFF
        self._complete(p, ret, result, buf, meta)

    async def _reaper(self, ring: uring.Uring) -> None:
        while True:
            await trio.lowlevel.wait_readable(ring.eventfd)
            ring.drain_eventfd()
            done: list[tuple[_Pending, int, int]] = []
            for tag, res, result in ring.completions():
                item = self._inflight.pop(tag, None)
                if item is None:  # answered after our backstop gave up on it
                    continue
                p, buf, meta = item
                if res >= 0:  # an NVMe status: accounted for together, below
                    self._keep_data(p, buf)
                    self._give_back(buf, meta)
                    done.append((p, res & 0x7FFF, result & 0xFFFFFFFF))
                else:
                    if done:  # keep the ring in completion order
                        self._finish_many(None, done)
                        done = []
                    self._complete(p, res, result & 0xFFFFFFFF, buf, meta)
            if done:
                self._finish_many(None, done)
            self._space.set()

    def _complete(
        self,
        p: _Pending,
        res: int,
        result: int,
        buf: tuple[mmap.mmap, int] | None,
        meta: tuple[mmap.mmap, int] | None,
    ) -> None:
        cmd = p.cmd
        if res >= 0:
            self._keep_data(p, buf)
            self._finish(p, None, res & 0x7FFF, result, p.data)
        else:
            err = HostError(-res)
            self.stats.host_errors += 1
            self._log_host(
                events.HOST_ERROR,
                f"{'admin' if cmd.admin else 'I/O'} command failed in the host: {err}",
                nsid=cmd.nsid,
                opcode=f"0x{cmd.opcode:02x}",
                slba=cmd.slba,
                nlb=cmd.nlb,
            )
            err.logged = True
            self._fail(p, err)
            if err.errno == errno_mod.ENODEV:
                self._gone.set()
        self._give_back(buf, meta)

    @staticmethod
    def _keep_data(p: _Pending, buf: tuple[mmap.mmap, int] | None) -> None:
        if p.keep and buf is not None and not p.cmd.to_device:
            p.data = bytes(buf[0][: p.cmd.data_len])

    def _give_back(self, *items: tuple[mmap.mmap, int] | None) -> None:
        for item in items:
            if item is not None:
                self._pool.give(item)

    # -- hot-unplug ----------------------------------------------------------------------------

    async def _watch(self, interval: float = 0.25) -> None:
        name = self.source.controller.name
        while True:
            with trio.move_on_after(interval):
                await self._gone.wait()
            if self._present(name):
                self._gone = trio.Event()
                continue
            self.state = "detached"
            self._attached = trio.Event()
            self._log_host(
                events.NOTICE,
                f"controller {name} (serial {self.serial}) removed; waiting for it to come back",
            )
            name = await self._wait_for_serial(interval)
            self._gone = trio.Event()

    def _present(self, name: str) -> bool:
        path = devices.SYSFS / name
        return path.exists() and devices._read(path / "serial") == self.serial

    async def _wait_for_serial(self, interval: float) -> str:
        while True:
            await trio.sleep(interval)
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
                self.state = "ready"
                self._attached.set()
                self._log_host(
                    events.NOTICE, f"controller serial {self.serial} reattached as {ctrl.name}"
                )
                return ctrl.name

    def _close_fds(self) -> None:
        for fd in [self._ctrl_fd, *self._ns_fds.values()]:
            if fd >= 0:
                os.close(fd)
        self._ctrl_fd = -1
        self._ns_fds = {}
