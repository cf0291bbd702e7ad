"""The `nvmefs` command.

    nvmefs decode [--profile P] [--cqe] STATUS...   decode status words as JSON lines
    nvmefs decode --all                              every 15-bit status word
    nvmefs scrub SOURCE [-o OPTIONS]                 one pass over a source, errors to stdout
    nvmefs watch SOURCE [-o OPTIONS]                 logged entries to stdout until stopped
    nvmefs list [--json]                             NVMe controllers and namespaces
    nvmefs report [MOUNTPOINT | JOURNAL...] [--since T] [--json] [--svg FILE]
                                                     errors per namespace: counts by status,
                                                     an LBA map and errors over time
    nvmefs locate DISK LBA [--json] [--timeout S]    the partition, filesystem and file (and
                                                     its byte range) behind an LBA
    nvmefs SOURCE MOUNTPOINT [-o OPTIONS] [-f]       mount (mount.fuse calling convention)

Exit status: 0 success, 1 errors found (scrub), 2 usage or setup error.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import os
import select
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import trio

from nvmefs import daemon, locate, mainloop, options, report, workloads
from nvmefs.errors import EngineError, NvmefsError, UsageError
from nvmefs.linux import devices
from nvmefs.nvme import tables
from nvmefs.nvme.policy import LogPolicy
from nvmefs.nvme.status import STATUS_MASK, Translator, parse_status
from nvmefs.options import ArgParser
from nvmefs.sources import Source, build_engine, open_source, running
from nvmefs.store.events import NvmeEvent
from nvmefs.store.render import Clock, Renderer
from nvmefs.store.ring import EVENT, Cursor, DebugRing
from nvmefs.workloads import Progress

PROG = "nvmefs"
EXIT_OK, EXIT_FOUND, EXIT_USAGE = 0, 1, 2


def _decode_parser() -> ArgParser:
    p = ArgParser(
        prog=f"{PROG} decode", description="Decode NVMe status words as the kernel would."
    )
    p.add_argument("--profile", default=tables.DEFAULT_PROFILE, choices=tables.PROFILES)
    p.add_argument(
        "--cqe",
        action="store_true",
        help="arguments are raw 16-bit CQE status fields (phase tag in bit 0)",
    )
    p.add_argument("--all", action="store_true", help="decode every 15-bit status word")
    p.add_argument("status", nargs="*", metavar="STATUS", help="hex (0x281) or decimal")
    return p


def cmd_decode(argv: Sequence[str]) -> int:
    args = _decode_parser().parse_args(argv)
    if args.all and args.status:
        raise UsageError("give STATUS arguments or --all, not both")
    if not args.all and not args.status:
        raise UsageError("no STATUS given (or use --all)")
    words: list[tuple[int, int | None]] = []
    if args.all:
        words = [(w, None) for w in range(STATUS_MASK + 1)]
    else:
        for text in args.status:
            value = parse_status(text, cqe=args.cqe)
            words.append((value >> 1, value) if args.cqe else (value, None))
    translator = Translator(args.profile)
    default_policy = LogPolicy()
    out = sys.stdout
    for word, cqe in words:
        st = translator.decode(word)
        rec = {
            "status": f"0x{st.status:x}",
            "code": f"0x{st.code:x}",
            "sct": st.sct,
            "sc": st.sc,
            "crd": st.crd,
            "more": st.more,
            "dnr": st.dnr,
            "name": st.name,
            "blk_status": st.blk_status,
            "blk_string": st.blk_string,
            "errno": st.errno,
            "logged_by_default": default_policy.logs(word),
            "profile": st.profile,
        }
        if cqe is not None:
            rec["cqe_status"] = f"0x{cqe:x}"
            rec["phase"] = cqe & 1
        out.write(json.dumps(rec) + "\n")
    return EXIT_OK


def _source_args(command: str, description: str, argv: Sequence[str]) -> argparse.Namespace:
    """`nvmefs COMMAND SOURCE [-o OPTIONS]...` parsed: .source and .options."""
    p = ArgParser(prog=f"{PROG} {command}", description=description)
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS")
    return p.parse_args(argv)


def cmd_scrub(argv: Sequence[str]) -> int:
    args = _source_args("scrub", "One pass over a source; errors to stdout.", argv)
    opts = options.parse(
        args.options, allow_fuse=False, overrides={"passes": 1}, refuse=options.SCRUB_REFUSES
    )
    src = open_source(args.source, opts)
    if src.kernel is not None:
        raise UsageError("the kernel source sends no I/O: scrub sim or a device")
    try:
        return mainloop.run(_scrub, src, src.opts)
    except KeyboardInterrupt:
        return 130


# How often an idle printer looks whether its reader left.
HANGUP_CHECK_S = 1.0


def _hung_up(stream: Any) -> bool:
    """Whether the far end of an output stream is gone (poll says POLLERR or POLLHUP)."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    p = select.poll()
    p.register(fd, 0)  # no events asked: only errors and hang-ups are reported
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in p.poll(0))


class Printer:
    """Writes every entry appended to a ring to stdout, from a task of its own (`run`), and
    counts the errors.

    Invariant: `found` counts every entry that is not a success, written or not, and every
    entry the ring overwrote before the printer took it (it cannot tell what those were: it
    counts them as found, so the exit status never says "nothing found" after losing entries).
    When stdout fails, writing stops (`failed` says why, "" for a reader that left: EPIPE) and
    `on_fail` is called once; counting goes on."""

    def __init__(self, ring: DebugRing, renderer: Renderer) -> None:
        self.renderer = renderer
        self.cursor = Cursor(ring, 0)  # every entry, the first included
        self.found = 0  # entries that are not a success: errors and host events
        self.failed: str | None = None
        self.on_fail: Callable[[], None] | None = None
        self._wake = trio.Event()
        ring.subscribe(self._on_append)

    def _on_append(self) -> None:
        # On the completion path: wake the task (the event is replaced after each wake-up, so
        # it is looked up at every call), nothing more.
        self._wake.set()

    async def run(self) -> None:
        """Print entries as they come, until cancelled (then `drain()` prints the rest). While
        idle, a reader that left (a pipe closed at its end) is noticed within HANGUP_CHECK_S,
        as a write would notice it."""
        while self.failed is None:
            with trio.move_on_after(HANGUP_CHECK_S):
                await self._wake.wait()
            if self._wake.is_set():
                self._wake = trio.Event()
                self.drain()
            elif _hung_up(sys.stdout):
                self._write("")  # fails as a write to a closed pipe does: EPIPE

    def drain(self) -> None:
        """Print what the ring got since the last call."""
        missed, entries = self.cursor.take()
        out = []
        if missed:
            self.found += missed
            if self.failed is None:
                first = entries[0] if entries else None
                mono, wall = (first[1], first[2]) if first else (0, 0)
                out.append(self.renderer.missed_line(missed, mono, wall))
        for entry in entries:
            event = entry[EVENT]
            if not isinstance(event, NvmeEvent) or not event.status.ok:
                self.found += 1
            if self.failed is None:
                out.append(self.renderer.line(entry))
        if out:
            self._write("".join(out))

    def _write(self, text: str) -> None:
        try:
            if sys.stdout is None:  # started with stdout closed
                raise OSError(errno.EBADF, "closed")
            if not text:
                raise OSError(errno.EPIPE, "the reader left")
            sys.stdout.write(text)
            sys.stdout.flush()
        except OSError as e:
            self.failed = "" if e.errno == errno.EPIPE else f"stdout: {e.strerror or e}"
            # Nothing more goes out, not even the interpreter's flush at exit.
            devnull = os.open(os.devnull, os.O_WRONLY)
            with contextlib.suppress(OSError, AttributeError, ValueError):
                os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            if self.on_fail is not None:
                self.on_fail()
                self.on_fail = None


async def _scrub(src: Source, opts: options.Parsed) -> int:
    ring = DebugRing(opts["capacity"])
    printer = Printer(ring, Renderer(Clock(opts["clock"]), opts["format"]))
    engine = build_engine(src, opts, ring)
    progress = Progress()
    async with running(src, engine, opts), trio.open_nursery() as nursery:
        # Output fails only on writing an entry, so something was found: the status is known.
        printer.on_fail = nursery.cancel_scope.cancel
        nursery.start_soon(printer.run)
        if sys.stderr.isatty():
            nursery.start_soon(_progress_bar, progress)
        await workloads.run("scrub", engine, progress, opts)
        nursery.cancel_scope.cancel()
    printer.drain()  # what the engine logged as it stopped
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K")
    if printer.failed:
        print(f"{PROG}: scrub: {printer.failed}", file=sys.stderr)
    return EXIT_FOUND if printer.found else EXIT_OK


def cmd_watch(argv: Sequence[str]) -> int:
    args = _source_args("watch", "Logged entries to stdout as they happen, until stopped.", argv)
    opts = options.parse(
        args.options,
        allow_fuse=False,
        overrides=daemon.DAEMON_DEFAULTS,
        refuse=options.WATCH_REFUSES,
    )
    src = open_source(args.source, opts)
    failed = None
    with contextlib.suppress(KeyboardInterrupt):  # a signal the trio loop did not see yet
        failed = mainloop.run(_watch, src, src.opts)
    if failed:
        print(f"{PROG}: watch: {failed}", file=sys.stderr)
        return EXIT_FOUND
    return EXIT_OK


async def _watch(src: Source, opts: options.Parsed) -> str | None:
    """Run until a signal (or until stdout fails: returns why, "" for EPIPE)."""
    ring = DebugRing(opts["capacity"])
    printer = Printer(ring, Renderer(Clock(opts["clock"]), opts["format"]))
    engine = build_engine(src, opts, ring)
    progress = Progress()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with running(src, engine, opts), trio.open_nursery() as nursery:
            printer.on_fail = nursery.cancel_scope.cancel  # nobody to watch for any more

            async def stop_on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_signal)
            nursery.start_soon(printer.run)
            if opts["workload"] != "idle":
                await workloads.run(opts["workload"], engine, progress, opts)
            await workloads.run("idle", engine, progress, opts)
    printer.drain()  # what the engine logged as it stopped
    return printer.failed


async def _progress_bar(progress: Progress) -> None:
    while True:
        total = progress.nblocks or 1
        sys.stderr.write(
            f"\r\033[Kscrub pass {progress.pass_no} nsid {progress.nsid}: "
            f"{100 * progress.lba / total:5.1f}%  {progress.bytes_done >> 20} MiB  "
            f"{progress.failed} failed"
        )
        sys.stderr.flush()
        await trio.sleep(0.2)


def cmd_list(argv: Sequence[str]) -> int:
    p = ArgParser(
        prog=f"{PROG} list", description="NVMe controllers and namespaces nvmefs can use."
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    ctrls = devices.controllers()
    if args.json:
        print(json.dumps([dataclasses.asdict(c) for c in ctrls], indent=2))
        return EXIT_OK
    if not ctrls:
        print("no NVMe controllers found", file=sys.stderr)
        return EXIT_OK
    print(f"{'NODE':<12} {'SERIAL':<20} {'MODEL':<28} {'NSID':>4} {'SIZE':>12} {'LBA':>5}  GENERIC")
    for ctrl in ctrls:
        for ns in ctrl.namespaces or [None]:  # type: ignore[list-item]
            if ns is None:
                print(f"{ctrl.node:<12} {ctrl.serial:<20} {ctrl.model[:28]:<28}")
                continue
            print(
                f"{ctrl.node:<12} {ctrl.serial:<20} {ctrl.model[:28]:<28} {ns.nsid:>4} "
                f"{ns.size:>12} {ns.lba_size:>5}  {ns.generic}"
            )
    return EXIT_OK


COMMANDS = {
    "decode": cmd_decode,
    "scrub": cmd_scrub,
    "watch": cmd_watch,
    "list": cmd_list,
    "report": report.cmd_report,
    "locate": locate.cmd_locate,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv or argv[0] in ("-h", "--help"):
            print(__doc__.strip())
            return EXIT_OK if argv else EXIT_USAGE
        command = COMMANDS.get(argv[0])
        if command is not None:
            try:
                return command(argv[1:])
            except (UsageError, EngineError) as e:
                raise UsageError(f"{argv[0]}: {e}") from None
        return daemon.cmd_mount(argv)
    except NvmefsError as e:  # usage, setup and bring-up errors: one line, never a traceback
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # `nvmefs decode --all | head`: the reader left, which is not an error of ours.
        sys.stderr.close()
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
