"""The kernel source's consumer of trace pages: decode, pair, count; hand back only what is logged.

Theory of operation
- nvme:nvme_complete_rq fires for every attempt of a request; block:block_rq_complete fires once,
  at the request's final completion, right after its last nvme_complete_rq and on the same CPU
  (same call chain: nvme_complete_rq -> nvme_end_req -> blk_mq_end_request). So `Pairing` keeps
  each CPU's last failed attempt: the block event that follows on that CPU makes it final; the
  next attempt on that CPU, or `expire()` after a grace period, means it was retried. A success
  (seen only when the in-kernel filter lets successes through: log=all) is final at once, and
  so is a failed admin (qid 0) or user passthrough (flags USER_CMD) attempt: the driver marks
  those requests REQ_FAILFAST_DRIVER, never retried, and since 6.x their block event carries no
  error (the in-kernel filter, `error != 0`, drops it: on 6.12 they were lost waiting for it).
- A consumer takes one CPU's trace_pipe_raw pages (`feed`), counts every attempt by (controller,
  disk, status word) and every request that ended failing by (controller, disk or dev, admin,
  status word), and returns only the `Final`s the log policy keeps (its 2048-entry table, as
  `LogPolicy.table`), with the page's lost-events word. `take_counts()` hands the counters over.
  A retried attempt comes back when the policy keeps it and log_attempts is on, or when its
  status is in the `watch` table (same indexing) whatever the policy: the kernel source watches
  path errors, which native multipath fails over to another path instead of retrying, and
  decides that itself.
- A fold (`fold`, the kernel source's in a storm): the finals `Like` the entry that opened the
  sink's fold are counted, with their LBA range, instead of handed back (`Fed.folded`), from
  the start of a page until the first final that does go back (what Python does with that one
  may end the fold), and not in a page that follows a loss (logging it ends the fold).
- Two implementations with one behaviour: `CompiledConsumer` (tracebulk.c, built by cffi as
  nvmefs.linux.tracebulkext) and `PythonConsumer` (tracefs.parse_page and EventFormat.decode),
  the fallback when the module was not built. `consumer()` picks one; `unavailable()` says why
  the compiled one cannot be used. The same pages give the same finals and counters from both
  (tests/linux/test_tracebulk.py), hostile pages included.
- Pages are hostile input. A record of one of the two events too short for the fields read is
  `malformed`: counted, otherwise ignored (it neither pairs nor supersedes). Whatever a page
  holds, `feed` raises only ValueError, for a cpu or a page length out of range (caller errors),
  and the compiled one OSError(ENOMEM) if a new CPU's slot cannot be allocated.
"""

from __future__ import annotations

import errno
import os
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from nvmefs.linux import tracefs
from nvmefs.linux.tracefs import EventFormat, TraceError
from nvmefs.nvme.status import SCT_SC_MASK

try:
    from nvmefs.linux.tracebulkext import ffi, lib

    _WHY_NOT: str | None = None
except ImportError as e:
    ffi = lib = None
    if isinstance(e, ModuleNotFoundError) and e.name == "nvmefs.linux.tracebulkext":
        # Built without it (setup.py: no C compiler or Python headers), or a checkout used
        # without `pip install`.
        _WHY_NOT = (
            "nvmefs was installed without its compiled trace consumer (a C compiler or Python's"
            " headers were missing when it was built)"
        )
    else:
        _WHY_NOT = f"the compiled trace consumer does not load ({e})"

NVME_FIELDS = ("disk", "ctrl_id", "qid", "cid", "retries", "flags", "status")
BLOCK_FIELDS = ("dev", "sector", "nr_sector", "error", "rwbs")
STRINGS = {"disk": 64, "rwbs": 16}  # string fields and their longest size (tracebulk.c's too)
PAGE_MAX = 65536  # the longest page `feed` takes: 64 KiB, the largest base page of Linux
CPU_MAX = 65536
GRACE_S = 1.0  # an attempt with no block event after this long was retried
_M64 = (1 << 64) - 1

FINAL = "final"  # a request's last attempt: with its block event, or alone (admin, passthrough)
USER_CMD = 0x2  # NVME_REQ_USERCMD in an attempt's flags: a passthrough command from userspace
SUCCESS = "success"  # a successful attempt: final at once, no block event
RETRIED = "retried"  # an attempt that was retried: handed back if watched, or logged
_KINDS = (FINAL, SUCCESS, RETRIED, FINAL)  # by tracebulk.c's NVMEFS_TB_* number (3: alone)


def unavailable() -> str | None:
    """Why the compiled consumer cannot be used here, or None when it can."""
    return _WHY_NOT


def available() -> bool:
    return _WHY_NOT is None


@dataclass(slots=True)
class Attempt:
    """One nvme_complete_rq record: one attempt of a request."""

    cpu: int
    ctrl_id: int
    disk: str
    qid: int
    cid: int
    retries: int
    flags: int
    status: int
    seen: float  # monotonic seconds: the `now` of the feed that brought it


@dataclass(slots=True)
class BlockEnd:
    """One block_rq_complete record: a request's final completion."""

    dev: int
    sector: int
    nr_sector: int
    error: int
    rwbs: str


class Pairing:
    """Each CPU's last attempt, made final by the block event that follows it on that CPU.

    Invariant: at most one pending attempt per CPU; every attempt given to `attempt()` comes
    back exactly once, from `block()` (final) or as superseded/expired (it was retried)."""

    def __init__(self) -> None:
        self.pending: dict[int, Attempt] = {}

    def attempt(self, a: Attempt) -> Attempt | None:
        """Note `a`; returns the attempt it supersedes on its CPU (that one was retried)."""
        old = self.pending.get(a.cpu)
        self.pending[a.cpu] = a
        return old

    def block(self, cpu: int) -> Attempt | None:
        """A block event on `cpu`: the attempt it ends, if one is pending there."""
        return self.pending.pop(cpu, None)

    def other(self, cpu: int) -> Attempt | None:
        """Any other event on `cpu`: the pending attempt there was not final."""
        return self.pending.pop(cpu, None)

    def expire(self, now: float, grace: float = GRACE_S) -> list[Attempt]:
        """The attempts pending `grace` seconds or more, removed, in CPU order."""
        old = sorted(
            (a for a in self.pending.values() if now - a.seen >= grace), key=lambda a: a.cpu
        )
        for a in old:
            del self.pending[a.cpu]
        return old


@dataclass(frozen=True, slots=True)
class Final:
    """An attempt the log policy keeps: FINAL (with its block event), SUCCESS or RETRIED."""

    kind: str
    attempt: Attempt
    block: BlockEnd | None


@dataclass(frozen=True, slots=True)
class Like:
    """The finals a fold counts (`Consumer.fold`): those of the same controller, disk, status
    word, admin (qid 0) and user-passthrough flag, with a block event of the same dev and rwbs
    (`block`), or none (None: a success, or a failed admin or passthrough attempt); all an
    entry of the kernel source holds but its LBA, blocks, cid, qid and retries. `lba_sectors`:
    512-byte sectors per LBA of the disk, by which a folded block event's LBAs are made (0:
    they have none)."""

    ctrl_id: int
    disk: str
    status: int
    admin: bool
    user: bool
    block: tuple[int, str] | None
    lba_sectors: int = 0

    @property
    def kind(self) -> int:
        """tracebulk.c's NVMEFS_TB_* kind of the finals it takes: final, success or alone."""
        return 0 if self.block is not None else 1 if self.status == 0 else 3

    def takes(self, kind: str, a: Attempt, b: BlockEnd | None) -> bool:
        """Whether a final (`kind`, `a`, `b`, as in Final) is one this takes, as tracebulk.c's
        like() decides: integers compared as the 64-bit words it holds."""
        if b is None:
            if self.kind != (1 if kind == SUCCESS else 3):
                return False
        elif self.block is None or (self.block[0] - b.dev) & _M64 or self.block[1] != b.rwbs:
            return False
        return (
            (self.ctrl_id - a.ctrl_id) & _M64 == 0
            and (self.status - a.status) & _M64 == 0
            and self.admin == (a.qid == 0)
            and self.user == bool(a.flags & USER_CMD)
            and self.disk == a.disk
        )


@dataclass(frozen=True, slots=True)
class Folded:
    """What a fold counted in one feed: `n` finals; over those with an LBA, the lowest first
    LBA and the highest last LBA (first + blocks - 1, blocks at least 1), or None for none."""

    n: int
    lo: int | None
    hi: int | None


class Fed(NamedTuple):
    """What one page gave: its lost-events word (0 none, -1 lost but not counted, else how
    many were lost before it), what the fold counted (None: nothing), and its finals, in
    record order. Every folded final came before the first of `finals`."""

    lost: int
    finals: list[Final]
    folded: Folded | None = None


AttemptKey = tuple[int, str, int]  # (ctrl_id, disk, status word)
# (ctrl_id, disk, dev, admin, status word); dev is 0 when the attempt named its disk (it is
# looked up by name then), admin means qid 0 (no namespace).
FailedKey = tuple[int, str, int, bool, int]


@dataclass
class Counts:
    """Counters since the last `take_counts()`: every attempt, every failed request, every
    retried attempt; records too short to read; pages that said events were lost."""

    attempts: Counter[AttemptKey] = field(default_factory=Counter)
    failed: Counter[FailedKey] = field(default_factory=Counter)
    retried: int = 0
    malformed: int = 0
    lost_pages: int = 0  # pages whose header said events were lost before them
    lost_events: int = 0  # the sum of the counts those pages stored (some store none)


def check_formats(nvme: EventFormat, block: EventFormat) -> None:
    """Refuse (TraceError) formats either consumer could not read the same way: a missing
    field, an integer field not 1-8 bytes, a string field not an array within its maximum."""
    nvme.require(*NVME_FIELDS)
    block.require(*BLOCK_FIELDS)
    for fmt, names in ((nvme, NVME_FIELDS), (block, BLOCK_FIELDS)):
        if not 0 <= fmt.id <= 0xFFFF:
            raise TraceError(f"{fmt.system}:{fmt.name}: event id {fmt.id} is not a u16")
        for n in names:
            f = fmt.fields[n]
            longest = STRINGS.get(n)
            ok = (
                f.array and 1 <= f.size <= longest
                if longest is not None
                else not f.array and 1 <= f.size <= 8
            )
            if not ok or not 0 <= f.offset < 1 << 31:
                raise TraceError(
                    f"{fmt.system}:{fmt.name}: field {n} (offset {f.offset}, size {f.size}) is"
                    " not one nvmefs can read"
                )


def _need(fmt: EventFormat, names: tuple[str, ...]) -> int:
    """The length a record needs for every field read (and its common_type)."""
    return max([2, *(fmt.fields[n].offset + fmt.fields[n].size for n in names)])


class Consumer(Protocol):
    """What the kernel source uses, whichever implementation runs."""

    impl: str  # "compiled" or "python"

    def configure(self, keep: bytes, log_attempts: bool, watch: bytes | None = None) -> None: ...
    def fold(self, like: Like | None) -> None: ...
    def feed(self, cpu: int, page: bytes, now: float | None = None) -> Fed: ...
    def expire(self, now: float, grace: float = GRACE_S) -> list[Final]: ...
    def pending(self) -> int: ...
    def take_counts(self) -> Counts: ...


class _Base:
    """What both implementations share: argument checks and the lost-page bookkeeping.

    Invariant: `_counts` holds what was counted since the last take_counts() and is not yet in
    the implementation's own counters."""

    impl = ""

    def __init__(
        self,
        nvme: EventFormat,
        block: EventFormat,
        keep: bytes,
        log_attempts: bool = False,
        watch: bytes | None = None,
    ) -> None:
        check_formats(nvme, block)
        self._nvme, self._block = nvme, block
        self._counts = Counts()
        self._like: Like | None = None
        self.configure(keep, log_attempts, watch)

    def configure(self, keep: bytes, log_attempts: bool, watch: bytes | None = None) -> None:
        """The log policy's table (nonzero at the SCT/SC codes it logs), whether retried
        attempts are logged too, and the codes of retried attempts handed back whatever the
        policy (none by default): from the next record on."""
        watch = bytes(SCT_SC_MASK + 1) if watch is None else watch
        for name, table in (("keep", keep), ("watch", watch)):
            if len(table) != SCT_SC_MASK + 1:
                raise ValueError(f"a {name} table has {SCT_SC_MASK + 1} entries, not {len(table)}")
        self._configure(bytes(keep), log_attempts, bytes(watch))

    def feed(self, cpu: int, page: bytes, now: float | None = None) -> Fed:
        """Take one trace_pipe_raw page of `cpu`, read at `now` (monotonic seconds; default:
        now). ValueError for a cpu outside [0, CPU_MAX) or a page longer than PAGE_MAX."""
        if not 0 <= cpu < CPU_MAX:
            raise ValueError(f"cpu {cpu} out of range")
        if len(page) > PAGE_MAX:
            raise ValueError(f"a trace page of {len(page)} bytes (at most {PAGE_MAX})")
        lost, finals = self._feed(cpu, page, time.monotonic() if now is None else now)
        if lost:
            self._counts.lost_pages += 1
            if lost > 0:
                self._counts.lost_events += lost
        folded = self._take_folded() if self._like is not None else None
        return Fed(lost, finals, folded if folded is not None and folded.n else None)

    def fold(self, like: Like | None) -> None:
        """From the next feed on, count the finals `like` takes instead of handing them back
        (None: fold nothing); a feed's count comes in its `Fed.folded`. A feed folds nothing
        of a page that says events were lost before it, nor any final after the first it
        hands back: what the kernel source does with those may end its fold."""
        if like is not None and not (like.disk.isascii() and (like.block or (0, ""))[1].isascii()):
            like = None  # the C side compares bytes, this side strings: one answer for ASCII
        self._like = like
        self._set_fold(like)

    def take_counts(self) -> Counts:
        """The counters since the last call; they start again from zero."""
        self._drain()
        counts, self._counts = self._counts, Counts()
        return counts

    def _configure(self, keep: bytes, log_attempts: bool, watch: bytes) -> None:
        raise NotImplementedError

    def _feed(self, cpu: int, page: bytes, now: float) -> tuple[int, list[Final]]:
        raise NotImplementedError

    def _drain(self) -> None:
        raise NotImplementedError

    def _set_fold(self, like: Like | None) -> None:
        raise NotImplementedError

    def _take_folded(self) -> Folded | None:
        raise NotImplementedError


class PythonConsumer(_Base):
    """The consumer in Python: tracefs.parse_page, EventFormat.decode and `Pairing`."""

    impl = "python"

    def __init__(
        self,
        nvme: EventFormat,
        block: EventFormat,
        keep: bytes,
        log_attempts: bool = False,
        watch: bytes | None = None,
    ) -> None:
        self.pairing = Pairing()
        self._folding = False  # within a feed: the fold still counts (see _Base.fold)
        self._folded = Folded(0, None, None)
        super().__init__(nvme, block, keep, log_attempts, watch)
        self._nvme_need = _need(nvme, NVME_FIELDS)
        self._block_need = _need(block, BLOCK_FIELDS)

    def _configure(self, keep: bytes, log_attempts: bool, watch: bytes) -> None:
        self._keep = keep
        self._watch = watch
        self._log_attempts = log_attempts

    def pending(self) -> int:
        return len(self.pairing.pending)

    def expire(self, now: float, grace: float = GRACE_S) -> list[Final]:
        """Attempts that waited `grace` seconds or more with no block event were retried:
        counted, and handed back when watched, or with log_attempts when kept."""
        out: list[Final] = []
        for a in self.pairing.expire(now, grace):
            self._superseded(a, out)
        return out

    def _drain(self) -> None:
        pass  # counted straight into _counts

    def _set_fold(self, like: Like | None) -> None:
        self._folded = Folded(0, None, None)

    def _take_folded(self) -> Folded | None:
        folded, self._folded = self._folded, Folded(0, None, None)
        return folded

    def _emit(self, kind: str, a: Attempt, b: BlockEnd | None, out: list[Final]) -> None:
        if not self._keep[a.status & SCT_SC_MASK]:
            return
        like = self._like
        if self._folding and like is not None and like.takes(kind, a, b):
            self._fold_in(like.lba_sectors, b)
            return
        self._folding = False
        out.append(Final(kind, a, b))

    def _fold_in(self, lba_sectors: int, b: BlockEnd | None) -> None:
        # As tracebulk.c's fold_in: the fields' values as unsigned 64-bit words.
        n, lo, hi = self._folded.n + 1, self._folded.lo, self._folded.hi
        if b is not None and lba_sectors and b.sector & _M64 != _M64:
            slba = (b.sector & _M64) // lba_sectors
            last = slba + ((b.nr_sector & _M64) // lba_sectors or 1) - 1
            lo = slba if lo is None or slba < lo else lo
            hi = last if hi is None or last > hi else hi
        self._folded = Folded(n, lo, hi)

    def _superseded(self, a: Attempt | None, out: list[Final]) -> None:
        if a is None:
            return
        self._counts.retried += 1
        code = a.status & SCT_SC_MASK
        if self._watch[code] or (self._log_attempts and self._keep[code]):
            self._folding = False
            out.append(Final(RETRIED, a, None))

    def _feed(self, cpu: int, page: bytes, now: float) -> tuple[int, list[Final]]:
        lost, records = tracefs.parse_page(page)
        self._folding = self._like is not None and not lost
        out: list[Final] = []
        nvme, block, counts, pairing = self._nvme, self._block, self._counts, self.pairing
        for rec in records:
            kind = tracefs.record_type(rec)
            if kind == nvme.id:
                if len(rec) < self._nvme_need:
                    counts.malformed += 1
                    continue
                f = nvme.decode(rec, NVME_FIELDS)
                a = Attempt(cpu, int(f["ctrl_id"]), str(f["disk"]), int(f["qid"]), int(f["cid"]),
                            int(f["retries"]), int(f["flags"]), int(f["status"]), now)  # fmt: skip
                counts.attempts[(a.ctrl_id, a.disk, a.status)] += 1
                if a.status == 0:  # a success is final at once (and only seen under log=all)
                    self._superseded(pairing.other(cpu), out)
                    self._emit(SUCCESS, a, None, out)
                    continue
                if a.qid == 0 or a.flags & USER_CMD:  # never retried: final at once
                    self._superseded(pairing.other(cpu), out)
                    counts.failed[(a.ctrl_id, a.disk, 0, a.qid == 0, a.status)] += 1
                    self._emit(FINAL, a, None, out)
                    continue
                self._superseded(pairing.attempt(a), out)
            elif kind == block.id:
                if len(rec) < self._block_need:
                    counts.malformed += 1
                    continue
                a2 = pairing.block(cpu)
                if a2 is None:
                    continue  # no attempt waits on this CPU: not a request to pair
                g = block.decode(rec, BLOCK_FIELDS)
                b = BlockEnd(int(g["dev"]), int(g["sector"]), int(g["nr_sector"]),
                             int(g["error"]), str(g["rwbs"]))  # fmt: skip
                if a2.status & SCT_SC_MASK:
                    key = (a2.ctrl_id, a2.disk, 0 if a2.disk else b.dev, a2.qid == 0, a2.status)
                    counts.failed[key] += 1
                self._emit(FINAL, a2, b, out)
        return lost, out


_A_INTS = ("ctrl_id", "qid", "cid", "retries", "flags", "status")  # tracebulk.c's order
_B_INTS = ("dev", "sector", "nr_sector", "error")


def _s64(v: int) -> int:
    """A 64-bit word's value as the C side's int64_t holds it."""
    v &= _M64
    return v - (1 << 64) if v >> 63 else v


def _final_struct(unsigned: set[str]) -> struct.Struct | None:
    """struct nvmefs_tb_final as a struct format (the fields named in `unsigned` read as
    unsigned), or None if this compiler laid it out otherwise."""
    q = "".join("Q" if n in unsigned else "q" for n in _A_INTS)
    r = "".join("Q" if n in unsigned else "q" for n in _B_INTS)
    st = struct.Struct(f"<I4xd{q}II64s{r}I16s4x")
    final, attempt, block = (
        "struct nvmefs_tb_final",
        "struct nvmefs_tb_attempt",
        "struct nvmefs_tb_block",
    )
    laid_out = (
        st.size == ffi.sizeof(final)
        and (ffi.offsetof(final, "a"), ffi.offsetof(final, "b")) == (8, 136)
        and (ffi.offsetof(attempt, "disk"), ffi.offsetof(block, "rwbs")) == (64, 36)
    )
    return st if laid_out else None


def _out_cap(page_len: int) -> int:
    """Finals one page of `page_len` bytes can give at most (tracebulk.c's check)."""
    return 2 * (page_len // 4 + 2)


class CompiledConsumer(_Base):
    """The consumer in C (tracebulk.c). OSError if the module is not there (see unavailable()).

    Invariant: the C side's counters are drained into `_counts` before they could overflow
    (a feed it refuses with ENOSPC is fed again after a drain)."""

    impl = "compiled"

    def __init__(
        self,
        nvme: EventFormat,
        block: EventFormat,
        keep: bytes,
        log_attempts: bool = False,
        watch: bytes | None = None,
    ) -> None:
        if lib is None:
            raise OSError(0, _WHY_NOT)
        check_formats(nvme, block)
        fmts = ffi.new("struct nvmefs_tb_formats *")
        fmts.nvme_id, fmts.block_id = nvme.id, block.id
        for fmt, names in ((nvme, NVME_FIELDS), (block, BLOCK_FIELDS)):
            for n in names:
                f, dst = fmt.fields[n], getattr(fmts, n)
                dst.offset, dst.size, dst.is_signed = f.offset, f.size, int(f.signed)
        c = lib.nvmefs_tb_new(fmts)
        if c == ffi.NULL:
            err = ffi.errno
            raise OSError(err, f"compiled trace consumer: {os.strerror(err)}")
        self._c: Any = ffi.gc(c, lib.nvmefs_tb_free)
        # Integers come back as 64-bit words, sign-extended: an unsigned 8-byte field is read
        # back unsigned ("Q"), any other as signed ("q"), which gives each field's own value.
        unsigned = {
            n
            for fmt, names in ((nvme, NVME_FIELDS), (block, BLOCK_FIELDS))
            for n in names
            if n not in STRINGS and fmt.fields[n].size == 8 and not fmt.fields[n].signed
        }
        self._mask = {n: _M64 if n in unsigned else -1 for n in (*_A_INTS, *_B_INTS)}
        self._final = _final_struct(unsigned)
        self._cap = _out_cap(4096)
        self._out: Any = ffi.new("struct nvmefs_tb_final[]", self._cap)
        self._lost: Any = ffi.new("int64_t *")
        self._totals: Any = ffi.new("struct nvmefs_tb_totals *")
        self._like_c: Any = ffi.new("struct nvmefs_tb_like *")
        self._folded_c: Any = ffi.new("struct nvmefs_tb_folded *")
        super().__init__(nvme, block, keep, log_attempts, watch)

    def _configure(self, keep: bytes, log_attempts: bool, watch: bytes) -> None:
        lib.nvmefs_tb_configure(self._c, keep, watch, int(log_attempts))

    def pending(self) -> int:
        return int(lib.nvmefs_tb_pending(self._c))

    def _room(self, cap: int) -> None:
        if cap > self._cap:
            self._cap = cap
            self._out = ffi.new("struct nvmefs_tb_final[]", cap)

    def _feed(self, cpu: int, page: bytes, now: float) -> tuple[int, list[Final]]:
        if not isinstance(page, bytes):
            page = bytes(page)  # cffi hands a bytes object to `const char *` without a copy
        self._room(_out_cap(len(page)))
        n = lib.nvmefs_tb_feed(self._c, cpu, page, len(page), now, self._out, self._cap, self._lost)
        if n == -errno.ENOSPC:  # the counter table is nearly full: empty it, feed again
            self._drain()
            n = lib.nvmefs_tb_feed(
                self._c, cpu, page, len(page), now, self._out, self._cap, self._lost
            )
        if n < 0:  # only ENOMEM is left once the arguments were checked
            raise OSError(-n, f"compiled trace consumer: {os.strerror(-n)}")
        return int(self._lost[0]), self._finals(n)

    def expire(self, now: float, grace: float = GRACE_S) -> list[Final]:
        """Attempts that waited `grace` seconds or more with no block event were retried:
        counted, and handed back when watched, or with log_attempts when kept."""
        self._room(self.pending())
        n = lib.nvmefs_tb_expire(self._c, now, grace, self._out, self._cap)
        if n < 0:
            raise OSError(-n, f"compiled trace consumer: {os.strerror(-n)}")
        return self._finals(n)

    def _finals(self, n: int) -> list[Final]:
        if not n:
            return []
        if self._final is None:
            return self._finals_slow(n)
        # One unpack per final, not a cffi access per field: in a storm every request is one.
        out = []
        for (kind, seen, ctrl, qid, cid, retries, flags, status, cpu, dlen, disk,
             dev, sector, nr, err, rlen, rwbs) in self._final.iter_unpack(
            ffi.buffer(self._out, n * self._final.size)
        ):  # fmt: skip
            a = Attempt(cpu, ctrl, disk[:dlen].decode(errors="replace"), qid, cid, retries,
                        flags, status, seen)  # fmt: skip
            b = None
            if kind == 0:  # NVMEFS_TB_FINAL: with its block event
                b = BlockEnd(dev, sector, nr, err, rwbs[:rlen].decode(errors="replace"))
            out.append(Final(_KINDS[kind], a, b))
        return out

    def _finals_slow(self, n: int) -> list[Final]:
        """The same as _finals(), field by field (a C layout the struct format does not fit)."""
        m = self._mask
        out = []
        for i in range(n):
            f = self._out[i]
            a = f.a
            attempt = Attempt(
                a.cpu,
                a.ctrl_id & m["ctrl_id"],
                ffi.unpack(a.disk, a.disk_len).decode(errors="replace"),
                a.qid & m["qid"],
                a.cid & m["cid"],
                a.retries & m["retries"],
                a.flags & m["flags"],
                a.status & m["status"],
                a.seen,
            )
            kind = _KINDS[f.kind]
            blk = None
            if f.kind == 0:  # NVMEFS_TB_FINAL: with its block event
                b = f.b
                blk = BlockEnd(
                    b.dev & m["dev"],
                    b.sector & m["sector"],
                    b.nr_sector & m["nr_sector"],
                    b.error & m["error"],
                    ffi.unpack(b.rwbs, b.rwbs_len).decode(errors="replace"),
                )
            out.append(Final(kind, attempt, blk))
        return out

    def _set_fold(self, like: Like | None) -> None:
        if like is None:
            lib.nvmefs_tb_fold(self._c, ffi.NULL)
            return
        dev, rwbs = like.block or (0, "")
        disk_b, rwbs_b = like.disk.encode(), rwbs.encode()
        lk = self._like_c
        lk.kind, lk.admin, lk.user = like.kind, like.admin, like.user
        # Back to the C side's 64-bit words (Python holds u64 fields unsigned).
        lk.ctrl_id, lk.status, lk.dev = (_s64(v) for v in (like.ctrl_id, like.status, dev))
        lk.disk_len, lk.rwbs_len = len(disk_b), len(rwbs_b)
        lk.disk, lk.rwbs = disk_b[: STRINGS["disk"]], rwbs_b[: STRINGS["rwbs"]]
        lk.lba_sectors = like.lba_sectors
        lib.nvmefs_tb_fold(self._c, lk)

    def _take_folded(self) -> Folded | None:
        f = self._folded_c
        lib.nvmefs_tb_take_folded(self._c, f)
        if not f.has_lba:
            return Folded(f.n, None, None)
        return Folded(f.n, f.lo, f.hi_carry << 64 | f.hi)

    def _drain(self) -> None:
        used = int(lib.nvmefs_tb_used(self._c))
        buf = ffi.new("struct nvmefs_tb_count[]", max(used, 1))
        n = lib.nvmefs_tb_take(self._c, buf, max(used, 1), self._totals)
        if n < 0:
            raise OSError(-n, f"compiled trace consumer: {os.strerror(-n)}")
        m = self._mask
        counts = self._counts
        for i in range(n):
            c = buf[i]
            ctrl = c.ctrl_id & m["ctrl_id"]
            disk = ffi.unpack(c.disk, c.disk_len).decode(errors="replace")
            status = c.status & m["status"]
            if c.kind == lib.NVMEFS_TB_ATTEMPT:
                counts.attempts[(ctrl, disk, status)] += c.n
            else:
                counts.failed[(ctrl, disk, c.dev & m["dev"], bool(c.admin), status)] += c.n
        counts.retried += self._totals.retried
        counts.malformed += self._totals.malformed


def consumer(
    nvme: EventFormat,
    block: EventFormat,
    keep: bytes,
    log_attempts: bool = False,
    watch: bytes | None = None,
    *,
    compiled: bool | None = None,
) -> Consumer:
    """A consumer of these formats: the compiled one when it is there (`compiled=None`), or the
    one asked for (`compiled=True`: OSError with the reason if it is not there)."""
    if compiled or (compiled is None and lib is not None):
        return CompiledConsumer(nvme, block, keep, log_attempts, watch)
    return PythonConsumer(nvme, block, keep, log_attempts, watch)
