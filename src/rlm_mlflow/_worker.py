"""The worker: one anyio event loop in one background thread.

It drains the buffer, routes events to one *lane* per run, and each lane sends its events in
order: the run is created before any batch of it is sent, step batches go out concurrently (up
to the adapter's in-flight limit), and the run is terminated only after all of them finished.
Lanes of different runs never wait on each other, except a child run's creation, which waits
for its parent's so that it can carry the ``mlflow.parentRunId`` tag.

Every event that leaves the buffer ends in exactly one counter of `Stats`: delivered, rejected
(bad input), failed (MLflow refused or stayed unreachable past the retry deadline) or dropped.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel
import anyio.to_thread
import structlog
from anyio.abc import TaskGroup
from tenacity import RetryCallState

from . import _batcher as batcher
from ._buffer import Buffer
from ._client import MlflowAdapter, redact_uri
from ._event import Event, Marker, RunEnd, RunStart, Step
from ._settings import Settings

log = structlog.get_logger("rlm_mlflow")


@dataclass
class Stats:
    """Counters written by the worker thread only; read from anywhere (plain ints)."""

    drained: int = 0
    delivered: int = 0
    rejected: int = 0
    failed: int = 0
    discarded: int = 0  # drained while mlflow is unavailable
    retried: int = 0
    skipped: int = 0  # parts of an event not logged: non-scalar params, a missing run path
    last_error: str | None = None

    @property
    def finished(self) -> int:
        return self.delivered + self.rejected + self.failed + self.discarded


@dataclass(eq=False)
class Lane:
    """One run's ordered stream of events on its way to MLflow."""

    run_id: str
    parent: Lane | None
    created: anyio.Event = field(default_factory=anyio.Event)
    mlflow_id: str | None = None
    pending: list[Event] = field(default_factory=list)
    enqueued: int = 0
    completed: int = 0  # advanced only when a whole batch of pending events is done
    running: bool = False


class Worker:
    def __init__(
        self, buffer: Buffer, settings: Settings, tracking_uri: str | None, experiment: str
    ) -> None:
        self._buffer = buffer
        self._settings = settings
        self._tracking_uri = tracking_uri
        self._experiment = experiment
        self.stats = Stats()
        self.import_error: str | None = None
        self.resolved_uri: str | None = None
        self._adapter: MlflowAdapter | None = None
        self._open: dict[str, Lane] = {}  # started, end not yet routed
        self._busy: set[Lane] = set()  # lanes with unfinished events
        self._markers: list[tuple[Marker, dict[Lane, int]]] = []
        self._closing = False
        self._rejections_logged: set[tuple[object, str]] = set()
        self._abort = False
        self._tg: TaskGroup | None = None
        self._thread = threading.Thread(target=self._thread_main, name="rlm-mlflow", daemon=True)

    # -- caller's side -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def abort(self, join_timeout: float) -> None:
        """Cancel whatever is still in flight and stop the thread."""
        self._abort = True
        self._buffer.wakeup.set()
        self._thread.join(join_timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the loop ------------------------------------------------------------------------------

    def _thread_main(self) -> None:
        try:
            anyio.run(self._main)
        except Exception as exc:  # a bug of ours: say so, and do not leave flush() hanging
            log.exception("worker crashed", error=str(exc))
            self.stats.last_error = f"worker crashed: {exc!r}"
            self._buffer.close()  # hooks must not wait on a buffer nobody drains
        finally:
            for marker, _ in self._markers:
                marker.done.set()

    async def _main(self) -> None:
        self._adapter = await self._connect()
        async with anyio.create_task_group() as tg:
            self._tg = tg
            while True:
                # Sleep until a full batch waits (the hooks wake us), a marker comes, or the
                # flush interval passes; and while the lanes hold a whole queue's worth.
                if (
                    len(self._buffer) < self._buffer.wake_at
                    or self._inflight() >= self._settings.queue_size
                ):
                    await anyio.to_thread.run_sync(
                        self._buffer.wakeup.wait,
                        self._settings.flush_interval,
                        abandon_on_cancel=True,
                    )
                self._buffer.wakeup.clear()
                if self._abort:
                    tg.cancel_scope.cancel()
                    break
                room = self._settings.queue_size - self._inflight()
                for event in self._buffer.drain(max(room, 0)):
                    self._route(event)
                self._report_drops()
                if self._closing and not self._busy and len(self._buffer) == 0:
                    break
                await anyio.lowlevel.checkpoint()  # let the lanes run between drains
        self._report_pending_at_exit()

    async def _connect(self) -> MlflowAdapter | None:
        """Import mlflow and reach the store; retried until it works or the sink is closed."""
        delay = 0.5
        while not self._abort:
            try:
                adapter = await anyio.to_thread.run_sync(
                    MlflowAdapter.connect_sync,
                    self._tracking_uri,
                    self._experiment,
                    self._settings.request_timeout,
                    self._settings.max_in_flight,
                    self._settings.retry_deadline,
                    self._on_retry,
                )
            except ImportError as exc:
                self.import_error = f"unavailable: {exc}"
                log.error("mlflow cannot be imported; events are discarded", error=str(exc))
                self._buffer.close()
                return None
            except Exception as exc:
                self._note_error("connect", exc)
                log.warning(
                    "tracking store unreachable, retrying",
                    retry_in=delay,
                    tracking_uri=redact_uri(self._tracking_uri),
                    error=str(exc),
                )
                # Not woken by the hooks (they set the wakeup at every batch): a plain backoff,
                # in short naps so that an abort from close() is seen quickly.
                deadline = time.monotonic() + delay
                while not self._abort and time.monotonic() < deadline:
                    await anyio.sleep(0.1)
                delay = min(delay * 2, 10.0)
                continue
            self.resolved_uri = redact_uri(adapter.tracking_uri)
            log.info(
                "connected",
                tracking_uri=self.resolved_uri,
                experiment=self._experiment,
                experiment_id=adapter.experiment_id,
            )
            return adapter
        return None

    def _inflight(self) -> int:
        return self.stats.drained - self.stats.finished

    # -- routing (event loop thread, in buffer order) --------------------------------------------

    def _route(self, event: Event) -> None:
        if isinstance(event, Marker):
            self._add_marker(event)
            return
        self.stats.drained += 1
        if self._adapter is None:
            self.stats.discarded += 1
            return
        lane = self._open.get(event.run_id)
        if isinstance(event, RunStart):
            if lane is not None:
                self._reject(event, "on_run_start for a run that is already open")
                return
            parent_id = event.params.get("parent_run_id")
            lane = Lane(event.run_id, parent=self._open.get(str(parent_id)) if parent_id else None)
            self._open[event.run_id] = lane
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
                marker.done.set()
                if marker.closing:
                    self._buffer.wakeup.set()

    # -- sending (one task per busy lane) --------------------------------------------------------

    async def _drive(self, lane: Lane) -> None:
        while lane.pending:
            batch, lane.pending = lane.pending, []
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
            tags = batcher.run_tags(lane.run_id, parent_mlflow_id)
            lane.mlflow_id = await adapter.create_run(
                lane.run_id, batcher.timestamp_ms(event.time), tags
            )
        except Exception as exc:
            self._fail(1, lane, "create_run", exc)
            return
        finally:
            lane.created.set()
        params, skipped = batcher.run_params(event)
        if skipped:
            self.stats.skipped += len(skipped)
            log.info("params skipped (non-scalar or too long)", run_id=lane.run_id, params=skipped)
        try:
            for chunk in batcher.param_batches(params):
                await adapter.log_params(lane.mlflow_id, chunk)
        except Exception as exc:
            self._fail(1, lane, "log_params", exc)
            return
        self.stats.delivered += 1

    async def _send_steps(self, lane: Lane, steps: list[Step]) -> None:
        if not steps:
            return
        rows: list[batcher.MetricRow] = []
        for event in steps:
            try:
                rows.extend(batcher.step_rows(event))
            except batcher.BadInput as exc:
                self._reject(event, str(exc))
        if not rows:
            return
        if lane.mlflow_id is None:
            self._fail(len(rows) // 2, lane, "log_batch", RuntimeError("the run was not created"))
            return
        async with anyio.create_task_group() as tg:
            for chunk in batcher.step_chunks(rows, self._settings.batch_size):
                tg.start_soon(self._send_chunk, lane, chunk)

    async def _send_chunk(self, lane: Lane, rows: Sequence[batcher.MetricRow]) -> None:
        assert lane.mlflow_id is not None
        events = len(rows) // len(batcher.STEP_METRICS)
        try:
            await self._ready_adapter().log_metrics(lane.mlflow_id, rows)
        except Exception as exc:
            self._fail(events, lane, "log_batch", exc)
        else:
            self.stats.delivered += events

    async def _end(self, lane: Lane, event: RunEnd) -> None:
        # A KILLED end is the sink's own (see _add_marker), not a caller's event: not counted.
        events = 1 if event.status == "FINISHED" else 0
        if lane.mlflow_id is None:
            self._fail(events, lane, "set_terminated", RuntimeError("the run was not created"))
            return
        adapter = self._ready_adapter()
        failed: list[tuple[str, Exception]] = []
        if event.status == "FINISHED":
            try:
                await adapter.log_metrics(lane.mlflow_id, batcher.summary_rows(event))
            except batcher.BadInput as exc:
                self.stats.skipped += 1
                log.warning("summary metrics not logged", run_id=lane.run_id, reason=str(exc))
            except Exception as exc:
                failed.append(("log_batch", exc))
            failed.extend(await self._upload(lane, event))
        try:  # even when the rest failed: never leave an orphaned RUNNING run
            await adapter.set_terminated(
                lane.mlflow_id, event.status, batcher.timestamp_ms(event.time)
            )
        except Exception as exc:
            failed.append(("set_terminated", exc))
        if failed:
            for what, error in failed[:-1]:
                self._note_error(what, error)
            self._fail(events, lane, *failed[-1])
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
            return [("log_artifact", exc)]
        return []

    # -- outcomes --------------------------------------------------------------------------------

    def _ready_adapter(self) -> MlflowAdapter:
        assert self._adapter is not None, "lanes run only once connected"
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

    def _fail(self, events: int, lane: Lane, what: str, exc: BaseException) -> None:
        self.stats.failed += events
        self._note_error(what, exc)
        log.error(
            "mlflow call failed",
            run_id=lane.run_id,
            call=what,
            events=events,
            error=self.stats.last_error,
        )

    def _note_error(self, what: str, exc: BaseException) -> None:
        self.stats.last_error = f"{what}: {type(exc).__name__}: {str(exc)[:500]}"

    def _on_retry(self, state: RetryCallState) -> None:
        self.stats.retried += 1
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "mlflow call failed, retrying",
            attempt=state.attempt_number,
            retry_in=round(state.upcoming_sleep, 2),
            error=str(exc)[:300],
        )

    def _report_drops(self) -> None:
        burst = self._buffer.take_drop_burst()
        if burst:
            log.warning(
                "events dropped in the last burst",
                dropped=burst,
                total_dropped=self._buffer.dropped,
            )

    def _report_pending_at_exit(self) -> None:
        pending = self._inflight()
        if pending:
            log.error(
                "worker stopped with events undelivered",
                pending=pending,
                runs_open=sorted(self._open),
            )


def _hook_name(event: Event) -> str:
    return {RunStart: "on_run_start", Step: "on_step", RunEnd: "on_run_end"}.get(
        type(event), "marker"
    )
