"""The `kernel` source: every NVMe error of the machine, from the kernel's own tracepoints.

Theory of operation
- A private tracefs instance enables `nvme:nvme_complete_rq` (filtered `status != 0` unless the
  log policy wants successes too) and `block:block_rq_complete` filtered `error != 0`. One trio
  task reads every CPU's trace_pipe_raw (buffer_percent 0: readable at any data): once any is
  readable it lets READ_DELAY_S pass (so that a storm's events come in full pages, not one
  read and one turn of Python per event or two), reads every CPU until all are drained, and
  hands the pages to the trace consumer, which reads them with the offsets of each event's
  format file. One task, not one per CPU: a wake-up costs the same for one CPU's pages as for
  all of them, and under steady I/O on every CPU a task each would wake that many times more.
- nvme_complete_rq fires for every attempt of a request; the block event fires once, at the
  request's final completion, right after the last nvme_complete_rq and on the same CPU. Each
  page goes to a trace consumer (nvmefs.linux.tracebulk: the compiled one, or its Python
  fallback where it was not built; `stats` says which runs, as `trace_consumer`) that decodes,
  pairs each CPU's last attempt with the block event that follows it (final: one entry, as the
  patch logged; any other event on that CPU, or a grace period, means it was retried) and counts.
  It hands back only the attempts the log policy keeps (its `keep` table, reconfigured when
  the policy changes) and every retried path error (its `watch` table: SCT 3); its counters
  go to the completion sink in bulk after each read turn and each expiry.
- In a storm the sink folds like entries (engine/sink.py's Folder). While the open fold is one
  this source's entry opened, the consumer is told what the like requests look like
  (tracebulk.Like) and counts them itself, with their LBA range, into a number the sink adds
  to the fold: a storm's requests, failures or log=all's successes, cost no Python each. What
  it cannot fold the same way (retried attempts, passthrough ones that may be this process's
  own) comes back as entries, which `_log_entry` counts into the fold without an entry.
- With `locate` on, the source's entries reach the ring through a Placer (engine/owners.py,
  as the sink's `front`): an entry with a disk and an LBA waits, a bounded while, for the file
  (or metadata, free space) behind that LBA, and the source's entries keep their order.
- Lost events are counted exactly from the instance's per-CPU stats and logged; controllers
  appearing or disappearing are logged; the instance is removed at exit, by its guardian
  process at once if the daemon is killed (see nvmefs.linux.tracefs), and by the next start if
  neither could.
- What an instance enables is only what the entries need, so that one nobody removes costs
  little: nvme_complete_rq with the failing statuses (unless log=all), and block_rq_complete
  with an error on NVMe block devices (major 259) or on none (dev 0: admin and passthrough
  requests without a disk) - a failing SATA or virtio disk is not traced, and its block errors
  cannot pair with an NVMe attempt on the same CPU.
- Native multipath: the kernel traces a namespace's requests under the hidden path disk they
  went through (nvme0c1n1), which has no device number. Entries name the namespace (the head,
  nvme0n1), the controller of the path (ctrl) and the LBAs, as for any disk. An attempt on a
  path that ends with no block event and that the kernel's rule (nvme.disposition) fails over
  - a path error (SCT 3: the controller going away gives 0x370/0x371) not yet out of retries -
  was not an error of the namespace: `nvme_failover_req` requeues its bios on another path and
  ends the request with success, logging nothing. The consumer hands back every retried path
  error, whatever the policy, and the engine applies that rule to it. A failover is counted
  (`failovers`, and as retried) and noted as a host entry of the path, at most two per path
  and status per slow round (the first at once, then how many more); paths that appear or go
  are noted too. (The kernel also fails over any status of a request whose path queue is
  dying; with a status that is no path error, the trace cannot tell that from a retry, and it
  counts as one.)
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from nvmefs.engine.base import EngineState, SourceBase
from nvmefs.engine.owners import Placer
from nvmefs.errors import EngineError, UsageError
from nvmefs.linux import devices, tracebulk, tracefs
from nvmefs.linux.devices import Disk
from nvmefs.linux.tracebulk import RETRIED, USER_CMD, Attempt, BlockEnd, Consumer, Fed, Like
from nvmefs.nvme.disposition import Disposition, decide
from nvmefs.nvme.policy import LogPolicy
from nvmefs.nvme.status import SCT_PATH, SCT_SC_MASK, sct_of
from nvmefs.store import events
from nvmefs.store.events import NvmeEvent
from nvmefs.store.ring import DebugRing

S = EngineState
NO_SECTOR = (1 << 64) - 1  # block events of passthrough requests carry sector -1
PAGE = 4096
PAGES_PER_TURN = 16
# The instance's per-CPU buffer when trace_buffer_kb is not given: a storm's events must wait
# there while the daemon gets no CPU (the guest of the VM storm test, saturated by fio at QD32,
# overflowed the kernel's default of 1408 KiB), so BUFFER_MAX_KB per CPU, at most BUFFER_TOTAL_KB
# for all CPUs together, and never less than the kernel's own default.
BUFFER_MAX_KB = 8192
BUFFER_TOTAL_KB = 32768
# How long the reader waits after it is woken, before it reads: what a storm or a busy disk
# under log=all writes meanwhile fills pages, and each turn of reading costs the machine CPU
# its own I/O wants (at QD1 under log=all, 0.5 s took half the daemon's CPU of 0.1 s).
# Small beside the 2 s an entry may take.
READ_DELAY_S = 0.5
OWN_WINDOW_S = 2.0  # how far apart our engine's and the tracepoint's view of one command may be
HOLD_S = 0.5  # a passthrough error waits this long for our own engine to claim it
HOUSEKEEPING_S = 0.25  # expired attempts and held entries are resolved this often
SLOW_S = 5.0  # lost-event counts and the controller set, this often
OPS = {"R": "read", "W": "write", "D": "discard", "N": "other", "F": "flush"}
# The codes whose retried attempts the consumer hands back whatever the log policy: path
# errors, which native multipath fails over instead of retrying (see `_is_failover`).
PATH_ERRORS = bytes(sct_of(code) == SCT_PATH for code in range(SCT_SC_MASK + 1))
# Every NVMe namespace (and each hidden path disk of native multipath) is a block device of the
# kernel's extended major: the block errors worth tracing are theirs, and those with no disk.
BLOCK_EXT_MAJOR = 259
BLOCK_FILTER = (
    f"error != 0 && (dev == 0 || (dev >= {devices.kernel_dev(BLOCK_EXT_MAJOR, 0)}"
    f" && dev < {devices.kernel_dev(BLOCK_EXT_MAJOR + 1, 0)}))"
)


def default_buffer_kb(cpus: int, kernel_kb: int) -> int | None:
    """The per-CPU buffer (KiB) of an instance for `cpus` CPUs whose kernel default is
    `kernel_kb`, or None to keep that default (see BUFFER_MAX_KB)."""
    kb = min(BUFFER_MAX_KB, BUFFER_TOTAL_KB // max(cpus, 1))
    return kb if kb > kernel_kb else None


def operation(rwbs: str | None, qid: int, flags: int) -> str | None:
    """What the request was: admin (qid 0), passthrough (a user command), or from the rwbs of
    its block event; None when it had none (a success under log=all: only failures' block
    events are traced, and nvme_complete_rq does not say the opcode)."""
    if qid == 0:
        return "admin"
    if flags & USER_CMD:
        return "passthrough"
    if rwbs is None:
        return None
    ops = rwbs.lstrip("F") or "F"  # a leading F on a data op is a preflush
    if ops.startswith("DE"):
        return "secure-erase"
    return OPS.get(ops[0], "other")


async def _any_readable(fds: list[int]) -> None:
    """Return once any of `fds` is readable."""
    if len(fds) == 1:
        await trio.lowlevel.wait_readable(fds[0])
        return
    async with trio.open_nursery() as nursery:

        async def one(fd: int) -> None:
            await trio.lowlevel.wait_readable(fd)
            nursery.cancel_scope.cancel()

        for fd in fds:
            nursery.start_soon(one, fd)


@dataclass(frozen=True)
class KernelSpec:
    """What a `kernel` SOURCE watches: every controller, one (nvmeX) or one namespace."""

    text: str
    ctrl: str | None = None  # nvmeX
    disk: str | None = None  # nvmeXnY
    # The disk is a native-multipath head: its requests are traced under its path disks.
    multipath: bool = False

    @classmethod
    def parse(cls, source: str) -> KernelSpec:
        if source == "kernel":
            return cls(source)
        rest = source.removeprefix("kernel:")
        if rest.startswith("/dev/"):
            name = os.path.basename(os.path.realpath(rest))
            if name not in devices.disks():
                raise UsageError(f"{source}: no NVMe namespace {rest}")
            return cls(source, disk=name, multipath=bool(devices.paths(name)))
        if rest.startswith("nvme") and rest[4:].isdigit():
            if not (devices.SYSFS / rest).exists():
                raise UsageError(f"{source}: no NVMe controller {rest}")
            return cls(source, ctrl=rest)
        raise UsageError(f"{source}: expected kernel, kernel:nvmeX or kernel:/dev/nvmeXnY")

    def nvme_filter(self, policy: LogPolicy) -> str:
        parts = [] if policy.table[0] else ["status != 0"]
        if self.ctrl is not None:
            parts.append(f"ctrl_id == {int(self.ctrl[4:])}")
        if self.disk is not None and self.multipath:
            # Every path of the head, those of controllers that come later included.
            subsys, _, nsid = self.disk.removeprefix("nvme").partition("n")
            parts.append(f'(disk == "{self.disk}" || disk ~ "nvme{subsys}c*n{nsid}")')
        elif self.disk is not None:
            parts.append(f'disk == "{self.disk}"')
        return " && ".join(parts)

    def watched(self) -> list[str]:
        if self.ctrl is not None:
            return [self.ctrl]
        if self.disk is not None:
            return [c.name for c in devices.controllers() if any(
                n.block.endswith("/" + self.disk) for n in c.namespaces)]  # fmt: skip
        return [c.name for c in devices.controllers()]


def check(source: str) -> KernelSpec:
    """Everything that can be refused before anything starts; the spec if all is well."""
    if os.geteuid() != 0:
        raise UsageError(f"{source}: the kernel source needs root (it reads tracefs)")
    root = tracefs.find(mount=True)
    for system, event in (("nvme", "nvme_complete_rq"), ("block", "block_rq_complete")):
        if not (root / "events" / system / event).is_dir():
            raise UsageError(f"{source}: this kernel has no {system}:{event} trace event")
    return KernelSpec.parse(source)


class KernelEngine(SourceBase):
    """An engine whose completions are the kernel's: it sends nothing, it reads tracepoints.

    Invariant: while running, its tracefs instance exists and is read on every CPU; after
    `running()` it exists no more. What its trace consumer counted is in the sink by the end
    of each read turn, `page()` and `expire()`."""

    def __init__(
        self,
        spec: KernelSpec,
        ring: DebugRing,
        *,
        buffer_kb: int | None = None,
        disks: Callable[[], dict[str, Disk]] = devices.disks,
        compiled: bool | None = None,
        placer: Callable[[DebugRing], Placer] | None = None,
        **kw: Any,
    ) -> None:
        kw.setdefault("ctrl_name", "kernel")
        super().__init__(ring, **kw)
        self.spec = spec
        self.buffer_kb = buffer_kb
        self.disks = disks  # the block disks by name, read again when an unknown one shows up
        # The trace consumer, made for the formats of the running kernel (`use_formats`):
        # the compiled one when there, unless `compiled` asks for one (False: the Python one).
        self.compiled = compiled
        self.consumer: Consumer | None = None
        # What looks up the owner of each entry's LBA on the way to the ring (`locate`), while
        # running: made for the ring by `placer`.
        self.placer = None if placer is None else placer(ring)
        self.instance: tracefs.Instance | None = None
        self.lost_events = 0
        # Attempts the kernel failed over to another path (native multipath), and the
        # kernel's nvme_core.max_retries, which decides when a path error is no longer one.
        self.failovers = 0
        self.kernel_max_retries = devices.DEFAULT_MAX_RETRIES
        # Failovers since the last slow round by (path disk, ctrl_id, status): the first of
        # each was logged, the count of the rest is logged at the next round.
        self._failover_more: dict[tuple[str, int, int], int] = {}
        self._paths: set[str] = set()  # the path disks seen at the last slow round
        self._disks: dict[str, Disk] = {}
        self._by_dev: dict[int, Disk] = {}
        self._lost: dict[int, int] = {}
        self._ctrls: dict[str, str] = {}
        # With `own()`: statuses of this process's passthrough attempts, and passthrough
        # errors from the tracepoints waiting to be matched against them.
        self.recognise_own = False
        self._own: list[tuple[int, float]] = []
        self._held: list[tuple[Attempt, BlockEnd | None]] = []
        # The inputs of the entry that opened the sink's fold, the entry, its disk's LBA size
        # and what of the like requests the trace consumer can fold itself (see _log_entry),
        # and the fold the consumer was last given (see _feed).
        self._like: tuple[tuple[object, ...], NvmeEvent, int, Like | None] | None = None
        self._fold_given: Like | None = None
        # Whether the consumer makes LBAs from block events as _log_entry does: the kernel's
        # sector and nr_sector are unsigned (see use_formats).
        self._fold_lbas = False

    def policy_changed(self, policy: LogPolicy) -> None:
        # The log policy decides what the consumer hands back, and the kernel filter too:
        # log=all needs the successes.
        if self.consumer is not None:
            self.consumer.configure(policy.table, self.log_attempts, PATH_ERRORS)
        if self.instance is not None:
            self.instance.set_filter("nvme", "nvme_complete_rq", self.spec.nvme_filter(policy))

    @asynccontextmanager
    async def running(self) -> AsyncIterator[KernelEngine]:
        self._change_state(S.STARTING)
        root = tracefs.find(mount=True)
        stale = tracefs.Instance.remove_stale(root)
        inst = tracefs.Instance(root)
        inst.create(self.buffer_kb)
        fds: list[int] = []
        try:
            self.instance = inst
            if self.buffer_kb is None:
                kb = default_buffer_kb(len(inst.cpus()), inst.buffer_kb())
                if kb is not None:
                    inst.write("buffer_size_kb", str(kb))
            self.use_formats(
                inst.format("nvme", "nvme_complete_rq"), inst.format("block", "block_rq_complete")
            )
            inst.enable("nvme", "nvme_complete_rq", self.spec.nvme_filter(self.policy))
            inst.enable("block", "block_rq_complete", BLOCK_FILTER)
            cpus = inst.cpus()
            fds = [inst.open_raw(cpu) for cpu in cpus]
            self._lost = {cpu: inst.lost(cpu) for cpu in cpus}
            self._refresh_disks()
            self._ctrls = devices.serials()
            self._paths = set(devices.paths())
            self.kernel_max_retries = devices.kernel_max_retries()
            watched = self.spec.watched()
            self._log_host(
                events.START,
                f"watching {', '.join(watched) or 'no controller yet'} through {inst.path}"
                f" on Linux {os.uname().release}"
                + (f"; removed stale instances {', '.join(stale)}" if stale else ""),
            )
            if inst.unguarded is not None:
                self._log_host(
                    events.NOTICE,
                    f"no guardian for {inst.path} ({inst.unguarded}): if this daemon is killed,"
                    " the instance keeps tracing until the next start",
                )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, list(zip(cpus, fds, strict=True)))
                nursery.start_soon(self._housekeeping)
                nursery.start_soon(self.fold_timer)
                if self.placer is not None:
                    self.sink.front = self.placer
                    nursery.start_soon(self.placer.run)
                self._change_state(S.READY)
                try:
                    yield self
                finally:
                    self._change_state(S.STOPPED)
                    nursery.cancel_scope.cancel()
        except OSError as e:
            raise EngineError(f"tracefs: {e.strerror or e}") from None
        finally:
            self.sink.flush()  # the open fold, through the placer if it is the front
            if self.placer is not None:  # what waits for a lookup goes now, in order
                self.sink.front = None
                self.placer.flush()
            self._change_state(S.STOPPED)
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            inst.remove()
            self.instance = None

    def use_formats(self, nvme: tracefs.EventFormat, block: tracefs.EventFormat) -> None:
        """The formats of the two events, as this kernel's format files give them: a new
        consumer reads them (TraceError if neither could)."""
        self.consumer = tracebulk.consumer(
            nvme, block, self.policy.table, self.log_attempts, PATH_ERRORS, compiled=self.compiled
        )
        self._fold_given = None
        self._fold_lbas = not (block.fields["sector"].signed or block.fields["nr_sector"].signed)

    @property
    def trace_consumer(self) -> str:
        """Which consumer reads the pages: "compiled" or "python" (before the formats are
        known, the one `use_formats` will make)."""
        if self.consumer is not None:
            return self.consumer.impl
        compiled = tracebulk.available() if self.compiled is None else self.compiled
        return "compiled" if compiled else "python"

    # -- reading -------------------------------------------------------------------------------

    async def _read(self, readers: list[tuple[int, int]]) -> None:
        """Every CPU's pages (`readers`: (cpu, trace_pipe_raw fd) each), in turns."""
        consumer = self.consumer
        assert consumer is not None  # use_formats() made it before the readers start
        ready = select.poll()
        for _cpu, fd in readers:
            ready.register(fd, select.POLLIN)
        while True:
            if not ready.poll(0):  # nothing to read now: wait for the first CPU that has some
                await _any_readable([fd for _cpu, fd in readers])
            await trio.sleep(READ_DELAY_S)
            full = True
            while full:  # turns, until a turn leaves every CPU drained
                full = False
                since = 0  # pages since the last checkpoint
                for cpu, fd in readers:
                    # A bounded number of pages per CPU and turn, and a checkpoint every so
                    # many: under a flood the FUSE requests and the housekeeping get theirs.
                    for _ in range(PAGES_PER_TURN):
                        try:
                            page = os.read(fd, PAGE)
                        except BlockingIOError:
                            break
                        if not page:
                            break
                        self._fed(self._feed(consumer, cpu, page))
                        since += 1
                    else:
                        full = True
                    if since >= PAGES_PER_TURN:
                        since = 0
                        await trio.lowlevel.checkpoint()
                self._count(consumer)
                await trio.lowlevel.checkpoint()

    def page(self, cpu: int, page: bytes) -> None:
        """Take one trace_pipe_raw page of `cpu`: its entries, then its counters."""
        consumer = self.consumer
        assert consumer is not None, "use_formats() first"
        self._fed(self._feed(consumer, cpu, page))
        self._count(consumer)

    def _feed(self, consumer: Consumer, cpu: int, page: bytes) -> Fed:
        """One page to the consumer, which folds the requests like the open fold's first entry
        while that fold takes them (at the time of the feed)."""
        now = time.monotonic_ns()
        like = self._like
        fold = None
        if (
            like is not None
            and like[3] is not None
            and self.sink.folding(like[1], now)
            and like[0][-1] == self.translator.profile  # its entry's status is still this one
        ):
            fold = like[3]
        if fold is not self._fold_given:
            consumer.fold(fold)
            self._fold_given = fold
        return consumer.feed(cpu, page, now / 1e9)

    def _fed(self, fed: Fed) -> None:
        """What the consumer handed back of one page: a loss it reported, what it folded (all
        of it before the first final), then the attempts it kept, in record order."""
        if fed.lost:
            self._check_lost()
        if fed.folded is not None:
            self._folded(fed.folded)
        for f in fed.finals:
            if f.kind == RETRIED:
                self._retried(f.attempt)
            else:  # final with its block event, or a success (final at once, under log=all)
                self._emit(f.attempt, f.block)

    def _folded(self, folded: tracebulk.Folded) -> None:
        # The fold the consumer counted for is the one _feed saw open, and nothing ran since
        # that could end it: the sink takes the count.
        like = self._like
        if like is None or not self.sink.log_many(like[1], folded.n, folded.lo, folded.hi):
            self._log_host(  # a bug, should one ever break that: said, not a crash in a storm
                events.HOST_ERROR,
                f"{folded.n} requests the trace consumer folded came after their fold ended:"
                " they are in the counters, not in the ring",
                folded=folded.n,
            )

    def _count(self, consumer: Consumer) -> None:
        """The consumer's counters since the last call, into the sink: every attempt by
        status word, every request that ended failing by controller, namespace and status,
        every retried attempt."""
        counts = consumer.take_counts()
        sink = self.sink
        for (_ctrl, _disk, word), n in counts.attempts.items():
            sink.attempt(word, n)
        for (ctrl_id, name, dev, admin, word), n in counts.failed.items():
            disk = self._disk(name, dev)
            nsid = disk.nsid if disk is not None and not admin else None
            sink.final_failure(f"nvme{ctrl_id}", nsid, word, n)
        if counts.retried:
            sink.retried(counts.retried)

    def expire(self, now: float) -> None:
        """Attempts that waited tracebulk.GRACE_S with no block event were retried (or failed
        over): as any retried attempt, then counted."""
        consumer = self.consumer
        assert consumer is not None, "use_formats() first"
        for f in consumer.expire(now):
            self._retried(f.attempt)
        self._count(consumer)

    def _retried(self, a: Attempt) -> None:
        """A retried attempt the consumer handed back (counted there): one that was failed
        over to another path, a host entry of its path; else logged only with log_attempts."""
        if self._is_failover(a):
            self._failed_over(a)
        elif self.log_attempts:
            self._emit(a, None)

    def _is_failover(self, a: Attempt) -> bool:
        """Whether the kernel failed attempt `a`, which no block event ended, over to another
        path rather than retrying it on the same one: as nvme_decide_disposition decides."""
        if not a.status or devices.path_disk(a.disk) is None:
            return False
        d = decide(a.status, a.retries, self.kernel_max_retries,
                   fail_fast=bool(a.flags & USER_CMD), multipath=True)  # fmt: skip
        return d.action is Disposition.FAILOVER

    def _failed_over(self, a: Attempt) -> None:
        self.failovers += 1
        key = (a.disk, a.ctrl_id, a.status)
        if key in self._failover_more:
            self._failover_more[key] += 1
            return
        self._failover_more[key] = 0
        self._log_failovers(key, 1)

    def _log_failovers(self, key: tuple[str, int, int], n: int) -> None:
        path, ctrl_id, status = key
        head = devices.path_disk(path)
        name = self.translator.table[status].name
        what = "a request" if n == 1 else f"{n} more requests"
        self._log_host(
            events.NOTICE,
            f"path {path} of {head[0] if head else '?'} through nvme{ctrl_id}: {what} failed"
            f" over to another path (0x{status:x} {name})",
            ctrl=f"nvme{ctrl_id}",
            disk=head[0] if head else None,
            path=path,
            status=f"0x{status:x}",
            failovers=n,
        )

    def _flush_failovers(self) -> None:
        for key, n in self._failover_more.items():
            if n:
                self._log_failovers(key, n)
        self._failover_more = {}

    def own(self, status: int) -> None:
        """A passthrough attempt of this process failed with `status`: when the tracepoints
        show it, it is not logged again."""
        self._own.append((status, time.monotonic()))
        self._release_held(time.monotonic())

    def _claimed(self, a: Attempt, now: float) -> bool:
        for i, (status, t) in enumerate(self._own):
            if status == a.status and abs(a.seen - t) <= OWN_WINDOW_S:
                del self._own[i]
                return True
        return False

    def _release_held(self, now: float) -> None:
        self._own = [(s, t) for s, t in self._own if now - t <= OWN_WINDOW_S]
        keep = []
        for a, b in self._held:
            if self._claimed(a, now):
                continue
            if now - a.seen >= HOLD_S:
                self._log_entry(a, b)
            else:
                keep.append((a, b))
        self._held = keep

    def _emit(self, a: Attempt, b: BlockEnd | None) -> None:
        """The ring entry of an attempt (with the block event of its final completion); a
        passthrough one waits to be told whether it was this process's own."""
        if self.recognise_own and a.flags & USER_CMD:
            self._held.append((a, b))
            self._release_held(time.monotonic())
            return
        self._log_entry(a, b)

    def _log_entry(self, a: Attempt, b: BlockEnd | None) -> None:
        if not self.sink.logs(a.status):
            return
        # In a storm, a request like the one that opened the sink's fold is counted into it
        # without an entry of its own (the per-request work of a storm, in Python).
        like = self._like
        if like is not None and like[0] == self._like_key(a, b):
            lba_size = like[2]
            slba = nlb = None
            if b is not None and b.sector != NO_SECTOR and lba_size:
                slba = b.sector * 512 // lba_size
                nlb = b.nr_sector * 512 // lba_size or None
            if self.sink.log_like(like[1], slba, nlb):
                return
        disk = self._disk(a.disk, b.dev if b is not None else None)
        slba = nlb = None
        if b is not None and b.sector != NO_SECTOR and disk is not None:
            slba = b.sector * 512 // disk.lba_size
            nlb = b.nr_sector * 512 // disk.lba_size or None
        event = NvmeEvent(
            self.translator.table[a.status],
            ctrl=f"nvme{a.ctrl_id}",
            nsid=disk.nsid if disk is not None and a.qid else None,
            qid=a.qid,
            cid=a.cid,
            admin=a.qid == 0,
            slba=slba,
            nlb=nlb,
            retries=a.retries,
            disk=disk.namespace if disk is not None and a.qid else None,
            op=operation(b.rwbs if b is not None else None, a.qid, a.flags),
        )
        self.sink.log(event)
        self._like = None
        if self.sink.opened_fold(event):
            lba_size = disk.lba_size if disk is not None else 0
            like_c = self._consumer_like(a, b, lba_size)
            self._like = (self._like_key(a, b), event, lba_size, like_c)

    def _consumer_like(self, a: Attempt, b: BlockEnd | None, lba_size: int) -> Like | None:
        """What the trace consumer takes of the requests like `a` (with `b`) to fold them
        itself, or None where only this side can: a retried attempt (log_attempts), a
        passthrough one that may be this process's own, LBAs the consumer would make
        otherwise than _log_entry."""
        user = bool(a.flags & USER_CMD)
        if b is None and a.status and a.qid and not user:
            return None
        if (user and self.recognise_own) or lba_size % 512 or (b and not self._fold_lbas):
            return None
        block = None if b is None else (b.dev, b.rwbs)
        return Like(a.ctrl_id, a.disk, a.status, a.qid == 0, user, block, lba_size // 512)

    def _like_key(self, a: Attempt, b: BlockEnd | None) -> tuple[object, ...]:
        """What everything of a request's entry but its LBA, blocks, cid, qid and retries
        comes from: requests with the same key make like entries."""
        return (a.ctrl_id, a.disk, a.status, a.qid == 0, a.flags & USER_CMD,
                None if b is None else (b.dev, b.rwbs), self.translator.profile)  # fmt: skip

    def _disk(self, name: str, dev: int | None) -> Disk | None:
        disk = self._disks.get(name) if name else self._by_dev.get(dev or -1)
        if disk is None and (name or dev):
            self._refresh_disks()  # a namespace that appeared since (dev_t changes per boot)
            disk = self._disks.get(name) if name else self._by_dev.get(dev or -1)
        return disk

    def _refresh_disks(self) -> None:
        # A disk that went away keeps its entry: its last requests' events are read after it
        # went (a controller the kernel removes fails what it had in flight as it goes), and
        # they are still errors of its namespace. A name or number the kernel gives again is
        # the new disk's.
        fresh = self.disks()
        self._disks = {**self._disks, **fresh}
        # Path disks have no device number: dev 0 is a request without a disk.
        self._by_dev = {**self._by_dev, **{d.dev: d for d in fresh.values() if d.dev}}

    # -- housekeeping --------------------------------------------------------------------------

    async def _housekeeping(self) -> None:
        # Every wake-up costs CPU that the machine's own I/O wants: only often while attempts
        # wait for their block event or passthrough entries for their owner.
        consumer = self.consumer
        assert consumer is not None  # use_formats() made it before the housekeeping starts
        last_slow = time.monotonic()
        while True:
            busy = consumer.pending() or self._held
            await trio.sleep(HOUSEKEEPING_S if busy else SLOW_S)
            now = time.monotonic()
            self.expire(now)
            if self._held:
                self._release_held(now)
            if now - last_slow >= SLOW_S:
                last_slow = now
                self._check_lost()  # a backstop: pages that follow a loss say so at once
                self._check_controllers()
                self._check_paths()
                self._flush_failovers()

    def _check_lost(self) -> None:
        if self.instance is None:
            return
        for cpu, before in self._lost.items():
            now = self.instance.lost(cpu)
            if now > before:
                self._lost[cpu] = now
                self.lost_events += now - before
                self._log_host(
                    events.LOST,
                    f"{now - before} trace events lost on cpu {cpu}: the instance's buffer was"
                    " full; errors among them are not in the ring",
                    cpu=cpu,
                    lost=now - before,
                )

    def _check_controllers(self) -> None:
        now = devices.serials()
        for name in sorted(now.keys() - self._ctrls.keys()):
            self._log_host(events.NOTICE, f"controller {name} (serial {now[name]}) appeared")
        for name in sorted(self._ctrls.keys() - now.keys()):
            self._log_host(
                events.NOTICE, f"controller {name} (serial {self._ctrls[name]}) disappeared"
            )
        if now.keys() != self._ctrls.keys():
            self._refresh_disks()
        self._ctrls = now

    def _check_paths(self) -> None:
        now = set(devices.paths())
        for what, names in (("appeared", now - self._paths), ("is gone", self._paths - now)):
            for path in sorted(names):
                head, ctrl = devices.path_disk(path) or ("?", "?")
                self._log_host(events.NOTICE, f"path {path} of {head} through {ctrl} {what}",
                               ctrl=ctrl, disk=head, path=path)  # fmt: skip
        self._paths = now
