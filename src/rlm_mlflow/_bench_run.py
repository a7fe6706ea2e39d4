"""A benchmark while it runs under autolog (`_benchmark` wraps rlm-code's): its parent run and
each of its cases' runs, sent through the shared sink like every run.

The runner holds its `Benchmark` (``runner._rlm_mlflow_benchmark``, `BENCH_ATTR`) while it
runs; the runner's `AutologSink` reads it (`current`) in its hooks. What the parent and the
cases carry comes from rlm-code's own records (`_bench_summary`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _bench_summary as summary
from ._log import log

if TYPE_CHECKING:
    from ._sink import MLflowSink

#: The runner's attribute that holds the benchmark it runs.
BENCH_ATTR = "_rlm_mlflow_benchmark"


@dataclass
class Case:
    case: Any
    mode: str
    started: float
    tags: dict[str, str]
    run_id: str | None = None  # the case's RLM run: its first run without a parent
    held_end: tuple[Any, Any] | None = None  # (result, run_path) of that run's on_run_end


@dataclass
class Benchmark:
    id: str
    sink: MLflowSink
    config: dict[str, Any]
    case: Case | None = None
    tags: dict[str, str] = field(default_factory=dict)

    def start(self, call: dict[str, Any]) -> None:
        self.tags = summary.parent_tags(
            self.id, call.get("preset"), call.get("mode"), self.config.get("model")
        )
        self.sink._start(
            self.id,
            task=f"benchmark {call.get('preset')}",
            environment=str(call.get("environment") or "benchmark"),
            params=summary.parent_params(call),
            tags=self.tags,
            name=self.id,
        )

    def end(self, result: Any, error: BaseException | None) -> None:
        payload: dict[str, Any] = {}
        path = getattr(result, "summary_path", None)
        if path is not None:
            try:
                payload = json.loads(Path(path).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                log.warning("benchmark summary unreadable", path=str(path), error=str(exc))
        status = (
            "FAILED" if error is not None else "KILLED" if payload.get("cancelled") else "FINISHED"
        )
        self.sink._end(
            self.id,
            result=None,
            status=status,
            metrics=summary.parent_metrics(payload) if payload else {},
            tags={"rlm.error": str(error)} if error is not None else {},
            artifacts=[str(path)] if path is not None else [],
            table=summary.case_table(payload) if payload else None,
            model=summary.model_extra(self.id, self.config),
        )

    def end_case(
        self, case: Case, payload: dict[str, Any] | None, error: BaseException | None
    ) -> None:
        duration = time.time() - case.started
        row = dict(payload or {})
        row.setdefault("duration_seconds", round(duration, 4))
        expected = summary.field(case.case, "expected_answer")
        run_path = None
        if case.run_id is None:  # no run of rlm-code's: one of ours for the case
            run_id = f"{self.id}/{summary.field(case.case, 'case_id')}"
            self.sink._start(
                run_id,
                task=str(summary.field(case.case, "task") or ""),
                environment=str(row.get("environment") or case.mode),
                params={"mode": case.mode},
                tags=case.tags,
                parent=self.id,
                at=case.started,
            )
            result: Any = {
                "completed": bool(row.get("completed")),
                "steps": row.get("steps", 0),
                "total_reward": row.get("total_reward", 0.0),
                "usage_summary": row.get("usage"),
                "final_response": row.get("final_response"),
            }
        else:
            run_id = case.run_id
            result, run_path = case.held_end or (None, None)
        ended = error is None and (case.run_id is None or case.held_end is not None)
        self.sink._end(
            run_id,
            result=result,
            run_path=run_path,
            status="FINISHED" if ended else "FAILED",
            metrics=summary.case_metrics(row),
            tags={"rlm.error": str(error)} if error is not None else {},
            assessments=summary.case_assessments(row, expected) if payload else [],
        )


def current(runner: Any) -> Benchmark | None:
    """The benchmark ``runner`` runs now, if one (read by its `AutologSink`)."""
    return getattr(runner, BENCH_ATTR, None) if runner is not None else None
