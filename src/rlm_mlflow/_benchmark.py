"""rlm-code's benchmarks under autolog: each ``run_benchmark`` one parent MLflow run, each of its
cases a run nested under it, in rlm-code's native, harness and direct-LLM modes alike.

`patch` wraps ``BenchmarkManagerMixin.run_benchmark`` and its three per-case runners when
rlm-code's benchmark module is imported, and pins the benchmark id rlm-code draws (one
``datetime.now()`` in that module) so that the parent run carries it from its start. While a
benchmark runs, its runner holds a `Benchmark` (``runner._rlm_mlflow_benchmark``,
`_bench_run`); the runner's `AutologSink` reads it in its hooks: a case's run gets the case's
tags and the parent, and its end waits for the case to finish (to carry ``answer_match`` and
the duration). A case whose mode never calls the sinks, or that fails before its run starts,
gets a run of ours. What the parent and the cases carry comes from rlm-code's own records
(`_bench_summary`); it goes through the shared sink like every run: asynchronous, batched,
retried, spooled, counted. rlm-code's return values, files and timings are unchanged, and a
failure of ours is logged, never raised into the benchmark.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import time
from collections.abc import Callable
from datetime import datetime, timezone
from types import ModuleType
from typing import TYPE_CHECKING, Any

from . import _bench_summary as summary
from ._bench_run import BENCH_ATTR, Benchmark, Case
from ._log import log

if TYPE_CHECKING:
    from ._sink import MLflowSink

CASE_RUNNERS = {
    "_run_benchmark_case_native": "native",
    "_run_benchmark_case_harness": "harness",
    "_run_benchmark_case_direct_llm": "direct-llm",
}
_PIN: contextvars.ContextVar[datetime | None] = contextvars.ContextVar("bench_now", default=None)


class PinnedDatetime(datetime):
    """rlm-code's benchmark module's ``datetime``: ``now()`` is the instant our parent run
    was named after, inside a benchmark we wrap; the real one everywhere else."""

    @classmethod
    def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
        pinned = _PIN.get()
        return pinned if pinned is not None and tz is not None else datetime.now(tz)


def patch(module: ModuleType) -> None:
    """Wrap rlm-code's benchmark manager (``rlm_code.rlm.benchmark_manager``); idempotent."""
    mixin = module.BenchmarkManagerMixin
    if getattr(mixin.run_benchmark, "__rlm_mlflow__", False):
        return
    setattr(module, "datetime", PinnedDatetime)  # noqa: B010 (a module's name)
    mixin.run_benchmark = _wrap_benchmark(mixin.run_benchmark)
    for name, mode in CASE_RUNNERS.items():
        if hasattr(mixin, name):
            setattr(mixin, name, _wrap_case(getattr(mixin, name), mode))


def patch_runner(module: ModuleType) -> None:
    """Wrap ``RLMRunner.__init__`` (``rlm_code.rlm.runner``): its sinks of ours learn their
    runner (its connector's model, the benchmark it runs); idempotent."""
    runner = module.RLMRunner
    if getattr(runner.__init__, "__rlm_mlflow__", False):
        return
    original = runner.__init__

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        from ._autolog_sink import AutologSink

        for sink in getattr(getattr(self, "observability", None), "sinks", None) or ():
            if isinstance(sink, AutologSink):
                sink.bind(self)

    __init__.__rlm_mlflow__ = True  # type: ignore[attr-defined]
    runner.__init__ = __init__


def unpatch_runner(module: ModuleType) -> None:
    init = module.RLMRunner.__init__
    if getattr(init, "__rlm_mlflow__", False):
        module.RLMRunner.__init__ = init.__wrapped__


def unpatch(module: ModuleType) -> None:
    mixin = module.BenchmarkManagerMixin
    for name in ("run_benchmark", *CASE_RUNNERS):
        wrapped = getattr(mixin, name, None)
        if getattr(wrapped, "__rlm_mlflow__", False):
            setattr(mixin, name, wrapped.__wrapped__)  # type: ignore[union-attr]
    if getattr(module, "datetime", None) is PinnedDatetime:
        setattr(module, "datetime", datetime)  # noqa: B010


def _wrap_benchmark(original: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def run_benchmark(self: Any, *args: Any, **kwargs: Any) -> Any:
        sink = _our_sink(self)
        if sink is None or getattr(self, BENCH_ATTR, None) is not None:
            return original(self, *args, **kwargs)
        now = datetime.now(timezone.utc)
        bench = None
        try:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            call = {k: v for k, v in bound.arguments.items() if k != "self"}
            bench = Benchmark(now.strftime("bench_%Y%m%d_%H%M%S_%f"), sink, _config(self, call))
            bench.start(call)
        except Exception as exc:  # ours: the benchmark runs as without us
            log.exception("benchmark not instrumented", error=repr(exc)[:300])
            bench = None
        if bench is None:
            return original(self, *args, **kwargs)
        token = _PIN.set(now)
        setattr(self, BENCH_ATTR, bench)
        try:
            result = original(self, *args, **kwargs)
        except BaseException as exc:
            _safely(bench.end, None, exc)
            raise
        finally:
            _PIN.reset(token)
            setattr(self, BENCH_ATTR, None)
        _safely(bench.end, result, None)
        return result

    run_benchmark.__rlm_mlflow__ = True  # type: ignore[attr-defined]
    return run_benchmark


def _wrap_case(original: Callable[..., Any], mode: str) -> Callable[..., Any]:
    @functools.wraps(original)
    def run_case(self: Any, *args: Any, **kwargs: Any) -> Any:
        bench: Benchmark | None = getattr(self, BENCH_ATTR, None)
        case = kwargs.get("case", args[0] if args else None)
        if bench is None or case is None:
            return original(self, *args, **kwargs)
        current = Case(case, mode, time.time(), summary.case_tags(bench.id, case))
        bench.case = current
        try:
            payload = original(self, *args, **kwargs)
        except BaseException as exc:
            bench.case = None
            _safely(bench.end_case, current, None, exc)
            raise
        bench.case = None
        _safely(bench.end_case, current, payload, None)
        return payload

    run_case.__rlm_mlflow__ = True  # type: ignore[attr-defined]
    return run_case


def _our_sink(runner: Any) -> MLflowSink | None:
    """The runner's sink of ours (an `AutologSink` among its observability's sinks), if on."""
    from ._autolog_sink import AutologSink

    for sink in getattr(getattr(runner, "observability", None), "sinks", None) or ():
        if isinstance(sink, AutologSink) and sink.shared.enabled and not sink.shared.closed:
            return sink.shared
    return None


def _config(runner: Any, call: dict[str, Any]) -> dict[str, Any]:
    """The agent's configuration: the connector's model, and the call's settings."""
    connector = getattr(runner, "llm_connector", None)
    return {
        "model": getattr(connector, "current_model", None),
        "provider": getattr(connector, "model_type", None),
        "environment": call.get("environment"),
        "framework": call.get("framework"),
        "branch_width": call.get("branch_width"),
        "sub_model": call.get("sub_model"),
        "preset": call.get("preset"),
        "mode": call.get("mode"),
    }


def _safely(fn: Callable[..., None], *args: Any) -> None:
    try:
        fn(*args)
    except Exception as exc:  # ours must never cost the benchmark
        log.exception("benchmark instrumentation failed", error=repr(exc)[:300])
