"""An in-memory exporter: what the worker sends, kept in order, with scriptable failures.

Like OpenTelemetry's InMemorySpanExporter: it plugs into the worker in place of MLflow
(`MLflowSink(..., exporter=MemoryExporter())`), so the forwarding logic (ordering, bisecting,
counting, retries) is tested fast and exhaustively. It behaves as MLflow's store does where
that matters: an exact duplicate metric is dropped, a param logged again with another value
is refused, a deleted experiment refuses everything, assessments need a stored trace, trace
info merges into the trace as StartTraceV3 does, a feature the test took away (`lack`) raises
FeatureUnsupported. The real-server tests stay.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rlm_mlflow import _spans
from rlm_mlflow._payload import RUN_KEY_TAG, MetricRow
from rlm_mlflow._tables import relative_artifact_path
from rlm_mlflow._trace_info import check_trace_info
from rlm_mlflow.exporters.base import (
    ASSESSMENTS,
    LOGGED_MODELS,
    MODEL_KEY_TAG,
    TRACE_INFO,
    Exporter,
    ExporterClosed,
    FeatureUnsupported,
    HttpError,
    Misconfigured,
    Unreachable,
    new_assessments,
)


@dataclass
class MemoryRun:
    run_id: str
    name: str
    start_ms: int
    tags: dict[str, str]
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, list[tuple[float, int, int]]] = field(default_factory=dict)
    status: str = "RUNNING"
    end_ms: int | None = None
    artifacts: list[str] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)  # artifact file -> its text


@dataclass
class MemoryModel:
    model_id: str
    name: str
    source_run_id: str
    params: dict[str, str]
    tags: dict[str, str]
    status: str = "READY"
    metrics: dict[str, list[tuple[float, int, int]]] = field(default_factory=dict)


@dataclass
class MemoryTrace:
    trace_id: str  # as MLflow names it (tr-...)
    spans: list[dict[str, Any]] = field(default_factory=list)
    run_id: str | None = None  # linked to
    assessments: list[dict[str, Any]] = field(default_factory=list)
    #: `set_trace_info`'s, merged: metadata and tags key by key, the rest replaced, a
    #: preview only when given (None until the first call)
    info: dict[str, Any] | None = None


class MemoryExporter:
    """Blocking exporter calls, recorded. Failures are scripted per call name:
    ``fail("log_metrics", 3)`` makes the next 3 such calls fail transiently (503),
    ``fail("log_metrics", 1, permanent=True)`` once with a 400, and ``refuse`` refuses, for
    good, every batch holding an entity it matches (as MLflow refuses a bad value)."""

    def __init__(self, *, server: bool = True) -> None:
        # an http URI gets the in-flight limit of a server (a local store gets 1)
        self.tracking_uri = "http://memory" if server else "memory"
        self.experiment_id = "1"
        self.runs: dict[str, MemoryRun] = {}
        self.models: dict[str, MemoryModel] = {}
        self.traces: dict[str, MemoryTrace] = {}
        self.lacking: set[str] = set()  # features this store lacks (`lack`)
        self.calls: list[tuple[str, str | None]] = []  # (call, mlflow run id), in order
        self.deleted = False
        self.closed = False  # `close`: calls raise ExporterClosed, as a real exporter's may
        self.refuse: Callable[[str, Any], bool] | None = None
        self._scripted: dict[str, list[Exception]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def fail(self, call: str, times: int, *, permanent: bool = False) -> None:
        with self._lock:
            error = (
                HttpError(400, "INVALID_PARAMETER_VALUE", "scripted refusal")
                if permanent
                else HttpError(503, "TEMPORARILY_UNAVAILABLE", "scripted", retry_after=0.0)
            )
            self._scripted.setdefault(call, []).extend([error] * times)

    def misconfigure(self, call: str, times: int) -> None:
        """The next ``times`` such calls are refused as a wrong password would be."""
        with self._lock:
            error = Misconfigured("401 from http://memory: scripted refusal")
            self._scripted.setdefault(call, []).extend([error] * times)

    def lack(self, feature: str) -> None:
        """Calls of ``feature`` (LOGGED_MODELS, ASSESSMENTS) raise FeatureUnsupported, as a
        server without the endpoints makes them."""
        with self._lock:
            self.lacking.add(feature)

    def _feature(self, feature: str) -> None:
        if feature in self.lacking:
            raise FeatureUnsupported(feature, "scripted: the memory store lacks it")

    def unreachable(self, call: str, times: int) -> None:
        with self._lock:
            self._scripted.setdefault(call, []).extend([Unreachable("scripted reset")] * times)

    def close(self) -> None:
        """As a real exporter's close: a call after it raises ExporterClosed, and is not
        recorded; what was stored stays readable. Closing again does nothing more."""
        with self._lock:
            self.closed = True

    def _enter(self, call: str, run_id: str | None, entities: Sequence[Any] = ()) -> None:
        with self._lock:
            if self.closed:
                raise ExporterClosed(f"{call}: the memory exporter is closed")
            self.calls.append((call, run_id))
            scripted = self._scripted.get(call)
            if scripted:
                raise scripted.pop(0)
            if self.deleted:
                raise HttpError(400, "INVALID_PARAMETER_VALUE", "the experiment is deleted")
            if self.refuse is not None and any(self.refuse(call, e) for e in entities):
                raise HttpError(400, "INVALID_PARAMETER_VALUE", "refused entity")

    def create_run(self, run_name: str, start_ms: int, tags: dict[str, str]) -> str:
        self._enter("create_run", None, [tags])
        with self._lock:
            run_id = f"m{next(self._ids)}"
            self.runs[run_id] = MemoryRun(run_id, run_name, start_ms, dict(tags))
        return run_id

    def find_run(self, key: str) -> tuple[str, str] | None:
        self._enter("find_run", None)
        with self._lock:
            found = [r for r in self.runs.values() if r.tags.get(RUN_KEY_TAG) == key]
        return (found[0].run_id, found[0].status) if found else None

    def log_params(self, run_id: str, params: Sequence[tuple[str, str]]) -> None:
        self._enter("log_params", run_id, params)
        with self._lock:
            run = self.runs[run_id]
            for key, value in params:
                if run.params.get(key, value) != value:
                    raise HttpError(400, "INVALID_PARAMETER_VALUE", f"param {key} changed")
            run.params.update(params)

    def log_metrics(self, run_id: str, rows: Sequence[MetricRow]) -> None:
        self._enter("log_metrics", run_id, rows)
        with self._lock:
            run = self.runs[run_id]
            for key, value, ts, step in rows:
                points = run.metrics.setdefault(key, [])
                if (value, ts, step) not in points:  # MLflow drops an exact duplicate
                    points.append((value, ts, step))

    def set_terminated(self, run_id: str, status: str, end_ms: int) -> None:
        self._enter("set_terminated", run_id)
        with self._lock:
            self.runs[run_id].status, self.runs[run_id].end_ms = status, end_ms

    def log_path(self, run_id: str, path: str) -> None:
        self._enter("log_path", run_id)
        with self._lock:
            self.runs[run_id].artifacts.append(path)

    def experiment_state(self) -> str:
        return "deleted" if self.deleted else "active"

    def log_spans(self, run_id: str, spans: Sequence[dict[str, Any]], link: bool) -> None:
        self._enter("log_spans", run_id, spans)
        with self._lock:
            for span in spans:
                trace_id = "tr-" + span["traceId"]
                trace = self.traces.setdefault(trace_id, MemoryTrace(trace_id))
                if span["spanId"] not in {s["spanId"] for s in trace.spans}:
                    trace.spans.append(span)
                if link and not span.get("parentSpanId"):
                    trace.run_id = run_id

    def log_tags(self, run_id: str, tags: Sequence[tuple[str, str]]) -> None:
        self._enter("log_tags", run_id, tags)
        with self._lock:
            self.runs[run_id].tags.update(tags)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._enter("log_text", run_id, [artifact_file])
        path = relative_artifact_path(artifact_file)
        with self._lock:
            self.runs[run_id].texts[path] = text

    def find_logged_model(self, key: str) -> str | None:
        self._enter("find_logged_model", None)
        self._feature(LOGGED_MODELS)
        with self._lock:
            found = [m for m in self.models.values() if m.tags.get(MODEL_KEY_TAG) == key]
        return found[0].model_id if found else None

    def create_logged_model(
        self,
        name: str,
        source_run_id: str,
        params: Sequence[tuple[str, str]],
        tags: Sequence[tuple[str, str]],
    ) -> str:
        self._enter("create_logged_model", source_run_id, [*params, *tags])
        self._feature(LOGGED_MODELS)
        with self._lock:
            model_id = f"model-{next(self._ids)}"
            model = MemoryModel(model_id, name, source_run_id, dict(params), dict(tags))
            self.models[model_id] = model
        return model_id

    def log_model_metrics(self, run_id: str, model_id: str, rows: Sequence[MetricRow]) -> None:
        self._enter("log_model_metrics", run_id, rows)
        with self._lock:
            if model_id not in self.models:
                raise HttpError(404, "RESOURCE_DOES_NOT_EXIST", f"no logged model {model_id}")
            for metrics in (self.runs[run_id].metrics, self.models[model_id].metrics):
                for key, value, ts, step in rows:
                    points = metrics.setdefault(key, [])
                    if (value, ts, step) not in points:
                        points.append((value, ts, step))

    def log_assessments(self, trace_id: str, assessments: Sequence[dict[str, Any]]) -> None:
        self._enter("log_assessments", None, assessments)
        self._feature(ASSESSMENTS)
        with self._lock:
            trace = self.traces.get(trace_id)
            if trace is None:
                raise HttpError(404, "RESOURCE_DOES_NOT_EXIST", f"no trace {trace_id}")
            have = [(a["name"], a["kind"]) for a in trace.assessments]
            trace.assessments.extend(dict(a) for a in new_assessments(have, assessments))

    def set_trace_info(self, trace_id: str, info: dict[str, Any]) -> None:
        """As StartTraceV3 merges: into the stored trace, or a new one without spans."""
        self._enter("set_trace_info", None, [info])
        self._feature(TRACE_INFO)
        checked = check_trace_info(trace_id, info)
        with self._lock:
            trace = self.traces.setdefault(trace_id, MemoryTrace(trace_id))
            old = trace.info or {"metadata": {}, "tags": {}}
            merged = {
                **old,
                **{k: v for k, v in checked.items() if v is not None},
                "metadata": {**old["metadata"], **checked["metadata"]},
                "tags": {**old["tags"], **checked["tags"]},
            }
            trace.info = merged

    def trace_of(self, key: str) -> MemoryTrace | None:
        """The trace of the run started with ``key`` (its start key), if any spans came."""
        with self._lock:
            return self.traces.get(_spans.mlflow_trace_id(key))

    def by_run_id(self) -> dict[str, MemoryRun]:
        """The runs by the caller's run id (tag ``run_id``)."""
        with self._lock:
            return {r.tags["run_id"]: r for r in self.runs.values()}

    def steps(self, run: MemoryRun, key: str = "step_reward") -> list[int]:
        return sorted(step for _, _, step in run.metrics.get(key, []))


if TYPE_CHECKING:  # the whole protocol: tests/test_exporters.py runs mypy on this file
    _: Exporter = MemoryExporter()
