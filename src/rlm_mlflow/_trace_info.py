"""A trace's record as MLflow's UI reads it (`Exporter.set_trace_info`): the shape of its
``info``, checked, and cut to MLflow's limits as MLflow's own client cuts them.

What MLflow 3.17's trace list shows, and where it reads it from (its UI bundle):

- "Run name": metadata `SOURCE_RUN` (also how ``search_traces(run_id=...)`` and the run
  page's Traces tab find a trace, besides a link to the run);
- "User": metadata `TRACE_USER`, else the *tag* ``mlflow.user``;
- "Session": metadata `TRACE_SESSION` (a column of its own in the store);
- "Source": metadata `SOURCE_NAME` (its base name) with `SOURCE_TYPE` (an icon: LOCAL,
  NOTEBOOK, JOB, PROJECT), shown only when both are there; ``mlflow.source.git.repoURL``,
  ``.branch`` and ``.commit`` make it a link;
- "Trace name": the tag `TRACE_NAME`; "Request" and "Response": the previews.
"""

from __future__ import annotations

import re
from typing import Any

SOURCE_RUN = "mlflow.sourceRun"
TRACE_USER = "mlflow.trace.user"
TRACE_SESSION = "mlflow.trace.session"
SOURCE_NAME = "mlflow.source.name"
SOURCE_TYPE = "mlflow.source.type"
TRACE_NAME = "mlflow.traceName"
TOKEN_USAGE = "mlflow.trace.tokenUsage"

#: A trace's final states (``TraceState``), its id as MLflow names it, and MLflow's limits
#: on trace info (what its client cuts metadata, tags and previews to, ``TraceInfo.to_proto``).
TRACE_STATES = frozenset({"OK", "ERROR"})
TRACE_ID = re.compile(r"tr-[0-9a-f]{32}")
TRACE_INFO_LIMITS = {"metadata": (250, 250), "tags": (250, 4096)}
PREVIEW_LIMIT = 1000
TRACE_INFO_KEYS = frozenset(
    {*TRACE_INFO_LIMITS, "request_time_ms", "execution_ms", "state", "request_preview",
     "response_preview"}
)  # fmt: skip


def check_trace_info(trace_id: str, info: dict[str, Any]) -> dict[str, Any]:
    """``info`` with its strings cut to MLflow's limits (`TRACE_INFO_LIMITS`, `PREVIEW_LIMIT`),
    as MLflow's client cuts them. ValueError unless ``trace_id`` is ``tr-`` and 32 hex digits
    and ``info`` is ``{"metadata": {str: str}, "tags": {str: str}, "request_time_ms": int,
    "execution_ms": int, "state": "OK" | "ERROR", "request_preview": str | None,
    "response_preview": str | None}`` (metadata, tags and previews optional)."""
    if not isinstance(trace_id, str) or not TRACE_ID.fullmatch(trace_id):
        raise ValueError(f"a trace id is tr- and 32 hex digits, not {trace_id!r}")
    if unknown := set(info) - TRACE_INFO_KEYS:
        raise ValueError(f"trace {trace_id}: unknown trace info {sorted(unknown)}")
    checked: dict[str, Any] = {}
    for part, (key_limit, value_limit) in TRACE_INFO_LIMITS.items():
        pairs = info.get(part) or {}
        if not isinstance(pairs, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in pairs.items()
        ):
            raise ValueError(f"trace {trace_id}: {part} must map strings to strings")
        checked[part] = {k[:key_limit]: v[:value_limit] for k, v in pairs.items()}
    for number in ("request_time_ms", "execution_ms"):
        value = info.get(number)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"trace {trace_id}: {number} must be an int >= 0, not {value!r}")
        checked[number] = value
    if info.get("state") not in TRACE_STATES:
        raise ValueError(f"trace {trace_id}: state is not one of {sorted(TRACE_STATES)}")
    checked["state"] = info["state"]
    for preview in ("request_preview", "response_preview"):
        text = info.get(preview)
        if not isinstance(text, (str, type(None))):
            raise ValueError(f"trace {trace_id}: {preview} must be a string or None")
        checked[preview] = None if text is None else text[:PREVIEW_LIMIT]
    return checked
