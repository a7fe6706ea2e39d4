"""What the tests check again and again: that every hook call is in one counter of status(),
and waiting for a state the sink reports (a signal, not a sleep)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

#: The counters of status() every accepted event ends in (pending aside).
COUNTERS = ("delivered", "rejected", "dead_lettered", "failed", "spooled", "dropped")


def accounted(status: dict[str, Any]) -> int:
    """How many hook calls status() accounts for."""
    return sum(status[key] for key in COUNTERS)


def wait_until(probe: Callable[[], T | None], timeout: float = 120.0, what: str = "") -> T:
    """Ask ``probe`` until it returns something (not None, not False); that is returned. The
    timeout only keeps a broken test from hanging: what is awaited is a state, never a time."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or probe}")
        time.sleep(0.02)
