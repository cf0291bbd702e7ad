"""A hostile local user, for tests of what the root daemon does with files and handles.

`HostileUser` is a real unprivileged account (created once with useradd) whose commands run
through setpriv, so the kernel's own permission checks apply to them as to any local user.
`protected` sets the kernel's link and FIFO protections (fs.protected_*) to a Debian host's
stock values or turns them all off: nvmefs must hold under both, so a fix never leans on them.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NAME = "nvmefs-hostile"
SYSCTLS = ("protected_symlinks", "protected_hardlinks", "protected_regular", "protected_fifos")
# What a stock Debian 12 host sets (systemd's 50-default.conf and the kernel's defaults).
STOCK = {
    "protected_symlinks": 1,
    "protected_hardlinks": 1,
    "protected_regular": 2,
    "protected_fifos": 1,
}
OFF = dict.fromkeys(SYSCTLS, 0)


@dataclass(frozen=True)
class HostileUser:
    name: str
    uid: int
    gid: int

    def argv(self, *cmd: str) -> list[str]:
        return [
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--clear-groups",
            "--",
            *cmd,
        ]

    def run(self, *cmd: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 60)
        p = subprocess.run(self.argv(*cmd), **kw)
        if check and p.returncode != 0:
            raise AssertionError(f"{cmd} as {self.name}: exit {p.returncode}: {p.stderr}")
        return p

    def popen(self, *cmd: str, **kw: Any) -> subprocess.Popen[str]:
        kw.setdefault("text", True)
        return subprocess.Popen(self.argv(*cmd), **kw)


def hostile_user() -> HostileUser:
    """The unprivileged account, made if it is missing."""
    try:
        pw = pwd.getpwnam(NAME)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", NAME],
            check=True,
            capture_output=True,
        )
        pw = pwd.getpwnam(NAME)
    return HostileUser(NAME, pw.pw_uid, pw.pw_gid)


def read_sysctls() -> dict[str, int]:
    return {k: int(Path(f"/proc/sys/fs/{k}").read_text()) for k in SYSCTLS}


def write_sysctls(values: dict[str, int]) -> None:
    for k, v in values.items():
        Path(f"/proc/sys/fs/{k}").write_text(f"{v}\n")


@contextlib.contextmanager
def protections(values: dict[str, int]) -> Iterator[None]:
    saved = read_sysctls()
    write_sysctls(values)
    try:
        yield
    finally:
        write_sysctls(saved)


@contextlib.contextmanager
def public_dir(mode: int = 0o1777, owner: int = 0) -> Iterator[Path]:
    """A fresh directory under /tmp that the hostile user can reach: mode 1777 and root's by
    default (a /tmp of its own), or another mode or owner. Removed afterwards."""
    top = Path(tempfile.mkdtemp(prefix="nvmefs-hostile-", dir="/tmp"))
    try:
        top.chmod(0o755)
        d = top / "d"
        d.mkdir()
        os.chown(d, owner, owner if owner else 0)
        d.chmod(mode)
        yield d
    finally:
        shutil.rmtree(top, ignore_errors=True)


def victim(tmp_path: Path, content: bytes = b"root's secret\n") -> tuple[Path, os.stat_result]:
    """A root-owned 0600 file outside every directory under test, and its stat."""
    d = tmp_path / "victim-dir"
    d.mkdir(exist_ok=True)
    v = d / "victim"
    v.write_bytes(content)
    v.chmod(0o600)
    # tmp_path is root's and 0700: let the user name the victim (ln -s needs no access to it).
    for p in (d, *d.parents):
        if str(p) in ("/", "/tmp"):
            break
        p.chmod(p.stat().st_mode | 0o011)
    return v, v.stat()


def unchanged(path: Path, before: os.stat_result, content: bytes) -> bool:
    st = path.stat()
    return (st.st_mtime_ns, st.st_size, st.st_ino) == (
        before.st_mtime_ns,
        before.st_size,
        before.st_ino,
    ) and path.read_bytes() == content
