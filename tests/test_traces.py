"""The trajectory in MLflow's Traces tab, and token usage as metrics: read back through
MlflowClient (search_traces, get_trace) from a real server and from the embedded store."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from conftest import Readback, capture_logs
from mlflow import MlflowClient
from support.servers import FaultProxy, MlflowServer
from support.trajectories import Result, attribute, rlm_run, step_event, traces_of

from rlm_mlflow import MLflowSink


def test_a_run_is_one_trace_in_its_runs_traces_tab(
    tracking_uri: str, experiment: str, readback: Readback
) -> None:
    long_code = "x = 1\n" * 100  # 600 characters: cut at the limit
    sink = MLflowSink(
        True, experiment=experiment, tracking_uri=tracking_uri, traces=True, trace_text_limit=120
    )
    rlm_run(sink, "traced", 6, code=long_code)
    assert sink.close(timeout=60)
    status = sink.status()
    assert status["traces"] == "on" and status["delivered"] == 8 and status["pending"] == 0
    run = readback.runs()["traced"]
    (trace,) = traces_of(readback.client, run)
    spans = sorted(trace.data.spans, key=lambda s: s.start_time_ns)
    root, steps = spans[0], spans[1:]
    assert root.parent_id is None and root.name == "traced"
    assert root.inputs["task"] == "task of traced" and root.inputs["environment"] == "generic"
    assert root.outputs == {
        "completed": True,
        "total_reward": 3.0,
        "final_response": "answer of traced",
    }
    assert [attribute(s, "rlm.step") for s in steps] == [1, 2, 3, 4, 5, 6]
    assert all(s.parent_id == root.span_id for s in steps)
    code = steps[0].inputs["code"]  # a Markdown code block: the UI shows it as code
    assert code.startswith("```python\n" + long_code[:120])
    assert code.endswith(" …[cut: 480 more characters]\n```")
    assert steps[0].outputs == {"success": True, "stdout": "```text\nout 1\n```"}
    assert attribute(steps[2], "rlm.cumulative_reward") == 1.5
    assert trace.info.token_usage == {"input_tokens": 600, "output_tokens": 60, "total_tokens": 660}
    # span times are the events' own: the steps follow one another inside the run's span
    assert all(a.end_time_ns <= b.start_time_ns + 1 for a, b in itertools.pairwise(steps))
    assert (
        root.start_time_ns <= steps[0].start_time_ns and steps[-1].end_time_ns <= root.end_time_ns
    )
    # token usage as metrics too: cumulative per step, and the run's totals at its end
    history = readback.history(run, "prompt_tokens")
    assert [(m.step, m.value) for m in history] == [(s, 100.0 * s) for s in range(1, 7)]
    metrics = run.data.metrics
    assert (metrics["total_prompt_tokens"], metrics["total_completion_tokens"]) == (600, 60)
    assert metrics["llm_calls"] == 6


def test_children_are_traces_of_their_own_named_by_the_step_that_delegated_them(
    tracking_uri: str, experiment: str, readback: Readback
) -> None:
    import threading

    sink = MLflowSink(True, experiment=experiment, tracking_uri=tracking_uri, traces=True)

    def children() -> None:
        threads = [
            threading.Thread(target=rlm_run, args=(sink, f"root.{i}", 3), kwargs={"parent": "root"})
            for i in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    rlm_run(sink, "root", 4, children=children)
    assert sink.close(timeout=60)
    runs = readback.runs()
    traces = {name: traces_of(readback.client, run) for name, run in runs.items()}
    assert sorted(traces) == ["root", "root.0", "root.1"]
    assert all(len(found) == 1 for found in traces.values())
    root_trace = traces["root"][0]
    delegating = next(s for s in root_trace.data.spans if attribute(s, "rlm.step") == 1)
    assert sorted(attribute(delegating, "rlm.child_runs")) == ["root.0", "root.1"]
    child_traces = {traces[f"root.{i}"][0].info.trace_id for i in range(2)}
    assert set(attribute(delegating, "rlm.child_traces")) == child_traces
    for i in range(2):
        child_root = next(s for s in traces[f"root.{i}"][0].data.spans if s.parent_id is None)
        assert attribute(child_root, "rlm.parent_run") == "root"
        assert attribute(child_root, "rlm.parent_trace") == root_trace.info.trace_id
        assert len(traces[f"root.{i}"][0].data.spans) == 1 + 3


def test_a_trace_holds_at_most_max_spans_steps_and_counts_the_rest(
    embedded_uri: str, experiment: str
) -> None:
    sink = MLflowSink(
        True, experiment=experiment, tracking_uri=embedded_uri, traces=True, trace_max_spans=5
    )
    rlm_run(sink, "long", 8)
    assert sink.close(timeout=60)
    readback = Readback(embedded_uri, experiment)
    run = readback.runs()["long"]
    (trace,) = traces_of(readback.client, run)
    root = next(s for s in trace.data.spans if s.parent_id is None)
    assert len(trace.data.spans) == 1 + 5 + 1 and attribute(root, "rlm.steps_not_traced") == 3
    # the first four steps and the last one; a span says which are not traced between them
    traced = sorted(attribute(s, "rlm.step") for s in trace.data.spans if attribute(s, "rlm.step"))
    assert traced == [1, 2, 3, 4, 8]
    (gap,) = [s for s in trace.data.spans if s.name == "… 3 steps not traced"]
    assert gap.inputs == {"first_step": 5, "last_step": 7} and gap.parent_id == root.span_id
    assert len(readback.history(run, "step_reward")) == 8  # every step's metrics all the same


def test_a_503_storm_and_a_server_restart_lose_no_span_and_double_none(
    tmp_path: Path, experiment: str
) -> None:
    server = MlflowServer(tmp_path / "own")
    try:
        server.start()
        with FaultProxy(server.port) as proxy:
            sink = MLflowSink(
                True, experiment=experiment, tracking_uri=proxy.url, traces=True, retry_deadline=120
            )
            sink.on_run_start("stormy", task="t", environment="e", params={})
            for step in range(1, 21):
                sink.on_step("stormy", event=step_event(step), cumulative_reward=0.5 * step)
            assert sink.flush(timeout=60)
            proxy.fail(12, 503, retry_after=0)
            for step in range(21, 41):
                sink.on_step("stormy", event=step_event(step), cumulative_reward=0.5 * step)
            assert sink.flush(timeout=120)
            server.stop()
            for step in range(41, 61):
                sink.on_step("stormy", event=step_event(step), cumulative_reward=0.5 * step)
            server.start()
            rlm_run_end = Result(
                True,
                60,
                30.0,
                "done",
                {"total_calls": 60, "prompt_tokens": 6000, "completion_tokens": 600},
            )
            sink.on_run_end("stormy", result=rlm_run_end, run_path=None)
            assert sink.close(timeout=120)
            assert proxy.served["failed"] >= 12
        readback = Readback(server.url, experiment)
        run = readback.runs()["stormy"]
        (trace,) = traces_of(readback.client, run)
        steps = sorted(attribute(s, "rlm.step") for s in trace.data.spans if s.parent_id)
        assert steps == list(range(1, 61))  # each once: none lost, none twice
        assert trace.info.token_usage["input_tokens"] == 6000
    finally:
        server.stop()


def test_a_server_without_traces_gets_metrics_and_says_so_once(
    mlflow_server: MlflowServer, experiment: str
) -> None:
    with FaultProxy(mlflow_server.port) as proxy, capture_logs() as logs:
        proxy.missing.add("/v1/traces")  # a server without the OTLP endpoint
        sink = MLflowSink(True, experiment=experiment, tracking_uri=proxy.url, traces=True)
        rlm_run(sink, "plain", 3)
        assert sink.close(timeout=60)
    status = sink.status()
    assert status["traces"].startswith("unavailable") and status["delivered"] == 5
    assert status["dead_lettered"] == 0 and status["failed"] == 0
    said = [e for e in logs if "takes no traces" in e["event"]]
    assert len(said) == 1
    run = Readback(mlflow_server.url, experiment).runs()["plain"]
    assert run.info.status == "FINISHED" and run.data.metrics["steps"] == 3


def test_with_traces_off_nothing_changes_but_the_token_metrics(
    embedded_uri: str, experiment: str
) -> None:
    sink = MLflowSink(True, experiment=experiment, tracking_uri=embedded_uri)
    rlm_run(sink, "untraced", 3)
    assert sink.close(timeout=60)
    assert sink.status()["traces"] == "off"
    readback = Readback(embedded_uri, experiment)
    run = readback.runs()["untraced"]
    assert traces_of(readback.client, run) == []
    assert run.data.metrics["total_prompt_tokens"] == 300
    assert [m.value for m in readback.history(run, "completion_tokens")] == [10.0, 20.0, 30.0]


def test_rlm_codes_real_runner_fills_the_traces_tab(
    tmp_path: Path,
    tracking_uri: str,
    experiment: str,
    readback: Readback,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from support.scripted_rlm import RUN_COUNT, run_scripted

    import rlm_mlflow

    monkeypatch.setenv("DSPY_RLM_MLFLOW_ENABLED", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.setenv("DSPY_RLM_MLFLOW_EXPERIMENT", experiment)
    monkeypatch.setenv("DSPY_RLM_MLFLOW_TRACES", "true")
    assert rlm_mlflow.autolog()
    try:
        run_scripted(tmp_path)
        from rlm_code.rlm.observability import RLMObservability

        slot = RLMObservability.default(workdir=tmp_path, run_dir=tmp_path / "runs").get_sink(
            "mlflow"
        )
        sink = slot.shared  # rlm-code's MLflowSink class in the slot, ours behind it
        assert isinstance(sink, MLflowSink) and sink.close(timeout=60)
    finally:
        rlm_mlflow.autolog(disable=True)
    runs = readback.runs()
    assert len(runs) == RUN_COUNT
    for run in runs.values():
        (trace,) = traces_of(readback.client, run)
        steps = [s for s in trace.data.spans if attribute(s, "rlm.step") is not None]
        actions = [s.inputs["action"] for s in steps]  # the action the model chose, each step
        assert actions[-1] == "final" and "run_python" in actions
        assert all("code" in s.inputs for s in steps if s.inputs["action"] == "run_python")
        assert trace.info.token_usage["input_tokens"] > 0
        first = trace.data.spans[0].to_dict()  # a trace MLflow can serialise, unchanged
        assert json.loads(json.dumps(first, allow_nan=False)) == first


def test_a_batch_of_spans_sent_twice_to_the_embedded_store_lands_once_unchanged(
    embedded_uri: str, experiment: str
) -> None:
    # A retried (or bisected) batch is the very list the first attempt sent: the exporter
    # must not rewrite it, or the second attempt fails for good.
    import copy

    from rlm_mlflow import _spans
    from rlm_mlflow.exporters.mlflow_client import MlflowClientExporter

    client = MlflowClient(embedded_uri)
    exporter = MlflowClientExporter(client)
    exporter.experiment_id = exporter.experiment(experiment, restore=False)
    run_id = exporter.create_run("twice", 1_000, {"run_id": "twice"})
    key = "twice-key"
    span = {"name": "run_python", "inputs": {"code": "print(1)"}, "outputs": {"ok": True}}
    spans = [_spans.step_span(key, s, s, s + 0.5, 0.5, 0.5 * s, span, None) for s in (1, 2, 3)]
    spans.append(_spans.root_span(key, "twice", 0.0, 4.0, {}, {}, 0, None, True))
    sent = copy.deepcopy(spans)
    exporter.log_spans(run_id, spans, True)
    assert spans == sent  # the caller's batch is as it was
    exporter.log_spans(run_id, spans, True)  # the retry: the same list again
    assert spans == sent
    (trace,) = traces_of(client, client.get_run(run_id))
    names = sorted(s.name for s in trace.data.spans)
    assert names == ["step 1: run_python", "step 2: run_python", "step 3: run_python", "twice"]


def test_a_lone_surrogate_in_a_steps_text_is_replaced_and_its_span_lands(
    tracking_uri: str, experiment: str, readback: Readback
) -> None:
    # Bytes decoded with surrogateescape (a subprocess's output, a file name) give lone
    # surrogates, which cannot be encoded as UTF-8: the text is repaired, not the span lost.
    broken = b"caf\xff done".decode("utf-8", "surrogateescape")
    sink = MLflowSink(True, experiment=experiment, tracking_uri=tracking_uri, traces=True)
    sink.on_run_start("surrogate", task="t", environment="generic", params={})
    for step in range(1, 51):
        event = step_event(step)
        if step == 25:
            event["action"] = {"action": "run\udcff", "code": broken, "key\udcff": 1}
            event["observation"] = {"success": True, "stdout": broken, "nested": [broken]}
        sink.on_step("surrogate", event=event, cumulative_reward=0.5 * step)
    usage = {"total_calls": 50, "prompt_tokens": 5000, "completion_tokens": 500}
    sink.on_run_end("surrogate", result=Result(True, 50, 25.0, broken, usage), run_path=None)
    assert sink.close(timeout=60)
    status = sink.status()
    assert status["delivered"] == 52 and status["pending"] == 0
    assert status["dead_lettered"] == status["failed"] == status["rejected"] == 0
    (trace,) = traces_of(readback.client, readback.runs()["surrogate"])
    spans = {attribute(s, "rlm.step"): s for s in trace.data.spans if s.parent_id}
    assert sorted(spans) == list(range(1, 51))  # every step's span, the repaired one too
    repaired = spans[25]
    assert repaired.name == "step 25: run\ufffd"
    code = "```python\ncaf\ufffd done\n```"
    assert repaired.inputs == {"action": "run\ufffd", "code": code, "key\ufffd": 1}
    assert repaired.outputs["stdout"] == "```text\ncaf\ufffd done\n```"
    assert repaired.outputs["nested"] == ["caf\ufffd done"]  # a list stays a list
    root = next(s for s in trace.data.spans if s.parent_id is None)
    assert root.outputs["final_response"] == "caf\ufffd done"
