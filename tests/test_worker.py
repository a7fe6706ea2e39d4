"""The forwarding logic on the in-memory exporter: fast, exhaustive, real threads.

A hypothesis state machine drives a sink with random interleavings of hook calls (valid and
not), flushes, failures (transient, permanent) and a close; after each flush and at the end
every call is in exactly one counter, and what reached the exporter keeps the order
promised: a child run is created after its parent, a run is terminated after all its
batches. The real-server tests stay; these add the interleavings a server test cannot.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from support.checks import accounted
from support.memory import MemoryExporter

from rlm_mlflow import MLflowSink
from rlm_mlflow import _connect as exporter_module
from rlm_mlflow._event import RunStart, Step
from rlm_mlflow._journal import Journal


class Forwarding(RuleBasedStateMachine):
    """One sink, one in-memory exporter, any sequence of what a caller and a server do."""

    @initialize()
    def open_sink(self) -> None:
        self._pace = exporter_module.MISCONFIGURED_RETRY_S
        exporter_module.MISCONFIGURED_RETRY_S = (0.005, 0.02)  # the slow pace, made quick
        self.exporter = MemoryExporter()
        self.dir = Path(tempfile.mkdtemp(prefix="rlm-mlflow-sm-"))
        self.sink = MLflowSink(
            True,
            experiment="sm",
            exporter=self.exporter,
            retry_deadline=1.0,
            flush_interval=0.05,
            close_timeout=30,
            dead_letter_file=str(self.dir / "dead.jsonl"),
            batch_size=10,
        )
        self.calls = 0
        self.open: list[str] = []
        self.parent: dict[str, str] = {}
        self.next_step: dict[str, int] = {}
        self.failures = False
        self.closed = False
        self.counter = 0

    @rule(child=st.booleans())
    def start(self, child: bool) -> None:
        self.counter += 1
        run_id = f"r{self.counter}"
        params: dict[str, Any] = {"n": self.counter}
        if child and self.open:
            params["parent_run_id"] = self.parent[run_id] = self.open[-1]
        self.sink.on_run_start(run_id, task="t", environment="e", params=params)
        self.calls += 1
        if not self.closed:
            self.open.append(run_id)
            self.next_step[run_id] = 0

    @precondition(lambda self: bool(self.open))
    @rule(data=st.data(), steps=st.integers(1, 40))
    def steps(self, data: st.DataObject, steps: int) -> None:
        run_id = data.draw(st.sampled_from(self.open))
        for _ in range(steps):
            step = self.next_step[run_id]
            self.next_step[run_id] += 1
            self.sink.on_step(run_id, event={"step": step, "reward": 0.5}, cumulative_reward=1.0)
            self.calls += 1

    @rule(
        run_id=st.sampled_from(["", None, 3, ["x"], "unknown"]),
        reward=st.sampled_from([None, "x", float("nan"), 1.0]),
    )
    def bad_step(self, run_id: Any, reward: Any) -> None:
        self.sink.on_step(run_id, event={"step": 0, "reward": reward}, cumulative_reward=1.0)
        self.calls += 1

    @precondition(lambda self: bool(self.open))
    @rule(data=st.data())
    def end(self, data: st.DataObject) -> None:
        run_id = data.draw(st.sampled_from(self.open))
        self.open.remove(run_id)
        result = {"completed": True, "steps": self.next_step[run_id], "total_reward": 1.0}
        self.sink.on_run_end(run_id, result=result, run_path=None)
        self.calls += 1

    @rule(
        call=st.sampled_from(["create_run", "log_params", "log_metrics", "set_terminated"]),
        times=st.integers(1, 2),
        permanent=st.booleans(),
    )
    def server_trouble(self, call: str, times: int, permanent: bool) -> None:
        """Transient trouble (retried within the deadline), or MLflow refusing a call for
        good; never ``set_terminated`` for good (MLflow refuses no valid end)."""
        self.failures = True
        self.exporter.fail(call, times, permanent=permanent and call != "set_terminated")

    @rule(
        call=st.sampled_from(["create_run", "log_params", "log_metrics", "set_terminated"]),
        times=st.integers(1, 3),
    )
    def refused_for_configuration(self, call: str, times: int) -> None:
        """A wrong password for a while: tried again until it goes, nothing given up."""
        self.exporter.misconfigure(call, times)

    @rule()
    def flush(self) -> None:
        assert self.sink.flush(timeout=30)
        self.check_counts()

    @precondition(lambda self: not self.closed)
    @rule()
    def close(self) -> None:
        assert self.sink.close(timeout=30)
        self.closed = True
        self.open.clear()
        self.check_counts()

    def check_counts(self) -> None:
        status = self.sink.status()
        assert status["pending"] == 0, status
        assert accounted(status) == self.calls, status

    @invariant()
    def never_more_counted_than_called(self) -> None:
        if hasattr(self, "sink"):
            status = self.sink.status()
            assert accounted(status) + status["pending"] == self.calls

    def teardown(self) -> None:
        if not hasattr(self, "sink"):
            return
        assert self.sink.close(timeout=30)
        self.check_counts()
        exporter_module.MISCONFIGURED_RETRY_S = self._pace
        assert self.sink.status()["dead_lettered"] == 0 or self.failures
        order = self.exporter.calls
        runs = self.exporter.by_run_id()
        position = {}
        for i, (call, mlflow_id) in enumerate(order):
            position.setdefault((call, mlflow_id), []).append(i)
        creation = {run.run_id: n for n, run in enumerate(self.exporter.runs.values())}
        for run_id, run in runs.items():
            parent = self.parent.get(run_id)
            if parent in runs:  # a child is created after its parent, and names it
                assert creation[run.run_id] > creation[runs[parent].run_id]
                assert run.tags["mlflow.parentRunId"] == runs[parent].run_id
            ends = position.get(("set_terminated", run.run_id), [])
            batches = position.get(("log_metrics", run.run_id), [])
            if ends and batches and run.status == "FINISHED":
                # terminated only after every batch of it (the summary is the last batch)
                assert max(batches) < max(ends)
            assert run.status != "RUNNING", run_id
            if not self.failures:
                assert self.exporter.steps(run) == list(range(len(self.exporter.steps(run))))


Forwarding.TestCase.settings = settings(
    max_examples=50,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_forwarding = Forwarding.TestCase


def test_an_ack_never_passes_an_unfinished_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a spool: whenever the journal acknowledges a position, every step journalled
    before it has reached the exporter (through transient failures and retries)."""
    exporter = MemoryExporter()
    exporter.fail("log_metrics", 3)  # the first batches need retries
    journalled: list[tuple[tuple[int, int], list[int]]] = []
    original_append, original_ack = Journal.append, Journal.ack

    def append(self: Journal, events: Any) -> tuple[int, int]:
        position = original_append(self, events)
        journalled.append((position, [e.step for e in events if isinstance(e, Step)]))
        return position

    acked: list[tuple[int, int]] = []

    def ack(self: Journal, position: tuple[int, int], open_runs: list[RunStart]) -> None:
        landed = set(exporter.steps(exporter.by_run_id()["r"])) if exporter.runs else set()
        for at, steps in journalled:
            if at <= position:
                assert set(steps) <= landed, (position, steps)
        acked.append(position)
        original_ack(self, position, open_runs)

    monkeypatch.setattr(Journal, "append", append)
    monkeypatch.setattr(Journal, "ack", ack)
    sink = MLflowSink(
        True,
        experiment="acks",
        exporter=exporter,
        spool_dir=str(tmp_path / "spool"),
        flush_interval=0.02,
        batch_size=20,
    )
    sink.on_run_start("r", task="t", environment="e", params={})
    for step in range(500):
        sink.on_step("r", event={"step": step, "reward": 0.5}, cumulative_reward=1.0)
        if step % 100 == 99:
            assert sink.flush(timeout=30)
    sink.on_run_end("r", result={"completed": True}, run_path=None)
    assert sink.close(timeout=30)
    assert acked, "the journal was acknowledged as the worker went"
    assert exporter.steps(exporter.by_run_id()["r"]) == list(range(500))
    assert sink.status()["delivered"] == 502


def test_a_refused_entity_is_isolated_and_its_batch_neighbours_land() -> None:
    exporter = MemoryExporter()
    exporter.refuse = lambda call, row: call == "log_metrics" and row[3] == 137
    sink = MLflowSink(True, experiment="bisect", exporter=exporter, batch_size=1000)
    sink.on_run_start("r", task="t", environment="e", params={})
    for step in range(1000):
        sink.on_step("r", event={"step": step, "reward": 0.5}, cumulative_reward=1.0)
    sink.on_run_end("r", result={"completed": True}, run_path=None)
    with tempfile.TemporaryDirectory() as tmp:
        sink.dead_letters.path = Path(tmp) / "dead.jsonl"
        assert sink.close(timeout=30)
    status = sink.status()
    assert (status["delivered"], status["dead_lettered"]) == (1 + 999 + 1, 1)
    assert exporter.steps(exporter.by_run_id()["r"]) == [s for s in range(1000) if s != 137]
    metric_calls = sum(1 for call, _ in exporter.calls if call == "log_metrics")
    assert metric_calls <= 40  # halving: two calls per level of 2,000 rows, not one per row
