"""Fault drills against a real `mlflow server`: what a user would check after each."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Readback
from mlflow import MlflowClient
from support.checks import assert_exactly_once, wait_until
from support.children import CLI
from support.servers import FaultProxy, MlflowServer, free_port

from rlm_mlflow import MLflowSink
from rlm_mlflow._event import RunEnd, RunStart, Step
from rlm_mlflow._journal import Journal, journal_meta
from rlm_mlflow._orphans import read_journal
from rlm_mlflow._records import Problem


def paced_run(
    sink: MLflowSink, run_id: str, steps: int, seconds: float, on_step: Any = None
) -> float:
    """A run whose steps are spread over ``seconds``; returns the time spent inside hooks."""
    sink.on_run_start(run_id, task="drill", environment="faults", params={"steps": steps})
    in_hooks = 0.0
    pause = seconds / (steps / 500)
    for step in range(steps):
        started = time.perf_counter()
        sink.on_step(
            run_id, event={"step": step, "reward": step % 7 / 7}, cumulative_reward=float(step)
        )
        in_hooks += time.perf_counter() - started
        if step % 500 == 499:
            if on_step is not None:
                on_step(step)
            time.sleep(pause)
    sink.on_run_end(
        run_id,
        result={"completed": True, "steps": steps, "total_reward": float(steps)},
        run_path=None,
    )
    return in_hooks


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[MlflowServer]:
    """A server this test may kill and restart (the session's one stays untouched)."""
    server = MlflowServer(tmp_path / "own-server")
    try:
        yield server
    finally:
        server.stop()


def test_server_killed_mid_run_and_restarted_loses_nothing(
    own_server: MlflowServer, experiment: str
) -> None:
    """The server is stopped a quarter into the run, once some of it landed, and started
    again once the sink has met the outage (a retry counted): signals, not times."""
    own_server.start()
    sink = MLflowSink(True, experiment=experiment, tracking_uri=own_server.url, retry_deadline=60)
    readback = Readback(own_server.url, experiment)

    def outage(step: int) -> None:
        if step == 4_999:
            wait_until(lambda: "survivor" in readback.runs(), what="the run to be in MLflow")
            own_server.stop()
        elif step == 14_999:
            wait_until(lambda: sink.status()["retried"] > 0, what="the sink to meet the outage")
            own_server.start()

    paced_run(sink, "survivor", 20_000, seconds=4.0, on_step=outage)
    assert sink.close(timeout=90)

    assert_exactly_once(Readback(own_server.url, experiment), "survivor", 20_000)
    status = sink.status()
    assert status["retried"] > 0  # the outage was seen, and ridden out
    assert (status["delivered"], status["failed"], status["pending"]) == (20_002, 0, 0)


def test_503s_429s_latency_and_resets_cost_no_point_and_no_loop_time(
    proxy: FaultProxy, experiment: str
) -> None:
    sink = MLflowSink(
        True, experiment=experiment, tracking_uri=proxy.url, retry_deadline=60, batch_size=500
    )
    readback = Readback(proxy.url.replace(str(proxy.port), str(proxy.target_port)), experiment)
    phases = {
        1499: lambda: proxy.fail(6, 503),
        2999: lambda: proxy.fail(3, 429, retry_after=1),
        4499: lambda: setattr(proxy, "delay", 2.0),
        5999: lambda: (setattr(proxy, "delay", 0.0), proxy.reset(4)),
    }

    in_hooks = paced_run(
        sink, "weathered", 8_000, seconds=6.0, on_step=lambda step: phases.get(step, lambda: None)()
    )
    assert sink.close(timeout=120)

    assert_exactly_once(readback, "weathered", 8_000)
    assert proxy.served["failed"] == 9 and proxy.served["reset"] == 4
    status = sink.status()
    assert status["retried"] >= 1 and status["failed"] == 0
    # Every request waited 2 s for a while; the loop's 8,000 hooks did not wait at all.
    assert in_hooks < 1.0


def test_a_refused_metric_among_999_is_dead_lettered_and_the_rest_lands(
    proxy: FaultProxy, experiment: str, tmp_path: Path
) -> None:
    proxy.refuse = lambda body: any(
        m["key"] == "step_reward" and int(m["step"]) == 377 for m in body.get("metrics", [])
    )
    dead_letter = tmp_path / "dead.jsonl"
    sink = MLflowSink(
        True,
        experiment=experiment,
        tracking_uri=proxy.url,
        dead_letter_file=str(dead_letter),
        flush_interval=30,
    )
    sink.on_run_start("picky", task="t", environment="e", params={})
    for step in range(500):  # one log_batch call of 1,000 metrics
        sink.on_step("picky", event={"step": step, "reward": 1.0}, cumulative_reward=step + 1.0)
    sink.on_run_end(
        "picky", result={"completed": True, "steps": 500, "total_reward": 500.0}, run_path=None
    )
    assert sink.close(timeout=60)

    readback = Readback(f"http://127.0.0.1:{proxy.target_port}", experiment)
    run = readback.runs()["picky"]
    rewards = readback.history(run, "step_reward")
    cumulative = readback.history(run, "cumulative_reward")
    assert len(rewards) + len(cumulative) == 999
    assert 377 not in {m.step for m in rewards} and 377 in {m.step for m in cumulative}
    assert run.info.status == "FINISHED"
    (record,) = [json.loads(line) for line in dead_letter.read_text().splitlines()]
    assert record["run_id"] == "picky" and record["call"] == "log_batch"
    assert record["entities"] == [
        {
            "key": "step_reward",
            "value": 1.0,
            "step": 377,
            "timestamp": record["entities"][0]["timestamp"],
        }
    ]
    assert "refused by the test proxy: bad entity" in record["reason"]
    assert oct(dead_letter.stat().st_mode & 0o777) == "0o600"
    status = sink.status()
    assert (status["dead_lettered"], status["delivered"], status["failed"]) == (1, 501, 0)


def test_server_down_for_the_whole_run_then_sync_delivers_everything_once(
    tmp_path: Path, experiment: str
) -> None:
    port = free_port()
    spool = tmp_path / "spool"
    sink = MLflowSink(
        True,
        experiment=experiment,
        tracking_uri=f"http://127.0.0.1:{port}",
        spool_dir=str(spool),
        retry_deadline=1,
    )
    for run_id in ("offline-a", "offline-b"):
        paced_run(sink, run_id, 2_000, seconds=0.2)
    assert not sink.close(timeout=3)  # nothing could be delivered ...
    status = sink.status()
    assert status["spooled"] == 2 * 2_002 and status["failed"] == 0  # ... and nothing is lost
    assert status["dropped"] == 0

    with MlflowServer(tmp_path / "late-server", port=port) as server:
        env = {**os.environ, "MLFLOW_TRACKING_URI": server.url}

        def sync() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [CLI, "sync", str(spool)],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )

        first = sync()
        assert first.returncode == 0, first.stderr
        assert "synced 1 journal(s)" in first.stdout and "8000 metrics" in first.stdout
        second = sync()
        assert second.returncode == 0 and "synced 0 journal(s)" in second.stdout

        readback = Readback(server.url, experiment)
        for run_id in ("offline-a", "offline-b"):
            assert_exactly_once(readback, run_id, 2_000)
        assert len(readback.runs()) == 2


SIGKILLED = """
import sys, time
from rlm_mlflow import MLflowSink
sink = MLflowSink(True, experiment={experiment!r}, tracking_uri={uri!r},
                  spool_dir={spool!r}, flush_interval=0.1)
sink.on_run_start("doomed", task="t", environment="e", params={{}})
for step in range(1_000_000):
    sink.on_step("doomed", event={{"step": step, "reward": 0.5}}, cumulative_reward=step / 2)
    if step % 50 == 0:
        print(step, flush=True)
        time.sleep(0.01)
"""


def journalled_step(spool: Path) -> int:
    """The highest step in the journals of ``spool`` (-1: none yet); a record being written
    (its tail torn) is not counted."""
    highest = -1
    for journal_dir in spool.glob("journal-*"):
        for _, _, item in read_journal(journal_dir, (0, 0)):
            if not isinstance(item, Problem):
                steps = [e.step for e in item if isinstance(e, Step)]
                highest = max([highest, *steps])
    return highest


def test_a_sigkilled_process_is_delivered_by_the_next_start_on_its_spool(
    mlflow_server: MlflowServer, tmp_path: Path, experiment: str
) -> None:
    spool = tmp_path / "spool"
    code = SIGKILLED.format(experiment=experiment, uri=mlflow_server.url, spool=str(spool))
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    try:
        for line in child.stdout:  # the child says where it is
            if line.strip().isdigit() and int(line) >= 2_000:
                break
        # What its journal holds now (read from disk, as the next start will) is what must
        # land: killed after this, it cannot take it back.
        surely_journalled = wait_until(
            lambda: (step := journalled_step(spool)) >= 1_000 and step,
            what="the child's journal to hold a thousand steps",
        )
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()

    sink = MLflowSink(
        True, experiment=experiment, tracking_uri=mlflow_server.url, spool_dir=str(spool)
    )
    assert sink.close(timeout=60)
    assert sink.replayed is not None and sink.replayed.journals == 1
    assert sink.replayed.kept == 0

    readback = Readback(mlflow_server.url, experiment)
    run = readback.runs()["doomed"]
    steps = [m.step for m in readback.history(run, "step_reward")]
    assert len(steps) == len(set(steps)), "a replayed point landed twice"
    assert set(range(surely_journalled + 1)) <= set(steps)
    assert run.info.status == "KILLED"
    assert not list(spool.glob("journal-*")), "a delivered journal is removed"


def test_a_param_relogged_with_another_value_is_dead_lettered_with_mlflows_reason(
    mlflow_server: MlflowServer, tmp_path: Path, experiment: str
) -> None:
    # A run that already exists for this start key (a replay after a crash finds it) with
    # param model=a; the journal says model=b. MLflow refuses to change a param.
    client = MlflowClient(mlflow_server.url)
    existing = client.create_run(
        client.create_experiment(experiment),
        run_name="relogged",
        tags={"rlm_mlflow.run_key": "key-1", "run_id": "relogged"},
    )
    client.log_param(existing.info.run_id, "model", "model-a")
    spool = tmp_path / "spool"
    journal = Journal(spool, 1 << 30, journal_meta(experiment, None))
    now = time.time()
    journal.append(
        [
            RunStart("relogged", now, "env", 4, {"model": "model-b", "seed": 7}, "key-1"),
            *[Step("relogged", i, 1.0, i + 1.0, now) for i in range(10)],
            RunEnd("relogged", now, True, 10, 10.0, None),
        ]
    )
    journal.close(remove=False)  # as if its process had died

    done = subprocess.run(
        [CLI, "sync", str(spool), "--tracking-uri", mlflow_server.url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "dead-lettered 1" in done.stdout

    run = client.get_run(existing.info.run_id)
    assert run.data.params == {
        "model": "model-a",
        "seed": "7",
        "environment": "env",
        "task_chars": "4",
    }
    assert len(client.get_metric_history(run.info.run_id, "step_reward")) == 10
    assert run.info.status == "FINISHED"
    (record,) = [
        json.loads(line) for line in (spool / "dead-letter.jsonl").read_text().splitlines()
    ]
    assert record["call"] == "log_params"
    assert record["entities"] == [{"key": "model", "value": "model-b"}]
    assert "model" in record["reason"] and "INVALID_PARAMETER_VALUE" in record["reason"]
