"""The trajectory as an MLflow trace: pure functions from events to OTLP spans. No mlflow here.

Each RLM run is one trace (its id derived from the run's start key, so a retry or a replay
sends the very same spans): a root AGENT span for the run (inputs: task, environment, params;
outputs: final response, completed, total reward) and one span per step, TOOL for a step that
runs something, CHAIN for one that does not (final, delegate), named after its step and action
(inputs: the action, code fenced; outputs: the observation; attributes: step, reward,
cumulative reward). A failed step (its observation says ``success: false`` or has an error)
has the status ERROR with the error as its message. When the event carries the planner's
answer, an LLM span under the step holds it, the step's token usage in MLflow's own
``mlflow.chat.tokenUsage`` (which MLflow adds up into the trace's totals) and the run's model
(``model`` param) in its inputs as ``connector_model``;
without it the usage is on the step's span. Times are the events' own: a step's span runs from
the event before it to its own. The values are made plain by `_span_text`.

A trace holds at most ``max_spans`` step spans: the first ones and the last ones, and between
them a span that says how many steps are not traced (`gap_span`).

A child RLM run is a trace of its own, linked to its own MLflow run; the step that delegated
it names the children's runs and traces (``rlm.child_runs``, ``rlm.child_traces``, and links
to their traces in its outputs), and each child names its parent and its root. On the root
span, what MLflow makes trace-level: tags (``mlflow.traceTag.*``: the trace name, the run's id,
its parent's and root's traces), the session (the root RLM run's id: a recursive run's traces
are one session) and the user.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from ._span_text import cut

Span = dict[str, Any]  # one span in OTLP/JSON form
TAG = "mlflow.traceTag."
#: OTLP status codes.
OK, ERROR = 1, 2


def trace_id(key: str) -> str:
    """32 hex digits, the same for the same run start (its key), whoever sends it."""
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


def span_id(key: str, part: str | int) -> str:
    return hashlib.blake2b(f"{key}/{part}".encode(), digest_size=8).hexdigest()


def mlflow_trace_id(key: str) -> str:
    """The id MLflow gives the trace (``tr-`` and the OTLP trace id)."""
    return "tr-" + trace_id(key)


def trace_link(experiment_id: str, key: str) -> str:
    """The UI's address of a trace, relative to the page it is shown on (a Markdown link in
    a span's outputs: MLflow's UI follows it)."""
    return f"#/experiments/{experiment_id}/traces?selectedEvaluationId={mlflow_trace_id(key)}"


def _ns(seconds: float) -> str:
    return str(int(seconds * 1_000_000_000))


def value(item: Any) -> dict[str, Any]:
    """An OTLP AnyValue of a plain value (MLflow stores it as the JSON of that value)."""
    if isinstance(item, bool):
        return {"boolValue": item}
    if isinstance(item, int):
        return {"intValue": str(item)}
    if isinstance(item, float):
        return {"doubleValue": item}
    if isinstance(item, Mapping):
        return {"kvlistValue": {"values": attributes(item)}}
    if isinstance(item, (list, tuple)):
        return {"arrayValue": {"values": [value(v) for v in item]}}
    return {"stringValue": "" if item is None else str(item)}


def attributes(items: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [{"key": k, "value": value(v)} for k, v in items.items() if v is not None]


def _usage(usage: Sequence[int]) -> dict[str, int]:
    prompt, completion, _ = usage
    return {
        "input_tokens": prompt,
        "output_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _span(
    key: str, part: str | int, parent: str | int, name: str, start: float, end: float
) -> Span:
    return {
        "traceId": trace_id(key),
        "spanId": span_id(key, part),
        "parentSpanId": span_id(key, parent),
        "name": name,
        "kind": 1,
        "startTimeUnixNano": _ns(min(start, end)),
        "endTimeUnixNano": _ns(end),
        "status": {"code": OK},
    }


def step_spans(
    key: str,
    step: int,
    start: float,
    end: float,
    reward: float,
    cumulative: float,
    detail: Mapping[str, Any],
    usage: Sequence[int] | None,
    children: Sequence[tuple[str, str]] = (),
    model: str | None = None,
    experiment_id: str | None = None,
) -> list[Span]:
    """One step's span, a child of its run's span (and its LLM span under it, when the step
    carries the planner's answer). ``children``: (run id, start key) of the child runs this
    step delegated to; ``model``: the run's model (its ``model`` param)."""
    outputs = dict(detail.get("outputs", {}))
    attrs: dict[str, Any] = {
        "mlflow.spanType": detail.get("type", "CHAIN"),
        "mlflow.spanInputs": detail.get("inputs", {}),
        "rlm.step": step,
        "rlm.reward": reward,
        "rlm.cumulative_reward": cumulative,
    }
    if children:
        attrs["rlm.child_runs"] = [run for run, _ in children]
        attrs["rlm.child_traces"] = [mlflow_trace_id(k) for _, k in children]
        if experiment_id is not None:
            outputs["child_traces"] = "\n".join(
                f"- [{cut(run, 200)}]({trace_link(experiment_id, k)})" for run, k in children
            )
    attrs["mlflow.spanOutputs"] = outputs
    llm = detail.get("llm")
    if usage is not None and llm is None:
        attrs["mlflow.chat.tokenUsage"] = _usage(usage)
    span = _span(key, step, "root", f"step {step}: {detail.get('name', 'step')}", start, end)
    span["attributes"] = attributes(attrs)
    if detail.get("error") is not None:
        span["status"] = {"code": ERROR, "message": str(detail["error"])}
        span["events"] = [exception_event(str(detail["error"]), detail.get("stacktrace"), end)]
    if llm is None:
        return [span]
    call = _span(key, f"{step}/llm", step, "planner", start, end)
    call["attributes"] = attributes(
        {
            "mlflow.spanType": "LLM",
            "mlflow.spanInputs": {"connector_model": model, "step": step},
            "mlflow.spanOutputs": {"response": llm.get("response")},
            "mlflow.chat.tokenUsage": _usage(usage) if usage is not None else None,
            # not mlflow.llm.model nor an input "model": with either MLflow prices the call
            # through litellm, which downloads its price list from GitHub (on a local store,
            # in the host's process)
            "rlm.model": model,
        }
    )
    return [span, call]


def exception_event(error: str, stacktrace: Any, at: float) -> dict[str, Any]:
    """OpenTelemetry's exception event: MLflow's UI shows a span that has one as failed, with
    its type, message and stack trace."""
    name, _, rest = error.partition(":")
    named = name.isidentifier() and (bool(rest) or name.endswith(("Error", "Exception")))
    kind = name if named else "StepFailed"
    return {
        "timeUnixNano": _ns(at),
        "name": "exception",
        "attributes": attributes(
            {
                "exception.type": kind,
                "exception.message": (rest.strip() or error) if named else error,
                "exception.stacktrace": stacktrace if isinstance(stacktrace, str) else None,
            }
        ),
    }


def gap_span(key: str, first: int, last: int, count: int, start: float, end: float) -> Span:
    """Where a trace's steps are not traced (beyond its span cap): how many, which."""
    span = _span(key, "gap", "root", f"… {count} steps not traced", start, end)
    span["attributes"] = attributes(
        {
            "mlflow.spanType": "UNKNOWN",
            "mlflow.spanInputs": {"first_step": first, "last_step": last},
            "mlflow.spanOutputs": {"steps_not_traced": count},
            "rlm.steps_not_traced": count,
        }
    )
    return span


def root_span(
    key: str,
    run_id: str,
    start: float,
    end: float,
    inputs: Mapping[str, Any],
    outputs: Mapping[str, Any],
    untraced: int,
    parent: tuple[str, str] | None,
    ok: bool,
    *,
    root: tuple[str, str] | None = None,
    user: str | None = None,
) -> Span:
    """The run's span, sent at its end. ``parent`` and ``root``: (run id, start key) of the
    parent run and of the recursion's root run (None: this run is the root)."""
    root_run, root_key = root if root is not None else (run_id, key)
    attrs: dict[str, Any] = {
        "mlflow.spanType": "AGENT",
        "mlflow.spanInputs": inputs,
        "mlflow.spanOutputs": outputs,
        f"{TAG}mlflow.traceName": trace_name(run_id, inputs),
        f"{TAG}rlm.run_id": run_id,
        f"{TAG}rlm.root_trace": mlflow_trace_id(root_key),
        "session.id": cut(root_run, 250),
        "user.id": user,
    }
    if untraced:
        attrs["rlm.steps_not_traced"] = untraced
    if parent is not None:
        attrs["rlm.parent_run"] = parent[0]
        attrs["rlm.parent_trace"] = attrs[f"{TAG}rlm.parent_trace"] = mlflow_trace_id(parent[1])
    return {
        "traceId": trace_id(key),
        "spanId": span_id(key, "root"),
        "name": run_id,
        "kind": 1,
        "startTimeUnixNano": _ns(start),
        "endTimeUnixNano": _ns(max(start, end)),
        "attributes": attributes(attrs),
        "status": {"code": OK if ok else ERROR},
    }


def trace_name(run_id: str, inputs: Mapping[str, Any]) -> str:
    """A name a person can tell apart in the trace list: the environment and the start of the
    task's first line, else the run's id."""
    task = inputs.get("task")
    if not isinstance(task, str) or not task.strip():
        return cut(run_id, 250)
    line = task.strip().splitlines()[0]
    text = line if len(line) <= 80 else line[:79] + "…"
    environment = inputs.get("environment")
    return cut(f"{environment}: {text}" if environment else text, 250)


def otlp_request(spans: Sequence[Span]) -> dict[str, Any]:
    """An OTLP/JSON ExportTraceServiceRequest of ``spans`` (what ``/v1/traces`` takes)."""
    return {
        "resourceSpans": [
            {
                "resource": {"attributes": attributes({"service.name": "rlm-mlflow"})},
                "scopeSpans": [{"scope": {"name": "rlm-mlflow"}, "spans": list(spans)}],
            }
        ]
    }


def step_span(*args: Any, **kwargs: Any) -> Span:
    """The step's own span of `step_spans` (without its LLM span)."""
    return step_spans(*args, **kwargs)[0]
