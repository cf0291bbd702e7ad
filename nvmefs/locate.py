"""`nvmefs locate`: what owns an LBA of a disk - the partition, the filesystem mounted from it,
the filesystem block, and the file with the byte range of it that block holds (or metadata,
free space, or "not resolved" and why).

    nvmefs locate DISK LBA [--json] [--timeout S] [--max-files N]

LBA is in the disk's logical block size (as NVMe and the kernel's error lines count). The
lookup is nvmefs.linux.locate.locate: read-only, bounded by --timeout and --max-files.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from nvmefs.errors import UsageError
from nvmefs.linux import locate as resolver
from nvmefs.options import ArgParser, integer, shown
from nvmefs.store.render import escape, place_words

PROG = "nvmefs locate"


def _parser() -> ArgParser:
    p = ArgParser(prog=PROG, description="The partition, filesystem and file behind an LBA.")
    p.add_argument("disk", metavar="DISK", help="a block device: /dev/nvme0n1")
    p.add_argument("lba", metavar="LBA", help="in the disk's logical block size")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--timeout", default=str(resolver.TIMEOUT_S), metavar="S")
    p.add_argument("--max-files", default=str(resolver.MAX_FILES), metavar="N")
    return p


def _number(what: str, text: str, lo: int = 0) -> int:
    try:
        return integer(text, lo)
    except ValueError as e:
        raise UsageError(f"{what} {shown(text)}: {e}") from None


def render(loc: resolver.Location) -> str:
    """The plain lines of an answer, one per part; paths and reasons escaped as the text
    outputs escape them (a newline in a file name cannot make a line of its own)."""
    out = [f"disk {escape(loc.disk)}", f"lba {loc.lba} ({loc.lba_size}-byte blocks)"]
    if loc.partition is not None:
        out.append(f"partition {escape(loc.partition)} lba {loc.partition_lba}")
    if loc.fs is not None:
        out.append(f"fs {escape(loc.fs)} on {escape(loc.mountpoint or '')}")
    if loc.fs_block is not None:
        out.append(f"fs_block {loc.fs_block} ({loc.fs_block_size}-byte blocks)")
    if loc.owner == "file":  # as an entry's text line names it
        out.append(" ".join(["owner", *place_words(loc.place())]))
    elif loc.owner == "metadata":
        out.append(f"owner metadata ({escape(loc.reason)})" if loc.reason else "owner metadata")
    elif loc.owner == "free":
        out.append("owner free")
    else:
        out.append(f"owner not resolved: {escape(loc.reason or 'unknown')}")
    return "".join(line + "\n" for line in out)


def cmd_locate(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    lba = _number("LBA", args.lba)
    try:
        timeout = float(args.timeout)
    except ValueError:
        raise UsageError(f"--timeout {shown(args.timeout)}: not a number of seconds") from None
    if not 0 < timeout <= 3600:
        raise UsageError(f"--timeout {shown(args.timeout)}: expected 0 < S <= 3600")
    max_files = _number("--max-files", args.max_files, 1)
    if os.geteuid() != 0:
        raise UsageError("needs root: it reads the raw device and the filesystem's maps")
    loc = resolver.locate(args.disk, lba, timeout=timeout, max_files=max_files)
    if args.json:
        sys.stdout.write(json.dumps(loc.as_dict()) + "\n")
    else:
        sys.stdout.write(render(loc))
    return 0
