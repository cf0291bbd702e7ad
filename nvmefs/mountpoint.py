"""The mountpoint and the FUSE options of a mount: what is checked before anything starts.

`claim_mountpoint` makes mounting exclusive (a lock held for the daemon's life) and refuses, in
one line, a mountpoint that is missing, not a directory, not empty, already an nvmefs mount or
under a dead FUSE mount (naming the one to unmount). `fuse_options` and `check_fuse_options`
are the FUSE option policy: what libfuse gets, and what it would refuse without saying why.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shlex
from collections.abc import Collection, Sequence

from nvmefs import options
from nvmefs.errors import UsageError
from nvmefs.linux import mountinfo
from nvmefs.linux.safefiles import SafeDir

# Where the mount daemons' locks are (as root): a directory only root may open, in /run (where
# only root makes names; new at every boot). Not /run/nvmefs: the kernel unit mounts there.
LOCK_DIR = "/run/nvmefs-locks"


class MountError(UsageError):
    """A mountpoint nvmefs cannot mount on."""


# The mounter needs this line in /etc/fuse.conf for allow_other (fusermount3 checks it).
FUSE_CONF = "/etc/fuse.conf"


def _mounts() -> list[tuple[str, str]]:
    """(mount point, fstype) of every mount, in mount order."""
    return [(m.point, m.fstype) for m in mountinfo.mounts()]


def is_dead(point: str) -> bool:
    """Whether the FUSE mount at `point` has lost its daemon. The kernel answers a stat of its
    root from a 300 s attribute cache, so ask for something it never caches: statvfs."""
    try:
        os.statvfs(point)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def dead_mount_error(path: str, real: str) -> MountError:
    """The error for a mountpoint whose access failed with ENOTCONN: it names the dead
    mount as mountinfo has it, which may be `path` itself or a directory above it."""
    # Shallowest first: the first dead mount on the way to `path` is the one in the way.
    fuse = [p for p, fstype in _mounts() if fstype == "fuse" or fstype.startswith("fuse.")]
    for point in sorted(set(fuse), key=len):
        if (real == point or real.startswith(point.rstrip("/") + "/")) and is_dead(point):
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


def above_stdio(fd: int) -> int:
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

    The lock (an exclusive flock) is what makes mounting exclusive: it is taken before
    anything looks at mountinfo, so of two nvmefs started together on one directory exactly
    one gets past here; the other is told so, or, if the winner has mounted already, opens the
    mount's root and finds the mount in mountinfo. Run as root, the lock is on a file of the
    directory's own in LOCK_DIR, which only root can open: a lock on the directory itself could
    be taken by any user who can read it, keeping nvmefs from mounting (at boot, at a restart);
    run by another user, it is on the directory. The descriptor is close-on-exec (no program
    nvmefs runs inherits it); the forked daemon inherits it and holds the lock until it exits,
    whatever its parent does: a flock belongs to the open file, not a process.
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
            raise dead_mount_error(path, real) from None
        raise MountError(f"mountpoint {path}: {e.strerror}") from None
    lock = -1
    try:
        fd = above_stdio(fd)
        lock = _lock_for(fd)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MountError(
                f"mountpoint {path} is being mounted or served by another nvmefs"
            ) from None
        except OSError as e:  # a filesystem without locks: exclusive mounting cannot be had
            raise MountError(f"mountpoint {path}: cannot lock it: {e.strerror}") from None
        for point, fstype in _mounts():
            if point == real and fstype.startswith("fuse") and is_dead(point):
                raise dead_mount_error(path, real)
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
        if lock not in (-1, fd):
            os.close(lock)
        os.close(fd)
        raise
    if lock != fd:
        os.close(fd)
    return real, lock


def _lock_for(fd: int) -> int:
    """The descriptor to lock for the mountpoint directory open at `fd`: as root, a file of
    its own (named by the directory's device and inode) in LOCK_DIR, made if need be; else
    `fd` itself."""
    if os.geteuid() != 0:
        return fd
    st = os.fstat(fd)
    try:
        os.makedirs(LOCK_DIR, mode=0o700, exist_ok=True)
        where = SafeDir.open(LOCK_DIR)
    except OSError as e:  # UnsafePath is a UsageError: one line, as the others
        raise MountError(f"cannot use {LOCK_DIR} for the mountpoint's lock: {e.strerror}") from None
    try:
        name = f"mount-{st.st_dev}-{st.st_ino}.lock"
        try:
            lock = where.open_existing(name, os.O_RDWR)
        except FileNotFoundError:
            try:
                lock = where.create_new(name, os.O_RDWR, 0o600)
            except FileExistsError:  # made meanwhile by another nvmefs
                lock = where.open_existing(name, os.O_RDWR)
    except OSError as e:
        raise MountError(f"cannot make the mountpoint's lock in {LOCK_DIR}: {e.strerror}") from None
    finally:
        where.close()
    return above_stdio(lock)


def user_allow_other(conf: str = FUSE_CONF) -> bool:
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
        if name in fuse_opts and not user_allow_other():
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
