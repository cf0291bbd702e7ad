from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from nvmefs import faults
from nvmefs.engine import Engine
from nvmefs.nvme.policy import LogPolicy
from nvmefs.ring import DebugRing
from nvmefs.transport.sim import SimController


@asynccontextmanager
async def sim_engine(
    plan: str | None = None,
    *,
    log: str = "errors",
    size: int = 16 << 20,
    sim_kw: dict[str, Any] | None = None,
    **engine_kw: Any,
) -> AsyncIterator[tuple[Engine, SimController, DebugRing]]:
    sim = SimController(
        size=size, faults=faults.parse(plan, "<test>") if plan else None, **(sim_kw or {})
    )
    ring = DebugRing(4096)
    engine = Engine(sim, ring, policy=LogPolicy(log), **engine_kw)
    async with engine.running():
        yield engine, sim, ring


# tests/vm runs inside the QEMU VM (tests/test_vm.py boots it); on the host it is not collected.
collect_ignore = [] if os.environ.get("NVMEFS_IN_VM") else ["vm"]
