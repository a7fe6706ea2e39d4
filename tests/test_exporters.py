"""The exporters' calls, against real stores and read back through MlflowClient."""

from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient
from support.servers import MlflowServer

from rlm_mlflow._exporter import connect
from rlm_mlflow._settings import Settings


def test_a_file_through_the_servers_artifact_proxy_lands_and_is_a_delivery(
    tmp_path: Path, experiment: str
) -> None:
    # MLflow 3's `mlflow server` serves artifacts (mlflow-artifacts:/ run roots); 3.17's
    # artifact router answers an upload 200 with no body, which is its success.
    root = tmp_path / "served"
    args = ["--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "served-artifacts")]  # fmt: skip
    trajectory = tmp_path / "run.jsonl"
    trajectory.write_text('{"step": 1}\n')
    with MlflowServer(root, store_args=args) as server:
        exporter = connect(server.url, experiment, Settings())
        run_id = exporter.create_run("proxied", 1_000, {"run_id": "proxied"})
        assert (
            MlflowClient(server.url)
            .get_run(run_id)
            .info.artifact_uri.startswith("mlflow-artifacts:/")
        )
        exporter.log_path(run_id, str(trajectory))  # raised Misconfigured before
        files = [f.path for f in MlflowClient(server.url).list_artifacts(run_id)]
    assert files == ["run.jsonl"]
