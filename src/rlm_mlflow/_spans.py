"""The trajectory as an MLflow trace: pure functions from events to OTLP spans. No mlflow here.

Each RLM run is one trace (its id derived from the run's start key, so a retry or a replay
sends the very same spans): a root span for the run (inputs: task, environment, params;
outputs: final response, completed, total reward) and one child span per step (inputs: the
action and its code; outputs: the observation; attributes: step, reward, cumulative reward,
and the step's token usage in MLflow's own ``mlflow.chat.tokenUsage``, which MLflow adds up
into the trace's totals). Times are the events' own: a step's span runs from the event before
it to its own. Text is cut at a limit, with a marker saying how much, and a character UTF-8
cannot encode (a lone surrogate) becomes U+FFFD; a trace holds at most
``max_spans`` step spans, later steps are counted on the root span.

A child RLM run is a trace of its own, linked to its own MLflow run; the step that delegated
it names the children's runs and traces (``rlm.child_runs``, ``rlm.child_traces``), and each
child names its parent (``rlm.parent_run``, ``rlm.parent_trace``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

#: What a cut text ends with (the number of characters left out follows it).
CUT_MARKER = " …[cut: {} more characters]"
_CUT_END = re.compile(r" …\[cut: \d+ more characters\]\Z")
#: Keys of one input or output mapping kept at most (the rest are counted in ``…``).
MAX_KEYS = 32
#: rlm-code's usage keys, in the order of a plain usage (``[prompt, completion, calls]``).
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_calls")

Span = dict[str, Any]  # one span in OTLP/JSON form
#: A code point UTF-8 cannot encode: a surrogate (e.g. from bytes decoded ``surrogateescape``).
_SURROGATE = re.compile("[\ud800-\udfff]")


def cut(text: str, limit: int) -> str:
    """``text`` cut at ``limit`` characters (with a marker), and storable: every text of a
    span passes here. A text cut before (a journalled event replayed) is not cut again."""
    if len(text) > limit:
        marker = _CUT_END.search(text)
        if marker is None or marker.start() > limit:
            text = text[:limit] + CUT_MARKER.format(len(text) - limit)
    return storable(text)


def storable(text: str) -> str:
    """``text`` with each surrogate replaced by U+FFFD: MLflow's stores (and JSON over HTTP)
    refuse them, and a span is not lost for one character. Text that encodes (the common
    case, checked first, cheaply) is returned as it is."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text


def _text(value: Any, limit: int) -> str | int | float | bool | None:
    """A value of an input or output: scalars as they are, text cut, anything else as JSON
    text (or its repr), cut."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**63:
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return cut(value, limit)
    try:
        text = json.dumps(value, default=repr, ensure_ascii=False)
    except Exception:
        try:
            text = repr(value)
        except Exception:
            text = f"<{type(value).__name__}>"
    return cut(text, limit)


def plain_mapping(value: Any, limit: int) -> dict[str, Any]:
    """A mapping for a span's inputs or outputs: string keys, plain values, text cut."""
    if not isinstance(value, Mapping):
        return {"value": _text(value, limit)}
    out: dict[str, Any] = {}
    for n, (key, item) in enumerate(list(value.items())):
        if n == MAX_KEYS:
            out["…"] = f"{len(value) - MAX_KEYS} more keys"
            break
        out[cut(str(key), 200)] = _text(item, limit)
    return out


def plain_usage(value: Any) -> list[int] | None:
    """rlm-code's usage (``prompt_tokens``, ``completion_tokens``, ``total_calls``) as
    ``[prompt, completion, calls]``; None when there is none."""
    if not isinstance(value, Mapping):
        return None
    numbers = []
    for key in USAGE_KEYS:
        item = value.get(key, 0)
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not item >= 0:
            return None
        numbers.append(int(item) if math.isfinite(item) else 0)
    return numbers if any(numbers) else None


def journalled_usage(value: Any) -> list[int] | None:
    """A usage made plain before (``[prompt, completion, calls]``), checked again."""
    if not isinstance(value, list) or len(value) != len(USAGE_KEYS):
        return None
    return plain_usage(dict(zip(USAGE_KEYS, value, strict=True)))


def step_extra(extra: Any, limit: int) -> dict[str, Any] | None:
    """A step's extra as the hook took it (the usage, or with traces a copy of the event)
    made plain: ``usage`` and, with traces, the ``span``'s name, inputs and outputs. An extra
    made plain before (a journalled step, replayed) keeps what it holds."""
    if extra is None:
        return None
    if isinstance(extra, Mapping) and extra.keys() <= {"usage", "span"}:
        return _plain_step_extra(extra)
    if isinstance(extra, Mapping) and "step" in extra:  # the whole event: traces are on
        out: dict[str, Any] = {}
        usage = plain_usage(extra.get("usage"))
        if usage is not None:
            out["usage"] = usage
        action = extra.get("action")
        name = action.get("action") if isinstance(action, Mapping) else None
        out["span"] = {
            "name": cut(str(name or "step"), 100),
            "inputs": plain_mapping(action if action is not None else {}, limit),
            "outputs": plain_mapping(extra.get("observation", {}), limit),
        }
        return out
    usage = plain_usage(extra)
    return {"usage": usage} if usage is not None else None


def _plain_step_extra(extra: Mapping[str, Any]) -> dict[str, Any] | None:
    """The parts of a journalled step's extra that still have their plain shape."""
    out: dict[str, Any] = {}
    usage = journalled_usage(extra.get("usage"))
    if usage is not None:
        out["usage"] = usage
    span = extra.get("span")
    if (
        isinstance(span, Mapping)
        and isinstance(span.get("name"), str)
        and isinstance(span.get("inputs"), Mapping)
        and isinstance(span.get("outputs"), Mapping)
    ):
        out["span"] = {k: span[k] for k in ("name", "inputs", "outputs")}
    return out or None


def start_extra(extra: Any, limit: int) -> dict[str, Any] | None:
    if not isinstance(extra, Mapping) or "task" not in extra:
        return None
    return {"task": _text(extra["task"], limit)}


def end_extra(extra: Any, limit: int) -> dict[str, Any] | None:
    if not isinstance(extra, Mapping):
        return None
    out: dict[str, Any] = {}
    usage = plain_usage(extra.get("usage_summary"))
    if usage is None:  # made plain before: a journalled end, replayed
        usage = journalled_usage(extra.get("usage"))
    if usage is not None:
        out["usage"] = usage
    if extra.get("final_response") is not None:
        out["final_response"] = _text(extra["final_response"], limit)
    return out or None


# -- spans -----------------------------------------------------------------------------------


def trace_id(key: str) -> str:
    """32 hex digits, the same for the same run start (its key), whoever sends it."""
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


def span_id(key: str, part: str | int) -> str:
    return hashlib.blake2b(f"{key}/{part}".encode(), digest_size=8).hexdigest()


def mlflow_trace_id(key: str) -> str:
    """The id MLflow gives the trace (``tr-`` and the OTLP trace id)."""
    return "tr-" + trace_id(key)


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


def step_span(
    key: str,
    step: int,
    start: float,
    end: float,
    reward: float,
    cumulative: float,
    span: Mapping[str, Any],
    usage: Sequence[int] | None,
    children: Sequence[tuple[str, str]] = (),
) -> Span:
    """One step's span, a child of its run's span. ``children``: (run id, start key) of the
    child runs this step delegated to."""
    attrs: dict[str, Any] = {
        "mlflow.spanType": "CHAIN",
        "mlflow.spanInputs": span.get("inputs", {}),
        "mlflow.spanOutputs": span.get("outputs", {}),
        "rlm.step": step,
        "rlm.reward": reward,
        "rlm.cumulative_reward": cumulative,
    }
    if usage is not None:
        prompt, completion, _ = usage
        attrs["mlflow.chat.tokenUsage"] = {
            "input_tokens": prompt,
            "output_tokens": completion,
            "total_tokens": prompt + completion,
        }
    if children:
        attrs["rlm.child_runs"] = [run for run, _ in children]
        attrs["rlm.child_traces"] = [mlflow_trace_id(k) for _, k in children]
    return {
        "traceId": trace_id(key),
        "spanId": span_id(key, step),
        "parentSpanId": span_id(key, "root"),
        "name": f"step {step}: {span.get('name', 'step')}",
        "kind": 1,
        "startTimeUnixNano": _ns(min(start, end)),
        "endTimeUnixNano": _ns(end),
        "attributes": attributes(attrs),
        "status": {"code": 1},
    }


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
) -> Span:
    """The run's span, sent at its end. ``parent``: (run id, start key) of the parent run."""
    attrs: dict[str, Any] = {
        "mlflow.spanType": "AGENT",
        "mlflow.spanInputs": inputs,
        "mlflow.spanOutputs": outputs,
        "mlflow.traceTag.rlm.run_id": run_id,
    }
    if untraced:
        attrs["rlm.steps_not_traced"] = untraced
    if parent is not None:
        attrs["rlm.parent_run"] = parent[0]
        attrs["rlm.parent_trace"] = mlflow_trace_id(parent[1])
    return {
        "traceId": trace_id(key),
        "spanId": span_id(key, "root"),
        "name": run_id,
        "kind": 1,
        "startTimeUnixNano": _ns(start),
        "endTimeUnixNano": _ns(max(start, end)),
        "attributes": attributes(attrs),
        "status": {"code": 1 if ok else 2},
    }


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
