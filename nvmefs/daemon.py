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
import errno
import fcntl
import logging
import os
import shlex
import signal
import sys
from collections.abc import Collection, Sequence

import pyfuse3
import trio

from nvmefs import __version__, mainloop, options, workloads
from nvmefs.engine.base import EngineBase
from nvmefs.errors import NvmefsError, UsageError
from nvmefs.fs import NvmeFS
from nvmefs.linux import mountinfo
from nvmefs.options import ArgParser
from nvmefs.outputs import Outputs
from nvmefs.recorder import Recorder
from nvmefs.sources import Source, build_engine, open_source, running
from nvmefs.store import events
from nvmefs.store.events import HostEvent
from nvmefs.store.render import Clock, Renderer
from nvmefs.store.ring import DebugRing

log = logging.getLogger("nvmefs")

# The daemon scrubs forever, pausing between passes, unless told otherwise.
DAEMON_DEFAULTS = {"passes": 0, "interval": 60.0}


class MountError(UsageError):
    """A mountpoint nvmefs cannot mount on."""


def _parser() -> ArgParser:
    p = ArgParser(prog="nvmefs", description="Mount the NVMe error ring.")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS")
    p.add_argument("-f", dest="foreground", action="store_true", help="stay in the foreground")
    p.add_argument("-d", dest="debug", action="store_true", help="foreground, with debug logs")
    return p


# The mounter needs this line in /etc/fuse.conf for allow_other (fusermount3 checks it).
FUSE_CONF = "/etc/fuse.conf"


def _mounts() -> list[tuple[str, str]]:
    """(mount point, fstype) of every mount, in mount order."""
    return [(m.point, m.fstype) for m in mountinfo.mounts()]


def _is_dead(point: str) -> bool:
    """Whether the FUSE mount at `point` has lost its daemon. The kernel answers a stat of its
    root from a 300 s attribute cache, so ask for something it never caches: statvfs."""
    try:
        os.statvfs(point)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def _dead_mount_error(path: str, real: str) -> MountError:
    """The error for a mountpoint whose access failed with ENOTCONN: it names the dead
    mount as mountinfo has it, which may be `path` itself or a directory above it."""
    # Shallowest first: the first dead mount on the way to `path` is the one in the way.
    fuse = [p for p, fstype in _mounts() if fstype == "fuse" or fstype.startswith("fuse.")]
    for point in sorted(set(fuse), key=len):
        if (real == point or real.startswith(point.rstrip("/") + "/")) and _is_dead(point):
            where = (
                "is a dead FUSE mount" if point == real else f"is under a dead FUSE mount {point}"
            )
            break
    else:
        point, where = real, "is on a dead FUSE mount"
    return MountError(
        f"mountpoint {path} {where} (Transport endpoint is not connected: its daemon is gone): "
        f"run 'umount {shlex.quote(point)}' first"
    )


def _above_stdio(fd: int) -> int:
    """`fd`, or a close-on-exec duplicate of it numbered 3 or more: the daemon points 0, 1 and 2
    at /dev/null, which must not replace the lock or the pipe (when nvmefs was started with
    a standard descriptor closed, os.open can return it)."""
    if fd > 2:
        return fd
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    os.close(fd)
    return high


def claim_mountpoint(path: str) -> tuple[str, int]:
    """Lock the mountpoint and check it; returns its real path and the locked descriptor.

    The lock (flock on the directory, exclusive) is what makes mounting exclusive: it is taken
    before anything looks at mountinfo, so of two nvmefs started together on one directory
    exactly one gets past here; the other is told so, or, if the winner has mounted already,
    opens the mount's root and finds the mount in mountinfo. The descriptor is close-on-exec
    (no program nvmefs runs inherits it); the forked daemon inherits it and holds the lock
    until it exits, whatever its parent does: a flock belongs to the open file, not a process.
    """
    real = os.path.realpath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MountError(f"mountpoint {path} does not exist") from None
    except NotADirectoryError:
        raise MountError(f"mountpoint {path} is not a directory") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise _dead_mount_error(path, real) from None
        raise MountError(f"mountpoint {path}: {e.strerror}") from None
    try:
        fd = _above_stdio(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MountError(
                f"mountpoint {path} is being mounted or served by another nvmefs"
            ) from None
        except OSError as e:  # a filesystem without locks: exclusive mounting cannot be had
            raise MountError(f"mountpoint {path}: cannot lock it: {e.strerror}") from None
        for point, fstype in _mounts():
            if point == real and fstype.startswith("fuse") and _is_dead(point):
                raise _dead_mount_error(path, real)
            if point == real and fstype == f"fuse.{options.SUBTYPE}":
                raise MountError(f"mountpoint {path} is already an nvmefs mount")
        try:
            now = os.stat(path)
        except OSError as e:
            raise MountError(f"mountpoint {path}: {e.strerror}") from None
        locked = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (locked.st_dev, locked.st_ino):
            # Something was mounted on it or unmounted from it since it was opened: the lock
            # is on a directory the mount would not go on.
            raise MountError(f"mountpoint {path} changed while nvmefs checked it: try again")
        try:
            if os.listdir(fd):
                raise MountError(f"mountpoint {path} is not empty")
        except PermissionError:
            raise MountError(f"mountpoint {path}: permission denied") from None
    except BaseException:
        os.close(fd)
        raise
    return real, fd


def _user_allow_other(conf: str = FUSE_CONF) -> bool:
    """Whether `conf` lets non-root mounters use allow_other, read as fusermount3 reads it: a
    line `user_allow_other` once comments and surrounding blanks are gone (and, as there, only
    lines that end with a newline count)."""
    try:
        with open(conf, "rb") as f:
            lines = f.read().split(b"\n")[:-1]
    except OSError:
        return False
    return any(line.split(b"#", 1)[0].strip() == b"user_allow_other" for line in lines)


def check_fuse_options(fuse_opts: Collection[str]) -> None:
    """Refuse what libfuse would refuse without saying why (its fusermount3's message goes to a
    daemon's /dev/null): allow_other/allow_root of a non-root mounter without user_allow_other."""
    if os.getuid() == 0:
        return
    for name in ("allow_other", "allow_root"):
        if name in fuse_opts and not _user_allow_other():
            raise MountError(
                f"option {name} needs 'user_allow_other' in {FUSE_CONF} when a user other than "
                "root mounts (only root can add it)"
            )


def fuse_options(source: str, user: Sequence[str]) -> set[str]:
    """The FUSE options of the mount: fsname=SOURCE and subtype, then the user's, at most one
    per name (a user's fsname replaces SOURCE), so libfuse never gets two values for one option
    and picks one by set order. No default_permissions: the filesystem checks every access
    itself, so that root too is told a 0444 file is not writable."""
    chosen = {
        "fsname": f"fsname={source}",
        "subtype": f"subtype={options.SUBTYPE}",
    }
    for item in user:
        chosen[item.partition("=")[0]] = item
    return set(chosen.values())


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

    rfd, wfd = (_above_stdio(fd) for fd in os.pipe())
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
    engine: EngineBase,
    outputs: Outputs,
    mountpoint: str,
    fuse_opts: set[str],
    opts: options.Parsed,
    ready: _Ready,
) -> None:
    async with running(src, engine, opts):
        fs = NvmeFS(recorder, mountpoint=mountpoint, metrics=outputs.metrics)
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


async def _workload(engine: EngineBase, recorder: Recorder, opts: options.Parsed) -> None:
    progress = recorder.progress
    try:
        if opts["workload"] != "idle":
            await workloads.run(opts["workload"], engine, progress, opts)
        await workloads.run("idle", engine, progress, opts)
    except Exception as e:  # a workload bug must not take the ring away from its readers
        log.exception("workload failed")
        progress.state = "failed"
        recorder.ring.append(HostEvent(events.HOST_ERROR, f"workload failed: {e!r}"))
