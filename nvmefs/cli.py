"""The `nvmefs` command.

    nvmefs decode [--profile P] [--cqe] STATUS...   decode status words as JSON lines
    nvmefs decode --all                              every 15-bit status word
    nvmefs scrub SOURCE [-o OPTIONS]                 one pass over a source, errors to stdout
    nvmefs SOURCE MOUNTPOINT [-o OPTIONS] [-f]       mount (mount.fuse calling convention)

Exit status: 0 success, 1 errors found (scrub), 2 usage or setup error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from nvmefs.nvme import tables
from nvmefs.nvme.policy import LogPolicy
from nvmefs.nvme.status import STATUS_MASK, StatusError, Translator, parse_status

PROG = "nvmefs"
EXIT_OK, EXIT_FOUND, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A one-line message for the user; exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _decode_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"{PROG} decode", description="Decode NVMe status words as the kernel would.")
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
        raise UsageError("decode: give STATUS arguments or --all, not both")
    if not args.all and not args.status:
        raise UsageError("decode: no STATUS given (or use --all)")
    words: list[tuple[int, int | None]] = []
    if args.all:
        words = [(w, None) for w in range(STATUS_MASK + 1)]
    else:
        for text in args.status:
            try:
                value = parse_status(text, cqe=args.cqe)
            except StatusError as e:
                raise UsageError(f"decode: {e}") from None
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


COMMANDS = {"decode": cmd_decode}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv or argv[0] in ("-h", "--help"):
            print(__doc__.strip())
            return EXIT_OK if argv else EXIT_USAGE
        command = COMMANDS.get(argv[0])
        if command is not None:
            return command(argv[1:])
        raise UsageError(f"unknown command {argv[0]!r} (try: {PROG} --help)")
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # `nvmefs decode --all | head`: the reader left, which is not an error of ours.
        sys.stderr.close()
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
