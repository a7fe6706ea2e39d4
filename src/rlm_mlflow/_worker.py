"""The worker: one anyio event loop in one background thread.

It drains the buffer, admits each event (`_batcher.admit`: the one place where values are
checked; a bad one is rejected alone), journals the drain when a spool is set, and routes the
events to one *lane* per run. Each lane sends its events in order: the run is created before
any batch of it is sent, step batches go out concurrently (up to the adapter's in-flight
limit), and the run is terminated only after all of them finished. Lanes of different runs
never wait on each other, except a child run's creation, which waits for its parent's so
that it can carry the ``mlflow.parentRunId`` tag.

Every event that leaves the buffer ends in exactly one counter of `Stats`, whatever happens:
an internal error in one lane counts that lane's batch as failed, a crash of the loop counts
what was in flight and starts the loop again, and a close whose deadline runs out still ends
every run it can in a short last attempt and counts the rest. A worker with nothing to do for
`IDLE_PARK_S` lets its thread go; the next event starts it again.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread
from anyio.abc import TaskGroup
from tenacity import RetryCallState

from . import _batcher as batcher
from ._buffer import Buffer
from ._deadletter import DeadLetters
from ._event import Event, Marker, RunEnd, RunEvent, RunStart, Step
from ._exporter import Connection, ExperimentDeleted, is_transient
from ._journal import Journal
from ._log import log
from ._records import Position
from ._redact import redact_text, redact_uri
from ._settings import Settings

U = TypeVar("U")

#: Seconds without anything to do after which the worker's thread is let go.
IDLE_PARK_S = 20.0
#: At most this many seconds of a close's timeout are kept for the last attempt to end runs.
LAST_ATTEMPT_S = 5.0


@dataclass
class Stats:
    """Counters written by the worker thread only; read from anywhere (plain ints)."""

    drained: int = 0
    delivered: int = 0
    rejected: int = 0  # bad input, refused before sending
    dead_lettered: int = 0  # refused by MLflow for good; written to the dead-letter file
    failed: int = 0  # not delivered (unreachable past the deadline, or unavailable), no spool
    spooled: int = 0  # not delivered, kept in the journal for a later sync
    discarded: int = 0  # drained while mlflow cannot be imported
    retried: int = 0
    skipped: int = 0  # parts of an event not logged: non-scalar params, a missing run path
    last_error: str | None = None

    @property
    def finished(self) -> int:
        return (
            self.delivered
            + self.rejected
            + self.dead_lettered
            + self.failed
            + self.spooled
            + self.discarded
        )


@dataclass(eq=False)
class Lane:
    """One run's ordered stream of events on its way to MLflow."""

    start: RunStart
    parent: Lane | None
    created: anyio.Event = field(default_factory=anyio.Event)
    mlflow_id: str | None = None
    start_error: BaseException | None = None
    seen_steps: set[int] = field(default_factory=set)
    pending: list[Event] = field(default_factory=list)
    sending: list[Event] = field(default_factory=list)  # the batch a lane task is sending
    enqueued: int = 0
    completed: int = 0  # advanced only when a whole batch of pending events is done
    finished: int = 0  # events of this lane counted in Stats (see Worker._tally)
    running: bool = False
    terminated: bool = False
    recreate: bool = False  # its start was lost in a crash of the loop: create it again

    @property
    def run_id(self) -> str:
        return self.start.run_id


def _countable(events: Sequence[Event]) -> int:
    """Caller's events among ``events``: not markers, not the sink's own KILLED ends."""
    return sum(
        1
        for e in events
        if not isinstance(e, Marker) and not (isinstance(e, RunEnd) and e.status == "KILLED")
    )


class Worker:
    def __init__(
        self,
        buffer: Buffer,
        settings: Settings,
        tracking_uri: str | None,
        experiment: str,
        *,
        dead_letters: DeadLetters,
        journal: Journal | None = None,
        replaying: bool = False,
        park: bool = True,
    ) -> None:
        self._buffer = buffer
        self._settings = settings
        self._tracking_uri = tracking_uri
        self._experiment = experiment
        self._dead_letters = dead_letters
        self._journal = journal
        self._replaying = replaying  # a run may already exist: look it up by its key first
        self._may_park = park
        self.stats = Stats()
        self.import_error: str | None = None
        self.unavailable: str | None = None  # why nothing can be sent (status' detail)
        self.resolved_uri: str | None = None
        self._adapter: Connection | None = None
        self._connected_event: anyio.Event | None = None  # anyio objects need the loop
        self._open: dict[str, Lane] = {}  # started, end not yet routed
        self._unended: set[Lane] = set()  # created in MLflow, not yet terminated
        self._busy: set[Lane] = set()  # lanes with unfinished events
        self._markers: list[tuple[Marker, dict[Lane, int]]] = []
        self._closing = False
        self._hold_acks = False  # something is kept for a later replay: the journal must stay
        self._rejections_logged: set[tuple[str, str]] = set()
        self._experiment_checked = 0.0
        self._abort = False
        self._stop_by = 0.0  # time.monotonic() by which an aborted worker must be done
        self._loops = 0  # event loops running this worker (a parked one has none)
        self._state = threading.RLock()  # re-entrant: a signal handler may close meanwhile
        self._tg: TaskGroup | None = None
        self._thread: threading.Thread | None = None
        buffer.unpark = self._unpark

    # -- caller's side -------------------------------------------------------------------------

    def start(self) -> None:
        """Run the worker in a thread of its own (else ``run`` is a task of the caller's)."""
        with self._state:
            self._loops += 1  # from now: flush() may wait for it
            self._thread = threading.Thread(
                target=anyio.run, args=(self.run,), name="rlm-mlflow", daemon=True
            )
            self._thread.start()

    def _unpark(self) -> None:
        """Called by the buffer, under its lock, when an event comes for a parked worker."""
        log.debug("worker starts again after a pause")
        self.start()

    def stop(self, deadline: float) -> None:
        """Cancel whatever is still in flight, make a last attempt to end the runs by
        ``deadline`` (time.monotonic()), and count the rest. Does not wait (see `join`)."""
        self._stop_by = min(deadline, self._stop_by) if self._abort else deadline
        self._abort = True
        self._buffer.wakeup.set()

    def join(self, deadline: float) -> None:
        """Wait for the thread to end (a second past ``deadline`` at most)."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()) + 1.0)

    @property
    def alive(self) -> bool:
        """Running, or parked (the next event starts it again)."""
        return self._loops > 0 or self._buffer.parked

    def release_files_after_fork(self) -> None:
        """In a forked child: close the inherited journal and spill files, never write them."""
        if self._journal is not None:
            self._journal.close(remove=False)
        self._buffer.close_overflow()

    # -- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        """The worker's life: in its own thread, or as a task of the caller's loop."""
        with self._state:
            if self._thread is not threading.current_thread():
                self._loops += 1  # a task-mode worker is counted here
        parked = False
        try:
            for _ in range(10):
                try:
                    parked = await self._main()
                    break
                except Exception as exc:  # a bug of ours: count, say so, and carry on
                    self._recover(exc)
            else:
                log.error("worker keeps crashing; it stops", crashes=10)
                self._buffer.close()
            if not parked:
                await self._finish()
        finally:
            with self._state:
                self._loops -= 1
            if not parked:  # stopped for good: nobody may wait on a marker any more
                for marker, _ in self._markers:
                    marker.done.set()

    async def _main(self) -> bool:
        """Drain, route, repeat; until closed and idle, or aborted (False), or parked (True)."""
        if self._connected_event is None or (self._adapter is None and self.unavailable is None):
            self._connected_event = anyio.Event()
        idle_since = time.monotonic()
        parked = False
        async with anyio.create_task_group() as tg:
            self._tg = tg
            if not self._connected_event.is_set():
                tg.start_soon(self._connect)
            self._restart_lanes()
            while True:
                # Sleep until a full batch waits (the hooks wake us), a marker comes, or the
                # flush interval passes; and while the lanes (or the journal) are full.
                if len(self._buffer) < self._buffer.wake_at or self._no_room():
                    await anyio.to_thread.run_sync(
                        self._buffer.wakeup.wait,
                        self._settings.flush_interval,
                        abandon_on_cancel=True,
                    )
                self._buffer.wakeup.clear()
                if self._abort:
                    break
                if not self._no_room():
                    self._route_all(
                        self._buffer.drain(self._settings.queue_size - self._inflight())
                    )
                self._report_drops(quiet=self._settings.put_timeout + 5.0)
                if self._closing and not self._busy and len(self._buffer) == 0:
                    break
                if not self._idle():
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since >= IDLE_PARK_S and self._buffer.park():
                    parked = True  # the thread goes; the next put starts a new one
                    break
                await anyio.lowlevel.checkpoint()  # let the lanes run between drains
            tg.cancel_scope.cancel()  # the connect task, lanes still sending when aborted
        return parked

    def _idle(self) -> bool:
        connected = self._connected_event is not None and self._connected_event.is_set()
        return (
            self._may_park
            and connected
            and not self._busy
            and not self._markers
            and not self._closing
            and len(self._buffer) == 0
        )

    def _restart_lanes(self) -> None:
        """After a park or a crash: the lanes with events get a task in the new loop."""
        for lane in list(self._busy):
            lane.running = False
            if lane.pending:
                self._spawn(lane)

    def _recover(self, exc: BaseException) -> None:
        """The loop crashed (a bug): what was in flight is counted failed; the buffer, and
        the runs open in MLflow, stay as they are for the next loop."""
        lost = self._inflight()
        log.error(
            "worker loop crashed; what was in flight is counted failed, the loop restarts",
            error=redact_text(f"{type(exc).__name__}: {exc}")[:500],
            events=lost,
            exc_info=exc,
        )
        self.stats.last_error = redact_text(f"worker crashed: {exc!r}")[:500]
        self.stats.failed += lost
        for lane in self._busy:
            lane.pending.clear()
            lane.completed = lane.enqueued
            lane.running = False
        self._busy.clear()
        for lane in self._open.values():  # the run's later events still deserve to land
            if lane.mlflow_id is None and lane.start_error is None:
                lane.recreate = True
                lane.created = anyio.Event()
        self._check_markers()

    def _no_room(self) -> bool:
        journal_full = self._journal is not None and self._journal.full()
        return journal_full or self._inflight() >= self._settings.queue_size

    def _inflight(self) -> int:
        return self.stats.drained - self.stats.finished

    async def _connect(self) -> None:
        """Import mlflow and reach the store; retried until it works or the sink is closed.

        The loop drains (and journals) meanwhile: a server that is down at start costs
        nothing but the wait.
        """
        assert self._connected_event is not None
        delay = 0.5
        try:
            while True:
                try:
                    self._adapter = await anyio.to_thread.run_sync(
                        Connection.open,
                        self._tracking_uri,
                        self._experiment,
                        self._settings,
                        self._on_retry,
                        abandon_on_cancel=True,
                    )
                    break
                except ImportError as exc:
                    self.import_error = f"unavailable: {exc}"
                    self._set_unavailable(self.import_error)
                    log.error("mlflow cannot be imported; events are discarded", error=str(exc))
                    self._buffer.close()
                    return
                except ExperimentDeleted as exc:
                    self._set_unavailable(f"unavailable: {exc}")
                    return
                except Exception as exc:
                    self._note_error("connect", exc)
                    self.stats.retried += 1
                    log.warning(
                        "tracking store unreachable, retrying",
                        retry_in=delay,
                        tracking_uri=redact_uri(self._tracking_uri),
                        error=redact_text(str(exc))[:300],
                    )
                    await anyio.sleep(delay)
                    delay = min(delay * 2, 10.0)
            log.info(
                "connected",
                tracking_uri=redact_uri(self._adapter.tracking_uri),
                experiment=self._experiment,
                experiment_id=self._adapter.experiment_id,
            )
            self.resolved_uri = redact_uri(self._adapter.tracking_uri)  # after: see cli.Progress
        finally:
            self._connected_event.set()

    def _set_unavailable(self, reason: str) -> None:
        """From now on nothing is sent: events are kept in the journal (spooled) if there is
        one, else counted failed (discarded when mlflow is missing)."""
        if self.unavailable is None and self.import_error is None:
            log.error(
                "MLflow sink unavailable; events are kept in the spool"
                if self._journal is not None
                else "MLflow sink unavailable; events are counted failed (no spool)",
                reason=reason,
            )
        self.unavailable = reason
        self.stats.last_error = reason[:500]

    async def _finish(self) -> None:
        """After the loop: when the close deadline ran out, a last attempt to end the runs;
        then account for everything that did not get out, and settle the journal."""
        self._tg = None  # routed from now on, never sent by a lane
        self._route_all(self._buffer.drain(len(self._buffer)))
        connected = self._adapter is not None and self.unavailable is None
        if self._abort and connected and (self._busy or self._unended):
            with anyio.move_on_after(max(0.0, self._stop_by - time.monotonic())):
                await self._last_attempt()
        self._report_drops(quiet=0.0)
        lost = self._inflight()
        if self._journal is not None:
            if lost:
                self._give_up(lost)
                log.warning(
                    "events kept in the spool for a later sync",
                    events=lost,
                    journal=str(self._journal.dir),
                )
            self._journal.close(remove=not self._hold_acks)
        elif lost:
            self._give_up(lost)
            log.error(
                "worker stopped with events undelivered; they are lost (no spool)",
                events=lost,
                delivered=self.stats.delivered,
            )

    async def _last_attempt(self) -> None:
        """The close deadline ran out: every run the caller started is created if it was
        not yet (and the time allows), and ended: FINISHED with its summary if its end came,
        else KILLED. Steps still waiting are not sent (they are counted by the caller); no
        artifacts."""
        async with anyio.create_task_group() as tg:
            for lane in self._busy | self._unended:
                unsent = lane.sending + lane.pending  # the batch a cancelled task was sending
                lane.sending, lane.pending = [], []
                end = next((e for e in unsent if isinstance(e, RunEnd)), None)
                if end is None or end.status == "KILLED":
                    end = RunEnd(lane.run_id, time.time(), None, None, None, None, "KILLED")
                create = lane.mlflow_id is None and lane.start_error is None
                tg.start_soon(self._close_run, lane, end, create)

    async def _close_run(self, lane: Lane, end: RunEnd, create: bool) -> None:
        try:
            if create:  # its start may have been in flight: find the run before creating it
                await self._start(lane, lane.start, find=True)
            if lane.mlflow_id is not None and not lane.terminated:
                await self._end(lane, end, upload=False)
        except Exception as exc:  # a bug of ours: the other runs still get their end
            log.exception(
                "internal error ending a run at close", run_id=lane.run_id, error=repr(exc)
            )

    # -- routing (event loop thread, in buffer order) --------------------------------------------

    def _route_all(self, drained: list[Event]) -> None:
        admitted, position = self._intake(drained)
        for event in admitted:
            try:
                self._route(event)
            except Exception as exc:  # a bug of ours: this event alone pays for it
                log.exception("internal error routing an event", error=repr(exc)[:300])
                if not isinstance(event, Marker):
                    self.stats.failed += 1
        # Wake for a drain when every open run has a full log_batch waiting, on average:
        # waking at one batch's worth split over many runs sends many small requests, and a
        # request's fixed cost at the server is what limits throughput.
        per_batch = batcher.steps_per_batch(self._settings.batch_size)
        self._buffer.wake_at = max(
            per_batch, min(per_batch * len(self._open), self._settings.queue_size // 2)
        )
        if position is not None and not self._hold_acks:
            self._add_marker(Marker(ack=(position, [lane.start for lane in self._open.values()])))

    def _intake(self, drained: Sequence[Event]) -> tuple[list[Event], Position | None]:
        """Count what left the buffer, admit it, and journal what was admitted."""
        self.stats.drained += sum(1 for e in drained if not isinstance(e, Marker))
        admitted: list[Event] = []
        for item in drained:
            event = item if isinstance(item, Marker) else self._admit(item)
            if event is not None:
                admitted.append(event)
        events: list[RunEvent] = [e for e in admitted if not isinstance(e, Marker)]
        return admitted, self._journal_append(events)

    def _admit(self, event: RunEvent) -> RunEvent | None:
        try:
            admitted, problems = batcher.admit(event)
        except batcher.BadInput as exc:
            self._reject(event, str(exc))
            return None
        except Exception as exc:  # a value that broke a check: reject it, alone
            self._reject(event, f"cannot be read: {type(exc).__name__}: {str(exc)[:200]}")
            return None
        if problems:
            self.stats.skipped += len(problems)
            log.warning(
                "parts of an event not logged",
                run_id=admitted.run_id,
                hook=_hook_name(admitted),
                reason="; ".join(problems),
            )
        return admitted

    def _journal_append(self, events: list[RunEvent]) -> Position | None:
        if self._journal is None or not events or self.import_error is not None:
            return None
        try:
            return self._journal.append(events)
        except OSError as exc:  # e.g. a full disk: go on without the spool
            log.error(
                "spool write failed; going on without it (what it holds stays for a sync)",
                journal=str(self._journal.dir),
                error=str(exc),
            )
            self._journal.close(remove=False)
            self._journal = None
            return None

    def _route(self, event: Event) -> None:
        if isinstance(event, Marker):
            self._add_marker(event)
            return
        if self.unavailable is not None:
            self._give_up(_countable([event]))
            return
        lane = self._open.get(event.run_id)
        if isinstance(event, RunStart):
            if lane is not None:
                self._reject(event, "on_run_start for a run that is already open")
                return
            parent_id = event.params.get("parent_run_id")
            parent = self._open.get(str(parent_id)) if parent_id is not None else None
            lane = self._open[event.run_id] = Lane(event, parent)
        elif lane is None:
            self._reject(event, f"{_hook_name(event)} for a run that is not open")
            return
        elif isinstance(event, RunEnd):
            del self._open[event.run_id]
        self._enqueue(lane, event)

    def _enqueue(self, lane: Lane, event: Event) -> None:
        lane.pending.append(event)
        lane.enqueued += 1
        self._busy.add(lane)
        if not lane.running:
            self._spawn(lane)

    def _spawn(self, lane: Lane) -> None:
        if self._tg is None:  # the loop is over: what is routed now waits for _last_attempt
            return
        lane.running = True
        self._tg.start_soon(self._drive, lane, name=f"lane {lane.run_id[:80]}")

    def _add_marker(self, marker: Marker) -> None:
        if marker.closing:
            self._closing = True
            now = time.time()
            for run_id, lane in list(self._open.items()):
                log.warning("run was never ended; ending it as KILLED", run_id=run_id)
                del self._open[run_id]
                self._enqueue(lane, RunEnd(run_id, now, None, None, None, None, "KILLED"))
        waits = {lane: lane.enqueued for lane in self._busy}
        self._markers.append((marker, waits))
        self._check_markers()

    def _check_markers(self) -> None:
        for entry in list(self._markers):
            marker, waits = entry
            if all(lane.completed >= n for lane, n in waits.items()):
                self._markers.remove(entry)
                if marker.ack is not None and self._journal is not None and not self._hold_acks:
                    self._journal.ack(*marker.ack)
                marker.done.set()
                if marker.closing:
                    self._buffer.wakeup.set()

    # -- sending (one task per busy lane) --------------------------------------------------------

    async def _drive(self, lane: Lane) -> None:
        assert self._connected_event is not None
        await self._connected_event.wait()
        while lane.pending:
            batch, lane.pending = lane.pending, []
            lane.sending = batch
            before = lane.finished
            try:
                if self._adapter is None or self.unavailable is not None:
                    self._give_up(_countable(batch), lane)
                else:
                    await self._send(lane, batch)
            except Exception as exc:  # a bug of ours: this batch alone pays for it
                lost = _countable(batch) - (lane.finished - before)
                log.exception(
                    "internal error sending a run's events; they are counted failed",
                    run_id=lane.run_id,
                    events=lost,
                    error=repr(exc)[:300],
                )
                self._tally(lane, "failed", max(0, lost))
            lane.sending = []
            lane.completed += len(batch)
            if lane.completed == lane.enqueued:
                self._busy.discard(lane)
            self._check_markers()
            if len(self._buffer):  # room was made: the loop may drain again
                self._buffer.wakeup.set()
        lane.running = False

    async def _send(self, lane: Lane, batch: list[Event]) -> None:
        if lane.recreate:
            lane.recreate = False
            await self._start(lane, lane.start, counted=False)
        steps: list[Step] = []
        for event in batch:
            if isinstance(event, Step):
                steps.append(event)
                continue
            await self._send_steps(lane, steps)
            steps = []
            if isinstance(event, RunStart):
                await self._start(lane, event)
            elif isinstance(event, RunEnd):
                await self._end(lane, event)
        await self._send_steps(lane, steps)

    async def _start(
        self, lane: Lane, event: RunStart, counted: bool = True, find: bool = False
    ) -> None:
        """Create the run (or, replaying or ``find``, find it by its key first), then log its
        params. ``counted`` is off when the start event was already counted (re-created after
        a crash of the loop)."""
        adapter = self._ready_adapter()
        events = 1 if counted else 0
        try:
            parent_mlflow_id = None
            if lane.parent is not None:
                await lane.parent.created.wait()
                parent_mlflow_id = lane.parent.mlflow_id
            if self._replaying or find:
                lane.mlflow_id = await adapter.find_run(event.key)
            if lane.mlflow_id is None:
                tags = batcher.run_tags(lane.run_id, parent_mlflow_id, event.key)
                lane.mlflow_id = await adapter.create_run(
                    batcher.run_name(lane.run_id), batcher.timestamp_ms(event.time), tags
                )
            self._unended.add(lane)
        except Exception as exc:
            lane.start_error = exc
            await self._undeliverable(events, lane, "create_run", exc, [{"run_id": lane.run_id}])
            return
        finally:
            lane.created.set()
        mlflow_id = lane.mlflow_id
        params = [(key, str(value)) for key, value in event.params.items()]
        failures = await self._bisect(params, lambda part: adapter.log_params(mlflow_id, part))
        for part, error in failures:
            await self._undeliverable(
                0, lane, "log_params", error, [{"key": k, "value": v} for k, v in part]
            )
        if failures:
            self._count_outcome(lane, failures[-1][1], events)
        else:
            self._tally(lane, "delivered", events)

    async def _send_steps(self, lane: Lane, steps: list[Step]) -> None:
        rows: list[batcher.MetricRow] = []
        for event in steps:
            if event.step in lane.seen_steps:
                self._reject(event, f"step {event.step} repeated (the first one was kept)", lane)
                continue
            lane.seen_steps.add(event.step)
            rows.extend(batcher.step_rows(event))
        if not rows:
            return
        if lane.mlflow_id is None:
            assert lane.start_error is not None
            await self._undeliverable(
                len(rows) // 2, lane, "log_batch", lane.start_error, _metric_dicts([rows])
            )
            return
        async with anyio.create_task_group() as tg:
            for part in batcher.step_batches(rows, self._settings.batch_size):
                tg.start_soon(self._send_rows, lane, part)

    async def _send_rows(self, lane: Lane, rows: list[batcher.MetricRow]) -> None:
        """One log_batch of step metrics; a refused one is bisected down to single metrics."""
        mlflow_id = lane.mlflow_id
        assert mlflow_id is not None
        adapter = self._ready_adapter()
        failures = await self._bisect(rows, lambda part: adapter.log_metrics(mlflow_id, part))
        lost: dict[int, Exception] = {}  # step -> why (an event is lost if either metric is)
        for part, exc in failures:
            await self._undeliverable(0, lane, "log_batch", exc, _metric_dicts([part]))
            lost.update((row[3], exc) for row in part)
        for exc in lost.values():
            self._count_outcome(lane, exc)
        self._tally(lane, "delivered", len(rows) // len(batcher.STEP_METRICS) - len(lost))

    async def _bisect(
        self, units: list[U], send: Callable[[list[U]], Awaitable[None]]
    ) -> list[tuple[list[U], Exception]]:
        """Send ``units``; when MLflow refuses them for good, halve until the refused ones are
        isolated, so the rest lands. Returns the parts that did not land, with the error."""
        if not units:
            return []
        try:
            await send(units)
        except Exception as exc:
            if len(units) == 1 or is_transient(exc) or self.unavailable is not None:
                return [(units, exc)]
            middle = len(units) // 2
            return await self._bisect(units[:middle], send) + await self._bisect(
                units[middle:], send
            )
        return []

    async def _end(self, lane: Lane, event: RunEnd, upload: bool = True) -> None:
        """Summary, artifact, then terminate; ``upload`` is off in the close's last attempt."""
        # A KILLED end is the sink's own (see _add_marker), not a caller's event: not counted.
        events = 1 if event.status == "FINISHED" else 0
        if lane.mlflow_id is None:
            assert lane.start_error is not None
            await self._undeliverable(events, lane, "set_terminated", lane.start_error, [])
            return
        adapter = self._ready_adapter()
        mlflow_id = lane.mlflow_id
        failed: list[tuple[str, Exception]] = []
        if event.status == "FINISHED":
            rows = batcher.admitted_summary_rows(event)
            for part, error in await self._bisect(
                rows, lambda part: adapter.log_metrics(mlflow_id, part)
            ):
                await self._undeliverable(0, lane, "log_batch", error, _metric_dicts([part]))
                failed.append(("log_batch", error))
            if upload:
                failed.extend(await self._upload(lane, event))
            elif event.run_path is not None:
                self.stats.skipped += 1
                log.warning(
                    "run_path not uploaded: the close deadline ran out",
                    run_id=lane.run_id,
                    run_path=event.run_path,
                )
        try:  # even when the rest failed: never leave an orphaned RUNNING run
            await adapter.set_terminated(mlflow_id, event.status, batcher.timestamp_ms(event.time))
            lane.terminated = True
            self._unended.discard(lane)
        except Exception as exc:
            await self._undeliverable(0, lane, "set_terminated", exc, [{"status": event.status}])
            failed.append(("set_terminated", exc))
        if failed:
            self._count_outcome(lane, failed[-1][1], events)
        else:
            self._tally(lane, "delivered", events)

    async def _upload(self, lane: Lane, event: RunEnd) -> list[tuple[str, Exception]]:
        if event.run_path is None:
            return []
        assert lane.mlflow_id is not None
        path = event.run_path
        if not os.path.exists(path):
            self.stats.skipped += 1
            log.warning(
                "run_path does not exist; no artifact logged", run_id=lane.run_id, run_path=path
            )
            return []
        try:
            await self._ready_adapter().log_path(lane.mlflow_id, path)
        except OSError as exc:
            if is_transient(exc) or exc.filename is None:
                await self._undeliverable(0, lane, "log_artifact", exc, [{"path": path}])
                return [("log_artifact", exc)]
            # a local file we cannot read (permissions, a symlink loop): not MLflow's refusal
            self.stats.skipped += 1
            log.warning(
                "run_path could not be read; no artifact logged",
                run_id=lane.run_id,
                run_path=path,
                error=f"{type(exc).__name__}: {exc}"[:300],
            )
        except Exception as exc:
            await self._undeliverable(0, lane, "log_artifact", exc, [{"path": path}])
            return [("log_artifact", exc)]
        return []

    # -- outcomes --------------------------------------------------------------------------------

    def _ready_adapter(self) -> Connection:
        assert self._adapter is not None, "lanes send only once connected"
        return self._adapter

    def _tally(self, lane: Lane | None, outcome: str, events: int) -> None:
        """Count ``events`` in one counter of `Stats` (and as finished for their lane)."""
        if events <= 0:
            return
        setattr(self.stats, outcome, getattr(self.stats, outcome) + events)
        if lane is not None:
            lane.finished += events

    def _give_up(self, events: int, lane: Lane | None = None) -> None:
        """Events that will not be sent by this worker: discarded without mlflow, else kept
        in the journal (spooled) or lost (failed)."""
        if self.import_error is not None:
            self._tally(lane, "discarded", events)
        elif self._journal is not None:
            self._hold_acks = True
            self._tally(lane, "spooled", events)
        else:
            self._tally(lane, "failed", events)

    def _reject(self, event: Event, reason: str, lane: Lane | None = None) -> None:
        """Count every rejection; log the first one per run and hook, not one per event."""
        self._tally(lane, "rejected", 1)
        run_id = getattr(event, "run_id", None)
        shown = run_id if isinstance(run_id, str) else batcher.show(run_id)
        key = (shown[:200], _hook_name(event))
        if key in self._rejections_logged:
            return
        if len(self._rejections_logged) < 10_000:
            self._rejections_logged.add(key)
        log.warning(
            "event rejected; further rejections of this run and hook are only counted",
            run_id=key[0],
            hook=key[1],
            reason=reason,
        )

    async def _undeliverable(
        self, events: int, lane: Lane, call: str, exc: BaseException, entities: list[Any]
    ) -> None:
        """What did not land: dead-lettered if MLflow refused it, else spooled or failed."""
        self._note_error(call, exc)
        if is_transient(exc) or self.unavailable is not None or await self._experiment_gone():
            log.error(
                "mlflow unavailable"
                if self.unavailable is not None
                else "mlflow unreachable past the retry deadline",
                run_id=lane.run_id,
                call=call,
                events=events,
                kept_in_spool=self._journal is not None,
                error=self.stats.last_error,
            )
            self._give_up(events, lane)
            return
        self._dead_letters.write(
            run_id=lane.run_id,
            mlflow_run_id=lane.mlflow_id,
            call=call,
            entities=entities,
            reason=str(exc),
        )
        log.error(
            "mlflow refused; dead-lettered",
            run_id=lane.run_id,
            call=call,
            events=events,
            error=self.stats.last_error,
            dead_letter_file=str(self._dead_letters.path),
        )
        self._tally(lane, "dead_lettered", events)

    async def _experiment_gone(self) -> bool:
        """After a refusal: was the experiment deleted under us? (asked at most every 5 s)"""
        now = time.monotonic()
        if self._adapter is None or now - self._experiment_checked < 5.0:
            return self.unavailable is not None
        self._experiment_checked = now
        try:
            state = await self._adapter.experiment_state()
        except Exception:
            return False
        if state == "active":
            return False
        self._set_unavailable(
            f"unavailable: {ExperimentDeleted(self._experiment, self._adapter.experiment_id)}"
        )
        return True

    def _count_outcome(self, lane: Lane, exc: BaseException, events: int = 1) -> None:
        if self.unavailable is not None or is_transient(exc):
            self._give_up(events, lane)
        else:
            self._tally(lane, "dead_lettered", events)

    def _note_error(self, what: str, exc: BaseException) -> None:
        self.stats.last_error = redact_text(f"{what}: {type(exc).__name__}: {str(exc)[:500]}")

    def _on_retry(self, state: RetryCallState) -> None:
        self.stats.retried += 1
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "mlflow call failed, retrying",
            attempt=state.attempt_number,
            retry_in=round(state.upcoming_sleep, 2),
            error=redact_text(str(exc))[:300],
        )

    def _report_drops(self, quiet: float) -> None:
        burst = self._buffer.take_drop_burst(quiet)
        if burst:
            log.warning(
                "events dropped in the last burst",
                dropped=burst,
                total_dropped=self._buffer.dropped,
            )


def _metric_dicts(units: Sequence[Sequence[batcher.MetricRow]]) -> list[dict[str, Any]]:
    return [{"key": k, "value": v, "timestamp": ts, "step": s} for u in units for k, v, ts, s in u]


def _hook_name(event: Event) -> str:
    return {RunStart: "on_run_start", Step: "on_step", RunEnd: "on_run_end"}.get(
        type(event), "marker"
    )
