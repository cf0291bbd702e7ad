"""SOURCE arguments -> an engine: `sim`, or an NVMe device through kernel passthrough."""

from __future__ import annotations

from dataclasses import dataclass

from nvmefs import faults
from nvmefs.engine import Engine, EngineBase
from nvmefs.nvme.policy import LogPolicy
from nvmefs.nvme.status import Translator
from nvmefs.options import Parsed
from nvmefs.passthru import PassthroughEngine
from nvmefs.ring import DebugRing
from nvmefs.transport import devices, uring
from nvmefs.transport.base import Transport
from nvmefs.transport.sim import SimController

SIM_OPTIONS = ("sim_size", "sim_lba", "sim_ns", "faults", "sim_abort")


class SourceError(ValueError):
    pass


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
        try:
            plan = faults.load(opts["faults"]) if opts["faults"] else None
            sim = SimController(
                size=opts["sim_size"],
                lba_size=opts["sim_lba"],
                namespaces=opts["sim_ns"],
                faults=plan,
                seed=opts["seed"],
                abort_works=opts["sim_abort"],
            )
        except ValueError as e:  # FaultPlanError and bad sim geometry
            raise SourceError(str(e)) from None
        return Source("sim0", sim=sim)
    for name in SIM_OPTIONS:
        if name in opts.given:
            raise SourceError(f"option {name} is for SOURCE sim only")
    if not source.startswith("/"):
        raise SourceError(f"{source}: unknown source (expected sim or an NVMe device path)")
    try:
        device = devices.resolve(source)
    except devices.DeviceError as e:
        raise SourceError(str(e)) from None
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
    }
    if src.sim is not None:
        return Engine(src.sim, ring, **kw)
    assert src.device is not None
    return PassthroughEngine(src.device, ring, transport=src.transport, **kw)
