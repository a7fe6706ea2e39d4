from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

CLI = str(Path(sys.executable).with_name("rlm-mlflow"))


def test_run_drives_a_recursive_benchmark_into_the_default_local_store(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run(
        [
            CLI,
            "run",
            "--task",
            "Create a DSPy signature",
            "--environment",
            "dspy",
            "--steps",
            "300",
            "--runs",
            "2",
            "--depth",
            "1",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in done.stdout
    assert (tmp_path / "mlflow.db").exists()

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rlm-code-rlm")
    runs = {r.data.tags["run_id"]: r for r in client.search_runs([exp.experiment_id])}
    assert len(runs) == 6  # two roots, each with two children
    by_mlflow_id = {r.info.run_id: name for name, r in runs.items()}
    for name, run in runs.items():
        assert run.info.status == "FINISHED"
        steps = 300 if run.data.params["depth"] == "0" else 150
        history = client.get_metric_history(run.info.run_id, "step_reward")
        assert sorted(m.step for m in history) == list(range(steps))
        if run.data.params["depth"] == "1":
            assert by_mlflow_id[run.data.tags["mlflow.parentRunId"]] == name.rsplit(".", 1)[0]
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == [f"{name}.jsonl"]
    trajectory = (tmp_path / "rlm-runs" / f"{name}.jsonl").read_text().splitlines()
    assert json.loads(trajectory[0])["step"] == 0


def test_status_prints_the_sinks_status_as_configured_by_the_environment() -> None:
    env = {**os.environ, "DSPY_RLM_MLFLOW_ENABLED": "0", "DSPY_RLM_MLFLOW_EXPERIMENT": "e1"}
    done = subprocess.run(
        [CLI, "status", "--json"], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(done.stdout) == {
        "name": "mlflow",
        "enabled": False,
        "available": False,
        "detail": "disabled",
        "experiment": "e1",
    }


def test_status_reads_as_a_table_by_default() -> None:
    env = {**os.environ, "DSPY_RLM_MLFLOW_ENABLED": "0"}
    done = subprocess.run(
        [CLI, "status"], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    rows = dict(line.split(None, 1) for line in done.stdout.splitlines())
    assert rows["name"] == "mlflow" and rows["detail"] == "disabled"


@pytest.mark.parametrize(
    ("argv", "env", "code", "message"),
    [
        (
            ["--queue-size", "-5"],
            {},
            2,
            "bad setting: queue_size (env DSPY_RLM_MLFLOW_QUEUE_SIZE) must be a positive number",
        ),
        (
            [],
            {"DSPY_RLM_MLFLOW_WHEN_FULL": "explode"},
            2,
            "bad setting: when_full (env DSPY_RLM_MLFLOW_WHEN_FULL) must be one of",
        ),
        (["--tracking-uri", "ftp://example"], {}, 2, "unsupported tracking URI 'ftp://example'"),
        (
            ["--tracking-uri", "http://u:hunter22@127.0.0.1:9"],
            {},
            3,
            "cannot reach the tracking server at http://u:***@127.0.0.1:9",
        ),
    ],
)
def test_run_fails_in_one_clear_line_with_an_exit_code(
    tmp_path: Path, argv: list[str], env: dict[str, str], code: int, message: str
) -> None:
    done = subprocess.run(
        [CLI, "run", "--task", "t", "--environment", "e", "--steps", "10", *argv],
        cwd=tmp_path,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == code
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("rlm-mlflow: ") and message in line
    assert "hunter22" not in done.stderr


def test_every_setting_is_a_flag_whose_help_names_its_variable_and_default() -> None:
    done = subprocess.run(
        [CLI, "run", "--help"], capture_output=True, text=True, timeout=60, check=True
    )
    text = " ".join(done.stdout.split())
    for flag, env, default in [
        ("--queue-size", "DSPY_RLM_MLFLOW_QUEUE_SIZE", "100000"),
        ("--when-full", "DSPY_RLM_MLFLOW_WHEN_FULL", "'block'"),
        ("--max-in-flight", "DSPY_RLM_MLFLOW_MAX_IN_FLIGHT", "4"),
    ]:
        assert flag in text
        assert f"env {env}, default {default}" in text
