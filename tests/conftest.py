from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests import hostile

# tests/vm runs inside the QEMU VM (tests/test_vm.py boots it); on the host it is not collected.
collect_ignore = [] if os.environ.get("NVMEFS_IN_VM") else ["vm"]


@pytest.fixture(scope="session")
def hostile_user() -> hostile.HostileUser:
    """An unprivileged local account (tests/hostile.py); its commands run through setpriv."""
    return hostile.hostile_user()


@pytest.fixture(params=["stock", "off"])
def protected(request: pytest.FixtureRequest) -> Iterator[str]:
    """fs.protected_* at a stock Debian host's values, then all at 0: a fix must hold under both."""
    with hostile.protections(hostile.STOCK if request.param == "stock" else hostile.OFF):
        yield request.param
