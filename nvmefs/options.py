"""`-o` options: ours (typed and checked), FUSE's (passed on), and mount(8)'s (dropped).

Every option of ours is listed once in OPTIONS with its parser and default, so `nvmefs scrub`,
the mount daemon and the README agree on what exists.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nvmefs.errors import UsageError
from nvmefs.nvme import tables
from nvmefs.nvme.policy import LogPolicy
from nvmefs.store.render import CLOCKS, FORMATS


class OptionError(UsageError):
    """An -o option that does not exist or whose value does not parse."""


class ArgParser(argparse.ArgumentParser):
    """argparse whose complaints are UsageErrors (one line, exit 2), never SystemExit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


_SIZE = re.compile(r"^(\d+)([KMGT]?)(i?B?)?$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def size(text: str) -> int:
    """`4096`, `128K`, `64M`, `1G` (binary units)."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size like 4096, 128K or 64M")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def _int_range(lo: int, hi: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text, 0)
        if value < lo or (hi is not None and value > hi):
            raise ValueError(f"{text} is outside {lo}..{hi if hi is not None else 'inf'}")
        return value

    return parse


def _float_min(lo: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = float(text)
        if not value >= lo:
            raise ValueError(f"{text} is below {lo:g}")
        return value

    return parse


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return parse


def _onoff(text: str) -> bool:
    if text in ("on", "1", "yes", "true"):
        return True
    if text in ("off", "0", "no", "false"):
        return False
    raise ValueError(f"{text!r} is not on or off")


def _log(text: str) -> str:
    LogPolicy(text)  # raises PolicyError with the reason
    return text


@dataclass(frozen=True)
class Option:
    """One -o option of ours: how its value parses, its default and its help."""

    parse: Callable[[str], Any]
    default: Any
    help: str
    flag: bool = False  # may be given without a value (means on)


OPTIONS: dict[str, Option] = {
    # the simulated controller (SOURCE sim)
    "sim_size": Option(size, 64 << 20, "namespace size of the simulated controller"),
    "sim_lba": Option(_int_range(512, 4096), 512, "logical block size: 512, 1024, 2048, 4096"),
    "sim_ns": Option(_int_range(1, 16), 1, "number of namespaces"),
    "faults": Option(str, None, "fault plan: demo or a TOML file"),
    "seed": Option(_int_range(0), 0, "seed for fault probabilities and randread"),
    "sim_abort": Option(_onoff, True, "whether the simulated controller honours Abort"),
    # device sources
    "transport": Option(_choice("auto", "uring", "ioctl"), "auto", "passthrough: uring or ioctl"),
    # the kernel source
    "trace_buffer_kb": Option(_int_range(4), None, "kernel: per-CPU trace buffer of the instance"),
    "kernel": Option(_onoff, False, "device sources: other processes' errors too", flag=True),
    # the engine
    "qd": Option(_int_range(1, 1023), 8, "commands in flight"),
    "bs": Option(size, 128 << 10, "bytes per command (scrub, randread)"),
    "io_timeout": Option(_float_min(0.001), 30.0, "seconds before a command is aborted"),
    "retries": Option(_int_range(0, 100), 5, "retries of a failed command without DNR"),
    "log_attempts": Option(_onoff, False, "an entry per attempt, as the tracepoint", flag=True),
    # the workload
    "workload": Option(_choice("scrub", "randread", "idle"), "scrub", "what the daemon runs"),
    "op": Option(_choice("read", "verify"), "read", "scrub with Read or Verify"),
    "passes": Option(_int_range(0), 0, "scrub passes, 0 forever (nvmefs scrub: 1)"),
    "interval": Option(_float_min(0), 0.0, "seconds between scrub passes"),
    "rate": Option(_float_min(0), 0.0, "MB/s cap for scrub and randread, 0 no cap"),
    "health_interval": Option(_float_min(0.01), 60.0, "seconds between health polls (idle)"),
    # the ring and its renderings
    "capacity": Option(_int_range(1, 100_000_000), 1024, "ring entries"),
    "log": Option(_log, "media", "media, errors, all, or statuses 0x281:0x285..."),
    "profile": Option(_choice(*tables.PROFILES), tables.DEFAULT_PROFILE, "kernel mapping"),
    "format": Option(_choice(*FORMATS), "full", "entry text: full, or the seed's bare text"),
    "clock": Option(_choice(*CLOCKS), "jiffies", "ticks: jiffies, uptime or realtime"),
    # the daemon
    "kmsg": Option(_onoff, False, "mirror logged entries to the kernel log", flag=True),
}

# FUSE options we hand to libfuse as they are.
FUSE_PASSTHROUGH = {
    "allow_other",
    "allow_root",
    "default_permissions",
    "fsname",
    "subtype",
    "auto_unmount",
    "max_read",
    "uid",
    "gid",
    "umask",
}
# What mount(8)/mount.fuse add or users write out of habit; libfuse would reject them.
MOUNT_IGNORED = {
    "defaults",
    "rw",
    "ro",
    "relatime",
    "noatime",
    "atime",
    "strictatime",
    "nodiratime",
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "noexec",
    "auto",
    "noauto",
    "nofail",
    "_netdev",
    "user",
    "users",
    "nouser",
    "async",
    "sync",
    "lazytime",
    "nolazytime",
    "loud",
    "silent",
}


@dataclass
class Parsed:
    """Parsed -o options: every option's value, the FUSE options to pass on, and which of
    ours the user gave explicitly."""

    values: dict[str, Any]
    fuse: list[str]
    given: set[str]

    def __getitem__(self, key: str) -> Any:
        return self.values[key]


def split(opts: list[str]) -> list[str]:
    return [item for group in opts for item in group.split(",") if item]


def parse(opts: list[str], *, allow_fuse: bool, overrides: dict[str, Any] | None = None) -> Parsed:
    values = {name: o.default for name, o in OPTIONS.items()}
    values.update(overrides or {})
    fuse: list[str] = []
    given: set[str] = set()
    for item in split(opts):
        name, eq, text = item.partition("=")
        if name.startswith("x-") or name.startswith("comment"):
            continue
        opt = OPTIONS.get(name)
        if opt is None:
            if allow_fuse and name in MOUNT_IGNORED:
                continue
            if allow_fuse and name in FUSE_PASSTHROUGH:
                fuse.append(item)
                continue
            raise OptionError(f"unknown option {name!r}")
        if not eq:
            if not opt.flag:
                raise OptionError(f"option {name!r} needs a value ({name}=...: {opt.help})")
            text = "on"
        try:
            values[name] = opt.parse(text)
        except (ValueError, UsageError) as e:  # int()/float() raise ValueError, ours UsageError
            raise OptionError(f"option {name}={text}: {e}") from None
        given.add(name)
    return Parsed(values, fuse, given)
