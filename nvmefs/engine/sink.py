"""The completion sink: where the completions of every source become counters and ring entries.

As every Linux transport ends in nvme_complete_rq(), every source of nvmefs ends here: the
register-level and passthrough engines (`complete`, per batch of attempts with an NVMe status),
the compiled loop (`successes`, counted in C), host-side ends (`host_error`, `timeout`...), and
the kernel source (`attempt`, `retried`, `final_failure`, `log`). Each attempt passes the
translator once; the kernel's disposition rule (nvme.disposition.decide) says whether a command
is done or retried; the log policy says which completions become entries (one per command at
its final disposition, or one per attempt with `log_attempts`).

Invariant: `stats` is changed here and nowhere else (tests/test_architecture.py checks it), so
every counter means the same whatever the source. COUNTERS lists its plain counters once, for
`stats` and the Prometheus families alike.
"""

from __future__ import annotations

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
    logged: int = 0
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
    CounterSpec("logged", "nvmefs_logged_total", "Completions the log policy wrote to the ring."),
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


class Sink:
    """The translator, the log policy and the counters of one engine, and its ring.

    `policy`, `translator` and `log_attempts` may be replaced at any time (the control file):
    the next completion follows them. `front`, when set, takes the entries of `log` and
    `append` on their way to the ring (the kernel source's lookup of each LBA's owner)."""

    __slots__ = (
        "crdt",
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

    # -- engines that issue commands -----------------------------------------------------------

    def complete(
        self, ctrl: str, qid: int | None, done: Sequence[tuple[Attempt, int, Any]], now: int
    ) -> list[Status]:
        """Attempts that completed together with an NVMe status (their words), at `now`: each
        one's status and disposition (set on it), its counters, and the entry of each that the
        policy logs at its final disposition. The hot path: locals are hoisted."""
        table = self.translator.table
        logged = self.policy.table
        every = self.log_attempts
        st = self.stats
        ring_append = self.ring.append
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
                ring_append(
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
                    )
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
        """The entry of a completion the policy logs (see `logs`)."""
        self.stats.logged += 1
        self.append(event)

    def append(self, event: Any) -> None:
        """An entry of the source's own (a host event), or one `log` counted: to the ring,
        through `front` when it is set."""
        (self.ring if self.front is None else self.front).append(event)
