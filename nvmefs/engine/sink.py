"""The completion sink: where the completions of every source become counters and ring entries.

As every Linux transport ends in nvme_complete_rq(), every source of nvmefs ends here: the
register-level and passthrough engines (`complete`, per batch of attempts with an NVMe status),
the compiled loop (`successes`, counted in C), host-side ends (`host_error`, `timeout`...), and
the kernel source (`attempt`, `retried`, `final_failure`, `log`). Each attempt passes the
translator once; the kernel's disposition rule (nvme.disposition.decide) says whether a command
is done or retried; the log policy says which completions become entries (one per command at
its final disposition, or one per attempt with `log_attempts`).

Between the log policy and the ring (or `front`) stands the `Folder`: in a storm of like
failures (or of successes, under log=all) it folds the requests over FOLD_RATE into one entry
with an exact count (`repeats`), so that the per-entry work of every output stays bounded
whatever the rate.

Invariant: `stats` is changed here and nowhere else (tests/test_architecture.py checks it), so
every counter means the same whatever the source. COUNTERS lists its plain counters once, for
`stats` and the Prometheus families alike.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from nvmefs.nvme.commands import Command
from nvmefs.nvme.disposition import Decision, decide
from nvmefs.nvme.policy import LogPolicy
from nvmefs.nvme.status import SCT_SC_MASK, Status, Translator
from nvmefs.store.events import NvmeEvent
from nvmefs.store.ring import DebugRing


@dataclass
class Stats:
    """Counters over every attempt (completions) and every command's end (the rest)."""

    completions: int = 0
    logged: int = 0  # every one the policy logged, an entry of its own or folded into one
    folded: int = 0  # those of them counted in the `repeats` of an entry sent to the ring
    errors: int = 0
    retries: int = 0
    timeouts: int = 0
    aborts: int = 0
    resets: int = 0
    host_errors: int = 0
    protocol_errors: int = 0
    latency_ns_total: int = 0
    latency_ns_max: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    by_opcode: Counter[tuple[bool, int]] = field(default_factory=Counter)
    # Commands that ended with a failing status, by (controller, nsid, status word), whether
    # logged or not: what the metrics count as errors.
    failed: Counter[tuple[str, int | None, int]] = field(default_factory=Counter)


@dataclass(frozen=True)
class CounterSpec:
    """One counter of `Stats`: its field (also its name in `stats`), its Prometheus family
    and what it counts."""

    field: str
    metric: str
    help: str


# Every plain counter of Stats, once: `stats` and the Prometheus families both read this table.
COUNTERS = (
    CounterSpec(
        "completions",
        "nvmefs_completions_total",
        "Command attempts that completed with an NVMe status, success or not.",
    ),
    CounterSpec(
        "logged",
        "nvmefs_logged_total",
        "Completions the log policy logged: an entry of their own, or folded into one in a storm.",
    ),
    CounterSpec(
        "folded",
        "nvmefs_folded_total",
        "Logged completions folded into a like entry's repeats in a storm (fold=).",
    ),
    CounterSpec(
        "errors",
        "nvmefs_completion_errors_total",
        "Command attempts that completed with a failing NVMe status, retried or not.",
    ),
    CounterSpec("retries", "nvmefs_retries_total", "Command attempts that were retried."),
    CounterSpec("timeouts", "nvmefs_timeouts_total", "Commands that timed out."),
    CounterSpec("aborts", "nvmefs_aborts_total", "Commands that were aborted."),
    CounterSpec("resets", "nvmefs_resets_total", "Commands that ended in a controller reset."),
    CounterSpec(
        "host_errors",
        "nvmefs_host_errors_total",
        "Commands that ended without an NVMe status (the host gave up on them).",
    ),
    CounterSpec(
        "protocol_errors",
        "nvmefs_protocol_errors_total",
        "Completions that broke the NVMe protocol (register-level engine).",
    ),
)


class Attempt(Protocol):
    """What the sink reads of an engine's attempt, and `decision`, which it sets."""

    cmd: Command
    attempt: int
    retry: bool
    cid: int
    t0: int
    decision: Decision


class Appender(Protocol):
    """What takes a source's entries before its ring: DebugRing.append's signature."""

    def append(self, event: Any, mono_ns: int | None = None, wall_ns: int | None = None) -> object:
        """Take `event`, timed now unless times are given."""
        ...


# Folding: in a storm (a dying drive fails thousands of requests a second, each at an LBA of
# its own) an entry per request would cost every output (ring, journal, syslog, kmsg, the
# renderings) its Python work per request, and turn a 1024-entry ring over in a fraction of a
# second. So failed requests go to the ring one entry each while they come at most FOLD_RATE a
# second on average, in bursts of up to FOLD_BURST (or a second's worth, if more): ordinary
# bursts of errors, a few hundred, never fold. Beyond that, consecutive like ones fold into
# one entry that counts them exactly (the option fold=; 0: never fold). Successes, which only
# log=all logs, do the same at the same rate, on a bucket of their own that holds one second's
# worth: a burst of successes is how I/O starts, not an episode to keep in detail, and the
# burst a start or a pause refilled would push hundreds of entries of history out of the ring.
FOLD_RATE = 50
FOLD_BURST = 500
# A fold goes to the ring at most this long after it opened, even while like failures keep
# coming, so the ring and its readers are never more than about this far behind.
FOLD_S = 1.0
FOLD_NS = int(FOLD_S * 1_000_000_000)
# Past every LBA (64 bits): the lowest LBA of a fold none of whose requests had one yet.
NO_LBA = 1 << 64

Send = Callable[[Any, int | None, int | None], None]


class Folder:
    """Folds storms of like entries into one entry each, between the log policy and the ring.

    The rule: an entry goes on (`send`) at once unless it is over the rate (a token bucket,
    `rate` a second and `burst` deep, that the entries sent unfolded take from; successes, which
    only log=all logs, have a bucket of their own, a second's worth deep) or like the open fold.
    An entry over the rate with no fold open opens one: it is held, as the fold's first event.
    While a fold is open, every like event (same status word, opcode, admin, op, controller,
    namespace, disk and origin, not replayed: it differs only in LBA, blocks, cid, qid or
    retries) is counted into it, whatever the bucket holds, and nothing of it is kept but a
    count and the lowest and highest LBA. The fold goes on as its first event, with `repeats`
    (how many more) and `lba_range` set and timed when it opened, when anything else comes (an
    unlike entry, which follows it; a host event: `close`), when FOLD_NS have passed since it
    opened (at the next entry, or `tick`), or when the source ends (`close`). Entries come to it
    before `front` (the kernel source's Placer): a fold's LBA is looked up once, for its first
    event.

    Invariant: every event given to `add` is sent exactly once, on its own or counted in the
    `repeats` of exactly one event sent (so is every one `add_like` and `add_many` count);
    events are sent in the order given (a fold stands where its first event was: nothing given
    after that is sent before it); `stats.folded` is the sum of the `repeats` sent, so
    `stats.logged` == the events sent + their repeats + `pending`.
    """

    __slots__ = (
        "burst",
        "caps",
        "first",
        "hi",
        "last_ns",
        "lo",
        "mono_ns",
        "on_open",
        "per_ns",
        "rate",
        "repeats",
        "send",
        "stats",
        "tokens",
        "until",
        "wall_ns",
    )

    def __init__(
        self, send: Send, stats: Stats, rate: float = FOLD_RATE, burst: int = FOLD_BURST
    ) -> None:
        if rate < 0:
            raise ValueError(f"fold rate must be 0 or more, not {rate}")
        self.send = send
        self.stats = stats
        self.rate = rate
        self.burst = float(max(burst, rate))
        self.per_ns = rate / 1_000_000_000
        # The buckets of failures [0] and successes [1]: how deep each is, what it holds, and
        # when it was last filled (monotonic ns).
        self.caps = [self.burst, max(float(rate), 1.0)]
        self.tokens = list(self.caps)
        self.last_ns = [0, 0]
        self.first: NvmeEvent | None = None  # the open fold's first event
        self.repeats = 0  # like events counted into it since
        self.lo = NO_LBA  # lowest first LBA and highest last LBA of them all (NO_LBA, -1: none)
        self.hi = -1
        self.mono_ns = self.wall_ns = 0  # when it opened: the time its entry carries
        self.until = 0  # when it goes on at the latest (monotonic ns)
        # Called when a fold opens (the source's timer, which sends it on at `until`).
        self.on_open: Callable[[], object] | None = None

    @property
    def deadline(self) -> int | None:
        """When the open fold goes on at the latest (monotonic ns); None when none is open."""
        return None if self.first is None else self.until

    @property
    def pending(self) -> int:
        """The logged requests the open fold holds (not in the ring yet)."""
        return 0 if self.first is None else 1 + self.repeats

    def add(self, event: NvmeEvent, now: int) -> None:
        """An entry the policy logged, at monotonic time `now` (ns). The hot path: a like event
        costs a few compares and integer updates."""
        first = self.first
        if first is not None:
            if (
                now < self.until
                and event.status is first.status  # the same word under the same profile
                and event.opcode == first.opcode
                and event.nsid == first.nsid
                and event.ctrl == first.ctrl
                and event.disk == first.disk
                and event.op == first.op
                and event.admin == first.admin
                and event.origin == first.origin
                and not event.replayed
            ):
                self.repeats += 1
                slba = event.slba
                if slba is not None:
                    if slba < self.lo:
                        self.lo = slba
                    last = slba + (event.nlb or 1) - 1
                    if last > self.hi:
                        self.hi = last
                return
            self.close()
        if not self.rate:
            self.send(event, None, None)
            return
        # The bucket (successes have their own: log=all's stream of them never makes a failure
        # fold), filled for the time since it was last looked at.
        b = 1 if event.status.ok else 0
        tokens = self.tokens[b] + (now - self.last_ns[b]) * self.per_ns
        self.last_ns[b] = now
        if tokens >= 1.0:
            cap = self.caps[b]
            self.tokens[b] = (tokens if tokens < cap else cap) - 1.0
            self.send(event, None, None)
            return
        self.tokens[b] = tokens
        if event.replayed or event.place is not None:  # not what a source logs: never held
            self.send(event, None, None)
            return
        self._open(event, now)

    def add_like(self, first: NvmeEvent, slba: int | None, nlb: int | None, now: int) -> bool:
        """Count one more event into the open fold without making it: for a source that knows
        the event it would make is like `first` (it made `first` from the same inputs, all
        but the LBA, blocks, cid, qid and retries). False, counting nothing, when `first` is
        not the open fold's first event or the fold's time is up: then make it and `add` it."""
        if now >= self.until:
            return False
        if slba is None:
            return self.add_many(first, 1, None, None)
        return self.add_many(first, 1, slba, slba + (nlb or 1) - 1)

    def add_many(self, first: NvmeEvent, n: int, lo: int | None, hi: int | None) -> bool:
        """Count `n` more events into the open fold at once, of LBAs `lo`..`hi` (None: none):
        for a source that counted like events itself (the kernel source's trace consumer),
        having seen the fold open with `first` at the time they came. False, counting
        nothing, when `first` is not the open fold's first event."""
        if self.first is not first:
            return False
        self.repeats += n
        if lo is not None and lo < self.lo:
            self.lo = lo
        if hi is not None and hi > self.hi:
            self.hi = hi
        return True

    def _open(self, event: NvmeEvent, now: int) -> None:
        self.first = event
        self.repeats = 0
        slba = event.slba
        if slba is None:
            self.lo, self.hi = NO_LBA, -1
        else:
            self.lo, self.hi = slba, slba + (event.nlb or 1) - 1
        # Its entry's times: read now, as the ring reads them for the entries before it (the
        # caller's `now` may be older: a batch's).
        self.mono_ns, self.wall_ns = time.monotonic_ns(), time.time_ns()
        self.until = now + FOLD_NS
        if self.on_open is not None:
            self.on_open()

    def close(self) -> None:
        """Send the open fold on now (nothing if none is open)."""
        first = self.first
        if first is None:
            return
        self.first = None
        n = self.repeats
        if n:
            first.repeats = n
            if self.hi >= 0:
                first.lba_range = (self.lo, self.hi)
            self.stats.folded += n
        self.send(first, self.mono_ns, self.wall_ns)

    def tick(self, now: int) -> None:
        """Send the open fold on if its time bound has passed at monotonic time `now` (ns)."""
        if self.first is not None and now >= self.until:
            self.close()


class Sink:
    """The translator, the log policy and the counters of one engine, and its ring.

    `policy`, `translator` and `log_attempts` may be replaced at any time (the control file):
    the next completion follows them. Logged entries pass `folder` (see Folder); `front`,
    when set, takes the entries on their way from there to the ring (the kernel source's
    lookup of each LBA's owner), as it takes those of `append`. A source calls `tick` at a
    fold's deadline (SourceBase.fold_timer) and `flush` when it ends."""

    __slots__ = (
        "crdt",
        "folder",
        "front",
        "log_attempts",
        "max_retries",
        "on_error",
        "policy",
        "ring",
        "stats",
        "translator",
    )

    def __init__(
        self,
        ring: DebugRing,
        translator: Translator,
        policy: LogPolicy,
        *,
        max_retries: int = 5,
        log_attempts: bool = False,
        fold: float = FOLD_RATE,
    ) -> None:
        self.ring = ring
        self.translator = translator
        self.policy = policy
        self.max_retries = max_retries
        self.log_attempts = log_attempts
        self.crdt = (0, 0, 0)  # the controller's Command Retry Delay Times, once known
        # Told the status word of every attempt that failed (the kernel source uses it to know
        # an engine's own passthrough commands when it sees them in the tracepoints).
        self.on_error: Callable[[int], None] | None = None
        self.front: Appender | None = None
        self.stats = Stats()
        self.folder = Folder(self.send, self.stats, fold)

    # -- engines that issue commands -----------------------------------------------------------

    def complete(
        self, ctrl: str, qid: int | None, done: Sequence[tuple[Attempt, int, Any]], now: int
    ) -> list[Status]:
        """Attempts that completed together with an NVMe status (their words), at `now`: each
        one's status and disposition (set on it), its counters, and the entry of each that the
        policy logs at its final disposition (through the folder). The hot path: locals are
        hoisted."""
        table = self.translator.table
        logged = self.policy.table
        every = self.log_attempts
        st = self.stats
        add = self.folder.add
        on_error = self.on_error
        max_retries, crdt = self.max_retries, self.crdt
        statuses: list[Status] = []
        words, opcodes = [], []
        oldest = now
        t0_sum = 0
        for p, word, _result in done:
            cmd = p.cmd
            status = table[word]
            statuses.append(status)
            words.append(word)
            opcodes.append((cmd.admin, cmd.opcode))
            t0 = p.t0
            t0_sum += t0
            if t0 < oldest:
                oldest = t0
            code = word & SCT_SC_MASK
            final = True
            if word:
                if code:
                    st.errors += 1
                if on_error is not None:
                    on_error(word)
                p.decision = decide(word, p.attempt, max_retries, fail_fast=not p.retry, crdt=crdt)
                final = p.decision.final
                if final and code:
                    st.failed[(ctrl, cmd.nsid, word)] += 1
            if logged[code] and (final or every):
                st.logged += 1
                add(
                    NvmeEvent(
                        status,
                        ctrl,
                        cmd.nsid,
                        qid,
                        p.cid,
                        cmd.opcode,
                        cmd.admin,
                        cmd.slba,
                        cmd.nlb,
                        p.attempt,
                    ),
                    now,
                )
        n = len(words)
        st.completions += n
        st.by_status.update(words)
        st.by_opcode.update(opcodes)
        st.latency_ns_total += n * now - t0_sum
        st.latency_ns_max = max(st.latency_ns_max, now - oldest)
        return statuses

    def successes(self, n: int, admin: bool, opcode: int, lat_total: int, lat_max: int) -> None:
        """`n` successful completions counted elsewhere (the compiled loop), with the sum and
        the largest of their latencies: counted, never logged one by one."""
        if not n:
            return
        st = self.stats
        st.completions += n
        st.by_status[0] += n
        st.by_opcode[(admin, opcode)] += n
        st.latency_ns_total += lat_total
        st.latency_ns_max = max(st.latency_ns_max, lat_max)

    def retried(self, n: int = 1) -> None:
        """Attempts that are sent again."""
        self.stats.retries += n

    def host_error(self) -> None:
        """A command that ended without an NVMe status (the host gave up on it)."""
        self.stats.host_errors += 1

    def timeout(self) -> None:
        self.stats.timeouts += 1

    def abort(self) -> None:
        self.stats.aborts += 1

    def reset(self) -> None:
        self.stats.resets += 1

    def protocol_error(self) -> None:
        """A completion that broke the queue protocol (register-level engine)."""
        self.stats.protocol_errors += 1

    # -- the kernel source: completions it only watches ----------------------------------------

    def attempt(self, word: int, n: int = 1) -> None:
        """`n` attempts the kernel completed with status `word`."""
        st = self.stats
        st.completions += n
        st.by_status[word] += n
        if word & SCT_SC_MASK:
            st.errors += n

    def final_failure(self, ctrl: str, nsid: int | None, word: int, n: int = 1) -> None:
        """`n` requests that ended with the failing status `word`, logged or not."""
        self.stats.failed[(ctrl, nsid, word)] += n

    def logs(self, word: int) -> bool:
        """Whether the log policy makes an entry of a completion with status `word`."""
        return bool(self.policy.table[word & SCT_SC_MASK])

    def log(self, event: NvmeEvent) -> None:
        """The entry of a completion the policy logs (see `logs`), through the folder."""
        self.stats.logged += 1
        self.folder.add(event, time.monotonic_ns())

    def log_like(self, first: NvmeEvent, slba: int | None, nlb: int | None) -> bool:
        """A completion the policy logs whose entry would be like `first` but for its LBA and
        blocks (`slba`, `nlb`): counted into the open fold, as `log` would, if `first` opened
        it and it is open still; False (nothing counted) otherwise: then make it and `log` it.
        For a source in a storm: a folded request costs no entry of its own."""
        if not self.folder.add_like(first, slba, nlb, time.monotonic_ns()):
            return False
        self.stats.logged += 1
        return True

    def log_many(self, first: NvmeEvent, n: int, lo: int | None, hi: int | None) -> bool:
        """`n` completions the policy logs, counted by the source, whose entries would be like
        `first` (`lo`..`hi`: their lowest and highest LBA, or None): counted into the open
        fold if `first` opened it; False (nothing counted) otherwise. See Folder.add_many."""
        if not self.folder.add_many(first, n, lo, hi):
            return False
        self.stats.logged += n
        return True

    def folding(self, first: NvmeEvent, now: int) -> bool:
        """Whether the open fold is `first`'s and still takes like entries at monotonic time
        `now` (ns)."""
        folder = self.folder
        return folder.first is first and now < folder.until

    def opened_fold(self, event: NvmeEvent) -> bool:
        """Whether `event`, just logged, opened the fold that is open now."""
        return self.folder.first is event

    def append(self, event: Any) -> None:
        """An entry of the source's own (a host event): to the ring after the open fold, if
        any (order is kept), through `front` when it is set. Never folded."""
        self.folder.close()
        self.send(event, None, None)

    def send(self, event: Any, mono_ns: int | None, wall_ns: int | None) -> None:
        """An entry that goes on (from the folder, or `append`): to `front` when it is set,
        else to the ring; timed now unless times are given (a fold's, when it opened)."""
        (self.ring if self.front is None else self.front).append(event, mono_ns, wall_ns)

    def tick(self, now: int) -> None:
        """Send the open fold on if its time bound has passed at monotonic time `now` (ns)."""
        self.folder.tick(now)

    def flush(self) -> None:
        """Send the open fold on now (the source is ending, or the ring is being cleared)."""
        self.folder.close()
