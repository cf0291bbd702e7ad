"""Fault plans for the simulated controller: which commands fail, and how.

A plan is TOML with `[[fault]]` rules (see demo.toml beside this file). A command matches a rule
when its opcode matches and it touches any LBA of the rule's inclusive range (rules without `lba`
match every command of that opcode). The first matching rule that fires decides the completion.
A plan is checked whole before anything starts; every error names the file, rule and field.
"""

from __future__ import annotations

import os
import random
import stat
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from nvmefs.errors import UsageError
from nvmefs.nvme import tables

BUILTIN = ("demo",)
_KEYS = {"opcode", "lba", "status", "nsid", "probability", "count", "delay_ms", "hang"}


class FaultPlanError(UsageError):
    """A fault plan refused before anything starts; the message names its file, rule and field."""


@dataclass(slots=True)
class FaultRule:
    """One `[[fault]]` rule of a plan, checked when parsed: what it matches and what it does.

    Invariant: `status` fits in 15 bits, `0 <= probability <= 1`, `lba` is an inclusive
    (first, last) with first <= last, and once `count` is non-zero `fired` never exceeds it.
    """

    index: int  # 1-based, as the error messages count
    opcode: int | None  # None: any
    lba: tuple[int, int] | None
    status: int
    nsid: int | None = None
    probability: float = 1.0
    count: int = 0  # 0: every time
    delay_ms: int = 0
    hang: bool = False
    fired: int = 0

    def matches(self, opcode: int, nsid: int, slba: int | None, nlb: int | None) -> bool:
        if self.opcode is not None and opcode != self.opcode:
            return False
        if self.nsid is not None and nsid != self.nsid:
            return False
        if self.lba is not None:
            if slba is None or nlb is None:
                return False
            lo, hi = self.lba
            if slba > hi or slba + nlb - 1 < lo:
                return False
        return not (self.count and self.fired >= self.count)


@dataclass(slots=True)
class FaultPlan:
    """A parsed fault plan: its rules in file order, each already checked.

    Invariant: `pick` returns the first rule that matches and fires, and counts that firing.
    """

    source: str
    rules: list[FaultRule] = field(default_factory=list)

    def check_against(self, namespaces: dict[int, int]) -> None:
        """Refuse rules that can never fire on namespaces {nsid: blocks}."""
        for rule in self.rules:
            where = f"fault plan {self.source}: rule {rule.index}"
            if rule.nsid is not None and rule.nsid not in namespaces:
                known = ", ".join(map(str, sorted(namespaces)))
                raise FaultPlanError(f"{where}: nsid: no namespace {rule.nsid} (there is {known})")
            if rule.lba is not None:
                targets = [rule.nsid] if rule.nsid is not None else list(namespaces)
                largest = max(namespaces[n] for n in targets)
                if rule.lba[0] >= largest:
                    raise FaultPlanError(
                        f"{where}: lba: {rule.lba[0]} is beyond the namespace ({largest} blocks)"
                    )

    def pick(
        self, opcode: int, nsid: int, slba: int | None, nlb: int | None, rng: random.Random
    ) -> FaultRule | None:
        for rule in self.rules:
            if rule.matches(opcode, nsid, slba, nlb) and (
                rule.probability >= 1.0 or rng.random() < rule.probability
            ):
                rule.fired += 1
                return rule
        return None


MAX_PLAN_BYTES = 1 << 20  # a plan is a few rules: anything larger is not one


def load(spec: str) -> FaultPlan:
    """`demo` (built in) or a path to a TOML plan: a regular file of at most MAX_PLAN_BYTES,
    opened without blocking (a FIFO or a device is refused, never waited on or read forever)."""
    if spec in BUILTIN:
        text = resources.files(__package__).joinpath(f"{spec}.toml").read_text()
        return parse(text, f"<built-in {spec}>")
    try:
        fd = os.open(spec, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise FaultPlanError(f"fault plan {spec}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FaultPlanError(f"fault plan {spec}: not a regular file")
        if st.st_size > MAX_PLAN_BYTES:
            raise FaultPlanError(
                f"fault plan {spec}: {st.st_size} bytes, more than a plan ({MAX_PLAN_BYTES} max)"
            )
        raw = os.read(fd, MAX_PLAN_BYTES + 1)
    except OSError as e:
        raise FaultPlanError(f"fault plan {spec}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_PLAN_BYTES:
        raise FaultPlanError(f"fault plan {spec}: more than {MAX_PLAN_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FaultPlanError(f"fault plan {spec}: not UTF-8 text (byte {e.start})") from None
    return parse(text, spec)


def parse(text: str, source: str) -> FaultPlan:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise FaultPlanError(f"fault plan {source}: not valid TOML: {e}") from None
    extra = set(doc) - {"fault"}
    if extra:
        raise FaultPlanError(f"fault plan {source}: unknown table {sorted(extra)[0]!r}")
    raw = doc.get("fault", [])
    if not isinstance(raw, list):
        raise FaultPlanError(f"fault plan {source}: 'fault' must be an array of tables [[fault]]")
    return FaultPlan(source, [_rule(source, i, r) for i, r in enumerate(raw, 1)])


def _rule(source: str, index: int, raw: Any) -> FaultRule:
    def bad(fieldname: str, why: str) -> FaultPlanError:
        return FaultPlanError(f"fault plan {source}: rule {index}: {fieldname}: {why}")

    if not isinstance(raw, dict):
        raise bad("fault", "must be a table")
    for key in raw:
        if key not in _KEYS:
            raise bad(key, f"unknown field (known: {', '.join(sorted(_KEYS))})")

    opcode: int | None
    op = raw.get("opcode", "any")
    if isinstance(op, str):
        if op == "any":
            opcode = None
        elif op in tables.IO_OPCODE_ALIASES:
            opcode = tables.IO_OPCODE_ALIASES[op]
        else:
            names = "|".join([*tables.IO_OPCODE_ALIASES, "any"])
            raise bad("opcode", f"{op!r} is not {names} or a number")
    elif isinstance(op, int) and not isinstance(op, bool) and 0 <= op <= 0xFF:
        opcode = op
    else:
        raise bad("opcode", f"{op!r} is not an opcode name or a number 0..255")

    lba = raw.get("lba")
    if lba is not None:
        if isinstance(lba, int) and not isinstance(lba, bool):
            lba = [lba, lba]
        if (
            not isinstance(lba, list)
            or len(lba) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in lba)
            or lba[0] > lba[1]
        ):
            raise bad("lba", f"{lba!r} is not [first, last] with 0 <= first <= last")
        lba = (lba[0], lba[1])

    hang = raw.get("hang", False)
    if not isinstance(hang, bool):
        raise bad("hang", "must be true or false")
    if "status" not in raw and not hang:
        raise bad("status", "missing (the 15-bit status to complete with)")
    status = raw.get("status", 0)
    if not isinstance(status, int) or isinstance(status, bool) or not 0 <= status <= 0x7FFF:
        raise bad("status", f"{status!r} is not a 15-bit status (0..0x7fff)")

    nsid = raw.get("nsid")
    if nsid is not None and (not isinstance(nsid, int) or isinstance(nsid, bool) or nsid < 1):
        raise bad("nsid", f"{nsid!r} is not a namespace id (1 or more)")
    prob = raw.get("probability", 1.0)
    if not isinstance(prob, int | float) or isinstance(prob, bool) or not 0.0 <= prob <= 1.0:
        raise bad("probability", f"{prob!r} is not between 0 and 1")
    count = raw.get("count", 0)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise bad("count", f"{count!r} is not a count (0 = every time)")
    delay = raw.get("delay_ms", 0)
    if not isinstance(delay, int) or isinstance(delay, bool) or not 0 <= delay <= 3_600_000:
        raise bad("delay_ms", f"{delay!r} is not a delay in milliseconds (0..3600000)")
    return FaultRule(index, opcode, lba, status, nsid, float(prob), count, delay, hang)
