from __future__ import annotations

import threading
import time
from pathlib import Path

from conftest import capture_logs

from rlm_mlflow._buffer import Buffer
from rlm_mlflow._event import Marker, RunStart, Step
from rlm_mlflow._spill import Spill


def event(i: int) -> Step:
    return Step("r", i, 0.0, 0.0, 0.0)


def test_drain_keeps_order_and_respects_the_limit() -> None:
    buffer = Buffer(maxsize=100, wake_at=10, put_timeout=0.1)
    for i in range(25):
        buffer.put(event(i))
    assert [e.step for e in buffer.drain(10)] == list(range(10))  # type: ignore[union-attr]
    assert [e.step for e in buffer.drain(100)] == list(range(10, 25))  # type: ignore[union-attr]


def test_the_worker_is_woken_once_a_batch_is_waiting() -> None:
    buffer = Buffer(maxsize=100, wake_at=3, put_timeout=0.1)
    buffer.put(event(0))
    buffer.put(event(1))
    assert not buffer.wakeup.is_set()
    buffer.put(event(2))
    assert buffer.wakeup.is_set()


def test_a_full_buffer_makes_the_hook_wait_at_most_the_put_timeout_then_drops() -> None:
    buffer = Buffer(maxsize=2, wake_at=2, put_timeout=0.2)
    buffer.put(event(0))
    buffer.put(event(1))
    started = time.perf_counter()
    buffer.put(event(2))
    waited = time.perf_counter() - started
    assert 0.15 <= waited < 1.0
    assert buffer.dropped == 1
    assert len(buffer) == 2
    assert buffer.take_drop_burst() == 1
    assert buffer.take_drop_burst() == 0


def test_a_waiting_hook_gets_in_as_soon_as_the_worker_drains() -> None:
    buffer = Buffer(maxsize=1, wake_at=1, put_timeout=5.0)
    buffer.put(event(0))
    threading.Timer(0.1, buffer.drain, args=(1,)).start()
    started = time.perf_counter()
    buffer.put(event(1))
    assert time.perf_counter() - started < 2.0
    assert buffer.dropped == 0
    assert [e.step for e in buffer.drain(5)] == [1]  # type: ignore[union-attr]


def test_after_close_puts_are_dropped_at_once_but_markers_pass() -> None:
    buffer = Buffer(maxsize=10, wake_at=5, put_timeout=5.0)
    buffer.close()
    started = time.perf_counter()
    buffer.put(event(0))
    assert time.perf_counter() - started < 0.5
    assert buffer.dropped == 1
    marker = Marker()
    buffer.put_marker(marker)
    assert buffer.drain(10) == [marker]


def test_drop_newest_drops_at_once_counts_every_drop_and_logs_once_per_burst() -> None:
    buffer = Buffer(maxsize=2, wake_at=2, put_timeout=5.0, policy="drop_newest")
    with capture_logs() as logs:
        started = time.perf_counter()
        for i in range(10):
            buffer.put(event(i))
        assert time.perf_counter() - started < 0.5
    assert buffer.dropped == 8
    assert [e.step for e in buffer.drain(10)] == [0, 1]  # type: ignore[union-attr]
    assert [entry["event"] for entry in logs] == ["events dropped"]
    assert buffer.take_drop_burst() == 8


def test_drop_oldest_keeps_the_newest_steps_but_never_drops_a_start_or_an_end() -> None:
    buffer = Buffer(maxsize=3, wake_at=3, put_timeout=5.0, policy="drop_oldest")
    start = RunStart("r", 0.0, "e", 1, {}, "k")
    buffer.put(start)
    for i in range(2):
        buffer.put(event(i))
    buffer.put(event(2))  # the start is oldest: it stays, the new step is dropped
    assert buffer.dropped == 1
    assert buffer.drain(1) == [start]
    buffer.put(event(3))
    buffer.put(event(4))  # now a step is oldest: it goes
    assert buffer.dropped == 2
    assert [e.step for e in buffer.drain(10)] == [1, 3, 4]  # type: ignore[union-attr]


def test_spill_keeps_every_event_in_order_across_memory_and_disk(tmp_path: Path) -> None:
    overflow = Spill(tmp_path / "overflow.log")
    buffer = Buffer(
        maxsize=3,
        wake_at=3,
        put_timeout=5.0,
        policy="spill",
        overflow=overflow,
        overflow_max_bytes=1 << 20,
    )
    for i in range(5):
        buffer.put(event(i))
    flush = Marker()
    buffer.put_marker(flush)  # behind the spilled events, not ahead of them
    buffer.put(event(5))
    assert len(buffer) == 7 and buffer.dropped == 0
    first = buffer.drain(4)
    assert [e.step for e in first] == [0, 1, 2, 3]  # type: ignore[union-attr]
    buffer.put(event(6))  # still spilling: the overflow is not empty yet
    rest = buffer.drain(10)
    assert rest[1] is flush
    assert [e.step for e in rest if not isinstance(e, Marker)] == [4, 5, 6]
    buffer.put(event(7))  # the overflow ran empty: back to memory
    assert (tmp_path / "overflow.log").stat().st_size == 0
    assert [e.step for e in buffer.drain(10)] == [7]  # type: ignore[union-attr]
