"""What the tests check again and again: that every hook call is in one counter of status(),
waiting for a state the sink reports (a signal, not a sleep), that a run landed exactly once,
and that nothing was written under a directory."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from conftest import Readback

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


def assert_exactly_once(readback: Readback, run_id: str, steps: int) -> Any:
    """The run ``run_id`` has each of its ``steps`` once (step and cumulative reward, steps
    0 to steps - 1), its summary ``steps`` metric, and ended FINISHED; it is returned."""
    run = readback.runs()[run_id]
    for key in ("step_reward", "cumulative_reward"):
        assert [m.step for m in readback.history(run, key)] == list(range(steps)), key
    assert run.data.metrics["steps"] == steps
    assert run.info.status == "FINISHED"
    return run


def snapshot(root: Path) -> dict[str, tuple[int, float]]:
    """Every file under ``root`` with its size and modification time."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime)
        for p in sorted(root.rglob("*"))
    }
