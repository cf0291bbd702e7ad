"""`-o` options: ours (typed and checked), FUSE's (passed on), and mount(8)'s (dropped).

Every option of ours is listed once in OPTIONS with its parser, its default and where it applies
(the kinds of SOURCE and the commands that use it, and the option it only tunes), so `nvmefs
scrub`, `nvmefs watch`, the mount daemon, the sources and the README agree on what exists and
where: an option given where it does not apply is refused, never ignored. `parse` checks what
the command allows; `for_source` what the SOURCE allows, and gives its defaults. A `Parsed` is
frozen: what depends on the source comes as a new `Parsed`, never as an edit. Values are ASCII
(file paths excepted): Python's int() and float() also read fullwidth or Arabic-Indic digits,
which nobody means.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from nvmefs.engine.sink import FOLD_BURST, FOLD_RATE
from nvmefs.errors import UsageError
from nvmefs.nvme import tables
from nvmefs.nvme.policy import LogPolicy
from nvmefs.store.render import CLOCKS, FORMATS


class OptionError(UsageError):
    """An -o option that does not exist, does not apply, or whose value does not parse."""


class ArgParser(argparse.ArgumentParser):
    """argparse whose complaints are UsageErrors (one line, exit 2), never SystemExit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


# Every number of ours fits in 63 bits; beyond that a value is out of range, whatever it is.
MAX_INT = (1 << 63) - 1
# No option value needs more characters than this to be a number in range (0b and 63 bits is
# 65). Longer ones are out of range without being converted: int() refuses decimal strings of
# more than 4300 digits with a ValueError about Python's limits, not about the option.
_MAX_NUMBER_CHARS = 66

_INTEGER = re.compile(r"0[xX][0-9a-fA-F]+|0[oO][0-7]+|0[bB][01]+|[0-9]+")
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
# re.ASCII: without it [KMGT] with IGNORECASE also matches the Kelvin sign.
_SIZE = re.compile(r"([0-9]+)([KMGT]?)(?:i?B?)", re.IGNORECASE | re.ASCII)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def shown(text: str) -> str:
    """`text` as a message quotes it: whole if short, else its start and its length."""
    if len(text) <= 40:
        return text
    return f"{text[:16]}... ({len(text)} characters)"


def _out_of_range(text: str, lo: int | float, hi: int | float) -> ValueError:
    unit = "digit" if text.isdigit() else "character"
    number = text if len(text) <= 40 else f"a {len(text)}-{unit} number"
    return ValueError(f"{number} is out of range {lo}..{hi}")


def size(text: str) -> int:
    """`4096`, `128K`, `64M`, `1G` (binary units); at most MAX_INT bytes."""
    m = _SIZE.fullmatch(text)
    if not m:
        raise ValueError(f"{shown(text)!r} is not a size like 4096, 128K or 64M")
    if len(m.group(1)) > _MAX_NUMBER_CHARS:
        raise _out_of_range(text, 0, MAX_INT)
    value = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if value > MAX_INT:
        raise _out_of_range(text, 0, MAX_INT)
    return value


def _literal(text: str) -> int:
    """The value of an _INTEGER of at most _MAX_NUMBER_CHARS characters (decimal may have
    leading zeros, which int(text, 0) refuses)."""
    return int(text, 10) if text.isdigit() else int(text, 0)


def integer(text: str, lo: int = 0, hi: int = MAX_INT) -> int:
    """An ASCII integer (decimal, or 0x/0o/0b) in lo..hi; ValueError saying why otherwise."""
    if not _INTEGER.fullmatch(text):
        raise ValueError(f"{shown(text)!r} is not a number")
    if len(text) > _MAX_NUMBER_CHARS:
        raise _out_of_range(text, lo, hi)
    value = _literal(text)
    if value < lo or value > hi:
        raise _out_of_range(text, lo, hi)
    return value


def _int_range(lo: int, hi: int = MAX_INT) -> Callable[[str], int]:
    def parse(text: str) -> int:
        return integer(text, lo, hi)

    return parse


def _float_min(lo: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        # The pattern also keeps out what float() takes that is no duration: inf, nan, 1e9.
        if not _DECIMAL.fullmatch(text):
            raise ValueError(f"{shown(text)!r} is not a number like 2 or 0.5")
        if len(text) > _MAX_NUMBER_CHARS:
            raise _out_of_range(text, lo, MAX_INT)
        value = float(text)
        if not value >= lo:
            raise ValueError(f"{text} is below {lo:g}")
        return value

    return parse


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"{shown(text)!r} is not one of {', '.join(choices)}")
        return text

    return parse


def _onoff(text: str) -> bool:
    if text in ("on", "1", "yes", "true"):
        return True
    if text in ("off", "0", "no", "false"):
        return False
    raise ValueError(f"{shown(text)!r} is not on or off")


def _log(text: str) -> str:
    LogPolicy(text)  # raises PolicyError with the reason
    return text


# The syslog socket of `-o syslog` without a value: where journald and rsyslog listen.
SYSLOG_SOCKET = "/dev/log"
# The most rotated journal files kept: a rotation looks at and renames each of them, and that
# work must stay small (keep more history with a larger journal_size instead).
JOURNAL_KEEP_MAX = 100
# The smallest journal_size: a file must hold many entries (a JSON line is under 1 KiB).
JOURNAL_SIZE_MIN = 64 << 10
# The name node_exporter's textfile collector reads (it takes only *.prom files).
PROM_FILE = "nvmefs.prom"


def _prom_path(text: str) -> str:
    if not text:
        raise ValueError("needs a file or directory path")
    # Absolute: the daemon writes it long after the command's working directory mattered.
    path = os.path.abspath(text)
    if text.endswith("/") or not text.endswith(".prom"):
        # A directory (node_exporter's textfile directory): the file goes in it.
        return os.path.join(path, PROM_FILE)
    return path


def _listen(text: str) -> tuple[str, int]:
    """ADDR:PORT, [IPv6]:PORT or :PORT (every address); the port 1..65535."""
    host, colon, port = text.rpartition(":")
    if not colon:
        raise ValueError(f"{shown(text)!r} is not ADDR:PORT (like 127.0.0.1:9464 or :9464)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{shown(text)!r}: write an IPv6 address in brackets, [::1]:9464")
    return host, integer(port, 1, 65535)


def _journal_size(text: str) -> int:
    value = size(text)
    if value < JOURNAL_SIZE_MIN:
        raise ValueError(f"{shown(text)} is below the smallest journal size, 64K")
    return value


def _syslog(text: str) -> str:
    if text == "on":
        return SYSLOG_SOCKET
    if not text:
        raise ValueError("needs a socket path, or no value for /dev/log")
    return text


# What one ring entry costs at worst, measured on a full 200,000-entry ring (storm plan,
# log=all, Python 3.11): about 355 bytes retained, 210 more once the text file has been read
# (its rendering is cached), 690 more once the JSON file has.
BYTES_PER_ENTRY = 1280
# A ring may take at most this share of the machine's memory: the rest is for everyone else.
MEMORY_SHARE = 4


def mem_total(meminfo: str = "/proc/meminfo") -> int | None:
    """The machine's memory in bytes (MemTotal), or None if the kernel does not say."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def max_capacity() -> int:
    """The largest `capacity=` whose full ring, rendered, fits in MEMORY_SHARE of the memory."""
    total = mem_total()
    if total is None:  # no /proc: the bound of the ring's own sequence numbers only
        return MAX_INT
    return max(1, total // MEMORY_SHARE // BYTES_PER_ENTRY)


def _capacity(text: str) -> int:
    limit = max_capacity()
    if not _INTEGER.fullmatch(text) or (len(text) <= _MAX_NUMBER_CHARS and _literal(text) <= limit):
        return integer(text, 1, limit)  # in range, or refused for another reason than its size
    total = mem_total() or 0
    raise ValueError(
        f"at most {limit} entries on this machine: a full ring takes about "
        f"{BYTES_PER_ENTRY} bytes per entry with its renderings, and nvmefs keeps it "
        f"within 1/{MEMORY_SHARE} of the {total / (1 << 30):.1f} GiB of memory"
    )


# The kinds of SOURCE: the simulated controller, a device through passthrough, the kernel's
# tracepoints.
SIM, DEVICE, KERNEL = "sim", "device", "kernel"
EVERY_SOURCE = frozenset({SIM, DEVICE, KERNEL})
SENDS_IO = frozenset({SIM, DEVICE})  # the sources that send commands of their own
# The commands: the mount daemon, `nvmefs scrub`, `nvmefs watch`.
MOUNT, SCRUB, WATCH = "mount", "scrub", "watch"
EVERY_COMMAND = frozenset({MOUNT, SCRUB, WATCH})
ONLY_MOUNT = frozenset({MOUNT})
# The words a refusal names a set of sources with.
SOURCE_WORDS = {
    frozenset({SIM}): "SOURCE sim only",
    frozenset({DEVICE}): "device sources only",
    frozenset({KERNEL, DEVICE}): "the kernel source (or -o kernel) only",
    frozenset({KERNEL}): "the kernel source only",
}


@dataclass(frozen=True)
class Option:
    """One -o option of ours: how its value parses, its default, its help, and where it
    applies: `sources` (kinds of SOURCE) and `commands`; `needs`, the option it only tunes
    (refused without it; the kernel source counts as `kernel` on); `source_values`, for a
    kind of source that takes only some values, those values (the first is its default there),
    and why."""

    parse: Callable[[str], Any]
    default: Any
    help: str
    flag: bool = False  # may be given without a value (means on)
    path: bool = False  # the value is a file path: any characters, not only ASCII
    sources: frozenset[str] = EVERY_SOURCE
    commands: frozenset[str] = EVERY_COMMAND
    needs: str | None = None
    source_values: Mapping[str, tuple[tuple[Any, ...], str]] = field(default_factory=dict)


ONLY_SIM = frozenset({SIM})
ONLY_DEVICE = frozenset({DEVICE})

OPTIONS: dict[str, Option] = {
    # the simulated controller (SOURCE sim)
    "sim_size": Option(
        size, 64 << 20, "namespace size of the simulated controller", sources=ONLY_SIM
    ),
    "sim_lba": Option(
        _int_range(512, 4096), 512, "logical block size: 512, 1024, 2048, 4096", sources=ONLY_SIM
    ),
    "sim_ns": Option(_int_range(1, 16), 1, "number of namespaces", sources=ONLY_SIM),
    "faults": Option(str, None, "fault plan: demo or a TOML file", path=True, sources=ONLY_SIM),
    "seed": Option(_int_range(0), 0, "seed for fault probabilities and randread", sources=SENDS_IO),
    "sim_abort": Option(
        _onoff, True, "whether the simulated controller honours Abort", sources=ONLY_SIM
    ),
    # device sources
    "transport": Option(
        _choice("auto", "uring", "ioctl"),
        "auto",
        "passthrough: uring or ioctl",
        sources=ONLY_DEVICE,
    ),
    "datapath": Option(
        _choice("auto", "compiled", "python"),
        "auto",
        "bulk reads: C or Python",
        sources=ONLY_DEVICE,
    ),
    # the kernel source
    "trace_buffer_kb": Option(
        _int_range(4),
        None,
        "kernel: per-CPU trace buffer of the instance",
        sources=frozenset({KERNEL, DEVICE}),
        needs="kernel",
    ),
    "kernel": Option(
        _onoff, False, "device sources: other processes' errors too", flag=True, sources=ONLY_DEVICE
    ),
    "backfill": Option(
        _onoff,
        True,
        "kernel: at start, this boot's errors from the kernel log",
        flag=True,
        sources=frozenset({KERNEL}),
        commands=frozenset({MOUNT}),
    ),
    "locate": Option(
        _onoff,
        True,
        "kernel: each error's LBA looked up: the file (or metadata, free space) it is in",
        flag=True,
        sources=frozenset({KERNEL, DEVICE}),
        needs="kernel",
    ),
    "locate_wait": Option(
        _float_min(0.1),
        2.0,
        "kernel: seconds an error entry waits for its LBA's owner before it goes without",
        sources=frozenset({KERNEL, DEVICE}),
        needs="kernel",
    ),
    # the engine
    "qd": Option(_int_range(1, 1023), 8, "commands in flight", sources=SENDS_IO),
    "bs": Option(size, 128 << 10, "bytes per command (scrub, randread)", sources=SENDS_IO),
    "io_timeout": Option(
        _float_min(0.001), 30.0, "seconds before a command is aborted", sources=SENDS_IO
    ),
    "retries": Option(
        _int_range(0, 100), 5, "retries of a failed command without DNR", sources=SENDS_IO
    ),
    "log_attempts": Option(_onoff, False, "an entry per attempt, as the tracepoint", flag=True),
    # the workload
    "workload": Option(
        _choice("scrub", "randread", "idle"),
        "scrub",
        "what the daemon runs",
        commands=frozenset({MOUNT, WATCH}),
        source_values={
            KERNEL: (("idle",), "the kernel source sends no I/O: workload must be idle")
        },
    ),
    "op": Option(_choice("read", "verify"), "read", "scrub with Read or Verify", sources=SENDS_IO),
    "passes": Option(
        _int_range(0), 0, "scrub passes, 0 forever (nvmefs scrub: 1)", sources=SENDS_IO
    ),
    "interval": Option(_float_min(0), 0.0, "seconds between scrub passes", sources=SENDS_IO),
    "rate": Option(
        _float_min(0), 0.0, "MB/s cap for scrub and randread, 0 no cap", sources=SENDS_IO
    ),
    "health_interval": Option(
        _float_min(0.01),
        60.0,
        "seconds between health polls (idle)",
        commands=frozenset({MOUNT, WATCH}),
    ),
    # the ring and its renderings
    "capacity": Option(_capacity, 1024, "ring entries (bounded by the machine's memory)"),
    "log": Option(_log, "media", "media, errors, all, or statuses 0x281:0x285..."),
    "fold": Option(
        _int_range(0),
        FOLD_RATE,
        f"errors/s (bursts of {FOLD_BURST}) logged one by one before a storm's like errors fold"
        " into one entry with their count; 0: never",
    ),
    "profile": Option(_choice(*tables.PROFILES), tables.DEFAULT_PROFILE, "kernel mapping"),
    "format": Option(_choice(*FORMATS), "full", "entry text: full, or the seed's bare text"),
    "clock": Option(_choice(*CLOCKS), "jiffies", "ticks: jiffies, uptime or realtime"),
    # the daemon
    "kmsg": Option(
        _onoff, False, "mirror logged entries to the kernel log", flag=True, commands=ONLY_MOUNT
    ),
    # fleet outputs (the mount daemon)
    "prom": Option(
        _prom_path,
        None,
        "write nvmefs.prom here (file or directory)",
        path=True,
        commands=ONLY_MOUNT,
    ),
    "prom_interval": Option(
        _float_min(0.1), 15.0, "seconds between writes of prom=", commands=ONLY_MOUNT, needs="prom"
    ),
    "metrics_listen": Option(
        _listen, None, "serve /metrics over HTTP at ADDR:PORT", commands=ONLY_MOUNT
    ),
    "journal": Option(
        str,
        None,
        "append every entry as a JSON line to this file",
        path=True,
        commands=ONLY_MOUNT,
    ),
    "journal_size": Option(
        _journal_size,
        16 << 20,
        "rotate the journal at this size",
        commands=ONLY_MOUNT,
        needs="journal",
    ),
    "journal_keep": Option(
        _int_range(1, JOURNAL_KEEP_MAX),
        4,
        "rotated journals kept (PATH.1 ...)",
        commands=ONLY_MOUNT,
        needs="journal",
    ),
    "journal_fsync": Option(
        _float_min(0),
        1.0,
        "seconds between fsyncs, 0 after every write",
        commands=ONLY_MOUNT,
        needs="journal",
    ),
    "syslog": Option(
        _syslog,
        None,
        "entries to syslog: /dev/log or SOCKET",
        flag=True,
        path=True,
        commands=ONLY_MOUNT,
    ),
}


def refused_by(command: str) -> tuple[str, ...]:
    """The options of ours that `command` does not use (it refuses them)."""
    return tuple(name for name, o in OPTIONS.items() if command not in o.commands)


# The outputs only the mount daemon runs (options, in the table: commands={MOUNT}).
FLEET = tuple(name for name, o in OPTIONS.items() if o.commands == ONLY_MOUNT)
# `nvmefs scrub` runs one scrub pass and mirrors nothing to the kernel log; `nvmefs watch`
# prints entries (a service manager's journal takes them from there).
SCRUB_REFUSES = refused_by(SCRUB)
WATCH_REFUSES = refused_by(WATCH)

# FUSE options we hand to libfuse as they are: flags (no value), and options with a value.
# `ro` is a flag too: libfuse mounts read-only (so `control` cannot be written); `rw` undoes it.
FUSE_FLAGS = {"allow_other", "allow_root", "default_permissions", "auto_unmount", "ro"}
FUSE_VALUED = {"fsname", "subtype"}
FUSE_PASSTHROUGH = FUSE_FLAGS | FUSE_VALUED
_HIGH_LEVEL = (
    "libfuse takes it only in its high-level API, which nvmefs (pyfuse3) does not use; "
    "nvmefs's files are root's, and allow_other lets other users read them"
)
# FUSE options nvmefs cannot pass on, and why: libfuse would fail the mount with no reason.
FUSE_REFUSED = {
    "uid": _HIGH_LEVEL,
    "gid": _HIGH_LEVEL,
    "umask": _HIGH_LEVEL,
    "max_read": "pyfuse3 cannot give libfuse a matching max_read, so the mount would fail",
}
# The subtype mountinfo and fstab's `fuse.nvmefs` know an nvmefs mount by.
SUBTYPE = "nvmefs"
# What mount(8)/mount.fuse add or users write out of habit; libfuse would reject them.
MOUNT_IGNORED = {
    "defaults",
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


@dataclass(frozen=True)
class Parsed:
    """Parsed -o options: every option's value, the FUSE options to pass on (at most one per
    name, in the order given), and which of ours the user gave explicitly. Frozen: a value that
    depends on more than the options (the source's) makes a new one (`with_defaults`)."""

    values: Mapping[str, Any]
    fuse: tuple[str, ...]
    given: frozenset[str]

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def with_defaults(self, **defaults: Any) -> Parsed:
        """These values for the options the user did not give; the others as they are."""
        values = dict(self.values)
        values.update((k, v) for k, v in defaults.items() if k not in self.given)
        return Parsed(MappingProxyType(values), self.fuse, self.given)


def for_source(opts: Parsed, kind: str) -> Parsed:
    """Refuse the options given that do not apply to a SOURCE of this kind (SIM, DEVICE or
    KERNEL), or whose value it does not take; the options with the defaults it gives."""
    for name in sorted(opts.given, key=list(OPTIONS).index):
        o = OPTIONS[name]
        if kind not in o.sources:
            if kind == KERNEL:
                raise OptionError(f"option {name} does not apply to the kernel source")
            raise OptionError(f"option {name} is for {SOURCE_WORDS[o.sources]}")
        if o.needs == "kernel" and kind != KERNEL and not opts["kernel"]:
            raise OptionError(f"option {name} is for {SOURCE_WORDS[o.sources]}")
    defaults: dict[str, Any] = {}
    for name, o in OPTIONS.items():
        if kind in o.source_values:
            allowed, why = o.source_values[kind]
            if name in opts.given and opts[name] not in allowed:
                raise OptionError(why)
            defaults[name] = allowed[0]
    return opts.with_defaults(**defaults)


def split(opts: list[str]) -> list[str]:
    return [item for group in opts for item in group.split(",") if item]


def _fuse_option(name: str, eq: str, text: str) -> str:
    """The FUSE option `name` (`=text` when `eq`) as libfuse takes it; OptionError, saying
    why, for what libfuse would refuse without a reason (the mount failing in the daemon)."""
    reason = FUSE_REFUSED.get(name)
    if reason is not None:
        raise OptionError(f"option {name}= is not supported: {reason}")
    if name in FUSE_FLAGS:
        if eq:
            raise OptionError(
                f"option {name} takes no value: write {name}, not {name}={shown(text)}"
            )
        return name
    if not text:
        raise OptionError(f"option {name} needs a value ({name}=...)")
    if name == "subtype" and text != SUBTYPE:
        raise OptionError(
            f"option subtype={shown(text)}: the subtype is always {SUBTYPE} "
            f"(mountinfo's and fstab's fuse.{SUBTYPE} name an nvmefs mount)"
        )
    return f"{name}={text}"


def parse(
    opts: list[str],
    *,
    allow_fuse: bool,
    overrides: dict[str, Any] | None = None,
    refuse: Collection[str] = (),
) -> Parsed:
    """Check every -o option; OptionError (one line) for the first that is wrong.

    `allow_fuse`: FUSE and mount(8) options are accepted (the mount daemon). `refuse`: options
    of ours the command does not use, refused rather than silently ignored.
    """
    unknown = set(refuse) - OPTIONS.keys()
    if unknown:
        raise ValueError(f"refuse names no option: {sorted(unknown)}")
    values = {name: o.default for name, o in OPTIONS.items()}
    values.update(overrides or {})
    # By name, so a repeated FUSE option is passed once, the last one given winning as in mount(8).
    fuse: dict[str, str] = {}
    given: set[str] = set()
    for item in split(opts):
        name, eq, text = item.partition("=")
        if name.startswith("x-") or name.startswith("comment"):
            continue
        opt = OPTIONS.get(name)
        if opt is None:
            if allow_fuse and name == "rw":
                fuse.pop("ro", None)
                continue
            if allow_fuse and name in MOUNT_IGNORED:
                continue
            if allow_fuse and (name in FUSE_PASSTHROUGH or name in FUSE_REFUSED):
                fuse[name] = _fuse_option(name, eq, text)
                continue
            raise OptionError(f"unknown option {shown(name)!r}")
        if name in refuse:
            raise OptionError(f"option {name} does not apply to this command")
        if not eq:
            if not opt.flag:
                raise OptionError(f"option {name!r} needs a value ({name}=...: {opt.help})")
            text = "on"
        if not opt.path and not text.isascii():
            raise OptionError(
                f"option {name}={shown(text)}: only ASCII characters are accepted (digits 0-9)"
            )
        try:
            values[name] = opt.parse(text)
        except (ValueError, UsageError) as e:  # int()/float() raise ValueError, ours UsageError
            raise OptionError(f"option {name}={shown(text)}: {e}") from None
        given.add(name)
    for name in sorted(given, key=list(OPTIONS).index):
        needs = OPTIONS[name].needs
        if needs is not None and needs != "kernel" and values[needs] is None:
            raise OptionError(f"option {name} applies only with {needs}=")
    return Parsed(MappingProxyType(values), tuple(fuse.values()), frozenset(given))
