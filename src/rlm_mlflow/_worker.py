"""The worker's loop: one anyio event loop, in a thread of its own or as a task of the caller's.

It connects (`_exporter.connect`, retried by the same policy as every call), drains the
buffer, admits each event (`_payload.admit`: the one place where values are checked; a bad
one is rejected alone), journals the drain when there is a spool, and routes the events, in
the order the hooks were called, to one `Lane` per run, whose task sends them. Flush and
close markers complete once every event before them has finished; the journal's acks advance
the same way. Lanes of different runs never wait on each other.

Nothing is lost on the way: an internal error costs only its event or its lane's batch, a
crash of the loop counts what was in flight and starts the loop again, and a close whose
deadline runs out still ends every run it can in a short last attempt and counts the rest.
A worker with nothing to do for `IDLE_PARK_S` lets its thread go; the next event starts it
again.

Longer than its neighbours because the loop owns every way an event could get lost (a crash,
a close deadline, a park), each in a method of its own; the sending is the lane's
(`_lane`), the counting the outcomes' (`_outcomes`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import anyio
import anyio.lowlevel
import anyio.to_thread
from anyio.abc import TaskGroup
from tenacity import RetryCallState

from . import _payload as payload
from ._buffer import Buffer
from ._deadletter import DeadLetters
from ._event import Event, Marker, RunEnd, RunEvent, RunStart, Step
from ._exporter import Connection, ExperimentDeleted, Exporter, RetryPolicy, connect
from ._journal import Journal
from ._lane import Lane, Sending
from ._log import log
from ._outcomes import Outcomes, Stats, hook_name
from ._payload import admit, is_plain_step
from ._records import Position
from ._redact import redact_text, redact_uri
from ._settings import Settings

#: Seconds without anything to do after which the worker's thread is let go.
IDLE_PARK_S = 20.0
#: At most this many seconds of a close's timeout are kept for the last attempt to end runs.
LAST_ATTEMPT_S = 5.0


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
        exporter: Exporter | None = None,
    ) -> None:
        self._buffer = buffer
        self._settings = settings
        self._tracking_uri = tracking_uri
        self._experiment = experiment
        self._journal = journal
        self.journal_error: str | None = None  # why the journal takes no more records
        self._may_park = park
        self._exporter = exporter  # given: no connecting (tests use an in-memory one)
        self.outcomes = Outcomes(dead_letters, experiment)
        self.outcomes.spooling = journal is not None
        self._policy = RetryPolicy(settings.retry_deadline, self.outcomes.on_retry)
        self._sending = Sending(
            self.outcomes,
            settings.batch_size,
            replaying,
            traces=settings.traces,
            max_spans=settings.trace_max_spans,
        )
        self.resolved_uri: str | None = None
        self._connected: anyio.Event | None = None  # anyio objects need the loop
        self._open: dict[str, Lane] = {}  # started, end not yet routed
        self._busy: set[Lane] = set()  # lanes with unfinished events
        self._markers: list[tuple[Marker, dict[Lane, int]]] = []
        self._closing = False
        self._abort = False
        self._stop_by = 0.0  # time.monotonic() by which an aborted worker must be done
        self._loops = 0  # event loops running this worker (a parked one has none)
        self._state = threading.RLock()  # re-entrant: a signal handler may close meanwhile
        self._tg: TaskGroup | None = None
        self._thread: threading.Thread | None = None
        buffer.unpark = self._unpark

    @property
    def stats(self) -> Stats:
        return self.outcomes.stats

    @property
    def unavailable(self) -> str | None:
        return self.outcomes.unavailable

    @property
    def import_error(self) -> str | None:
        return self.outcomes.import_error

    @property
    def traces_status(self) -> str:
        """``off``, ``on``, or ``unavailable: <why>`` (the store takes no traces)."""
        if not self._sending.traces:
            return "off"
        return self._sending.traces_unavailable or "on"

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
        if self._connected is None or (
            self._sending.connection is None and self.unavailable is None
        ):
            self._connected = anyio.Event()
        idle_since = time.monotonic()
        parked = False
        async with anyio.create_task_group() as tg:
            self._tg = tg
            if not self._connected.is_set():
                tg.start_soon(self._connect, self._connected)
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
                        self._buffer.drain(self._settings.queue_size - self.stats.inflight)
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
        return (
            self._may_park
            and self._connected is not None
            and self._connected.is_set()
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
        lost = self.stats.inflight
        log.error(
            "worker loop crashed; what was in flight is counted failed, the loop restarts",
            error=redact_text(f"{type(exc).__name__}: {exc}")[:500],
            events=lost,
            exc_info=exc,
        )
        self.stats.last_error = redact_text(f"worker crashed: {exc!r}")[:500]
        self.stats.failed += lost
        for lane in self._busy:  # what they held is counted failed above: done with
            lane.completed = lane.enqueued
            lane.pending, lane.sending, lane.boundaries = [], [], 0
            lane.running = False
        self._busy.clear()
        for lane in self._open.values():  # the run's later events still deserve to land
            if lane.mlflow_id is None and lane.start_error is None:
                lane.recreate = True
                lane.created = anyio.Event()
        self._check_markers()

    def _no_room(self) -> bool:
        journal_full = self._journal is not None and self._journal.full()
        return journal_full or self.stats.inflight >= self._settings.queue_size

    async def _connect(self, connected: anyio.Event) -> None:
        """Import mlflow and reach the store; retried (by the policy of every call) until it
        works or the sink is closed. The loop drains (and journals) meanwhile: a server that
        is down at start costs nothing but the wait."""

        def retrying(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            self.stats.retried += 1
            if exc is not None:
                self.outcomes.note_error("connect", exc)
            log.warning(
                "tracking store unreachable, retrying",
                retry_in=round(state.upcoming_sleep, 2),
                tracking_uri=redact_uri(self._tracking_uri),
                error=redact_text(str(exc))[:300],
            )

        def worth_a_retry(exc: BaseException) -> bool:  # any trouble reaching a store
            return isinstance(exc, Exception) and not isinstance(
                exc, (ImportError, ExperimentDeleted)
            )

        try:
            exporter = self._exporter
            if exporter is None:
                async for attempt in self._policy.attempts(
                    retry_on=worth_a_retry, forever=True, before_sleep=retrying
                ):
                    with attempt:
                        exporter = await anyio.to_thread.run_sync(
                            connect,
                            self._tracking_uri,
                            self._experiment,
                            self._settings,
                            abandon_on_cancel=True,
                        )
            assert exporter is not None
            connection = Connection(exporter, self._settings.max_in_flight, self._policy)
            self.outcomes.connected(connection.experiment_id, connection.experiment_state)
            log.info(
                "connected",
                tracking_uri=redact_uri(connection.tracking_uri),
                experiment=self._experiment,
                experiment_id=connection.experiment_id,
            )
            self._sending.connection = connection
            self.resolved_uri = redact_uri(connection.tracking_uri)  # after: see cli.Progress
        except ImportError as exc:
            self.outcomes.import_error = f"unavailable: {exc}"
            self.outcomes.set_unavailable(self.outcomes.import_error)
            log.error("mlflow cannot be imported; events are discarded", error=str(exc))
            self._buffer.close()
        except ExperimentDeleted as exc:
            self.outcomes.set_unavailable(f"unavailable: {exc}")
        finally:
            connected.set()

    async def _finish(self) -> None:
        """After the loop: when the close deadline ran out, a last attempt to end the runs;
        then account for everything that did not get out, and settle the journal."""
        self._tg = None  # routed from now on, never sent by a lane
        self._route_all(self._buffer.drain(len(self._buffer)))
        if self._abort and self._sending.connection is not None and self.unavailable is None:
            with anyio.move_on_after(max(0.0, self._stop_by - time.monotonic())):
                await self._last_attempt()
        self._report_drops(quiet=0.0)
        lost = self.stats.inflight
        if lost:
            self.outcomes.give_up(lost)
            log.error(
                "worker stopped with events undelivered; they are kept in the spool"
                if self._journal is not None
                else "worker stopped with events undelivered; they are lost (no spool)",
                events=lost,
                delivered=self.stats.delivered,
            )
        if self._journal is not None:
            # After a write failure, events that did not land may be in it: keep it then.
            failed_after = self.journal_error is not None and self.stats.failed > 0
            self._journal.close(remove=not (self.outcomes.keep_journal or failed_after))

    async def _last_attempt(self) -> None:
        """The close deadline ran out: every run the caller started is created if it was
        not yet, and ended: FINISHED with its summary if its end came (routed, or in the
        batch a cancelled lane was sending), else KILLED. Steps still waiting are not sent."""
        async with anyio.create_task_group() as tg:
            for lane in self._busy | self._sending.unended:
                unsent = lane.sending + lane.pending
                lane.sending, lane.pending, lane.boundaries = [], [], 0
                end = next((e for e in unsent if isinstance(e, RunEnd)), None)
                if end is None or end.status == "KILLED":
                    end = RunEnd(lane.run_id, time.time(), None, None, None, None, "KILLED")
                create = lane.mlflow_id is None and lane.start_error is None
                tg.start_soon(lane.close_at_deadline, end, create, self._sending)

    # -- routing (event loop thread, in buffer order) --------------------------------------------

    def _route_all(self, drained: list[Event]) -> None:
        """Admit, journal and route one drain, in order. Steps that are already plain (the
        common case by far) take a short way: no second event, no call per step."""
        self.stats.drained += len(drained) - sum(1 for e in drained if e.__class__ is Marker)
        journalled: list[RunEvent] | None = [] if self._journal is not None else None
        open_, unavailable = self._open, self.unavailable is not None
        for item in drained:
            try:
                if isinstance(item, Marker):
                    self._add_marker(item)
                    continue
                if (
                    isinstance(item, Step)
                    and not unavailable
                    and item[5] is None
                    and is_plain_step(item)
                    and (lane := open_.get(item.run_id)) is not None
                ):
                    if journalled is not None:
                        journalled.append(item)
                    self._enqueue(lane, item)
                    continue
                event = self._admit(item)
                if event is None:
                    continue
                if journalled is not None:
                    journalled.append(event)
                self._route(event)
            except Exception as exc:  # a bug of ours: this event alone pays for it
                log.exception("internal error routing an event", error=repr(exc)[:300])
                if not isinstance(item, Marker):
                    self.stats.failed += 1
        position = self._journal_append(journalled) if journalled else None
        # Wake for a drain when every open run has a full log_batch waiting, on average:
        # waking at one batch's worth split over many runs sends many small requests, and a
        # request's fixed cost at the server is what limits throughput.
        per_batch = payload.steps_per_batch(self._settings.batch_size)
        self._buffer.wake_at = max(
            per_batch, min(per_batch * len(self._open), self._settings.queue_size // 2)
        )
        if position is not None and not self.outcomes.keep_journal:
            self._add_marker(Marker(ack=(position, [lane.start for lane in self._open.values()])))

    def _admit(self, event: RunEvent) -> RunEvent | None:
        try:
            admitted, problems = admit(event, self._settings.trace_text_limit)
        except payload.BadInput as exc:
            self.outcomes.reject(event, str(exc))
            return None
        except Exception as exc:  # a value that broke a check: reject it, alone
            self.outcomes.reject(event, f"cannot be read: {type(exc).__name__}: {str(exc)[:200]}")
            return None
        if problems:
            self.outcomes.skipped(admitted.run_id, hook_name(admitted), problems)
        return admitted

    def _journal_append(self, events: list[RunEvent]) -> Position | None:
        if (
            self._journal is None
            or not events
            or self.import_error is not None
            or self.journal_error is not None
        ):
            return None
        try:
            return self._journal.append(events)
        except OSError as exc:
            self._journal_failed(exc)
            return None

    def _journal_failed(self, exc: OSError) -> None:
        """A write failed (a full disk): no more records, but the journal stays ours (its
        lock held) until close, which removes it only if everything in it landed."""
        assert self._journal is not None
        self.journal_error = f"{type(exc).__name__}: {exc}"
        log.error(
            "spool write failed; going on without it (what it holds stays for a sync)",
            journal=str(self._journal.dir),
            error=self.journal_error,
        )
        self.outcomes.spooling = False

    def _route(self, event: RunEvent) -> None:
        if self.unavailable is not None:
            self.outcomes.give_up(_countable([event]))
            return
        lane = self._open.get(event.run_id)
        if isinstance(event, RunStart):
            if lane is not None:
                self.outcomes.reject(event, "on_run_start for a run that is already open")
                return
            parent_id = event.params.get("parent_run_id")
            parent = self._open.get(str(parent_id)) if parent_id is not None else None
            lane = self._open[event.run_id] = Lane(event, parent)
            if parent is not None:  # the parent's next step delegated it
                parent.children.append((event.run_id, event.key))
        elif lane is None:
            self.outcomes.reject(event, f"{hook_name(event)} for a run that is not open")
            return
        elif isinstance(event, RunEnd):
            del self._open[event.run_id]
        self._enqueue(lane, event)

    def _enqueue(self, lane: Lane, event: Event) -> None:
        lane.pending.append(event)
        if event.__class__ is not Step:
            lane.boundaries += 1
        if not lane.running:  # a running lane is busy already
            self._busy.add(lane)
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
                journal = self._journal
                if (
                    marker.ack is not None
                    and journal is not None
                    and not self.outcomes.keep_journal
                    and self.journal_error is None
                ):
                    try:
                        journal.ack(*marker.ack)
                    except OSError as exc:
                        self._journal_failed(exc)
                marker.done.set()
                if marker.closing:
                    self._buffer.wakeup.set()

    async def _drive(self, lane: Lane) -> None:
        """A lane's task: send its batches one after the other, and count them done."""
        assert self._connected is not None
        await self._connected.wait()
        while lane.pending:
            batch, lane.pending = lane.pending, []
            boundaries, lane.boundaries = lane.boundaries, 0
            lane.sending = batch
            before = lane.finished
            try:
                if self._sending.connection is None or self.unavailable is not None:
                    self.outcomes.give_up(_countable(batch), lane)
                else:
                    await lane.send(batch, self._sending, boundaries)
            except Exception as exc:  # a bug of ours: this batch alone pays for it
                lost = _countable(batch) - (lane.finished - before)
                log.exception(
                    "internal error sending a run's events; they are counted failed",
                    run_id=lane.run_id,
                    events=lost,
                    error=repr(exc)[:300],
                )
                self.outcomes.tally(lane, "failed", max(0, lost))
            lane.completed += len(batch)
            lane.sending = []
            if not lane.pending:
                self._busy.discard(lane)
            self._check_markers()
            if len(self._buffer):  # room was made: the loop may drain again
                self._buffer.wakeup.set()
        lane.running = False

    def _report_drops(self, quiet: float) -> None:
        burst = self._buffer.take_drop_burst(quiet)
        if burst:
            log.warning(
                "events dropped in the last burst",
                dropped=burst,
                total_dropped=self._buffer.dropped,
            )
