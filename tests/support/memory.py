"""An in-memory exporter: what the worker sends, kept in order, with scriptable failures.

Like OpenTelemetry's InMemorySpanExporter: it plugs into the worker in place of MLflow
(`MLflowSink(..., exporter=MemoryExporter())`), so the forwarding logic (ordering, bisecting,
counting, retries) is tested fast and exhaustively. It behaves as MLflow's store does where
that matters: an exact duplicate metric is dropped, a param logged again with another value
is refused, a deleted experiment refuses everything. The real-server tests stay.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rlm_mlflow._exporter import HttpError, Misconfigured, Unreachable
from rlm_mlflow._payload import RUN_KEY_TAG, MetricRow


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
        self.calls: list[tuple[str, str | None]] = []  # (call, mlflow run id), in order
        self.deleted = False
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

    def unreachable(self, call: str, times: int) -> None:
        with self._lock:
            self._scripted.setdefault(call, []).extend([Unreachable("scripted reset")] * times)

    def _enter(self, call: str, run_id: str | None, entities: Sequence[Any] = ()) -> None:
        with self._lock:
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

    def by_run_id(self) -> dict[str, MemoryRun]:
        """The runs by the caller's run id (tag ``run_id``)."""
        with self._lock:
            return {r.tags["run_id"]: r for r in self.runs.values()}

    def steps(self, run: MemoryRun, key: str = "step_reward") -> list[int]:
        return sorted(step for _, _, step in run.metrics.get(key, []))
