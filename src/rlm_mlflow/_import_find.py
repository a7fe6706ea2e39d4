"""Where ``rlm-mlflow import`` looks: the paths given, and for a benchmark summary the run
files of its cases (named by its rows, or in the runs directory beside it) with their
children; each file read once (`_import_plan`), rlm-code's index beside a runs directory
(``../observability/runs.jsonl``) read for the params and start times it holds. Pure.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ._import_plan import Plan, Problem, RunFile, read_run, read_summary, why


class Finder:
    """Reads what the paths given hold, each file once, into a `Plan`."""

    def __init__(self) -> None:
        self.plan = Plan()
        self._read: dict[Path, tuple[RunFile | None, list[Problem]]] = {}
        self._index: dict[Path, dict[str, Mapping[str, Any]]] = {}

    def add(self, path: Path) -> None:
        """A ``.rlm_code`` directory, its ``rlm``, ``rlm/runs`` or ``rlm/benchmarks``, one
        summary JSON, or one run JSONL."""
        if path.is_dir():
            rlm = path / "rlm" if (path / "rlm").is_dir() else path
            if (rlm / "runs").is_dir() or (rlm / "benchmarks").is_dir():
                self._directory(rlm / "runs")
                self._directory(rlm / "benchmarks")
            else:
                self._directory(path)
        elif path.suffix == ".jsonl":
            self._select(path)
        elif path.suffix == ".json":
            self._benchmark(path)
        else:
            self.plan.problems.append(Problem(path, None, "not a run JSONL nor a summary JSON"))

    def done(self) -> Plan:
        """The plan, with every benchmark's case runs and their children."""
        for bench in self.plan.benchmarks:
            runs_dir = bench.path.parent.parent / "runs"
            wanted: list[str] = []
            for row in bench.rows():
                run_id = row.get("run_id")
                if not run_id:
                    continue
                given = row.get("run_path")
                path = Path(given) if isinstance(given, str) else runs_dir / f"{run_id}.jsonl"
                if not path.is_file():
                    path = runs_dir / f"{run_id}.jsonl"
                if path.is_file():
                    self._select(path)
                    wanted.append(str(run_id))
                    runs_dir = path.parent
            self._descendants(runs_dir, wanted)
        return self.plan

    def _directory(self, path: Path) -> None:
        if not path.is_dir():
            return
        for file in sorted(path.glob("*.jsonl")):
            self._select(file)
        for file in sorted(path.glob("*.json")):
            self._benchmark(file)

    def _benchmark(self, path: Path) -> None:
        if any(b.path == path for b in self.plan.benchmarks):
            return
        bench, problems = read_summary(path)
        self.plan.problems.extend(problems)
        if bench is not None:
            self.plan.benchmarks.append(bench)

    def _run(self, path: Path) -> tuple[RunFile | None, list[Problem]]:
        key = Path(os.path.abspath(path))
        if key not in self._read:
            self._read[key] = read_run(path)
        return self._read[key]

    def _select(self, path: Path) -> None:
        run, problems = self._run(path)
        if run is not None and run.run_id in self.plan.runs:
            return
        self.plan.problems.extend(p for p in problems if p not in self.plan.problems)
        if run is not None:
            run.observed = self._observed(path.parent).get(run.run_id)
            self.plan.runs[run.run_id] = run

    def _descendants(self, runs_dir: Path, roots: list[str]) -> None:
        """The children (and theirs) of ``roots`` among the run files of ``runs_dir``."""
        if not roots or not runs_dir.is_dir():
            return
        by_parent: dict[str, list[tuple[Path, str]]] = {}
        for file in sorted(runs_dir.glob("*.jsonl")):
            run, _ = self._run(file)
            if run is not None and run.parent_run_id is not None:
                by_parent.setdefault(run.parent_run_id, []).append((file, run.run_id))
        todo = list(roots)
        while todo:
            for file, run_id in by_parent.pop(todo.pop(), []):
                self._select(file)
                todo.append(run_id)

    def _observed(self, runs_dir: Path) -> dict[str, Mapping[str, Any]]:
        """rlm-code's index beside a runs directory, by run id (read once)."""
        path = runs_dir.parent / "observability" / "runs.jsonl"
        if path in self._index:
            return self._index[path]
        index: dict[str, Mapping[str, Any]] = {}
        self._index[path] = index
        try:
            lines = path.read_bytes().split(b"\n") if path.is_file() else []
        except OSError as exc:
            self.plan.problems.append(Problem(path, None, f"cannot be read: {exc}"))
            lines = []
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError as exc:
                self.plan.problems.append(
                    Problem(path, number, f"not JSON ({why(exc)}); line skipped")
                )
                continue
            if isinstance(record, dict) and record.get("run_id"):
                index[str(record["run_id"])] = record
        return index


def find(paths: Iterable[Path]) -> Plan:
    finder = Finder()
    for path in paths:
        finder.add(path)
    return finder.done()
