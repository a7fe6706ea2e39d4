"""Traces a user can read in MLflow's UI, read back through MlflowClient from the embedded
store and a real server: the trace list's own columns (name, user, session, run), span types
and a failed step's status, code and lists as they were, the model call, rewards as feedback,
a recursive run's traces one filter apart."""

from __future__ import annotations

import json
import threading
from typing import Any

from conftest import Readback
from support.trajectories import Result, attribute, step_event, traces_of

from rlm_mlflow import MLflowSink

CODE = "def f(x):\n    '''Signature.__doc__'''\n    return x * 2\n\nprint(f(21))"


def traced_run(
    sink: MLflowSink, run_id: str, parent: str | None = None, children: Any = None
) -> None:
    """A run of four steps: delegates (when ``children``), runs code, fails, finishes; each
    step with the planner's answer, as rlm-code's runner sends it."""
    params = {"depth": 0 if parent is None else 1, "parent_run_id": parent, "model": "m/x"}
    task = f"Find the answer for {run_id}\nsecond line of the task"
    sink.on_run_start(run_id, task=task, environment="generic", params=params)
    events = [step_event(s) for s in (1, 2, 3, 4)]
    events[0]["action"] = {"action": "delegate_batch", "tasks": ["a", "b"], "code": None}
    events[1]["action"]["code"] = CODE
    events[1]["observation"] = {"success": True, "stdout": "42\n", "results": [1, {"k": [2]}]}
    events[2]["observation"] = {
        "success": False,
        "stdout": "",
        "stderr": "Traceback (most recent call last):\nAssertionError: 6 * 7 != 36",
    }
    events[3]["action"] = {"action": "final", "final_response": "42"}
    for event in events:
        event["planner_raw"] = json.dumps({"action": event["action"]["action"]})
    total = 0.0
    for event in events:
        if event["step"] == 1 and children is not None:
            children()
        total += event["reward"]
        sink.on_step(run_id, event=event, cumulative_reward=total)
    usage = {"total_calls": 4, "prompt_tokens": 400, "completion_tokens": 40}
    sink.on_run_end(run_id, result=Result(True, 4, total, "42", usage), run_path=None)


def recursive(sink: MLflowSink) -> None:
    def children() -> None:
        threads = [
            threading.Thread(target=traced_run, args=(sink, f"root.{i}", "root")) for i in (0, 1)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    traced_run(sink, "root", children=children)


def test_the_trace_list_columns_are_filled_and_a_child_is_one_filter_away(
    tracking_uri: str, experiment: str, readback: Readback
) -> None:
    sink = MLflowSink(True, experiment=experiment, tracking_uri=tracking_uri, traces=True)
    recursive(sink)
    assert sink.close(timeout=60) and sink.status()["pending"] == 0
    runs = readback.runs()
    traces = {name: traces_of(readback.client, run)[0] for name, run in runs.items()}
    assert sorted(traces) == ["root", "root.0", "root.1"]
    root = traces["root"]
    for name, trace in traces.items():
        info = trace.info
        assert info.trace_metadata["mlflow.sourceRun"] == runs[name].info.run_id  # Run name
        assert info.tags["mlflow.traceName"] == f"generic: Find the answer for {name}"
        assert info.trace_metadata["mlflow.trace.session"] == "root"  # one session
        assert info.trace_metadata.get("mlflow.trace.user")  # User
        assert info.trace_metadata.get("mlflow.source.name")  # Source
        assert info.tags["rlm.run_id"] == name
        assert info.tags["rlm.root_trace"] == root.info.trace_id
        assert info.request_preview.startswith("Find the answer for")
        assert info.response_preview == "42"
    assert "rlm.parent_trace" not in root.info.tags
    children = readback.client.search_traces(
        [runs["root"].info.experiment_id],
        filter_string=f"tags.`rlm.parent_trace` = '{root.info.trace_id}'",
    )
    assert sorted(t.info.tags["rlm.run_id"] for t in children) == ["root.0", "root.1"]
    session = readback.client.search_traces(
        [runs["root"].info.experiment_id],
        filter_string="metadata.`mlflow.trace.session` = 'root'",
    )
    assert len(session) == 3
    # the delegating step links each child's trace (a Markdown link the UI follows)
    delegating = next(s for s in root.data.spans if attribute(s, "rlm.step") == 1)
    links = delegating.outputs["child_traces"]
    for child in ("root.0", "root.1"):
        assert f"[{child}](#/experiments/" in links
        assert f"selectedEvaluationId={traces[child].info.trace_id})" in links


def test_spans_say_what_happened_and_show_code_and_lists_as_they_are(
    tracking_uri: str, experiment: str, readback: Readback
) -> None:
    sink = MLflowSink(True, experiment=experiment, tracking_uri=tracking_uri, traces=True)
    traced_run(sink, "one")
    assert sink.close(timeout=60)
    (trace,) = traces_of(readback.client, readback.runs()["one"])
    spans = trace.data.spans
    (root,) = [s for s in spans if s.parent_id is None]
    steps = {attribute(s, "rlm.step"): s for s in spans if attribute(s, "rlm.step") is not None}
    assert root.span_type == "AGENT"
    assert [steps[n].span_type for n in (1, 2, 3, 4)] == ["CHAIN", "TOOL", "TOOL", "CHAIN"]
    assert [steps[n].name for n in (1, 2, 3, 4)] == [
        "step 1: delegate_batch",
        "step 2: run_python",
        "step 3: run_python",
        "step 4: final",
    ]
    # the failed step stands out: ERROR, with the error as its message
    failed = steps[3]
    assert failed.status.status_code.value == "ERROR"
    assert failed.status.description == "AssertionError: 6 * 7 != 36"
    (exception,) = failed.events  # OpenTelemetry's exception event: the UI's error section
    assert exception.name == "exception"
    assert exception.attributes["exception.type"] == "AssertionError"
    assert exception.attributes["exception.message"] == "6 * 7 != 36"
    assert exception.attributes["exception.stacktrace"].startswith("Traceback")
    assert all(steps[n].status.status_code.value == "OK" for n in (1, 2, 4))
    # code as a code block, its lines and indentation kept; lists and dicts as structures
    assert steps[2].inputs["code"] == f"```python\n{CODE}\n```"
    assert steps[2].outputs["results"] == [1, {"k": [2]}]
    assert steps[1].inputs["tasks"] == ["a", "b"] and "code" not in steps[1].inputs
    assert attribute(steps[2], "rlm.reward") == 0.5
    assert attribute(steps[2], "rlm.cumulative_reward") == 1.0
    # the model call: an LLM span under each step, with the run's model and the usage
    calls = [s for s in spans if s.span_type == "LLM"]
    assert len(calls) == 4 and {c.parent_id for c in calls} == {s.span_id for s in steps.values()}
    call = next(c for c in calls if c.parent_id == steps[2].span_id)
    assert call.outputs == {"response": {"action": "run_python"}}
    assert (
        call.inputs == {"connector_model": "m/x", "step": 2}
        and attribute(call, "rlm.model") == "m/x"
    )
    assert trace.info.token_usage == {"input_tokens": 400, "output_tokens": 40, "total_tokens": 440}


def test_each_trace_carries_its_score_as_code_feedback(
    tracking_uri: str, experiment: str, readback: Readback
) -> None:
    sink = MLflowSink(True, experiment=experiment, tracking_uri=tracking_uri, traces=True)
    traced_run(sink, "scored")
    assert sink.close(timeout=60) and sink.status()["failed"] == 0
    (trace,) = traces_of(readback.client, readback.runs()["scored"])
    by_name = {a.name: a for a in trace.info.assessments}
    assert sorted(by_name) == ["completed", "steps", "total_reward"]
    assert by_name["total_reward"].value == 2.0 and isinstance(by_name["total_reward"].value, float)
    assert by_name["completed"].value is True and by_name["steps"].value == 4
    assert all(a.source.source_type == "CODE" for a in by_name.values())
    # traces sort by total_reward
    found = readback.client.search_traces(
        [trace.info.experiment_id], filter_string="feedback.`total_reward` > 1.5"
    )
    assert [t.info.trace_id for t in found] == [trace.info.trace_id]


def test_beyond_the_span_cap_the_first_and_last_steps_and_a_gap(
    tracking_uri: str, experiment: str, readback: Readback
) -> None:
    sink = MLflowSink(
        True, experiment=experiment, tracking_uri=tracking_uri, traces=True, trace_max_spans=8
    )
    sink.on_run_start("long", task="t", environment="generic", params={})
    for step in range(1, 101):
        sink.on_step("long", event=step_event(step), cumulative_reward=0.5 * step)
    usage = {"total_calls": 100, "prompt_tokens": 10_000, "completion_tokens": 1_000}
    sink.on_run_end("long", result=Result(True, 100, 50.0, "done", usage), run_path=None)
    assert sink.close(timeout=60) and sink.status()["delivered"] == 102
    run = readback.runs()["long"]
    (trace,) = traces_of(readback.client, run)
    steps = sorted(attribute(s, "rlm.step") for s in trace.data.spans if attribute(s, "rlm.step"))
    assert steps == [1, 2, 3, 4, 5, 6, 99, 100]  # 8 - 8 // 4 first, 8 // 4 last
    (gap,) = [s for s in trace.data.spans if s.name == "… 92 steps not traced"]
    assert gap.inputs == {"first_step": 7, "last_step": 98}
    root = next(s for s in trace.data.spans if s.parent_id is None)
    assert attribute(root, "rlm.steps_not_traced") == 92
    assert len(readback.history(run, "step_reward")) == 100  # every step's metrics
