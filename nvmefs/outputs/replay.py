"""Reading a journal back: its newest entries, checked field by field, at a bounded cost.

A journal is text another user may have had a hand in (or a crash cut short), so reading it
trusts nothing: files are read only if they are regular files of root's (through the journal's
checked directory, nvmefs/linux/safefiles.py), from the end a bounded block at a time, passing
over lines longer than MAX_LINE (counted) and lines that are blank or NUL bytes; every field of
a record is checked for its type and range before it becomes an entry, so the ring's renderers
never see one nvmefs would not have made. The cost is linear in what is read, the memory bounded
whatever the file holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from nvmefs.linux.safefiles import SafeDir, UnsafePath
from nvmefs.nvme import tables
from nvmefs.nvme.status import Translator
from nvmefs.store import events
from nvmefs.store.events import ORIGINS, OWNERS, HostEvent, NvmeEvent, Place
from nvmefs.store.render import RECORD_KEYS
from nvmefs.store.ring import EVENT, SEQ, Entry


def rotated(path: str, k: int) -> str:
    """The name of the k-th rotated file (k = 0 is the live one)."""
    return path if k == 0 else f"{path}.{k}"


# Bytes read at a time from a file's end when replaying.
READ_BLOCK = 1 << 20

# How every journal line starts (render.Renderer.record's first key).
RECORD_START = b'{"seq":'

# What a line may hold and still count as blank: NUL bytes are what a crash can leave at a
# file's end (blocks allocated, data never written).
BLANK = b" \t\r\n\0"


def tail_lines(fd: int, n: int) -> tuple[list[bytes], int]:
    """The last `n` complete lines of an open file (without newlines), oldest first, and how
    many lines longer than MAX_LINE were passed over among them. Reads from the end a block at
    a time and keeps at most MAX_LINE bytes of a line, so its cost is linear in what it reads
    and its memory bounded whatever the file holds. A last line without its newline is no line
    (the write that made it was cut short)."""
    pos = os.fstat(fd).st_size
    newest: list[bytes] = []  # newest first
    skipped = 0
    carry = b""  # the start of the line that the bytes already read begin inside
    over = False  # that line is longer than MAX_LINE: its bytes are not kept
    cut = True  # the next piece ended is what follows the file's last newline
    while pos > 0 and len(newest) < n + 1:
        step = min(READ_BLOCK, pos)
        pos -= step
        parts = (os.pread(fd, step, pos) + carry).split(b"\n")
        carry = parts[0]
        for line in reversed(parts[1:]):
            if cut:
                cut = False  # b"" after a final newline, or a line cut short
            elif over:
                skipped += 1
            else:
                newest.append(line)
            over = False
        if len(carry) > MAX_LINE:
            over, carry = True, b""
    if pos == 0 and not cut:  # the file's first line, whole (unless it was the cut one)
        if over:
            skipped += 1
        else:
            newest.append(carry)
    return newest[:n][::-1] if n else [], skipped


MAX_U64 = (1 << 64) - 1
MAX_I64 = (1 << 63) - 1
# A journal whose newest sequence number is past this is not continued: the run starts again at
# 1 (with a notice), long before the numbers could outgrow what replay and JSON readers take.
SEQ_RESTART = MAX_I64 - (1 << 32)
# A journal line longer than this is not one of ours (they are under 1 KiB): not parsed.
MAX_LINE = 64 << 10
# The ranges of a record's integer fields (the NVMe fields' own widths).
NVME_INTS = {
    "nsid": MAX_U64 >> 32,
    "qid": 0xFFFF,
    "cid": 0xFFFF,
    "opcode": 0xFF,
    "slba": MAX_U64,
    "nlb": MAX_U64 >> 32,
    "retries": MAX_U64 >> 32,
}
NVME_STRS = ("ctrl", "disk", "op")
_STATUS = re.compile(r"0x[0-9a-f]{1,4}")


def _no_constant(name: str) -> Any:
    # NaN and +-Infinity are not JSON (RFC 8259): a line holding them is not one nvmefs wrote,
    # and replayed they would make the JSON views emit them to strict parsers.
    raise ValueError(f"{name} is not JSON")


def _int(rec: dict[str, Any], key: str, lo: int, hi: int) -> int:
    value = rec[key]
    if type(value) is not int or not lo <= value <= hi:  # bool is an int too: not here
        raise ValueError(f"{key} is not an integer in {lo}..{hi}")
    return value


def _opt_int(rec: dict[str, Any], key: str, hi: int) -> int | None:
    return None if rec.get(key) is None else _int(rec, key, 0, hi)


def _opt_str(rec: dict[str, Any], key: str) -> str | None:
    value = rec.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{key} is not a string")
    return value


def _place(rec: dict[str, Any]) -> Place | None:
    """The Place a record holds (render.place_record), or None if it holds none; ValueError if
    what it holds is not one."""
    owner = rec.get("owner")
    if owner is None:
        return None
    if owner not in OWNERS:
        raise ValueError("owner is not one nvmefs writes")
    rng = rec.get("file_range")
    if rng is not None and not (
        isinstance(rng, list)
        and len(rng) == 2
        and all(type(x) is int and 0 <= x <= MAX_I64 for x in rng)
        and rng[0] <= rng[1]
    ):
        raise ValueError("file_range is not a byte range")
    return Place(
        owner,
        partition=_opt_str(rec, "partition"),
        fs=_opt_str(rec, "fs"),
        fs_block=_opt_int(rec, "fs_block", MAX_U64),
        file=_opt_str(rec, "file"),
        file_range=None if rng is None else (rng[0], rng[1]),
        reason=_opt_str(rec, "owner_reason"),
    )


class Replay:
    """Turns journal records back into ring entries, marked as replayed. Every field is
    checked for its type and range: a line that is not what nvmefs writes must not reach the
    ring, whose renderers trust their entries."""

    def __init__(self, profile: str) -> None:
        self.profile = profile
        self._translators: dict[str, Translator] = {}

    def _translator(self, profile: Any) -> Translator:
        name = profile if profile in tables.PROFILES else self.profile
        t = self._translators.get(name)
        if t is None:
            t = self._translators[name] = Translator(name)
        return t

    def entry(self, line: bytes) -> Entry:
        """The entry a journal line records; ValueError if it is not one."""
        if len(line) > MAX_LINE:
            raise ValueError("line too long")
        try:
            rec = json.loads(line, parse_constant=_no_constant)
        except RecursionError:  # nested beyond what the parser takes
            raise ValueError("nested too deep") from None
        if not isinstance(rec, dict):
            raise ValueError("not a JSON object")
        seq = _int(rec, "seq", 1, MAX_I64)
        mono = _int(rec, "monotonic_ns", 0, MAX_I64)
        wall = _int(rec, "wall_ns", 0, MAX_I64)
        kind = rec["kind"]
        if not isinstance(kind, str):
            raise ValueError("kind is not a string")
        event: NvmeEvent | HostEvent
        if kind == NvmeEvent.kind:
            word = rec["status"]
            if not isinstance(word, str) or not _STATUS.fullmatch(word) or int(word, 16) > 0x7FFF:
                raise ValueError("status is not a 15-bit word")
            status = self._translator(rec.get("profile")).decode(int(word, 16))
            event = NvmeEvent(status, replayed=True, admin=rec.get("admin") is True)
            for key, hi in NVME_INTS.items():
                setattr(event, key, _opt_int(rec, key, hi))
            for key in NVME_STRS:
                setattr(event, key, _opt_str(rec, key))
            event.place = _place(rec)
            # Absent from journals written before folding: an entry of its own.
            event.repeats = _opt_int(rec, "repeats", MAX_I64) or 0
            event.lba_range = events.lba_range(rec.get("lba_range"))
            if event.lba_range is not None and not event.repeats:
                raise ValueError("lba_range of an entry that folds nothing")
        else:
            message = rec["message"]
            if not isinstance(message, str):
                raise ValueError("message is not a string")
            fields = {k: v for k, v in rec.items() if k not in RECORD_KEYS}
            if not all(v is None or isinstance(v, str | int | float) for v in fields.values()):
                raise ValueError("a field is not a plain value")
            event = HostEvent(kind, message, fields, replayed=True)
        origin = rec.get("origin")
        event.origin = origin if origin in ORIGINS else None
        return (seq, mono, wall, event)


@dataclass
class History:
    """What replay found in a journal: the newest entries (oldest first), lines that did not
    parse or were too long, and rotated files passed over with the reason."""

    entries: list[Entry] = field(default_factory=list)
    bad: int = 0
    refused: list[str] = field(default_factory=list)


def read_newest(where: SafeDir, name: str, keep: int, capacity: int, profile: str) -> History:
    """The newest entries of the journal `name` in `where`: at most `capacity`, with
    consecutive sequence numbers, and none older than the newest clear (whose notice is the
    first): what the ring held when the journal ended. A file that is not a regular file of
    root's (a link, a FIFO, another user's) is not read; nor is a line over MAX_LINE."""
    replay = Replay(profile)
    found = History()
    newest = found.entries  # newest first while collecting
    for k in range(keep + 1):
        want = capacity - len(newest)
        if want <= 0:
            break
        try:
            fd = where.open_existing(rotated(name, k), os.O_RDONLY)
        except FileNotFoundError:
            # A rotation cut short by a kill leaves a gap in the names: the sequence numbers
            # say whether what follows it continues the history.
            continue
        except (UnsafePath, OSError) as e:
            found.refused.append(f"{rotated(name, k)}: {getattr(e, 'strerror', None) or e}")
            continue
        try:
            lines, skipped = tail_lines(fd, want + 16)  # a few spare for bad lines
        finally:
            os.close(fd)
        found.bad += skipped
        for line in reversed(lines):
            if not line.strip(BLANK):
                continue
            try:
                entry = replay.entry(line)
            except (ValueError, KeyError, TypeError):
                found.bad += 1
                continue
            if newest and entry[SEQ] != newest[-1][SEQ] - 1:
                found.entries = newest[::-1]  # a gap: what is older is not this run's history
                return found
            newest.append(entry)
            ev = entry[EVENT]
            if len(newest) == capacity or (
                isinstance(ev, HostEvent)
                and ev.kind == events.NOTICE
                and events.CLEARED in ev.fields
            ):
                found.entries = newest[::-1]
                return found
    found.entries = newest[::-1]
    return found


def is_record(line: bytes) -> bool:
    """Whether a line is a journal record: one replay takes, or one whose sequence number
    outgrew what replay takes (the journal is still ours: its run starts again at 1)."""
    if not line.startswith(RECORD_START):
        return False
    with contextlib.suppress(ValueError, KeyError, TypeError):
        Replay(tables.DEFAULT_PROFILE).entry(line)
        return True
    try:
        rec = json.loads(line)
    except (ValueError, RecursionError):
        return False
    return (
        isinstance(rec, dict)
        and type(rec.get("seq")) is int
        and rec["seq"] > MAX_I64
        and isinstance(rec.get("kind"), str)
    )
