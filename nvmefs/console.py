"""`nvmefs scrub` and `nvmefs watch`: a source's entries printed to stdout as they come.

The commands that run an engine without a mount (the mount is nvmefs.daemon). Imported only when
one of them runs: `nvmefs decode`, `list` and the refusals of a bad command line need none of the
engine, trio or FUSE, which take seconds to import on a slow machine.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import select
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import trio

from nvmefs import daemon, mainloop, options, workloads
from nvmefs.errors import EXIT_FOUND, EXIT_OK, PROG, UsageError
from nvmefs.options import ArgParser
from nvmefs.sources import Source, build_engine, open_source, running
from nvmefs.store.events import NvmeEvent
from nvmefs.store.render import Clock, Renderer
from nvmefs.store.ring import EVENT, Cursor, DebugRing
from nvmefs.workloads import Progress


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
