"""rlm-code's benchmarks as MLflow payloads (pure): what a benchmark's parent run and each of
its case runs carry, from rlm-code's own records (an `RLMBenchmarkCase`, a case's result
payload, the summary JSON ``.rlm_code/rlm/benchmarks/<benchmark_id>.json``). Used by the
live path (`_benchmark`, under autolog) and by ``rlm-mlflow import`` alike, so both give the
same picture.

The parent's metrics are the summary's own numbers: ``avg_reward``, ``avg_steps``, the case
counts, ``completion_rate`` as rlm-code computes it (completed / total), ``answer_match_rate``
(matches / cases with an expected answer), the latency distribution, the usage totals.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

#: The case fields that become tags (those the case has).
CASE_TAGS = ("case_id", "task_family", "domain", "split", "length_bucket")
#: The per-case table artifact (`mlflow.log_table`'s format).
TABLE_FILE = "case_results.json"
TABLE_COLUMNS = (
    "case_id",
    "run_id",
    "completed",
    "answer_match",
    "expected_answer",
    "final_response",
    "steps",
    "total_reward",
    "duration_seconds",
    "error",
    "task_family",
    "domain",
    "split",
    "length_bucket",
    "prompt_tokens",
    "completion_tokens",
    "total_calls",
)
#: The settings of a ``run_benchmark`` call logged as the parent's params.
CALL_PARAMS = (
    "preset",
    "mode",
    "harness_strategy",
    "include_mcp",
    "mcp_server",
    "environment",
    "framework",
    "max_steps",
    "exec_timeout",
    "branch_width",
    "sub_model",
    "sub_provider",
    "limit",
    "pack_paths",
)
#: rlm-code's usage totals, as the run summary names them (`_payload.TOKEN_SUMMARY`).
USAGE_METRICS = {
    "prompt_tokens": "total_prompt_tokens",
    "completion_tokens": "total_completion_tokens",
    "total_calls": "llm_calls",
}
_MODEL_NAME_BAD = re.compile(r"[/:.%\"']+")  # MLflow refuses these in a logged model's name


def field(record: Any, name: str) -> Any:
    """``record[name]`` or ``record.name`` (a case is a dataclass, a result a dict)."""
    if isinstance(record, Mapping):
        return record.get(name)
    return getattr(record, name, None)


def case_tags(benchmark_id: str, case: Any) -> dict[str, str]:
    tags = {"rlm.benchmark_id": benchmark_id}
    for name in CASE_TAGS:
        value = field(case, name)
        if value is not None and value != "":
            tags[f"rlm.{name}"] = str(value)
    return tags


def case_metrics(row: Mapping[str, Any], duration: float | None = None) -> dict[str, float]:
    """``answer_match`` (1 or 0) where the case has an expected answer, and
    ``duration_seconds`` (the row's, else ``duration``)."""
    metrics: dict[str, float] = {}
    if row.get("answer_match") is not None:
        metrics["answer_match"] = 1.0 if row["answer_match"] else 0.0
    seconds = row.get("duration_seconds", duration)
    if isinstance(seconds, (int, float)):
        metrics["duration_seconds"] = float(seconds)
    return metrics


def case_assessments(row: Mapping[str, Any], expected: Any) -> list[dict[str, Any]]:
    """The case trace's feedback (answer_match, total_reward, completed) and expectation."""
    out: list[dict[str, Any]] = []
    if row.get("answer_match") is not None:
        out.append({"name": "answer_match", "kind": "feedback", "value": bool(row["answer_match"])})
    if isinstance(row.get("total_reward"), (int, float)):
        out.append(
            {"name": "total_reward", "kind": "feedback", "value": float(row["total_reward"])}
        )
    out.append({"name": "completed", "kind": "feedback", "value": bool(row.get("completed"))})
    if expected is not None:
        out.append({"name": "expected_answer", "kind": "expectation", "value": str(expected)})
    return out


def answer_match(expected: Any, response: Any) -> bool | None:
    """rlm-code's rule: the expected answer, whitespace- and case-folded, is the response or
    is in it; None without an expected answer."""
    if expected is None:
        return None
    wanted = " ".join(str(expected).lower().split())
    got = " ".join(str(response or "").lower().split())
    return wanted == got or wanted in got


def parent_tags(benchmark_id: str, preset: Any, mode: Any, model: Any) -> dict[str, str]:
    tags = {"rlm.benchmark_id": benchmark_id, "rlm.preset": str(preset), "rlm.mode": str(mode)}
    if model:
        tags["rlm.model"] = str(model)
    return tags


def parent_params(call: Mapping[str, Any]) -> dict[str, Any]:
    """The settings the ``run_benchmark`` call was made with (scalars; pack paths joined)."""
    params: dict[str, Any] = {}
    for name in CALL_PARAMS:
        value = call.get(name)
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value) or None
        if value is not None:
            params[name] = value if isinstance(value, (str, int, float, bool)) else str(value)
    return params


def parent_metrics(payload: Mapping[str, Any]) -> dict[str, float]:
    """The summary JSON's numbers, as rlm-code wrote them."""
    metrics: dict[str, float] = {}
    for name in ("avg_reward", "avg_steps", "total_cases", "attempted_cases", "completed_cases"):
        if isinstance(payload.get(name), (int, float)):
            metrics[name] = float(payload[name])
    total, completed = payload.get("total_cases") or 0, payload.get("completed_cases") or 0
    metrics["completion_rate"] = completed / total if total else 0.0
    matched = [
        bool(r["answer_match"]) for r in _rows(payload) if isinstance(r.get("answer_match"), bool)
    ]
    if matched:
        metrics["answer_match_rate"] = sum(matched) / len(matched)
    latency = payload.get("latency_seconds")
    if isinstance(latency, Mapping):
        for name in ("avg", "p50", "p95", "p99", "max"):
            if isinstance(latency.get(name), (int, float)):
                metrics[f"latency_{name}"] = float(latency[name])  # seconds
    usage = payload.get("usage_totals")
    if isinstance(usage, Mapping):
        for name, metric in USAGE_METRICS.items():
            if isinstance(usage.get(name), (int, float)):
                metrics[metric] = float(usage[name])
    if isinstance(payload.get("duration_seconds"), (int, float)):
        metrics["duration_seconds"] = float(payload["duration_seconds"])
    return metrics


def case_table(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Every case's result, a row each (`mlflow.log_table`'s columns and data)."""
    rows = []
    for r in _rows(payload):
        usage: Mapping[str, Any] = r["usage"] if isinstance(r.get("usage"), Mapping) else {}
        values = {
            **r,
            **{k: usage.get(k) for k in ("prompt_tokens", "completion_tokens", "total_calls")},
        }
        rows.append([values.get(column) for column in TABLE_COLUMNS])
    return {"file": TABLE_FILE, "columns": list(TABLE_COLUMNS), "rows": rows}


def model_extra(benchmark_id: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """The agent's configuration (model, provider, environment, framework, branch width) as a
    logged model, one per benchmark (found again by its key: the benchmark id)."""
    parts = [
        str(config.get(name) or default)
        for name, default in (
            ("model", "unknown-model"),
            ("environment", "per-case-env"),
            ("framework", "native"),
        )
    ]
    name = "_".join([*parts, f"bw{config.get('branch_width') or 1}"])
    params = {k: v for k, v in config.items() if v is not None}
    return {
        "name": _MODEL_NAME_BAD.sub("-", name),
        "key": benchmark_id,
        "params": params,
        "tags": {"rlm.benchmark_id": benchmark_id},
    }


def _rows(payload: Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
    rows = payload.get("case_results")
    return [r for r in rows if isinstance(r, Mapping)] if isinstance(rows, list) else []
