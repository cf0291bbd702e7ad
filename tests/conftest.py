from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests import hostile

# tests/vm runs inside the QEMU VM (tests/test_vm.py boots it); on the host it is not collected.
collect_ignore = [] if os.environ.get("NVMEFS_IN_VM") else ["vm"]

# Markers of tests that cannot run without root.
NEEDS_ROOT = ("fuse", "root", "vm")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test that needs root says so, in one line, rather than fail somewhere inside."""
    marks = [m for m in NEEDS_ROOT if item.get_closest_marker(m) is not None]
    if marks and os.geteuid() != 0:
        pytest.fail(
            f"needs root ({', '.join(marks)}): run the tests as root, as "
            "`contrib/bootstrap test` does; `pytest -m 'not fuse and not root and not vm'` "
            "runs the ones that do not",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def hostile_user() -> hostile.HostileUser:
    """An unprivileged local account (tests/hostile.py); its commands run through setpriv."""
    if os.geteuid() != 0:
        pytest.fail("needs root: useradd and setpriv to play another user", pytrace=False)
    return hostile.hostile_user()


@pytest.fixture(params=["stock", "off"])
def protected(request: pytest.FixtureRequest) -> Iterator[str]:
    """fs.protected_* at a stock Debian host's values, then all at 0: a fix must hold under both."""
    if os.geteuid() != 0:
        pytest.fail("needs root: it sets the fs.protected_* sysctls", pytrace=False)
    with hostile.protections(hostile.STOCK if request.param == "stock" else hostile.OFF):
        yield request.param


@pytest.fixture
def compiled_built() -> None:
    """The compiled trace consumer is built wherever the tests are set up (contrib/bootstrap
    installs a C compiler): its absence is a failure here, not a reason to skip."""
    from nvmefs.linux import tracebulk

    if not tracebulk.available():
        pytest.fail(f"no compiled consumer: {tracebulk.unavailable()}")
