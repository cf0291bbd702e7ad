"""The compiled bulk data path of passthrough engines: scrub's and randread's reads in a C loop.

`run_bulk` runs a `Bulk` job through nvmefs.linux.bulk (liburing): the C loop keeps the queue
full from a worker thread and hands back only failed completions and counts. Python takes each
failure from there exactly as if its own first attempt had failed (through the completion sink:
translation, counters, the disposition rule; then retries through the per-command path, one
ring entry at its final disposition, hot-unplug requeues), and counts the successes the loop
counted (`Sink.successes`). The LBAs are nvme/lbas.py's, so a seed reads the same LBAs under
`datapath=python` (the workloads' batches through submit_batch) and here.

`BulkEngine` is the part of an engine this needs; the engine itself (passthrough.py) opens the
nodes (`_ns_fd`) and watches for removal (`_gone`).
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from nvmefs.engine.base import ACCEPTING, Completion, EngineBase, Namespace, Pending, Waiter
from nvmefs.errors import CommandError, CommandTimeout, EngineError, HostError, UsageError
from nvmefs.linux import bulk
from nvmefs.linux.passthru import RESULT_MASK
from nvmefs.nvme import commands as c
from nvmefs.nvme import lbas
from nvmefs.nvme.commands import Command
from nvmefs.nvme.status import STATUS_MASK

# The compiled loop comes back to Python at least this often: progress, pacing, cancellation.
TURN_MS = 100
# How long a stopping bulk run waits for its commands in flight before it lets them go (a hung
# device: the kernel still owns their pages, see nvmefs/linux/bulk.c).
DRAIN_S = 0.5
# The kernel enforces each command's timeout; this is only a backstop if it never answers.
BACKSTOP_S = 10.0


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


class BulkEngine(EngineBase):
    """An engine that can run bulk jobs through the compiled loop (see the module docstring).

    Invariant: what `run_bulk` hands the kernel is in the loop until reaped, and every command
    of a job ends at its final disposition through the same path as submit_batch's."""

    # Set by an -ENODEV completion: the engine looks for a removal now, not at its next tick.
    _gone: trio.Event

    def _ns_fd(self, nsid: int) -> int:
        """The open generic node of namespace `nsid` (reopened after a reattach)."""
        raise NotImplementedError

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
                # Between turns, as the Python path does between batches: what is in flight
                # waits in the completion queue for the next turn.
                await self.keep_pace()
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
