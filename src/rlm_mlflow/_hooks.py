"""`Hooks`: `MLflowSink`'s hooks, the hot path: rlm-code's three, and those of runs that carry
more than rlm-code's sink logs (benchmarks, imports).

Each builds one event from its arguments, taken as they are or as far as they can be read,
and puts it in the buffer. They never raise, never touch the network or the disk, and never
import mlflow; an argument that cannot be read is counted and logged (`_hook_failed`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from time import time
from typing import Any
from uuid import uuid4

from ._event import RunEnd, RunStart, Step
from ._limits import show
from ._log import log
from ._settings import Settings


class Hooks:
    """The hooks of `MLflowSink`, which sets what they read (the buffer is None until a
    forwarder starts, and for a sink that does nothing)."""

    settings: Settings
    _buffer: Any  # the forwarder's buffer: the hooks' one attribute lookup

    # -- rlm-code's hooks --------------------------------------------------------------------

    def on_run_start(
        self, run_id: str, *, task: str, environment: str, params: dict[str, Any]
    ) -> None:
        buffer = self._buffer
        if buffer is None:
            return
        try:  # a run's start is never dropped for room: its whole run hangs on it
            extra = {"task": task} if self.settings.traces else None
            buffer.put_boundary(
                RunStart(
                    run_id, time(), environment, _chars(task), _copy(params), uuid4().hex, extra
                )
            )
        except Exception as exc:
            self._hook_failed("on_run_start", run_id, exc)

    def on_step(self, run_id: str, *, event: dict[str, Any], cumulative_reward: float) -> None:
        buffer = self._buffer
        if buffer is None:
            return
        try:  # tuple.__new__ straight: the NamedTuple's own __new__ is one more Python call
            get = event.get
            fields = (run_id, get("step"), get("reward"), cumulative_reward, time(), get("usage"))
            buffer.put(_new(Step, fields))
        except Exception as exc:
            self._hook_failed("on_step", run_id, exc)

    def _on_step_traced(
        self, run_id: str, *, event: dict[str, Any], cumulative_reward: float
    ) -> None:
        """`on_step` with traces on: a shallow copy of the whole event (action, observation,
        usage) goes with the step; the worker makes a span of it."""
        buffer = self._buffer
        if buffer is None:
            return
        try:
            fields = (run_id, event.get("step"), event.get("reward"), cumulative_reward, time())
            buffer.put(_new(Step, (*fields, dict(event))))
        except Exception as exc:
            self._hook_failed("on_step", run_id, exc)

    def on_run_end(self, run_id: str, *, result: Any, run_path: Path | str | None) -> None:
        buffer = self._buffer
        if buffer is None:
            return
        try:  # never dropped for room either: the run would stay RUNNING
            extra = {"usage_summary": _field(result, "usage_summary", None)}
            if self.settings.traces:
                extra["final_response"] = _field(result, "final_response", None)
            buffer.put_boundary(
                RunEnd(
                    run_id,
                    time(),
                    _field(result, "completed", False),
                    _field(result, "steps", 0),
                    _field(result, "total_reward", 0.0),
                    run_path,
                    "FINISHED",
                    extra,
                )
            )
        except Exception as exc:
            self._hook_failed("on_run_end", run_id, exc)

    # -- runs that carry more than rlm-code's sink logs (benchmarks, imports) -----------------

    def _start(
        self,
        run_id: str,
        *,
        task: Any,
        environment: str,
        params: dict[str, Any],
        tags: dict[str, str] | None = None,
        parent: str | None = None,
        name: str | None = None,
        at: float | None = None,
    ) -> None:
        """`on_run_start` with what `_extras` describes: extra tags, a parent run (by its
        run id), a name, and a start time other than now (an imported run's)."""
        buffer = self._buffer
        if buffer is None:
            return
        extra: dict[str, Any] = {"tags": dict(tags or {})}
        if self.settings.traces:
            extra["task"] = task
        if parent is not None:
            extra["parent"] = parent
        if name is not None:
            extra["name"] = name
        try:
            start = RunStart(
                run_id,
                time() if at is None else at,
                environment,
                _chars(task),
                _copy(params),
                uuid4().hex,
                extra,
            )
            buffer.put_boundary(start)
        except Exception as exc:
            self._hook_failed("on_run_start", run_id, exc)

    def _step(
        self, run_id: str, *, event: dict[str, Any], cumulative_reward: float, at: float
    ) -> None:
        """`on_step` at a time other than now (an imported step's): the same event, the
        usage (or with traces the whole event) with it."""
        buffer = self._buffer
        if buffer is None:
            return
        try:
            get = event.get
            extra = dict(event) if self.settings.traces else get("usage")
            fields = (run_id, get("step"), get("reward"), cumulative_reward, at, extra)
            buffer.put(_new(Step, fields))
        except Exception as exc:
            self._hook_failed("on_step", run_id, exc)

    def _end(
        self,
        run_id: str,
        *,
        result: Any,
        run_path: Path | str | None = None,
        status: str = "FINISHED",
        at: float | None = None,
        **extras: Any,
    ) -> None:
        """`on_run_end` with a status (FAILED, KILLED) and what `_extras` describes
        (``metrics``, ``tags``, ``artifacts``, ``table``, ``model``, ``assessments``); a
        ``result`` of None: a run with no RLM summary of its own (a benchmark)."""
        buffer = self._buffer
        if buffer is None:
            return
        try:
            extra = {"usage_summary": _field(result, "usage_summary", None), **extras}
            if self.settings.traces:
                extra["final_response"] = _field(result, "final_response", None)
            if result is None:
                extra["summary"] = False
            end = RunEnd(
                run_id,
                time() if at is None else at,
                _field(result, "completed", False),
                _field(result, "steps", 0),
                _field(result, "total_reward", 0.0),
                run_path,
                status,
                extra,
            )
            buffer.put_boundary(end)
        except Exception as exc:
            self._hook_failed("on_run_end", run_id, exc)

    def _hook_failed(self, hook: str, run_id: Any, exc: Exception) -> None:
        buffer = self._buffer
        if buffer is not None:
            buffer.outcomes.hook_failed()
        try:
            detail = str(exc)[:200]
        except Exception:  # an exception that cannot print itself
            detail = "?"
        shown = run_id[:200] if isinstance(run_id, str) else show(run_id)
        key = (shown, hook, type(exc).__name__)
        logged = _hook_errors_logged
        if key in logged:  # said once per run, hook and kind of error; counted every time
            return
        if len(logged) < 10_000:
            logged.add(key)
        log.warning(
            "hook input rejected; further ones of this run, hook and error are only counted",
            hook=hook,
            run_id=shown,
            error=f"{type(exc).__name__}: {detail}",
        )


_new = tuple.__new__
#: (run id, hook, error type) of the hook failures already logged, in this process.
_hook_errors_logged: set[tuple[str, str, str]] = set()


def _field(result: Any, name: str, default: Any) -> Any:
    """rlm-code's sink reads the result's attributes; a mapping works too. A result that cannot be
    read gives None (the worker then leaves that summary value out, and says so)."""
    try:
        if isinstance(result, Mapping):
            return result.get(name, default)
        return getattr(result, name, default)
    except Exception:
        return None


def _chars(task: Any) -> int | None:
    """``len(task)``, rlm-code's ``task_chars``; None when it has no length."""
    try:
        return len(task)
    except Exception:
        return None


def _copy(params: Any) -> Any:
    """A shallow copy taken in the hook (the caller may change its dict afterwards); what
    cannot be copied goes as it is, and the worker says it is not a mapping."""
    try:
        return dict(params)
    except Exception:
        return params
