"""SOURCE arguments -> a transport and a controller name."""

from __future__ import annotations

from nvmefs import faults
from nvmefs.options import Parsed
from nvmefs.transport.base import Transport
from nvmefs.transport.sim import SimController


class SourceError(ValueError):
    pass


def open_source(source: str, opts: Parsed) -> tuple[Transport, str]:
    if source == "sim":
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
        return sim, "sim0"
    for name in ("sim_size", "sim_lba", "sim_ns", "faults", "sim_abort"):
        if name in opts.given:
            raise SourceError(f"option {name} is for SOURCE sim only")
    raise SourceError(f"{source}: unknown source (expected sim)")
