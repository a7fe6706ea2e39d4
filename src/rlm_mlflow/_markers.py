"""Flush and close markers, and the journal's acknowledgements: each is done once every event
routed before it has finished.

A marker waits for the lanes that were busy when it was routed, each up to the number of
events it had been given then (`Lane.enqueued`). Lanes only ever advance, so markers are done
in the order they came, and only the oldest ones need a look. An ack marker (one per journalled
drain) then moves the journal's acknowledged position; the closing marker wakes the loop,
which may end.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from ._event import Marker

if TYPE_CHECKING:
    from ._lane import Lane


class Markers:
    def __init__(self, ack: Callable[[Any], None], wake: Callable[[], None]) -> None:
        self._waiting: deque[tuple[Marker, dict[Lane, int]]] = deque()
        self._ack = ack  # moves the journal's acknowledged position
        self._wake = wake
        self.closing = False  # the closing marker was routed: nothing more will come

    def __bool__(self) -> bool:
        return bool(self._waiting)

    def add(self, marker: Marker, busy: Iterable[Lane]) -> None:
        if marker.closing:
            self.closing = True
        self._waiting.append((marker, {lane: lane.enqueued for lane in busy}))
        self.check()

    def check(self) -> None:
        """Mark done every marker whose events have all finished (the oldest first)."""
        waiting = self._waiting
        while waiting and all(lane.completed >= n for lane, n in waiting[0][1].items()):
            marker, _ = waiting.popleft()
            if marker.ack is not None:
                self._ack(marker.ack)
            marker.done.set()
            if marker.closing:
                self._wake()

    def release(self) -> None:
        """The worker stopped for good: nobody may wait on a marker any more."""
        for marker, _ in self._waiting:
            marker.done.set()
