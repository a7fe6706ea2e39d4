"""MLflowSink end to end: hooks in, MLflow read back, on the embedded store and a real server."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from conftest import Readback, capture_logs
from support.trajectories import Result

from rlm_mlflow import MLflowSink


def reward_at(run_id: str, step: int) -> float:
    """Distinct, exactly representable values, so a misplaced point is caught."""
    return (hash((run_id, step)) % 1000) / 8


def drive(
    sink: MLflowSink,
    run_id: str,
    steps: int,
    run_dir: Path,
    params: dict[str, Any] | None = None,
    end: bool = True,
) -> float:
    """One run through the three hooks, as rlm-code's runner calls them."""
    sink.on_run_start(
        run_id,
        task="Create a DSPy signature",
        environment="dspy",
        params={"max_steps": steps, "model": "test-model", **(params or {})},
    )
    cumulative = 0.0
    path = run_dir / f"{run_id}.jsonl"
    with path.open("w") as out:
        for step in range(steps):
            reward = reward_at(run_id, step)
            cumulative += reward
            out.write(f'{{"step": {step}}}\n')
            sink.on_step(
                run_id,
                event={
                    "step": step,
                    "reward": reward,
                    "action": {},
                    "observation": {"success": True},
                },
                cumulative_reward=cumulative,
            )
    if end:
        sink.on_run_end(run_id, result=Result(True, steps, cumulative), run_path=path)
    return cumulative


def assert_complete(readback: Readback, run: Any, run_id: str, steps: int) -> None:
    """Every step metric exactly once, at its step, with its value; the summary; FINISHED."""
    rewards = readback.history(run, "step_reward")
    cumulative = readback.history(run, "cumulative_reward")
    assert [m.step for m in rewards] == list(range(steps))
    assert [m.step for m in cumulative] == list(range(steps))
    assert [m.value for m in rewards] == [reward_at(run_id, s) for s in range(steps)]
    total = 0.0
    for m in cumulative:
        total += reward_at(run_id, m.step)
        assert m.value == total
    assert run.data.metrics["completed"] == 1.0
    assert run.data.metrics["steps"] == steps
    assert run.data.metrics["total_reward"] == total
    assert run.info.status == "FINISHED"


def test_a_2000_step_run_lands_complete(
    tracking_uri: str, experiment: str, readback: Readback, run_dir: Path
) -> None:
    sink = MLflowSink(True, experiment=experiment, tracking_uri=tracking_uri)
    drive(
        sink,
        "run-2000",
        2000,
        run_dir,
        params={"temperature": 0.2, "verbose": True, "note": None, "tools": ["a", "b"]},
    )
    assert sink.close(timeout=60)

    runs = readback.runs()
    assert list(runs) == ["run-2000"]
    run = runs["run-2000"]
    assert_complete(readback, run, "run-2000", 2000)
    assert run.info.run_name == "run-2000"
    assert run.data.params == {
        "environment": "dspy",
        "task_chars": str(len("Create a DSPy signature")),
        "max_steps": "2000",
        "model": "test-model",
        "temperature": "0.2",
        "verbose": "True",
        "note": "None",
    }  # the list param is skipped, as in the seed
    assert run.data.tags["run_id"] == "run-2000"
    assert run.data.tags["component"] == "rlm-code-rlm"
    assert readback.artifacts(run) == ["run-2000.jsonl"]

    status = sink.status()
    assert status["delivered"] == 2002  # start + 2000 steps + end
    assert (status["failed"], status["dropped"], status["rejected"], status["pending"]) == (
        0,
        0,
        0,
        0,
    )
    assert status["skipped"] == 1  # the non-scalar param


def test_a_directory_run_path_is_uploaded_with_its_files(
    tracking_uri: str, experiment: str, readback: Readback, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run-dir"
    (run_dir / "code").mkdir(parents=True)
    (run_dir / "code" / "solution.py").write_text("print('hi')\n")
    with MLflowSink(True, experiment=experiment, tracking_uri=tracking_uri) as sink:
        sink.on_run_start("dir-run", task="t", environment="e", params={})
        sink.on_run_end("dir-run", result=Result(True, 0, 0.0), run_path=run_dir)
    run = readback.runs()["dir-run"]
    assert readback.artifacts(run) == ["run-dir"]
    assert readback.artifacts(run, "run-dir/code") == ["run-dir/code/solution.py"]


def test_8_threads_with_4_interleaved_runs_each(
    tracking_uri: str, experiment: str, readback: Readback, run_dir: Path
) -> None:
    steps = 150
    sink = MLflowSink(True, experiment=experiment, tracking_uri=tracking_uri)

    def worker(t: int) -> None:
        ids = [f"t{t}-r{r}" for r in range(4)]
        totals = dict.fromkeys(ids, 0.0)
        for run_id in ids:
            sink.on_run_start(run_id, task="x" * t, environment="env", params={"thread": t})
        for step in range(steps):
            for run_id in ids:
                totals[run_id] += reward_at(run_id, step)
                sink.on_step(
                    run_id,
                    event={"step": step, "reward": reward_at(run_id, step)},
                    cumulative_reward=totals[run_id],
                )
        for run_id in ids:
            sink.on_run_end(run_id, result=Result(True, steps, totals[run_id]), run_path=None)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sink.close(timeout=120)

    runs = readback.runs()
    assert sorted(runs) == sorted(f"t{t}-r{r}" for t in range(8) for r in range(4))
    for run_id, run in runs.items():
        assert_complete(readback, run, run_id, steps)
    assert sink.status()["delivered"] == 32 * (steps + 2)


def test_children_running_in_parallel_threads_are_nested_under_their_parent(
    tracking_uri: str, experiment: str, readback: Readback, run_dir: Path
) -> None:
    sink = MLflowSink(True, experiment=experiment, tracking_uri=tracking_uri)
    sink.on_run_start("root", task="solve", environment="dspy", params={"depth": 0})
    children = [
        threading.Thread(
            target=drive,
            args=(sink, f"root.{i}", 300, run_dir),
            kwargs={"params": {"parent_run_id": "root", "depth": 1}},
        )
        for i in range(2)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join()
    sink.on_run_end("root", result=Result(True, 0, 0.0), run_path=None)
    assert sink.close(timeout=60)

    runs = readback.runs()
    root = runs["root"]
    assert "mlflow.parentRunId" not in root.data.tags
    for i in range(2):
        child = runs[f"root.{i}"]
        assert child.data.tags["mlflow.parentRunId"] == root.info.run_id
        assert child.data.params["parent_run_id"] == "root"
        assert child.data.params["depth"] == "1"
        assert_complete(readback, child, f"root.{i}", 300)
    assert root.info.status == "FINISHED"


def test_flush_then_more_steps_then_close(
    tracking_uri: str, experiment: str, readback: Readback, run_dir: Path
) -> None:
    # A long flush interval: only flush() and close() make the worker send.
    sink = MLflowSink(True, experiment=experiment, tracking_uri=tracking_uri, flush_interval=60)
    sink.on_run_start("r", task="t", environment="e", params={})
    cumulative = 0.0
    for step in range(100):
        cumulative += reward_at("r", step)
        sink.on_step(
            "r", event={"step": step, "reward": reward_at("r", step)}, cumulative_reward=cumulative
        )
    assert sink.flush(timeout=30)
    run = readback.runs()["r"]
    assert len(readback.history(run, "step_reward")) == 100
    assert readback.client.get_run(run.info.run_id).info.status == "RUNNING"

    for step in range(100, 250):
        cumulative += reward_at("r", step)
        sink.on_step(
            "r", event={"step": step, "reward": reward_at("r", step)}, cumulative_reward=cumulative
        )
    sink.on_run_end("r", result=Result(True, 250, cumulative), run_path=run_dir / "absent")
    assert sink.close(timeout=30)
    run = readback.client.get_run(run.info.run_id)
    assert_complete(readback, run, "r", 250)
    assert readback.artifacts(run) == []  # the run path did not exist
    assert sink.status()["skipped"] == 1


def test_hooks_after_close_do_nothing_harmful(
    tracking_uri: str, experiment: str, readback: Readback, run_dir: Path
) -> None:
    sink = MLflowSink(True, experiment=experiment, tracking_uri=tracking_uri)
    drive(sink, "done", 10, run_dir)
    assert sink.close(timeout=30)
    before = sink.status()

    started = time.perf_counter()
    sink.on_run_start("late", task="t", environment="e", params={})
    for step in range(100):
        sink.on_step("done", event={"step": 100 + step, "reward": 1.0}, cumulative_reward=1.0)
    sink.on_run_end("done", result=Result(True, 1, 1.0), run_path=None)
    elapsed = time.perf_counter() - started
    assert sink.close() is True  # idempotent
    assert sink.flush() is True

    after = sink.status()
    assert after["dropped"] - before["dropped"] == 102
    assert after["delivered"] == before["delivered"] == 12
    assert elapsed < 1.0, "hooks after close must not wait for the buffer"
    runs = readback.runs()
    assert list(runs) == ["done"]
    assert len(readback.history(runs["done"], "step_reward")) == 10


def test_close_ends_runs_never_ended_as_killed(
    tracking_uri: str, experiment: str, readback: Readback, run_dir: Path
) -> None:
    sink = MLflowSink(True, experiment=experiment, tracking_uri=tracking_uri)
    drive(sink, "abandoned", 50, run_dir, end=False)
    assert sink.close(timeout=30)
    run = readback.runs()["abandoned"]
    assert run.info.status == "KILLED"
    assert len(readback.history(run, "step_reward")) == 50
    assert "completed" not in run.data.metrics  # no summary was ever given
    status = sink.status()  # the sink's own KILLED end is not counted as a caller's event
    assert (status["delivered"], status["pending"], status["failed"]) == (51, 0, 0)


def test_stored_time_is_the_hooks_time_not_the_send_time(
    tracking_uri: str, experiment: str, readback: Readback
) -> None:
    sink = MLflowSink(True, experiment=experiment, tracking_uri=tracking_uri, flush_interval=60)
    t0 = time.time()
    sink.on_run_start("timed", task="t", environment="e", params={})
    sink.on_step("timed", event={"step": 0, "reward": 1.0}, cumulative_reward=1.0)
    t1 = time.time()
    time.sleep(1.5)
    sink.on_run_end("timed", result=Result(True, 1, 1.0), run_path=None)
    t2 = time.time()
    sent_from = time.time()
    assert sink.close(timeout=30)

    run = readback.runs()["timed"]
    (point,) = readback.history(run, "step_reward")
    assert int(t0 * 1000) <= point.timestamp <= int(t1 * 1000) + 1
    assert point.timestamp < int(sent_from * 1000) - 1400
    assert int(t0 * 1000) <= run.info.start_time <= int(t1 * 1000) + 1
    assert int(t1 * 1000) <= run.info.end_time <= int(t2 * 1000) + 1


def test_bad_events_are_counted_and_their_neighbours_land(
    tracking_uri: str, experiment: str, readback: Readback
) -> None:
    bad_rewards: dict[int, object] = {
        2: None,
        4: "high",
        5: True,
        6: float("nan"),
        7: float("inf"),
        8: -float("inf"),
    }
    sink = MLflowSink(True, experiment=experiment, tracking_uri=tracking_uri)
    with capture_logs() as logs:
        sink.on_step("early", event={"step": 0, "reward": 1.0}, cumulative_reward=1.0)
        sink.on_run_start(
            "r",
            task="x" * 10_000_000,
            environment="e",
            params={"ok": 1, "bad key!": 2, "nested": {"a": 1}, "huge": "y" * 7000},
        )
        for step in range(20):
            reward = bad_rewards.get(step, np.float32(0.5) if step % 2 else 1.0)
            sink.on_step("r", event={"step": step, "reward": reward}, cumulative_reward=1.0)
        sink.on_step("r", event={"step": 3, "reward": 9.0}, cumulative_reward=9.0)  # repeated
        sink.on_step("r", event={"step": -1, "reward": 1.0}, cumulative_reward=1.0)
        sink.on_step("r", event={"step": 1.5, "reward": 1.0}, cumulative_reward=1.0)
        sink.on_step("r", event={"reward": 1.0}, cumulative_reward=1.0)  # no step
        sink.on_step("r", event=None, cumulative_reward=1.0)  # type: ignore[arg-type]
        sink.on_run_end("r", result=Result(True, 20, 9.0), run_path=None)
        sink.on_run_end("r", result=Result(True, 20, 9.0), run_path=None)  # ended twice
        sink.on_run_end("ghost", result=Result(True, 1, 1.0), run_path=None)  # never started
        assert sink.close(timeout=60)

    run = readback.runs()["r"]
    good = [s for s in range(20) if s not in bad_rewards]
    history = readback.history(run, "step_reward")
    assert [m.step for m in history] == good
    assert {m.step: m.value for m in history}[3] == 0.5  # step 3 kept its first value
    assert run.data.params == {"ok": "1", "environment": "e", "task_chars": "10000000"}
    assert run.info.status == "FINISHED"
    status = sink.status()
    # step before start; 6 bad rewards; repeated, negative, fractional and missing steps;
    # an event that is not a mapping; a second end; an end of a run never started
    assert status["rejected"] == 1 + 6 + 4 + 1 + 2
    assert status["skipped"] == 3  # the three params MLflow would refuse or the seed skips
    assert (status["delivered"], status["failed"], status["pending"]) == (2 + len(good), 0, 0)
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert all("reason" in e or "params" in e or "error" in e for e in warnings)
    assert len(warnings) < 12, "rejections are logged once per run and hook, not per event"


def test_a_hook_fed_unreadable_input_in_a_loop_logs_once_and_counts_every_call() -> None:
    """A loop that hands a hook something it cannot read at every step (here, an ``event``
    that is not a mapping) must not flood the host's log: one line per run, hook and kind of
    error; every call counted in ``rejected``."""
    sink = MLflowSink(True, experiment="x", tracking_uri="http://127.0.0.1:9")
    with capture_logs() as logs:
        for _ in range(1_000):
            sink.on_step("flood", event=None, cumulative_reward=1.0)  # type: ignore[arg-type]
        sink.on_step("other", event=None, cumulative_reward=1.0)  # type: ignore[arg-type]
        status = sink.status()
    sink.close(timeout=0)
    said = [e for e in logs if str(e["event"]).startswith("hook input rejected")]
    assert [e["run_id"] for e in said] == ["flood", "other"]
    assert status["rejected"] == 1_001
