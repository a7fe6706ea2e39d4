"""What a loop pays per step, in a fresh process: prints one JSON line of figures.

    python benchmarks/loop_cost.py SINK --uri URI --experiment EXP --steps N

SINK is ``none`` (the bare loop) or ``ours`` (an `MLflowSink` with default settings). The
loop does what rlm-code's runner does at each step: it writes one JSONL line of the step's
event to a file of its own and flushes it, then (``ours``) calls ``on_step``. The clock
runs once the sink is in steady state (mlflow imported, the store reached, the run created:
a ``flush`` says so) and after a warm-up; it measures the whole loop, so that what the
worker's thread takes from the loop (the GIL, the CPU) is in it, not only the hook's own
median. Figures: µs per step (the loop's time over its steps), the host's RSS growth
(largest RSS minus the RSS before the sink was built), the seconds ``close()`` took to
deliver the rest, whether mlflow was imported in the host, and what was delivered.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

WARMUP = 1_000


def rss_mb() -> float:
    """This process's resident set now, from /proc (ru_maxrss is the peak)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sink", choices=("none", "ours"))
    parser.add_argument("--uri", required=True)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--steps", type=int, default=50_000)
    args = parser.parse_args()

    rss_before = rss_mb()
    hook = None
    sink = None
    if args.sink == "ours":
        from rlm_mlflow import MLflowSink

        sink = MLflowSink(True, experiment=args.experiment, tracking_uri=args.uri)
        sink.on_run_start("loop", task="t", environment="bench", params={"max_steps": args.steps})
        if not sink.flush(timeout=300):  # steady state: mlflow imported, store reached
            raise SystemExit("the sink did not reach the store")
        hook = sink.on_step

    with tempfile.TemporaryDirectory() as tmp, (Path(tmp) / "trajectory.jsonl").open("w") as out:

        def loop(first: int, last: int) -> None:
            for i in range(first, last):
                event = {"step": i, "reward": (i % 100) / 100}
                out.write(json.dumps(event) + "\n")
                out.flush()
                if hook is not None:
                    hook("loop", event=event, cumulative_reward=float(i))

        loop(0, WARMUP)
        started = time.perf_counter()
        loop(WARMUP, WARMUP + args.steps)
        looped = time.perf_counter()

    result = {
        "sink": args.sink,
        "steps": args.steps,
        "us_per_step": (looped - started) / args.steps * 1e6,
        "mlflow_in_host": "mlflow" in sys.modules,
    }
    if sink is not None:
        sink.on_run_end(
            "loop",
            result={"completed": True, "steps": WARMUP + args.steps, "total_reward": 1.0},
            run_path=None,
        )
        sink.close(timeout=600)
        status = sink.status()
        result.update(
            delivered_after_loop_s=time.perf_counter() - looped,
            delivered=status["delivered"],
            not_delivered=status["failed"] + status["dropped"],
        )
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["rss_growth_mb"] = max(0.0, peak_mb - rss_before)
    print(json.dumps({"loop_cost": result}))


if __name__ == "__main__":
    main()
