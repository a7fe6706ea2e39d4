"""RLM runs as rlm-code's runner drives a sink (steps with action, observation and usage),
and their traces as a user reads them back (MlflowClient.search_traces, get_trace)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlflow import MlflowClient

from rlm_mlflow import MLflowSink


def step_event(
    step: int, code: str = "print(1)", prompt: int = 100, completion: int = 10
) -> dict[str, Any]:
    return {
        "step": step,
        "action": {"action": "run_python", "code": code, "rationale": f"try {step}"},
        "observation": {"success": True, "stdout": f"out {step}"},
        "reward": 0.5,
        "usage": {"total_calls": 1, "prompt_tokens": prompt, "completion_tokens": completion},
    }


@dataclass
class Result:
    """The result rlm-code's runner hands on_run_end (the attributes the sink reads); a
    result without ``final_response`` or ``usage_summary`` leaves them None, as the sink
    reads an absent one."""

    completed: bool
    steps: int
    total_reward: float
    final_response: str | None = None
    usage_summary: dict[str, int] | None = None


def rlm_run(
    sink: MLflowSink,
    run_id: str,
    steps: int,
    *,
    code: str = "print(1)",
    parent: str | None = None,
    children: Any = None,
) -> None:
    """A run as rlm-code's runner drives a sink: start, steps (the first one delegates to
    ``children`` when given), end with usage_summary and final_response."""
    params = {"depth": 0 if parent is None else 1, "parent_run_id": parent}
    sink.on_run_start(run_id, task=f"task of {run_id}", environment="generic", params=params)
    total = 0.0
    for step in range(1, steps + 1):
        if step == 1 and children is not None:
            children()
        total += 0.5
        sink.on_step(run_id, event=step_event(step, code), cumulative_reward=total)
    usage = {"total_calls": steps, "prompt_tokens": 100 * steps, "completion_tokens": 10 * steps}
    sink.on_run_end(
        run_id, result=Result(True, steps, total, f"answer of {run_id}", usage), run_path=None
    )


def traces_of(client: MlflowClient, run: Any) -> list[Any]:
    found = client.search_traces(
        experiment_ids=[run.info.experiment_id], run_id=run.info.run_id, max_results=50
    )
    return [client.get_trace(t.info.trace_id) for t in found]


def attribute(span: Any, key: str) -> Any:
    return span.attributes.get(key)
