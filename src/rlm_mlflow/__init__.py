"""rlm-mlflow: forward RLM benchmark runs to MLflow, asynchronously and in batches.

The names below are imported on first use: ``rlm-mlflow instrument`` imports this package at
the start of every Python process it runs, and most of those never touch a sink.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._autolog import autolog

if TYPE_CHECKING:
    from ._settings import DEFAULT_EXPERIMENT, Settings
    from ._sink import MLflowSink

__all__ = ["DEFAULT_EXPERIMENT", "MLflowSink", "Settings", "autolog"]


def __getattr__(name: str) -> Any:
    if name == "MLflowSink":
        from ._sink import MLflowSink

        return MLflowSink
    if name in ("DEFAULT_EXPERIMENT", "Settings"):
        from . import _settings

        return getattr(_settings, name)
    raise AttributeError(f"module 'rlm_mlflow' has no attribute {name!r}")
