"""`make bench-rlm-code`: what MLflow costs the real rlm-code runner's loop.

The real `RLMRunner` (rlm-code from PyPI) runs a scripted recursive task (a root that
delegates two children run in parallel threads, then code steps; no LLM, no network) with
the observability rlm-code builds itself (`RLMObservability.default()`), under four setups,
in rotated order within each round, in this one process:

- no-mlflow:        DSPY_RLM_MLFLOW_ENABLED unset (rlm-code's default: no MLflow sink)
- ours-unreachable: `rlm_mlflow.autolog()`, the tracking URI a closed port on 127.0.0.1
- ours-server:      `rlm_mlflow.autolog()`, a real `mlflow server` (SQLite) on 127.0.0.1
- rlm-code-server:  rlm-code's own MLflowSink on the same server

Reported per setup, as medians over the rounds: the runner's wall time for the task and the
time spent inside the MLflow sink's hooks, and the ratio of the loop time to no-mlflow's.
Then the same setups on a benchmark: rlm-code's `run_benchmark` over a small pack (the
recursive task, one case that matches its expected answer, one that does not), its wall time
and its ratio to no-mlflow's (under autolog each benchmark is a parent run with its cases
under it). Writes benchmarks/results/rlm-code-latest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the scripted connector of the tests

from rlm_code.rlm.observability import RLMObservability  # noqa: E402
from support.scripted_rlm import (  # noqa: E402
    BENCH_CASES,
    run_scripted,
    scripted_runner,
    shutdown_interpreters,
    write_pack,
)
from support.servers import MlflowServer, free_port  # noqa: E402

import rlm_mlflow  # noqa: E402

SETUPS = ("no-mlflow", "ours-unreachable", "ours-server", "rlm-code-server")


class TimedSink:
    """Forwards to the MLflow sink and adds up the time its hooks take in the caller's loop."""

    def __init__(self, sink: Any) -> None:
        self.sink, self.name, self.seconds = sink, sink.name, 0.0

    def status(self) -> dict[str, Any]:
        return dict(self.sink.status())

    def _timed(self, hook: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        started = time.perf_counter()
        try:
            hook(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started

    def on_run_start(self, run_id: str, **kwargs: Any) -> None:
        self._timed(self.sink.on_run_start, run_id, **kwargs)

    def on_step(self, run_id: str, **kwargs: Any) -> None:
        self._timed(self.sink.on_step, run_id, **kwargs)

    def on_run_end(self, run_id: str, **kwargs: Any) -> None:
        self._timed(self.sink.on_run_end, run_id, **kwargs)


def configure(setup: str, server_url: str, unreachable_url: str, experiment: str) -> None:
    """The environment a user would set, and autolog for our setups (this is a script of
    ours: changing its own environment is what a user's shell would have done)."""
    for name in ("DSPY_RLM_MLFLOW_ENABLED", "MLFLOW_TRACKING_URI", "DSPY_RLM_MLFLOW_EXPERIMENT"):
        os.environ.pop(name, None)
    rlm_mlflow.autolog(disable=True)
    if setup == "no-mlflow":
        return
    os.environ["DSPY_RLM_MLFLOW_ENABLED"] = "true"
    os.environ["DSPY_RLM_MLFLOW_EXPERIMENT"] = experiment
    os.environ["MLFLOW_TRACKING_URI"] = (
        unreachable_url if setup == "ours-unreachable" else server_url
    )
    if setup.startswith("ours"):
        rlm_mlflow.autolog()


def one_run(setup: str, workdir: Path) -> dict[str, float]:
    observability = RLMObservability.default(workdir=workdir, run_dir=workdir / "runs")
    timed: TimedSink | None = None
    for i, sink in enumerate(observability.sinks):
        if sink.name == "mlflow" and sink.status().get("enabled"):
            timed = TimedSink(sink)
            observability.sinks[i] = timed
    assert (timed is None) == (setup == "no-mlflow"), setup
    started = time.perf_counter()
    run_scripted(workdir, observability=observability)
    loop = time.perf_counter() - started
    return {"loop_s": loop, "hooks_s": timed.seconds if timed else 0.0}


def one_benchmark(workdir: Path) -> float:
    """rlm-code's run_benchmark over the small pack; its wall time."""
    workdir.mkdir(parents=True)
    pack = write_pack(workdir / "pack.json", "bench_pack", BENCH_CASES[:3])
    runner = scripted_runner(workdir)
    try:
        started = time.perf_counter()
        runner.run_benchmark(preset="bench_pack", pack_paths=[str(pack)])
        return time.perf_counter() - started
    finally:
        shutdown_interpreters(runner)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    experiment = f"bench-rlm-code-{int(time.time())}"
    unreachable = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    samples: dict[str, list[dict[str, float]]] = {s: [] for s in SETUPS}
    benchmarks: dict[str, list[float]] = {s: [] for s in SETUPS}
    with tempfile.TemporaryDirectory() as tmp, MlflowServer(Path(tmp) / "server") as server:
        for round_ in range(args.rounds + 1):  # round 0 warms up (imports, first requests)
            order = SETUPS[round_ % len(SETUPS) :] + SETUPS[: round_ % len(SETUPS)]
            for setup in order:
                configure(setup, server.url, unreachable, experiment)
                result = one_run(setup, Path(tmp) / f"{setup}-{round_}")
                bench_s = one_benchmark(Path(tmp) / f"{setup}-{round_}-benchmark")
                if round_:
                    samples[setup].append(result)
                    benchmarks[setup].append(bench_s)
            print(f"round {round_}/{args.rounds}", file=sys.stderr)
        # our forwarders: deliver what is deliverable, give up on the unreachable one
        for uri, timeout in ((server.url, 60.0), (unreachable, 1.0)):
            rlm_mlflow._autolog.shared_sink(True, experiment, uri).close(timeout=timeout)
    floor = statistics.median(s["loop_s"] for s in samples["no-mlflow"])
    report: dict[str, Any] = {"rounds": args.rounds, "runs_per_round": 3, "setups": {}}
    print("| setup | loop, median | loop / no-mlflow | in MLflow hooks, median | hooks p90 |")
    print("|---|---|---|---|---|")
    for setup in SETUPS:
        loops = [s["loop_s"] for s in samples[setup]]
        hooks = sorted(s["hooks_s"] for s in samples[setup])
        row = {
            "loop_ms": statistics.median(loops) * 1e3,
            "loop_ratio": statistics.median(loops) / floor,
            "hooks_ms": statistics.median(hooks) * 1e3,
            "hooks_p90_ms": hooks[int(0.9 * (len(hooks) - 1))] * 1e3,
        }
        report["setups"][setup] = row
        print(
            f"| {setup} | {row['loop_ms']:.1f} ms | {row['loop_ratio']:.2f} | "
            f"{row['hooks_ms']:.3f} ms | {row['hooks_p90_ms']:.3f} ms |"
        )
    bench_floor = statistics.median(benchmarks["no-mlflow"])
    report["benchmark"] = {"cases": 3, "setups": {}}
    print("\n| setup | benchmark (3 cases), median | / no-mlflow |")
    print("|---|---|---|")
    for setup in SETUPS:
        median = statistics.median(benchmarks[setup])
        report["benchmark"]["setups"][setup] = {
            "wall_ms": median * 1e3,
            "ratio": median / bench_floor,
        }
        print(f"| {setup} | {median * 1e3:.1f} ms | {median / bench_floor:.2f} |")
    out = HERE / "results" / "rlm-code-latest.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
