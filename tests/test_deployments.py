"""Deployments users actually have: a 200 that is not MLflow's answer, passwords and
permissions (`mlflow server --app-name basic-auth`), redirects, a server without
``/v1/traces``, TLS, a server away from the start with a spool. Real servers, the loopback
proxy in front where the fault needs one, everything read back through MlflowClient.

What each test checks is what a user would: what landed equals what ``delivered`` says,
nothing is dead-lettered for a configuration error, ``status()`` names the cause in one line,
and once it is fixed every point is in MLflow exactly once.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import Readback
from support.checks import accounted, assert_exactly_once, wait_until
from support.children import CLI
from support.servers import AuthServer, FaultProxy, MlflowServer, free_port, make_certificate

from rlm_mlflow import MLflowSink

LOG_BATCH = "/api/2.0/mlflow/runs/log-batch"
#: rlm-code-shaped texts of about 4 KB (a program and its output).
CODE = "for i in range(10):\n    print(i)\n" * 128
STDOUT = "0\n1\n2\n3\n4\n5\n6\n7\n8\n9\n" * 200


def start(sink: MLflowSink, run_id: str, steps: int) -> None:
    sink.on_run_start(run_id, task="deploy", environment="e", params={"steps": steps})


def step_through(sink: MLflowSink, run_id: str, first: int, last: int, rich: bool = False) -> None:
    for step in range(first, last):
        event: dict[str, Any] = {"step": step, "reward": 0.5}
        if rich:
            event["action"] = {"action": "run_python", "code": CODE}
            event["observation"] = {"success": True, "stdout": STDOUT}
        sink.on_step(run_id, event=event, cumulative_reward=step * 0.5)


def end(sink: MLflowSink, run_id: str, steps: int) -> None:
    result = {"completed": True, "steps": steps, "total_reward": steps * 0.5}
    sink.on_run_end(run_id, result=result, run_path=None)


def refused(sink: MLflowSink) -> dict[str, Any]:
    """The status once the sink says the store refuses it."""
    return wait_until(
        lambda: (status := sink.status())["available"] is False and status,
        what="status() to say the store refuses the sink",
    )


def sync(spool: Path, uri: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, "sync", str(spool)],
        env={**os.environ, "MLFLOW_TRACKING_URI": uri, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


# -- a 200 that is not MLflow's -----------------------------------------------------------------


def test_a_login_page_mid_run_is_not_counted_delivered_and_sync_delivers_the_rest_once(
    proxy: FaultProxy, mlflow_server: MlflowServer, tmp_path: Path, experiment: str
) -> None:
    spool = tmp_path / "spool"
    sink = MLflowSink(
        True,
        experiment=experiment,
        tracking_uri=proxy.url,
        spool_dir=str(spool),
        flush_interval=0.1,
    )
    start(sink, "sso", 1000)
    step_through(sink, "sso", 0, 500)
    assert sink.flush(timeout=60)
    proxy.html(paths=LOG_BATCH)  # an SSO proxy's login page steps in, with a 200
    step_through(sink, "sso", 500, 1000)
    end(sink, "sso", 1000)

    status = refused(sink)
    assert "not MLflow's" in status["detail"] and "text/html" in status["detail"]
    readback = Readback(mlflow_server.url, experiment)
    landed = readback.history(readback.runs()["sso"], "step_reward")
    assert [m.step for m in landed] == list(range(500))
    assert status["delivered"] == 1 + 500  # the start and the steps that landed, no more

    assert not sink.close(timeout=4)
    status = sink.status()
    assert (status["dead_lettered"], status["pending"], status["failed"]) == (0, 0, 0)
    assert status["spooled"] == 500 + 1 and accounted(status) == 1002
    assert readback.runs()["sso"].info.status != "RUNNING"
    assert list(spool.glob("journal-*")), "the journal is kept for a sync"

    proxy.clear()  # the proxy is fixed
    done = sync(spool, proxy.url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_exactly_once(readback, "sso", 1000)
    assert not list(spool.glob("journal-*"))


# -- auth ------------------------------------------------------------------------------------


def auth_user(auth_server: AuthServer, experiment: str, permission: str | None) -> tuple[str, str]:
    """A user of its own, and the experiment made by the admin (so the user has only what
    ``permission`` grants, else the default READ)."""
    user, password = f"u{uuid.uuid4().hex[:8]}", "first-password-1"
    auth_server.create_user(user, password)
    auth_server.create_experiment(experiment)
    if permission is not None:
        auth_server.grant(experiment, user, permission)
    return user, password


def test_a_password_rotated_on_the_server_keeps_every_event_and_the_fix_needs_no_restart(
    auth_server: AuthServer, experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    user, password = auth_user(auth_server, experiment, "EDIT")
    for key, value in AuthServer.credentials_env(user, password).items():
        monkeypatch.setenv(key, value)
    with FaultProxy(auth_server.port) as proxy:
        sink = MLflowSink(True, experiment=experiment, tracking_uri=proxy.url, flush_interval=0.1)
        start(sink, "rotated", 200)
        step_through(sink, "rotated", 0, 100)
        assert sink.flush(timeout=60)

        auth_server.update_password(user, "second-password-2")  # rotated on the server
        proxy.clear(counts=True)
        step_through(sink, "rotated", 100, 200)
        end(sink, "rotated", 200)
        status = refused(sink)
        assert "401" in status["detail"] and "MLFLOW_TRACKING_USERNAME" in status["detail"]
        assert status["last_error"] == status["detail"]

        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "second-password-2")  # the fix
        assert sink.flush(timeout=120)
        status = sink.status()
        assert status["available"] is True and status["dead_lettered"] == 0
        assert status["delivered"] == 202
        # Tried again at a slow pace, one request at a time; never bisected (it was 449).
        assert proxy.served_paths.get(LOG_BATCH, 0) <= 10
        sink.close()
    assert_exactly_once(Readback(auth_server.url, experiment), "rotated", 200)


def test_no_permission_keeps_every_event_in_the_spool_until_access_is_granted(
    auth_server: AuthServer, experiment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    user, password = auth_user(auth_server, experiment, None)  # READ only: cannot log
    credentials = AuthServer.credentials_env(user, password)
    for key, value in credentials.items():
        monkeypatch.setenv(key, value)
    spool = tmp_path / "spool"
    sink = MLflowSink(
        True, experiment=experiment, tracking_uri=auth_server.url, spool_dir=str(spool)
    )
    start(sink, "forbidden", 300)
    step_through(sink, "forbidden", 0, 300)
    end(sink, "forbidden", 300)
    status = refused(sink)
    assert "403" in status["detail"] and "EDIT" in status["detail"]
    assert not sink.close(timeout=3)
    status = sink.status()
    assert (status["dead_lettered"], status["failed"], status["pending"]) == (0, 0, 0)
    assert status["spooled"] == 302
    assert not (tmp_path / "spool" / "dead-letter.jsonl").exists()

    auth_server.grant(experiment, user, "EDIT")  # access granted
    done = sync(spool, auth_server.url, **credentials)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_exactly_once(Readback(auth_server.url, experiment), "forbidden", 300)


def test_a_wrong_password_from_the_start_says_so_instead_of_unreachable(
    auth_server: AuthServer, experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    user, _ = auth_user(auth_server, experiment, "EDIT")
    for key, value in AuthServer.credentials_env(user, "not-the-password").items():
        monkeypatch.setenv(key, value)
    sink = MLflowSink(True, experiment=experiment, tracking_uri=auth_server.url)
    start(sink, "locked-out", 50)
    step_through(sink, "locked-out", 0, 50)
    end(sink, "locked-out", 50)
    status = refused(sink)
    assert status["detail"].startswith("401 from ")
    assert not sink.close(timeout=3)
    status = sink.status()
    assert (status["failed"], status["dead_lettered"], status["pending"]) == (52, 0, 0)


# -- redirects -------------------------------------------------------------------------------


def test_a_redirect_that_turns_posts_into_gets_names_the_uri_to_use(
    proxy: FaultProxy, mlflow_server: MlflowServer, tmp_path: Path, experiment: str
) -> None:
    proxy.redirect(302, mlflow_server.url)  # an http:// URI for a server that moved
    spool = tmp_path / "spool"
    sink = MLflowSink(True, experiment=experiment, tracking_uri=proxy.url, spool_dir=str(spool))
    start(sink, "moved", 100)
    step_through(sink, "moved", 0, 100)
    end(sink, "moved", 100)
    status = refused(sink)
    assert f"to {mlflow_server.url}: use that as the tracking URI" in status["detail"]
    assert not sink.close(timeout=3)
    status = sink.status()
    assert (status["dead_lettered"], status["spooled"], status["pending"]) == (0, 102, 0)

    # The fix the message asks for: the server's own URI; the journal names the old one.
    left = sync(spool, mlflow_server.url)
    assert f"left 1 journal(s) for other destinations: {proxy.url}" in left.stdout
    done = subprocess.run(
        [CLI, "sync", str(spool), "--tracking-uri", mlflow_server.url, "--moved-from", proxy.url],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert_exactly_once(Readback(mlflow_server.url, experiment), "moved", 100)
    assert proxy.served["redirected"] > 0 and not list(spool.glob("journal-*"))


def test_a_redirect_that_keeps_the_method_still_delivers(
    proxy: FaultProxy, mlflow_server: MlflowServer, experiment: str
) -> None:
    proxy.redirect(308, mlflow_server.url)
    sink = MLflowSink(True, experiment=experiment, tracking_uri=proxy.url)
    start(sink, "permanent", 300)
    step_through(sink, "permanent", 0, 300)
    end(sink, "permanent", 300)
    assert sink.close(timeout=60)
    assert sink.status()["delivered"] == 302
    assert_exactly_once(Readback(mlflow_server.url, experiment), "permanent", 300)


# -- a server without /v1/traces ------------------------------------------------------------------


def test_a_server_without_the_traces_endpoint_costs_a_few_requests_not_a_bisect(
    proxy: FaultProxy, mlflow_server: MlflowServer, experiment: str
) -> None:
    proxy.lack("/v1/traces", status=404)  # MLflow 2.x, or a proxy that does not route it
    sink = MLflowSink(True, experiment=experiment, tracking_uri=proxy.url, traces=True)
    start(sink, "no-traces", 3000)
    step_through(sink, "no-traces", 0, 3000, rich=True)
    end(sink, "no-traces", 3000)
    assert sink.close(timeout=120)
    status = sink.status()
    assert status["traces"].startswith("unavailable: 404")
    assert (status["delivered"], status["dead_lettered"]) == (3002, 0)
    assert proxy.served_paths.get("/v1/traces", 0) <= 20  # it was 3,990 requests
    assert_exactly_once(Readback(mlflow_server.url, experiment), "no-traces", 3000)


# -- TLS ---------------------------------------------------------------------------------------


def test_a_failed_tls_check_says_what_to_set_and_the_ca_makes_it_work(
    mlflow_server: MlflowServer, tmp_path: Path, experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    certificate = make_certificate(tmp_path / "tls")
    with FaultProxy(mlflow_server.port, tls=certificate) as front:
        sink = MLflowSink(True, experiment=experiment, tracking_uri=front.url)
        start(sink, "untrusted", 20)
        step_through(sink, "untrusted", 0, 20)
        end(sink, "untrusted", 20)
        status = refused(sink)
        assert "TLS check" in status["detail"]
        assert "MLFLOW_TRACKING_SERVER_CERT_PATH" in status["detail"]
        assert not sink.close(timeout=3)
        assert (sink.status()["failed"], sink.status()["dead_lettered"]) == (22, 0)

        monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(certificate.ca_path))
        sink = MLflowSink(True, experiment=experiment, tracking_uri=front.url)
        start(sink, "trusted", 20)
        step_through(sink, "trusted", 0, 20)
        end(sink, "trusted", 20)
        assert sink.close(timeout=60)
    assert_exactly_once(Readback(mlflow_server.url, experiment), "trusted", 20)


# -- a server away with a spool --------------------------------------------------------------------


@pytest.mark.parametrize("when_full", ["drop_newest", "block"])
def test_a_server_down_from_the_start_with_a_spool_costs_no_drop_and_no_wait(
    tmp_path: Path, experiment: str, when_full: str
) -> None:
    """The journal takes what memory cannot hold: once what is in flight fills the memory,
    the worker keeps draining the buffer into the journal, so no hook meets a full buffer:
    no drop (``drop_newest``), no hook that waited (``block`` with a 1 ms put_timeout drops
    whatever had to wait longer). The loop hands over every half buffer and waits for the
    worker to have drained it (a signal: ``queued`` back to 0), so the test checks where the
    events go, not how fast a loaded machine schedules the worker (the hook's cost is
    measured in benchmarks/); without the journal as overflow the buffer would stay full."""
    port = free_port()
    spool = tmp_path / "spool"
    sink = MLflowSink(
        True,
        experiment=experiment,
        tracking_uri=f"http://127.0.0.1:{port}",
        spool_dir=str(spool),
        when_full=when_full,
        queue_size=20_000,
        put_timeout=0.001,
    )
    steps = 100_000  # five times what memory holds (buffer and in flight) in events
    with (tmp_path / "trajectory.jsonl").open("w") as trajectory:  # the loop's own I/O
        start(sink, "offline", steps)
        for step in range(steps):
            sink.on_step("offline", event={"step": step, "reward": 0.5}, cumulative_reward=step / 2)
            trajectory.write(json.dumps({"step": step}) + "\n")
            trajectory.flush()
            if step % 10_000 == 9_999:
                wait_until(
                    lambda: sink.status()["queued"] == 0,
                    what="the worker to have drained the buffer into the journal",
                )
        end(sink, "offline", steps)
    assert not sink.close(timeout=5)
    status = sink.status()
    assert (status["dropped"], status["failed"], status["pending"]) == (0, 0, 0)
    assert status["spooled"] == steps + 2

    with MlflowServer(tmp_path / "late-server", port=port) as server:
        done = sync(spool, server.url)
        assert done.returncode == 0, done.stdout + done.stderr
        assert_exactly_once(Readback(server.url, experiment), "offline", steps)


def test_close_returns_with_final_counts_even_when_much_is_held(
    tmp_path: Path, experiment: str
) -> None:
    """Traces on, 4 KB texts, the server down: close(2) returns with pending 0 and every hook
    call in one counter (it once returned with 200,001 pending, settling later)."""
    sink = MLflowSink(
        True,
        experiment=experiment,
        tracking_uri=f"http://127.0.0.1:{free_port()}",
        traces=True,
        when_full="drop_newest",
    )
    calls = 0
    for r in range(4):
        start(sink, f"heavy-{r}", 10_000)
        step_through(sink, f"heavy-{r}", 0, 10_000, rich=True)
        end(sink, f"heavy-{r}", 10_000)
        calls += 10_002
    assert not sink.close(timeout=2)
    status = sink.status()
    assert status["pending"] == 0 and status["queued"] == 0
    assert accounted(status) == calls
