"""In the VM: the node id of every test that passed goes to $NVMEFS_VM_PASSED as it passes, so
that tests/test_vm.py can run only the rest in a new VM if this one stalls."""

from __future__ import annotations

import os

import pytest


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    path = os.environ.get("NVMEFS_VM_PASSED")
    if path and report.when == "call" and report.passed:
        with open(path, "a") as f:
            f.write(report.nodeid + "\n")
