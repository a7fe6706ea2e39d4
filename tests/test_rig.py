"""Self-tests of the rig for the deployments users actually have (issue 16): the basic-auth
server. Each test proves the
rig does what its docstring says, with a plain ``requests`` client or ``MlflowClient``; none
involves the sink."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from support.servers import (
    AuthServer,
    FaultProxy,
    MlflowServer,
)

LOG_BATCH = "/api/2.0/mlflow/runs/log-batch"
SEARCH = "/api/2.0/mlflow/experiments/search"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def one_metric(run_id: str, step: int = 0) -> dict[str, object]:
    return {
        "run_id": run_id,
        "metrics": [{"key": "rig", "value": 1.0, "timestamp": 1_700_000_000_000, "step": step}],
    }


@pytest.fixture
def proxy(mlflow_server: MlflowServer) -> Iterator[FaultProxy]:
    with FaultProxy(mlflow_server.port) as proxy:
        yield proxy


@pytest.fixture
def server_run(mlflow_server: MlflowServer) -> str:
    """A run on the plain server, for log-batch requests that MLflow accepts."""
    client = MlflowClient(mlflow_server.url)
    experiment_id = client.create_experiment(unique("rig"))
    run_id: str = client.create_run(experiment_id).info.run_id
    return run_id


# -- the auth server --------------------------------------------------------------------------


def admin_run(server: AuthServer) -> tuple[str, str, str]:
    """An experiment the admin owns and a run in it: (name, id, run id)."""
    name = unique("auth")
    experiment_id = server.create_experiment(name)
    status, body = server.call(
        "POST", "/api/2.0/mlflow/runs/create", {"experiment_id": experiment_id}
    )
    assert status == 200, body
    return name, experiment_id, json.loads(body)["run"]["info"]["run_id"]


def test_auth_server_refuses_a_wrong_password_and_a_read_only_log_batch_until_granted(
    auth_server: AuthServer,
) -> None:
    user, password = unique("reader"), "reader-password-1"
    auth_server.create_user(user, password)
    name, experiment_id, run_id = admin_run(auth_server)
    url = auth_server.url

    health = requests.get(url + "/health", timeout=10)  # public: how start() knows it is up
    assert (health.status_code, health.text) == (200, "OK")

    for credentials in [None, (user, "wrong-password-1"), (unique("nobody"), password)]:
        refused = requests.post(url + SEARCH, json={"max_results": 1}, auth=credentials, timeout=10)
        assert refused.status_code == 401
        assert refused.headers["Content-Type"] == "text/html; charset=utf-8"
        assert refused.headers["WWW-Authenticate"] == 'Basic realm="mlflow"'
        assert refused.text.startswith("You are not authenticated.")

    reads = requests.get(
        url + "/api/2.0/mlflow/runs/get",
        params={"run_id": run_id},
        auth=(user, password),
        timeout=10,
    )
    assert reads.status_code == 200  # default_permission READ
    denied = requests.post(
        url + LOG_BATCH, json=one_metric(run_id), auth=(user, password), timeout=10
    )
    assert (denied.status_code, denied.text) == (403, "Permission denied")
    assert denied.headers["Content-Type"] == "text/html; charset=utf-8"
    traces = requests.post(
        url + "/v1/traces",
        data=b"",
        headers={"Content-Type": "application/x-protobuf", "x-mlflow-experiment-id": experiment_id},
        auth=(user, password),
        timeout=10,
    )
    assert (traces.status_code, traces.text) == (403, "Permission denied")
    assert traces.headers["Content-Type"] == "text/plain; charset=utf-8"

    auth_server.grant(name, user, "EDIT")  # by name; replaces nothing yet
    assert auth_server.permission(experiment_id, user) == "EDIT"
    logged = requests.post(
        url + LOG_BATCH, json=one_metric(run_id), auth=(user, password), timeout=10
    )
    assert (logged.status_code, logged.json()) == (200, {})

    auth_server.grant(experiment_id, user, "DENY")  # by id; replaces the EDIT grant
    hidden = requests.get(
        url + "/api/2.0/mlflow/runs/get",
        params={"run_id": run_id},
        auth=(user, password),
        timeout=10,
    )
    assert hidden.status_code == 403
    auth_server.revoke(name, user)
    auth_server.revoke(name, user)  # nothing left to revoke: no error
    assert auth_server.permission(name, user) == "READ"


def test_a_rotated_password_refuses_the_old_one_through_mlflow_client_too(
    auth_server: AuthServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    user, old, new = unique("rotated"), "old-password-123", "new-password-456"
    auth_server.create_user(user, old)
    name, experiment_id, run_id = admin_run(auth_server)
    auth_server.grant(name, user, "EDIT")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    for key, value in auth_server.credentials_env(user, old).items():
        monkeypatch.setenv(key, value)
    client = MlflowClient(auth_server.url)
    client.log_metric(run_id, "before", 1.0)

    auth_server.update_password(user, new)
    assert requests.get(auth_server.url + SEARCH, auth=(user, old), timeout=10).status_code == 401
    with pytest.raises(MlflowException, match="401"):
        client.log_metric(run_id, "after", 1.0)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", new)
    client.log_metric(run_id, "after", 1.0)
    assert set(client.get_run(run_id).data.metrics) == {"before", "after"}

    auth_server.revoke(experiment_id, user)  # back to READ: MlflowClient sees the 403
    with pytest.raises(MlflowException, match="403"):
        client.log_metric(run_id, "denied", 1.0)
