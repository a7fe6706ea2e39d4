"""rlm-mlflow: forward RLM benchmark runs to MLflow, asynchronously and in batches."""

from ._settings import Settings
from ._sink import DEFAULT_EXPERIMENT, MLflowSink

__all__ = ["DEFAULT_EXPERIMENT", "MLflowSink", "Settings"]
