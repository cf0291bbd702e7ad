"""`nvmefs report`: the errors of a mount or of journals, per namespace, by status, with an LBA
map and errors over time: drawn in the terminal, as numbers (`--json`) or as SVG (`--svg`).

    nvmefs report [MOUNTPOINT | JOURNAL...] [--since T] [--json] [--svg FILE]

A MOUNTPOINT is read through its `nvme_circular_buffer.jsonl` (what the ring holds) and its
`stats` (the controller's serial number and model, which entries do not carry). A JOURNAL is
read with its rotated files, oldest first (PATH.k .. PATH.1, then PATH: outputs/replay.py names
them); naming the same file twice reads it once. A SOURCE (`sim`, `kernel`, a device) is
refused: its errors are what a mount of it records.

Memory is bounded whatever the inputs hold: lines are read one at a time, a line longer than
replay.MAX_LINE is passed over (counted as unreadable) without being held, and the summary is
bounded (store/summary.py). A last line without its newline is a write cut short, as replay
takes it: not read.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import secrets
import shutil
import stat
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nvmefs.errors import UsageError
from nvmefs.options import JOURNAL_KEEP_MAX, ArgParser, shown
from nvmefs.outputs.replay import BLANK, MAX_LINE, READ_BLOCK, rotated
from nvmefs.store import charts
from nvmefs.store.render import escape
from nvmefs.store.summary import Summary

PROG = "nvmefs report"
RING_JSON = "nvme_circular_buffer.jsonl"
STATS = "stats"
# Sources a mount takes (cli's SOURCE): not files to report on.
SOURCE_PREFIXES = ("sim", "kernel", "/dev/")
# Width when stdout is not a terminal.
PIPE_WIDTH = 80

_AGE = re.compile(r"([0-9]{1,9})([smhdw])")
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now_ns: int | None = None) -> int:
    """--since as wall-clock nanoseconds: an age before now (30m, 12h, 7d, 2w) or an ISO 8601
    date or time (2026-12-01, 2026-12-01T10:00, with Z or an offset; without one, UTC, as the
    report shows its times)."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    m = _AGE.fullmatch(text)
    if m:
        return max(0, now_ns - int(m.group(1)) * _AGE_UNITS[m.group(2)] * 1_000_000_000)
    try:
        if not text.isascii():
            raise ValueError  # fromisoformat takes other scripts' digits
        dt = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"--since {shown(text)}: expected an age (30m, 12h, 7d, 2w) or a date "
            "(2026-12-01, 2026-12-01T10:00Z)"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.UTC)
    return max(0, int(dt.timestamp()) * 1_000_000_000 + dt.microsecond * 1000)


@dataclass
class Inputs:
    """The files to read, oldest first, and the controllers' identities the mounts' stats
    gave (ctrl -> (serial, model))."""

    files: list[str] = field(default_factory=list)
    identities: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)


def _regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def read_stats(path: str) -> tuple[str, tuple[str | None, str | None]] | None:
    """A mount's controller and its (serial, model), from its `stats` file; None if it has
    no controller line."""
    try:
        with open(path, "rb") as f:
            text = f.read(1 << 20).decode("utf-8", "replace")
    except OSError:
        return None
    rows: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        rows.setdefault(key, value)
    if not rows.get("controller"):
        return None
    return rows["controller"], (rows.get("serial") or None, rows.get("model") or None)


def resolve(args: Sequence[str]) -> Inputs:
    """What the arguments name: a mount's JSON file (and its stats), or a journal with its
    rotated files; UsageError for anything else."""
    found = Inputs()
    for arg in args:
        try:
            st = os.stat(arg)
        except FileNotFoundError:
            if arg.startswith(SOURCE_PREFIXES):
                raise UsageError(
                    f"{escape(arg)}: a SOURCE is not read directly: report its mount's "
                    "MOUNTPOINT, or the journal the mount writes (-o journal=PATH)"
                ) from None
            raise UsageError(f"{escape(arg)}: no such file or directory") from None
        except OSError as e:
            raise UsageError(f"{escape(arg)}: {e.strerror}") from None
        if stat.S_ISDIR(st.st_mode):
            ring = os.path.join(arg, RING_JSON)
            if not _regular(ring):
                raise UsageError(f"{escape(arg)}: not an nvmefs mount (no {RING_JSON})")
            found.files.append(ring)
            ident = read_stats(os.path.join(arg, STATS))
            if ident is not None:
                found.identities[ident[0]] = ident[1]
        elif stat.S_ISREG(st.st_mode):
            older = [rotated(arg, k) for k in range(JOURNAL_KEEP_MAX, 0, -1)]
            found.files += [p for p in older if _regular(p)] + [arg]
        elif arg.startswith(SOURCE_PREFIXES):
            raise UsageError(
                f"{escape(arg)}: a SOURCE is not read directly: report its mount's MOUNTPOINT, "
                "or the journal the mount writes (-o journal=PATH)"
            )
        else:
            raise UsageError(f"{escape(arg)}: not a journal file or an nvmefs mount")
    return found


def lines(fd: int) -> Iterator[bytes | None]:
    """The complete lines of an open file (without blank ones), None for each line longer
    than MAX_LINE (not held: read past in MAX_LINE pieces); a last line without its newline is
    left out."""
    with open(fd, "rb", buffering=READ_BLOCK, closefd=False) as f:
        while True:
            line = f.readline(MAX_LINE + 1)
            if not line.endswith(b"\n"):
                if len(line) <= MAX_LINE:
                    return  # the end, or a last line cut short
                while line and not line.endswith(b"\n"):
                    line = f.readline(MAX_LINE + 1)
                yield None
                continue
            if line.strip(BLANK):
                yield line


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity: not what nvmefs writes


# One decoder for every line (json.loads with an option builds one per call).
_DECODER = json.JSONDecoder(parse_constant=_no_constant)


def records(paths: Sequence[str]) -> Iterator[Mapping[str, Any] | None]:
    """The records of the files, in order, one at a time; None for a line that is not a JSON
    object. A file seen already (the same inode named twice) is read once; one that is no
    longer a regular file when opened (replaced meanwhile) is refused."""
    seen: set[tuple[int, int]] = set()
    for path in paths:
        try:
            # O_NONBLOCK: a FIFO put in a file's place must not hang the open.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # rotated away since it was listed: its lines are in the next file
        except OSError as e:
            raise UsageError(f"{escape(path)}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UsageError(f"{escape(path)}: not a regular file")
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            for line in lines(fd):
                if line is None:
                    yield None
                    continue
                try:
                    rec = _DECODER.decode(line.decode())
                except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
                    rec = None
                yield rec if isinstance(rec, dict) else None
        finally:
            os.close(fd)


def _parser() -> ArgParser:
    p = ArgParser(
        prog=PROG,
        description="NVMe errors of a mount or of journals, per namespace: counts by status, "
        "an LBA map and errors over time.",
    )
    p.add_argument(
        "inputs", nargs="*", metavar="MOUNTPOINT|JOURNAL", help="a mount, or journal files"
    )
    p.add_argument("--since", metavar="T", help="only errors since T (7d, 12h, 2026-12-01)")
    p.add_argument("--json", action="store_true", help="the numbers as one JSON document")
    p.add_argument("--svg", metavar="FILE", help="write both charts as one SVG document")
    return p


def write_file(path: str, data: str) -> None:
    """Write `data` to `path` whole: a new file renamed into place, so a reader never sees
    half a chart."""
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(8)}.tmp"
    created = False
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            created = True
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        if created:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise UsageError(f"--svg {escape(path)}: {e.strerror or e}") from None


def build(args: Sequence[str], since_ns: int | None) -> Summary:
    """The summary of what the arguments name."""
    inputs = resolve(args)
    summary = Summary(since_ns=since_ns)
    for rec in records(inputs.files):
        summary.add(rec)
    for ctrl, (serial, model) in inputs.identities.items():
        summary.identify(ctrl, serial, model)
    return summary


def cmd_report(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    if not args.inputs:
        raise UsageError(
            "give a MOUNTPOINT or JOURNAL files (a SOURCE is not read directly: report its mount)"
        )
    since = None if args.since is None else parse_since(args.since)
    summary = build(args.inputs, since)
    if args.svg is not None:
        write_file(args.svg, charts.svg(summary))
    out = sys.stdout
    if args.json:
        out.write(json.dumps(summary.as_dict()) + "\n")
        return 0
    tty = out.isatty()
    width = shutil.get_terminal_size((PIPE_WIDTH, 24)).columns if tty else PIPE_WIDTH
    unicode = (getattr(out, "encoding", None) or "").lower().replace("-", "") == "utf8"
    out.write(charts.text(summary, width, colour=tty, unicode=unicode))
    return 0
