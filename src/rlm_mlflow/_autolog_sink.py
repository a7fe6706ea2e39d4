"""`AutologSink`: what rlm-code's ``MLflowSink`` name is bound to while `autolog` is on.

A subclass of rlm-code's own ``MLflowSink``, so ``isinstance`` and subclassing keep working,
with its constructor ``(enabled, experiment, tracking_uri)`` and its attributes (``name``,
``enabled``, ``experiment``, ``tracking_uri``, ``status()``, the hooks). Every instance
forwards to ``shared``: the one `rlm_mlflow.MLflowSink` of its destination (tracking URI +
experiment) that `shared_sink` hands out, so a hundred runners still make one worker thread.
rlm-code's ``__init__`` is never called: its ``__post_init__`` would import mlflow and set
the process's global tracking URI.

Imported by `_autolog` once rlm-code's observability module is, never before.
"""

from __future__ import annotations

import contextlib
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlm_code.rlm.observability import MLflowSink as RLMCodeSink

from ._bench_run import current
from ._redact import redact_uri
from ._shared_sink import shared_sink

if TYPE_CHECKING:  # imported by the first shared_sink call, not by rlm-code's import
    from ._sink import MLflowSink

#: The hooks an instance takes straight from its shared sink, unless its class overrides them
#: (the start and end of a run read the runner: its model, the benchmark case it runs).
HOOKS = ("on_step",)


class AutologSink(RLMCodeSink):
    """rlm-code's ``MLflowSink``, sending through this destination's shared forwarder.

    Anything else of the forwarder (``flush``, ``close``, ``aflush``, ``aclose``,
    ``closed``, ...) is ``shared``'s, reached through the instance.
    """

    shared: MLflowSink
    _runner: weakref.ref[Any] | None = None  # the runner whose observability holds this sink

    def __init__(self, enabled: bool, experiment: str, tracking_uri: str | None = None) -> None:
        self.shared = shared_sink(enabled, experiment, tracking_uri)
        self.enabled = enabled
        self.experiment = self.shared.experiment  # rlm-code's default for an empty one
        self.tracking_uri = tracking_uri
        self.name = "mlflow"
        cls = type(self)
        for hook in HOOKS:
            # The shared sink's bound hook on the instance: the hot path gains no call. A
            # subclass's own hook stays in place (its super() call forwards, below).
            if getattr(cls, hook) is getattr(AutologSink, hook):
                setattr(self, hook, getattr(self.shared, hook))

    def bind(self, runner: Any) -> None:
        """The runner this sink reports for (set when the runner is built)."""
        self._runner = weakref.ref(runner)

    def on_run_start(
        self, run_id: str, *, task: str, environment: str, params: dict[str, Any]
    ) -> None:
        """The run, with the connector's model and provider as params (rlm-code's runner
        never passes them) and, in a benchmark, its tags and its case's place under it."""
        runner = self._runner() if self._runner is not None else None
        if runner is None:
            self.shared.on_run_start(run_id, task=task, environment=environment, params=params)
            return
        with contextlib.suppress(Exception):  # an odd connector: the run goes without its model
            params = _with_model(params, getattr(runner, "llm_connector", None))
        tags: dict[str, str] = {}
        parent = None
        bench = current(runner)
        if bench is not None:
            tags = {"rlm.benchmark_id": bench.id}
            case = bench.case
            if case is not None and case.run_id is None and not _has_parent(params):
                case.run_id, tags, parent = run_id, case.tags, bench.id
        self.shared._start(
            run_id, task=task, environment=environment, params=params, tags=tags, parent=parent
        )

    def on_step(self, run_id: str, *, event: dict[str, Any], cumulative_reward: float) -> None:
        self.shared.on_step(run_id, event=event, cumulative_reward=cumulative_reward)

    def on_run_end(self, run_id: str, *, result: Any, run_path: Path | str | None) -> None:
        """A benchmark case's run ends with its case (`_bench_run`), to carry the case's
        answer_match and duration; every other run at once."""
        bench = current(self._runner() if self._runner is not None else None)
        case = bench.case if bench is not None else None
        if case is not None and run_id == case.run_id:
            case.held_end = (result, run_path)
            return
        self.shared.on_run_end(run_id, result=result, run_path=run_path)

    def status(self) -> dict[str, Any]:
        return dict(self.shared.status())  # rlm-code's sink's type: a plain dict

    def __getattr__(self, name: str) -> Any:
        """What rlm-code's class does not have: the shared sink's (only called when the
        ordinary lookup fails, so never for the hooks)."""
        shared = self.__dict__.get("shared")
        if shared is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(shared, name)

    # rlm-code's dataclass methods read its private fields, which an instance never gets.
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(enabled={self.enabled!r}, experiment={self.experiment!r},"
            f" tracking_uri={redact_uri(self.tracking_uri)!r})"
        )


def _with_model(params: Any, connector: Any) -> Any:
    """``params`` with the connector's ``model`` and ``provider`` (those it has, unless the
    params name them already)."""
    model = getattr(connector, "current_model", None)
    if model is None or not isinstance(params, dict) or "model" in params:
        return params
    out = {**params, "model": model}
    provider = getattr(connector, "model_type", None)
    if provider is not None and "provider" not in out:
        out["provider"] = provider
    return out


def _has_parent(params: Any) -> bool:
    return isinstance(params, dict) and params.get("parent_run_id") is not None
