"""Real MLflow backends shared by the whole session: an embedded SQLite store, a server, and a
server with MLflow's basic-auth app."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from support.servers import AuthServer, FaultProxy, MlflowServer

from rlm_mlflow._log import RECORD_KEY, stdlib_logger


@contextlib.contextmanager
def capture_logs() -> Iterator[list[dict[str, Any]]]:
    """Our log lines, every level, as dicts (``event``, ``log_level`` and the line's pairs),
    the shape of ``structlog.testing.capture_logs``; caught on the ``rlm_mlflow`` logger."""
    entries: list[dict[str, Any]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            fields = getattr(record, RECORD_KEY, None) or {"event": record.getMessage()}
            entries.append({**fields, "log_level": record.levelname.lower()})

    handler, level = Collect(), stdlib_logger.level
    stdlib_logger.addHandler(handler)
    stdlib_logger.setLevel(logging.DEBUG)
    try:
        yield entries
    finally:
        stdlib_logger.removeHandler(handler)
        stdlib_logger.setLevel(level)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with MlflowServer(tmp_path_factory.mktemp("server")) as server:
        yield server


@pytest.fixture
def proxy(mlflow_server: MlflowServer) -> Iterator[FaultProxy]:
    """The loopback fault proxy in front of the session's server, fresh for each test."""
    with FaultProxy(mlflow_server.port) as proxy:
        yield proxy


@pytest.fixture(scope="session")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthServer]:
    """`mlflow server --app-name basic-auth`, default permission READ, admin ``server.admin``;
    tests make users and experiments of their own names on it. Its credential cache is on:
    without it every authenticated request costs the server 0.3-0.4 s of PBKDF2 here (10-45 ms
    with it); with one worker a rotated password still fails at once."""
    server = AuthServer(tmp_path_factory.mktemp("auth-server"), auth_cache_ttl=60)
    with server:
        yield server


@pytest.fixture(scope="session")
def embedded_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('embedded') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # create the schema once, not inside a test
    return uri


@pytest.fixture(params=["embedded", "server"])
def tracking_uri(request: pytest.FixtureRequest) -> str:
    """Each test that takes it runs against the embedded store and against a real server."""
    if request.param == "server":
        server: MlflowServer = request.getfixturevalue("mlflow_server")
        return server.url
    uri: str = request.getfixturevalue("embedded_uri")
    return uri


@pytest.fixture
def experiment() -> str:
    """A fresh experiment per test, so read-backs see only that test's runs."""
    return f"test-{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def autologging(
    monkeypatch: pytest.MonkeyPatch, tracking_uri: str, experiment: str, traces: bool = False
) -> Iterator[None]:
    """`rlm_mlflow.autolog()` on, configured from the variables rlm-code's users set."""
    import rlm_mlflow

    monkeypatch.setenv("DSPY_RLM_MLFLOW_ENABLED", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.setenv("DSPY_RLM_MLFLOW_EXPERIMENT", experiment)
    if traces:
        monkeypatch.setenv("DSPY_RLM_MLFLOW_TRACES", "true")
    assert rlm_mlflow.autolog() is True
    try:
        yield
    finally:
        rlm_mlflow.autolog(disable=True)


class Readback:
    """What a user would look at in MLflow, through MlflowClient."""

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        self.client = MlflowClient(tracking_uri)
        self.experiment = experiment

    def runs(self) -> dict[str, Any]:
        """Runs of the experiment by their caller-side run id (tag ``run_id``)."""
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            return {}
        runs = self.client.search_runs([exp.experiment_id], max_results=5000)
        return {run.data.tags["run_id"]: run for run in runs}

    def history(self, run: Any, key: str) -> list[Any]:
        return sorted(self.client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)

    def artifacts(self, run: Any, path: str | None = None) -> list[str]:
        return [f.path for f in self.client.list_artifacts(run.info.run_id, path)]


@pytest.fixture
def readback(tracking_uri: str, experiment: str) -> Readback:
    return Readback(tracking_uri, experiment)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    path = tmp_path / "runs"
    path.mkdir()
    return path


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Async tests run on both of anyio's backends (anyio's own pytest plugin)."""
    backend: str = request.param
    return backend
