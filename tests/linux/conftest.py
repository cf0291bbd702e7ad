"""Fixtures of the tests of nvmefs.linux."""

from __future__ import annotations

import pytest

from nvmefs.linux import tracebulk


@pytest.fixture
def compiled_built() -> None:
    """The compiled consumer is built wherever the tests are set up (contrib/bootstrap installs
    a C compiler): its absence is a failure here, not a reason to skip."""
    if not tracebulk.available():
        pytest.fail(f"no compiled consumer: {tracebulk.unavailable()}")
