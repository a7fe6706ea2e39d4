"""What a run carries beyond rlm-code's sink, made plain for the journal and MLflow.

At its start: extra tags, a name, and a parent (another run's id, for a run whose params do
not name one: a benchmark's case under its benchmark). At its end: extra metrics, tags,
files to upload, a table artifact, a logged model (the configuration that produced it),
assessments for its trace, and ``summary: False`` for a run that is not an RLM run (a
benchmark: no completed/steps/total_reward of its own). The benchmark layer (`_benchmark`)
and ``rlm-mlflow import`` set them; `admit` makes them plain here: keys and values within
MLflow's limits, what cannot be is left out (and said, by the caller's ``problems``). Pure;
admitting twice (a journalled event replayed) gives the same.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from typing import Any

from . import _span_text as spans
from ._limits import (
    MAX_PARAM_VALUE_CHARS,
    MAX_RUN_NAME_CHARS,
    MAX_TAG_VALUE_CHARS,
    key_problem,
    show,
)

#: A run's end statuses: FAILED is a benchmark case whose run raised.
STATUSES = frozenset({"FINISHED", "FAILED", "KILLED"})
#: Assessment kinds (MLflow 3): a score, or what the answer should have been.
KINDS = frozenset({"feedback", "expectation"})
#: Rows of one table artifact at most (a benchmark's cases).
MAX_TABLE_ROWS = 100_000


def start_extra(extra: Any, limit: int, problems: list[str]) -> dict[str, Any] | None:
    if not isinstance(extra, Mapping):
        return None
    out: dict[str, Any] = dict(spans.start_extra(extra, limit) or {})
    tags = plain_strings(extra.get("tags"), MAX_TAG_VALUE_CHARS, "tag", problems)
    if tags:
        out["tags"] = tags
    for key, cap in (("parent", MAX_TAG_VALUE_CHARS), ("name", MAX_RUN_NAME_CHARS)):
        value = extra.get(key)
        if isinstance(value, str) and value:
            out[key] = spans.storable(value[:cap])
        elif value is not None:
            problems.append(f"{key} is not a string: {show(value)}")
    return out or None


def end_extra(extra: Any, limit: int, problems: list[str]) -> dict[str, Any] | None:
    if not isinstance(extra, Mapping):
        return None
    out: dict[str, Any] = dict(spans.end_extra(extra, limit) or {})
    metrics = plain_metrics(extra.get("metrics"), problems)
    if metrics:
        out["metrics"] = metrics
    tags = plain_strings(extra.get("tags"), MAX_TAG_VALUE_CHARS, "tag", problems)
    if tags:
        out["tags"] = tags
    artifacts = [p for p in (plain_path(a, problems) for a in _items(extra.get("artifacts"))) if p]
    if artifacts:
        out["artifacts"] = artifacts
    for key, plain in (("table", plain_table), ("model", plain_model)):
        if extra.get(key) is not None:
            value = plain(extra[key], problems)
            if value is not None:
                out[key] = value
    assessments = [a for a in map(plain_assessment, _items(extra.get("assessments"))) if a]
    if assessments:
        out["assessments"] = assessments
    if extra.get("summary") is False:  # not an RLM run: no completed/steps/total_reward
        out["summary"] = False
    return out or None


def plain_strings(value: Any, cap: int, what: str, problems: list[str]) -> dict[str, str]:
    """A mapping of names MLflow takes to text cut at ``cap``; the rest left out."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        problems.append(f"{what}s are not a mapping: {show(value)}")
        return {}
    out: dict[str, str] = {}
    for key, item in list(value.items()):
        problem = key_problem(key)
        if problem is not None:
            problems.append(f"{what} {show(key)}: {problem}")
            continue
        if item is None:
            continue
        out[key] = spans.storable(str(item)[:cap])
    return out


def plain_metrics(value: Any, problems: list[str]) -> dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        problems.append(f"metrics are not a mapping: {show(value)}")
        return {}
    out: dict[str, float] = {}
    for key, item in list(value.items()):
        problem = key_problem(key)
        if problem is None and isinstance(item, (bool, numbers.Real)):
            number = float(item)
            if math.isfinite(number):
                out[key] = number
                continue
            problem = f"not finite: {number}"
        problems.append(f"metric {show(key)}: {problem or 'not a number: ' + show(item)}")
    return out


def plain_path(value: Any, problems: list[str]) -> str | None:
    try:
        path = os.fspath(value)
    except TypeError:
        path = None
    if isinstance(path, str) and path:
        return path
    problems.append(f"artifact is not a path: {show(value)}")
    return None


def plain_table(value: Any, problems: list[str]) -> dict[str, Any] | None:
    """``{"file": name.json, "columns": [...], "rows": [[...], ...]}``, cells plain scalars
    (anything else as its text)."""
    if not isinstance(value, Mapping) or not isinstance(value.get("file"), str):
        problems.append(f"table is not {{file, columns, rows}}: {show(value)}")
        return None
    columns = [str(c)[:MAX_PARAM_VALUE_CHARS] for c in _items(value.get("columns"))]
    rows = [
        [_cell(cell) for cell in _items(row)][: len(columns)]
        for row in _items(value.get("rows"))[:MAX_TABLE_ROWS]
    ]
    if not columns:
        problems.append("table has no columns")
        return None
    name = os.path.basename(value["file"]) or "table.json"
    return {
        "file": name if name.endswith(".json") else name + ".json",
        "columns": columns,
        "rows": rows,
    }


def plain_model(value: Any, problems: list[str]) -> dict[str, Any] | None:
    """``{"name", "key", "params", "tags"}``: a logged model, found again by its key."""
    if not isinstance(value, Mapping) or not value.get("name") or not value.get("key"):
        problems.append(f"model is not {{name, key, params, tags}}: {show(value)}")
        return None
    return {
        "name": spans.storable(str(value["name"])[:MAX_RUN_NAME_CHARS]),
        "key": str(value["key"])[:MAX_TAG_VALUE_CHARS],
        "params": plain_strings(value.get("params"), MAX_PARAM_VALUE_CHARS, "param", problems),
        "tags": plain_strings(value.get("tags"), MAX_TAG_VALUE_CHARS, "tag", problems),
    }


def plain_assessment(value: Any) -> dict[str, Any] | None:
    """``{"name", "kind", "value", "rationale"}``: a feedback's value a bool, a number or
    text; an expectation's any plain value."""
    if not isinstance(value, Mapping) or value.get("kind") not in KINDS:
        return None
    name = value.get("name")
    if not isinstance(name, str) or key_problem(name) is not None:
        return None
    item = _cell(value.get("value"))
    if item is None:
        return None
    out: dict[str, Any] = {"name": name, "kind": value["kind"], "value": item}
    if isinstance(value.get("rationale"), str):
        out["rationale"] = spans.cut(value["rationale"], MAX_PARAM_VALUE_CHARS)
    return out


def _cell(value: Any) -> str | int | float | bool | None:
    if isinstance(value, str):
        return spans.cut(value, MAX_PARAM_VALUE_CHARS)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and abs(int(value)) < 2**63:
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else None
    return spans.cut(show(value), MAX_PARAM_VALUE_CHARS)


def _items(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else []
