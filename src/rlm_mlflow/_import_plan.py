"""What ``rlm-mlflow import`` finds in what rlm-code wrote. Pure: it reads files, writes
none, imports no mlflow.

rlm-code keeps, under a workdir's ``.rlm_code/rlm``: ``runs/<run_id>.jsonl`` (a run's
records: ``step`` ones, then a ``final`` one once it ended; a child's name its parent in
``parent_run_id``), ``benchmarks/<benchmark_id>.json`` (a benchmark's summary, a row per
case, a native case's row naming its run), and ``observability/runs.jsonl`` (rlm-code's own
index: each ended run's params and start time, read when there). A line that cannot be read
is left out and said, with its file and line number; the rest of the file goes on.
Where to look is `_import_find`'s.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

#: What a run's records say of it, as its params say it when rlm-code's index has none.
RUN_FIELDS = ("framework", "depth", "parent_run_id")


@dataclass(frozen=True)
class Problem:
    """A file, or a line of one, that was left out, and why."""

    path: Path
    line: int | None
    reason: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else str(self.path)
        return f"{where}: {self.reason}"


@dataclass
class RunFile:
    """One run JSONL, its readable records in order."""

    path: Path
    run_id: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)  # the first value a record gives
    times: list[float] = field(default_factory=list)  # the records' timestamps, in order
    observed: Mapping[str, Any] | None = None  # its line in rlm-code's index

    @property
    def parent_run_id(self) -> str | None:
        parent = self.info.get("parent_run_id")
        if parent is None and self.observed is not None:
            parent = _mapping(self.observed.get("params")).get("parent_run_id")
        return str(parent) if parent else None

    @property
    def status(self) -> str:
        """FINISHED once rlm-code wrote its final record, else KILLED (it never ended)."""
        return "FINISHED" if self.final is not None else "KILLED"

    def start_time(self) -> float:
        observed = timestamp((self.observed or {}).get("started_at"))
        if observed is not None:
            return observed
        return self.times[0] if self.times else self._mtime()

    def end_time(self) -> float:
        if self.final is not None and timestamp(self.final.get("timestamp")) is not None:
            return timestamp(self.final["timestamp"]) or 0.0
        return self.times[-1] if self.times else self.start_time()

    def step_times(self) -> Iterable[tuple[dict[str, Any], float]]:
        """Each step with its time (the previous one's where it has none)."""
        at = self.start_time()
        for step in self.steps:
            at = timestamp(step.get("timestamp")) or at
            yield step, at

    @property
    def task(self) -> str:
        task = self.info.get("task") or (self.observed or {}).get("task")
        return str(task or "")

    @property
    def environment(self) -> str:
        environment = self.info.get("environment") or (self.observed or {}).get("environment")
        return str(environment or "")

    def params(self) -> dict[str, Any]:
        """rlm-code's params of the run: its index's, else what its records say."""
        if self.observed is not None and isinstance(self.observed.get("params"), Mapping):
            return dict(self.observed["params"])
        return {name: self.info[name] for name in RUN_FIELDS if name in self.info}

    def result(self) -> dict[str, Any]:
        """What rlm-code's ``on_run_end`` got: its final record, else what the steps add to."""
        if self.final is None:
            total = sum(float(step["reward"]) for step in self.steps)
            return {"completed": False, "steps": len(self.steps), "total_reward": total}
        final = self.final
        return {
            "completed": bool(final.get("completed")),
            "steps": final.get("steps", len(self.steps)),
            "total_reward": final.get("total_reward", 0.0),
            "usage_summary": final.get("usage"),
            "final_response": final.get("final_response"),
        }

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0


@dataclass
class Benchmark:
    path: Path
    payload: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.payload.get("benchmark_id") or self.path.stem)

    def rows(self) -> list[Mapping[str, Any]]:
        return [r for r in self.payload["case_results"] if isinstance(r, Mapping)]


@dataclass
class Plan:
    """What to import: run files by run id, benchmarks, and what was left out."""

    runs: dict[str, RunFile] = field(default_factory=dict)
    benchmarks: list[Benchmark] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def children(self) -> dict[str, list[RunFile]]:
        out: dict[str, list[RunFile]] = {}
        for run in self.runs.values():
            if run.parent_run_id is not None:
                out.setdefault(run.parent_run_id, []).append(run)
        return out


def timestamp(value: Any) -> float | None:
    """rlm-code's ISO 8601 time (UTC when it names no zone) in seconds, or None."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def read_run(path: Path) -> tuple[RunFile | None, list[Problem]]:
    """A run JSONL's readable records; None when nothing of it can be imported."""
    problems: list[Problem] = []
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as exc:
        return None, [Problem(path, None, f"cannot be read: {exc.strerror or exc}")]
    run = RunFile(path, path.stem)
    run_id: str | None = None
    seen: set[int] = set()
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError as exc:  # a damaged line, or the last one cut short
            problems.append(Problem(path, number, f"not JSON ({why(exc)}); line skipped"))
            continue
        if not isinstance(record, dict):
            problems.append(Problem(path, number, "not a JSON object; line skipped"))
            continue
        own = record.get("run_id")
        if run_id is not None and own is not None and own != run_id:
            problems.append(Problem(path, number, f"a record of run {own!r}; line skipped"))
            continue
        kind = record.get("type")
        if kind == "step":
            problem = _step_problem(record, seen)
            if problem is not None:
                problems.append(Problem(path, number, f"{problem}; line skipped"))
                continue
            seen.add(record["step"])
            run.steps.append(record)
        elif kind == "final":
            run.final = record
        run_id = run_id or (str(own) if own else None)
        for name in ("environment", "task", *RUN_FIELDS):
            if name in record and name not in run.info:
                run.info[name] = record[name]
        at = timestamp(record.get("timestamp"))
        if at is not None:
            run.times.append(at)
    run.run_id = run_id or path.stem
    if not run.steps and run.final is None:
        problems.append(Problem(path, None, "no step and no final record; file skipped"))
        return None, problems
    return run, problems


def read_summary(path: Path) -> tuple[Benchmark | None, list[Problem]]:
    """A benchmark summary JSON; None when it cannot be read whole."""
    try:
        payload = json.loads(path.read_bytes())
    except OSError as exc:
        return None, [Problem(path, None, f"cannot be read: {exc.strerror or exc}")]
    except json.JSONDecodeError as exc:
        return None, [Problem(path, exc.lineno, f"not JSON ({exc.msg}); benchmark skipped")]
    except ValueError as exc:
        return None, [Problem(path, None, f"not JSON ({why(exc)}); benchmark skipped")]
    if not isinstance(payload, dict) or not isinstance(payload.get("case_results"), list):
        return None, [Problem(path, None, "not an rlm-code benchmark summary; skipped")]
    bench = Benchmark(path, payload)
    problems = [
        Problem(path, None, f"case {i}: not a JSON object; case skipped")
        for i, row in enumerate(payload["case_results"])
        if not isinstance(row, Mapping)
    ]
    return bench, problems


def _step_problem(record: Mapping[str, Any], seen: set[int]) -> str | None:
    step, reward = record.get("step"), record.get("reward")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f"a step record without a step number ({step!r})"
    if step in seen:
        return f"step {step} repeated"
    if isinstance(reward, bool) or not isinstance(reward, (int, float)):
        return f"step {step} has no reward"
    if not math.isfinite(float(reward)):
        return f"step {step}'s reward is not finite"
    return None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def why(exc: ValueError) -> str:
    return exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)[:100]
