"""Pure functions from events to MLflow payloads, within MLflow's limits. No mlflow import here.

Metrics are plain ``(key, value, timestamp_ms, step)`` tuples; the client adapter turns them into
``mlflow.entities.Metric``. Keeping this pure makes the limits testable without a server.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from ._event import RunEnd, RunStart, Step

MetricRow = tuple[str, float, int, int]

COMPONENT = "rlm-code-rlm"
STEP_METRICS = ("step_reward", "cumulative_reward")
#: MLflow's log_batch takes at most 100 params and tags per call.
MAX_PARAMS_PER_BATCH = 100
#: MLflow rejects longer param values.
MAX_PARAM_VALUE_CHARS = 6000


class BadInput(ValueError):
    """An event the worker cannot log; the message says why, for the log and status()."""


def as_metric_value(value: Any, name: str) -> float:
    """The seed's reading (``float(x or 0.0)``), but a non-number is an error, not a crash."""
    if value is None:
        return 0.0
    try:
        return float(value)
    except (TypeError, ValueError):
        raise BadInput(f"{name} is not a number: {value!r:.80}") from None


def as_step(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise BadInput(f"step is not an integer: {value!r:.80}")
    if value < 0:
        raise BadInput(f"step is negative: {value!r}")
    return int(value)


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


def step_chunks(rows: Sequence[MetricRow], batch_size: int) -> Iterator[Sequence[MetricRow]]:
    """Split step rows into log_batch-sized slices that never split one step's metrics."""
    size = batch_size - batch_size % len(STEP_METRICS)
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def summary_rows(event: RunEnd) -> list[MetricRow]:
    """The seed's three summary metrics; logged without a step, as ``log_metrics`` does."""
    ts = timestamp_ms(event.time)
    return [
        ("completed", 1.0 if event.completed else 0.0, ts, 0),
        ("steps", as_metric_value(event.steps, "steps"), ts, 0),
        ("total_reward", as_metric_value(event.total_reward, "total_reward"), ts, 0),
    ]


def is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def run_params(event: RunStart) -> tuple[dict[str, str], list[str]]:
    """The seed's params: every scalar param, then ``environment`` and ``task_chars``.

    Returns the params as MLflow stores them (strings) and the names that were skipped:
    non-scalars (as the seed does) and values longer than MLflow accepts.
    """
    params: dict[str, str] = {}
    skipped: list[str] = []
    merged = {**event.params, "environment": event.environment, "task_chars": event.task_chars}
    for key, value in merged.items():
        text = str(value)
        if not is_scalar(value) or len(text) > MAX_PARAM_VALUE_CHARS:
            skipped.append(str(key))
            continue
        params[str(key)] = text
    return params, skipped


def run_tags(run_id: str, parent_mlflow_id: str | None) -> dict[str, str]:
    tags = {"run_id": run_id, "component": COMPONENT, "mlflow.runName": run_id}
    if parent_mlflow_id is not None:
        tags["mlflow.parentRunId"] = parent_mlflow_id
    return tags


def param_batches(params: dict[str, str]) -> Iterator[list[tuple[str, str]]]:
    items = list(params.items())
    for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
        yield items[start : start + MAX_PARAMS_PER_BATCH]
