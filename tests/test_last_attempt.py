"""The close's last attempt alone (`_run_calls.last_attempt`), against the in-memory exporter:
what it does for runs that were never created."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest
from support.memory import MemoryExporter

from rlm_mlflow._connect import Connection, RetryPolicy
from rlm_mlflow._deadletter import DeadLetters
from rlm_mlflow._event import RunEnd, RunStart
from rlm_mlflow._outcomes import Outcomes
from rlm_mlflow._run import Run
from rlm_mlflow._run_calls import last_attempt
from rlm_mlflow._sending import Sending


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
