"""The MLflow calls of one run, in their order: create the run (a child after its parent, so
it can carry ``mlflow.parentRunId``) and log its params; send step groups (their metrics, and
with traces their spans, concurrently up to the connection's in-flight limit); at its end the
trace's last spans, the summary, the extras, the artifact, and ``set_terminated`` last.

What MLflow refuses for good is bisected until the refused entities stand alone, so the rest
of the batch lands. Every event is counted once, through `Outcomes`: a step is delivered when
all of it landed. When the calls are made is the lane's (`_lane`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from . import _payload as payload
from . import _run_extras as run_extras
from . import _spans as spans_
from ._counters import Outcome
from ._event import RunEnd, Step
from ._log import log
from ._run import Run
from ._sending import Sending
from ._trajectory import Span

#: Step spans per request to the tracking store.
SPANS_PER_CALL = 200
#: MLflow's statuses of a run that ended.
TERMINATED = frozenset({"FINISHED", "FAILED", "KILLED"})


async def create(run: Run, s: Sending, counted: bool = True, find: bool = False) -> None:
    """Create the run (or, replaying or ``find``, find it by its key first), then log its
    params. ``counted`` is off when the start event was already counted (re-created after a
    crash of the loop)."""
    connection, event = s.ready(), run.start
    events = 1 if counted else 0
    try:
        parent_mlflow_id = None
        if run.parent is not None:
            await run.parent.created.wait()
            parent_mlflow_id = run.parent.mlflow_id
        if s.replaying or find:
            found = await connection.find_run(event.key)
            if found is not None:
                run.mlflow_id, run.found_status = found
        if run.mlflow_id is None:
            run.create_tried = True
            tags = payload.run_tags(run.run_id, parent_mlflow_id, event.key)
            name, tags = run_extras.start_tags(run, tags)
            run.mlflow_id = await connection.create_run(
                name, payload.timestamp_ms(event.time), tags
            )
        s.unended.add(run)
    except Exception as exc:
        run.start_error = exc
        await s.outcomes.undeliverable(events, run, "create_run", exc, [{"run_id": run.run_id}])
        return
    finally:
        run.created.set()
    mlflow_id = run.mlflow_id
    params = {key: str(value) for key, value in event.params.items()}
    failures = []
    for batch in payload.param_batches(params):  # MLflow takes 100 params a call
        failures += await s.bisect(batch, lambda part: connection.log_params(mlflow_id, part))
    for part, error in failures:
        entities = [{"key": k, "value": v} for k, v in part]
        await s.outcomes.undeliverable(0, run, "log_params", error, entities)
    if failures:
        s.outcomes.failed_call(run, failures[-1][1], events)
    else:
        s.outcomes.record(Outcome.DELIVERED, events, run=run)


async def send_steps(run: Run, steps: list[Step], s: Sending) -> None:
    """Steps' metrics (and token counts, and spans with traces on), then each step counted
    once: delivered if all of it landed, else by what kept a part of it out."""
    if not steps:
        return
    trajectory = run.trajectory
    trajectory.mark()
    spans_to = s.ready().experiment_id if s.traces_unavailable is None else None
    group = trajectory.step_rows(steps, spans_to, s.max_spans)
    await _send_group(run, group.rows, group.tokens, group.spans, s)
    trajectory.sent()
    for event in group.repeated:  # counted with the rest: a cut-off group counts nothing
        s.outcomes.reject(event, f"step {event.step} repeated (the first one was kept)", run)


async def _send_group(
    run: Run,
    rows: list[payload.MetricRow],
    tokens: list[payload.MetricRow],
    spans: list[tuple[int, Span]],
    s: Sending,
) -> None:
    if not rows:
        return
    counted = len(rows) // 2
    if run.mlflow_id is None:
        assert run.start_error is not None
        await s.outcomes.undeliverable(
            counted, run, "log_batch", run.start_error, payload.metric_dicts(rows)
        )
        return
    lost: dict[int, Exception] = {}  # step -> why (a step is lost if a part of it is)
    async with anyio.create_task_group() as tg:
        for part in payload.step_batches(rows, s.batch_size):
            tg.start_soon(_send_rows, run, part, lost, s)
        for part in payload.step_batches(tokens, s.batch_size):
            tg.start_soon(_send_rows, run, part, lost, s)
        for start in range(0, len(spans), SPANS_PER_CALL):
            tg.start_soon(_send_spans, run, spans[start : start + SPANS_PER_CALL], lost, s)
    for exc in lost.values():
        s.outcomes.failed_call(run, exc)
    s.outcomes.record(Outcome.DELIVERED, counted - len(lost), run=run)


async def _send_rows(
    run: Run, rows: list[payload.MetricRow], lost: dict[int, Exception], s: Sending
) -> None:
    """One log_batch of step metrics; a refused one is bisected down to single metrics."""
    mlflow_id, connection = run.mlflow_id, s.ready()
    assert mlflow_id is not None
    failures = await s.bisect(rows, lambda part: connection.log_metrics(mlflow_id, part))
    for part, exc in failures:
        await s.outcomes.undeliverable(0, run, "log_batch", exc, payload.metric_dicts(part))
        lost.update((row[3], exc) for row in part)


async def _send_spans(
    run: Run, spans: list[tuple[int, Span]], lost: dict[int, Exception], s: Sending
) -> None:
    """Step spans to the run's trace; where MLflow takes no traces, the sink goes on
    without (said once, and in status())."""
    mlflow_id, connection = run.mlflow_id, s.ready()
    assert mlflow_id is not None
    failures = await s.bisect(
        spans, lambda part: connection.log_spans(mlflow_id, [sp for _, sp in part], False)
    )
    for part, exc in failures:
        if s.traces_refused(exc):
            s.outcomes.skipped_parts(len(part))
            continue
        await s.outcomes.undeliverable(0, run, "log_spans", exc, [sp for _, sp in part])
        lost.update((step, exc) for step, _ in part)


async def end(
    run: Run, event: RunEnd, s: Sending, upload: bool = True, failed: list[Exception] | None = None
) -> None:
    """The trace's end, summary, extras, artifact, then terminate. ``upload`` is off in the
    close's last attempt, where the run is terminated first (MLflow takes metrics on an ended
    run) and its summary next: with the deadline near, a RUNNING run is the one thing that
    must not be left, and its summary what a reader looks for first; the trace comes last."""
    # The sink's own end (KILLED, for a run never ended) is not a caller's event.
    events = 0 if event.own else 1
    if run.mlflow_id is None:
        assert run.start_error is not None
        await s.outcomes.undeliverable(events, run, "set_terminated", run.start_error, [])
        return
    if event.own and run.found_status in TERMINATED:
        # Our own end of a run the journal holds no end of: MLflow has its real end.
        log.info("run ended before; its status is kept", run_id=run.run_id, status=run.found_status)
        run.terminated = True
        s.unended.discard(run)
        return
    failed = [] if failed is None else failed  # a last attempt's: what its first part met
    if upload:
        failed += await _trace_end(run, event, s)
        failed += await _summary(run, event, s)
    else:
        if not run.terminated:  # else: by the last attempt's first part
            await _terminate(run, event, s, failed)
        failed += await _summary(run, event, s)
    if not event.own:
        failed += await run_extras.send_end(run, event, s, upload)
        if upload and event.run_path is not None:
            failed.extend(await run_extras.upload(run, event.run_path, s))
        elif event.run_path is not None:
            s.outcomes.skip(
                "run_path not uploaded: the close deadline ran out",
                run_id=run.run_id,
                run_path=event.run_path,
            )
    if upload:  # even when the rest failed: never leave an orphaned RUNNING run
        await _terminate(run, event, s, failed)
    else:
        failed += await _trace_end(run, event, s)
    if failed:
        s.outcomes.failed_call(run, failed[-1], events)
    else:
        s.outcomes.record(Outcome.DELIVERED, events, run=run)


async def _summary(run: Run, event: RunEnd, s: Sending) -> list[Exception]:
    if event.status == "KILLED" or not (event.extra or {}).get("summary", True):
        return []
    mlflow_id, connection = run.mlflow_id, s.ready()
    assert mlflow_id is not None
    failed: list[Exception] = []
    rows = payload.admitted_summary_rows(event)
    for part, error in await s.bisect(rows, lambda part: connection.log_metrics(mlflow_id, part)):
        await s.outcomes.undeliverable(0, run, "log_batch", error, payload.metric_dicts(part))
        failed.append(error)
    return failed


async def _trace_end(run: Run, event: RunEnd, s: Sending) -> list[Exception]:
    """The run's span (outputs, link), then what the trace list reads and the assessments."""
    if not run.trajectory.tracing or s.traces_unavailable is not None:
        return []
    failed = await _send_root(run, event, s)
    if not failed and s.traces_unavailable is None:
        trace = spans_.mlflow_trace_id(run.start.key)
        failed += await run_extras.send_trace_info(run, trace, s, event)
        if not event.own:
            failed += await run_extras.send_assessments(run, trace, s, event)
    return failed


async def _terminate(run: Run, event: RunEnd, s: Sending, failed: list[Exception]) -> None:
    assert run.mlflow_id is not None
    try:
        await s.ready().set_terminated(
            run.mlflow_id, event.status, payload.timestamp_ms(event.time)
        )
        run.terminated = True
        s.unended.discard(run)
    except Exception as exc:
        await s.outcomes.undeliverable(0, run, "set_terminated", exc, [{"status": event.status}])
        failed.append(exc)


async def _send_root(run: Run, event: RunEnd, s: Sending) -> list[Exception]:
    parent = (run.parent.run_id, run.parent.start.key) if run.parent else None
    top = run.top()
    held, root = run.trajectory.closing_spans(
        run.run_id,
        event,
        parent,
        (top.run_id, top.start.key),
        s.ready().context_tags.get("mlflow.user"),
    )
    assert run.mlflow_id is not None
    mlflow_id, connection = run.mlflow_id, s.ready()
    batches = [held[i : i + SPANS_PER_CALL] for i in range(0, len(held), SPANS_PER_CALL)]
    try:
        for batch in batches:  # the last steps and the gap, then the root: the trace ends
            await connection.log_spans(mlflow_id, batch, False)
        await connection.log_spans(mlflow_id, [root], True)
    except Exception as exc:
        if s.traces_refused(exc):
            s.outcomes.skipped_parts(1)
            return []
        await s.outcomes.undeliverable(0, run, "log_spans", exc, [root])
        return [exc]
    return []


async def last_attempt(jobs: list[tuple[Run, RunEnd, bool]], s: Sending, deadline: float) -> None:
    """The close deadline ran out: each run of ``jobs`` (its end, whether it must be created
    first) is ended by ``deadline`` (time.monotonic()), FINISHED with its summary if its end
    came, else KILLED; no artifact. The calls share the connection's in-flight limit (one at
    a time on a local store), so they go in the order of what must not be missing: first
    every run already created is terminated; then, one by one, the runs never created are
    created and terminated at once, each only while the time left is twice what one took
    (a run created and left RUNNING would be worse than none: its events are counted as not
    delivered either way); and only then come the summaries, extras and traces."""
    failed: dict[Run, list[Exception]] = {run: [] for run, _, _ in jobs}
    to_end = [(run, end_) for run, end_, _ in jobs if not run.terminated]  # not sent before
    started = time.monotonic()
    terminating = 0
    async with anyio.create_task_group() as tg:
        for run, end_, create_first in jobs:
            kept = end_.own and run.found_status in TERMINATED  # MLflow has its real end
            if not (create_first or kept or run.mlflow_id is None or run.terminated):
                terminating += 1
                tg.start_soon(_terminate, run, end_, s, failed[run])
    # a guess at what creating and ending one run takes: two calls as long as these were
    took = 2 * (time.monotonic() - started) / max(1, terminating) if terminating else 0.0
    for run, end_, create_first in sorted(jobs, key=lambda job: job[0].depth()):
        # a parent before its children: a child's creation waits for its parent's
        if create_first and not run.terminated:
            if time.monotonic() + 2 * took > deadline:
                log.error(
                    "close deadline too near to create and end this run; it is not created",
                    run_id=run.run_id,
                )
                continue
            begun = time.monotonic()
            await _alone(_create_and_terminate, run, end_, s, failed[run])
            took = max(took, time.monotonic() - begun)
    async with anyio.create_task_group() as tg:
        for run, end_ in to_end:
            if run.mlflow_id is not None:
                tg.start_soon(_alone, end, run, end_, s, False, failed[run])


async def _create_and_terminate(
    run: Run, end_: RunEnd, s: Sending, failed: list[Exception]
) -> None:
    """A run the caller started and that was never created: created (found by its key first
    when a creation was under way: it may have landed), then terminated at once."""
    await create(run, s, find=run.create_tried)
    kept = end_.own and run.found_status in TERMINATED
    if run.mlflow_id is not None and not kept:
        await _terminate(run, end_, s, failed)


async def _alone(job: Callable[..., Awaitable[None]], run: Run, *args: Any) -> None:
    """One run's part of the last attempt: a bug of ours in it costs that run alone."""
    try:
        await job(run, *args)
    except Exception as exc:
        log.exception("internal error ending a run at close", run_id=run.run_id, error=repr(exc))
