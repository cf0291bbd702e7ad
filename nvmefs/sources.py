"""SOURCE arguments -> an engine: `sim`, or an NVMe device through kernel passthrough."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

from nvmefs import options
from nvmefs.engine import backfill, kernel, owners
from nvmefs.engine.base import SourceBase
from nvmefs.engine.passthrough import PassthroughEngine
from nvmefs.engine.register import Engine
from nvmefs.engine.transport import Transport
from nvmefs.errors import UsageError
from nvmefs.linux import devices, uring
from nvmefs.nvme.policy import LogPolicy
from nvmefs.nvme.status import Translator
from nvmefs.options import Parsed
from nvmefs.sim import faults
from nvmefs.sim.controller import MAX_TRANSFER, SimController
from nvmefs.store import events
from nvmefs.store.events import HostEvent
from nvmefs.store.ring import DebugRing

MAX_NLB = 0x10000  # blocks in one command (NLB is 16 bits, 0-based)
MAX_NLB_BYTES = MAX_NLB * 512


class SourceError(UsageError):
    """A SOURCE that is not there, or options that do not apply to it."""


@dataclass
class Source:
    """A checked SOURCE: nothing is running yet. `opts` are the options as this source takes
    them (its defaults in, where the user gave none): what everything after uses."""

    name: str
    opts: Parsed
    sim: Transport | None = None
    device: devices.DeviceSource | None = None
    kernel: kernel.KernelSpec | None = None
    transport: str = "sim"


def open_source(source: str, opts: Parsed) -> Source:
    """Check SOURCE and the options that depend on it; nothing starts here."""
    if source == "kernel" or source.startswith("kernel:"):
        opts = options.for_source(opts, options.KERNEL)
        return Source("kernel", opts, kernel=kernel.check(source))
    if source == "sim":
        opts = options.for_source(opts, options.SIM)
        plan = faults.load(opts["faults"]) if opts["faults"] else None
        sim = SimController(
            size=opts["sim_size"],
            lba_size=opts["sim_lba"],
            namespaces=opts["sim_ns"],
            faults=plan,
            seed=opts["seed"],
            abort_works=opts["sim_abort"],
        )
        if plan is not None:
            plan.check_against({n: ns.nblocks for n, ns in sim.namespaces.items()})
        opts = check_bs(opts, [opts["sim_lba"]], MAX_TRANSFER)
        return Source("sim0", opts, sim=sim)
    if not source.startswith("/"):
        raise SourceError(
            f"{source}: unknown source (expected sim, kernel, kernel:nvmeX, kernel:/dev/nvmeXnY"
            " or an NVMe device path)"
        )
    opts = options.for_source(opts, options.DEVICE)
    device = devices.resolve(source)
    limits = [n.max_transfer for n in device.namespaces if n.max_transfer]
    opts = check_bs(opts, [n.lba_size for n in device.namespaces], min(limits, default=0))
    transport = opts["transport"]
    if transport == "auto":
        transport = "uring" if uring.supported() else "ioctl"
    if opts["datapath"] == "compiled" and transport != "uring":
        raise SourceError("option datapath=compiled needs io_uring passthrough (transport=uring)")
    # -o kernel: the same controller's errors of other processes too, from the tracepoints.
    spec = kernel.check(f"kernel:{device.controller.name}") if opts["kernel"] else None
    return Source(device.controller.name, opts, device=device, transport=transport, kernel=spec)


def check_bs(opts: Parsed, lba_sizes: list[int], max_transfer: int) -> Parsed:
    """bs must be whole blocks of every namespace and within what one command may move; a
    default bs larger than the controller allows is lowered to its limit (the options
    returned have it)."""
    limit = min(max_transfer or MAX_NLB_BYTES, MAX_NLB * min(lba_sizes))
    opts = opts.with_defaults(bs=min(opts["bs"], limit))
    bs = opts["bs"]
    for lba in lba_sizes:
        if bs < lba or bs % lba:
            raise SourceError(f"option bs={bs}: not a whole number of {lba}-byte blocks")
    if bs > limit:
        raise SourceError(
            f"option bs={bs}: more than one command may transfer here ({limit >> 10}K: the"
            " controller's MDTS)"
        )
    return opts


def build_engine(src: Source, opts: Parsed, ring: DebugRing) -> SourceBase:
    kw = {
        "translator": Translator(opts["profile"]),
        "policy": LogPolicy(opts["log"]),
        "ctrl_name": src.name,
        "io_timeout": opts["io_timeout"],
        "max_retries": opts["retries"],
        "queue_depth": max(opts["qd"] + 1, 2),
        "log_attempts": opts["log_attempts"],
        "fold": opts["fold"],
    }
    if src.sim is not None:
        return Engine(src.sim, ring, **kw)
    if src.device is not None:
        return PassthroughEngine(
            src.device, ring, transport=src.transport, datapath=opts["datapath"], **kw
        )
    assert src.kernel is not None
    return kernel_engine(src.kernel, opts, ring)


def kernel_engine(spec: kernel.KernelSpec, opts: Parsed, ring: DebugRing) -> kernel.KernelEngine:
    return kernel.KernelEngine(
        spec,
        ring,
        buffer_kb=opts["trace_buffer_kb"],
        placer=partial(owners.Placer, wait_s=opts["locate_wait"]) if opts["locate"] else None,
        translator=Translator(opts["profile"]),
        policy=LogPolicy(opts["log"]),
        log_attempts=opts["log_attempts"],
        fold=opts["fold"],
    )


def backfill_kernel_log(src: Source, engine: SourceBase, ring: DebugRing) -> int:
    """For a `kernel` source, before it starts: this boot's errors from the kernel log, after
    what the journal replayed (engine/backfill.py); returns the entries appended. A log that
    cannot be read costs a notice, not the start."""
    spec = src.kernel
    assert spec is not None
    try:
        records = list(backfill.read_kmsg())
    except OSError as e:
        ring.append(
            HostEvent(
                events.NOTICE,
                f"{backfill.KMSG_PATH}: {e.strerror}: no errors from before the start",
            )
        )
        return 1

    def keep(name: str, info: backfill.DiskInfo) -> bool:
        if spec.ctrl is not None:
            return info.ctrl == spec.ctrl
        if spec.disk is not None:
            return name == spec.disk or backfill.head_of(name) == spec.disk
        return True

    return backfill.backfill(
        ring,
        records,
        engine.translator,
        engine.policy,
        backfill.Disks(),
        backfill.newest_replayed_wall_ns(ring),
        keep,
    )


@asynccontextmanager
async def running(src: Source, engine: SourceBase, opts: Parsed) -> AsyncIterator[None]:
    """Run a source's engine; with `-o kernel` on a device source, the kernel source of its
    controller beside it, which leaves the engine's own commands to the engine."""
    async with engine.running():
        if src.device is None or src.kernel is None:
            yield
            return
        companion = kernel_engine(src.kernel, opts, engine.ring)
        companion.recognise_own = True
        engine.on_error = companion.own
        async with companion.running():
            yield
