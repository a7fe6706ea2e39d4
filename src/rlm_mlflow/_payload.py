"""Pure functions from events to MLflow payloads, within MLflow's limits. No mlflow import here.

`admit` is the one gate every event passes before anything else sees it: each value is
checked and made plain, or the event is refused (`BadInput`) alone. After it, the payloads:
metrics are plain ``(key, value, timestamp_ms, step)`` rows, which the exporters turn into
REST JSON or MLflow entities; params and tags are strings within MLflow's limits. Keeping
this pure makes the limits testable without a server.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterator, Sequence
from typing import Any

from . import _extras as extras
from . import _span_text as spans
from ._event import RunEnd, RunEvent, RunStart, Step
from ._limits import (
    MAX_KEY_CHARS,
    MAX_PARAM_VALUE_CHARS,
    MAX_PARAMS_PER_BATCH,
    MAX_RUN_NAME_CHARS,
    MAX_STEP,
    MAX_TAG_VALUE_CHARS,
    encodable,
    key_problem,
    show,
)

MetricRow = tuple[str, float, int, int]

COMPONENT = "rlm-code-rlm"
STEP_METRICS = ("step_reward", "cumulative_reward")


class BadInput(ValueError):
    """An event the worker cannot log; the message says why, for the log and status()."""


def admit(event: RunEvent, text_limit: int = 4096) -> tuple[RunEvent, list[str]]:
    """The one gate between the hooks and everything after them (routing by run id, the
    journal, MLflow): returns the event with every value checked and made plain (str run id,
    int step, float values, string params, str run path, the trajectory's extra as plain
    data with its texts cut at ``text_limit``), and what was left out of it and why; raises
    BadInput for an event that cannot be logged at all."""
    if type(event) is Step and is_plain_step(event):
        if event[5] is None:
            return event, []
        extra = _extra(spans.step_extra, event[5], text_limit)
        return event._replace(extra=extra), []
    run_id = as_run_id(event.run_id)
    if isinstance(event, Step):
        reward_row, cumulative_row = step_rows(event)
        extra = _extra(spans.step_extra, event.extra, text_limit)
        step, reward, cumulative = reward_row[3], reward_row[1], cumulative_row[1]
        return Step(run_id, step, reward, cumulative, float(event.time), extra), []
    if isinstance(event, RunStart):
        params, skipped = clean_params(event)
        problems = [f"param {key!r}: {why}" for key, why in skipped.items()]
        return RunStart(
            run_id,
            float(event.time),
            str(params.get("environment", "")),
            event.task_chars if type(event.task_chars) is int else -1,
            params,
            str(event.key),
            _extra(extras.start_extra, event.extra, text_limit, problems),
        ), problems
    if event.status not in extras.STATUSES:
        raise BadInput(
            f"a run's end status is one of {sorted(extras.STATUSES)}: {show(event.status)}"
        )
    rows, problems = summary_rows(event)
    summary = {key: value for key, value, _, _ in rows}
    run_path: str | None = None
    if event.run_path is not None:
        try:
            run_path = os.fspath(event.run_path)
            if not isinstance(run_path, str) or not encodable(run_path):
                raise TypeError("not a str path")
        except TypeError:
            run_path = None
            problems.append(f"run_path is not a path: {show(event.run_path)}")
    return RunEnd(
        run_id,
        float(event.time),
        summary["completed"] == 1.0,
        summary.get("steps"),
        summary.get("total_reward"),
        run_path,
        event.status,
        _extra(extras.end_extra, event.extra, text_limit, problems),
    ), problems


def _extra(plain: Any, extra: Any, limit: int, *problems: list[str]) -> Any:
    """The trajectory's (and the run's `_extras`) part of an event made plain; nothing
    (never an error) if it cannot be: a step with an odd ``action`` is still a point of the
    curve."""
    try:
        return plain(extra, limit, *problems)
    except Exception:
        return None


def is_plain_step(event: Step) -> bool:
    """The common case, cheaply: a step already plain and finite (``x - x`` is NaN for an
    infinite or NaN ``x``); its ``extra`` aside. Its run id is checked for storability at the
    run's start: a step names an open run, or it is rejected as such."""
    run_id, step, reward, cumulative = event[0], event[1], event[2], event[3]
    return (
        type(run_id) is str
        and type(step) is int
        and type(reward) is float
        and type(cumulative) is float
        and 0 <= step <= MAX_STEP
        and reward - reward == 0.0
        and cumulative - cumulative == 0.0
        and run_id != ""
    )


def as_run_id(value: Any) -> str:
    """A non-empty string that MLflow can store (the caller's key for the run)."""
    if not isinstance(value, str) or not value:
        raise BadInput(f"run_id is not a non-empty string: {show(value)}")
    if not encodable(value):
        raise BadInput(
            f"run_id has characters that cannot be stored (lone surrogates): {show(value)}"
        )
    return str.__str__(value)  # a plain str, whatever subclass came in


def as_metric_value(value: Any, name: str) -> float:
    """A finite real number (numpy scalars too); None, bools, strings, NaN and inf are refused.

    rlm-code's sink reads a missing reward as 0.0; we refuse it instead, so that a curve never
    shows a point the loop did not produce.
    """
    if value is None:
        raise BadInput(f"{name} is missing")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BadInput(f"{name} is not a number: {show(value)}")
    try:
        number = float(value)
    except Exception:
        raise BadInput(f"{name} is not a number: {show(value)}") from None
    if not math.isfinite(number):
        raise BadInput(f"{name} is not finite: {number}")
    return number


def as_step(value: Any) -> int:
    """A non-negative integer (an integral float or a numpy integer too) within MLflow's int64."""
    if value is None:
        raise BadInput("step is missing")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BadInput(f"step is not an integer: {show(value)}")
    try:
        number = float(value)
        if not isinstance(value, numbers.Integral) and not number.is_integer():
            raise ValueError
        step = int(value) if isinstance(value, numbers.Integral) else int(number)
    except (ValueError, TypeError, OverflowError, ArithmeticError):
        raise BadInput(f"step is not an integer: {show(value)}") from None
    if not 0 <= step <= MAX_STEP:
        raise BadInput(f"step is out of range (0 to 2**63 - 1): {step}")
    return step


def timestamp_ms(seconds: float) -> int:
    return int(seconds * 1000)


def step_rows(event: Step) -> tuple[MetricRow, MetricRow]:
    """The two per-step metrics of rlm-code's MLflowSink, at the hook's step and time."""
    step = as_step(event.step)
    ts = timestamp_ms(event.time)
    return (
        ("step_reward", as_metric_value(event.reward, "reward"), ts, step),
        (
            "cumulative_reward",
            as_metric_value(event.cumulative_reward, "cumulative_reward"),
            ts,
            step,
        ),
    )


def steps_per_batch(batch_size: int) -> int:
    """How many step events fill one log_batch call."""
    return max(1, batch_size // len(STEP_METRICS))


def step_batches(rows: Sequence[MetricRow], batch_size: int) -> Iterator[list[MetricRow]]:
    """Split step rows (two per step, adjacent) into log_batch-sized parts that never split
    one step's pair."""
    size = max(len(STEP_METRICS), batch_size - batch_size % len(STEP_METRICS))
    for start in range(0, len(rows), size):
        yield list(rows[start : start + size])


def summary_rows(event: RunEnd) -> tuple[list[MetricRow], list[str]]:
    """rlm-code's three summary metrics, logged without a step as ``log_metrics`` does.

    Returns the rows and, for each summary value that is not a finite number, why it was left
    out; the others are still logged.
    """
    ts = timestamp_ms(event.time)
    problems: list[str] = []
    try:
        completed = bool(event.completed)
    except Exception:  # e.g. a numpy array: its truth is ambiguous
        completed = False
        problems.append(f"completed is not a truth value: {show(event.completed)}")
    rows: list[MetricRow] = [("completed", 1.0 if completed else 0.0, ts, 0)]
    for key, value in (("steps", event.steps), ("total_reward", event.total_reward)):
        try:
            rows.append((key, as_metric_value(value, key), ts, 0))
        except BadInput as exc:
            problems.append(str(exc))
    return rows, problems


def admitted_summary_rows(event: RunEnd) -> list[MetricRow]:
    """The summary of an admitted end (values already checked: a None was left out)."""
    ts = timestamp_ms(event.time)
    rows: list[MetricRow] = [("completed", 1.0 if event.completed else 0.0, ts, 0)]
    for key, value in (("steps", event.steps), ("total_reward", event.total_reward)):
        if value is not None:
            rows.append((key, float(value), ts, 0))
    usage = (event.extra or {}).get("usage")
    if usage is not None:  # rlm-code's usage_summary of the run
        for key, number in zip(TOKEN_SUMMARY, usage, strict=True):
            rows.append((key, float(number), ts, 0))
    return rows


#: The run's token usage at its end, from rlm-code's ``usage_summary``.
TOKEN_SUMMARY = ("total_prompt_tokens", "total_completion_tokens", "llm_calls")


def run_params(event: RunStart) -> tuple[dict[str, str], dict[str, str]]:
    """rlm-code's params: every scalar param, then ``environment`` and ``task_chars``.

    Returns the params as MLflow stores them (strings) and the skipped ones with the reason:
    non-scalars (as rlm-code's sink does), keys MLflow refuses, values longer than it accepts.
    """
    params, skipped = clean_params(event)
    return {key: str(value) for key, value in params.items()}, skipped


Scalar = str | int | float | bool | None


def clean_params(event: RunStart) -> tuple[dict[str, Scalar], dict[str, str]]:
    """`run_params` with the values kept as plain scalars (``None`` stays ``None``)."""
    params: dict[str, Scalar] = {}
    skipped: dict[str, str] = {}
    given: list[tuple[Any, Any]] = []
    try:
        given = list(event.params.items())
    except Exception:
        skipped["params"] = f"not a mapping: {show(event.params)}"
    merged = [*given, ("environment", event.environment)]
    if type(event.task_chars) is int and event.task_chars >= 0:
        merged.append(("task_chars", event.task_chars))
    else:
        skipped["task_chars"] = "the task is not a string"
    for key, value in merged:
        problem = key_problem(key)
        plain: Scalar = None
        if problem is None:
            try:
                plain = _plain_scalar(value)
            except Exception:
                problem = f"not a scalar ({type(value).__name__})"
        text = str(plain)
        if problem is None and len(text) > MAX_PARAM_VALUE_CHARS:
            problem = f"value longer than {MAX_PARAM_VALUE_CHARS} characters ({len(text)})"
        if problem is None and not encodable(text):
            problem = "value has characters that cannot be stored (lone surrogates)"
        if problem is not None:
            skipped[key[:MAX_KEY_CHARS] if isinstance(key, str) else show(key)] = problem
            continue
        params[key] = plain
    return params, skipped


def _plain_scalar(value: Any) -> Scalar:
    """The value as an exact str, int, float, bool or None (numpy scalars and other
    subclasses too); TypeError for anything else."""
    if value is None or type(value) in (str, int, float, bool):
        return value  # type: ignore[no-any-return]
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    raise TypeError(type(value).__name__)


#: Tag that lets a replay find the run it created before a crash (see `RunStart.key`).
RUN_KEY_TAG = "rlm_mlflow.run_key"


def run_tags(run_id: str, parent_mlflow_id: str | None, key: str) -> dict[str, str]:
    """rlm-code's tags, the run name, the parent link and the run key; cut to MLflow's limits."""
    tags = {
        "run_id": run_id[:MAX_TAG_VALUE_CHARS],
        "component": COMPONENT,
        "mlflow.runName": run_name(run_id),
        RUN_KEY_TAG: key,
    }
    if parent_mlflow_id is not None:
        tags["mlflow.parentRunId"] = parent_mlflow_id
    return tags


def run_name(run_id: str) -> str:
    return run_id[:MAX_RUN_NAME_CHARS]


def param_batches(params: dict[str, str]) -> Iterator[list[tuple[str, str]]]:
    items = list(params.items())
    for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
        yield items[start : start + MAX_PARAMS_PER_BATCH]


def metric_dicts(rows: Sequence[MetricRow]) -> list[dict[str, Any]]:
    """Metric rows as the dead-letter file shows them."""
    return [{"key": k, "value": v, "timestamp": ts, "step": s} for k, v, ts, s in rows]
