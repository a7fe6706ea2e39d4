"""A lane: one run's ordered stream of events, and the order of the MLflow calls it makes.

The run is created before any batch of it is sent (a child run after its parent, so it can
carry ``mlflow.parentRunId``); its params follow; step batches go out concurrently, up to the
connection's in-flight limit; the summary, the artifact and ``set_terminated`` come only after
every batch before them finished. With traces on, each step's span goes with its metrics
and the run's span with its end (`_spans`). What MLflow refuses for good is bisected until
the refused entities stand alone, so the rest of the batch lands. Every event is counted
once, through `Outcomes`: a step is delivered when all of it landed.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio

from . import _payload as payload
from . import _run_extras as run_extras
from . import _spans as spans_
from ._event import Event, RunEnd, RunStart, Step
from ._exporter import Connection, TracesUnsupported, is_entity_error, is_transient
from ._log import log
from ._memory import StepSet
from ._outcomes import Outcomes
from ._trace_cap import TraceCap

U = TypeVar("U")
Span = spans_.Span
#: Step spans per request to the tracking store.
SPANS_PER_CALL = 200
#: MLflow's statuses of a run that ended.
TERMINATED = frozenset({"FINISHED", "FAILED", "KILLED"})


@dataclass
class Sending:
    """What every lane of a worker shares."""

    outcomes: Outcomes
    batch_size: int
    replaying: bool  # a run may already exist: look it up by its key first
    connection: Connection | None = None  # set once connected
    unended: set[Lane] = field(default_factory=set)  # created in MLflow, not yet terminated
    traces: bool = False  # the traces setting (status' traces); a run's own is `Lane.tracing`
    max_spans: int = 2000
    traces_unavailable: str | None = None  # why the store takes no traces (status' traces)
    unsupported: set[str] = field(default_factory=set)  # features the store lacks, said once

    def traces_refused(self, exc: BaseException) -> bool:
        """Whether ``exc`` says the store takes no traces at all (then: metrics only)."""
        if not isinstance(exc, TracesUnsupported):
            return False
        if self.traces_unavailable is None:
            self.traces_unavailable = f"unavailable: {exc}"
            log.warning("the tracking store takes no traces; sending metrics only", reason=str(exc))
        return True

    def ready(self) -> Connection:
        assert self.connection is not None, "lanes send only once connected"
        return self.connection

    async def bisect(
        self, units: list[U], send: Callable[[list[U]], Awaitable[None]]
    ) -> list[tuple[list[U], Exception]]:
        """Send ``units``; when MLflow refuses a value in them, halve until the refused ones
        are isolated, so the rest lands. Returns the parts that did not land, with the error.
        Only a refused value is bisected (`is_entity_error`): not trouble that is the same
        for every part, nor once the sink is unavailable (a deleted experiment refuses all)."""
        if not units:
            return []
        try:
            await send(units)
        except Exception as exc:
            if len(units) == 1 or not is_entity_error(exc) or self.outcomes.unavailable is not None:
                return [(units, exc)]
            middle = len(units) // 2
            return await self.bisect(units[:middle], send) + await self.bisect(units[middle:], send)
        return []


@dataclass(eq=False)
class Lane:
    """One run on its way to MLflow. The worker's loop fills ``pending``; the lane's task
    takes it as a batch (``sending``) and counts it ``completed`` once sent."""

    start: RunStart
    parent: Lane | None
    created: anyio.Event = field(default_factory=anyio.Event)
    mlflow_id: str | None = None
    found_status: str | None = None  # the run's status in MLflow when a replay found it
    start_error: BaseException | None = None
    seen_steps: StepSet = field(default_factory=StepSet)
    pending: list[Event] = field(default_factory=list)
    boundaries: int = 0  # starts and ends in ``pending``
    sending: list[Event] = field(default_factory=list)  # the batch its task is sending
    pending_bytes: float = 0.0  # what ``pending`` holds in memory (`_memory`'s estimate)
    sending_bytes: float = 0.0  # what ``sending`` holds
    resume: int = 0  # index in ``sending`` of the first event not counted yet
    resumed: bool = False  # sent again after a cut-off: find the run before creating it
    #: The trajectory state before the step group being sent (see `rewind`).
    _mark: tuple[StepSet, list[int], TraceCap, float, list[tuple[str, str]]] | None = None
    completed: int = 0  # advanced only when a whole batch of pending events is done
    finished: int = 0  # events of this lane counted in Stats (see Outcomes.tally)
    running: bool = False
    terminated: bool = False
    recreate: bool = False  # its start was lost in a crash of the loop: create it again
    # The trajectory: where the last step ended, the tokens so far (prompt, completion,
    # calls), the step spans sent and not, and the child runs started since the last step.
    last_time: float = 0.0
    tokens: list[int] = field(default_factory=lambda: [0, 0, 0])
    cap: TraceCap = field(default_factory=TraceCap)
    children: list[tuple[str, str]] = field(default_factory=list)
    # Whether the run is a trace: its events say so (with traces on, its start carries the
    # task and its steps a span), not the settings of the process sending it (a replay).
    tracing: bool = False

    def __post_init__(self) -> None:
        self.last_time = self.start.time
        self.tracing = isinstance(self.start.extra, dict) and "task" in self.start.extra

    @property
    def run_id(self) -> str:
        return self.start.run_id

    @property
    def enqueued(self) -> int:
        """Events ever given to this lane (a flush waits until ``completed`` reaches it)."""
        return self.completed + len(self.sending) + len(self.pending)

    async def send(self, batch: list[Event], s: Sending, boundaries: int) -> None:
        """One batch of this run's events, in order: steps between boundaries go together.
        ``boundaries``: how many starts and ends it holds (none, most of the time)."""
        if self.recreate:
            self.recreate = False
            await self.create(s, counted=False)
        if not boundaries:
            await self._send_steps(batch, s)  # type: ignore[arg-type]
            self.resume = len(batch)
            return
        steps: list[Step] = []
        for i, event in enumerate(batch):
            if event.__class__ is Step:
                steps.append(event)
                continue
            await self._send_steps(steps, s)
            self.resume, steps = i, []
            if isinstance(event, RunStart):
                await self.create(s, find=self.resumed)
            elif isinstance(event, RunEnd):
                await self.end(event, s)
            self.resume = i + 1
        await self._send_steps(steps, s)
        self.resume = len(batch)

    def rewind(self) -> list[Event]:
        """After the task sending ``sending`` was cancelled with its loop (a task-mode worker
        whose event loop went away): the part of the batch not counted yet, to be sent again,
        with the run's trajectory state as it was before it. What was counted stays so."""
        rest = self.sending[self.resume :]
        self.completed += len(self.sending) - len(rest)
        if self._mark is not None:
            seen, tokens, self.cap, self.last_time, children = self._mark
            self.seen_steps, self.tokens, self.children, self._mark = seen, tokens, children, None
        self.sending, self.resumed = [], True
        return rest

    async def create(self, s: Sending, counted: bool = True, find: bool = False) -> None:
        """Create the run (or, replaying or ``find``, find it by its key first), then log its
        params. ``counted`` is off when the start event was already counted (re-created after
        a crash of the loop)."""
        connection, event = s.ready(), self.start
        events = 1 if counted else 0
        try:
            parent_mlflow_id = None
            if self.parent is not None:
                await self.parent.created.wait()
                parent_mlflow_id = self.parent.mlflow_id
            if s.replaying or find:
                found = await connection.find_run(event.key)
                if found is not None:
                    self.mlflow_id, self.found_status = found
            if self.mlflow_id is None:
                tags = payload.run_tags(self.run_id, parent_mlflow_id, event.key)
                name, tags = run_extras.start_tags(self, tags)
                self.mlflow_id = await connection.create_run(
                    name, payload.timestamp_ms(event.time), tags
                )
            s.unended.add(self)
        except Exception as exc:
            self.start_error = exc
            await s.outcomes.undeliverable(
                events, self, "create_run", exc, [{"run_id": self.run_id}]
            )
            return
        finally:
            self.created.set()
        mlflow_id = self.mlflow_id
        params = {key: str(value) for key, value in event.params.items()}
        failures = []
        for batch in payload.param_batches(params):  # MLflow takes 100 params a call
            failures += await s.bisect(batch, lambda part: connection.log_params(mlflow_id, part))
        for part, error in failures:
            entities = [{"key": k, "value": v} for k, v in part]
            await s.outcomes.undeliverable(0, self, "log_params", error, entities)
        if failures:
            s.outcomes.failed_call(self, failures[-1][1], events)
        else:
            s.outcomes.tally(self, "delivered", events)

    async def _send_steps(self, steps: list[Step], s: Sending) -> None:
        """Steps' metrics (and token counts, and spans with traces on), then each step counted
        once: delivered if all of it landed, else by what kept a part of it out."""
        if not steps:
            return
        self._mark = (
            self.seen_steps.copy(),
            self.tokens[:],
            self.cap.copy(),
            self.last_time,
            self.children[:],
        )
        rows: list[payload.MetricRow] = []
        tokens: list[payload.MetricRow] = []
        spans: list[tuple[int, Span]] = []
        repeated: list[Step] = []
        first_time, append = self.seen_steps.add, rows.append
        for event in steps:  # per step: kept short, it is most of what the worker does
            _, step, reward, cumulative, at, extra = event
            if not first_time(step):
                repeated.append(event)
                continue
            ts = int(at * 1000)  # payload.timestamp_ms, inline
            append(("step_reward", reward, ts, step))
            append(("cumulative_reward", cumulative, ts, step))
            if extra is not None:
                self._trajectory(step, reward, cumulative, at, ts, extra, tokens, spans, s)
            self.last_time = at
        await self._send_step_rows(rows, tokens, spans, s)
        self._mark = None  # done: nothing of this group to send again (see `rewind`)
        for event in repeated:  # counted with the rest: a cut-off group counts nothing
            s.outcomes.reject(event, f"step {event.step} repeated (the first one was kept)", self)

    async def _send_step_rows(
        self,
        rows: list[payload.MetricRow],
        tokens: list[payload.MetricRow],
        spans: list[tuple[int, Span]],
        s: Sending,
    ) -> None:
        if not rows:
            return
        counted = len(rows) // 2
        if self.mlflow_id is None:
            assert self.start_error is not None
            await s.outcomes.undeliverable(
                counted, self, "log_batch", self.start_error, payload.metric_dicts(rows)
            )
            return
        lost: dict[int, Exception] = {}  # step -> why (a step is lost if a part of it is)
        async with anyio.create_task_group() as tg:
            for part in payload.step_batches(rows, s.batch_size):
                tg.start_soon(self._send_rows, part, lost, s)
            for part in payload.step_batches(tokens, s.batch_size):
                tg.start_soon(self._send_rows, part, lost, s)
            for start in range(0, len(spans), SPANS_PER_CALL):
                tg.start_soon(self._send_spans, spans[start : start + SPANS_PER_CALL], lost, s)
        for exc in lost.values():
            s.outcomes.failed_call(self, exc)
        s.outcomes.tally(self, "delivered", counted - len(lost))

    def _trajectory(
        self,
        step: int,
        reward: float,
        cumulative: float,
        at: float,
        ts: int,
        extra: dict[str, Any],
        tokens: list[payload.MetricRow],
        spans: list[tuple[int, Span]],
        s: Sending,
    ) -> None:
        """A step's token counts (cumulative, as metrics) and, with traces, its span."""
        usage = extra.get("usage")
        if usage is not None:
            total = self.tokens
            for i in range(3):
                total[i] += usage[i]
            tokens.append(("prompt_tokens", float(total[0]), ts, step))
            tokens.append(("completion_tokens", float(total[1]), ts, step))
        detail = extra.get("span")
        if detail is None or s.traces_unavailable is not None:
            return
        self.tracing = True
        model = self.start.params.get("model") if isinstance(self.start.params, dict) else None
        made = spans_.step_spans(
            self.start.key,
            step,
            self.last_time,
            at,
            reward,
            cumulative,
            detail,
            usage,
            self.children,
            model if isinstance(model, str) else None,
            s.ready().experiment_id,
        )
        self.children = []
        # the UI wants few spans, not all: the first and the last steps, the rest a gap
        spans.extend(
            (step, span) for span in self.cap.add(s.max_spans, step, self.last_time, at, made)
        )

    async def _send_rows(
        self, rows: list[payload.MetricRow], lost: dict[int, Exception], s: Sending
    ) -> None:
        """One log_batch of step metrics; a refused one is bisected down to single metrics."""
        mlflow_id, connection = self.mlflow_id, s.ready()
        assert mlflow_id is not None
        failures = await s.bisect(rows, lambda part: connection.log_metrics(mlflow_id, part))
        for part, exc in failures:
            await s.outcomes.undeliverable(0, self, "log_batch", exc, payload.metric_dicts(part))
            lost.update((row[3], exc) for row in part)

    async def _send_spans(
        self, spans: list[tuple[int, Span]], lost: dict[int, Exception], s: Sending
    ) -> None:
        """Step spans to the run's trace; where MLflow takes no traces, the sink goes on
        without (said once, and in status())."""
        mlflow_id, connection = self.mlflow_id, s.ready()
        assert mlflow_id is not None
        failures = await s.bisect(
            spans, lambda part: connection.log_spans(mlflow_id, [sp for _, sp in part], False)
        )
        for part, exc in failures:
            if s.traces_refused(exc):
                s.outcomes.stats.skipped += len(part)
                continue
            await s.outcomes.undeliverable(0, self, "log_spans", exc, [sp for _, sp in part])
            lost.update((step, exc) for step, _ in part)

    async def end(self, event: RunEnd, s: Sending, upload: bool = True) -> None:
        """Summary, artifact, then terminate. ``upload`` is off in the close's last attempt,
        where the run is terminated first (MLflow takes metrics on an ended run): with the
        deadline near, a RUNNING run is the one thing that must not be left."""
        # The sink's own end (KILLED, for a run never ended) is not a caller's event.
        events = 0 if event.own else 1
        if self.mlflow_id is None:
            assert self.start_error is not None
            await s.outcomes.undeliverable(events, self, "set_terminated", self.start_error, [])
            return
        if event.own and self.found_status in TERMINATED:
            # Our own end of a run the journal holds no end of: MLflow has its real end.
            log.info(
                "run ended before; its status is kept", run_id=self.run_id, status=self.found_status
            )
            self.terminated = True
            s.unended.discard(self)
            return
        connection, mlflow_id = s.ready(), self.mlflow_id
        failed: list[Exception] = []
        if not upload:
            await self._terminate(event, s, failed)
        if self.tracing and s.traces_unavailable is None:  # the run's span: outputs, link
            root_failed = await self._send_root(event, s)
            failed += root_failed
            if not root_failed and s.traces_unavailable is None:
                trace = spans_.mlflow_trace_id(self.start.key)
                failed += await run_extras.send_trace_info(self, trace, s, event)
                if not event.own:
                    failed += await run_extras.send_assessments(self, trace, s, event)
        if event.status != "KILLED" and (event.extra or {}).get("summary", True):
            rows = payload.admitted_summary_rows(event)
            for part, error in await s.bisect(
                rows, lambda part: connection.log_metrics(mlflow_id, part)
            ):
                await s.outcomes.undeliverable(
                    0, self, "log_batch", error, payload.metric_dicts(part)
                )
                failed.append(error)
        if not event.own:
            failed += await run_extras.send_end(self, event, s, upload)
            if upload and event.run_path is not None:
                failed.extend(await self.upload(event.run_path, s))
            elif event.run_path is not None:
                s.outcomes.skip(
                    "run_path not uploaded: the close deadline ran out",
                    run_id=self.run_id,
                    run_path=event.run_path,
                )
        if upload:  # even when the rest failed: never leave an orphaned RUNNING run
            await self._terminate(event, s, failed)
        if failed:
            s.outcomes.failed_call(self, failed[-1], events)
        else:
            s.outcomes.tally(self, "delivered", events)

    async def _terminate(self, event: RunEnd, s: Sending, failed: list[Exception]) -> None:
        assert self.mlflow_id is not None
        try:
            await s.ready().set_terminated(
                self.mlflow_id, event.status, payload.timestamp_ms(event.time)
            )
            self.terminated = True
            s.unended.discard(self)
        except Exception as exc:
            await s.outcomes.undeliverable(
                0, self, "set_terminated", exc, [{"status": event.status}]
            )
            failed.append(exc)

    async def _send_root(self, event: RunEnd, s: Sending) -> list[Exception]:
        start, extra = self.start, event.extra or {}
        task = (start.extra or {}).get("task")
        inputs = {"task": task, "environment": start.environment, "params": start.params}
        outputs: dict[str, Any] = {"completed": bool(event.completed)}
        if event.total_reward is not None:
            outputs["total_reward"] = event.total_reward
        if extra.get("final_response") is not None:
            outputs["final_response"] = extra["final_response"]
        parent = (self.parent.run_id, self.parent.start.key) if self.parent else None
        top = self.top()
        held, gap = self.cap.finish()
        if gap is not None:
            held.append(
                spans_.gap_span(start.key, gap.first, gap.last, gap.count, gap.start, gap.end)
            )
        root = spans_.root_span(
            start.key,
            self.run_id,
            start.time,
            event.time,
            {k: v for k, v in inputs.items() if v is not None},
            outputs,
            self.cap.untraced,
            parent,
            ok=event.status == "FINISHED",
            root=(top.run_id, top.start.key),
            user=s.ready().context_tags.get("mlflow.user"),
        )
        assert self.mlflow_id is not None
        mlflow_id, connection = self.mlflow_id, s.ready()
        batches = [held[i : i + SPANS_PER_CALL] for i in range(0, len(held), SPANS_PER_CALL)]
        try:
            for batch in batches:  # the last steps and the gap, then the root: the trace ends
                await connection.log_spans(mlflow_id, batch, False)
            await connection.log_spans(mlflow_id, [root], True)
        except Exception as exc:
            if s.traces_refused(exc):
                s.outcomes.stats.skipped += 1
                return []
            await s.outcomes.undeliverable(0, self, "log_spans", exc, [root])
            return [exc]
        return []

    def top(self) -> Lane:
        """The recursion's root run (this one, for a run without a parent)."""
        top = self
        while top.parent is not None:
            top = top.parent
        return top

    async def upload(self, path: str, s: Sending) -> list[Exception]:
        """A file (or a directory) as the run's artifact."""
        assert self.mlflow_id is not None
        if not os.path.exists(path):
            s.outcomes.skip(
                "run_path does not exist; no artifact logged", run_id=self.run_id, run_path=path
            )
            return []
        try:
            await s.ready().log_path(self.mlflow_id, path)
        except OSError as exc:
            if is_transient(exc) or exc.filename is None:
                await s.outcomes.undeliverable(0, self, "log_artifact", exc, [{"path": path}])
                return [exc]
            # a local file we cannot read (permissions, a symlink loop): not MLflow's refusal
            s.outcomes.skip(
                "run_path could not be read; no artifact logged",
                run_id=self.run_id,
                run_path=path,
                error=f"{type(exc).__name__}: {exc}"[:300],
            )
        except Exception as exc:
            await s.outcomes.undeliverable(0, self, "log_artifact", exc, [{"path": path}])
            return [exc]
        return []

    async def close_at_deadline(self, end: RunEnd, create: bool, s: Sending) -> None:
        """The close's last attempt for this run: create it if it never was (its start may
        have been in flight: find it by key first), then end it; no artifact."""
        try:
            if create:
                await self.create(s, find=True)
            if self.mlflow_id is not None and not self.terminated:
                await self.end(end, s, upload=False)
        except Exception as exc:  # a bug of ours: the other runs still get their end
            log.exception(
                "internal error ending a run at close", run_id=self.run_id, error=repr(exc)
            )
