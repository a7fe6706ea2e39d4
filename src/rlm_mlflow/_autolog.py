"""`autolog()`: rlm-code's MLflow slot, filled by our sink, with no change to the user's code.

rlm-code's ``RLMObservability.default()`` builds its sinks from the environment and looks up
``MLflowSink`` by name in ``rlm_code.rlm.observability`` each time it runs. `autolog` rebinds
that name (and ``rlm_code.rlm.MLflowSink``) to `AutologSink`, a subclass of rlm-code's class
whose instances send through the sink `shared_sink` (`_shared_sink`) hands out: one of ours
per destination (tracking URI + experiment), so every runner of the process shares one
forwarder and one worker thread.

If rlm-code is not imported yet, an import hook does the rebinding the moment it is (so
`autolog` never imports rlm-code itself: ``rlm-mlflow instrument`` calls it at the start of
every Python process). Only the standard library (and `_shared_sink`, which imports nothing
else until its first call) is imported here until then.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import threading
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ._shared_sink import shared_sink as shared_sink  # the sinks `AutologSink` sends through

if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec

#: Where `AutologSink` lives; imported once rlm-code's observability module is.
SINK_MODULE = "rlm_mlflow._autolog_sink"

#: The module whose ``MLflowSink`` name ``RLMObservability.default()`` constructs.
TARGET = "rlm_code.rlm.observability"
#: The package that re-exports it (``from rlm_code.rlm import MLflowSink``).
PACKAGE = "rlm_code.rlm"
#: rlm-code's runner and benchmark manager: runs learn their runner, benchmarks become
#: parent runs (`_benchmark`).
RUNNER = "rlm_code.rlm.runner"
BENCHMARKS = "rlm_code.rlm.benchmark_manager"
MODULES = (TARGET, RUNNER, BENCHMARKS)

_lock = threading.RLock()
_enabled = False


def autolog(disable: bool = False) -> bool:
    """From now on, every ``RLMObservability.default()`` of this process gets our sink in its
    ``mlflow`` slot instead of rlm-code's, configured from the same variables
    (``DSPY_RLM_MLFLOW_ENABLED``, ``MLFLOW_TRACKING_URI``, ``DSPY_RLM_MLFLOW_EXPERIMENT``, and
    our ``DSPY_RLM_MLFLOW_*``).

    Idempotent, and safe before or after rlm-code is imported. ``disable=True`` gives the
    slot back to rlm-code's sink, its class under its names again (observabilities built
    meanwhile keep ours). Returns False, with a one-line reason in the log, when rlm-code is
    not installed; never raises.
    """
    global _enabled
    with _lock:
        if disable:
            _enabled = False
            _remove_finder()
            _unpatch()
            return True
        try:
            installed = importlib.util.find_spec("rlm_code") is not None
        except (ImportError, ValueError) as exc:  # a broken install: say so, do not raise
            _log().warning("autolog: rlm-code cannot be found", error=str(exc)[:300])
            return False
        if not installed:
            _log().warning(
                "autolog: rlm-code is not installed; nothing to instrument",
                hint="pip install rlm-code",
            )
            return False
        _enabled = True
        for name in MODULES:
            if name in sys.modules:
                _patch_module(name, sys.modules[name])
        if any(name not in sys.modules for name in MODULES):
            _install_finder()
        return True


def enabled() -> bool:
    """Whether `autolog` is in effect."""
    return _enabled


def _patch(module: ModuleType) -> None:
    """Rebind ``MLflowSink`` in rlm-code's observability module and its package (a package
    still being imported binds it itself, from the module)."""
    from ._autolog_sink import AutologSink

    for target in (module, sys.modules.get(PACKAGE)):
        if target is not None and hasattr(target, "MLflowSink"):
            target.MLflowSink = AutologSink  # type: ignore[attr-defined]


def _patch_module(name: str, module: ModuleType) -> None:
    if name == TARGET:
        _patch(module)
        return
    from . import _benchmark

    try:
        if name == RUNNER:
            _benchmark.patch_runner(module)
        elif name == BENCHMARKS:
            _benchmark.patch(module)
    except Exception as exc:  # another rlm-code version: runs still go to MLflow, as runs
        _log().warning("autolog: rlm-code's benchmarks are not instrumented", error=repr(exc))


def _unpatch() -> None:
    """rlm-code's own classes and functions again (the one `AutologSink` extends)."""
    from . import _benchmark

    if RUNNER in sys.modules:
        _benchmark.unpatch_runner(sys.modules[RUNNER])
    if BENCHMARKS in sys.modules:
        _benchmark.unpatch(sys.modules[BENCHMARKS])
    sink_module = sys.modules.get(SINK_MODULE)
    if sink_module is None:  # never patched
        return
    ours = sink_module.AutologSink
    rlm_codes: type = ours.__bases__[0]
    for name in (TARGET, PACKAGE):
        target = sys.modules.get(name)
        if target is not None and getattr(target, "MLflowSink", None) is ours:
            target.MLflowSink = rlm_codes  # type: ignore[attr-defined]


class _PatchingLoader(importlib.abc.Loader):
    """rlm-code's own loader, then `_patch` on the module it made."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        with _lock:
            if all(name in sys.modules for name in MODULES):
                _remove_finder()
            if _enabled:
                _patch_module(module.__name__, module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... for tools
        return getattr(self._inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Waits for rlm-code's modules (`MODULES`) and wraps their loaders."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname not in MODULES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


_finder = _Finder()


def _install_finder() -> None:
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def _remove_finder() -> None:
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)


def _log() -> Any:
    from ._log import log

    return log
