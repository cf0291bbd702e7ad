"""The engine's one state machine, and what commands do while a controller is away.

A scripted engine stands in for a transport: each attempt's outcome comes from a function of
the command and its attempt, so detach/reattach can be driven exactly (autojump clock).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Sequence

import pytest
import trio
import trio.testing

from nvmefs.engine.base import EngineBase, EngineState, Pending, Waiter
from nvmefs.errors import CommandError, CommandTimeout, HostError
from nvmefs.nvme import commands as c
from nvmefs.nvme.commands import Command
from nvmefs.store import events
from nvmefs.store.events import HostEvent
from nvmefs.store.ring import EVENT, DebugRing

S = EngineState
Outcome = int | CommandError  # a status word, or how the host failed it


class ScriptedEngine(EngineBase):
    def __init__(self, script: Callable[[Command, int], Outcome], **kw: object) -> None:
        super().__init__(DebugRing(64), **kw)  # type: ignore[arg-type]
        self.script = script
        self.issued: list[tuple[int | None, int]] = []  # (slba, attempt) of every attempt

    async def _issue(
        self, cmds: list[Command], attempts: Sequence[int], keep: bool, retry: bool = True
    ) -> list[Pending]:
        waiter = Waiter(len(cmds))
        out = []
        for cmd, attempt in zip(cmds, attempts, strict=True):
            p = Pending(cmd, attempt, waiter, keep, retry)
            p.generation = self.detaches
            self.issued.append((cmd.slba, attempt))
            outcome = self.script(cmd, attempt)
            if isinstance(outcome, CommandError):
                self._fail(p, outcome)
            else:
                self._finish_many(None, [(p, outcome, 0)])
            out.append(p)
        await trio.lowlevel.checkpoint()
        return out


def ready(engine: EngineBase) -> None:
    assert engine._change_state(S.STARTING) and engine._change_state(S.READY)


def host_entries(engine: EngineBase) -> list[HostEvent]:
    return [e[EVENT] for e in engine.ring if isinstance(e[EVENT], HostEvent)]


def test_transitions_follow_the_table_and_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    e = ScriptedEngine(lambda cmd, n: 0)
    caplog.set_level(logging.INFO, "nvmefs.engine")
    assert not e._change_state(S.READY)  # stopped -> ready skips starting
    assert e.state is S.STOPPED
    ready(e)
    assert not e._change_state(S.STARTING)
    assert e._change_state(S.DETACHED, "gone") and e.detaches == 1
    assert not e._change_state(S.RESETTING)
    assert e._change_state(S.READY) and e._change_state(S.STOPPED)
    text = caplog.text
    assert "no transition stopped -> ready" in text and "ready -> detached (gone)" in text
    assert str(e.state) == "stopped"  # what stats shows


async def test_commands_wait_while_detached_and_write_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    e = ScriptedEngine(lambda cmd, n: 0, io_timeout=30.0)
    ready(e)
    e._change_state(S.DETACHED)
    results: list[object] = []

    async def submit() -> None:
        results.extend(await e.submit_batch([c.read(1, 0, 8, 512)]))

    async with trio.open_nursery() as n:
        n.start_soon(submit)
        await trio.sleep(20)
        assert results == [] and e.issued == [] and len(e.ring) == 0
        e._change_state(S.READY)
    (r,) = results
    assert not isinstance(r, CommandError) and r.status.ok and e.issued == [(0, 0)]


async def test_a_controller_away_longer_than_io_timeout_times_the_commands_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    e = ScriptedEngine(lambda cmd, n: 0, io_timeout=30.0)
    ready(e)
    e._change_state(S.DETACHED)
    t0 = trio.current_time()
    results = await e.submit_batch([c.read(1, 0, 8, 512), c.read(1, 8, 8, 512)])
    assert trio.current_time() - t0 == pytest.approx(30)
    assert all(isinstance(r, CommandTimeout) for r in results)
    entries = host_entries(e)
    assert [(h.kind, h.fields["slba"]) for h in entries] == [
        (events.TIMEOUT, 0),
        (events.TIMEOUT, 8),
    ]


async def test_enodev_from_a_removal_is_sent_again_after_reattach(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gone = True

    def script(cmd: Command, attempt: int) -> Outcome:
        return HostError(errno.ENODEV) if gone else 0x281

    e = ScriptedEngine(script, max_retries=2)
    ready(e)
    results: list[object] = []

    async def submit() -> None:
        results.extend(await e.submit_batch([c.read(1, 2048, 8, 512)]))

    async with trio.open_nursery() as n:
        n.start_soon(submit)
        await trio.sleep(0.5)
        e._change_state(S.DETACHED, "removed")  # what the watcher does
        await trio.sleep(10)
        assert results == [] and len(e.ring) == 0  # nothing while away
        gone = False
        e._change_state(S.READY, "reattached")
    (r,) = results
    # Sent again on the same attempt, then retried by the rule: one entry, at the end.
    assert e.issued == [(2048, 0), (2048, 0), (2048, 1), (2048, 2)]
    assert not isinstance(r, CommandError) and r.status.status == 0x281
    (entry,) = list(e.ring)
    assert entry[EVENT].retries == 2 and host_entries(e) == []


async def test_enodev_without_a_removal_is_a_host_error_logged_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    e = ScriptedEngine(lambda cmd, n: HostError(errno.ENODEV))
    ready(e)
    (r,) = await e.submit_batch([c.read(1, 0, 8, 512)])
    assert isinstance(r, HostError) and r.errno == errno.ENODEV
    (h,) = host_entries(e)
    assert h.kind == events.HOST_ERROR and "ENODEV" in h.message and h.fields["retries"] == 0


async def test_other_host_errors_are_logged_once_with_the_commands_context() -> None:
    e = ScriptedEngine(lambda cmd, n: HostError(errno.EINTR))
    ready(e)
    (r,) = await e.submit_batch([c.read(1, 40960, 8, 512)])
    assert isinstance(r, HostError)
    (h,) = host_entries(e)
    assert (h.fields["slba"], h.fields["nlb"], h.fields["opcode"]) == (40960, 8, "0x02")
    assert e.issued == [(40960, 0)]  # no retry: the host gave up, not the controller
