"""SOURCE arguments -> an engine: `sim`, or an NVMe device through kernel passthrough."""

from __future__ import annotations

from dataclasses import dataclass

from nvmefs.engine.base import EngineBase
from nvmefs.engine.passthrough import PassthroughEngine
from nvmefs.engine.register import Engine
from nvmefs.engine.transport import Transport
from nvmefs.errors import UsageError
from nvmefs.linux import devices, uring
from nvmefs.nvme.policy import LogPolicy
from nvmefs.nvme.status import Translator
from nvmefs.options import Parsed
from nvmefs.sim import faults
from nvmefs.sim.controller import SimController
from nvmefs.store.ring import DebugRing

SIM_OPTIONS = ("sim_size", "sim_lba", "sim_ns", "faults", "sim_abort")


class SourceError(UsageError):
    """A SOURCE that is not there, or options that do not apply to it."""


@dataclass
class Source:
    """A checked SOURCE: nothing is running yet."""

    name: str
    sim: Transport | None = None
    device: devices.DeviceSource | None = None
    transport: str = "sim"


def open_source(source: str, opts: Parsed) -> Source:
    if source == "sim":
        if "transport" in opts.given:
            raise SourceError("option transport is for device sources only")
        plan = faults.load(opts["faults"]) if opts["faults"] else None
        sim = SimController(
            size=opts["sim_size"],
            lba_size=opts["sim_lba"],
            namespaces=opts["sim_ns"],
            faults=plan,
            seed=opts["seed"],
            abort_works=opts["sim_abort"],
        )
        return Source("sim0", sim=sim)
    for name in SIM_OPTIONS:
        if name in opts.given:
            raise SourceError(f"option {name} is for SOURCE sim only")
    if not source.startswith("/"):
        raise SourceError(f"{source}: unknown source (expected sim or an NVMe device path)")
    device = devices.resolve(source)
    transport = opts["transport"]
    if transport == "auto":
        transport = "uring" if uring.supported() else "ioctl"
    return Source(device.controller.name, device=device, transport=transport)


def build_engine(src: Source, opts: Parsed, ring: DebugRing) -> EngineBase:
    kw = {
        "translator": Translator(opts["profile"]),
        "policy": LogPolicy(opts["log"]),
        "ctrl_name": src.name,
        "io_timeout": opts["io_timeout"],
        "max_retries": opts["retries"],
        "queue_depth": max(opts["qd"] + 1, 2),
        "log_attempts": opts["log_attempts"],
    }
    if src.sim is not None:
        return Engine(src.sim, ring, **kw)
    assert src.device is not None
    return PassthroughEngine(src.device, ring, transport=src.transport, **kw)
