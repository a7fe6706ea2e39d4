"""``rlm-mlflow import``: MLflow backfilled from what rlm-code wrote (`_import_plan`), sent
through a sink like every live run: asynchronous, batched, retried, counted.

A run JSONL becomes its MLflow run: rlm-code's params (its index's, when there), each step's
metrics at the step's own time, the summary, the JSONL as artifact, start and end times from
the files, its children nested under it; a run without a final record ends KILLED. A
benchmark summary becomes the parent run and case runs of the live path (`_benchmark`, from
`_bench_summary`), its native cases' runs being the imported run files.

Idempotent: every run is first looked up by its key, the tag ``run_id`` (rlm-code's run id;
a benchmark's id; ``<benchmark_id>/<case_id>`` for a case without a run of rlm-code's), in
the experiment, whoever logged it (a live sink, an earlier import). What is there is left as
it is; what is created under it is nested by its MLflow id.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import _bench_summary as summary
from ._import_plan import Benchmark, Plan, Problem, RunFile, timestamp

if TYPE_CHECKING:
    from ._sink import MLflowSink

#: The tag MLflow nests a run under another by (a parent created before this import).
PARENT_TAG = "mlflow.parentRunId"
#: What a benchmark's case runs' params say of the ``run_benchmark`` call.
CALL_FROM_CASES = ("branch_width", "sub_model", "sub_provider")


@dataclass
class Counts:
    """Runs created, found already there, and what was skipped (files, lines, cases)."""

    created: int = 0
    found: int = 0
    problems: list[Problem] = field(default_factory=list)


@dataclass
class Existing:
    """What the experiment holds: runs by their ``run_id`` tag, and benchmark cases by
    (``rlm.benchmark_id``, ``rlm.case_id``): a case logged live whose run rlm-code's summary
    does not name (its model call raised) is found by its case."""

    runs: dict[str, str] = field(default_factory=dict)  # MLflow run ids
    cases: dict[tuple[str, str], str] = field(default_factory=dict)

    def case(self, bench_id: str, row: Mapping[str, Any]) -> str | None:
        key = f"{bench_id}/{row.get('case_id')}"
        return self.runs.get(key) or self.cases.get((bench_id, str(row.get("case_id"))))


def existing_runs(tracking_uri: str, experiment: str) -> Existing:
    """The experiment's runs, every page of them."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    out = Existing()
    if found is None:
        return out
    token: str | None = None
    while True:
        page = client.search_runs([found.experiment_id], max_results=1000, page_token=token)
        for run in page:
            tags = run.data.tags
            if tags.get("run_id"):
                out.runs.setdefault(tags["run_id"], run.info.run_id)
            if tags.get("rlm.benchmark_id") and tags.get("rlm.case_id"):
                key = (tags["rlm.benchmark_id"], tags["rlm.case_id"])
                out.cases.setdefault(key, run.info.run_id)
        token = page.token
        if not token:
            return out


def units(plan: Plan) -> int:
    """How many runs the plan stands for (the progress bar's total)."""
    ours = sum(1 for b in plan.benchmarks for row in b.rows() if not row.get("run_id"))
    return len(plan.runs) + len(plan.benchmarks) + ours


class Importer:
    """Sends a `Plan` through ``sink``, skipping what `existing_runs` found."""

    def __init__(
        self,
        sink: MLflowSink,
        existing: Existing,
        progress: Callable[[], None] | None = None,
    ) -> None:
        self.sink = sink
        self.existing = existing.runs
        self.cases = existing
        self.progress = progress or (lambda: None)
        self.counts = Counts()
        self._done: set[str] = set()
        self._children: dict[str, list[RunFile]] = {}

    def run(self, plan: Plan) -> Counts:
        self.counts.problems.extend(plan.problems)
        self._children = plan.children()
        for bench in plan.benchmarks:
            self._benchmark(bench, plan)
        for run in plan.runs.values():  # the roots first: children go with their parent
            if run.run_id not in self._done and run.parent_run_id not in plan.runs:
                self._run(run, None, {})
        for run in plan.runs.values():  # a parent never reached (a loop of parents)
            if run.run_id not in self._done:
                self._run(run, None, {})
        return self.counts

    def _run(
        self,
        run: RunFile,
        parent: str | None,
        tags: dict[str, str],
        case: Mapping[str, Any] | None = None,
        parent_mlflow: str | None = None,
    ) -> None:
        """``run`` and its children. ``parent``: the open run of this import it goes under;
        else ``parent_mlflow``, or the run its file names as parent, found in MLflow."""
        self._done.add(run.run_id)
        bench = tags.get("rlm.benchmark_id")
        child_tags = {"rlm.benchmark_id": bench} if bench is not None else {}
        if run.run_id in self.existing:
            self.counts.found += 1
            self.progress()
            for child in self._children.get(run.run_id, []):
                self._run(child, None, child_tags, parent_mlflow=self.existing[run.run_id])
            return
        start_tags = dict(tags)
        if parent is None:
            parent_mlflow = parent_mlflow or self.existing.get(run.parent_run_id or "")
            if parent_mlflow is not None:
                start_tags[PARENT_TAG] = parent_mlflow
        self.sink._start(
            run.run_id,
            task=run.task,
            environment=run.environment,
            params=run.params(),
            tags=start_tags,
            parent=parent,
            at=run.start_time(),
        )
        total = 0.0
        for step, at in run.step_times():
            total += float(step["reward"])
            self.sink._step(run.run_id, event=step, cumulative_reward=total, at=at)
        for child in self._children.get(run.run_id, []):
            if child.run_id not in self._done:
                self._run(child, run.run_id, child_tags)
        extras: dict[str, Any] = {}
        if case is not None:
            extras = {
                "metrics": summary.case_metrics(case),
                "tags": _error_tag(case),
                "assessments": summary.case_assessments(case, case.get("expected_answer")),
            }
        self.sink._end(
            run.run_id,
            result=run.result(),
            run_path=str(run.path),
            status=run.status,
            at=run.end_time(),
            **extras,
        )
        self.counts.created += 1
        self.progress()

    def _benchmark(self, bench: Benchmark, plan: Plan) -> None:
        """The benchmark's parent run, then its cases under it, then the parent's end."""
        payload, bench_id = bench.payload, bench.id
        found = self.existing.get(bench_id)
        config = self._config(bench, plan)
        if found is None:
            self.sink._start(
                bench_id,
                task=f"benchmark {payload.get('preset')}",
                environment="benchmark",
                params=summary.parent_params(config["call"]),
                tags=summary.parent_tags(
                    bench_id, payload.get("preset"), payload.get("mode"), None
                ),
                name=bench_id,
                at=timestamp(payload.get("started_at")) or _mtime(bench),
            )
        else:
            self.counts.found += 1
            self.progress()
        parent = bench_id if found is None else None
        for row in bench.rows():
            tags = summary.case_tags(bench_id, row)
            run_id = row.get("run_id")
            if not run_id:
                self._case_of_ours(bench_id, row, tags, parent, found)
            elif str(run_id) in plan.runs:
                run = plan.runs[str(run_id)]
                if run.run_id not in self._done:
                    self._run(run, parent, tags, row, parent_mlflow=found)
            else:
                self.counts.problems.append(
                    Problem(
                        bench.path,
                        None,
                        f"case {row.get('case_id')!r}: its run file {run_id}.jsonl was not "
                        "found; case skipped",
                    )
                )
        if found is None:
            self.sink._end(
                bench_id,
                result=None,
                status="KILLED" if payload.get("cancelled") else "FINISHED",
                at=timestamp(payload.get("finished_at")) or _mtime(bench),
                metrics=summary.parent_metrics(payload),
                artifacts=[str(bench.path)],
                table=summary.case_table(payload),
                model=summary.model_extra(bench_id, config["model"]),
            )
            self.counts.created += 1
            self.progress()

    def _case_of_ours(
        self,
        bench_id: str,
        row: Mapping[str, Any],
        tags: dict[str, str],
        parent: str | None,
        parent_mlflow: str | None,
    ) -> None:
        """A case without a run of rlm-code's (another mode, or it failed before its run
        wrote a line): a run of ours, as the live path makes one."""
        run_id = f"{bench_id}/{row.get('case_id')}"
        if self.cases.case(bench_id, row) is not None:
            self.counts.found += 1
            self.progress()
            return
        start_tags = dict(tags)
        if parent is None and parent_mlflow is not None:
            start_tags[PARENT_TAG] = parent_mlflow
        mode = str(row.get("mode") or "")
        started = timestamp(row.get("started_at"))
        self.sink._start(
            run_id,
            task=str(row.get("task") or ""),
            environment=str(row.get("environment") or mode),
            params={"mode": mode},
            tags=start_tags,
            parent=parent,
            at=started,
        )
        result = {
            "completed": bool(row.get("completed")),
            "steps": row.get("steps", 0),
            "total_reward": row.get("total_reward", 0.0),
            "usage_summary": row.get("usage"),
            "final_response": row.get("final_response"),
        }
        self.sink._end(
            run_id,
            result=result,
            status="FAILED" if row.get("error") else "FINISHED",
            at=timestamp(row.get("finished_at")) or started,
            metrics=summary.case_metrics(row),
            tags=_error_tag(row),
            assessments=summary.case_assessments(row, row.get("expected_answer")),
        )
        self.counts.created += 1
        self.progress()

    def _config(self, bench: Benchmark, plan: Plan) -> dict[str, Any]:
        """The ``run_benchmark`` call as its summary (and its case runs' params) say it, and
        the agent's configuration for the logged model."""
        payload = bench.payload
        call: dict[str, Any] = {
            "preset": payload.get("preset"),
            "mode": payload.get("mode"),
            "harness_strategy": payload.get("harness_strategy"),
            "include_mcp": payload.get("mcp_enabled"),
            "mcp_server": payload.get("mcp_server"),
            "pack_paths": payload.get("pack_paths"),
        }
        cases = [
            plan.runs[str(r["run_id"])] for r in bench.rows() if str(r.get("run_id")) in plan.runs
        ]
        for name in CALL_FROM_CASES:
            values = {str(c.params().get(name)) for c in cases if c.params().get(name) is not None}
            if len(values) == 1:
                call[name] = next(iter(values))
        model = {"model": None, "provider": None, "environment": None, "framework": None}
        model.update({k: call.get(k) for k in ("branch_width", "sub_model", "preset", "mode")})
        return {"call": call, "model": model}


def _error_tag(row: Mapping[str, Any]) -> dict[str, str]:
    return {"rlm.error": str(row["error"])} if row.get("error") else {}


def _mtime(bench: Benchmark) -> float:
    try:
        return bench.path.stat().st_mtime
    except OSError:
        return 0.0
