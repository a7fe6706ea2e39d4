"""Replay of what the spool holds, read back through MlflowClient: a run's end is kept, spans
travel with the journal."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import Readback

from rlm_mlflow._deadletter import DeadLetters
from rlm_mlflow._event import RunStart, Step
from rlm_mlflow._journal import Journal, journal_meta
from rlm_mlflow._replay import sync
from rlm_mlflow._settings import Settings


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
