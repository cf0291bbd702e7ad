"""The kernel log's NVMe error lines, as /dev/kmsg hands them out: parsed and paired, no I/O.

What the kernel prints for a failed request (Linux drivers/nvme/host/core.c, block/blk-mq.c):
  - since 5.18, `nvme_log_error()`, once per request at its final completion (never for an
    attempt that is retried), rate limited:
        `<disk>: <op>(0x<opcode>) @ LBA <lba>, <n> blocks, <text> (sct 0x<sct> / sc 0x<sc>) `
    followed by `MORE ` and `DNR ` when those bits are set, and for admin commands
    `<ctrl>: <op>(0x<opcode>), <text> (sct 0x<sct> / sc 0x<sc>) ...`.
    Without CONFIG_NVME_VERBOSE_ERRORS (Debian's kernels) `<op>` is `I/O Cmd` / `Admin Cmd` and
    `<text>` is `I/O Error`: the numbers are what counts, and they are always there.
  - every kernel, the block layer, once per failed request:
        `[<caller>: ]<blk text> error, dev <disk>, sector <n> op 0x<op>:(<NAME>) flags ...`
    (5.10 prefixes the caller, `blk_update_request: `; the sector is in 512-byte units).
  - `<function>: N callbacks suppressed` where the rate limit dropped N lines.
The NVMe line comes first (the driver logs, then ends the request, and the block layer prints
as it ends), from the same CPU; lines of other requests may come between. `pair()` joins the two
lines of one request into one `Failure`, as the trace source joins a request's events.

A /dev/kmsg record is `<prio>,<seq>,<usec>,<flags>[,...];<message>\\n` followed by continuation
lines that start with a space (`KEY=value` dictionary). Nothing parses these formats for us (they
are the kernel's printk strings, not a protocol a library covers), so the three line shapes are
matched here with anchored regular expressions, one per format string.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from nvmefs.nvme.tables import BLK_STATUS_INFO

# The status field bits nvme_log_error prints as words: More (bit 13) and Do Not Retry (bit 14).
MORE_BIT = 0x2000
DNR_BIT = 0x4000
# How far apart (kernel time) the NVMe line and the block line of one request may be.
PAIR_WINDOW_USEC = 1_000_000
# Requests whose NVMe line waits for its block line, at most (a kernel that prints no block line
# for them - passthrough, RQF_QUIET - must not make us hold every line of the log).
PENDING_MAX = 4096

_RECORD = re.compile(rb"(\d+),(\d+),(\d+),[^;]*;")
_IO = re.compile(
    r"(?P<disk>nvme\d+(?:c\d+)?n\d+): (?P<opname>.+?)\(0x(?P<opcode>[0-9a-f]+)\) "
    r"@ LBA (?P<lba>\d+), (?P<blocks>\d+) blocks, (?P<text>.*?) "
    r"\(sct 0x(?P<sct>[0-9a-f]+) / sc 0x(?P<sc>[0-9a-f]+)\) ?(?P<more>MORE )?(?P<dnr>DNR )?"
)
_ADMIN = re.compile(
    r"(?P<ctrl>nvme\d+): (?P<opname>.+?)\(0x(?P<opcode>[0-9a-f]+)\), (?P<text>.*?) "
    r"\(sct 0x(?P<sct>[0-9a-f]+) / sc 0x(?P<sc>[0-9a-f]+)\) ?(?P<more>MORE )?(?P<dnr>DNR )?"
)
_BLOCK = re.compile(
    r"(?:(?P<caller>\w+): )?(?P<blk>[a-zA-Z][a-zA-Z /]*?) error, dev (?P<disk>nvme[0-9cn]+), "
    r"sector (?P<sector>\d+) op 0x(?P<op>[0-9a-f]+):\((?P<opname>[A-Z_]+)\)(?: .*)?"
)
_SUPPRESSED = re.compile(r"(?P<func>\w+): (?P<count>\d+) callbacks suppressed")
# blk_errors[] text -> blk_status name.
_BLK_BY_TEXT = {text: name for name, (text, _errno) in BLK_STATUS_INFO.items() if text}


@dataclass(frozen=True, slots=True)
class Record:
    """One /dev/kmsg record: its sequence number, kernel time (microseconds since boot) and
    message (the first line, without the continuation lines)."""

    seq: int
    usec: int
    message: str


@dataclass(frozen=True, slots=True)
class NvmeLine:
    """An `nvme_log_error` line. `name` is the disk (I/O) or the controller (admin)."""

    name: str
    admin: bool
    opcode: int
    status: int  # the status field as nvmefs keeps it: SC, SCT, More and DNR bits
    lba: int | None = None
    blocks: int | None = None


@dataclass(frozen=True, slots=True)
class BlockLine:
    """A block layer error line: the disk, the 512-byte sector, the request op and blk_status."""

    disk: str
    sector: int
    op: int
    opname: str
    blk_status: str


@dataclass(frozen=True, slots=True)
class Suppressed:
    """`<function>: N callbacks suppressed`: N lines the rate limit dropped, at `usec`."""

    function: str
    count: int
    usec: int = 0


@dataclass(frozen=True, slots=True)
class Failure:
    """One failed request as the kernel log tells it: from its NVMe line, its block line, or
    both. `status` is None when only the block line was printed (before 5.18, or a line lost
    to the rate limit); `blk_status` is None when only the NVMe line was (admin commands)."""

    usec: int
    seq: int
    name: str  # the disk (or the controller, admin)
    admin: bool = False
    opcode: int | None = None
    status: int | None = None
    lba: int | None = None
    blocks: int | None = None
    sector: int | None = None
    op: str | None = None  # the block layer's name of the request op (READ, WRITE...)
    blk_status: str | None = None


def parse_record(raw: bytes) -> Record | None:
    """The record of one read(2) of /dev/kmsg; None if it is not one."""
    m = _RECORD.match(raw)
    if m is None:
        return None
    message = raw[m.end() :].split(b"\n", 1)[0]
    return Record(int(m.group(2)), int(m.group(3)), message.decode("utf-8", "replace"))


def _status(m: re.Match[str]) -> int:
    word = int(m.group("sc"), 16) | int(m.group("sct"), 16) << 8
    if m.group("more"):
        word |= MORE_BIT
    if m.group("dnr"):
        word |= DNR_BIT
    return word


def classify(message: str) -> NvmeLine | BlockLine | Suppressed | None:
    """What a kernel log message is, of the lines above; None for every other message."""
    m = _IO.fullmatch(message.rstrip("\n"))
    if m is not None:
        return NvmeLine(
            m.group("disk"),
            False,
            int(m.group("opcode"), 16),
            _status(m),
            int(m.group("lba")),
            int(m.group("blocks")),
        )
    m = _ADMIN.fullmatch(message.rstrip("\n"))
    if m is not None:
        return NvmeLine(m.group("ctrl"), True, int(m.group("opcode"), 16), _status(m))
    m = _BLOCK.fullmatch(message.rstrip("\n"))
    if m is not None:
        blk = _BLK_BY_TEXT.get(m.group("blk"), "IOERR")
        return BlockLine(
            m.group("disk"), int(m.group("sector")), int(m.group("op"), 16), m.group("opname"), blk
        )
    m = _SUPPRESSED.fullmatch(message.rstrip("\n"))
    if m is not None:
        return Suppressed(m.group("func"), int(m.group("count")))
    return None


def pair(
    records: Iterable[Record], lba_size: Callable[[str], int | None]
) -> Iterator[Failure | Suppressed]:
    """The failed requests (and rate-limit gaps) of a stream of records, oldest first.

    A block line joins the newest NVMe line of the same disk still waiting, printed at most
    PAIR_WINDOW_USEC before it, whose LBA is its sector (in the disk's `lba_size(disk)` bytes,
    when that is known). NVMe lines that no block line joins are failures of their own (admin
    commands, passthrough), and so are block lines without an NVMe line (kernels before 5.18).
    Each request is yielded once, as soon as it is known (an NVMe line alone once its window
    has passed), so not always in time order: sort by `usec` for that. Memory is bounded by
    PENDING_MAX waiting lines."""
    waiting: list[tuple[Record, NvmeLine]] = []  # oldest first
    for rec in records:
        line = classify(rec.message)
        if line is None:
            continue
        while waiting and (
            rec.usec - waiting[0][0].usec > PAIR_WINDOW_USEC or len(waiting) > PENDING_MAX
        ):
            yield _from_nvme(*waiting.pop(0))
        if isinstance(line, Suppressed):
            yield Suppressed(line.function, line.count, rec.usec)
        elif isinstance(line, NvmeLine):
            if line.admin:
                yield _from_nvme(rec, line)
            else:
                waiting.append((rec, line))
        else:
            size = lba_size(line.disk)
            lba = line.sector * 512 // size if size else None
            match = None
            for i in range(len(waiting) - 1, -1, -1):
                _nrec, nline = waiting[i]
                if nline.name == line.disk and (lba is None or nline.lba == lba):
                    match = i
                    break
            yield _ended(rec, line, lba, None if match is None else waiting.pop(match))
    for rec, nline in waiting:
        yield _from_nvme(rec, nline)


def _ended(
    rec: Record, line: BlockLine, lba: int | None, nvme: tuple[Record, NvmeLine] | None
) -> Failure:
    """The request whose block line `line` (record `rec`) ended it, with the NVMe line that
    came before it, if one did: timed by its last line, numbered by its first."""
    if nvme is None:
        failure = Failure(rec.usec, rec.seq, line.disk, lba=lba)
    else:
        failure = dataclasses.replace(_from_nvme(*nvme), usec=rec.usec)
    return dataclasses.replace(
        failure, sector=line.sector, op=line.opname, blk_status=line.blk_status
    )


def _from_nvme(rec: Record, line: NvmeLine) -> Failure:
    return Failure(
        rec.usec,
        rec.seq,
        line.name,
        admin=line.admin,
        opcode=line.opcode,
        status=line.status,
        lba=line.lba,
        blocks=line.blocks,
    )
