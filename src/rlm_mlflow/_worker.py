"""The worker's loop: one anyio event loop, in a thread of its own or as a task of the caller's.

It reaches the store (`_connect.establish`, retried by the same policy as every call), and
then, between its waits, has the router take from the buffer (`_router`: admit, journal,
route to one `Lane` per run); each lane's task sends its run's events (`Lane.drive`). The
loop itself only starts, waits, parks and stops, and keeps every way an event could get lost
counted: a crash of the loop counts what was in flight and starts the loop again, a close
whose deadline runs out ends every run in a short last attempt (`_run_calls.last_attempt`)
and counts the rest. A worker with nothing to do for `IDLE_PARK_S` lets its thread go; the
next event starts it again.
"""

from __future__ import annotations

import threading
import time

import anyio
import anyio.lowlevel
import anyio.to_thread
from anyio.abc import TaskGroup

from . import _run_calls as run_calls
from ._buffer import Buffer
from ._connect import RetryPolicy, establish
from ._deadletter import DeadLetters
from ._journal import Journal
from ._lane import Lane
from ._log import log
from ._outcomes import Outcomes
from ._redact import redact_text, redact_uri
from ._router import Router
from ._sending import Sending
from ._settings import Settings
from .exporters.base import Exporter

#: Seconds without anything to do after which the worker's thread is let go.
IDLE_PARK_S = 20.0
#: At most this many seconds of a close's timeout are kept for the last attempt to end runs.
LAST_ATTEMPT_S = 5.0


def last_attempt_reserve(timeout: float) -> float:
    """Seconds of a close's ``timeout`` kept for the last attempt: a fifth, at least a second
    (half of a shorter timeout), at most `LAST_ATTEMPT_S`. Its calls share the connection's
    in-flight limit (one at a time on a local store), and a call cut off by the loop's end may
    still hold the store for a while: a short close must still end every run."""
    return min(LAST_ATTEMPT_S, max(0.2 * timeout, min(0.5 * timeout, 1.0)))


#: Seconds past the close deadline the last attempt may go on ending runs: on a loaded machine
#: each of its calls can take tens of milliseconds (one at a time on a local store), and a run
#: left RUNNING is worse than a close a second late. Events are cut at the deadline itself.
END_GRACE_S = 1.0
#: Seconds past the close deadline that close() waits for the worker's final tally.
JOIN_GRACE_S = END_GRACE_S + 0.5


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
        outcomes: Outcomes | None = None,
    ) -> None:
        self._buffer = buffer
        self._settings = settings
        self._tracking_uri = tracking_uri
        self._experiment = experiment
        self._journal = journal
        self._may_park = park
        self._exporter = exporter  # given: no connecting (tests use an in-memory one)
        self.outcomes = outcomes if outcomes is not None else Outcomes(dead_letters, experiment)
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
        buffer.unpark = self._unpark

    @property
    def journal_error(self) -> str | None:
        """Why the journal takes no more records (a full disk), or None."""
        return self._router.journal_error

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
        ``deadline`` (time.monotonic(); `END_GRACE_S` past it at most), and count the rest.
        Does not wait (see `join`)."""
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
            if self._done.is_set() or self.outcomes.final is not None:
                return
            queued, held = len(self._buffer), self.outcomes.stats.inflight
            self.outcomes.settle(queued)
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
            self._sending.connection is None and self.outcomes.unavailable is None
        ):
            self._connected = anyio.Event()
        idle_since = time.monotonic()
        parked = False
        async with anyio.create_task_group() as tg:
            self._tg = tg
            if not self._connected.is_set():
                tg.start_soon(self._connect, self._connected)
            self._router.restart()
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
        self.outcomes.crashed(lost, exc)
        self._router.recover()

    async def _connect(self, connected: anyio.Event) -> None:
        """Reach the store (`_connect.establish`); the loop drains (and journals) meanwhile."""
        try:
            connection = await establish(
                self._tracking_uri,
                self._experiment,
                self._settings,
                self._policy,
                self.outcomes,
                self._exporter,
            )
            if connection is not None:
                self._sending.connection = connection
                self.resolved_uri = redact_uri(connection.tracking_uri)  # after: cli.run.Progress
            elif self.outcomes.import_error is not None:
                self._buffer.close()  # nothing will ever be sent: the hooks' events are dropped
        finally:
            connected.set()

    async def _finish(self) -> None:
        """After the loop: when the close deadline ran out, a last attempt to end the runs;
        then account for everything that did not get out, and settle the journal. Bounded by
        the deadline when aborted (the last attempt by `END_GRACE_S` past it), so that
        close() returns with final counts."""
        self._tg = None  # routed from now on, never sent by a lane
        left = self._router.drain_rest(self._stop_by if self._abort else None)
        if left:
            self._router.count_unrouted()
        if (
            self._abort
            and self._sending.connection is not None
            and self.outcomes.unavailable is None
        ):
            self._policy.closing = True
            ends_by = self._stop_by + END_GRACE_S
            with anyio.move_on_after(max(0.0, ends_by - time.monotonic())):
                await self._last_attempt(ends_by)
        self._report_drops(quiet=0.0)
        lost = self.outcomes.stats.inflight
        if lost:
            self.outcomes.give_up(lost)
            log.error(
                "worker stopped with events undelivered; they are kept in the spool"
                if self.outcomes.spooling
                else "worker stopped with events undelivered; they are lost (no spool)",
                events=lost,
                delivered=self.outcomes.stats.delivered,
            )
        if self._journal is not None:
            # After a write failure, events that did not land may be in it: keep it then.
            failed_after = self.journal_error is not None and self.outcomes.stats.failed > 0
            self._journal.close(remove=not (self.outcomes.keep_journal or failed_after))
        if self._sending.connection is not None:  # the exporter's HTTP session, say
            self._sending.connection.close()

    async def _last_attempt(self, ends_by: float) -> None:
        """The close deadline ran out: every run the caller started is created if it was
        not yet, and ended by ``ends_by``: FINISHED with its summary if its end came, else
        KILLED."""
        jobs = self._router.last_attempt(self._sending.unended)
        await run_calls.last_attempt(jobs, self._sending, ends_by)

    def _spawn(self, lane: Lane) -> None:
        """A lane with events and no task gets one (none once the loop is over: what is
        routed then waits for `_last_attempt`)."""
        if self._tg is None:
            return
        assert self._connected is not None
        name = f"lane {lane.run_id[:80]}"
        self._tg.start_soon(
            lane.drive, self._sending, self._connected, self._router.batch_done, name=name
        )

    def _report_drops(self, quiet: float) -> None:
        burst = self._buffer.take_drop_burst(quiet)
        if burst:
            log.warning(
                "events dropped in the last burst",
                dropped=burst,
                total_dropped=self._buffer.dropped,
            )
