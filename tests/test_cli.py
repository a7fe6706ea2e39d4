from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
        [CLI, "status"], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(done.stdout) == {
        "name": "mlflow",
        "enabled": False,
        "available": False,
        "detail": "disabled",
        "experiment": "e1",
    }
