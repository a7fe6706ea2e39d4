"""Self-tests of the rig for the deployments users actually have (issue 16): the basic-auth
server, the proxy's html, redirect and missing modes, and the TLS front. Each test proves the
rig does what its docstring says, with a plain ``requests`` client or ``MlflowClient``; none
involves the sink."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from support.servers import (
    LOGIN_PAGE,
    METHOD_NOT_ALLOWED_PAGE,
    NOT_FOUND_PAGE,
    AuthServer,
    FaultProxy,
    MlflowServer,
    make_certificate,
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


def test_a_redirect_to_the_auth_server_loses_the_credentials(auth_server: AuthServer) -> None:
    """``requests`` drops the Authorization header when a redirect changes the port: the
    credentials a client was given never reach the server behind the redirect."""
    with FaultProxy(auth_server.port) as proxy:
        proxy.redirect(308, auth_server.url)
        answer = requests.post(proxy.url + SEARCH, json={}, auth=auth_server.admin, timeout=10)
    assert [r.status_code for r in answer.history] == [308]
    assert answer.status_code == 401
    assert "Authorization" not in answer.request.headers


# -- the proxy's modes ------------------------------------------------------------------------


def test_html_mode_answers_a_login_page_to_chosen_paths_and_counts(
    proxy: FaultProxy, server_run: str
) -> None:
    proxy.html(n=2, paths=LOG_BATCH)
    answers = []
    for _ in range(3):
        answers.append(
            requests.post(proxy.url + LOG_BATCH, json=one_metric(server_run), timeout=10)
        )
        search = requests.post(proxy.url + SEARCH, json={"max_results": 1}, timeout=10)
        assert search.headers["Content-Type"] == "application/json"  # other paths: MLflow's
    for login in answers[:2]:
        assert login.status_code == 200
        assert login.headers["Content-Type"] == "text/html; charset=utf-8"
        assert login.content == LOGIN_PAGE
    assert (answers[2].status_code, answers[2].json()) == (200, {})  # n spent: MLflow again
    assert proxy.served_paths == {LOG_BATCH: 3, SEARCH: 3}
    assert (proxy.served["html"], proxy.served["forwarded"]) == (2, 4)

    proxy.html(paths=lambda path: path.endswith("/search"))  # n=None: until cleared
    for _ in range(3):
        assert requests.post(proxy.url + SEARCH, json={}, timeout=10).content == LOGIN_PAGE
    proxy.clear(counts=True)
    assert requests.post(proxy.url + SEARCH, json={}, timeout=10).headers["Content-Type"] == (
        "application/json"
    )
    assert proxy.served_paths == {SEARCH: 1} and proxy.served["html"] == 0


@pytest.mark.parametrize(
    ("status", "method", "answer"),
    [
        (301, "GET", 405),
        (302, "GET", 405),
        (303, "GET", 405),
        (307, "POST", 200),
        (308, "POST", 200),
    ],
)
def test_a_redirect_reaches_the_server_as_requests_resends_it(
    proxy: FaultProxy,
    mlflow_server: MlflowServer,
    server_run: str,
    status: int,
    method: str,
    answer: int,
) -> None:
    """301, 302 and 303 turn the POST into a GET without a body (MLflow answers 405); 307 and
    308 re-send the POST and its body (the metric lands)."""
    proxy.redirect(status, mlflow_server.url)
    raw = requests.post(
        proxy.url + LOG_BATCH + "?q=1",
        json=one_metric(server_run),
        allow_redirects=False,
        timeout=10,
    )
    assert (raw.status_code, raw.headers["Location"]) == (
        status,
        mlflow_server.url + LOG_BATCH + "?q=1",
    )

    followed = requests.post(proxy.url + LOG_BATCH, json=one_metric(server_run), timeout=10)
    assert [r.status_code for r in followed.history] == [status]
    assert (followed.request.method, followed.status_code) == (method, answer)
    assert followed.url == mlflow_server.url + LOG_BATCH
    if answer == 405:
        assert followed.request.body is None
        assert followed.content == METHOD_NOT_ALLOWED_PAGE
    landed = MlflowClient(mlflow_server.url).get_run(server_run).data.metrics
    assert ("rig" in landed) == (method == "POST")
    assert proxy.served_paths == {LOG_BATCH: 2} and proxy.served["redirected"] == 2


def test_missing_answers_as_a_server_without_the_endpoint(proxy: FaultProxy) -> None:
    proxy.missing.add("/v1/traces")  # as before: 501
    assert requests.post(proxy.url + "/v1/traces", data=b"x", timeout=10).status_code == 501
    proxy.lack("/v1/traces")  # an MLflow 2.x or a plain web server: Werkzeug's 404 page
    not_found = requests.post(proxy.url + "/v1/traces?x=1", data=b"x", timeout=10)
    assert (not_found.status_code, not_found.content) == (404, NOT_FOUND_PAGE)
    assert not_found.headers["Content-Type"] == "text/html; charset=utf-8"
    proxy.lack(LOG_BATCH, status=405)
    not_allowed = requests.post(proxy.url + LOG_BATCH, json={}, timeout=10)
    assert (not_allowed.status_code, not_allowed.content) == (405, METHOD_NOT_ALLOWED_PAGE)
    assert not_allowed.headers["Allow"] == "GET, HEAD"
    assert requests.post(proxy.url + SEARCH, json={"max_results": 1}, timeout=10).ok
    with pytest.raises(ValueError):
        proxy.lack("/x", status=500)

    proxy.clear()
    assert requests.post(proxy.url + LOG_BATCH, json={}, timeout=10).status_code == 400  # MLflow's
    assert proxy.served["missing"] == 3 and proxy.served_paths["/v1/traces"] == 2


def test_the_faults_of_before_still_apply_and_are_counted_by_path(
    proxy: FaultProxy, server_run: str
) -> None:
    proxy.fail(1, 429, retry_after=2)
    proxy.reset(1)
    proxy.html(n=1)  # queued faults come first, then the modes
    throttled = requests.post(proxy.url + SEARCH, json={"max_results": 1}, timeout=10)
    assert (throttled.status_code, throttled.headers["Retry-After"]) == (429, "2")
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.post(proxy.url + SEARCH, json={"max_results": 1}, timeout=10)
    assert requests.post(proxy.url + SEARCH, json={}, timeout=10).content == LOGIN_PAGE
    proxy.refuse = lambda body: body["metrics"][0]["step"] == 7
    refused = requests.post(proxy.url + LOG_BATCH, json=one_metric(server_run, 7), timeout=10)
    assert (refused.status_code, refused.json()["error_code"]) == (400, "INVALID_PARAMETER_VALUE")
    assert requests.post(proxy.url + LOG_BATCH, json=one_metric(server_run, 8), timeout=10).ok
    assert {k: v for k, v in proxy.served.items() if v} == {
        "failed": 1,
        "reset": 1,
        "html": 1,
        "refused": 1,
        "forwarded": 1,
    }
    assert proxy.served_paths == {SEARCH: 3, LOG_BATCH: 2}


def test_clear_stops_every_mode_at_once(proxy: FaultProxy, mlflow_server: MlflowServer) -> None:
    proxy.fail(5, 503)
    proxy.reset(2)
    proxy.delay = 0.5
    proxy.refuse = lambda body: True
    proxy.html()
    proxy.redirect(302, mlflow_server.url)
    proxy.lack(SEARCH)
    proxy.clear()
    started = time.monotonic()
    answer = requests.post(
        proxy.url + SEARCH, json={"max_results": 1}, allow_redirects=False, timeout=10
    )
    assert (answer.status_code, answer.headers["Content-Type"]) == (200, "application/json")
    assert time.monotonic() - started < 0.5
    assert proxy.served["forwarded"] == 1 and proxy.served["failed"] == 0


# -- the TLS front ----------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_the_tls_front_serves_mlflow_and_fails_verification_without_the_ca(
    mlflow_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in (
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "SSL_CERT_FILE",
        "MLFLOW_TRACKING_INSECURE_TLS",
    ):
        monkeypatch.delenv(name, raising=False)
    certificate = make_certificate(tmp_path / "tls")
    with FaultProxy(mlflow_server.port, tls=certificate) as front:
        assert front.url.startswith("https://127.0.0.1:")
        health = requests.get(front.url + "/health", verify=str(certificate.ca_path), timeout=10)
        assert (health.status_code, health.text) == (200, "OK")
        assert requests.get(front.url + "/health", verify=False, timeout=10).status_code == 200
        with pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
            requests.get(front.url + "/health", timeout=10)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificate.ca_path))
        assert requests.get(front.url + "/health", timeout=10).status_code == 200
        monkeypatch.delenv("REQUESTS_CA_BUNDLE")

        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        client = MlflowClient(front.url)
        with pytest.raises(MlflowException, match="CERTIFICATE_VERIFY_FAILED"):
            client.search_experiments(max_results=1)
        monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(certificate.ca_path))
        assert client.search_experiments(max_results=1)
        monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH")
        monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")
        assert client.search_experiments(max_results=1)
        deadline = time.monotonic() + 5  # the refused handshakes end in the proxy's threads
        while front.served["handshake_failed"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert front.served["handshake_failed"] >= 2
