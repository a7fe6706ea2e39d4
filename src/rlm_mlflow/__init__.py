"""rlm-mlflow: forward RLM benchmark runs to MLflow, asynchronously and in batches."""

from ._settings import DEFAULT_EXPERIMENT, Settings
from ._sink import MLflowSink

__all__ = ["DEFAULT_EXPERIMENT", "MLflowSink", "Settings"]
