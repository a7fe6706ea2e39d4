"""The bounded buffer between the hooks (any thread) and the worker (one thread).

The hot path is `Buffer.put`: a length check, a deque append and, once per batch, an Event.set
that wakes the worker (the pattern of OpenTelemetry's batch processor). `deque.append` and
`popleft` are atomic under the GIL, so producers take no lock; with many producer threads the
bound can be overshot by at most one event per thread. Only a full, closed or parked buffer
takes the slow path, with a lock and a condition. Run starts and ends are never dropped: they
pass the bound like flush markers (`put_boundary`), since a lost one would cost its whole run.

While the worker is parked (idle, its thread let go), the bound is 0, so the next put takes
the slow path and calls `unpark` first.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from ._event import Event, Marker, RunEvent, Step
from ._log import log
from ._outcomes import Outcomes
from ._settings import WhenFull
from ._spill import Spill


class Buffer:
    def __init__(
        self,
        maxsize: int,
        wake_at: int,
        put_timeout: float,
        policy: WhenFull = "block",
        overflow: Spill | None = None,
        overflow_max_bytes: int = 0,
        outcomes: Outcomes | None = None,
    ) -> None:
        self._queue: deque[Event] = deque()
        self._maxsize = self._capacity = maxsize
        self._policy = policy
        # spill: while the overflow holds events, every put goes there too (maxsize 0 sends
        # the hooks to the slow path), so the order of events is kept.
        self._overflow = overflow
        self._overflow_max_bytes = overflow_max_bytes
        self.wake_at = wake_at
        self._put_timeout = put_timeout
        self.wakeup = threading.Event()
        self.loop_thread: int | None = None  # set when the worker runs in the caller's loop
        # Re-entrant: a SIGTERM handler (close) may run while this thread is inside put.
        self._room = threading.Condition(threading.RLock())
        self._waiting = 0  # producers blocked in _put_when_full
        self._closed = False
        # Drops are counted by the outcomes (a buffer of its own has outcomes of its own).
        self.outcomes = outcomes if outcomes is not None else Outcomes(None, "")
        self._burst = 0  # drops since the worker last reported them
        self.last_drop = 0.0  # time.monotonic() of the last drop
        self._parked = False
        self.unpark: Callable[[], None] = lambda: None  # set by the worker: start it again

    @property
    def dropped(self) -> int:
        return self.outcomes.stats.dropped

    def __len__(self) -> int:
        return len(self._queue) + (len(self._overflow) if self._overflow is not None else 0)

    def put(self, event: RunEvent) -> None:
        queue = self._queue
        if len(queue) < self._maxsize:
            queue.append(event)
            if len(queue) >= self.wake_at and not self.wakeup.is_set():
                self.wakeup.set()
            return
        self._put_when_full(event)

    def put_marker(self, marker: Marker) -> None:
        """Markers ignore the bound: a flush must be able to queue behind a full buffer."""
        with self._room:
            self._wake_parked()
            if self._overflow is not None and len(self._overflow):
                self._overflow.push_marker(marker)
            else:
                self._queue.append(marker)
        self.wakeup.set()

    def put_boundary(self, event: RunEvent) -> None:
        """A run's start or end: past the bound and whatever the policy (they are rare and
        small), behind the spilled events if there are any; dropped only once closed."""
        with self._room:
            if self._closed:
                self._drop("sink closed")
                return
            self._wake_parked()
            if self._overflow is not None and len(self._overflow):
                self._overflow.push(event)
            else:
                self._queue.append(event)
        if len(self._queue) >= self.wake_at:
            self.wakeup.set()

    @property
    def capacity(self) -> int:
        """The bound in events (``queue_size``, or lower: see `limit`)."""
        return self._capacity

    def limit(self, events: int) -> None:
        """The bound in events from now on: the worker lowers it when events are large, so
        that the buffer stays within its share of ``memory_max_bytes``."""
        with self._room:
            self._capacity = events
            spilling = self._overflow is not None and len(self._overflow)
            if not (self._parked or self._closed or spilling):
                self._maxsize = events

    def park(self) -> bool:
        """The worker's thread is about to go: from now on every put takes the slow path
        (and starts it again). Refused when something is waiting."""
        with self._room:
            if len(self) or self._closed:
                return False
            self._parked = True
            self._maxsize = 0
            return True

    @property
    def parked(self) -> bool:
        return self._parked

    def _wake_parked(self) -> None:
        """Under the lock: restart a parked worker before an event goes in."""
        if self._parked:
            self._parked = False
            if not self._closed and not (self._overflow is not None and len(self._overflow)):
                self._maxsize = self._capacity
            self.unpark()

    def _put_when_full(self, event: RunEvent) -> None:
        """The slow path: the policy chosen in ``when_full`` decides, under the lock."""
        with self._room:
            if self._closed:
                self._drop("sink closed")
                return
            self._wake_parked()
            if len(self._queue) < self._maxsize:  # the worker drained meanwhile
                self._queue.append(event)
                return
            if self._policy == "drop_oldest" and isinstance(self._queue[0], Step):
                self._queue.popleft()  # only a step: a dropped start or end would orphan a run
                self._queue.append(event)
                self._drop("buffer full, dropped the oldest step")
                return
            if self._policy == "block" and self._wait_for_room():
                self._queue.append(event)
                return
            if self._overflow is not None:  # when_full=spill
                if self._overflow.bytes < self._overflow_max_bytes:
                    self._overflow.push(event)
                    self._maxsize = 0
                    return
                self._drop("buffer full and the spill file at spool_max_bytes")
                return
            self._drop("buffer full")

    def _wait_for_room(self) -> bool:
        if threading.get_ident() == self.loop_thread:
            return False  # the worker runs on this very thread: waiting could never end
        deadline = time.monotonic() + self._put_timeout
        self._waiting += 1
        try:
            while len(self._queue) >= self._maxsize and not self._closed:
                self.wakeup.set()
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._room.wait(remaining):
                    break
        finally:
            self._waiting -= 1
        return len(self._queue) < self._maxsize and not self._closed

    def _drop(self, reason: str) -> None:
        """Count a drop; log only the first of a burst (the worker logs the burst's size once
        it is over)."""
        self.outcomes.dropped()
        self._burst += 1
        self.last_drop = time.monotonic()
        if self._burst == 1:
            log.warning(
                "events dropped",
                reason=reason,
                policy=self._policy,
                queue_size=self._capacity,
                put_timeout=self._put_timeout,
            )

    def drain(self, limit: int) -> list[Event]:
        """Take up to ``limit`` events, oldest first, and let blocked producers in."""
        queue = self._queue
        popleft = queue.popleft
        items: list[Event] = [popleft() for _ in range(min(limit, len(queue)))]
        overflow = self._overflow
        if overflow is not None and len(overflow) and len(items) < limit and not queue:
            with self._room:  # the memory part is older than all of the overflow
                items.extend(overflow.pop(limit - len(items)))
                if not len(overflow) and not self._closed:
                    self._maxsize = self._capacity
        if self._waiting:
            with self._room:
                self._room.notify_all()
        return items

    def take_drop_burst(self, quiet: float = 0.0) -> int:
        """How many events the last burst dropped, once no drop came for ``quiet`` seconds
        (0 while it goes on): the worker logs each burst once, at its end."""
        with self._room:
            if not self._burst or time.monotonic() - self.last_drop < quiet:
                return 0
            burst, self._burst = self._burst, 0
        return burst

    def close_overflow(self) -> None:
        if self._overflow is not None:
            self._overflow.close()

    def close(self) -> None:
        """From now on every put is dropped (and counted); markers still pass."""
        with self._room:
            self._closed = True
            self._maxsize = 0
            self._room.notify_all()
