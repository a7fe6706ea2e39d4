from __future__ import annotations

import pytest

from rlm_mlflow import MLflowSink, Settings


def test_every_setting_has_an_env_var_and_explicit_overrides_win() -> None:
    env = {
        "DSPY_RLM_MLFLOW_QUEUE_SIZE": "5000",
        "DSPY_RLM_MLFLOW_FLUSH_INTERVAL": "0.25",
        "DSPY_RLM_MLFLOW_BATCH_SIZE": "200",
        "DSPY_RLM_MLFLOW_MAX_IN_FLIGHT": "",
    }
    settings = Settings.from_env(env, batch_size=500)
    assert settings.queue_size == 5000
    assert settings.flush_interval == 0.25
    assert settings.batch_size == 500
    assert settings.max_in_flight == Settings().max_in_flight  # empty means unset


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DSPY_RLM_MLFLOW_QUEUE_SIZE": "-1"}, "queue_size (env DSPY_RLM_MLFLOW_QUEUE_SIZE)"),
        ({"DSPY_RLM_MLFLOW_QUEUE_SIZE": "lots"}, "DSPY_RLM_MLFLOW_QUEUE_SIZE='lots'"),
        ({"DSPY_RLM_MLFLOW_BATCH_SIZE": "5000"}, "MLflow's limit"),
        ({"DSPY_RLM_MLFLOW_FLUSH_INTERVAL": "0"}, "flush_interval"),
    ],
)
def test_a_bad_value_names_the_setting_and_its_env_var(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Settings.from_env(env)


def test_from_env_reads_the_seeds_variables() -> None:
    sink = MLflowSink.from_env(
        {
            "DSPY_RLM_MLFLOW_ENABLED": "false",
            "DSPY_RLM_MLFLOW_EXPERIMENT": "my-exp",
            "MLFLOW_TRACKING_URI": "http://127.0.0.1:1",
            "DSPY_RLM_MLFLOW_QUEUE_SIZE": "64",
        }
    )
    assert (sink.enabled, sink.experiment, sink.tracking_uri) == (
        False,
        "my-exp",
        "http://127.0.0.1:1",
    )
    assert sink.settings.queue_size == 64


def test_a_disabled_sink_has_the_seeds_status_and_ignores_hooks() -> None:
    sink = MLflowSink.from_env({})
    assert sink.status() == {
        "name": "mlflow",
        "enabled": False,
        "available": False,
        "detail": "disabled",
        "experiment": "rlm-code-rlm",
    }
    sink.on_run_start("r", task="t", environment="e", params={})
    sink.on_step("r", event={"step": 0, "reward": 1.0}, cumulative_reward=1.0)
    sink.on_run_end("r", result=None, run_path=None)
    assert sink.flush() and sink.close()


def test_status_never_shows_the_password_of_the_tracking_uri() -> None:
    sink = MLflowSink(
        True, tracking_uri="postgresql://user:s3cret@127.0.0.1:1/mlflow", retry_deadline=1
    )
    try:
        assert "s3cret" not in repr(sink.status())
        assert sink.status()["detail"] == "postgresql://user:***@127.0.0.1:1/mlflow"
    finally:
        sink.close(timeout=0.1)
