"""rlm-code's benchmarks in MLflow, under autolog: the real ``run_benchmark`` (rlm-code from
PyPI, a scripted connector, no LLM) on the embedded store and a real server. A benchmark is one
parent run whose metrics are rlm-code's summary's; every case a run under it (the one whose
model call raises too), with answer_match as a metric and as trace feedback; the
configuration a logged model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
from conftest import Readback, autologging
from mlflow import MlflowClient
from mlflow.tracking._tracking_service.utils import _use_tracking_uri
from support.scripted_rlm import (
    BENCH_CASES,
    CHILD_KEYS,
    ScriptedConnector,
    scripted_runner,
    shutdown_interpreters,
    write_pack,
)

import rlm_mlflow

PRESET = "scripted_pack"


@pytest.fixture
def autologged(
    monkeypatch: pytest.MonkeyPatch, tracking_uri: str, experiment: str
) -> Iterator[None]:
    with autologging(monkeypatch, tracking_uri, experiment, traces=True):
        yield


class CancellingConnector(ScriptedConnector):
    """Cancels the benchmark once its first case's run is under way (as `/rlm cancel` would:
    rlm-code's own request_cancel only reaches the runs active at the time)."""

    runner: Any = None

    def generate_response(self, prompt: str, *args: Any, **kwargs: Any) -> str:
        if self.runner is not None:
            self.runner._is_cancel_requested = lambda *_: True
        return super().generate_response(prompt, *args, **kwargs)


def run_benchmark(
    tmp_path: Path, connector: ScriptedConnector | None = None, cases: Any = BENCH_CASES
) -> dict[str, Any]:
    """One benchmark through rlm-code; its summary JSON, after our sink delivered it all."""
    workdir = tmp_path / f"work-{len(list(tmp_path.glob('work-*')))}"
    workdir.mkdir()
    pack = write_pack(tmp_path / f"{workdir.name}-pack.json", PRESET, cases)
    runner = scripted_runner(workdir, connector=connector)
    if isinstance(connector, CancellingConnector):
        connector.runner = runner
    try:
        result = runner.run_benchmark(preset=PRESET, pack_paths=[str(pack)])
    finally:
        shutdown_interpreters(runner)
    (ours,) = [
        s
        for s in runner.observability.sinks
        if isinstance(s, rlm_mlflow.MLflowSink) or hasattr(s, "shared")
    ]
    assert ours.shared.flush(timeout=120)
    payload: dict[str, Any] = json.loads(Path(result.summary_path).read_text())
    return payload


def case_runs(readback: Readback, payload: dict[str, Any]) -> dict[str, Any]:
    """The case runs under the benchmark's parent, by case id."""
    runs = readback.runs()
    parent = runs[payload["benchmark_id"]]
    return {
        run.data.tags["rlm.case_id"]: run
        for run in runs.values()
        if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }


def test_a_benchmark_is_one_parent_run_whose_metrics_are_rlm_codes_summary(
    autologged: None,
    tmp_path: Path,
    readback: Readback,
    tracking_uri: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    payload = run_benchmark(tmp_path)
    runs = readback.runs()
    parent = runs[payload["benchmark_id"]]
    assert parent.info.run_name == payload["benchmark_id"]
    assert parent.info.status == "FINISHED"
    tags, params, metrics = parent.data.tags, parent.data.params, parent.data.metrics
    assert tags["rlm.benchmark_id"] == payload["benchmark_id"]
    assert (tags["rlm.preset"], tags["rlm.mode"], tags["rlm.model"]) == (
        PRESET,
        "native",
        "scripted/offline",
    )
    assert (params["preset"], params["mode"], params["branch_width"]) == (PRESET, "native", "1")
    # The summary's own numbers, as rlm-code wrote them.
    for name in ("avg_reward", "avg_steps", "total_cases", "attempted_cases", "completed_cases"):
        assert metrics[name] == pytest.approx(payload[name]), name
    assert metrics["completion_rate"] == pytest.approx(
        payload["completed_cases"] / payload["total_cases"]
    )
    assert metrics["answer_match_rate"] == 0.5  # one of the two cases that answered
    for name in ("p50", "p95", "p99", "max"):
        assert metrics[f"latency_{name}"] == pytest.approx(payload["latency_seconds"][name])
    usage = payload["usage_totals"]
    assert metrics["total_prompt_tokens"] == usage["prompt_tokens"] > 0
    assert metrics["llm_calls"] == usage["total_calls"]
    # The summary JSON under its own name, and the cases as a table the UI renders.
    client = MlflowClient(tracking_uri)
    files = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {f"{payload['benchmark_id']}.json", "case_results.json"} <= files
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", parent.info.experiment_id)  # what it searches
    with _use_tracking_uri(tracking_uri):
        table = mlflow.load_table("case_results.json", run_ids=[parent.info.run_id])
    assert sorted(table["case_id"]) == sorted(c["id"] for c in BENCH_CASES)
    assert json.loads(tags["mlflow.loggedArtifacts"]) == [
        {"path": "case_results.json", "type": "table"}
    ]


def test_every_case_is_a_run_under_its_benchmark_failed_ones_too(
    autologged: None, tmp_path: Path, readback: Readback, tracking_uri: str
) -> None:
    payload = run_benchmark(tmp_path)
    cases = case_runs(readback, payload)
    assert sorted(cases) == sorted(c["id"] for c in BENCH_CASES)
    by_case = {row["case_id"]: row for row in payload["case_results"]}
    for case in BENCH_CASES:
        run, row = cases[case["id"]], by_case[case["id"]]
        tags = run.data.tags
        assert tags["rlm.benchmark_id"] == payload["benchmark_id"]
        for name in ("task_family", "domain", "split", "length_bucket"):
            assert tags.get(f"rlm.{name}") == case.get(name), name
        assert run.data.metrics["duration_seconds"] == pytest.approx(
            row["duration_seconds"], abs=0.1
        )
        assert run.data.params["model"] == "scripted/offline"
    assert cases["matches"].data.metrics["answer_match"] == 1.0
    assert cases["misses"].data.metrics["answer_match"] == 0.0
    assert "answer_match" not in cases["recursive"].data.metrics  # no expected answer
    for case_id in ("recursive", "matches", "misses"):
        assert cases[case_id].info.status == "FINISHED"
        assert cases[case_id].data.tags["run_id"] == by_case[case_id]["run_id"]
    # rlm-code's summary says run_id None for it; MLflow has its run, ended FAILED.
    failed = cases["model-fails"]
    assert by_case["model-fails"]["run_id"] is None
    assert failed.info.status == "FAILED"
    assert "scripted model failure" in failed.data.tags["rlm.error"]
    # The recursive case's children stay under its run, tagged with the benchmark.
    runs = readback.runs()
    children = [
        r
        for r in runs.values()
        if r.data.tags.get("mlflow.parentRunId") == cases["recursive"].info.run_id
    ]
    assert len(children) == len(CHILD_KEYS)
    assert all(c.data.tags["rlm.benchmark_id"] == payload["benchmark_id"] for c in children)
    assert all(r.info.status != "RUNNING" for r in runs.values())


def test_answer_match_is_trace_feedback_and_the_expected_answer_an_expectation(
    autologged: None, tmp_path: Path, readback: Readback, tracking_uri: str
) -> None:
    payload = run_benchmark(tmp_path)
    cases = case_runs(readback, payload)
    client = MlflowClient(tracking_uri)
    for case_id, matched in (("matches", True), ("misses", False)):
        (trace,) = client.search_traces(
            locations=[cases[case_id].info.experiment_id], run_id=cases[case_id].info.run_id
        )
        found = {a.name: a for a in client.get_trace(trace.info.trace_id).info.assessments}
        assert found["answer_match"].feedback.value is matched
        assert found["completed"].feedback.value is True
        assert isinstance(found["total_reward"].feedback.value, float)
        assert found["expected_answer"].expectation.value == "42"
        assert found["answer_match"].source.source_type == "CODE"


def test_two_benchmarks_with_two_models_are_two_logged_models_ranked_by_avg_reward(
    autologged: None, tmp_path: Path, readback: Readback, tracking_uri: str, experiment: str
) -> None:
    models = []
    for name in ("scripted/model-a", "scripted/model-b"):
        connector = ScriptedConnector()
        connector.current_model = name  # type: ignore[misc]
        payload = run_benchmark(tmp_path, connector, cases=BENCH_CASES[1:3])
        models.append((name, payload))
    client = MlflowClient(tracking_uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    logged = client.search_logged_models(
        experiment_ids=[experiment_id],
        order_by=[{"field_name": "metrics.avg_reward", "ascending": False}],
    )
    assert sorted(m.name for m in logged) == [
        "scripted-model-a_per-case-env_native_bw1",
        "scripted-model-b_per-case-env_native_bw1",
    ]
    runs = readback.runs()
    for model in logged:
        metrics = {m.key: m.value for m in model.metrics}
        (payload,) = [p for n, p in models if n.replace("/", "-") in model.name]
        assert metrics["avg_reward"] == pytest.approx(payload["avg_reward"])
        assert model.source_run_id == runs[payload["benchmark_id"]].info.run_id


def test_a_cancelled_benchmark_ends_killed_with_what_it_had(
    autologged: None, tmp_path: Path, readback: Readback
) -> None:
    payload = run_benchmark(tmp_path, CancellingConnector(), cases=BENCH_CASES[1:3])
    assert payload["cancelled"] is True and payload["attempted_cases"] >= 1
    parent = readback.runs()[payload["benchmark_id"]]
    assert parent.info.status == "KILLED"
    assert parent.data.metrics["attempted_cases"] == payload["attempted_cases"]
    assert all(r.info.status != "RUNNING" for r in readback.runs().values())
