"""The outcomes room alone (pure): one writer of the counters, and the snapshot status() reads."""

from __future__ import annotations

from dataclasses import dataclass

from rlm_mlflow._counters import Outcome
from rlm_mlflow._outcomes import Outcomes


@dataclass
class Run:
    run_id: str = "r"
    mlflow_id: str | None = None
    finished: int = 0


def test_a_recorded_outcome_counts_once_in_its_counter_and_for_its_run() -> None:
    outcomes, run = Outcomes(None, "e"), Run()
    with outcomes.taking() as took:
        took(5)
    outcomes.record(Outcome.DELIVERED, 3, run=run)
    outcomes.record(Outcome.FAILED, 2, "a reason", run=run)
    outcomes.record(Outcome.REJECTED, 0)  # nothing to count: nothing counted
    stats, queued = outcomes.snapshot(lambda: 7)
    assert (stats.drained, stats.delivered, stats.failed, stats.rejected) == (5, 3, 2, 0)
    assert stats.inflight == 0 and queued == 7 and run.finished == 5


def test_settled_counts_are_final_but_later_drops_still_count() -> None:
    """A close that settled the counts itself (the worker did not stop in time): what was
    queued and in flight is failed without a spool; a hook called afterwards is dropped, and
    status() must still show it."""
    outcomes = Outcomes(None, "e")
    outcomes.took(10)
    outcomes.record(Outcome.DELIVERED, 4)
    final = outcomes.settle(queued=3)
    assert (final.drained, final.failed, final.inflight) == (13, 9, 0)
    outcomes.dropped()
    outcomes.hook_failed()
    stats, queued = outcomes.snapshot(lambda: 99)
    assert queued == 0 and stats.failed == 9 and stats.delivered == 4
    assert (stats.dropped, stats.hook_errors) == (1, 1)


def test_settled_in_flight_events_stay_in_the_spool_when_there_is_one() -> None:
    outcomes = Outcomes(None, "e")
    outcomes.spooling = True
    outcomes.took(6)
    final = outcomes.settle(queued=2)
    assert (final.spooled, final.failed) == (6, 2)  # queued were never journalled
