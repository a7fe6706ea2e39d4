"""What a trace shows, made plain (pure; no mlflow): the values of spans' inputs and outputs,
a step's detail (its name, type, inputs, outputs, error, model call) from rlm-code's event.

Lists and mappings stay structures (MLflow's UI shows them as JSON), at most `MAX_KEYS`
keys or `MAX_ITEMS` items deep to `MAX_DEPTH`, the rest counted. Text is cut at a limit,
with a marker saying how much, and a character UTF-8 cannot encode (a lone surrogate)
becomes U+FFFD. MLflow's UI renders a text value as Markdown; code, a command and a step's
stdout/stderr are sent as fenced code blocks, so their lines and indentation show as they
are.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

#: What a cut text ends with (the number of characters left out follows it).
CUT_MARKER = " …[cut: {} more characters]"
_CUT_END = re.compile(r" …\[cut: \d+ more characters\]\Z")
#: Keys of one mapping kept at most (the rest are counted in ``…``).
MAX_KEYS = 32
#: Items of one list kept at most, and how deep lists and mappings are kept as structures.
MAX_ITEMS = 64
MAX_DEPTH = 4
#: rlm-code's usage keys, in the order of a plain usage (``[prompt, completion, calls]``).
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_calls")
#: Step kinds (``mlflow.spanType``): rlm-code's actions that run nothing are CHAIN steps.
CHAIN_ACTIONS = frozenset({"final", "delegate", "delegate_batch", "spawn", "plan"})
#: Inputs and outputs shown as code (fenced), with the fence's language.
CODE_KEYS = {"code": "python", "command": "bash", "stdout": "text", "stderr": "text"}
_SURROGATE = re.compile("[\ud800-\udfff]")
_FENCE = re.compile(r"\A(`{3,})[a-z]*\n")


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


def fenced(text: str, language: str) -> str:
    """``text`` as a Markdown code block (a fence longer than any run of backticks in it);
    a text fenced before (a replay) as it is."""
    if _FENCE.match(text):
        return text
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text}\n{fence}"


def plain(value: Any, limit: int, depth: int = 0) -> Any:
    """A value of an input or output: scalars as they are, text cut, lists and mappings as
    structures (bounded), anything else as its JSON text (or its repr), cut."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int) and abs(value) < 2**63:
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return cut(value, limit)
    if depth < MAX_DEPTH and isinstance(value, Mapping):
        return plain_mapping(value, limit, depth + 1)
    if depth < MAX_DEPTH and isinstance(value, (list, tuple)):
        items = [plain(item, limit, depth + 1) for item in value[:MAX_ITEMS]]
        if len(value) > MAX_ITEMS:
            items.append(f"… {len(value) - MAX_ITEMS} more items")
        return items
    try:
        text = json.dumps(value, default=repr, ensure_ascii=False)
    except Exception:
        try:
            text = repr(value)
        except Exception:
            text = f"<{type(value).__name__}>"
    return cut(text, limit)


def plain_mapping(value: Any, limit: int, depth: int = 0) -> dict[str, Any]:
    """A mapping for a span's inputs or outputs: string keys, plain values, text cut."""
    if not isinstance(value, Mapping):
        return {"value": plain(value, limit, depth)}
    out: dict[str, Any] = {}
    for n, (key, item) in enumerate(list(value.items())):
        if n == MAX_KEYS:
            out["…"] = f"{len(value) - MAX_KEYS} more keys"
            break
        out[cut(str(key), 200)] = plain(item, limit, depth)
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
    made plain: ``usage`` and, with traces, the ``span`` (`step_detail`). An extra made
    plain before (a journalled step, replayed) keeps what it holds."""
    if extra is None:
        return None
    if isinstance(extra, Mapping) and extra.keys() <= {"usage", "span"}:
        return _plain_step_extra(extra)
    if isinstance(extra, Mapping) and "step" in extra:  # the whole event: traces are on
        out: dict[str, Any] = {}
        usage = plain_usage(extra.get("usage"))
        if usage is not None:
            out["usage"] = usage
        out["span"] = step_detail(extra, limit)
        return out
    usage = plain_usage(extra)
    return {"usage": usage} if usage is not None else None


def step_detail(event: Mapping[str, Any], limit: int) -> dict[str, Any]:
    """A step's span: ``name`` (its action), ``type`` (TOOL, or CHAIN for an action that
    runs nothing), ``inputs`` (the action; code fenced), ``outputs`` (the observation),
    ``error`` (why it failed: its observation says ``success: false`` or has an error) and
    ``stacktrace`` (its stderr),
    ``llm`` (the planner's answer, when the event carries it)."""
    action, observation = event.get("action"), event.get("observation", {})
    name = action.get("action") if isinstance(action, Mapping) else None
    detail: dict[str, Any] = {
        "name": cut(str(name or "step"), 100),
        "type": "CHAIN" if name in CHAIN_ACTIONS else "TOOL",
        "inputs": _shown(action if action is not None else {}, limit),
        "outputs": _shown(observation, limit),
    }
    error = failure(observation)
    if error is not None:
        detail["error"] = cut(error, 500)
        stderr = observation.get("stderr") if isinstance(observation, Mapping) else None
        if isinstance(stderr, str) and stderr.strip():
            detail["stacktrace"] = cut(stderr, limit)
    answer = event.get("planner_raw")
    if isinstance(answer, str) and answer:
        try:
            parsed = json.loads(answer)
        except ValueError:
            parsed = None
        shown = plain(parsed, limit) if isinstance(parsed, dict) else cut(answer, limit)
        detail["llm"] = {"response": shown}
    return detail


def failure(observation: Any) -> str | None:
    """Why a step failed, from its observation: its ``error``, else the last line of its
    stderr, else "failed" when it says ``success: false``; None for a step that did not."""
    if not isinstance(observation, Mapping):
        return None
    error = observation.get("error")
    if error:
        return str(error)
    if observation.get("success") is False:
        lines = [ln for ln in str(observation.get("stderr") or "").splitlines() if ln.strip()]
        return lines[-1] if lines else "the step failed (success: false)"
    return None


def _shown(value: Any, limit: int) -> dict[str, Any]:
    """A step's action or observation: no empty (None) fields, code and output fenced."""
    if isinstance(value, Mapping):
        value = {k: v for k, v in value.items() if v is not None}
    out = plain_mapping(value, limit)
    for key, language in CODE_KEYS.items():
        text = out.get(key)
        if isinstance(text, str) and text:
            out[key] = fenced(text, language)
    return out


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
        kept = {k: span[k] for k in ("name", "inputs", "outputs")}
        kept["type"] = span.get("type") if span.get("type") in ("TOOL", "CHAIN") else "CHAIN"
        for text in ("error", "stacktrace"):
            if isinstance(span.get(text), str):
                kept[text] = span[text]
        if isinstance(span.get("llm"), Mapping) and "response" in span["llm"]:
            kept["llm"] = {"response": span["llm"]["response"]}
        out["span"] = kept
    return out or None


def start_extra(extra: Any, limit: int) -> dict[str, Any] | None:
    if not isinstance(extra, Mapping) or "task" not in extra:
        return None
    return {"task": plain(extra["task"], limit)}


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
        out["final_response"] = plain(extra["final_response"], limit)
    return out or None
