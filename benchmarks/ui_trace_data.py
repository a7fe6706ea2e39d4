"""Traces of N steps each (rlm-code-shaped events: code, observation, the planner's answer,
usage), one run per N, through our sink with the span cap off, to the server
MLFLOW_TRACKING_URI names. Prints, as JSON, {N: trace id}. Run by `ui_trace_open.py`."""

from __future__ import annotations

import json
import os
import sys

from mlflow import MlflowClient

from rlm_mlflow import MLflowSink


def event(step: int) -> dict[str, object]:
    code = f"rows = [i * {step} for i in range(10)]\nfor r in rows:\n    print(r)"
    return {
        "step": step,
        "action": {"action": "run_python", "code": code, "rationale": f"step {step}"},
        "observation": {"success": step % 7 != 0, "stdout": "0\n1\n2\n", "stderr": ""},
        "planner_raw": json.dumps({"action": "run_python", "code": code}),
        "reward": 0.5,
        "usage": {"total_calls": 1, "prompt_tokens": 100, "completion_tokens": 10},
    }


def main() -> None:
    sizes = [int(n) for n in sys.argv[1:]]
    experiment = os.environ["DSPY_RLM_MLFLOW_EXPERIMENT"]
    sink = MLflowSink(True, experiment=experiment, traces=True, trace_max_spans=max(sizes) + 1)
    for n in sizes:
        run = f"steps-{n}"
        sink.on_run_start(run, task=f"a trace of {n} steps", environment="generic", params={})
        for step in range(1, n + 1):
            sink.on_step(run, event=event(step), cumulative_reward=0.5 * step)
        sink.on_run_end(run, result=None, run_path=None)
    assert sink.close(timeout=300)
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    ids = {}
    for n in sizes:
        (trace,) = client.search_traces(
            [exp.experiment_id], filter_string=f"tags.`rlm.run_id` = 'steps-{n}'"
        )
        ids[n] = trace.info.trace_id
    print(json.dumps({"experiment_id": exp.experiment_id, "traces": ids}))


if __name__ == "__main__":
    main()
