"""Nothing lost, tried as a hostile user would: poison input, run boundaries under
backpressure, a close whose deadline runs out, a deleted experiment, sinks never closed.

After every close: each hook call is in exactly one counter of status() (pending 0), and
what a user would check in MLflow (through MlflowClient) is there.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Readback, capture_logs
from mlflow import MlflowClient
from support.checks import accounted
from support.children import python_result, run_python
from support.servers import free_port

from rlm_mlflow import MLflowSink
from rlm_mlflow._deadletter import DeadLetters
from rlm_mlflow._event import RunStart, Step
from rlm_mlflow._journal import Journal, journal_meta
from rlm_mlflow._replay import sync
from rlm_mlflow._settings import Settings


class Boom:
    """A value whose every use fails: repr, str, float, bool, hashing, iteration."""

    def __repr__(self) -> str:
        raise RuntimeError("no repr")

    __str__ = __repr__

    def __float__(self) -> float:
        raise RuntimeError("no float")

    def __bool__(self) -> bool:
        raise RuntimeError("no truth")

    def __hash__(self) -> int:
        raise RuntimeError("no hash")


class Counted:
    """The sink's hooks, counting every call made (what the counters must add up to)."""

    def __init__(self, sink: MLflowSink) -> None:
        self.sink, self.calls = sink, 0

    def start(self, run_id: Any, **kw: Any) -> None:
        self.calls += 1
        kw.setdefault("task", "t")
        kw.setdefault("environment", "e")
        kw.setdefault("params", {})
        self.sink.on_run_start(run_id, **kw)

    def step(self, run_id: Any, step: Any, reward: Any = 0.5, cumulative: Any = 1.0) -> None:
        self.calls += 1
        self.sink.on_step(
            run_id, event={"step": step, "reward": reward}, cumulative_reward=cumulative
        )

    def end(self, run_id: Any, result: Any = None, run_path: Any = None) -> None:
        self.calls += 1
        if result is None:
            result = {"completed": True, "steps": 1, "total_reward": 1.0}
        self.sink.on_run_end(run_id, result=result, run_path=run_path)


def test_poison_input_is_rejected_alone_and_the_worker_lives_on(
    tracking_uri: str, experiment: str, readback: Readback, tmp_path: Path
) -> None:
    cycle: dict[str, Any] = {}
    cycle["me"] = cycle
    hooks = Counted(MLflowSink(True, experiment=experiment, tracking_uri=tracking_uri))
    hooks.start("good", params={"model": "m"})
    for i in range(10):
        hooks.step("good", i)
    hooks.step(["x"], 0)  # a run id nobody can hash
    hooks.start(["y"])
    hooks.step({"a": 1}, 0)
    hooks.step("good", 10, reward=Boom())
    hooks.step("good", Boom())
    hooks.step("good", 11, cumulative=[1, 2])
    hooks.step("bad\udcffid", 0)  # a lone surrogate: no store can keep it
    hooks.start(
        "weird",
        task=Boom(),  # no length
        environment=Boom(),
        params={(1, 2): "tuple key", "cycle": cycle, "ok": 1, "boom": Boom(), "s": "x\udcff"},
    )
    hooks.step("weird", 0)
    hooks.end("weird", result=Boom(), run_path=Boom())
    for i in range(12, 20):
        hooks.step("good", i)
    hooks.end("good", run_path=str(tmp_path / "missing.jsonl"))
    assert hooks.sink.close(timeout=60)
    status = hooks.sink.status()
    assert status["pending"] == 0 and accounted(status) == hooks.calls
    assert status["rejected"] == 7  # the seven bad calls above
    assert status["delivered"] == 1 + 18 + 1 + 3  # good: start, steps, end; weird: all three
    assert status["retried"] == 0  # refused up front, never sent and retried
    runs = readback.runs()
    assert sorted(runs) == ["good", "weird"]
    good = readback.history(runs["good"], "step_reward")
    assert [m.step for m in good] == [*range(10), *range(12, 20)]
    assert runs["good"].info.status == runs["weird"].info.status == "FINISHED"
    assert runs["weird"].data.params == {"ok": "1"}  # the rest could not be logged: skipped
    assert runs["weird"].data.metrics["completed"] == 0.0


def test_a_poison_record_in_a_journal_is_skipped_and_the_rest_is_synced(
    tmp_path: Path, experiment: str, embedded_uri: str
) -> None:
    spool = tmp_path / "spool"
    settings = Settings(spool_dir=str(spool))
    for name in ("first", "second"):  # two journals of dead processes
        journal = Journal(spool, settings.spool_max_bytes, journal_meta(experiment, None))
        journal.append([RunStart(name, 1.0, "e", 1, {"k": 1}, f"key-{name}")])
        journal.append(
            [Step(["unhashable"], 0, 0.5, 0.5, 1.0), RunStart(["y"], 1.0, "e", 1, {}, "kk")]
        )
        journal.append([Step(name, i, 0.5, 0.5, 2.0) for i in range(5)])
        (journal.dir / "00000001.seg").open("ab").write(b"RLMJ\x00\x00\x00\x05garbage")
        journal.close(remove=False)
    summary = sync(spool, embedded_uri, settings, DeadLetters(tmp_path / "dead.jsonl"))
    assert summary.journals == 2 and summary.kept == 0
    assert summary.rejected == 4 and summary.corrupt_records == 2
    readback = Readback(embedded_uri, experiment)
    runs = readback.runs()
    assert sorted(runs) == ["first", "second"]
    for run in runs.values():
        assert [m.step for m in readback.history(run, "step_reward")] == list(range(5))
        assert run.info.status == "KILLED"  # never ended by its dead process


def test_run_boundaries_are_never_dropped_for_room(
    tracking_uri: str, experiment: str, readback: Readback
) -> None:
    hooks = Counted(
        MLflowSink(
            True,
            experiment=experiment,
            tracking_uri=tracking_uri,
            queue_size=10,
            when_full="drop_newest",
        )
    )
    hooks.start("A")
    for i in range(30):
        hooks.step("A", i)
    hooks.start("B")  # the buffer is full now: a start gets in all the same
    for i in range(100):
        hooks.step("B", i)
    hooks.end("B", result={"completed": True, "steps": 100, "total_reward": 1.0})
    hooks.end("A")
    assert hooks.sink.close(timeout=60)
    status = hooks.sink.status()
    assert status["pending"] == 0 and accounted(status) == hooks.calls
    assert status["rejected"] == 0  # a dropped step is counted dropped, never rejected
    runs = readback.runs()
    assert sorted(runs) == ["A", "B"]
    landed = sum(len(readback.history(run, "step_reward")) for run in runs.values())
    assert landed + status["dropped"] == 130
    assert status["delivered"] == landed + 4
    assert runs["B"].info.status == runs["A"].info.status == "FINISHED"
    assert runs["B"].data.metrics["steps"] == 100


def test_many_threads_under_backpressure_lose_no_run(mlflow_server: Any, experiment: str) -> None:
    sink = MLflowSink(
        True,
        experiment=experiment,
        tracking_uri=mlflow_server.url,
        queue_size=100,
        when_full="drop_newest",
    )
    calls = [0] * 8

    def run(k: int) -> None:
        sink.on_run_start(f"t{k}", task="t", environment="e", params={})
        for i in range(2_000):
            sink.on_step(f"t{k}", event={"step": i, "reward": 0.5}, cumulative_reward=i / 2)
        sink.on_run_end(f"t{k}", result={"completed": True, "steps": 2000}, run_path=None)
        calls[k] = 2_002

    threads = [threading.Thread(target=run, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sink.close(timeout=120)
    status = sink.status()
    assert status["pending"] == 0 and accounted(status) == sum(calls)
    assert status["rejected"] == 0
    readback = Readback(mlflow_server.url, experiment)
    runs = readback.runs()
    assert len(runs) == 8 and all(r.info.status == "FINISHED" for r in runs.values())
    landed = sum(len(readback.history(run, "cumulative_reward")) for run in runs.values())
    assert landed == status["delivered"] - 16 and landed + status["dropped"] == 16_000


def test_a_close_that_runs_out_still_ends_every_run_and_counts_every_event(
    embedded_uri: str, experiment: str, tmp_path: Path
) -> None:
    """A close whose deadline runs out (161,017 events are more than 2 s of work on any
    machine): the last attempt still ends every run, FINISHED with its summary (KILLED for
    the one never ended), and every hook call is in one counter. The runs are created
    before the flood (the flush says when), so that what the last attempt must do is the
    same on a quick machine and a loaded one: end nine runs, send eight summaries."""
    readback = Readback(embedded_uri, experiment)
    hooks = Counted(MLflowSink(True, experiment=experiment, tracking_uri=embedded_uri))
    threads_runs = [f"w{k}" for k in range(8)]
    for run_id in [*threads_runs, "never-ended"]:
        hooks.sink.on_run_start(run_id, task="t", environment="e", params={})
    assert hooks.sink.flush(timeout=60)  # a signal: the nine runs are in MLflow

    def run(run_id: str, steps: int, end: bool) -> None:
        for i in range(steps):
            hooks.sink.on_step(run_id, event={"step": i, "reward": 0.5}, cumulative_reward=i)
        if end:
            hooks.sink.on_run_end(
                run_id,
                result={"completed": True, "steps": steps, "total_reward": 7.0},
                run_path=None,
            )

    threads = [threading.Thread(target=run, args=(r, 20_000, True)) for r in threads_runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    run("never-ended", 1_000, end=False)
    ended_at = time.time()
    started = time.monotonic()
    assert not hooks.sink.close(timeout=2)
    took = time.monotonic() - started
    assert took < 2 + 2
    status = hooks.sink.status()
    calls = 8 * 20_002 + 1_001
    assert status["pending"] == 0 and accounted(status) == calls
    assert status["failed"] > 0 and status["delivered"] > 0
    runs = readback.runs()
    for run_id in threads_runs:
        mlflow_run = runs[run_id]
        assert mlflow_run.info.status == "FINISHED"  # its end came: ended with its summary
        assert mlflow_run.data.metrics["total_reward"] == 7.0
        assert mlflow_run.info.end_time >= int(ended_at * 1000) - 60_000
    assert runs["never-ended"].info.status == "KILLED"


def test_a_deleted_experiment_is_named_and_its_events_kept_for_a_sync(
    tracking_uri: str, experiment: str, tmp_path: Path
) -> None:
    client = MlflowClient(tracking_uri)
    client.delete_experiment(client.create_experiment(experiment))
    spool = tmp_path / "spool"
    hooks = Counted(
        MLflowSink(True, experiment=experiment, tracking_uri=tracking_uri, spool_dir=str(spool))
    )
    hooks.start("r")
    for i in range(50):
        hooks.step("r", i)
    hooks.end("r")
    hooks.sink.close(timeout=30)
    status = hooks.sink.status()
    assert status["available"] is False
    assert experiment in status["detail"] and "deleted" in status["detail"]
    assert "restore" in status["detail"]
    assert status["spooled"] == hooks.calls and status["dead_lettered"] == 0
    assert not (spool / "dead-letter.jsonl").exists()

    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    client.restore_experiment(experiment_id)
    summary = sync(spool, tracking_uri, Settings(), DeadLetters(spool / "dead-letter.jsonl"))
    assert summary.delivered == hooks.calls and summary.kept == 0
    run = Readback(tracking_uri, experiment).runs()["r"]
    assert run.info.status == "FINISHED" and run.data.metrics["steps"] == 1


def test_a_deleted_experiment_without_a_spool_counts_failed_not_dead_lettered(
    tracking_uri: str, experiment: str, tmp_path: Path
) -> None:
    client = MlflowClient(tracking_uri)
    client.delete_experiment(client.create_experiment(experiment))
    dead = tmp_path / "dead.jsonl"
    hooks = Counted(
        MLflowSink(
            True, experiment=experiment, tracking_uri=tracking_uri, dead_letter_file=str(dead)
        )
    )
    hooks.start("r")
    hooks.step("r", 0)
    hooks.end("r")
    hooks.sink.close(timeout=30)
    status = hooks.sink.status()
    assert status["failed"] == hooks.calls and status["pending"] == 0
    assert status["dead_lettered"] == 0 and not dead.exists()
    assert "deleted" in status["detail"] and status["available"] is False


def test_a_deleted_experiment_is_restored_when_the_setting_says_so(
    tracking_uri: str, experiment: str, readback: Readback
) -> None:
    client = MlflowClient(tracking_uri)
    client.delete_experiment(client.create_experiment(experiment))
    sink = MLflowSink(
        True, experiment=experiment, tracking_uri=tracking_uri, restore_deleted_experiment=True
    )
    sink.on_run_start("r", task="t", environment="e", params={})
    sink.on_run_end("r", result={"completed": True}, run_path=None)
    assert sink.close(timeout=30)
    assert client.get_experiment_by_name(experiment).lifecycle_stage == "active"
    assert readback.runs()["r"].info.status == "FINISHED"


def test_an_experiment_deleted_mid_run_stops_dead_letters(
    tracking_uri: str, experiment: str, tmp_path: Path
) -> None:
    dead = tmp_path / "dead.jsonl"
    hooks = Counted(
        MLflowSink(
            True, experiment=experiment, tracking_uri=tracking_uri, dead_letter_file=str(dead)
        )
    )
    hooks.start("before")
    hooks.step("before", 0)
    assert hooks.sink.flush(timeout=30)
    client = MlflowClient(tracking_uri)
    client.delete_experiment(client.get_experiment_by_name(experiment).experiment_id)
    for i in range(1, 20):
        hooks.step("before", i)
    hooks.end("before")
    hooks.start("after")
    hooks.end("after")
    hooks.sink.close(timeout=30)
    status = hooks.sink.status()
    assert status["pending"] == 0 and accounted(status) == hooks.calls
    assert status["delivered"] == 2 and status["failed"] == hooks.calls - 2
    assert "deleted" in status["detail"]
    assert status["dead_lettered"] == 0


IDLE = """
import json, threading, time
import rlm_mlflow._worker
rlm_mlflow._worker.IDLE_PARK_S = 0.5
from rlm_mlflow import MLflowSink
baseline = threading.active_count()
sinks = [MLflowSink(True, experiment={experiment!r}, tracking_uri={uri!r}) for _ in range(40)]
for k, sink in enumerate(sinks):
    sink.on_run_start(f"idle-{{k}}", task="t", environment="e", params={{}})
    sink.on_step(f"idle-{{k}}", event={{"step": 0, "reward": 1.0}}, cumulative_reward=1.0)
for sink in sinks:
    assert sink.flush(timeout=60)
deadline = time.monotonic() + 30
while threading.active_count() > baseline and time.monotonic() < deadline:
    time.sleep(0.2)
parked = threading.active_count() - baseline
sinks[0].on_step("idle-0", event={{"step": 1, "reward": 1.0}}, cumulative_reward=2.0)
assert sinks[0].flush(timeout=30)  # the next event started it again
print("RESULT", json.dumps({{"extra_threads": parked, "again": sinks[0].status()["delivered"]}}))
sinks.clear()  # dropped without close: the exit hook ends the 40 open runs as KILLED
"""


def test_idle_sinks_let_their_threads_go_and_exit_ends_their_runs(
    embedded_uri: str, experiment: str
) -> None:
    result = python_result(IDLE.format(experiment=experiment, uri=embedded_uri), timeout=240)
    assert result["extra_threads"] == 0 and result["again"] == 3
    runs = Readback(embedded_uri, experiment).runs()
    assert len(runs) == 40 and all(r.info.status == "KILLED" for r in runs.values())


UNREACHABLE = """
import time
from rlm_mlflow import MLflowSink
sinks = [MLflowSink(True, experiment="x", tracking_uri={uri!r}, close_timeout=3)
         for _ in range(30)]
for k, sink in enumerate(sinks):
    sink.on_run_start(f"r{{k}}", task="t", environment="e", params={{}})
print("exiting", time.monotonic(), flush=True)
"""


def test_exit_closes_every_live_sink_at_once_within_one_close_timeout() -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens: every close must time out
    done = run_python(UNREACHABLE.format(uri=uri))
    assert done.returncode == 0, done.stderr
    # from the child's "exiting" (CLOCK_MONOTONIC is the machine's, the same in both
    # processes) to its end: the closes at exit, without the interpreter's start
    took = time.monotonic() - float(done.stdout.split()[1])
    # one after the other they would take 30 x 3 s; together, about one close_timeout
    assert took < 3 * 5, f"exit took {took:.1f} s for 30 sinks of close_timeout 3"


def test_a_run_id_no_store_can_keep_is_rejected_at_once(embedded_uri: str, experiment: str) -> None:
    hooks = Counted(MLflowSink(True, experiment=experiment, tracking_uri=embedded_uri))
    hooks.start("lone\udcffsurrogate")
    hooks.step("lone\udcffsurrogate", 0)
    hooks.end("lone\udcffsurrogate")
    started = time.monotonic()
    assert hooks.sink.close(timeout=60)
    assert time.monotonic() - started < 10
    status = hooks.sink.status()
    assert status["rejected"] == 3 and status["retried"] == 0 and status["pending"] == 0


def test_an_unreadable_run_path_is_skipped_not_dead_lettered(
    tracking_uri: str, experiment: str, readback: Readback, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "trajectory.jsonl").write_text("{}\n")
    (run_dir / "loop").symlink_to(run_dir / "loop")  # a symlink loop: reading it fails
    dead = tmp_path / "dead.jsonl"
    sink = MLflowSink(
        True, experiment=experiment, tracking_uri=tracking_uri, dead_letter_file=str(dead)
    )
    sink.on_run_start("r", task="t", environment="e", params={})
    sink.on_run_end("r", result={"completed": True}, run_path=run_dir)
    assert sink.close(timeout=60)
    status = sink.status()
    assert status["dead_lettered"] == 0 and status["delivered"] == 2
    assert status["skipped"] >= 1 and not dead.exists()
    assert readback.runs()["r"].info.status == "FINISHED"


def test_a_blocked_burst_of_drops_is_logged_once_at_its_start_and_once_at_its_end() -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing drains: every put past 10 waits, drops
    sink = MLflowSink(True, experiment="x", tracking_uri=uri, queue_size=10, put_timeout=0.02)
    with capture_logs() as logs:
        sink.on_run_start("r", task="t", environment="e", params={})
        for i in range(60):
            sink.on_step("r", event={"step": i, "reward": 1.0}, cumulative_reward=float(i))
        sink.close(timeout=2)
    status = sink.status()
    assert status["dropped"] >= 40 and status["pending"] == 0
    assert accounted(status) == 61
    lines = [e for e in logs if "dropped" in e["event"]]
    assert [e["event"] for e in lines] == ["events dropped", "events dropped in the last burst"]
    assert lines[-1]["dropped"] == status["dropped"]


def test_a_crash_of_the_worker_loop_restarts_it_and_loses_nothing_queued(
    embedded_uri: str, experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rlm_mlflow._worker import Worker

    original = Worker._report_drops
    armed: list[bool] = []

    def crash_once_armed(self: Worker, quiet: float) -> None:
        if armed and armed[0]:
            armed[0] = False
            raise RuntimeError("a bug in the loop")
        original(self, quiet)

    monkeypatch.setattr(Worker, "_report_drops", crash_once_armed)
    readback = Readback(embedded_uri, experiment)
    hooks = Counted(MLflowSink(True, experiment=experiment, tracking_uri=embedded_uri))
    hooks.start("r")
    for i in range(50):
        hooks.step("r", i)
    assert hooks.sink.flush(timeout=60)
    armed.append(True)  # the next turn of the loop crashes, with these 50 steps in flight or not
    for i in range(50, 100):
        hooks.step("r", i)
    hooks.sink.flush(timeout=60)
    for i in range(100, 120):
        hooks.step("r", i)
    hooks.end("r")
    assert hooks.sink.close(timeout=60)
    status = hooks.sink.status()
    assert armed == [False] and "crashed" in (status["last_error"] or "")
    assert status["pending"] == 0 and accounted(status) == hooks.calls
    assert status["failed"] in (0, 50)  # what was in flight when it crashed
    run = readback.runs()["r"]
    assert run.info.status == "FINISHED"  # the loop went on: later events landed
    steps = [m.step for m in readback.history(run, "step_reward")]
    assert steps[:50] == list(range(50)) and steps[-20:] == list(range(100, 120))
    assert len(steps) == status["delivered"] - 2
