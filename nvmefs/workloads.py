"""What the engine is made to do: scrub, randread, or idle health polling."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from nvmefs.engine.base import Completion, EngineBase, Namespace, SourceBase
from nvmefs.engine.compiled import Bulk
from nvmefs.engine.kernel import KernelEngine
from nvmefs.engine.passthrough import PassthroughEngine
from nvmefs.errors import CommandError, EngineError, UsageError
from nvmefs.linux import devices
from nvmefs.nvme import commands as c
from nvmefs.nvme import lbas
from nvmefs.nvme.commands import Command
from nvmefs.nvme.layouts import ERROR_LOG_ENTRY_SIZE, ffi, u128
from nvmefs.nvme.status import Translator
from nvmefs.options import Parsed
from nvmefs.store import events
from nvmefs.store.events import HostEvent

POLLER_WATCH_S = 10.0


@dataclass
class Progress:
    """Where a workload is, for stats and the progress bar."""

    workload: str = ""
    state: str = "idle"
    pass_no: int = 0
    passes: int = 0
    nsid: int = 0
    lba: int = 0
    nblocks: int = 0
    bytes_done: int = 0
    commands: int = 0
    failed: int = 0
    polls: int = 0
    passes_done: int = 0  # scrub passes completed
    last_pass_end: float = 0.0  # wall-clock time the last completed pass ended, 0 before
    pass_ratio: float = 0.0  # how much of the current pass is done, 0..1
    extra: dict[str, int] = field(default_factory=dict)
    health: dict[str, Health] = field(default_factory=dict)  # by controller name


@dataclass
class Health:
    """What the last SMART / Health Information log page of a controller said."""

    ctrl: str
    serial: str
    model: str
    critical_warning: int = 0
    media_errors: int = 0
    percentage_used: int = 0
    temperature_k: int = 0  # composite temperature, kelvin (0: not reported)
    polled_at: float = 0.0  # wall-clock time of the poll


class Pacer:
    """Keeps a byte rate under `mbps` MB/s (0: no cap) by sleeping between batches."""

    def __init__(self, mbps: float) -> None:
        self.bps = mbps * 1_000_000
        self.start = trio.current_time()
        self.sent = 0

    async def account(self, nbytes: int) -> None:
        self.sent += nbytes
        if self.bps:
            due = self.start + self.sent / self.bps
            now = trio.current_time()
            if due > now:
                await trio.sleep(due - now)


def _settle(progress: Progress, results: list[Completion | CommandError]) -> None:
    """Count a batch's final results (the engine has logged what its policy asked for)."""
    progress.commands += len(results)
    progress.failed += sum(1 for r in results if isinstance(r, CommandError) or not r.status.ok)


def _compiled(engine: EngineBase) -> PassthroughEngine | None:
    """The engine, if its bulk reads take the compiled loop."""
    if isinstance(engine, PassthroughEngine) and engine.datapath == "compiled":
        return engine
    return None


async def _run_compiled(
    engine: PassthroughEngine,
    progress: Progress,
    job: Bulk,
    *,
    qd: int,
    rate: float,
    ratio: Callable[[Bulk], float] | None = None,
) -> None:
    """One job through the compiled loop, its progress added to `progress` after every turn."""
    bytes0, commands0, failed0 = progress.bytes_done, progress.commands, progress.failed

    def show() -> None:
        progress.lba = job.lba
        progress.bytes_done = bytes0 + job.bytes_done
        progress.commands = commands0 + job.commands
        progress.failed = failed0 + job.failed
        if ratio is not None:
            progress.pass_ratio = ratio(job)

    try:
        await engine.run_bulk(job, qd=qd, rate=rate, on_turn=show)
    finally:
        show()


def _chunk_cmd(op: str, ns: Namespace, lba: int, nlb: int) -> Command:
    if op == "verify":
        return c.verify(ns.nsid, lba, nlb)
    return c.read(ns.nsid, lba, nlb, ns.lba_size)


async def scrub(
    engine: EngineBase,
    progress: Progress,
    *,
    bs: int,
    qd: int,
    passes: int,
    interval: float = 0.0,
    rate: float = 0.0,
    op: str = "read",
) -> None:
    """Read (or verify) every LBA of every namespace in order, `bs` bytes per command."""
    progress.workload, progress.passes = "scrub", passes
    total = sum(ns.size for ns in engine.namespaces) or 1
    fast = _compiled(engine)
    n = 0
    while passes == 0 or n < passes:
        n += 1
        progress.pass_no, progress.state, progress.pass_ratio = n, "running", 0.0
        pacer = Pacer(rate)
        before = 0  # bytes of the namespaces already scrubbed in this pass
        for ns in engine.namespaces:
            nlb = max(1, min(bs // ns.lba_size, 0x10000))
            progress.nsid, progress.nblocks, progress.lba = ns.nsid, ns.nblocks, 0
            if fast is not None:
                opcode = c.NVM_VERIFY if op == "verify" else c.NVM_READ
                job = Bulk(ns.nsid, opcode, nlb, end=ns.nblocks)

                def ratio(job: Bulk, done: int = before, lba_size: int = ns.lba_size) -> float:
                    return (done + job.lba * lba_size) / total

                await _run_compiled(fast, progress, job, qd=qd, rate=rate, ratio=ratio)
                before += ns.size
                continue
            chunks = lbas.in_order(0, ns.nblocks, nlb)
            lba = 0
            while lba < ns.nblocks:
                cmds: list[Command] = []
                for slba, count in itertools.islice(chunks, qd):
                    cmds.append(_chunk_cmd(op, ns, slba, count))
                    lba = slba + count
                await engine.keep_pace()
                results = await engine.submit_batch(cmds)
                _settle(progress, results)
                nbytes = sum((cmd.nlb or 0) * ns.lba_size for cmd in cmds)
                progress.bytes_done += nbytes
                progress.lba = lba
                progress.pass_ratio = (before + lba * ns.lba_size) / total
                await pacer.account(nbytes)
            before += ns.size
        progress.passes_done, progress.last_pass_end = n, time.time()
        progress.pass_ratio = 1.0
        progress.state = "waiting"
        if passes == 0 or n < passes:
            await trio.sleep(interval)
    progress.state = "done"


async def randread(
    engine: EngineBase,
    progress: Progress,
    *,
    bs: int,
    qd: int,
    seed: int = 0,
    rate: float = 0.0,
    count: int = 0,
) -> None:
    """Random reads of `bs` bytes, `qd` at a time, forever (or `count` commands).

    One batch of qd at a time: every batch costs a fixed overhead in Python, which lanes taking
    turns (to keep the device busy while a batch is refilled) only multiply."""
    progress.workload, progress.state = "randread", "running"
    pacer = Pacer(rate)
    ns = engine.namespaces[0]
    nlb = max(1, min(bs // ns.lba_size, 0x10000, ns.nblocks))
    fast = _compiled(engine)
    if fast is not None:
        job = Bulk(ns.nsid, c.NVM_READ, nlb, end=ns.nblocks, random=True, count=count, seed=seed)
        await _run_compiled(fast, progress, job, qd=qd, rate=rate)
        progress.state = "done"
        return
    # The compiled loop's sequence (nvme/lbas.py): one seed, the same LBAs on every data path.
    slbas = lbas.random_lbas(seed, 0, ns.nblocks, nlb)
    done = 0
    while count == 0 or done < count:
        batch = qd if count == 0 else min(qd, count - done)
        cmds = [c.read(ns.nsid, slba, nlb, ns.lba_size) for slba in itertools.islice(slbas, batch)]
        await engine.keep_pace()
        results = await engine.submit_batch(cmds)
        _settle(progress, results)
        done += batch
        progress.bytes_done += batch * nlb * ns.lba_size
        await pacer.account(batch * nlb * ns.lba_size)
    progress.state = "done"


def parse_error_log(page: bytes) -> list[dict[str, int]]:
    """Valid entries of an Error Information log page (error_count 0 marks an empty slot)."""
    out = []
    for off in range(0, len(page) - ERROR_LOG_ENTRY_SIZE + 1, ERROR_LOG_ENTRY_SIZE):
        e = ffi.from_buffer("struct nvme_error_log_entry *", bytearray(page[off : off + 64]))
        if e.error_count:
            out.append(
                {
                    "error_count": e.error_count,
                    "sqid": e.sqid,
                    "cmdid": e.cmdid,
                    "status": e.status_field >> 1,
                    "lba": e.lba,
                    "nsid": e.nsid,
                    "opcode": e.opcode,
                }
            )
    return out


async def health_poll(engine: EngineBase, progress: Progress, state: dict[str, int]) -> None:
    """One poll: new controller error-log entries and SMART critical warnings become entries."""
    translator: Translator = engine.translator
    page = await engine.get_log_page(c.LOG_ERROR, (engine.elpe + 1) * ERROR_LOG_ENTRY_SIZE)
    last = state.get("error_count", 0)
    new = [e for e in parse_error_log(page) if e["error_count"] > last]
    for e in sorted(new, key=lambda e: e["error_count"]):
        st = translator.decode(e["status"])
        engine.sink.append(
            HostEvent(
                events.NOTICE,
                f"controller error log entry {e['error_count']}: Status = 0x{e['status']:x} "
                f"({st.name})",
                {
                    "ctrl": engine.ctrl_name,
                    "sqid": e["sqid"],
                    "cid": e["cmdid"],
                    "nsid": e["nsid"],
                    "lba": e["lba"],
                    "opcode": f"0x{e['opcode']:02x}",
                },
            )
        )
        state["error_count"] = max(state.get("error_count", 0), e["error_count"])
    smart = ffi.from_buffer(
        "struct nvme_smart_log *", bytearray(await engine.get_log_page(c.LOG_SMART, 512))
    )
    warning = smart.critical_warning
    if warning and warning != state.get("critical_warning", 0):
        engine.sink.append(
            HostEvent(
                events.NOTICE,
                f"SMART critical warning 0x{warning:02x}",
                {"ctrl": engine.ctrl_name, "media_errors": u128(smart.media_errors)},
            )
        )
    state["critical_warning"] = warning
    state["media_errors"] = u128(smart.media_errors)
    progress.polls += 1
    progress.extra["media_errors"] = state["media_errors"]
    progress.health[engine.ctrl_name] = Health(
        engine.ctrl_name,
        engine.serial,
        engine.model,
        critical_warning=warning,
        media_errors=state["media_errors"],
        percentage_used=smart.percent_used,
        temperature_k=smart.temperature[0] | smart.temperature[1] << 8,
        polled_at=time.time(),
    )


async def idle(engine: EngineBase, progress: Progress, *, interval: float) -> None:
    """Health polling only."""
    progress.workload, progress.state = "idle", "running"
    state: dict[str, int] = {}
    # Entries already in the controller's log at start are history, not news.
    for e in parse_error_log(
        await engine.get_log_page(c.LOG_ERROR, (engine.elpe + 1) * ERROR_LOG_ENTRY_SIZE)
    ):
        state["error_count"] = max(state.get("error_count", 0), e["error_count"])
    while True:
        await trio.sleep(interval)
        try:
            await health_poll(engine, progress, state)
        except CommandError as e:
            progress.failed += 1
            engine.sink.append(
                HostEvent(events.HOST_ERROR, f"health poll failed: {e}", {"ctrl": engine.ctrl_name})
            )


async def kernel_health(engine: KernelEngine, progress: Progress, *, interval: float) -> None:
    """Health polling of every controller the kernel source watches, through admin
    passthrough (ioctl), each as the idle workload polls one."""
    progress.workload, progress.state = "idle", "running"
    names = set(engine.spec.watched())

    async def poll(ctrl: devices.Controller) -> None:
        source = devices.DeviceSource(ctrl.node, ctrl, [])
        poller = PassthroughEngine(source, engine.ring, transport="ioctl",
                                   translator=engine.translator, policy=engine.policy,
                                   ctrl_name=ctrl.name)  # fmt: skip
        poller.watch_interval = POLLER_WATCH_S  # it only polls health: no hurry, little CPU
        try:
            async with poller.running():
                await idle(poller, progress, interval=interval)
        except (EngineError, CommandError) as e:
            engine.sink.append(
                HostEvent(events.HOST_ERROR, f"health polling stopped: {e}", {"ctrl": ctrl.name})
            )

    async with trio.open_nursery() as nursery:
        for ctrl in devices.controllers():
            if ctrl.name in names:
                nursery.start_soon(poll, ctrl)


async def run(kind: str, engine: SourceBase, progress: Progress, opts: Parsed) -> None:
    """The workload `kind` with its -o options (the daemon then polls health; scrub CLI stops).
    The kernel source sends nothing: its only workload is idle, polling health."""
    if isinstance(engine, KernelEngine):
        if kind != "idle":  # options.for_source refuses it before anything starts
            raise ValueError(f"the kernel source runs no {kind} workload")
        await kernel_health(engine, progress, interval=opts["health_interval"])
        return
    assert isinstance(engine, EngineBase)
    if kind == "scrub":
        await scrub(
            engine,
            progress,
            bs=opts["bs"],
            qd=opts["qd"],
            passes=opts["passes"],
            interval=opts["interval"],
            rate=opts["rate"],
            op=opts["op"],
        )
    elif kind == "randread":
        await randread(
            engine, progress, bs=opts["bs"], qd=opts["qd"], seed=opts["seed"], rate=opts["rate"]
        )
    elif kind == "idle":
        await idle(engine, progress, interval=opts["health_interval"])
    else:
        raise UsageError(f"unknown workload {kind!r}")
