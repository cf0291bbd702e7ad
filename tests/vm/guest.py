"""Helpers for tests that run inside the test VM (contrib/qemu/vm.py)."""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from nvmefs.engine.passthrough import PassthroughEngine
from nvmefs.linux import devices
from nvmefs.nvme.policy import LogPolicy
from nvmefs.store.ring import DebugRing

WORK = Path(__file__).resolve().parents[2] / "contrib" / "qemu" / "work"
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
