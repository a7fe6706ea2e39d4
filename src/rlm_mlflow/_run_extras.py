"""The MLflow calls for what a run carries beyond rlm-code's sink (`_extras`): its extra tags
and name at creation, and at its end its logged model, extra metrics (linked to the model),
tags, files, table artifact, and the assessments of its trace.

Each part that MLflow refuses is handled like any other call of the run: retried when
transient, kept when the store refuses us, dead-lettered when it refuses a value; a store
without the feature (`FeatureUnsupported`: no logged models, no assessments) costs that
part only, said once. What did not land is returned, for the run's end to count.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from . import _payload as payload
from . import _spans as spans_
from . import _trace_info as trace_info
from ._event import RunEnd
from ._limits import MAX_PARAMS_PER_BATCH
from ._log import log
from ._run import Run
from ._sending import Sending
from ._tables import logged_artifacts_tag, table_artifact
from .exporters.base import MODEL_KEY_TAG, FeatureUnsupported, is_transient


def start_tags(run: Run, tags: dict[str, str]) -> tuple[str, dict[str, str]]:
    """The run's name and tags at creation, with the start's extra tags and name."""
    extra = run.start.extra or {}
    name = extra.get("name") or payload.run_name(run.run_id)
    merged = {**extra.get("tags", {}), **tags}
    merged["mlflow.runName"] = name
    return name, merged


async def send_end(run: Run, event: RunEnd, s: Sending, uploading: bool) -> list[Exception]:
    """The end's extras, in the order the UI needs them: the model before the metrics that
    link to it; files and the table only when ``uploading`` (not in a close's last attempt)."""
    extra = event.extra or {}
    mlflow_id, connection, failed = run.mlflow_id, s.ready(), []
    assert mlflow_id is not None
    ts = payload.timestamp_ms(event.time)
    model_id = None
    if extra.get("model"):
        model_id, errors = await _model(run, extra["model"], s)
        failed += errors
    rows = [(key, value, ts, 0) for key, value in extra.get("metrics", {}).items()]
    if rows:
        if model_id is not None:
            send = lambda part: connection.log_model_metrics(mlflow_id, model_id, part)  # noqa: E731
        else:
            send = lambda part: connection.log_metrics(mlflow_id, part)  # noqa: E731
        for part, error in await s.bisect(rows, send):
            await s.outcomes.undeliverable(0, run, "log_batch", error, payload.metric_dicts(part))
            failed.append(error)
    tags = list(extra.get("tags", {}).items())
    for start in range(0, len(tags), MAX_PARAMS_PER_BATCH):
        some = tags[start : start + MAX_PARAMS_PER_BATCH]
        failed += await _call(run, s, "log_tags", connection.log_tags(mlflow_id, some), some)
    if not uploading:
        return failed
    for path in extra.get("artifacts", []):
        failed += await upload(run, path, s)
    table = extra.get("table")
    if table:
        text = table_artifact(table["columns"], table["rows"])
        call = connection.log_text(mlflow_id, text, table["file"])
        failed += await _call(run, s, "log_table", call, [table["file"]])
        tag = [("mlflow.loggedArtifacts", logged_artifacts_tag(None, table["file"]))]
        failed += await _call(run, s, "log_tags", connection.log_tags(mlflow_id, tag), tag)
    return failed


async def send_assessments(run: Run, trace_id: str, s: Sending, event: RunEnd) -> list[Exception]:
    """The trace's assessments, once its spans have landed: CODE feedback ``total_reward``,
    ``completed`` and ``steps`` of an RLM run, and those its end carries (a benchmark case's
    ``answer_match``, its expected answer), which come first where a name is in both."""
    extra = event.extra or {}
    assessments = list(extra.get("assessments", []))
    if extra.get("summary", True):
        assessments += run_assessments(event)
    assessments = [
        {**a, "source_type": "CODE", "source_id": "rlm-mlflow", "run_id": run.mlflow_id}
        for a in assessments
    ]
    if not assessments:
        return []
    call = s.ready().log_assessments(trace_id, assessments)
    return await _call(run, s, "log_assessments", call, [a["name"] for a in assessments])


async def send_trace_info(run: Run, trace_id: str, s: Sending, event: RunEnd) -> list[Exception]:
    """What MLflow's trace list reads (its run, user, session, source, name, previews), once
    the trace's spans have landed: one merge into the stored trace, the same on a replay."""
    start, context = run.start, s.ready().context_tags
    task = (start.extra or {}).get("task")
    metadata = {
        trace_info.SOURCE_RUN: run.mlflow_id,
        trace_info.TRACE_SESSION: run.top().run_id[:250],
        trace_info.TRACE_USER: context.get("mlflow.user"),
        **{k: v for k, v in context.items() if k.startswith("mlflow.source.")},
    }
    name = spans_.trace_name(run.run_id, {"task": task, "environment": start.environment})
    tags = {trace_info.TRACE_NAME: name, "rlm.run_id": run.run_id}
    tags["rlm.root_trace"] = spans_.mlflow_trace_id(run.top().start.key)
    if run.parent is not None:
        tags["rlm.parent_trace"] = spans_.mlflow_trace_id(run.parent.start.key)
    response = (event.extra or {}).get("final_response")
    info = {
        "metadata": {k: str(v) for k, v in metadata.items() if v is not None},
        "tags": tags,
        "request_time_ms": payload.timestamp_ms(start.time),
        "execution_ms": max(0, payload.timestamp_ms(event.time) - payload.timestamp_ms(start.time)),
        "state": "OK" if event.status == "FINISHED" else "ERROR",
        "request_preview": task if isinstance(task, str) else None,
        "response_preview": response if isinstance(response, str) else None,
    }
    call = s.ready().set_trace_info(trace_id, info)
    return await _call(run, s, "set_trace_info", call, [trace_id])


async def upload(run: Run, path: str, s: Sending) -> list[Exception]:
    """A file (or a directory) as the run's artifact."""
    assert run.mlflow_id is not None
    if not os.path.exists(path):
        s.outcomes.skip(
            "run_path does not exist; no artifact logged", run_id=run.run_id, run_path=path
        )
        return []
    try:
        await s.ready().log_path(run.mlflow_id, path)
    except OSError as exc:
        if is_transient(exc) or exc.filename is None:
            await s.outcomes.undeliverable(0, run, "log_artifact", exc, [{"path": path}])
            return [exc]
        # a local file we cannot read (permissions, a symlink loop): not MLflow's refusal
        s.outcomes.skip(
            "run_path could not be read; no artifact logged",
            run_id=run.run_id,
            run_path=path,
            error=f"{type(exc).__name__}: {exc}"[:300],
        )
    except Exception as exc:
        await s.outcomes.undeliverable(0, run, "log_artifact", exc, [{"path": path}])
        return [exc]
    return []


def run_assessments(event: RunEnd) -> list[dict[str, Any]]:
    """An RLM run's result as feedback (those of its values that are of their kind)."""
    out: list[dict[str, Any]] = []
    reward, steps = event.total_reward, event.steps
    if isinstance(reward, (int, float)) and not isinstance(reward, bool) and math.isfinite(reward):
        out.append({"name": "total_reward", "kind": "feedback", "value": float(reward)})
    out.append({"name": "completed", "kind": "feedback", "value": bool(event.completed)})
    number = isinstance(steps, (int, float)) and not isinstance(steps, bool)
    if number and math.isfinite(steps) and steps >= 0:  # a summary metric by now: a float
        out.append({"name": "steps", "kind": "feedback", "value": int(steps)})
    return out


async def _model(run: Run, model: dict[str, Any], s: Sending) -> tuple[str | None, list[Exception]]:
    """The logged model of the run's configuration: found by its key, else created."""
    connection = s.ready()
    assert run.mlflow_id is not None
    try:
        model_id = await connection.find_logged_model(model["key"])
        if model_id is None:
            tags = [*model.get("tags", {}).items(), (MODEL_KEY_TAG, model["key"])]
            model_id = await connection.create_logged_model(
                model["name"], run.mlflow_id, list(model.get("params", {}).items()), tags
            )
    except FeatureUnsupported as exc:
        _unsupported(run, s, exc)
        return None, []
    except Exception as exc:
        await s.outcomes.undeliverable(0, run, "create_logged_model", exc, [model["name"]])
        return None, [exc]
    return model_id, []


async def _call(
    run: Run, s: Sending, what: str, call: Any, entities: Sequence[Any]
) -> list[Exception]:
    try:
        await call
    except FeatureUnsupported as exc:
        _unsupported(run, s, exc)
        return []
    except Exception as exc:
        await s.outcomes.undeliverable(0, run, what, exc, list(entities))
        return [exc]
    return []


def _unsupported(run: Run, s: Sending, exc: FeatureUnsupported) -> None:
    s.outcomes.skipped_parts(1)
    if exc.feature not in s.unsupported:  # said once per feature
        s.unsupported.add(exc.feature)
        log.warning("the tracking store lacks a feature; that part is not logged", reason=str(exc))
