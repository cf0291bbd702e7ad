"""Helpers for tests that run inside the test VM (contrib/qemu/vm.py)."""

from __future__ import annotations

import itertools
import json
import os
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from nvmefs.engine.passthrough import PassthroughEngine
from nvmefs.linux import devices
from nvmefs.nvme.policy import LogPolicy
from nvmefs.store.ring import DebugRing

WORK = Path(__file__).resolve().parents[2] / "contrib" / "qemu" / "work"
# The guest's exit status when the bed lost a controller the tests need (see bed_lost):
# tests/test_vm.py runs the tests that have not passed yet in a new VM, as after a stall.
BED_LOST = 86
# The driver's line for a command it timed out (5.10: "I/O 5 QID 2 timeout, aborting"; 6.x:
# "I/O tag 68 (9044) opcode 0x2 (I/O Cmd) QID 2 timeout, aborting").
_TIMED_OUT = re.compile(r"nvme\d+: I/O .*timeout, (aborting|reset controller)")
_ids = itertools.count(int(time.time() * 1000) % 1_000_000)


def controller(serial: str) -> devices.Controller:
    for ctrl in devices.controllers():
        if ctrl.serial == serial:
            return ctrl
    raise AssertionError(f"no controller with serial {serial} in the VM")


def ng(serial: str) -> str:
    return controller(serial).namespaces[0].generic


def qmp(execute: str, timeout: float = 30, **arguments: object) -> dict[str, object]:
    """Ask the host to run a QMP command against this VM (relayed by contrib/qemu/vm.py)."""
    n = next(_ids)
    qdir = WORK / "qmp"
    tmp = qdir / f"req-{n}.tmp"
    tmp.write_text(json.dumps({"execute": execute, "arguments": arguments}))
    tmp.rename(qdir / f"req-{n}.json")
    reply = qdir / f"rep-{n}.json"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            return json.loads(reply.read_text())  # type: ignore[no-any-return]
        except (FileNotFoundError, ValueError):
            time.sleep(0.1)
    raise AssertionError(f"no QMP reply for {execute} after {timeout} s")


@asynccontextmanager
async def engine_on(
    serial: str, transport: str = "uring", log: str = "errors", **kw: object
) -> AsyncIterator[tuple[PassthroughEngine, DebugRing]]:
    ctrl = controller(serial)
    source = devices.resolve(ctrl.namespaces[0].generic)
    ring = DebugRing(4096)
    engine = PassthroughEngine(source, ring, transport=transport, policy=LogPolicy(log), **kw)  # type: ignore[arg-type]
    async with engine.running():
        yield engine, ring


def dmesg() -> str:
    return os.popen("dmesg").read()


def bed_lost(serial: str) -> None:
    """End this boot's session with BED_LOST if controller `serial` is gone after the driver
    timed out commands: QEMU's controller stopped completing them (the bed's defect under many
    reads in flight, contrib/qemu/vm.py) and the kernel disabled it (6.1 does, about 90 s
    later). The tests that need it run again in a new VM; none of them can pass in this one."""
    if any(c.serial == serial for c in devices.controllers()):
        return
    if _TIMED_OUT.search(dmesg()):
        pytest.exit(f"the bed's controller {serial} went away after a command timeout: the "
                    "rest runs in a new VM", returncode=BED_LOST)  # fmt: skip
