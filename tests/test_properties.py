"""Property: whatever mix of valid and invalid hook calls a sink gets (any Python value in any
argument), after close() every call is in exactly one counter, nothing is pending, and the
valid runs landed whole in MLflow (the embedded store, read back through MlflowClient)."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from typing import Any

from conftest import Readback
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.checks import COUNTERS

from rlm_mlflow import MLflowSink

VALID_IDS = ("run-a", "run-b", "run-c")


class Hostile:
    """Prints in examples, fails everywhere else: str, float, int, bool, len, iter, index."""

    def __repr__(self) -> str:
        return "Hostile()"

    def _fail(self, *args: Any) -> Any:
        raise RuntimeError("hostile")

    __str__ = __float__ = __int__ = __bool__ = __len__ = __iter__ = __index__ = _fail


scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=4)
    | st.builds(Hostile)
)
anything = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.tuples(inner, inner)
        | st.dictionaries(
            st.text(max_size=6) | st.integers() | st.tuples(st.integers()), inner, max_size=3
        )
    ),
    max_leaves=6,
)
not_a_number = st.none() | st.text(max_size=5) | st.builds(Hostile) | st.just(float("nan"))


@dataclass
class ValidRun:
    run_id: str
    params: dict[str, Any]
    steps: list[tuple[int, float]]
    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)


@st.composite
def valid_runs(draw: st.DrawFn) -> list[ValidRun]:
    runs = []
    for run_id in draw(st.lists(st.sampled_from(VALID_IDS), unique=True, max_size=3)):
        steps = sorted(draw(st.sets(st.integers(0, 10_000), max_size=30)))
        rewards = [draw(st.floats(-1e6, 1e6, allow_nan=False)) for _ in steps]
        params = draw(
            st.dictionaries(st.sampled_from(["model", "seed", "lr"]), scalars, max_size=3)
        )
        runs.append(ValidRun(run_id, params, list(zip(steps, rewards, strict=True))))
    return runs


@st.composite
def noise(draw: st.DrawFn) -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
    """Calls no valid run may be hurt by: any values, on run ids that are not the valid
    ones, and steps of the valid runs whose reward is not a number."""
    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
    other_id = anything.filter(lambda v: not (isinstance(v, str) and v in VALID_IDS))
    for _ in range(draw(st.integers(0, 25))):
        kind = draw(st.sampled_from(["start", "step", "end", "bad-step-of-valid"]))
        if kind == "start":
            kwargs = {
                "task": draw(anything),
                "environment": draw(anything),
                "params": draw(anything),
            }
            calls.append(("on_run_start", (draw(other_id),), kwargs))
        elif kind == "step":
            kwargs = {"event": draw(anything), "cumulative_reward": draw(anything)}
            calls.append(("on_step", (draw(other_id),), kwargs))
        elif kind == "end":
            kwargs = {"result": draw(anything), "run_path": draw(anything)}
            calls.append(("on_run_end", (draw(other_id),), kwargs))
        else:
            event = {"step": draw(st.integers(0, 10_000)), "reward": draw(not_a_number)}
            kwargs = {"event": event, "cumulative_reward": 1.0}
            calls.append(("on_step", (draw(st.sampled_from(VALID_IDS)),), kwargs))
    return calls


def plan(runs: list[ValidRun], extra: list[Any], seed: int) -> list[Any]:
    """Interleave the valid runs' calls (each in its own order) with the noise."""
    streams: list[list[Any]] = []
    for run in runs:
        total = 0.0
        calls: list[Any] = [
            ("on_run_start", (run.run_id,), {"task": "t", "environment": "e", "params": run.params})
        ]
        for step, reward in run.steps:
            total += reward
            calls.append(
                (
                    "on_step",
                    (run.run_id,),
                    {"event": {"step": step, "reward": reward}, "cumulative_reward": total},
                )
            )
        result = {"completed": True, "steps": len(run.steps), "total_reward": total}
        calls.append(("on_run_end", (run.run_id,), {"result": result, "run_path": None}))
        streams.append(calls)
    streams += [[call] for call in extra]
    rng = random.Random(seed)
    merged = []
    while streams:
        stream = rng.choice(streams)
        merged.append(stream.pop(0))
        if not stream:
            streams.remove(stream)
    return merged


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(runs=valid_runs(), extra=noise(), seed=st.integers(0, 2**32))
def test_any_mix_of_hook_calls_is_counted_once_and_valid_runs_land_whole(
    embedded_uri: str, runs: list[ValidRun], extra: list[Any], seed: int
) -> None:
    experiment = f"prop-{uuid.uuid4().hex[:10]}"
    sink = MLflowSink(True, experiment=experiment, tracking_uri=embedded_uri)
    calls = plan(runs, extra, seed)
    for hook, args, kwargs in calls:
        getattr(sink, hook)(*args, **kwargs)  # never raises, whatever it gets
    assert sink.close(timeout=60)
    status = sink.status()
    assert status["pending"] == 0
    assert sum(status[key] for key in COUNTERS) == len(calls)
    landed = Readback(embedded_uri, experiment).runs()
    readback = Readback(embedded_uri, experiment)
    for run in runs:
        mlflow_run = landed[run.run_id]
        assert mlflow_run.info.status == "FINISHED"
        history = readback.history(mlflow_run, "step_reward")
        assert [(m.step, m.value) for m in history] == run.steps
        assert mlflow_run.data.metrics["steps"] == len(run.steps)
