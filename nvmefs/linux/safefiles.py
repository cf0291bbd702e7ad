"""Files a root daemon writes in directories that other local users may reach.

The daemon runs as root and writes files (the journal and its rotated segments, the prom file)
at paths an administrator named, often in /tmp or /var/log. A local user must not be able to
turn those writes against the machine: by planting a symbolic or hard link where a file is
about to be opened, by creating the file first, or by swapping a directory behind the daemon.
The kernel's fs.protected_* settings stop some of that in sticky directories, but not all and
not everywhere, so nothing here relies on them.

The rules, after OpenSSH's StrictModes and logrotate's refusal of insecure directories:
- `SafeDir.open` resolves a directory one component at a time, following a symbolic link only if
  root (or the daemon's own user) owns it, and keeps a descriptor of the directory it reached:
  every later operation is relative to that descriptor, so renaming or replacing a directory on
  the path afterwards changes nothing. The directory itself must be owned by a trusted user and
  writable by nobody else: not by others, sticky or not (in /tmp another user takes any name
  that is free for a moment, and hard links there can bring in another file of root's), not by
  its group unless the group is root's.
- No operation follows a symbolic link in it (O_NOFOLLOW, and *at calls without following).
- A new file is created with O_EXCL: under a name nobody can predict (`create_temp`) when it is
  to be renamed into place, or, for a name the administrator chose, only if nothing has that
  name yet.
- An existing file is opened (`open_existing`) only if it is a regular file owned by a trusted
  user, with a single link (not a hard link someone made to a file elsewhere) and not writable
  by group or others; FIFOs and devices are refused without blocking (O_NONBLOCK).
- A file is renamed or removed by name only after `is_ours` saw, without following links, that
  the name holds a file a trusted user owns; in a sticky directory nobody else can then replace
  that name, and in any other accepted directory nobody else can write at all.

This is written here rather than taken from a library: Python's standard library has the *at
calls (dir_fd=, follow_symlinks=False) but no resolver that refuses untrusted links, and
openat2(RESOLVE_NO_SYMLINKS) would refuse the trusted ones (/var/run -> /run) too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat

from nvmefs.errors import UsageError

# Symbolic links followed in one path at most, as the kernel's own limit (MAXSYMLINKS).
MAX_LINKS = 40
# Tries at an unpredictable name before giving up (each collision is 1 in 2**64 by chance).
TEMP_TRIES = 16


class UnsafePath(UsageError):
    """A path the daemon refuses to write through, with the reason in one line."""


def trusted_uids() -> frozenset[int]:
    """The owners whose files and links the daemon trusts: root and the daemon's own user."""
    return frozenset({0, os.geteuid()})


def unsafe_dir_reason(st: os.stat_result) -> str | None:
    """Why a directory with this stat is not safe to create files in, or None if it is."""
    mode = st.st_mode
    if st.st_uid not in trusted_uids():
        return f"owned by uid {st.st_uid}, not root"
    if mode & stat.S_IWOTH:
        # Sticky or not: in a sticky directory (/tmp) another user still takes any name that is
        # free for a moment (a rotation's, a socket's), and hard links there can bring in a
        # file of root's from elsewhere; logrotate refuses such directories too.
        return "writable by every user"
    if mode & stat.S_IWGRP and st.st_gid != 0:
        return f"writable by group {st.st_gid}"
    return None


def unsafe_file_reason(st: os.stat_result) -> str | None:
    """Why an existing file with this stat (not followed) must not be adopted, or None."""
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid not in trusted_uids():
        return f"owned by uid {st.st_uid}, not root"
    if st.st_nlink != 1:
        return f"has {st.st_nlink} hard links"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return "writable by other users"
    return None


def _open_walk(path: str) -> int:
    """An O_PATH descriptor of the directory `path` (absolute), following only trusted links."""
    parts = [p for p in path.split("/") if p]
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    links = 0
    try:
        while parts:
            name = parts.pop(0)
            if name == ".":
                continue
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                if st.st_uid not in trusted_uids():
                    raise UnsafePath(f"{name} is a symbolic link owned by uid {st.st_uid}")
                links += 1
                if links > MAX_LINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
                target = os.readlink(name, dir_fd=fd)
                parts = [p for p in target.split("/") if p] + parts
                if target.startswith("/"):
                    os.close(fd)
                    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                continue
            # O_NOFOLLOW: had the name become a link since the stat, this fails (ENOTDIR).
            flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            nfd = os.open(name, flags, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


class SafeDir:
    """A checked directory and the files the daemon makes in it.

    Invariant: `fd` is an open descriptor of the directory `path` named when it was checked,
    which was then owned by a trusted user and writable by no one else (see the module
    docstring); it is used for every operation until `close()`.
    """

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd

    @classmethod
    def open(cls, path: str) -> SafeDir:
        """The directory at `path` (absolute), checked; UnsafePath or OSError if it is not
        there or not safe."""
        try:
            pfd = _open_walk(path)
        except UnsafePath as e:
            raise UnsafePath(f"directory {path}: {e}") from None
        try:
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=pfd)
        finally:
            os.close(pfd)
        try:
            why = unsafe_dir_reason(os.fstat(fd))
            if why is not None:
                raise UnsafePath(
                    f"directory {path} is {why}: another user could replace what nvmefs "
                    "writes there (use a directory only root can write, such as /var/log/nvmefs)"
                )
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    @property
    def ident(self) -> tuple[int, int]:
        """The directory's (device, inode)."""
        st = os.fstat(self.fd)
        return st.st_dev, st.st_ino

    @classmethod
    def open_for(cls, what: str, path: str) -> SafeDir:
        """`open`, with every way it can fail as one line that starts with `what` (the option
        and its value, say): UnsafePath, a UsageError."""
        try:
            return cls.open(path)
        except FileNotFoundError:
            raise UnsafePath(f"{what}: directory {path} does not exist") from None
        except NotADirectoryError:
            raise UnsafePath(f"{what}: {path} is not a directory") from None
        except UnsafePath as e:
            raise UnsafePath(f"{what}: {e}") from None
        except OSError as e:
            raise UnsafePath(f"{what}: directory {path}: {e.strerror}") from None

    @classmethod
    def for_file(cls, path: str) -> tuple[SafeDir, str]:
        """The checked directory of the file at `path` (absolute) and the file's name in it,
        following a symbolic link at that name only if a trusted user owns it (the target's
        directory is checked in turn); UnsafePath or OSError as `open`."""
        for _ in range(MAX_LINKS):
            head, name = os.path.split(path)
            where = cls.open(head)
            st = where.lstat(name)
            if st is None or not stat.S_ISLNK(st.st_mode):
                return where, name
            try:
                if st.st_uid not in trusted_uids():
                    raise UnsafePath(f"{path} is a symbolic link owned by uid {st.st_uid}")
                path = os.path.normpath(os.path.join(head, os.readlink(name, dir_fd=where.fd)))
            finally:
                where.close()
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def join(self, name: str) -> str:
        return os.path.join(self.path, name)

    # -- files ---------------------------------------------------------------------------------

    def lstat(self, name: str) -> os.stat_result | None:
        """The stat of `name` without following a link; None if there is nothing by that name."""
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def is_ours(self, name: str) -> bool:
        """Whether `name` holds a regular file a trusted user owns (links not followed)."""
        st = self.lstat(name)
        return st is not None and stat.S_ISREG(st.st_mode) and st.st_uid in trusted_uids()

    def open_existing(self, name: str, flags: int) -> int:
        """The existing file `name` opened with `flags` (O_CREAT and O_TRUNC are not allowed),
        if it may be adopted: UnsafePath with the reason if not, FileNotFoundError if absent.
        Never blocks on a FIFO and never follows a link."""
        if flags & (os.O_CREAT | os.O_TRUNC):
            raise ValueError("open_existing neither creates nor truncates")
        try:
            fd = os.open(
                name,
                flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
                dir_fd=self.fd,
            )
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafePath(f"{self.join(name)} is a symbolic link") from None
            if e.errno == errno.ENXIO:  # a FIFO nobody reads, opened for writing
                raise UnsafePath(f"{self.join(name)} is not a regular file") from None
            raise
        try:
            why = unsafe_file_reason(os.fstat(fd))
            if why is not None:
                raise UnsafePath(f"{self.join(name)} is {why}: nvmefs does not write to it")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def create_new(self, name: str, flags: int, mode: int) -> int:
        """Create `name`, which must not exist yet (FileExistsError if anything has it)."""
        return os.open(
            name,
            flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC,
            mode,
            dir_fd=self.fd,
        )

    def create_temp(self, prefix: str, suffix: str, flags: int, mode: int) -> tuple[int, str]:
        """A new file under an unpredictable name `prefix<random>suffix`; (fd, name)."""
        for _ in range(TEMP_TRIES):
            name = f"{prefix}{secrets.token_hex(8)}{suffix}"
            try:
                return self.create_new(name, flags, mode), name
            except FileExistsError:
                continue
        raise OSError(errno.EEXIST, f"no free temporary name in {self.path}")

    def rename(self, old: str, new: str) -> None:
        """Rename within the directory (replacing whatever `new` is, without following it)."""
        os.rename(old, new, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def unlink(self, name: str) -> None:
        os.unlink(name, dir_fd=self.fd)

    def unlink_if_ours(self, name: str, ident: tuple[int, int] | None = None) -> bool:
        """Remove `name` if it holds a file a trusted user owns (and, with `ident`, that very
        file: its (device, inode)); whether it did."""
        st = self.lstat(name)
        if st is None or not self.is_ours(name):
            return False
        if ident is not None and (st.st_dev, st.st_ino) != ident:
            return False
        with contextlib.suppress(FileNotFoundError):
            self.unlink(name)
            return True
        return False

    def sync(self) -> None:
        """Make the directory's renames durable (errors ignored: a sync is a best effort)."""
        with contextlib.suppress(OSError):
            os.fsync(self.fd)
