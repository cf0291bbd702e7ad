"""The contrib scripts (not a package) as modules, for the tests of their logic and the VM
tests that share their measurements."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load(relpath: str, name: str) -> ModuleType:
    """The script at `relpath` (from the repository's top) as module `name`, loaded once."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / relpath)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and typing look a module up by name
    spec.loader.exec_module(module)
    return module
