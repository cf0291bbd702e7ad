"""trio.run for command-line entry points, where an error is one exception, not a group."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")


def unwrap(exc: BaseException) -> BaseException:
    """The single leaf of nested one-member exception groups (trio's nurseries make those)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def run(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    try:
        return trio.run(fn, *args)
    except BaseExceptionGroup as group:
        leaf = unwrap(group)
        if leaf is group:
            raise
        raise leaf from None
