from __future__ import annotations

import pytest

from rlm_mlflow import _batcher as batcher
from rlm_mlflow._event import RunEnd, RunStart, Step


def steps(n: int) -> list[Step]:
    return [Step("r", i, i / 2, i * 1.5, 1_700_000_000.0 + i) for i in range(n)]


@pytest.mark.parametrize("batch_size", [2, 3, 999, 1000])
def test_chunks_respect_the_batch_size_and_keep_a_steps_metrics_together(batch_size: int) -> None:
    rows = [row for event in steps(1234) for row in batcher.step_rows(event)]
    chunks = list(batcher.step_chunks(rows, batch_size))
    assert all(0 < len(chunk) <= batch_size for chunk in chunks)
    assert [row for chunk in chunks for row in chunk] == rows
    for chunk in chunks:
        assert [key for key, *_ in chunk] == ["step_reward", "cumulative_reward"] * (
            len(chunk) // 2
        )


def test_step_rows_carry_the_hooks_step_time_and_values() -> None:
    (reward, cumulative) = batcher.step_rows(Step("r", 7, 0.25, 3, 1_700_000_000.1234))
    assert reward == ("step_reward", 0.25, 1_700_000_000_123, 7)
    assert cumulative == ("cumulative_reward", 3.0, 1_700_000_000_123, 7)


@pytest.mark.parametrize(
    ("step", "reward"), [(-1, 1.0), (1.5, 1.0), ("3", 1.0), (True, 1.0), (1, "high"), (1, [1.0])]
)
def test_bad_steps_and_rewards_are_rejected_with_a_reason(step: object, reward: object) -> None:
    with pytest.raises(batcher.BadInput):
        batcher.step_rows(Step("r", step, reward, 0.0, 0.0))


def test_missing_step_and_reward_read_as_the_seed_reads_them() -> None:
    (reward, _) = batcher.step_rows(Step("r", None, None, None, 0.0))
    assert reward == ("step_reward", 0.0, 0, 0)


def test_params_are_the_scalar_ones_plus_environment_and_task_chars() -> None:
    event = RunStart(
        "r",
        0.0,
        "dspy",
        42,
        {
            "model": "m",
            "n": 3,
            "x": None,
            "ok": False,
            "tools": ["a"],
            "cfg": {"a": 1},
            "long": "y" * 6001,
        },
    )
    params, skipped = batcher.run_params(event)
    assert params == {
        "model": "m",
        "n": "3",
        "x": "None",
        "ok": "False",
        "environment": "dspy",
        "task_chars": "42",
    }
    assert sorted(skipped) == ["cfg", "long", "tools"]


def test_params_go_out_in_batches_of_at_most_100() -> None:
    batches = list(batcher.param_batches({f"p{i}": str(i) for i in range(250)}))
    assert [len(b) for b in batches] == [100, 100, 50]


def test_summary_is_the_seeds_three_metrics() -> None:
    rows = batcher.summary_rows(RunEnd("r", 2.0, True, 12, 3.5, None))
    assert rows == [
        ("completed", 1.0, 2000, 0),
        ("steps", 12.0, 2000, 0),
        ("total_reward", 3.5, 2000, 0),
    ]


def test_a_child_run_is_tagged_with_its_parents_mlflow_id() -> None:
    assert batcher.run_tags("c", "abc123") == {
        "run_id": "c",
        "component": "rlm-code-rlm",
        "mlflow.runName": "c",
        "mlflow.parentRunId": "abc123",
    }
    assert "mlflow.parentRunId" not in batcher.run_tags("c", None)
