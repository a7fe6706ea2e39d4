"""Replay of what a spool holds, as a user checks it in MLflow: each journal lands at the
destination it names and nowhere else, its spans travel with it, and a run's end is kept."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Readback
from mlflow import MlflowClient
from support.children import CLI, run_python
from support.servers import FaultProxy, MlflowServer
from support.trajectories import attribute, rlm_run, traces_of

from rlm_mlflow import MLflowSink
from rlm_mlflow._deadletter import DeadLetters
from rlm_mlflow._event import RunStart, Step
from rlm_mlflow._journal import Journal, journal_meta
from rlm_mlflow._replay import sync
from rlm_mlflow._settings import Settings


def cli_sync(spool: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``rlm-mlflow sync SPOOL ARGS`` as a user types it: no MLFLOW_TRACKING_URI set."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run(
        [CLI, "sync", str(spool), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def journals(spool: Path) -> list[Path]:
    return sorted(spool.glob("journal-*"))


def steps_of(readback: Readback, run: Any) -> list[int]:
    return [m.step for m in readback.history(run, "step_reward")]


def test_replay_never_changes_the_status_of_a_run_that_ended(
    tmp_path: Path, tracking_uri: str, experiment: str, readback: Readback
) -> None:
    # Two runs the journal holds open (no end record, no ack: a torn journal). In MLflow one
    # ended FINISHED (its process delivered everything), the other is still RUNNING.
    client = readback.client
    experiment_id = client.create_experiment(experiment)
    created = {}
    for name in ("ended", "open"):
        run = client.create_run(
            experiment_id, run_name=name, tags={"rlm_mlflow.run_key": f"k-{name}", "run_id": name}
        )
        created[name] = run.info.run_id
    client.set_terminated(created["ended"], "FINISHED", end_time=1_700_000_000_000)
    spool = tmp_path / "spool"
    journal = Journal(spool, 1 << 30, journal_meta(experiment, tracking_uri))
    now = time.time()
    for name in ("ended", "open"):
        journal.append(
            [
                RunStart(name, now, "env", 1, {}, f"k-{name}"),
                *(Step(name, i, 0.5, 0.5 * i, now) for i in range(3)),
            ]
        )
    journal.close(remove=False)

    summary = sync(spool, tracking_uri, Settings(), DeadLetters(tmp_path / "dead.jsonl"))

    assert (summary.journals, summary.kept, summary.failed) == (1, 0, 0)
    runs = readback.runs()
    ended, killed = runs["ended"], runs["open"]
    assert ended.info.status == "FINISHED" and ended.info.end_time == 1_700_000_000_000
    assert killed.info.status == "KILLED"  # open in the journal and in MLflow: ended by us
    for run in (ended, killed):
        assert [m.step for m in readback.history(run, "step_reward")] == [0, 1, 2]
    assert not list(spool.glob("journal-*"))


WRITER = """
import json
from rlm_mlflow import MLflowSink
sink = MLflowSink(True, experiment={experiment!r}, tracking_uri={uri!r}, spool_dir={spool!r},
                  retry_deadline=1, handle_sigterm=False)
sink.on_run_start("a-run", task="t", environment="e", params={{"side": "a"}})
for step in range({steps}):
    sink.on_step("a-run", event={{"step": step, "reward": 0.5}}, cumulative_reward=step / 2)
sink.on_run_end("a-run", result={{"completed": True, "steps": {steps}, "total_reward": 1.0}},
                run_path=None)
sink.close(timeout=3)
print(json.dumps(sink.status()))
"""


def test_a_spool_shared_by_two_destinations_sends_each_journal_to_its_own(
    tmp_path: Path, mlflow_server: MlflowServer, embedded_uri: str, experiment: str
) -> None:
    spool = tmp_path / "spool"
    a, b = f"{experiment}-a", f"{experiment}-b"
    with FaultProxy(mlflow_server.port) as proxy:  # destination A: a server, down for now
        proxy.down = True
        code = WRITER.format(experiment=a, uri=proxy.url, spool=str(spool), steps=100)
        writer = run_python(code, check=True)
        assert json.loads(writer.stdout)["spooled"] == 102  # A's process is gone
        (journal_a,) = journals(spool)

        # Process B: another store, another experiment, the same spool.
        sink_b = MLflowSink(True, experiment=b, tracking_uri=embedded_uri, spool_dir=str(spool))
        rlm_run(sink_b, "b-run", 3)
        assert sink_b.close(timeout=60)
        assert sink_b.replayed is not None and sink_b.replayed.journals == 0
        assert MlflowClient(embedded_uri).get_experiment_by_name(a) is None  # nothing of A
        assert list(Readback(embedded_uri, b).runs()) == ["b-run"]
        assert journals(spool) == [journal_a]  # A's journal stays, whole

        only_b = cli_sync(spool, "--tracking-uri", embedded_uri)
        assert only_b.returncode == 0, only_b.stderr
        assert "synced 0 journal(s)" in only_b.stdout
        assert f"left 1 journal(s) for other destinations: {proxy.url} (experiment {a})" in (
            only_b.stdout
        )
        assert journals(spool) == [journal_a]

        proxy.down = False  # A's server is back
        each = cli_sync(spool)
        assert each.returncode == 0, each.stderr
        assert f"synced 1 journal(s) to {proxy.url}:" in each.stdout
        again = cli_sync(spool)
        assert again.returncode == 0 and "synced 0 journal(s)" in again.stdout

    readback = Readback(mlflow_server.url, a)
    run = readback.runs()["a-run"]
    assert steps_of(readback, run) == list(range(100))  # exactly once
    assert run.info.status == "FINISHED" and run.data.params["side"] == "a"
    assert journals(spool) == []
    assert MlflowClient(embedded_uri).get_experiment_by_name(a) is None


class Outage:
    """A store that is down, then up: the embedded one behind a path that cannot be created
    (a file where its directory goes), or a server behind a proxy that resets everything."""

    def __init__(self, kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        self.proxy: FaultProxy | None = None
        if kind == "embedded":
            self.blocker = tmp_path / "store"
            self.blocker.touch()
            self.uri = self.readback_uri = f"sqlite:///{self.blocker / 'mlflow.db'}"
        else:
            server: MlflowServer = request.getfixturevalue("mlflow_server")
            self.proxy = FaultProxy(server.port).__enter__()
            self.proxy.down = True
            self.uri, self.readback_uri = self.proxy.url, server.url

    def up(self) -> None:
        if self.proxy is not None:
            self.proxy.down = False
        else:
            self.blocker.unlink()

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.__exit__()


@pytest.fixture(params=["embedded", "server"])
def outage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Outage]:
    store = Outage(request.param, tmp_path, request)
    try:
        yield store
    finally:
        store.close()


def spooled_traced_run(spool: Path, uri: str, experiment: str, run_id: str) -> None:
    """A traced run of 5 steps while its store is down: all of it waits in the spool."""
    sink = MLflowSink(
        True,
        experiment=experiment,
        tracking_uri=uri,
        spool_dir=str(spool),
        traces=True,
        retry_deadline=1,
    )
    rlm_run(sink, run_id, 5)
    assert not sink.close(timeout=3)
    assert sink.status()["spooled"] == 7


def assert_one_trace_with_every_step_once(readback: Readback, run_id: str) -> None:
    run = readback.runs()[run_id]
    assert run.info.status == "FINISHED"
    (trace,) = traces_of(readback.client, run)  # in the run's Traces tab
    spans = trace.data.spans
    (root,) = [s for s in spans if s.parent_id is None]
    assert root.name == run_id and root.outputs["final_response"] == f"answer of {run_id}"
    assert sorted(attribute(s, "rlm.step") for s in spans if s.parent_id) == [1, 2, 3, 4, 5]
    assert trace.info.token_usage["input_tokens"] == 500
    assert steps_of(readback, run) == [1, 2, 3, 4, 5]
    assert run.data.metrics["total_prompt_tokens"] == 500
    # its score as feedback, once each however often the journal was replayed
    feedback = sorted((a.name, a.value) for a in trace.info.assessments)
    assert feedback == [("completed", True), ("steps", 5), ("total_reward", 2.5)]


def test_spans_travel_with_the_journal_whatever_the_replays_traces_setting(
    tmp_path: Path, outage: Outage, experiment: str
) -> None:
    by_sync, by_sink = tmp_path / "spool-sync", tmp_path / "spool-sink"
    spooled_traced_run(by_sync, outage.uri, experiment, "by-sync")
    spooled_traced_run(by_sink, outage.uri, experiment, "by-sink")
    copy = shutil.copytree(by_sync, tmp_path / "copy")
    outage.up()
    readback = Readback(outage.readback_uri, experiment)

    synced = cli_sync(by_sync)  # no --traces: the spans are the journal's
    assert synced.returncode == 0, synced.stderr
    assert "synced 1 journal(s)" in synced.stdout and "failed 0" in synced.stdout
    assert_one_trace_with_every_step_once(readback, "by-sync")

    sink = MLflowSink(True, experiment=experiment, tracking_uri=outage.uri, spool_dir=str(by_sink))
    assert sink.settings.traces is False and sink.close(timeout=60)
    assert sink.replayed is not None and (sink.replayed.journals, sink.replayed.kept) == (1, 0)
    assert_one_trace_with_every_step_once(readback, "by-sink")

    shutil.copytree(copy, by_sync, dirs_exist_ok=True)  # the same journal, replayed again
    again = cli_sync(by_sync)
    assert again.returncode == 0 and "synced 1 journal(s)" in again.stdout
    assert_one_trace_with_every_step_once(readback, "by-sync")  # no second copy of a span


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB file system of its own (tmpfs, mounted for this test): a disk that fills."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (as on this machine and CI)")
    mount = tmp_path / "small-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


FULL_DISK = """
import json, sys
from rlm_mlflow import MLflowSink
sink = MLflowSink(True, experiment={experiment!r}, tracking_uri={uri!r}, spool_dir={spool!r},
                  flush_interval=0.05, handle_sigterm=False)
sink.on_run_start({run_id!r}, task="t", environment="e", params={{}})
for step in range({steps}):
    sink.on_step({run_id!r}, event={{"step": step, "reward": 0.5}}, cumulative_reward=step / 2)
sink.on_run_end({run_id!r}, result={{"completed": True, "steps": {steps}, "total_reward": 1.0}},
                run_path=None)
print(json.dumps({{"flushed": sink.flush(timeout=120), **sink.status()}}), flush=True)
sys.stdin.readline()  # the test says when to close (or SIGKILLs this process)
print(json.dumps({{"closed": sink.close(timeout=60), **sink.status()}}), flush=True)
"""


def full_disk_writer(spool: Path, uri: str, experiment: str, run_id: str) -> Any:
    """A process whose run outgrows the disk its spool is on; it says, in a JSON line, what
    its sink shows once everything was flushed, and waits for a line to close."""
    code = FULL_DISK.format(
        experiment=experiment, uri=uri, spool=str(spool), run_id=run_id, steps=5000
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    flushed = json.loads(child.stdout.readline())
    assert flushed["flushed"] and flushed["delivered"] == 5002 and flushed["failed"] == 0
    assert flushed["spool"].startswith("failed: OSError: [Errno 28]")  # the disk is full
    return child


def test_a_full_disk_costs_nothing_and_no_sync_changes_how_the_run_ended(
    small_disk: Path, mlflow_server: MlflowServer, experiment: str
) -> None:
    spool = small_disk / "spool"
    readback = Readback(mlflow_server.url, experiment)
    child = full_disk_writer(spool, mlflow_server.url, experiment, "crowded")
    try:
        (journal,) = journals(spool)  # torn at the end, its acks stopped at the failure
        # While its writer lives, its journal is its own: a replay takes none of it.
        alive = cli_sync(spool)
        assert alive.returncode == 0 and "synced 0 journal(s)" in alive.stdout
        assert journals(spool) == [journal]
    finally:
        child.kill()  # dies before it could close: the journal stays behind
        child.wait()
    run = readback.runs()["crowded"]
    end_time = run.info.end_time
    assert run.info.status == "FINISHED" and run.data.metrics["steps"] == 5000

    synced = cli_sync(spool)
    assert synced.returncode == 0, synced.stderr
    assert "synced 1 journal(s)" in synced.stdout and "journals kept 0" in synced.stdout
    run = readback.runs()["crowded"]
    assert run.info.status == "FINISHED" and run.info.end_time == end_time  # not KILLED
    assert run.data.metrics["steps"] == 5000
    assert steps_of(readback, run) == list(range(5000))  # each once
    assert journals(spool) == []

    # The same run of a process that lives to close: everything in its journal landed, so
    # close removes it.
    child = full_disk_writer(spool, mlflow_server.url, experiment, "closed")
    try:
        out, _ = child.communicate("close\n", timeout=120)
    finally:
        child.kill()
    closed = json.loads(out.splitlines()[-1])
    assert closed["closed"] and (closed["delivered"], closed["pending"]) == (5002, 0)
    assert child.returncode == 0 and journals(spool) == []
    assert readback.runs()["closed"].info.status == "FINISHED"
