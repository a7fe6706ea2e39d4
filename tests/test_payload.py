from __future__ import annotations

from decimal import Decimal

import numpy as np
import pytest

from rlm_mlflow import _payload as batcher
from rlm_mlflow._event import RunEnd, RunStart, Step


def steps(n: int) -> list[Step]:
    return [Step("r", i, i / 2, i * 1.5, 1_700_000_000.0 + i) for i in range(n)]


@pytest.mark.parametrize("batch_size", [2, 3, 999, 1000])
def test_batches_respect_the_batch_size_and_keep_a_steps_metrics_together(batch_size: int) -> None:
    rows = [row for event in steps(1234) for row in batcher.step_rows(event)]
    parts = list(batcher.step_batches(rows, batch_size))
    assert all(0 < len(part) <= batch_size and len(part) % 2 == 0 for part in parts)
    assert [row for part in parts for row in part] == rows
    for part in parts:
        assert [key for key, *_ in part] == ["step_reward", "cumulative_reward"] * (len(part) // 2)


def test_step_rows_carry_the_hooks_step_time_and_values() -> None:
    (reward, cumulative) = batcher.step_rows(Step("r", 7, 0.25, 3, 1_700_000_000.1234))
    assert reward == ("step_reward", 0.25, 1_700_000_000_123, 7)
    assert cumulative == ("cumulative_reward", 3.0, 1_700_000_000_123, 7)


@pytest.mark.parametrize(
    ("step", "reward", "why"),
    [
        (-1, 1.0, "out of range"),
        (1.5, 1.0, "not an integer"),
        ("3", 1.0, "not an integer"),
        (True, 1.0, "not an integer"),
        (None, 1.0, "step is missing"),
        (2**63, 1.0, "out of range"),
        (1, None, "reward is missing"),
        (1, "0.5", "not a number"),
        (1, True, "not a number"),
        (1, [1.0], "not a number"),
        (1, Decimal("0.5"), "not a number"),
        (1, float("nan"), "not finite"),
        (1, float("inf"), "not finite"),
        (1, -float("inf"), "not finite"),
        (1, np.bool_(True), "not a number"),
    ],
)
def test_bad_steps_and_rewards_are_refused_with_a_reason(
    step: object, reward: object, why: str
) -> None:
    with pytest.raises(batcher.BadInput, match=why):
        batcher.step_rows(Step("r", step, reward, 0.0, 0.0))


def test_numpy_scalars_and_integral_floats_are_numbers() -> None:
    (reward, cumulative) = batcher.step_rows(Step("r", np.int64(4), np.float32(0.5), 2, 0.0))
    assert cumulative[1] == 2.0
    assert reward[1:] == (0.5, 0, 4) and type(reward[1]) is float
    assert batcher.step_rows(Step("r", 5.0, 1, 1, 0.0))[0][3] == 5


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
            "bad key!": 1,
            "../up": 2,
            "": 3,
            "k" * 251: 4,
        },
        "key",
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
    assert sorted(skipped) == sorted(["tools", "cfg", "long", "bad key!", "../up", "", "k" * 250])
    assert "not a scalar" in skipped["tools"] and "6000" in skipped["long"]
    assert "refuses" in skipped["bad key!"]


def test_params_go_out_in_batches_of_at_most_100() -> None:
    batches = list(batcher.param_batches({f"p{i}": str(i) for i in range(250)}))
    assert [len(b) for b in batches] == [100, 100, 50]


def test_summary_is_the_seeds_three_metrics_and_a_bad_value_only_costs_itself() -> None:
    rows, problems = batcher.summary_rows(RunEnd("r", 2.0, True, 12, 3.5, None))
    assert rows == [
        ("completed", 1.0, 2000, 0),
        ("steps", 12.0, 2000, 0),
        ("total_reward", 3.5, 2000, 0),
    ]
    assert problems == []
    rows, problems = batcher.summary_rows(RunEnd("r", 2.0, False, 12, float("nan"), None))
    assert [r[0] for r in rows] == ["completed", "steps"]
    assert problems == ["total_reward is not finite: nan"]


def test_tags_carry_the_parent_link_and_fit_mlflows_limits() -> None:
    assert batcher.run_tags("c", "abc123", "k1") == {
        "run_id": "c",
        "component": "rlm-code-rlm",
        "mlflow.runName": "c",
        "mlflow.parentRunId": "abc123",
        "rlm_mlflow.run_key": "k1",
    }
    assert "mlflow.parentRunId" not in batcher.run_tags("c", None, "k1")
    long = batcher.run_tags("r" * 10_000, None, "k1")
    assert len(long["run_id"]) == 8000 and len(long["mlflow.runName"]) == 250


def test_a_journalled_event_admitted_again_keeps_its_trajectory() -> None:
    """Replay admits what the journal holds (events admitted once already): the spans, the
    token usage and the cut texts must come out as they went in."""
    from rlm_mlflow._records import decode, encode

    usage = {"total_calls": 1, "prompt_tokens": 120, "completion_tokens": 30}
    hooked = [
        RunStart("r", 1.0, "env", 900, {"depth": 0}, "key", {"task": "t" * 900}),
        Step(
            "r",
            1,
            0.5,
            0.5,
            2.0,
            {
                "step": 1,
                "action": {"action": "run_python", "code": "x = 1\n" * 200},
                "observation": {"success": True, **{f"k{i}": i for i in range(40)}},
                "usage": usage,
            },
        ),
        Step("r", 2, 0.5, 1.0, 3.0, usage),  # traces off: the usage alone
        RunEnd(
            "r",
            4.0,
            True,
            2,
            1.0,
            None,
            "FINISHED",
            {"usage_summary": usage, "final_response": "f" * 900},
        ),
    ]
    once = [batcher.admit(event, 100)[0] for event in hooked]
    journalled = decode(encode(once))  # what replay reads back
    again = [batcher.admit(event, 100)[0] for event in journalled]
    assert again == once
    assert once[1].extra["span"]["inputs"]["code"].endswith("more characters]\n```")
    assert once[1].extra["usage"] == [120, 30, 1] and once[2].extra == {"usage": [120, 30, 1]}
    assert once[3].extra["usage"] == [120, 30, 1]
