"""The worker: one anyio event loop in one background thread.

It drains the buffer (journalling each drain first when a spool is set), routes events to one
*lane* per run, and each lane sends its events in order: the run is created before any batch
of it is sent, step batches go out concurrently (up to the adapter's in-flight limit), and the
run is terminated only after all of them finished. Lanes of different runs never wait on each
other, except a child run's creation, which waits for its parent's so that it can carry the
``mlflow.parentRunId`` tag.

Every event that leaves the buffer ends in exactly one counter of `Stats`.
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
from ._client import MlflowAdapter, is_transient
from ._deadletter import DeadLetters
from ._event import Event, Marker, RunEnd, RunEvent, RunStart, Step
from ._log import log
from ._redact import redact_text, redact_uri
from ._settings import Settings
from ._spool import Journal, Position

U = TypeVar("U")


@dataclass
class Stats:
    """Counters written by the worker thread only; read from anywhere (plain ints)."""

    drained: int = 0
    delivered: int = 0
    rejected: int = 0  # bad input, refused before sending
    dead_lettered: int = 0  # refused by MLflow for good; written to the dead-letter file
    failed: int = 0  # transient failure past the retry deadline, no spool: lost
    spooled: int = 0  # transient failure past the deadline (or close): kept in the journal
    discarded: int = 0  # drained while mlflow is unavailable
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
    enqueued: int = 0
    completed: int = 0  # advanced only when a whole batch of pending events is done
    running: bool = False

    @property
    def run_id(self) -> str:
        return self.start.run_id


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
    ) -> None:
        self._buffer = buffer
        self._settings = settings
        self._tracking_uri = tracking_uri
        self._experiment = experiment
        self._dead_letters = dead_letters
        self._journal = journal
        self._replaying = replaying  # a run may already exist: look it up by its key first
        self.stats = Stats()
        self.import_error: str | None = None
        self.resolved_uri: str | None = None
        self._adapter: MlflowAdapter | None = None
        self._connected_event: anyio.Event  # made in _main: anyio objects need the loop
        self._open: dict[str, Lane] = {}  # started, end not yet routed
        self._busy: set[Lane] = set()  # lanes with unfinished events
        self._markers: list[tuple[Marker, dict[Lane, int]]] = []
        self._closing = False
        self._hold_acks = False  # something is kept for a later replay: the journal must stay
        self._rejections_logged: set[tuple[object, str]] = set()
        self._abort = False
        self._running = False
        self._tg: TaskGroup | None = None
        self._thread = threading.Thread(
            target=anyio.run, args=(self.run,), name="rlm-mlflow", daemon=True
        )

    # -- caller's side -------------------------------------------------------------------------

    def start(self) -> None:
        self._running = True  # from now: flush() may wait for it
        self._thread.start()

    def abort(self, join_timeout: float) -> None:
        """Cancel whatever is still in flight and stop the worker."""
        self._abort = True
        self._buffer.wakeup.set()
        if self._thread.ident is not None:  # a task-mode worker has no thread to join
            self._thread.join(join_timeout)

    @property
    def alive(self) -> bool:
        return self._running

    def release_files_after_fork(self) -> None:
        """In a forked child: close the inherited journal and spill files, never write them."""
        if self._journal is not None:
            self._journal.close(remove=False)
        self._buffer.close_overflow()

    # -- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        """The worker's whole life: in its own thread, or as a task of the caller's loop."""
        self._running = True
        try:
            await self._main()
        except Exception as exc:  # a bug of ours: say so, and do not leave flush() hanging
            log.exception("worker crashed", error=redact_text(str(exc)))
            self.stats.last_error = redact_text(f"worker crashed: {exc!r}")
            self._buffer.close()  # hooks must not wait on a buffer nobody drains
        finally:
            self._running = False
            for marker, _ in self._markers:
                marker.done.set()

    async def _main(self) -> None:
        self._connected_event = anyio.Event()
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._connect)
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
                    tg.cancel_scope.cancel()
                    break
                if not self._no_room():
                    self._route_all(
                        self._buffer.drain(self._settings.queue_size - self._inflight())
                    )
                self._report_drops()
                if self._closing and not self._busy and len(self._buffer) == 0:
                    tg.cancel_scope.cancel()  # the connect task, if it never got through
                    break
                await anyio.lowlevel.checkpoint()  # let the lanes run between drains
        self._finish()

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
        delay = 0.5
        try:
            while True:
                try:
                    self._adapter = await anyio.to_thread.run_sync(
                        MlflowAdapter.connect_sync,
                        self._tracking_uri,
                        self._experiment,
                        self._settings.request_timeout,
                        self._settings.max_in_flight,
                        self._settings.retry_deadline,
                        self._on_retry,
                        abandon_on_cancel=True,
                    )
                    break
                except ImportError as exc:
                    self.import_error = f"unavailable: {exc}"
                    log.error("mlflow cannot be imported; events are discarded", error=str(exc))
                    self._buffer.close()
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
            self.resolved_uri = redact_uri(self._adapter.tracking_uri)
            log.info(
                "connected",
                tracking_uri=self.resolved_uri,
                experiment=self._experiment,
                experiment_id=self._adapter.experiment_id,
            )
        finally:
            self._connected_event.set()

    def _finish(self) -> None:
        """After the loop: account for what never got out, and settle the journal."""
        if self._journal is not None:
            leftover: list[RunEvent] = [
                e for e in self._buffer.drain(len(self._buffer)) if not isinstance(e, Marker)
            ]
            if leftover:  # closed before these were drained: keep them for a replay
                self._journal.append(leftover)
                self.stats.drained += len(leftover)
            pending = self._inflight()
            if pending:
                self.stats.spooled += pending
                self._hold_acks = True
                log.warning(
                    "events kept in the spool for a later sync",
                    events=pending,
                    journal=str(self._journal.dir),
                )
            self._journal.close(remove=not self._hold_acks)
        elif pending := self._inflight():
            self.stats.failed += pending
            log.error(
                "worker stopped with events undelivered; they are lost (no spool)",
                events=pending,
                runs_open=sorted(self._open),
            )

    # -- routing (event loop thread, in buffer order) --------------------------------------------

    def _route_all(self, drained: list[Event]) -> None:
        events: list[RunEvent] = [e for e in drained if not isinstance(e, Marker)]
        position: Position | None = None
        if self._journal is not None and events and self.import_error is None:
            position = self._journal.append(events)
        for event in drained:
            self._route(event)
        # Wake for a drain when every open run has a full log_batch waiting, on average:
        # waking at one batch's worth split over many runs sends many small requests, and a
        # request's fixed cost at the server is what limits throughput.
        per_batch = batcher.steps_per_batch(self._settings.batch_size)
        self._buffer.wake_at = max(
            per_batch, min(per_batch * len(self._open), self._settings.queue_size // 2)
        )
        if position is not None and not self._hold_acks:
            self._add_marker(Marker(ack=(position, [lane.start for lane in self._open.values()])))

    def _route(self, event: Event) -> None:
        if isinstance(event, Marker):
            self._add_marker(event)
            return
        self.stats.drained += 1
        if self.import_error is not None:
            self.stats.discarded += 1
            return
        lane = self._open.get(event.run_id)
        if isinstance(event, RunStart):
            if lane is not None:
                self._reject(event, "on_run_start for a run that is already open")
                return
            if not isinstance(event.run_id, str) or not event.run_id:
                self._reject(event, f"run_id is not a non-empty string: {event.run_id!r:.80}")
                return
            parent_id = event.params.get("parent_run_id")
            parent = self._open.get(str(parent_id)) if parent_id else None
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
            lane.running = True
            assert self._tg is not None
            self._tg.start_soon(self._drive, lane, name=f"lane {lane.run_id}")

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
        await self._connected_event.wait()
        while lane.pending:
            batch, lane.pending = lane.pending, []
            if self._adapter is None:  # mlflow could not be imported
                self.stats.discarded += sum(
                    1 for e in batch if not (isinstance(e, RunEnd) and e.status == "KILLED")
                )
            else:
                await self._send(lane, batch)
            lane.completed += len(batch)
            if lane.completed == lane.enqueued:
                self._busy.discard(lane)
            self._check_markers()
            if len(self._buffer):  # room was made: the loop may drain again
                self._buffer.wakeup.set()
        lane.running = False

    async def _send(self, lane: Lane, batch: list[Event]) -> None:
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

    async def _start(self, lane: Lane, event: RunStart) -> None:
        adapter = self._ready_adapter()
        try:
            parent_mlflow_id = None
            if lane.parent is not None:
                await lane.parent.created.wait()
                parent_mlflow_id = lane.parent.mlflow_id
            if self._replaying:
                lane.mlflow_id = await adapter.find_run(event.key)
            if lane.mlflow_id is None:
                tags = batcher.run_tags(lane.run_id, parent_mlflow_id, event.key)
                lane.mlflow_id = await adapter.create_run(
                    batcher.run_name(lane.run_id), batcher.timestamp_ms(event.time), tags
                )
        except Exception as exc:
            lane.start_error = exc
            self._undeliverable(1, lane, "create_run", exc, [{"run_id": lane.run_id}])
            return
        finally:
            lane.created.set()
        params, skipped = batcher.run_params(event)
        if skipped:
            self.stats.skipped += len(skipped)
            log.warning("params not logged", run_id=lane.run_id, params=skipped)
        mlflow_id = lane.mlflow_id
        failures = await self._bisect(
            list(params.items()), lambda part: adapter.log_params(mlflow_id, part)
        )
        for part, error in failures:
            self._undeliverable(
                0, lane, "log_params", error, [{"key": k, "value": v} for k, v in part]
            )
        if failures:
            self._count_outcome(lane, failures[-1][1])
        else:
            self.stats.delivered += 1

    async def _send_steps(self, lane: Lane, steps: list[Step]) -> None:
        rows: list[batcher.MetricRow] = []
        for event in steps:
            try:
                pair = batcher.step_rows(event)
            except batcher.BadInput as exc:
                self._reject(event, str(exc))
                continue
            step = pair[0][3]
            if step in lane.seen_steps:
                self._reject(event, f"step {step} repeated (the first one was kept)")
                continue
            lane.seen_steps.add(step)
            rows.extend(pair)
        if not rows:
            return
        if lane.mlflow_id is None:
            assert lane.start_error is not None
            self._undeliverable(
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
            self._undeliverable(0, lane, "log_batch", exc, _metric_dicts([part]))
            lost.update((row[3], exc) for row in part)
        for exc in lost.values():
            self._count_outcome(lane, exc)
        self.stats.delivered += len(rows) // len(batcher.STEP_METRICS) - len(lost)

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
            if len(units) == 1 or is_transient(exc):
                return [(units, exc)]
            middle = len(units) // 2
            return await self._bisect(units[:middle], send) + await self._bisect(
                units[middle:], send
            )
        return []

    async def _end(self, lane: Lane, event: RunEnd) -> None:
        # A KILLED end is the sink's own (see _add_marker), not a caller's event: not counted.
        events = 1 if event.status == "FINISHED" else 0
        if lane.mlflow_id is None:
            assert lane.start_error is not None
            self._undeliverable(events, lane, "set_terminated", lane.start_error, [])
            return
        adapter = self._ready_adapter()
        mlflow_id = lane.mlflow_id
        failed: list[tuple[str, Exception]] = []
        if event.status == "FINISHED":
            rows, problems = batcher.summary_rows(event)
            if problems:
                self.stats.skipped += len(problems)
                log.warning("summary metrics not logged", run_id=lane.run_id, reasons=problems)
            for part, error in await self._bisect(
                rows, lambda part: adapter.log_metrics(mlflow_id, part)
            ):
                self._undeliverable(0, lane, "log_batch", error, _metric_dicts([part]))
                failed.append(("log_batch", error))
            failed.extend(await self._upload(lane, event))
        try:  # even when the rest failed: never leave an orphaned RUNNING run
            await adapter.set_terminated(mlflow_id, event.status, batcher.timestamp_ms(event.time))
        except Exception as exc:
            self._undeliverable(0, lane, "set_terminated", exc, [{"status": event.status}])
            failed.append(("set_terminated", exc))
        if failed:
            self._count_outcome(lane, failed[-1][1], events)
        else:
            self.stats.delivered += events

    async def _upload(self, lane: Lane, event: RunEnd) -> list[tuple[str, Exception]]:
        if event.run_path is None:
            return []
        assert lane.mlflow_id is not None
        path = os.fspath(event.run_path)
        if not os.path.exists(path):
            self.stats.skipped += 1
            log.warning(
                "run_path does not exist; no artifact logged", run_id=lane.run_id, run_path=path
            )
            return []
        try:
            await self._ready_adapter().log_path(lane.mlflow_id, path)
        except Exception as exc:
            self._undeliverable(0, lane, "log_artifact", exc, [{"path": path}])
            return [("log_artifact", exc)]
        return []

    # -- outcomes --------------------------------------------------------------------------------

    def _ready_adapter(self) -> MlflowAdapter:
        assert self._adapter is not None, "lanes send only once connected"
        return self._adapter

    def _reject(self, event: Event, reason: str) -> None:
        """Count every rejection; log the first one per run and hook, not one per event."""
        self.stats.rejected += 1
        key = (getattr(event, "run_id", None), _hook_name(event))
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

    def _undeliverable(
        self, events: int, lane: Lane, call: str, exc: BaseException, entities: list[Any]
    ) -> None:
        """What did not land: dead-lettered if MLflow refused it, else spooled or failed."""
        self._note_error(call, exc)
        if is_transient(exc):
            log.error(
                "mlflow unreachable past the retry deadline",
                run_id=lane.run_id,
                call=call,
                events=events,
                kept_in_spool=self._journal is not None,
                error=self.stats.last_error,
            )
        else:
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
        if events:
            self._count_outcome(lane, exc, events)

    def _count_outcome(self, lane: Lane, exc: BaseException, events: int = 1) -> None:
        if not is_transient(exc):
            self.stats.dead_lettered += events
        elif self._journal is not None:
            self.stats.spooled += events
            self._hold_acks = True
        else:
            self.stats.failed += events

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

    def _report_drops(self) -> None:
        burst = self._buffer.take_drop_burst()
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
