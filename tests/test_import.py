"""``rlm-mlflow import``: what rlm-code wrote (the real ``run_benchmark`` and ``run_task``,
driven by the scripted connector, no sink of ours) backfilled into the embedded store and a
real server, through the command as a user runs it. The same structure and aggregates as
the live path (test_benchmarks); a second import, or one after a live run, adds nothing;
damaged lines are skipped and named; a run that never ended is KILLED."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Readback, autologging
from mlflow import MlflowClient
from support.checks import snapshot
from support.children import CLI
from support.scripted_rlm import (
    BENCH_CASES,
    CHILD_KEYS,
    ROOT_STEPS,
    run_scripted,
    scripted_runner,
    shutdown_interpreters,
    write_pack,
)

PRESET = "scripted_pack"
#: The parent's metrics, all from rlm-code's summary.
PARENT_METRICS = (
    "avg_reward",
    "avg_steps",
    "total_cases",
    "attempted_cases",
    "completed_cases",
    "completion_rate",
    "answer_match_rate",
    "latency_p50",
    "latency_p95",
    "latency_p99",
    "latency_max",
    "total_prompt_tokens",
    "llm_calls",
    "duration_seconds",
)


@pytest.fixture(autouse=True)
def no_sink_of_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    """rlm-code writes its files with its own MLflow sink off, and ours not in its slot."""
    monkeypatch.delenv("DSPY_RLM_MLFLOW_ENABLED", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def autologged(
    monkeypatch: pytest.MonkeyPatch, tracking_uri: str, experiment: str
) -> Iterator[None]:
    with autologging(monkeypatch, tracking_uri, experiment):
        yield


def write_benchmark(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """One benchmark through rlm-code: its workdir's ``.rlm_code`` and its summary."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    pack = write_pack(tmp_path / "pack.json", PRESET, BENCH_CASES)
    runner = scripted_runner(workdir)
    try:
        result = runner.run_benchmark(preset=PRESET, pack_paths=[str(pack)])
    finally:
        shutdown_interpreters(runner)
    for sink in runner.observability.sinks:  # ours, when autologged: everything delivered
        if hasattr(sink, "shared"):
            assert sink.shared.flush(timeout=120)
    payload: dict[str, Any] = json.loads(Path(result.summary_path).read_text())
    return workdir / ".rlm_code", payload


def rlm_import(
    tracking_uri: str, experiment: str, *paths: Path, **variables: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DSPY_RLM", "MLFLOW_"))}
    env.update(variables)
    return subprocess.run(
        [
            CLI,
            "import",
            *map(str, paths),
            "--tracking-uri",
            tracking_uri,
            "--experiment",
            experiment,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def count(readback: Readback) -> int:
    """Every run of the experiment (`Readback.runs` would fold two with one run id)."""
    exp = readback.client.get_experiment_by_name(readback.experiment)
    return len(readback.client.search_runs([exp.experiment_id], max_results=5000))


def case_runs(runs: dict[str, Any], bench_id: str) -> dict[str, Any]:
    parent = runs[bench_id]
    return {
        r.data.tags["rlm.case_id"]: r
        for r in runs.values()
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }


def structure(runs: dict[str, Any], bench_id: str) -> dict[str, Any]:
    """What the UI shows of a benchmark: the parent's summary metrics and tags, each case's
    tags, status and children, without what only a live run knows (the connector's model)."""
    parent = runs[bench_id]
    out: dict[str, Any] = {
        "parent": (parent.info.status, parent.info.run_name),
        "metrics": {k: parent.data.metrics[k] for k in PARENT_METRICS},
        "tags": {k: v for k, v in parent.data.tags.items() if k.startswith("rlm.")},
    }
    for case_id, run in case_runs(runs, bench_id).items():
        children = [
            r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == run.info.run_id
        ]
        out[case_id] = (
            run.info.status,
            {k: v for k, v in run.data.tags.items() if k.startswith("rlm.") and k != "rlm.error"},
            "answer_match" in run.data.metrics,
            sorted((c.info.status, c.data.tags.get("rlm.benchmark_id")) for c in children),
        )
    return out


def test_an_imported_benchmark_is_the_live_paths_parent_and_case_runs(
    tmp_path: Path, tracking_uri: str, experiment: str, readback: Readback
) -> None:
    rlm_code, payload = write_benchmark(tmp_path)
    before = snapshot(rlm_code)
    done = rlm_import(tracking_uri, experiment, rlm_code)
    assert done.returncode == 0, done.stderr
    assert "created 7 runs, found 0 already there, skipped 0" in done.stdout
    assert "7/7 runs" in done.stderr  # the progress bar's last state
    assert snapshot(rlm_code) == before  # nothing written where rlm-code keeps its files

    runs = readback.runs()
    bench_id = payload["benchmark_id"]
    parent = runs[bench_id]
    assert (parent.info.run_name, parent.info.status) == (bench_id, "FINISHED")
    tags, params, metrics = parent.data.tags, parent.data.params, parent.data.metrics
    assert (tags["rlm.benchmark_id"], tags["rlm.preset"], tags["rlm.mode"]) == (
        bench_id,
        PRESET,
        "native",
    )
    assert (params["preset"], params["mode"], params["branch_width"]) == (PRESET, "native", "1")
    for name in ("avg_reward", "avg_steps", "total_cases", "attempted_cases", "completed_cases"):
        assert metrics[name] == pytest.approx(payload[name]), name
    assert metrics["completion_rate"] == pytest.approx(
        payload["completed_cases"] / payload["total_cases"]
    )
    assert metrics["answer_match_rate"] == 0.5
    for name in ("p50", "p95", "p99", "max"):
        assert metrics[f"latency_{name}"] == pytest.approx(payload["latency_seconds"][name])
    assert metrics["total_prompt_tokens"] == payload["usage_totals"]["prompt_tokens"] > 0
    assert metrics["llm_calls"] == payload["usage_totals"]["total_calls"]
    # Its times are the summary's, its files the summary and the case table.
    started = payload["started_at"]
    assert parent.info.start_time == pytest.approx(_ms(started), abs=1)
    assert {f"{bench_id}.json", "case_results.json"} <= set(readback.artifacts(parent))
    assert json.loads(tags["mlflow.loggedArtifacts"]) == [
        {"path": "case_results.json", "type": "table"}
    ]
    client = MlflowClient(tracking_uri)
    (model,) = client.search_logged_models(experiment_ids=[parent.info.experiment_id])
    assert model.source_run_id == parent.info.run_id

    cases = case_runs(runs, bench_id)
    assert sorted(cases) == sorted(c["id"] for c in BENCH_CASES)
    by_case = {row["case_id"]: row for row in payload["case_results"]}
    for case in BENCH_CASES:
        run, row = cases[case["id"]], by_case[case["id"]]
        assert run.data.tags["rlm.benchmark_id"] == bench_id
        for name in ("task_family", "domain", "split", "length_bucket"):
            assert run.data.tags.get(f"rlm.{name}") == case.get(name), name
        assert run.data.metrics["duration_seconds"] == pytest.approx(row["duration_seconds"])
    assert cases["matches"].data.metrics["answer_match"] == 1.0
    assert cases["misses"].data.metrics["answer_match"] == 0.0
    assert "answer_match" not in cases["recursive"].data.metrics
    for case_id in ("recursive", "matches", "misses"):
        run = cases[case_id]
        assert run.info.status == "FINISHED"
        assert run.data.tags["run_id"] == by_case[case_id]["run_id"]
        assert readback.artifacts(run) == [f"{by_case[case_id]['run_id']}.jsonl"]
    failed = cases["model-fails"]
    assert failed.info.status == "FAILED"
    assert "scripted model failure" in failed.data.tags["rlm.error"]
    # Each step's metrics at the step's own time, from the run's file.
    recursive = cases["recursive"]
    text = Path(by_case["recursive"]["run_path"]).read_text()
    records = [json.loads(line) for line in text.splitlines()]
    steps = [r for r in records if r["type"] == "step"]
    history = readback.history(recursive, "step_reward")
    assert [(m.step, m.timestamp) for m in history] == [
        (r["step"], int(_ms(r["timestamp"]))) for r in steps
    ]
    assert recursive.info.end_time == int(_ms(records[-1]["timestamp"]))
    assert recursive.data.metrics["total_reward"] == records[-1]["total_reward"]
    children = [
        r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == recursive.info.run_id
    ]
    assert len(children) == len(CHILD_KEYS)
    assert all(c.data.tags["rlm.benchmark_id"] == bench_id for c in children)
    assert all(c.info.status == "FINISHED" for c in children)
    assert all(r.info.status != "RUNNING" for r in runs.values())


def test_a_second_import_adds_nothing(
    tmp_path: Path, tracking_uri: str, experiment: str, readback: Readback
) -> None:
    rlm_code, _ = write_benchmark(tmp_path)
    assert rlm_import(tracking_uri, experiment, rlm_code).returncode == 0
    first = readback.runs()
    again = rlm_import(tracking_uri, experiment, rlm_code / "rlm" / "benchmarks", rlm_code)
    assert again.returncode == 0, again.stderr
    assert "created 0 runs, found 7 already there, skipped 0" in again.stdout
    second = readback.runs()
    assert count(readback) == len(first) == 7
    assert sorted(second) == sorted(first)
    for run_id, run in second.items():
        assert run.info.run_id == first[run_id].info.run_id
        assert len(readback.history(run, "step_reward")) == run.data.metrics.get("steps", 0)


def test_runs_logged_live_are_not_imported_again_and_an_import_looks_like_them(
    autologged: None, tmp_path: Path, tracking_uri: str, experiment: str, readback: Readback
) -> None:
    rlm_code, payload = write_benchmark(tmp_path)  # our sink live, in rlm-code's slot
    live = readback.runs()
    assert count(readback) == len(live) == 7
    done = rlm_import(tracking_uri, experiment, rlm_code)
    assert done.returncode == 0, done.stderr
    assert "created 0 runs, found 7 already there" in done.stdout
    assert count(readback) == len(live)
    # The same files into an empty experiment: what the live path made, but the model.
    other = f"{experiment}-imported"
    assert rlm_import(tracking_uri, other, rlm_code).returncode == 0
    imported = Readback(tracking_uri, other).runs()
    bench_id = payload["benchmark_id"]
    ours, theirs = structure(imported, bench_id), structure(live, bench_id)
    assert theirs["tags"].pop("rlm.model") == "scripted/offline"
    assert ours == theirs


def test_with_traces_on_each_case_is_a_trace_with_answer_match_as_feedback(
    tmp_path: Path, tracking_uri: str, experiment: str, readback: Readback
) -> None:
    rlm_code, payload = write_benchmark(tmp_path)
    done = rlm_import(tracking_uri, experiment, rlm_code, DSPY_RLM_MLFLOW_TRACES="true")
    assert done.returncode == 0, done.stderr
    cases = case_runs(readback.runs(), payload["benchmark_id"])
    client = MlflowClient(tracking_uri)
    for case_id, matched in (("matches", True), ("misses", False)):
        run = cases[case_id]
        (trace,) = client.search_traces(locations=[run.info.experiment_id], run_id=run.info.run_id)
        full = client.get_trace(trace.info.trace_id)
        found = {a.name: a for a in full.info.assessments}
        assert found["answer_match"].feedback.value is matched
        assert found["expected_answer"].expectation.value == "42"
        steps = [s for s in full.data.spans if s.attributes.get("rlm.step") is not None]
        assert len(steps) == run.data.metrics["steps"]  # a step's span each (and its LLM span)
        assert len(full.data.spans) == 1 + 2 * len(steps)


def test_damaged_lines_are_skipped_and_named_and_the_rest_goes_on(
    tmp_path: Path, tracking_uri: str, experiment: str, readback: Readback
) -> None:
    rlm_code, payload = write_benchmark(tmp_path)
    by_case = {row["case_id"]: row for row in payload["case_results"]}
    damaged = Path(by_case["matches"]["run_path"])
    lines = damaged.read_text().splitlines(keepends=True)
    lines[0] = '{"type": "step", "run_id": "broken\n'  # a damaged first step
    lines.append(lines[-1][: len(lines[-1]) // 2])  # and a last line cut short
    damaged.write_text("".join(lines))
    broken = rlm_code / "rlm" / "benchmarks" / "bench_broken.json"
    broken.write_text('{\n  "benchmark_id": "bench_broken",\n  "case_results": [\n')
    done = rlm_import(tracking_uri, experiment, rlm_code)
    assert done.returncode == 1, done.stderr
    assert f"skipped {damaged}:1: not JSON" in done.stderr
    assert f"skipped {damaged}:{len(lines)}: not JSON" in done.stderr
    assert f"skipped {broken}:4: not JSON" in done.stderr
    assert "created 7 runs, found 0 already there, skipped 3" in done.stdout
    runs = readback.runs()
    matches = runs[by_case["matches"]["run_id"]]
    assert matches.info.status == "FINISHED"
    assert [m.step for m in readback.history(matches, "step_reward")] == [2]
    assert "bench_broken" not in runs
    assert len(case_runs(runs, payload["benchmark_id"])) == len(BENCH_CASES)


def test_a_run_without_its_final_record_is_killed_its_children_still_under_it(
    tmp_path: Path, tracking_uri: str, experiment: str, readback: Readback
) -> None:
    root = run_scripted(tmp_path / "work")
    path = Path(root.run_path)
    records = path.read_text().splitlines(keepends=True)
    assert json.loads(records[-1])["type"] == "final"
    path.write_text("".join(records[:-1]))  # the process died before the end
    done = rlm_import(tracking_uri, experiment, tmp_path / "work" / "runs")
    assert done.returncode == 0, done.stderr
    assert "created 3 runs, found 0 already there, skipped 0" in done.stdout
    runs = readback.runs()
    killed = runs[root.run_id]
    assert killed.info.status == "KILLED"
    assert killed.info.end_time == int(_ms(json.loads(records[-2])["timestamp"]))
    assert len(readback.history(killed, "step_reward")) == ROOT_STEPS
    assert "completed" not in killed.data.metrics
    children = [r for r in runs.values() if r.data.tags.get("mlflow.parentRunId")]
    assert len(children) == len(CHILD_KEYS)
    assert all(c.data.tags["mlflow.parentRunId"] == killed.info.run_id for c in children)
    assert all(c.info.status == "FINISHED" for c in children)


def test_a_child_imported_alone_goes_under_its_parent_imported_before(
    tmp_path: Path, tracking_uri: str, experiment: str, readback: Readback
) -> None:
    root = run_scripted(tmp_path / "work")
    runs_dir = tmp_path / "work" / "runs"
    (child, *_) = sorted(p for p in runs_dir.glob("*.jsonl") if p.stem != root.run_id)
    assert rlm_import(tracking_uri, experiment, runs_dir / f"{root.run_id}.jsonl").returncode == 0
    done = rlm_import(tracking_uri, experiment, child)
    assert done.returncode == 0, done.stderr
    runs = readback.runs()
    assert runs[child.stem].data.tags["mlflow.parentRunId"] == runs[root.run_id].info.run_id


def test_usage_errors_exit_2_in_one_line(tmp_path: Path, embedded_uri: str) -> None:
    missing = rlm_import(embedded_uri, "x", tmp_path / "nowhere")
    assert missing.returncode == 2
    assert (
        missing.stderr.strip()
        == f"rlm-mlflow: {tmp_path / 'nowhere'} does not exist (a PATH argument)"
    )
    empty = rlm_import(embedded_uri, "x", tmp_path)
    assert empty.returncode == 2
    assert "no rlm-code run or benchmark files" in empty.stderr


def _ms(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp() * 1000
