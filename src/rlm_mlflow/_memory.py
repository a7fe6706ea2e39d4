"""What events hold in memory, estimated cheaply, for the byte bound of what waits there (the
buffer, and what is in flight or retried: the ``memory_max_bytes`` setting).

A plain step is a constant, measured with tracemalloc on CPython 3.11: about 184 bytes in the
buffer (the tuple and its floats), and in flight as much again for its two metric rows. An
event with an ``extra`` (token usage; with traces, a copy of the whole event) is sampled: the
first events, then one in `SAMPLE`, have their extra walked (`size_of`), and the running
average stands for the others. Nothing here runs in a hook.
"""

from __future__ import annotations

import bisect
import sys
from collections.abc import Mapping
from typing import Any

#: The shares of ``memory_max_bytes``: the buffer's, what is in flight (in the lanes, being
#: sent or retried), and a drain being journalled (in memory several times meanwhile). The
#: rest is headroom: the requests' bodies, the allocator's own (measured in `make bench`).
BUFFER_SHARE = 1 / 3
IN_FLIGHT_SHARE = 1 / 3
CHUNK_SHARE = 1 / 32
#: Bytes a plain step holds in the buffer.
STEP_BYTES = 200
#: Bytes a plain step holds in flight: in its lane, and its metric rows while being sent.
STEP_INFLIGHT_BYTES = 400
#: A traced step before it is measured, besides its texts (the event's copy, its action and
#: observation dicts): the buffer's first bound with traces on.
TRACED_GUESS_BYTES = 1024
#: One event with an extra in this many is measured.
SAMPLE = 16
#: The fewest events the buffer's bound in bytes leaves room for, however large they are.
MIN_BUFFER_EVENTS = 64
_ITEMS = 256  # items of one container walked; the rest are extrapolated


def size_of(value: Any, depth: int = 0) -> int:
    """Bytes ``value`` holds, roughly: text and containers walked four levels deep."""
    if isinstance(value, (str, bytes)):
        return sys.getsizeof(value)  # O(1); a text with one non-ASCII character is 2-4x
    if depth >= 4:
        return sys.getsizeof(value, 64)
    if isinstance(value, Mapping):
        items = list(value.items())
        walked = items[:_ITEMS]
        inner = sum(size_of(k, depth + 1) + size_of(v, depth + 1) for k, v in walked)
        return 64 + 40 * len(items) + inner * len(items) // max(len(walked), 1)
    if isinstance(value, (list, tuple)):
        walked = list(value[:_ITEMS])
        inner = sum(size_of(v, depth + 1) for v in walked)
        return 56 + 8 * len(value) + inner * len(value) // max(len(walked), 1)
    try:
        return sys.getsizeof(value, 64)
    except Exception:  # an object whose __sizeof__ raises
        return 64


class Gauge:
    """The average size of events' extras, from samples."""

    def __init__(self) -> None:
        self.average = 0.0
        self._seen = 0
        self._samples = 0

    def weigh(self, extra: Any) -> float:
        """Bytes ``extra`` is taken to hold (the average, refreshed now and then)."""
        self._seen += 1
        if self._samples < SAMPLE or self._seen % SAMPLE == 0:
            self._samples += 1
            self.average += (size_of(extra) - self.average) / min(self._samples, 64)
        return self.average


def buffer_bound(queue_size: int, memory_max_bytes: int, event_bytes: float) -> int:
    """The buffer's bound in events: ``queue_size``, lowered so that that many events of
    ``event_bytes`` fit in the buffer's share of ``memory_max_bytes``."""
    fitting = int(memory_max_bytes * BUFFER_SHARE / max(event_bytes, STEP_BYTES))
    return max(min(queue_size, fitting), min(queue_size, MIN_BUFFER_EVENTS))


class StepSet:
    """The steps a run has logged, as sorted disjoint intervals: a run's steps come in order
    nearly always, so this stays a few integers where a set grows by ~74 bytes a step for as
    long as the run lasts."""

    __slots__ = ("_hi", "_lo")

    def __init__(self) -> None:
        self._lo: list[int] = []
        self._hi: list[int] = []

    def add(self, step: int) -> bool:
        """Add ``step``; False if it was there already."""
        lo, hi = self._lo, self._hi
        if hi and step == hi[-1] + 1:  # the next step: by far the most common case
            hi[-1] = step
            return True
        i = bisect.bisect_right(lo, step) - 1  # the interval starting at or before it
        if i >= 0 and step <= hi[i]:
            return False
        joins_left = i >= 0 and hi[i] + 1 == step
        joins_right = i + 1 < len(lo) and lo[i + 1] == step + 1
        if joins_left and joins_right:
            hi[i] = hi[i + 1]
            del lo[i + 1], hi[i + 1]
        elif joins_left:
            hi[i] = step
        elif joins_right:
            lo[i + 1] = step
        else:
            lo.insert(i + 1, step)
            hi.insert(i + 1, step)
        return True

    def copy(self) -> StepSet:
        other = StepSet()
        other._lo, other._hi = self._lo[:], self._hi[:]
        return other

    def __contains__(self, step: int) -> bool:
        i = bisect.bisect_right(self._lo, step) - 1
        return i >= 0 and step <= self._hi[i]

    def __len__(self) -> int:
        return sum(high - low + 1 for low, high in zip(self._lo, self._hi, strict=True))
