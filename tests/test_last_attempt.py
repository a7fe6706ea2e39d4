"""The close's last attempt (`_run_calls.last_attempt`), against the in-memory exporter: what
it does for runs that were never created, and for run ends that take longer than its reserve."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest
from support.memory import MemoryExporter

from rlm_mlflow import MLflowSink
from rlm_mlflow._connect import Connection, RetryPolicy
from rlm_mlflow._deadletter import DeadLetters
from rlm_mlflow._event import RunEnd, RunStart
from rlm_mlflow._outcomes import Outcomes
from rlm_mlflow._payload import MetricRow
from rlm_mlflow._run import Run
from rlm_mlflow._run_calls import last_attempt
from rlm_mlflow._sending import Sending
from rlm_mlflow._worker import JOIN_GRACE_S, last_attempt_reserve


def start(run_id: str, parent: str | None = None) -> RunStart:
    params = {} if parent is None else {"parent_run_id": parent}
    return RunStart(run_id, time.time(), "e", 4, params, f"key-{run_id}", None)


def end(run_id: str) -> RunEnd:
    return RunEnd(run_id, time.time(), True, 3, 1.0, None, "FINISHED", None)


@pytest.mark.anyio
async def test_never_created_children_are_created_after_their_parent_whatever_the_order(
    tmp_path: Path,
) -> None:
    """A recursive run's child before its parent in the close's list: the child's creation
    waits for its parent's, so the parent must come first (else the last attempt would wait
    until the deadline cut it, leaving both uncreated)."""
    exporter = MemoryExporter(server=False)
    outcomes = Outcomes(DeadLetters(tmp_path / "dead.jsonl"), "e")
    policy = RetryPolicy(5.0, outcomes.on_retry)
    s = Sending(outcomes, 1000, False, connection=Connection(exporter, 1, policy))
    root = Run(start("root"), None)
    child = Run(start("child", "root"), root)
    grandchild = Run(start("grandchild", "child"), child)
    jobs = [
        (grandchild, end("grandchild"), True),
        (child, end("child"), True),
        (root, end("root"), True),
    ]
    with anyio.fail_after(30):  # without the order, this waits until the deadline
        await last_attempt(jobs, s, deadline=time.monotonic() + 60)
    runs = exporter.by_run_id()
    assert {r: runs[r].status for r in runs} == dict.fromkeys(
        ("root", "child", "grandchild"), "FINISHED"
    )
    assert runs["child"].tags["mlflow.parentRunId"] == runs["root"].run_id
    assert runs["grandchild"].tags["mlflow.parentRunId"] == runs["child"].run_id


class SlowEnds(MemoryExporter):
    """A local store (one call at a time) on a loaded machine: the lanes' step batches hang
    until the close gives up on them, and each run's end takes 0.25 s."""

    END_S = 0.25

    def __init__(self) -> None:
        super().__init__(server=False)
        self.ending = threading.Event()  # the last attempt has begun

    def log_metrics(self, run_id: str, rows: Sequence[MetricRow]) -> None:
        self.ending.wait()
        super().log_metrics(run_id, rows)

    def set_terminated(self, run_id: str, status: str, end_ms: int) -> None:
        self.ending.set()
        time.sleep(self.END_S)
        super().set_terminated(run_id, status, end_ms)


def test_run_ends_that_outlast_the_reserve_still_all_come() -> None:
    """Six runs whose ends take longer, one after the other, than the seconds a close(2)
    keeps for its last attempt: they are all still FINISHED with their summaries (the last
    attempt may go on past the deadline to end runs; events are cut at the deadline), and
    the close returns within its grace."""
    timeout, runs = 2.0, [f"r{k}" for k in range(6)]
    assert len(runs) * SlowEnds.END_S > last_attempt_reserve(timeout)  # what is tried
    exporter = SlowEnds()
    sink = MLflowSink(True, experiment="e", exporter=exporter, handle_sigterm=False)
    for run_id in runs:
        sink.on_run_start(run_id, task="t", environment="e", params={})
    assert sink.flush(timeout=30)  # a signal: the runs are created
    for run_id in runs:
        for i in range(10):
            sink.on_step(run_id, event={"step": i, "reward": 0.5}, cumulative_reward=i)
        sink.on_run_end(
            run_id, result={"completed": True, "steps": 10, "total_reward": 7.0}, run_path=None
        )
    started = time.monotonic()
    assert not sink.close(timeout=timeout)  # the steps hang: it always runs out
    took = time.monotonic() - started
    status = sink.status()
    assert status["pending"] == 0 and status["failed"] > 0
    stored = exporter.by_run_id()
    assert {r: stored[r].status for r in runs} == dict.fromkeys(runs, "FINISHED")
    assert all(stored[r].metrics["total_reward"][0][0] == 7.0 for r in runs)
    assert took < timeout + JOIN_GRACE_S + 1.0
