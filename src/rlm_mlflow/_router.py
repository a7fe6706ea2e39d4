"""Routing: from the buffer to one lane per run, in the order the hooks were called. Synchronous
(no anyio): the worker's loop calls `Router.take` between its waits.

A round drains the buffer, admits every event (`Outcomes.admitted`: a bad one is rejected
alone), journals the drain when there is a spool, and routes the events to their run's lane;
flush/close markers and the journal's acks go to `_markers`. What is held in memory is bounded
(`_budget`). When what is in flight holds all it may, a spool takes the drains instead
(`_backlog`), and they come back from it as room is made; without one the worker stops
taking, the buffer fills, and its full-buffer policy applies.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ._backlog import Backlog
from ._budget import Budget
from ._buffer import Buffer
from ._counters import Outcome
from ._event import Event, Marker, RunEnd, RunEvent, RunStart, Step
from ._journal import Journal
from ._lane import Lane, countable
from ._log import log
from ._markers import Markers
from ._memory import STEP_INFLIGHT_BYTES
from ._outcomes import Outcomes, hook_name
from ._payload import is_plain_step
from ._records import Position, Problem
from ._run import Run
from ._settings import Settings


class Router:
    def __init__(
        self,
        buffer: Buffer,
        settings: Settings,
        outcomes: Outcomes,
        journal: Journal | None,
        spawn: Callable[[Lane], None],
    ) -> None:
        self._buffer = buffer
        self._settings = settings
        self._outcomes = outcomes
        self.journal = journal
        self.journal_error: str | None = None  # why the journal takes no more (a full disk)
        self.backlog = Backlog(journal) if journal is not None else None
        self._spawn = spawn  # gives a lane with events a task of the worker's loop
        self.open: dict[str, Lane] = {}  # started, end not yet routed
        self.busy: set[Lane] = set()  # lanes with unfinished events
        self.markers = Markers(self._ack, buffer.wakeup.set)
        self._budget = Budget(buffer, settings)

    # -- what the loop asks --------------------------------------------------------------------

    def in_flight(self) -> int:
        """Events taken from the buffer and held in memory, not finished yet."""
        return self._outcomes.stats.inflight - (self.backlog.events if self.backlog else 0)

    def held_bytes(self) -> float:
        return sum(lane.pending_bytes + lane.sending_bytes for lane in self.busy)

    def full(self) -> bool:
        """What is in flight holds all the memory it may."""
        return self._budget.full(self.in_flight(), self.held_bytes())

    def spool_takes(self) -> bool:
        """A journal that takes more (not failed, not at ``spool_max_bytes``)."""
        return self.journal_error is None and self.journal is not None and not self.journal.full()

    def ready(self) -> bool:
        """Work waiting that needs no wake-up: the backlog, with room to read it back."""
        return bool(self.backlog) and not self.full()

    def settled(self) -> bool:
        """Nothing left anywhere: every event routed and finished."""
        return not self.busy and not self.backlog and len(self._buffer) == 0

    # -- a round ---------------------------------------------------------------------------------

    def take(self) -> None:
        """One round: buffer -> lanes; or, while a backlog exists or memory is full and a
        spool takes it, buffer -> journal and journal -> lanes as room allows."""
        if self.backlog or (self.full() and self.spool_takes()):
            if self.spool_takes():
                self.journal_only(self._drain(self._budget.chunk()))
            self._read_back()
        elif not self.full() and (self.journal is None or not self.journal.full()):
            self.route_all(self._drain(self._budget.room(self.in_flight(), self.held_bytes())))

    def _drain(self, limit: int) -> list[Event]:
        """Up to ``limit`` events from the buffer, counted as taken in the same breath."""
        with self._outcomes.taking() as took:
            drained = self._buffer.drain(limit)
            took(len(drained) - sum(1 for e in drained if e.__class__ is Marker))
        return drained

    def route_all(self, drained: list[Event]) -> None:
        """Admit, journal and route one drain, in order. Steps that are already plain (the
        common case by far) take a short way: no second event, no call per step; they are
        gathered per lane and handed over at once, before anything else is routed (so each
        lane's order holds, and a marker counts them)."""
        writable = self.journal is not None and self.journal_error is None
        journalled: list[RunEvent] | None = [] if writable else None
        open_, unavailable = self.open, self._outcomes.unavailable is not None
        plain: dict[Lane, list[Event]] = {}
        extras = 0
        for item in drained:
            try:
                if isinstance(item, Marker):
                    if plain:
                        self._enqueue_plain(plain)
                    self.add_marker(item)
                    continue
                if isinstance(item, Step) and item[5] is None:
                    if (
                        not unavailable
                        and is_plain_step(item)
                        and (lane := open_.get(item.run_id)) is not None
                    ):
                        if journalled is not None:
                            journalled.append(item)
                        if (steps := plain.get(lane)) is None:
                            plain[lane] = [item]
                        else:
                            steps.append(item)
                        continue
                elif item.__class__ is Step:
                    extras += 1
                    self._budget.raw.weigh(item.extra)
                event = self._outcomes.admitted(item, self._settings.trace_text_limit)
                if event is None:
                    continue
                if journalled is not None:
                    journalled.append(event)
                if plain:
                    self._enqueue_plain(plain)
                self._route(event)
            except Exception as exc:  # a bug of ours: this event alone pays for it
                log.exception("internal error routing an event", error=repr(exc)[:300])
                if not isinstance(item, Marker):
                    self._outcomes.record(Outcome.FAILED, 1, f"routing: {exc!r}"[:300])
        if plain:
            self._enqueue_plain(plain)
        position = self._journal_append(journalled) if journalled else None
        self._budget.resize(len(drained), extras, len(self.open))
        if position is not None:
            self._ack_after(position)

    def journal_only(self, drained: list[Event]) -> None:
        """Admit and journal one drain without routing it: it joins the backlog."""
        assert self.backlog is not None
        events: list[RunEvent] = []
        extras = 0
        for item in drained:
            if isinstance(item, Marker):  # in its place between the records
                self._to_backlog(events)
                events = []
                self.backlog.add_marker(item)
                continue
            if item.__class__ is Step and item.extra is not None:
                extras += 1
                self._budget.raw.weigh(item.extra)
            plain = item.__class__ is Step and item[5] is None and is_plain_step(item)
            event = (
                item if plain else self._outcomes.admitted(item, self._settings.trace_text_limit)
            )
            if event is not None:
                events.append(event)
        self._to_backlog(events)
        self._budget.resize(len(drained), extras, len(self.open))

    def _to_backlog(self, events: list[RunEvent]) -> None:
        assert self.backlog is not None and self.journal is not None
        if not events:
            return
        start = self.journal.position
        end = self._journal_append(events)
        if end is None:
            self.backlog.add_in_memory(events)
        else:
            self.backlog.add(start, end, len(events))

    def _read_back(self) -> None:
        """Route the backlog's oldest items while there is room in memory."""
        backlog = self.backlog
        while backlog and not self.full():
            item, end, events = backlog.pop()
            if isinstance(item, Marker):
                self.add_marker(item)
                continue
            if isinstance(item, Problem):  # our own record, damaged on disk since
                self._outcomes.record(Outcome.FAILED, events)
                log.error("journal record lost", events=events, reason=item.reason)
            else:
                for event in item:
                    try:
                        self._route(event)
                    except Exception as exc:  # a bug of ours: this event alone pays
                        log.exception("internal error routing an event", error=repr(exc)[:300])
                        self._outcomes.record(Outcome.FAILED, 1, f"routing: {exc!r}"[:300])
            if end is not None:
                self._ack_after(end)

    def _journal_append(self, events: list[RunEvent]) -> Position | None:
        journal = self.journal
        if journal is None or self.journal_error is not None or self._outcomes.import_error:
            return None
        try:
            return journal.append(events)
        except OSError as exc:
            self._journal_failed(exc)
            return None

    def _journal_failed(self, exc: OSError) -> None:
        """A write failed (a full disk): no more records, but the journal stays ours (its
        lock held) until close, which removes it only if everything in it landed."""
        assert self.journal is not None
        self.journal_error = f"{type(exc).__name__}: {exc}"
        log.error(
            "spool write failed; going on without it (what it holds stays for a sync)",
            journal=str(self.journal.dir),
            error=self.journal_error,
        )
        self._outcomes.spooling = False

    def _route(self, event: RunEvent) -> None:
        if self._outcomes.unavailable is not None:
            self._outcomes.give_up(countable([event]))
            return
        lane = self.open.get(event.run_id)
        if isinstance(event, RunStart):
            if lane is not None:
                self._outcomes.reject(event, "on_run_start for a run that is already open")
                return
            parent_id = event.params.get("parent_run_id")
            if parent_id is None and event.extra is not None:  # a case under its benchmark
                parent_id = event.extra.get("parent")
            parent = self.open.get(str(parent_id)) if parent_id is not None else None
            lane = self.open[event.run_id] = Lane(Run(event, parent.run if parent else None))
            if parent is not None:  # the parent's next step delegated it
                parent.run.trajectory.children.append((event.run_id, event.key))
        elif lane is None:
            self._outcomes.reject(event, f"{hook_name(event)} for a run that is not open")
            return
        elif isinstance(event, RunEnd):
            del self.open[event.run_id]
        self.enqueue(lane, event, self._budget.weight(event))

    def enqueue(self, lane: Lane, event: Event, weight: float) -> None:
        if lane.enqueue(event, weight):  # a running lane is busy already
            self.busy.add(lane)
            self._spawn(lane)

    def _enqueue_plain(self, plain: dict[Lane, list[Event]]) -> None:
        for lane, steps in plain.items():
            if lane.enqueue_steps(steps, STEP_INFLIGHT_BYTES * len(steps)):
                self.busy.add(lane)
                self._spawn(lane)
        plain.clear()

    def batch_done(self, lane: Lane) -> None:
        """A lane sent a batch: markers may be done, and room was made for more."""
        if not lane.pending:
            self.busy.discard(lane)
        self.markers.check()
        if len(self._buffer) or self.backlog:
            self._buffer.wakeup.set()

    def add_marker(self, marker: Marker) -> None:
        if marker.closing:
            now = time.time()
            for run_id, lane in list(self.open.items()):
                log.warning("run was never ended; ending it as KILLED", run_id=run_id)
                del self.open[run_id]
                end = RunEnd(run_id, now, None, None, None, None, "KILLED", None, True)
                self.enqueue(lane, end, STEP_INFLIGHT_BYTES)
        self.markers.add(marker, self.busy)

    def _ack_after(self, position: Position) -> None:
        """Once every event before ``position`` has finished, the journal may let it go."""
        if not self._outcomes.keep_journal:
            starts = [lane.run.start for lane in self.open.values()]
            self.add_marker(Marker(ack=(position, starts)))

    def _ack(self, ack: tuple[Position, list[RunStart]]) -> None:
        journal = self.journal
        if journal is None or self._outcomes.keep_journal or self.journal_error is not None:
            return
        try:
            journal.ack(*ack)
        except OSError as exc:
            self._journal_failed(exc)

    def recover(self) -> None:
        """After a crash of the loop (what was in flight is counted failed): the lanes let go
        of their events; runs whose creation was lost will be created again."""
        for lane in self.busy:
            lane.drop_all()
        self.busy.clear()
        for lane in self.open.values():
            lane.run.lost_creation()
        self.markers.check()

    def restart(self) -> None:
        """In a new loop (after a park, a crash, or a loop that went away under a task-mode
        worker): the lanes with events get a task in it (`Lane.restart`)."""
        for lane in {*self.open.values(), *self.busy}:
            lane.run.renew_created()
        for lane in list(self.busy):
            if lane.restart():
                self._spawn(lane)
            else:
                self.busy.discard(lane)
        self.markers.check()

    def last_attempt(self, unended: set[Run]) -> list[tuple[Run, RunEnd, bool]]:
        """The close deadline ran out: for every run the caller started, its end (its own if
        it came, else the sink's KILLED) and whether it must be created first. The lanes give
        up the rest: steps still waiting are not sent."""
        ends: dict[Run, RunEnd | None] = {lane.run: lane.take_unsent() for lane in self.busy}
        for run in unended:
            ends.setdefault(run, None)
        jobs = []
        for run, end in ends.items():
            if end is None or end.own:
                end = RunEnd(run.run_id, time.time(), None, None, None, None, "KILLED", None, True)
            jobs.append((run, end, run.mlflow_id is None and run.start_error is None))
        return jobs

    def drain_rest(self, until: float | None) -> int:
        """At the end of the loop: take what is left in the buffer, in chunks (journal only
        while a backlog exists), until ``until`` (time.monotonic(); None: no limit). With a
        deadline and no spool to keep them, steps are counted failed at once (the close's
        last attempt sends none), so that its time goes to the runs' starts and ends.
        Returns how many events were left (the worker counts them)."""
        while len(self._buffer) and (until is None or time.monotonic() < until):
            chunk = self._drain(min(1000, self._budget.chunk()))
            if self.backlog and self.spool_takes():
                self.journal_only(chunk)
            elif until is not None and not self.spool_takes():
                steps = sum(1 for e in chunk if e.__class__ is Step)
                self._outcomes.record(Outcome.FAILED, steps, "the close deadline ran out")
                self.route_all([e for e in chunk if e.__class__ is not Step])
            else:
                self.route_all(chunk)
        return len(self._buffer)

    def count_unrouted(self) -> None:
        """The close deadline ran out before the rest of the buffer could be taken: counted
        failed (not journalled, not sent), markers released."""
        rest = self._buffer.drain(len(self._buffer))
        events = countable(rest)
        self._outcomes.took(events)
        self._outcomes.record(Outcome.FAILED, events, "the close deadline ran out")
        for item in rest:
            if isinstance(item, Marker):
                item.done.set()
        log.error("close deadline ran out before these events could be taken", events=events)
