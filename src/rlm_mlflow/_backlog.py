"""The journal as memory's overflow: while what is in flight holds all the memory it may (the
store is away, slow, or refusing us), the worker's drains go to the journal only, and come
back from it, in order, as room is made. So with a spool a server that is down costs neither
drops nor blocked hooks, and memory stays bounded: what waits is on disk.

The backlog is the queue of what was taken from the buffer and not yet routed to the lanes:
records of the journal (by their end position and event count; the events are read back
from disk), flush/close markers (in their place between them), and, should the journal fail
meanwhile (a full disk), events kept in memory so that their order still holds.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

from ._event import Marker, RunEvent
from ._journal import Journal, read_between
from ._records import Position, Problem, parse


class Record(NamedTuple):
    """One drain, journalled and not routed yet."""

    end: Position
    events: int


class Backlog:
    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self._items: deque[Record | Marker | list[RunEvent]] = deque()
        self._read_to = journal.position  # where the oldest record not routed starts
        self.events = 0  # events in the backlog (drained, so counted in flight)
        self._records = 0  # journal records in it

    def __bool__(self) -> bool:
        return bool(self._items)

    def add(self, start: Position, end: Position, events: int) -> None:
        """A record just appended to the journal, from ``start`` (the journal's end before
        it) to ``end``."""
        if not self._records:
            self._read_to = start  # records are contiguous: the first one says where
        self._items.append(Record(end, events))
        self._records += 1
        self.events += events

    def add_marker(self, marker: Marker) -> None:
        self._items.append(marker)

    def add_in_memory(self, events: list[RunEvent]) -> None:
        """Events the journal could not take (it failed): they wait here, in their place."""
        self._items.append(events)
        self.events += len(events)

    def pop(self) -> tuple[Marker | list[RunEvent] | Problem, Position | None, int]:
        """The oldest item: a marker, or a record's events (a `Problem` if it cannot be read
        back), with the journal position it ends at (None for one kept in memory) and its
        number of events."""
        item = self._items.popleft()
        if isinstance(item, Marker):
            return item, None, 0
        if isinstance(item, list):
            self.events -= len(item)
            return item, None, len(item)
        self.events -= item.events
        self._records -= 1
        start, self._read_to = self._read_to, item.end
        try:
            data = read_between(self._journal.dir, start, item.end)
        except OSError as exc:
            return Problem(start[1], f"cannot be read back: {exc}"), item.end, item.events
        records = list(parse(data))
        if len(records) != 1 or isinstance(records[0][1], Problem):
            why = records[0][1].reason if records and isinstance(records[0][1], Problem) else ""
            return Problem(start[1], why or "not one record"), item.end, item.events
        events = records[0][1]
        assert not isinstance(events, Problem)
        return events, item.end, item.events
