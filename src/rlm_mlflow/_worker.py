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

import dataclasses
import threading
import time

import anyio
import anyio.lowlevel
import anyio.to_thread
from anyio.abc import TaskGroup
from tenacity import RetryCallState

from ._buffer import Buffer
from ._deadletter import DeadLetters
from ._event import Marker, RunEnd, Step
from ._exporter import (
    Connection,
    ExperimentDeleted,
    Exporter,
    Misconfigured,
    RetryPolicy,
    connect,
)
from ._journal import Journal
from ._lane import Lane, Sending
from ._log import log
from ._outcomes import Outcomes, Stats
from ._redact import redact_text, redact_uri
from ._router import Router, countable
from ._settings import Settings

#: Seconds without anything to do after which the worker's thread is let go.
IDLE_PARK_S = 20.0
#: At most this many seconds of a close's timeout are kept for the last attempt to end runs.
LAST_ATTEMPT_S = 5.0
#: Seconds past the close deadline that close() waits for the worker's final tally.
JOIN_GRACE_S = 1.0


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
        self._may_park = park
        self._exporter = exporter  # given: no connecting (tests use an in-memory one)
        self.outcomes = Outcomes(dead_letters, experiment)
        self.outcomes.spooling = journal is not None
        self._policy = RetryPolicy(
            settings.retry_deadline,
            self.outcomes.on_retry,
            misconfigured=self.outcomes.refused_by_configuration,
            answered=self.outcomes.answered,
        )
        self._sending = Sending(
            self.outcomes,
            settings.batch_size,
            replaying,
            traces=settings.traces,
            max_spans=settings.trace_max_spans,
        )
        self.resolved_uri: str | None = None
        self._connected: anyio.Event | None = None  # anyio objects need the loop
        self._router = Router(buffer, settings, self.outcomes, journal, self._spawn)
        self._abort = False
        self._stop_by = 0.0  # time.monotonic() by which an aborted worker must be done
        self._loops = 0  # event loops running this worker (a parked one has none)
        self._state = threading.RLock()  # re-entrant: a signal handler may close meanwhile
        self._tg: TaskGroup | None = None
        self._thread: threading.Thread | None = None
        self._done = threading.Event()  # the final tally is made: stopped for good
        #: The counts close() settled on when the worker did not stop in time (see `join`).
        self.final: Stats | None = None
        buffer.unpark = self._unpark

    @property
    def stats(self) -> Stats:
        return self.outcomes.stats

    @property
    def unavailable(self) -> str | None:
        return self.outcomes.unavailable

    @property
    def problem(self) -> str | None:
        """Why nothing is delivered now, for status(): unavailable for good, or refused by
        the store until its configuration (or ours) is fixed."""
        return self.outcomes.unavailable or self.outcomes.misconfigured

    @property
    def journal_error(self) -> str | None:
        """Why the journal takes no more records (a full disk), or None."""
        return self._router.journal_error

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
        """Wait for the worker's final tally, `JOIN_GRACE_S` past ``deadline`` at most. The
        end of an aborted loop is bounded by the deadline, so it comes; should it not (a
        worker that never ran, or one stuck in a call that ignores cancellation), the counts
        are settled here, as the worker would have: what it still holds is not delivered.
        So close() returns with counts that are final either way."""
        if self._done.is_set() or self._thread is threading.current_thread():
            return
        if self._buffer.loop_thread == threading.get_ident():
            return  # close() on the loop the worker runs in: it cannot end while we wait
        if self.alive and self._done.wait(max(0.0, deadline - time.monotonic()) + JOIN_GRACE_S):
            return
        self._settle()

    def _settle(self) -> None:
        with self._state:
            if self._done.is_set() or self.final is not None:
                return
            final = dataclasses.replace(self.outcomes.stats)
            queued, held = len(self._buffer), final.inflight
            final.drained += queued
            final.failed += queued  # never journalled
            if self.outcomes.spooling:
                final.spooled += held  # journalled; the journal stays for a sync
            else:
                final.failed += held
            self.final = final
        log.error(
            "the worker did not stop in time; what it still held is counted as not delivered",
            events=queued + held,
        )

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
        parked = finished = False
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
                finished = True
        finally:
            with self._state:
                self._loops -= 1
            # Stopped for good: nobody may wait on a marker any more. Not when cancelled
            # (a task-mode worker whose loop went away): the close starts it again.
            if finished:
                self._router.markers.release()
                self._done.set()

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
            router = self._router
            while True:
                # Sleep until a full batch waits (the hooks wake us), a marker comes, or the
                # flush interval passes; and while memory is full with no spool to take more.
                full = router.full() and not router.spool_takes()
                if not router.ready() and (len(self._buffer) < self._buffer.wake_at or full):
                    await anyio.to_thread.run_sync(
                        self._buffer.wakeup.wait,
                        self._settings.flush_interval,
                        abandon_on_cancel=True,
                    )
                self._buffer.wakeup.clear()
                if self._abort:
                    break
                router.take()
                self._report_drops(quiet=self._settings.put_timeout + 5.0)
                if router.markers.closing and router.settled():
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
        router = self._router
        return (
            self._may_park
            and self._connected is not None
            and self._connected.is_set()
            and router.settled()
            and not router.markers
            and not router.markers.closing
        )

    def _restart_lanes(self) -> None:
        """After a park, a crash, or a loop that went away under a task-mode worker: the
        lanes with events get a task in the new loop. The part of a batch whose task was
        cancelled in the middle of sending and that was not counted yet is sent again
        (`Lane.rewind`: MLflow drops the metrics that land twice; the run is found before it
        is created again)."""
        for lane in {*self._router.open.values(), *self._router.busy}:
            if not lane.created.is_set():  # its creation was cut off: a new event to wait on
                lane.created = anyio.Event()
        for lane in list(self._router.busy):
            lane.running = False
            if lane.sending:
                rest = lane.rewind()
                lane.pending = rest + lane.pending
                lane.boundaries += sum(1 for e in rest if e.__class__ is not Step)
                lane.pending_bytes += lane.sending_bytes
                lane.sending_bytes = 0.0
            if lane.pending:
                self._spawn(lane)
            else:
                self._router.busy.discard(lane)
        self._router.markers.check()

    def _recover(self, exc: BaseException) -> None:
        """The loop crashed (a bug): what was in flight is counted failed; the buffer, the
        backlog and the runs open in MLflow stay as they are for the next loop."""
        lost = self._router.in_flight()
        log.error(
            "worker loop crashed; what was in flight is counted failed, the loop restarts",
            error=redact_text(f"{type(exc).__name__}: {exc}")[:500],
            events=lost,
            exc_info=exc,
        )
        self.stats.last_error = redact_text(f"worker crashed: {exc!r}")[:500]
        self.stats.failed += lost
        self._router.recover()
        for lane in self._router.open.values():  # to be created again: a new event to wait on
            if lane.recreate:
                lane.created = anyio.Event()

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
                exc, (ImportError, ExperimentDeleted, Misconfigured)
            )

        async def reach() -> Exporter:
            return await anyio.to_thread.run_sync(
                connect,
                self._tracking_uri,
                self._experiment,
                self._settings,
                abandon_on_cancel=True,
            )

        try:
            exporter = self._exporter
            if exporter is None:
                exporter = await self._policy.run(
                    reach, retry_on=worth_a_retry, forever=True, before_sleep=retrying
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
        then account for everything that did not get out, and settle the journal. Bounded by
        the deadline when aborted, so that close() returns with final counts."""
        self._tg = None  # routed from now on, never sent by a lane
        left = self._router.drain_rest(self._stop_by if self._abort else None)
        if left:
            self._count_unrouted()
        if self._abort and self._sending.connection is not None and self.unavailable is None:
            self._policy.closing = True
            with anyio.move_on_after(max(0.0, self._stop_by - time.monotonic())):
                await self._last_attempt()
        self._report_drops(quiet=0.0)
        lost = self.stats.inflight
        if lost:
            self.outcomes.give_up(lost)
            log.error(
                "worker stopped with events undelivered; they are kept in the spool"
                if self.outcomes.spooling
                else "worker stopped with events undelivered; they are lost (no spool)",
                events=lost,
                delivered=self.stats.delivered,
            )
        if self._journal is not None:
            # After a write failure, events that did not land may be in it: keep it then.
            failed_after = self.journal_error is not None and self.stats.failed > 0
            self._journal.close(remove=not (self.outcomes.keep_journal or failed_after))

    def _count_unrouted(self) -> None:
        """The deadline ran out before the rest of the buffer could be taken: counted failed
        (not journalled, not sent), markers released."""
        rest = self._buffer.drain(len(self._buffer))
        events = countable(rest)
        self.stats.drained += events
        self.outcomes.tally(None, "failed", events)
        for item in rest:
            if isinstance(item, Marker):
                item.done.set()
        log.error("close deadline ran out before these events could be taken", events=events)

    async def _last_attempt(self) -> None:
        """The close deadline ran out: every run the caller started is created if it was
        not yet, and ended: FINISHED with its summary if its end came (routed, or in the
        batch a cancelled lane was sending), else KILLED. Steps still waiting are not sent."""
        async with anyio.create_task_group() as tg:
            for lane in self._router.busy | self._sending.unended:
                unsent = lane.sending + lane.pending
                lane.sending, lane.pending, lane.boundaries = [], [], 0
                end = next((e for e in unsent if isinstance(e, RunEnd)), None)
                if end is None or end.own:
                    end = RunEnd(
                        lane.run_id, time.time(), None, None, None, None, "KILLED", None, True
                    )
                create = lane.mlflow_id is None and lane.start_error is None
                tg.start_soon(lane.close_at_deadline, end, create, self._sending)

    # -- lanes ----------------------------------------------------------------------------------

    def _spawn(self, lane: Lane) -> None:
        if self._tg is None:  # the loop is over: what is routed now waits for _last_attempt
            return
        lane.running = True
        self._tg.start_soon(self._drive, lane, name=f"lane {lane.run_id[:80]}")

    async def _drive(self, lane: Lane) -> None:
        """A lane's task: send its batches one after the other, and count them done."""
        assert self._connected is not None
        await self._connected.wait()
        router = self._router
        while lane.pending:
            batch, lane.pending = lane.pending, []
            lane.sending_bytes, lane.pending_bytes = lane.pending_bytes, 0.0
            boundaries, lane.boundaries = lane.boundaries, 0
            lane.sending, lane.resume = batch, 0
            before = lane.finished
            try:
                if self._sending.connection is None or self.unavailable is not None:
                    self.outcomes.give_up(countable(batch), lane)
                else:
                    await lane.send(batch, self._sending, boundaries)
            except Exception as exc:  # a bug of ours: this batch alone pays for it
                lost = countable(batch) - (lane.finished - before)
                log.exception(
                    "internal error sending a run's events; they are counted failed",
                    run_id=lane.run_id,
                    events=lost,
                    error=repr(exc)[:300],
                )
                self.outcomes.tally(lane, "failed", max(0, lost))
            lane.completed += len(batch)
            lane.sending, lane.sending_bytes = [], 0.0
            if not lane.pending:
                router.busy.discard(lane)
            router.markers.check()
            if len(self._buffer) or router.backlog:  # room was made: the loop may take more
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
