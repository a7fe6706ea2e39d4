"""Pure functions from events to MLflow payloads, within MLflow's limits. No mlflow import here.

Metrics are plain ``(key, value, timestamp_ms, step)`` tuples; the client adapter turns them into
``mlflow.entities.Metric``. Keeping this pure makes the limits testable without a server.
"""

from __future__ import annotations

import math
import numbers
import posixpath
import re
from collections.abc import Iterator, Sequence
from typing import Any

from ._event import RunEnd, RunStart, Step

MetricRow = tuple[str, float, int, int]

COMPONENT = "rlm-code-rlm"
STEP_METRICS = ("step_reward", "cumulative_reward")
#: MLflow's log_batch takes at most 100 params and tags per call.
MAX_PARAMS_PER_BATCH = 100
#: MLflow's limits on what it stores (mlflow/utils/validation.py).
MAX_PARAM_VALUE_CHARS = 6000
MAX_TAG_VALUE_CHARS = 8000
MAX_KEY_CHARS = 250
MAX_RUN_NAME_CHARS = 250
MAX_STEP = 2**63 - 1
_VALID_KEY = re.compile(r"[/\w.\- :]+")


class BadInput(ValueError):
    """An event the worker cannot log; the message says why, for the log and status()."""


def as_metric_value(value: Any, name: str) -> float:
    """A finite real number (numpy scalars too); None, bools, strings, NaN and inf are refused.

    The seed read a missing reward as 0.0; we refuse it instead, so that a curve never shows a
    point the loop did not produce.
    """
    if value is None:
        raise BadInput(f"{name} is missing")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BadInput(f"{name} is not a number: {value!r:.80}")
    number = float(value)
    if not math.isfinite(number):
        raise BadInput(f"{name} is not finite: {number}")
    return number


def as_step(value: Any) -> int:
    """A non-negative integer (an integral float or a numpy integer too) within MLflow's int64."""
    if value is None:
        raise BadInput("step is missing")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BadInput(f"step is not an integer: {value!r:.80}")
    number = float(value)
    if not isinstance(value, numbers.Integral) and not number.is_integer():
        raise BadInput(f"step is not an integer: {value!r:.80}")
    step = int(value) if isinstance(value, numbers.Integral) else int(number)
    if not 0 <= step <= MAX_STEP:
        raise BadInput(f"step is out of range (0 to 2**63 - 1): {step}")
    return step


def timestamp_ms(seconds: float) -> int:
    return int(seconds * 1000)


def step_rows(event: Step) -> tuple[MetricRow, MetricRow]:
    """The two per-step metrics of the seed, at the hook's step and time."""
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
    """The seed's three summary metrics, logged without a step as ``log_metrics`` does.

    Returns the rows and, for each summary value that is not a finite number, why it was left
    out; the others are still logged.
    """
    ts = timestamp_ms(event.time)
    rows: list[MetricRow] = [("completed", 1.0 if event.completed else 0.0, ts, 0)]
    problems: list[str] = []
    for key, value in (("steps", event.steps), ("total_reward", event.total_reward)):
        try:
            rows.append((key, as_metric_value(value, key), ts, 0))
        except BadInput as exc:
            problems.append(str(exc))
    return rows, problems


def is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def key_problem(key: Any) -> str | None:
    """Why MLflow would refuse ``key`` as a param or tag name, or None."""
    if not isinstance(key, str) or not key:
        return f"key is not a non-empty string: {key!r:.80}"
    if len(key) > MAX_KEY_CHARS:
        return f"key longer than {MAX_KEY_CHARS} characters"
    if not _VALID_KEY.fullmatch(key):
        return f"key {key!r:.80} has characters MLflow refuses (allowed: letters, digits, _-./: )"
    normalized = posixpath.normpath(key)
    if normalized != key or normalized == "." or key.startswith(("..", "/")):
        return f"key {key!r:.80} is not a plain path"
    return None


def run_params(event: RunStart) -> tuple[dict[str, str], dict[str, str]]:
    """The seed's params: every scalar param, then ``environment`` and ``task_chars``.

    Returns the params as MLflow stores them (strings) and the skipped ones with the reason:
    non-scalars (as the seed does), keys MLflow refuses, values longer than it accepts.
    """
    params: dict[str, str] = {}
    skipped: dict[str, str] = {}
    merged = {**event.params, "environment": event.environment, "task_chars": event.task_chars}
    for key, value in merged.items():
        problem = key_problem(key)
        if problem is None and not is_scalar(value):
            problem = f"not a scalar ({type(value).__name__})"
        if problem is None and len(text := str(value)) > MAX_PARAM_VALUE_CHARS:
            problem = f"value longer than {MAX_PARAM_VALUE_CHARS} characters ({len(text)})"
        if problem is not None:
            skipped[str(key)[:MAX_KEY_CHARS]] = problem
            continue
        params[key] = str(value)
    return params, skipped


#: Tag that lets a replay find the run it created before a crash (see `RunStart.key`).
RUN_KEY_TAG = "rlm_mlflow.run_key"


def run_tags(run_id: str, parent_mlflow_id: str | None, key: str) -> dict[str, str]:
    """The seed's tags, the run name, the parent link and the run key; cut to MLflow's limits."""
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
