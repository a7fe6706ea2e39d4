from __future__ import annotations

import threading
import time

from rlm_mlflow._buffer import Buffer
from rlm_mlflow._event import Marker, Step


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
