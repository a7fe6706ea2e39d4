"""The seed's three ways to run the tracking server, started as the seed writes them (on
127.0.0.1 and a free port), each read back through the server's REST API; and many producer
processes against one server on PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.servers import MlflowServer, scratch_postgres_database

from rlm_mlflow import MLflowSink


@pytest.fixture
def postgres_db() -> Iterator[str]:
    with scratch_postgres_database() as uri:
        yield uri


def rest(server: MlflowServer, endpoint: str, **query: Any) -> dict[str, Any]:
    url = f"{server.url}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=30) as response:
        body: dict[str, Any] = json.loads(response.read())
        return body


def log_one_run(server: MlflowServer, experiment: str, run_dir: Path, steps: int = 300) -> None:
    trajectory = run_dir / "backend-run.jsonl"
    trajectory.write_text('{"step": 0}\n')
    with MLflowSink(True, experiment=experiment, tracking_uri=server.url) as sink:
        sink.on_run_start(
            "backend-run",
            task="Create a DSPy signature",
            environment="dspy",
            params={"model": "m", "max_steps": steps},
        )
        for step in range(steps):
            sink.on_step(
                "backend-run",
                event={"step": step, "reward": 0.25},
                cumulative_reward=0.25 * (step + 1),
            )
        sink.on_run_end(
            "backend-run",
            result={"completed": True, "steps": steps, "total_reward": 0.25 * steps},
            run_path=trajectory,
        )


def assert_read_back_over_rest(server: MlflowServer, experiment: str, steps: int = 300) -> None:
    exp = rest(server, "experiments/get-by-name", experiment_name=experiment)["experiment"]
    found = json.loads(
        urllib.request.urlopen(
            urllib.request.Request(
                f"{server.url}/api/2.0/mlflow/runs/search",
                method="POST",
                headers={"Content-Type": "application/json"},
                data=json.dumps({"experiment_ids": [exp["experiment_id"]]}).encode(),
            ),
            timeout=30,
        ).read()
    )
    (run,) = found["runs"]
    run_id = run["info"]["run_id"]
    assert run["info"]["status"] == "FINISHED"
    assert run["info"]["run_name"] == "backend-run"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params == {
        "model": "m",
        "max_steps": str(steps),
        "environment": "dspy",
        "task_chars": "23",
    }
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["run_id"] == "backend-run" and tags["component"] == "rlm-code-rlm"
    for key in ("step_reward", "cumulative_reward"):
        history = rest(
            server, "metrics/get-history", run_id=run_id, metric_key=key, max_results=25000
        )["metrics"]
        assert sorted(int(m.get("step", 0)) for m in history) == list(range(steps))
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert metrics["completed"] == 1.0 and metrics["steps"] == steps
    files = rest(server, "artifacts/list", run_id=run_id).get("files", [])
    assert [f["path"] for f in files] == ["backend-run.jsonl"]


def test_local_default_backend(tmp_path: Path) -> None:
    """`mlflow server --host ... --port ...`: the server's own default store."""
    with MlflowServer(tmp_path / "default", store_args=[]) as server:
        log_one_run(server, "backend-default", tmp_path)
        assert_read_back_over_rest(server, "backend-default")
    assert (tmp_path / "default" / "mlflow.db").exists()  # MLflow 3's default: SQLite in cwd


def test_sqlite_backend_with_an_artifact_root(tmp_path: Path) -> None:
    root = tmp_path / "sqlite"
    args = [
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--default-artifact-root",
        str(root / "mlflow-artifacts"),
    ]
    with MlflowServer(root, store_args=args) as server:
        log_one_run(server, "backend-sqlite", tmp_path)
        assert_read_back_over_rest(server, "backend-sqlite")
    assert list((root / "mlflow-artifacts").rglob("backend-run.jsonl"))


def test_postgresql_backend_with_served_artifacts(tmp_path: Path, postgres_db: str) -> None:
    """The seed's production setup, with a served artifact destination standing in for S3."""
    root = tmp_path / "pg"
    args = [
        "--backend-store-uri",
        postgres_db,
        "--artifacts-destination",
        str(root / "served-artifacts"),
    ]
    with MlflowServer(root, store_args=args) as server:
        log_one_run(server, "backend-postgres", tmp_path)
        assert_read_back_over_rest(server, "backend-postgres")
    assert list((root / "served-artifacts").rglob("backend-run.jsonl"))


PRODUCER = """
import sys, threading
from rlm_mlflow import MLflowSink
producer, uri, experiment, steps = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
sink = MLflowSink(True, experiment=experiment, tracking_uri=uri)

def run(run_id, parent=None, child=None):
    sink.on_run_start(run_id, task="scale", environment="scale",
                      params={"producer": producer, "parent_run_id": parent})
    if child is not None:
        child.start()  # a recursive child runs while its parent is open
    total = 0.0
    for step in range(steps):
        total += 0.5
        sink.on_step(run_id, event={"step": step, "reward": 0.5}, cumulative_reward=total)
    if child is not None:
        child.join()
    sink.on_run_end(run_id, result={"completed": True, "steps": steps, "total_reward": total},
                    run_path=None)

def root(r):
    run_id = f"p{producer}-r{r}"
    child = threading.Thread(target=run, args=(run_id + "-child", run_id)) if r < 2 else None
    run(run_id, child=child)

# 6 root runs in parallel threads, 2 of them with a child: 8 concurrent runs.
threads = [threading.Thread(target=root, args=(r,)) for r in range(6)]
for t in threads: t.start()
for t in threads: t.join()
print("CLOSED", sink.close(timeout=600), sink.status()["delivered"], flush=True)
"""


def test_4_processes_of_8_runs_each_against_one_postgresql_server(
    tmp_path: Path, postgres_db: str
) -> None:
    steps, experiment = 5_000, "scale"
    root = tmp_path / "scale"
    args = [
        "--backend-store-uri",
        postgres_db,
        "--artifacts-destination",
        str(root / "served-artifacts"),
    ]
    with MlflowServer(root, store_args=args, workers=4) as server:
        producers = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    textwrap.dedent(PRODUCER),
                    str(p),
                    server.url,
                    experiment,
                    str(steps),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for p in range(4)
        ]
        outputs = [p.communicate(timeout=600) for p in producers]
        for (out, err), producer in zip(outputs, producers, strict=True):
            assert producer.returncode == 0, err[-2000:]
            assert f"CLOSED True {8 * (steps + 2)}" in out, err[-2000:]

        from mlflow import MlflowClient

        client = MlflowClient(server.url)
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id], max_results=1000)
        assert len(runs) == 4 * 8
        by_id = {r.info.run_id: r for r in runs}
        for run in runs:
            assert run.info.status == "FINISHED", run.data.tags["run_id"]
            for key in ("step_reward", "cumulative_reward"):
                history = client.get_metric_history(run.info.run_id, key)
                assert sorted(m.step for m in history) == list(range(steps))
            name = run.data.tags["run_id"]
            if name.endswith("-child"):
                parent = by_id[run.data.tags["mlflow.parentRunId"]]
                assert parent.data.tags["run_id"] == name.removesuffix("-child")
