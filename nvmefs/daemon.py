"""`nvmefs SOURCE MOUNTPOINT [-o OPTIONS] [-f]`: the mount daemon (mount.fuse calling convention).

Lifecycle: take a lock on the mountpoint that the daemon holds for its whole life (see
claim_mountpoint); check everything else that can be checked (options, mountpoint, source)
before forking; fork; the child brings the controller up and mounts; only when the mount is live
does the parent exit 0, so `mount -a` returns with the filesystem usable. Any failure before that
is reported by the parent as one line with exit status 2, and nothing is left mounted or
running. SIGTERM, SIGINT and an external umount end the daemon with the mount gone.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

import pyfuse3
import trio

from nvmefs import __version__, mainloop, options, workloads
from nvmefs.engine.base import SourceBase
from nvmefs.errors import NvmefsError, UsageError
from nvmefs.fs import NvmeFS
from nvmefs.mountpoint import above_stdio, check_fuse_options, claim_mountpoint, fuse_options
from nvmefs.options import ArgParser
from nvmefs.outputs import Outputs
from nvmefs.recorder import Recorder
from nvmefs.sources import Source, backfill_kernel_log, build_engine, open_source, running
from nvmefs.store import events
from nvmefs.store.events import HostEvent
from nvmefs.store.render import Clock, Renderer
from nvmefs.store.ring import DebugRing

log = logging.getLogger("nvmefs")

# The daemon scrubs forever, pausing between passes, unless told otherwise.
DAEMON_DEFAULTS = {"passes": 0, "interval": 60.0}


def _parser() -> ArgParser:
    p = ArgParser(prog="nvmefs", description="Mount the NVMe error ring.")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS")
    p.add_argument("-f", dest="foreground", action="store_true", help="stay in the foreground")
    p.add_argument("-d", dest="debug", action="store_true", help="foreground, with debug logs")
    return p


def cmd_mount(argv: Sequence[str]) -> int:
    """Check everything, fork, and return once the mount is live; UsageError otherwise."""
    args = _parser().parse_args(argv)
    opts = options.parse(args.options, allow_fuse=True, overrides=DAEMON_DEFAULTS)
    fuse_opts = fuse_options(args.source, opts.fuse)
    check_fuse_options(fuse_opts)
    mountpoint, lock = claim_mountpoint(args.mountpoint)
    try:
        return _start(args, mountpoint, fuse_opts, opts)
    finally:
        # The daemon has its own copy of the descriptor, which holds the lock for it.
        os.close(lock)


def _start(
    args: argparse.Namespace, mountpoint: str, fuse_opts: set[str], opts: options.Parsed
) -> int:
    """Open the source and serve, in the foreground or in a forked daemon; 0 once mounted."""
    src = open_source(args.source, opts)
    opts = src.opts  # as the source takes them
    outputs = Outputs.open(opts, mountpoint)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="nvmefs[%(process)d]: %(levelname)s %(message)s",
    )
    if args.foreground or args.debug:
        return _run(args.source, src, outputs, mountpoint, fuse_opts, opts, None)

    rfd, wfd = (above_stdio(fd) for fd in os.pipe())
    pid = os.fork()
    if pid == 0:  # the daemon: it never returns, so it keeps its copy of the lock to the end
        code = 2
        try:
            os.close(rfd)
            os.setsid()
            # Hold none of the caller's terminal or pipes: mount -a and $(...) must not wait.
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            os.close(devnull)
            code = _run(args.source, src, outputs, mountpoint, fuse_opts, opts, wfd)
        finally:
            os._exit(code)
    os.close(wfd)
    outputs.close()  # the daemon has its own copies
    with os.fdopen(rfd, "rb") as r:
        report = r.read().decode(errors="replace")
    if report == "ok\n":
        return 0
    os.waitpid(pid, 0)
    raise UsageError(report.strip() or "the daemon died before the mount was live")


class _Ready:
    """Tells the waiting parent (or, in the foreground, the terminal) how setup went, once."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        self.reported = False

    def _send(self, message: str) -> None:
        if self.reported:
            return
        self.reported = True
        if self.fd is not None:
            os.write(self.fd, message.encode())
            os.close(self.fd)
        elif message != "ok\n":
            print(f"nvmefs: {message.strip()}", file=sys.stderr)

    def ok(self) -> None:
        self._send("ok\n")

    def fail(self, message: str) -> None:
        self._send(message + "\n")


def _run(
    source: str,
    src: Source,
    outputs: Outputs,
    mountpoint: str,
    fuse_opts: set[str],
    opts: options.Parsed,
    ready_fd: int | None,
) -> int:
    ready = _Ready(ready_fd)
    ring = DebugRing(opts["capacity"])
    renderer = Renderer(Clock(opts["clock"]), opts["format"])
    engine = build_engine(src, opts, ring)
    recorder = Recorder(ring, renderer, source=source, engine=engine)
    outputs.attach(ring)  # the journal's replayed entries come before this run's start entry
    if src.kernel is not None and src.device is None and opts["backfill"]:
        backfill_kernel_log(src, engine, ring)  # then this boot's earlier errors
    ring.append(
        HostEvent(
            events.START,
            f"version {__version__} source={source} capacity={ring.capacity} "
            f"log={opts['log']} profile={opts['profile']} workload={opts['workload']}",
        )
    )
    try:
        mainloop.run(_serve, recorder, src, engine, outputs, mountpoint, fuse_opts, opts, ready)
    except NvmefsError as e:  # setup refused or the controller did not come up
        if ready.reported:
            raise
        ready.fail(str(e))
        return 2
    except KeyboardInterrupt:
        pass
    finally:
        outputs.close()  # flushes what the journal holds, however the daemon ends
    return 0


class SetupFailed(UsageError):
    """The daemon could not mount (libfuse refused)."""


async def _serve(
    recorder: Recorder,
    src: Source,
    engine: SourceBase,
    outputs: Outputs,
    mountpoint: str,
    fuse_opts: set[str],
    opts: options.Parsed,
    ready: _Ready,
) -> None:
    async with running(src, engine, opts):
        fs = NvmeFS(recorder, mountpoint=mountpoint, prom=outputs.metrics.exposition)
        try:
            pyfuse3.init(fs, mountpoint, fuse_opts)
        except RuntimeError as e:
            raise SetupFailed(f"cannot mount {mountpoint}: {e}") from None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_signals)
                nursery.start_soon(_workload, engine, recorder, opts)
                nursery.start_soon(outputs.run, recorder)
                ready.ok()
                await pyfuse3.main()
                nursery.cancel_scope.cancel()
        finally:
            # After `umount -l` the path may hold someone else's mount now: leave it alone.
            pyfuse3.close(unmount=fs.attached())


async def _signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                continue
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()


async def _workload(engine: SourceBase, recorder: Recorder, opts: options.Parsed) -> None:
    progress = recorder.progress
    try:
        if opts["workload"] != "idle":
            await workloads.run(opts["workload"], engine, progress, opts)
        await workloads.run("idle", engine, progress, opts)
    except Exception as e:  # a workload bug must not take the ring away from its readers
        log.exception("workload failed")
        progress.state = "failed"
        recorder.ring.append(HostEvent(events.HOST_ERROR, f"workload failed: {e!r}"))
