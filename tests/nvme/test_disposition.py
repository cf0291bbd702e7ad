"""The kernel's disposition rule (nvme_decide_disposition) as a pure function."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nvmefs.nvme.disposition import Disposition, decide
from nvmefs.nvme.status import DNR

CRDT = (1, 5, 10)  # 100 ms units


def test_success_completes_on_any_attempt() -> None:
    assert decide(0, 0, 5).final and decide(0, 9, 5).final


def test_an_error_is_retried_until_max_retries_then_completes() -> None:
    actions = [decide(0x281, n, 5).action for n in range(7)]
    assert actions == [Disposition.RETRY] * 5 + [Disposition.COMPLETE] * 2


def test_dnr_and_fail_fast_complete_at_once() -> None:
    assert decide(DNR | 0x281, 0, 5).final
    assert decide(0x281, 0, 5, fail_fast=True).final  # passthrough and readahead


def test_max_retries_zero_never_retries() -> None:
    assert decide(0x281, 0, 0).final


@pytest.mark.parametrize(("crd", "delay"), [(0, 0.0), (1, 0.1), (2, 0.5), (3, 1.0)])
def test_crd_selects_the_controllers_retry_delay(crd: int, delay: float) -> None:
    d = decide(crd << 11 | 0x281, 0, 5, crdt=CRDT)
    assert d.action is Disposition.RETRY and d.delay == pytest.approx(delay)


def test_crd_without_a_crdt_value_retries_at_once() -> None:
    assert decide(2 << 11 | 0x281, 0, 5).delay == 0


def test_path_errors_fail_over_only_under_multipath() -> None:
    assert decide(0x370, 0, 5, multipath=True).action is Disposition.FAILOVER
    assert decide(0x370, 0, 5).action is Disposition.RETRY
    assert decide(0x281, 0, 5, multipath=True).action is Disposition.RETRY


def test_the_whole_word_counts_as_in_the_kernel() -> None:
    # MORE alone is not status 0: the kernel retries it.
    assert decide(0x2000, 0, 5).action is Disposition.RETRY


@given(st.integers(0, 0x7FFF), st.integers(0, 10), st.integers(0, 10), st.booleans())
def test_complete_exactly_when_the_kernel_would(
    word: int, retries: int, max_retries: int, fail_fast: bool
) -> None:
    d = decide(word, retries, max_retries, fail_fast=fail_fast, crdt=CRDT)
    kernel_completes = word == 0 or fail_fast or bool(word & DNR) or retries >= max_retries
    assert d.final == kernel_completes
    assert d.delay >= 0 and (d.delay == 0 or d.action is Disposition.RETRY)
