"""What the router may hold in memory: bounded in events (``queue_size``) and in bytes (the
shares of ``memory_max_bytes``, estimated by `_memory`). Synchronous, no anyio: the router
asks it how much to take, and after each drain it sets the buffer's bound in events (lowered
when events are large) and when the buffer wakes the worker."""

from __future__ import annotations

from . import _payload as payload
from ._buffer import Buffer
from ._event import RunEvent, RunStart, Step
from ._memory import (
    CHUNK_SHARE,
    IN_FLIGHT_SHARE,
    STEP_BYTES,
    STEP_INFLIGHT_BYTES,
    TRACED_GUESS_BYTES,
    Gauge,
    buffer_bound,
    size_of,
)
from ._settings import Settings


class Budget:
    def __init__(self, buffer: Buffer, settings: Settings) -> None:
        self._buffer = buffer
        self._settings = settings
        self.raw = Gauge()  # extras as the hooks took them (the buffer's share)
        self._admitted = Gauge()  # extras once admitted and cut (the share in flight)
        # An event in the buffer, on average: with traces, a guess (a program and its output
        # at the text limit) until the first events are measured; the buffer starts bounded.
        self._event_bytes = float(STEP_BYTES)
        if settings.traces:
            self._event_bytes += TRACED_GUESS_BYTES + 2 * settings.trace_text_limit
            buffer.limit(
                buffer_bound(settings.queue_size, settings.memory_max_bytes, self._event_bytes)
            )

    def full(self, in_flight: int, held_bytes: float) -> bool:
        """What is in flight holds all the memory it may."""
        s = self._settings
        return in_flight >= s.queue_size or held_bytes >= s.memory_max_bytes * IN_FLIGHT_SHARE

    def chunk(self) -> int:
        """Events taken into the journal at a time: `CHUNK_SHARE` of the memory bound's worth
        (while they are journalled they are in memory several times: events, admitted, JSON)."""
        s = self._settings
        chunk = s.memory_max_bytes * CHUNK_SHARE / self._event_bytes
        return max(1, min(s.queue_size, int(chunk)))

    def room(self, in_flight: int, held_bytes: float) -> int:
        """Events that fit in flight now, in number and in bytes."""
        s = self._settings
        per_event = STEP_INFLIGHT_BYTES + self._admitted.average
        by_bytes = int((s.memory_max_bytes * IN_FLIGHT_SHARE - held_bytes) / per_event)
        return max(1, min(s.queue_size - in_flight, by_bytes))

    def weight(self, event: RunEvent) -> float:
        """Bytes ``event`` holds in flight."""
        if event.__class__ is Step:
            extra = event.extra
            return STEP_INFLIGHT_BYTES + (0.0 if extra is None else self._admitted.weigh(extra))
        params = event.params if isinstance(event, RunStart) else None
        return STEP_INFLIGHT_BYTES + size_of(event.extra) + size_of(params)

    def resize(self, drained: int, extras: int, open_runs: int) -> None:
        """After a drain of ``drained`` events (``extras`` of them with an extra): the buffer's
        bound in events for its share of the memory, and when to wake the worker."""
        s, buffer = self._settings, self._buffer
        if drained:
            share = extras / drained
            estimate = STEP_BYTES + share * self.raw.average
            if estimate > self._event_bytes:  # bigger events: the bound follows at once
                self._event_bytes = estimate
            else:  # smaller: slowly, so that a mixed stream is not taken for small
                self._event_bytes += (estimate - self._event_bytes) / 8
            bound = buffer_bound(s.queue_size, s.memory_max_bytes, self._event_bytes)
            if abs(bound - buffer.capacity) > buffer.capacity // 10:
                buffer.limit(bound)
        # Wake for a drain when every open run has a full log_batch waiting, on average:
        # waking at one batch's worth split over many runs sends many small requests, and a
        # request's fixed cost at the server is what limits throughput.
        per_batch = payload.steps_per_batch(s.batch_size)
        buffer.wake_at = max(
            1, min(per_batch * max(1, open_runs), s.queue_size // 2, buffer.capacity // 2)
        )
