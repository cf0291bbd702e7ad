"""Shared test fixtures: an engine over the simulated controller."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from nvmefs.engine.register import Engine
from nvmefs.nvme.policy import LogPolicy
from nvmefs.sim import faults
from nvmefs.sim.controller import SimController
from nvmefs.store.ring import DebugRing


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
