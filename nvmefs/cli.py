"""The `nvmefs` command.

    nvmefs decode [--profile P] [--cqe] STATUS...   decode status words as JSON lines
    nvmefs decode --all                              every 15-bit status word
    nvmefs scrub SOURCE [-o OPTIONS]                 one pass over a source, errors to stdout
    nvmefs watch SOURCE [-o OPTIONS]                 logged entries to stdout until stopped
    nvmefs list [--json]                             NVMe controllers and namespaces
    nvmefs report [MOUNTPOINT | JOURNAL...] [--since T] [--json] [--svg FILE]
                                                     errors per namespace: counts by status,
                                                     an LBA map and errors over time
    nvmefs locate DISK LBA [--json] [--timeout S]    the partition, filesystem and file (and
                                                     its byte range) behind an LBA
    nvmefs SOURCE MOUNTPOINT [-o OPTIONS] [-f]       mount (mount.fuse calling convention)

Exit status: 0 success, 1 errors found (scrub), 2 usage or setup error.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
from collections.abc import Callable, Sequence

from nvmefs.errors import EXIT_OK, EXIT_USAGE, PROG, EngineError, NvmefsError, UsageError
from nvmefs.linux import devices
from nvmefs.nvme import tables
from nvmefs.nvme.policy import LogPolicy
from nvmefs.nvme.status import STATUS_MASK, Translator, parse_status
from nvmefs.options import ArgParser


def _decode_parser() -> ArgParser:
    p = ArgParser(
        prog=f"{PROG} decode", description="Decode NVMe status words as the kernel would."
    )
    p.add_argument("--profile", default=tables.DEFAULT_PROFILE, choices=tables.PROFILES)
    p.add_argument(
        "--cqe",
        action="store_true",
        help="arguments are raw 16-bit CQE status fields (phase tag in bit 0)",
    )
    p.add_argument("--all", action="store_true", help="decode every 15-bit status word")
    p.add_argument("status", nargs="*", metavar="STATUS", help="hex (0x281) or decimal")
    return p


def cmd_decode(argv: Sequence[str]) -> int:
    args = _decode_parser().parse_args(argv)
    if args.all and args.status:
        raise UsageError("give STATUS arguments or --all, not both")
    if not args.all and not args.status:
        raise UsageError("no STATUS given (or use --all)")
    words: list[tuple[int, int | None]] = []
    if args.all:
        words = [(w, None) for w in range(STATUS_MASK + 1)]
    else:
        for text in args.status:
            value = parse_status(text, cqe=args.cqe)
            words.append((value >> 1, value) if args.cqe else (value, None))
    translator = Translator(args.profile)
    default_policy = LogPolicy()
    out = sys.stdout
    for word, cqe in words:
        st = translator.decode(word)
        rec = {
            "status": f"0x{st.status:x}",
            "code": f"0x{st.code:x}",
            "sct": st.sct,
            "sc": st.sc,
            "crd": st.crd,
            "more": st.more,
            "dnr": st.dnr,
            "name": st.name,
            "blk_status": st.blk_status,
            "blk_string": st.blk_string,
            "errno": st.errno,
            "logged_by_default": default_policy.logs(word),
            "profile": st.profile,
        }
        if cqe is not None:
            rec["cqe_status"] = f"0x{cqe:x}"
            rec["phase"] = cqe & 1
        out.write(json.dumps(rec) + "\n")
    return EXIT_OK


def cmd_list(argv: Sequence[str]) -> int:
    p = ArgParser(
        prog=f"{PROG} list", description="NVMe controllers and namespaces nvmefs can use."
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    ctrls = devices.controllers()
    if args.json:
        print(json.dumps([dataclasses.asdict(c) for c in ctrls], indent=2))
        return EXIT_OK
    if not ctrls:
        print("no NVMe controllers found", file=sys.stderr)
        return EXIT_OK
    print(f"{'NODE':<12} {'SERIAL':<20} {'MODEL':<28} {'NSID':>4} {'SIZE':>12} {'LBA':>5}  GENERIC")
    for ctrl in ctrls:
        for ns in ctrl.namespaces or [None]:  # type: ignore[list-item]
            if ns is None:
                print(f"{ctrl.node:<12} {ctrl.serial:<20} {ctrl.model[:28]:<28}")
                continue
            print(
                f"{ctrl.node:<12} {ctrl.serial:<20} {ctrl.model[:28]:<28} {ns.nsid:>4} "
                f"{ns.size:>12} {ns.lba_size:>5}  {ns.generic}"
            )
    return EXIT_OK


# Each command's function, by module and name: a module is imported only when its command runs
# (the engine, trio and FUSE take seconds to import on a slow machine; decode needs none).
COMMANDS = {
    "decode": ("nvmefs.cli", "cmd_decode"),
    "scrub": ("nvmefs.console", "cmd_scrub"),
    "watch": ("nvmefs.console", "cmd_watch"),
    "list": ("nvmefs.cli", "cmd_list"),
    "report": ("nvmefs.report", "cmd_report"),
    "locate": ("nvmefs.locate", "cmd_locate"),
}
MOUNT = ("nvmefs.daemon", "cmd_mount")  # anything else: SOURCE MOUNTPOINT


def command(name: str) -> Callable[[Sequence[str]], int]:
    """The function of command `name` (or of the mount), its module imported now."""
    module, func = COMMANDS.get(name, MOUNT)
    fn: Callable[[Sequence[str]], int] = getattr(importlib.import_module(module), func)
    return fn


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv or argv[0] in ("-h", "--help"):
            print(__doc__.strip())
            return EXIT_OK if argv else EXIT_USAGE
        if argv[0] in COMMANDS:
            try:
                return command(argv[0])(argv[1:])
            except (UsageError, EngineError) as e:
                raise UsageError(f"{argv[0]}: {e}") from None
        return command("")(argv)
    except NvmefsError as e:  # usage, setup and bring-up errors: one line, never a traceback
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # `nvmefs decode --all | head`: the reader left, which is not an error of ours.
        sys.stderr.close()
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
