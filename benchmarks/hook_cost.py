"""Hook cost: `MLflowSink.on_step` against the floor of any hook (append a tuple to a deque).

Both contenders run in the same process, interleaved in rounds, while the sink's worker
delivers to a real embedded store in the background. Reports per-call medians and the ratio;
DESIGN.md's budget is on_step <= 5x the floor.

    .venv/bin/python benchmarks/hook_cost.py [--rounds 15] [--calls 20000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import deque
from collections.abc import Callable

from rlm_mlflow import MLflowSink


def per_call_ns(fn: Callable[[int], None], calls: int) -> float:
    started = time.perf_counter_ns()
    for i in range(calls):
        fn(i)
    return (time.perf_counter_ns() - started) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=8_000)
    args = parser.parse_args()

    # The floor takes the hook's own arguments, the way rlm-code calls every sink.
    floor_queue: deque[tuple[str, dict[str, float], float]] = deque()

    def floor_hook(run_id: str, *, event: dict[str, float], cumulative_reward: float) -> None:
        floor_queue.append((run_id, event, cumulative_reward))

    def floor(i: int) -> None:
        floor_hook("run", event=events[i], cumulative_reward=0.5)

    events: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        sink = MLflowSink(True, experiment="bench-hooks", tracking_uri=f"sqlite:///{tmp}/m.db")
        sink.on_run_start("run", task="t", environment="bench", params={})
        sink.flush()  # steady state: mlflow imported, store connected, run created

        # Distinct steps, built before timing: a loop makes its event dict anyway, and MLflow's
        # SQL store is slow on exact duplicate metrics (it falls back to row-by-row inserts).
        def on_step(i: int) -> None:
            sink.on_step("run", event=events[i], cumulative_reward=0.5)

        samples: dict[str, list[float]] = {"floor": [], "on_step": []}
        for r in range(args.rounds):  # interleaved: both see the same machine state
            events = [{"step": r * args.calls + i, "reward": 0.5} for i in range(args.calls)]
            samples["floor"].append(per_call_ns(floor, args.calls))
            floor_queue.clear()
            samples["on_step"].append(per_call_ns(on_step, args.calls))
        sink.on_run_end("run", result=None, run_path=None)
        flushed = sink.close(timeout=300)

    floor_ns = statistics.median(samples["floor"])
    hook_ns = statistics.median(samples["on_step"])
    print(f"{'contender':<10} {'median ns/call':>15} {'ratio to floor':>15}")
    print(f"{'floor':<10} {floor_ns:>15.0f} {1.0:>15.2f}")
    print(f"{'on_step':<10} {hook_ns:>15.0f} {hook_ns / floor_ns:>15.2f}")
    print(
        f"({args.rounds} rounds x {args.calls} calls; all delivered: {flushed}; "
        f"budget: on_step <= 5x floor)"
    )


if __name__ == "__main__":
    main()
