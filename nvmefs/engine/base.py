"""What every source shares (`SourceBase`: one state machine, identity, the completion sink), and
what engines that send commands share besides (`EngineBase`: submission, the retry rule).

Theory of operation
- The kernel source is a SourceBase: it sends nothing and only watches the kernel's completions.
- An EngineBase subclass owns the way commands reach a controller: it brings the controller up in
  `running()`, puts commands on the wire in `_issue()`, and reports each completed attempt with
  `_finish_many()` (an NVMe status) or `_fail()` (the host gave up: no status).
- Every completed attempt goes through the completion sink (engine/sink.py): the translator
  once, the counters. The kernel's
  disposition rule (`nvme.disposition.decide`) then says whether the command is done or retried;
  a command's ring entry is written once, at its final disposition, with its retry count, as the
  kernel's nvme_error_status() sees it. `log_attempts` logs every attempt instead, as the
  nvme_complete_rq tracepoint does.
- A command that ends without a status (timeout, reset, a negative passthrough result) is a
  host-error entry of its own, with the command's context, written once in `_fail()`.
- The engine's state changes only through `_change_state()`, which checks the transition
  against TRANSITIONS and logs it (as the kernel's nvme_change_ctrl_state). While a controller
  is DETACHED, commands wait for it to come back (bounded by io_timeout) instead of failing.
"""

from __future__ import annotations

import enum
import errno
import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import trio

from nvmefs.engine.sink import FOLD_RATE, Sink, Stats
from nvmefs.errors import (
    CommandAborted,
    CommandError,
    CommandTimeout,
    EngineError,
    HostError,
)
from nvmefs.nvme import commands as c
from nvmefs.nvme import tables
from nvmefs.nvme.commands import Command
from nvmefs.nvme.disposition import COMPLETE, Decision
from nvmefs.nvme.layouts import ascii_field, ffi
from nvmefs.nvme.policy import LogPolicy
from nvmefs.nvme.status import Status, Translator
from nvmefs.store import events
from nvmefs.store.events import HostEvent
from nvmefs.store.ring import DebugRing

log = logging.getLogger("nvmefs.engine")


class EngineState(enum.StrEnum):
    """Where an engine's controller is; shown in stats as its value."""

    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    RESETTING = "resetting"
    DETACHED = "detached"  # the controller went away (hot-unplug); commands wait for it
    FAILED = "failed"  # it did not come back after a reset


S = EngineState
# new state -> the states it may follow (everything may stop).
TRANSITIONS: dict[EngineState, frozenset[EngineState]] = {
    S.STARTING: frozenset({S.STOPPED}),
    S.READY: frozenset({S.STARTING, S.RESETTING, S.DETACHED}),
    S.RESETTING: frozenset({S.READY}),
    S.DETACHED: frozenset({S.READY}),
    S.FAILED: frozenset({S.STARTING, S.RESETTING}),
    S.STOPPED: frozenset(EngineState),
}
# States in which commands go to the controller (bring-up sends its own while starting).
ACCEPTING = frozenset({S.STARTING, S.READY, S.RESETTING})
# How often a workload held by a brake looks again (the journal writes thousands at a time).
BRAKE_POLL_S = 0.002
# The shortest sleep of the fold timer: a fold's deadline is on the monotonic clock, which a
# test's mock trio clock may run ahead of; this keeps the timer from spinning meanwhile.
FOLD_TIMER_MIN_S = 0.005

# The ring-entry kind of each way a command can end without a status.
ERROR_KINDS: dict[type[CommandError], str] = {
    CommandTimeout: events.TIMEOUT,
    CommandAborted: events.RESET,
    HostError: events.HOST_ERROR,
}


@dataclass(slots=True)
class Completion:
    """The final completion of a command: its status and what came with it."""

    status: Status
    result: int
    qid: int | None  # None where the kernel owns the queues (passthrough)
    cid: int
    attempt: int  # 0 for the first try, n for the n-th retry
    latency_ns: int
    data: bytes | None = None


@dataclass(slots=True)
class Namespace:
    """An active namespace as Identify Namespace describes it."""

    nsid: int
    nblocks: int
    lba_size: int

    @property
    def size(self) -> int:
        return self.nblocks * self.lba_size


class Waiter:
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


class Pending:
    """One attempt of a command on the wire; `done` once it completed or failed."""

    __slots__ = (
        "attempt",
        "cid",
        "cmd",
        "completion",
        "data",
        "decision",
        "done",
        "error",
        "generation",
        "keep",
        "retry",
        "t0",
        "waiter",
    )

    def __init__(
        self, cmd: Command, attempt: int, waiter: Waiter, keep: bool, retry: bool = True
    ) -> None:
        self.cmd = cmd
        self.attempt = attempt
        self.waiter = waiter
        self.keep = keep
        self.retry = retry  # False: fail-fast, as the kernel's passthrough and readahead
        self.cid = -1
        self.t0 = 0
        self.generation = 0  # the engine's detach count when it was issued
        self.done = False
        self.data: bytes | None = None  # what a read brought in, when `keep`
        self.completion: Completion | None = None
        self.error: CommandError | None = None
        self.decision: Decision = COMPLETE

    @property
    def requeue(self) -> bool:
        """Failed because the controller went away: to be sent again once it is back."""
        return isinstance(self.error, HostError) and self.error.errno == errno.ENODEV


class SourceBase:
    """What every source of completions is: a controller's name and identity, a state that
    changes only through TRANSITIONS, and the completion sink its completions end in. The
    kernel source is one; engines that send commands of their own are EngineBase's.

    Invariant: every completion of the source reaches the ring and the counters through
    `sink`, and nothing else changes them. The sink's open fold reaches the ring at its
    deadline (`fold_timer`, which every source runs) or when the source ends (`sink.flush`).
    """

    def __init__(
        self,
        ring: DebugRing,
        *,
        translator: Translator | None = None,
        policy: LogPolicy | None = None,
        ctrl_name: str = "sim0",
        max_retries: int = 5,
        log_attempts: bool = False,
        fold: float = FOLD_RATE,
    ) -> None:
        # Where completions become counters and entries (the translator, the log policy,
        # Stats, the folder and the ring live there): the one sink of every source.
        self.sink = Sink(
            ring,
            translator or Translator(),
            policy or LogPolicy(),
            max_retries=max_retries,
            log_attempts=log_attempts,
            fold=fold,
        )
        self.ctrl_name = ctrl_name
        self.state = EngineState.STOPPED
        self.detaches = 0  # how often the controller went away
        self._transition = trio.Event()  # set (and replaced) at every state change
        self.serial = self.model = self.firmware = ""
        self.namespaces: list[Namespace] = []

    # What the sink holds, as the engine's own (the control file replaces policy and translator).
    @property
    def ring(self) -> DebugRing:
        return self.sink.ring

    @ring.setter
    def ring(self, ring: DebugRing) -> None:
        self.sink.ring = ring

    @property
    def stats(self) -> Stats:
        return self.sink.stats

    @property
    def policy(self) -> LogPolicy:
        return self.sink.policy

    @policy.setter
    def policy(self, policy: LogPolicy) -> None:
        self.sink.policy = policy
        self.policy_changed(policy)

    def policy_changed(self, policy: LogPolicy) -> None:
        """Called after the log policy changed (the kernel source narrows its trace filter)."""

    @property
    def translator(self) -> Translator:
        return self.sink.translator

    @translator.setter
    def translator(self, translator: Translator) -> None:
        self.sink.translator = translator

    @property
    def log_attempts(self) -> bool:
        return self.sink.log_attempts

    @property
    def max_retries(self) -> int:
        return self.sink.max_retries

    @property
    def on_error(self) -> Callable[[int], None] | None:
        """Told the status word of every attempt that failed (the kernel source uses it to
        know this engine's own passthrough commands when it sees them in the tracepoints)."""
        return self.sink.on_error

    @on_error.setter
    def on_error(self, hook: Callable[[int], None] | None) -> None:
        self.sink.on_error = hook

    def running(self) -> AbstractAsyncContextManager[SourceBase]:
        raise NotImplementedError

    # -- state ---------------------------------------------------------------------------------

    def _change_state(self, new: EngineState, why: str = "") -> bool:
        """Move to `new` if TRANSITIONS allows it from the current state; False otherwise."""
        old = self.state
        if old is new:
            return True
        if old not in TRANSITIONS[new]:
            log.warning("%s: no transition %s -> %s (%s)", self.ctrl_name, old, new, why)
            return False
        self.state = new
        if new is S.DETACHED:
            self.detaches += 1
        log.info("%s: %s -> %s%s", self.ctrl_name, old, new, f" ({why})" if why else "")
        self._transition.set()
        self._transition = trio.Event()
        return True

    async def _until(self, cond: Callable[[], bool], deadline: float) -> bool:
        """Wait (until trio time `deadline`) for `cond()` to hold after some state change."""
        with trio.move_on_at(deadline):
            while not cond():
                await self._transition.wait()
        return cond()

    async def keep_pace(self) -> None:
        """Wait while a consumer that must keep every entry is behind (the ring's brakes: the
        journal's backlog): the source's own workload slows to what records it instead of
        outrunning it and losing entries. Called at batch boundaries on the submit side, never
        on the completion path."""
        ring = self.ring
        while ring.held():
            await trio.sleep(BRAKE_POLL_S)

    async def fold_timer(self) -> None:
        """Send each fold of the sink on at its deadline even when no entry comes to end it
        (the last fold of a storm that stopped), until cancelled: every source runs it while
        it runs, and flushes the sink when it ends. It sleeps while no fold is open."""
        folder = self.sink.folder
        try:
            while True:
                opened = trio.Event()
                folder.on_open = opened.set
                if folder.deadline is None:
                    await opened.wait()
                deadline = folder.deadline
                if deadline is not None:
                    wait = (deadline - time.monotonic_ns()) / 1e9
                    await trio.sleep(max(wait, FOLD_TIMER_MIN_S))
                    self.sink.tick(time.monotonic_ns())
        finally:
            folder.on_open = None

    def _log_host(self, kind: str, message: str, **fields: Any) -> None:
        self.sink.append(HostEvent(kind, message, {"ctrl": self.ctrl_name, **fields}))

    @property
    def latency_avg_us(self) -> float:
        n = self.stats.completions
        return self.stats.latency_ns_total / n / 1000 if n else math.nan


class EngineBase(SourceBase):
    """An engine: commands in, final completions out, every attempt translated and counted.

    Invariant: each command submitted ends as exactly one result (a Completion or a
    CommandError), and unless it failed because the engine stopped, exactly one ring entry
    when the log policy (or, for host errors, always) says so; with `log_attempts`, one per
    logged attempt instead. In a storm, a logged failure's entry may be a like entry's count
    instead (its `repeats`: see sink.Folder).
    """

    def __init__(
        self,
        ring: DebugRing,
        *,
        io_timeout: float = 30.0,
        admin_timeout: float = 60.0,
        queue_depth: int = 128,
        **kw: Any,
    ) -> None:
        super().__init__(ring, **kw)
        self.io_timeout = io_timeout
        self.admin_timeout = admin_timeout
        self.queue_depth = queue_depth
        self.elpe = 0

    def running(self) -> AbstractAsyncContextManager[EngineBase]:
        raise NotImplementedError

    async def _issue(
        self, cmds: list[Command], attempts: Sequence[int], keep: bool, retry: bool = True
    ) -> list[Pending]:
        raise NotImplementedError

    async def _back_after_removal(self, generation: int, deadline: float) -> bool:
        """After a command failed with -ENODEV: True once the controller was detached since
        the command was issued and is ready again; False if it never went away (the error
        stands) or did not come back by `deadline`."""
        notice = min(deadline, trio.current_time() + DETACH_NOTICE_S)
        if not await self._until(lambda: self.detaches > generation, notice):
            return False
        return await self._until(lambda: self.state in ACCEPTING, deadline)

    # -- submission ----------------------------------------------------------------------------

    async def _wait_accepting(self) -> CommandError | None:
        """None once commands may go to the controller (waiting up to io_timeout while it is
        detached); otherwise the error that ends them."""
        if self.state is S.DETACHED:
            deadline = trio.current_time() + self.io_timeout
            await self._until(lambda: self.state is not S.DETACHED, deadline)
        if self.state in ACCEPTING:
            return None
        if self.state is S.DETACHED:
            return CommandTimeout(f"{self.ctrl_name} still detached after {self.io_timeout:g} s")
        return CommandAborted(f"{self.ctrl_name} is {self.state}")

    async def _admin_cmd(self, cmd: Command) -> bytes:
        """An admin command of bring-up: any failure is fatal to bring-up."""
        (r,) = await self.submit_batch([cmd], keep_data=True, retry=False)
        name = tables.opcode_name(cmd.opcode, cmd.admin)
        if isinstance(r, CommandError):
            raise EngineError(f"{self.ctrl_name}: {name} failed: {r}")
        if not r.status.ok:
            raise EngineError(
                f"{self.ctrl_name}: {name} failed with status 0x{r.status.status:x} "
                f"({r.status.name})"
            )
        return r.data or b""

    async def _identify_controller(self) -> None:
        data = await self._admin_cmd(c.identify(c.CNS_CONTROLLER))
        ctrl = ffi.from_buffer("struct nvme_id_ctrl *", bytearray(data))
        self.serial, self.model = ascii_field(ctrl.sn), ascii_field(ctrl.mn)
        self.firmware = ascii_field(ctrl.fr)
        self.sink.crdt = (ctrl.crdt1, ctrl.crdt2, ctrl.crdt3)
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
        """Run commands together to their final dispositions: one doorbell per burst, one
        wake-up for the whole batch, retries as the kernel's rule says (`retry=False`: none)."""
        if not cmds:
            return []
        attempts = [0] * len(cmds)
        if self.state not in ACCEPTING:
            err = await self._wait_accepting()
            if err is not None:
                for cmd in cmds:
                    self._log_failure(cmd, err, 0)
                return [err] * len(cmds)
        # The common case: the batch as given, every command on its first try, all clean.
        done = await self._issue(list(cmds), attempts, keep_data, retry)
        if done[0].waiter.clean:
            return [p.completion for p in done]  # type: ignore[misc]
        return await self._rounds(list(cmds), attempts, done, keep_data, retry)

    async def _rounds(
        self,
        cmds: list[Command],
        attempts: list[int],
        done: list[Pending],
        keep_data: bool,
        retry: bool,
    ) -> list[Completion | CommandError]:
        """The rest of a batch, from its attempts `done` (one per command, in order): retries
        by the disposition rule, requeues after a removal, until each command has its final
        result. Any path that made the first attempts itself (the compiled loop) ends here."""
        n = len(cmds)
        results: list[Completion | CommandError | None] = [None] * n
        todo = list(range(n))
        while True:
            again: list[int] = []
            requeued: list[tuple[int, Pending]] = []
            delay = 0.0
            for i, p in zip(todo, done, strict=True):
                comp = p.completion
                if comp is None:
                    if p.requeue:
                        requeued.append((i, p))
                    else:
                        results[i] = p.error or CommandError("no completion")
                    continue
                if p.decision.final:
                    results[i] = comp
                    continue
                self.sink.retried()
                attempts[i] += 1
                again.append(i)
                delay = max(delay, p.decision.delay)
            if requeued:
                # Sent again, on the same attempt, once the controller is back; if it is not,
                # the -ENODEV stands and is logged now.
                deadline = trio.current_time() + self.io_timeout
                back = await self._back_after_removal(min(p.generation for _, p in requeued),
                                                      deadline)  # fmt: skip
                for i, p in requeued:
                    if back:
                        again.append(i)
                    else:
                        assert p.error is not None
                        results[i] = p.error
                        self._log_failure(p.cmd, p.error, p.attempt)
                again.sort()
            if again and delay:
                await trio.sleep(delay)
            todo = again
            if not todo:
                break
            if self.state not in ACCEPTING:
                err = await self._wait_accepting()
                if err is not None:
                    for i in todo:
                        results[i] = err
                        self._log_failure(cmds[i], err, attempts[i])
                    break
            done = await self._issue([cmds[i] for i in todo], [attempts[i] for i in todo],
                                     keep_data, retry)  # fmt: skip
        return results  # type: ignore[return-value]

    # -- completion ----------------------------------------------------------------------------

    def _finish_many(self, qid: int | None, done: list[tuple[Pending, int, int]]) -> None:
        """Attempts completed together: the sink translates, decides, counts and logs them;
        here each one's waiter learns of it. The hot path, so locals are hoisted."""
        now = time.monotonic_ns()
        statuses = self.sink.complete(self.ctrl_name, qid, done, now)
        for (p, word, result), status in zip(done, statuses, strict=True):
            if word:
                p.waiter.clean = False
            p.completion = Completion(status, result, qid, p.cid, p.attempt, now - p.t0, p.data)
            p.done = True
            p.waiter.done()

    def _fail(self, p: Pending, error: CommandError, *, qid: int | None = None) -> None:
        """End an attempt without a status; its host-error entry is written here unless it
        waits to be sent again (the controller went away) or the engine is stopping."""
        if p.done:
            return
        p.waiter.clean = False
        p.error = error
        p.done = True
        if not p.requeue and self.state is not S.STOPPED:
            self._log_failure(p.cmd, error, p.attempt, qid=qid, cid=p.cid)
        p.waiter.done()

    def _log_failure(
        self,
        cmd: Command,
        error: CommandError,
        attempt: int,
        *,
        qid: int | None = None,
        cid: int | None = None,
    ) -> None:
        self.sink.host_error()
        message = str(error)
        if isinstance(error, HostError):
            message = f"{'admin' if cmd.admin else 'I/O'} command failed in the host: {error}"
        self.log_command(ERROR_KINDS.get(type(error), events.HOST_ERROR), message, cmd,
                         qid=qid, cid=cid, retries=attempt)  # fmt: skip

    def log_command(self, kind: str, message: str, cmd: Command, **fields: Any) -> None:
        """A host-side entry about one command, with its context."""
        self._log_host(
            kind,
            message,
            **fields,
            opcode=f"0x{cmd.opcode:02x}",
            nsid=cmd.nsid,
            slba=cmd.slba,
            nlb=cmd.nlb,
        )

    @staticmethod
    def _keep(p: Pending, view: memoryview | Any) -> None:
        """Copy what a read brought in, for a command that wants its data, before the buffer
        goes back for reuse."""
        cmd = p.cmd
        if p.keep and cmd.data_len and not cmd.to_device:
            p.data = bytes(view[: cmd.data_len])

    # -- helpers for workloads -----------------------------------------------------------------

    async def get_log_page(self, lid: int, nbytes: int) -> bytes:
        comp = await self.submit(c.get_log_page(lid, nbytes), keep_data=True)
        if not comp.status.ok:
            raise CommandError(f"Get Log Page {lid:#x}: {comp.status.name}")
        return comp.data or b""


# How long a command that got -ENODEV waits for the controller's removal to be noticed before
# the error is taken at its word (the passthrough watcher looks at once, then every 0.25 s).
DETACH_NOTICE_S = 2.0
