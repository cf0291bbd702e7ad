"""Fault plans: parsing, matching, and refusal of malformed plans before anything starts."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from nvmefs.errors import UsageError
from nvmefs.sim import faults
from nvmefs.sim.faults import FaultPlanError


def test_demo_plan_loads_and_matches_by_opcode_and_lba_overlap() -> None:
    plan = faults.load("demo")
    rng = random.Random(0)
    assert plan.rules[0].opcode == 0x02 and plan.rules[0].lba == (2048, 2055)
    assert plan.pick(0x02, 1, 2040, 8, rng) is None  # 2040..2047: just before
    assert plan.pick(0x02, 1, 2040, 9, rng) is plan.rules[0]  # touches 2048
    assert plan.pick(0x02, 1, 2055, 100, rng) is plan.rules[0]
    assert plan.pick(0x01, 1, 2048, 8, rng) is None  # a write there is fine


def test_count_probability_and_nsid() -> None:
    plan = faults.parse(
        '[[fault]]\nopcode = "any"\nstatus = 0x6\ncount = 2\nnsid = 2\n'
        "[[fault]]\nopcode = 2\nstatus = 0x281\nprobability = 0.5\n",
        "t",
    )
    rng = random.Random(1)
    assert plan.pick(0x00, 1, None, None, rng) is None  # wrong namespace
    assert [plan.pick(0x00, 2, None, None, rng) is not None for _ in range(3)] == [
        True,
        True,
        False,
    ]
    fired = sum(plan.pick(0x02, 1, 0, 1, rng) is not None for _ in range(2000))
    assert 850 < fired < 1150
    # The same seed fails the same commands.
    again = faults.parse("[[fault]]\nstatus = 1\nprobability = 0.5\n", "t")
    runs = [
        [again.pick(2, 1, 0, 1, r) is not None for _ in range(50)]
        for r in (random.Random(3), random.Random(3))
    ]
    assert runs[0] == runs[1]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[[fault]]\nopcode = 'reed'\nstatus = 1\n", "rule 1: opcode"),
        ("[[fault]]\nstatus = 1\n[[fault]]\nlba = [5, 2]\nstatus = 1\n", "rule 2: lba"),
        ("[[fault]]\nstatus = 0x8000\n", "rule 1: status"),
        ("[[fault]]\nopcode = 'read'\n", "rule 1: status: missing"),
        ("[[fault]]\nstatus = 1\nprobability = 2\n", "rule 1: probability"),
        ("[[fault]]\nstatus = 1\ncolor = 'red'\n", "rule 1: color: unknown field"),
        ("[[fault]]\nstatus = 1\nhang = 'yes'\n", "rule 1: hang"),
        ("[[fault]]\nstatus = 1\ncount = -1\n", "rule 1: count"),
        ("[[fault]]\nstatus = 1\ndelay_ms = 1.5\n", "rule 1: delay_ms"),
        ("[[fault]]\nstatus = 1\nnsid = 0\n", "rule 1: nsid"),
        ("[[fault]\nstatus = 1\n", "not valid TOML"),
        ("[other]\nx = 1\n", "unknown table"),
    ],
)
def test_malformed_plans_name_file_rule_and_field(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "plan.toml"
    path.write_text(text)
    with pytest.raises(FaultPlanError) as err:
        faults.load(str(path))
    assert str(path) in str(err.value) and needle in str(err.value)


def test_missing_plan_file() -> None:
    with pytest.raises(FaultPlanError, match="No such file"):
        faults.load("/nonexistent/plan.toml")


def test_plan_errors_are_usage_errors() -> None:
    # The command line prints a UsageError as one line, without a traceback.
    with pytest.raises(UsageError):
        faults.parse("[[fault]]\nstatus = -1\n", "t")
