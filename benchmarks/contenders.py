"""One contender, one workload, in a fresh process: prints one JSON line of figures.

    python benchmarks/contenders.py NAME --uri URI --experiment EXP --runs R --steps S

The workload is the RLM one: R runs, each with the seed's params and tags, S steps of two
metrics (``step_reward``, ``cumulative_reward``) interleaved across the runs, then the
seed's three summary metrics and the end of each run. Figures: per-step hook cost (the time
the loop spends logging one step), time until everything is on the server, delivered
metrics/s, peak RSS, and whether every point landed (read back with MlflowClient).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

PARAMS = {"max_steps": 0, "model": "bench-model", "temperature": 0.2}
TASK = "Create a DSPy signature"


def reward(run: int, step: int) -> float:
    return ((run * 7919 + step * 104729) % 1000) / 1000


#: What rlm-code's step events carry besides step and reward (the ``rich`` workload).
ACTION = {"action": "run_python", "code": "print(sum(range(10)))\n" * 8, "rationale": "check"}
OBSERVATION = {"success": True, "stdout": "45\n" * 8, "stderr": ""}
USAGE = {"total_calls": 1, "prompt_tokens": 812, "completion_tokens": 64}


class Loop:
    """Drives R runs x S steps through ``log_step`` and times each step's logging. ``rich``:
    the events carry an action with code, an observation and token usage, as rlm-code's."""

    def __init__(self, runs: int, steps: int, prefix: str, rich: bool = False) -> None:
        self.run_ids = [f"{prefix}-{r}" for r in range(runs)]
        self.steps = steps
        self.step_ns: list[int] = []
        self.rich = rich

    def drive(self, log_step: Callable[[int, str, dict[str, Any], float], None]) -> None:
        totals = [0.0] * len(self.run_ids)
        clock = time.perf_counter_ns
        samples = self.step_ns
        for step in range(self.steps):
            for r, run_id in enumerate(self.run_ids):
                value = reward(r, step)
                totals[r] += value
                event = {"step": step, "reward": value}
                if self.rich:
                    event.update(action=ACTION, observation=OBSERVATION, usage=USAGE)
                started = clock()
                log_step(r, run_id, event, totals[r])
                samples.append(clock() - started)
        self.totals = totals


def figures(
    loop: Loop, started: float, done: float, metrics: int, cpu_started: float | None = None
) -> dict[str, Any]:
    """``cpu_started``: the process's CPU time (all threads) when the clock started; the CPU
    per metric is what the trial cost this process, hooks, worker and client included."""
    cpu = time.process_time() - cpu_started if cpu_started is not None else None
    ordered = sorted(loop.step_ns)
    return {
        "cpu_s": cpu,
        "cpu_us_per_metric": cpu / metrics * 1e6 if cpu is not None and metrics else None,
        "hook_median_us": statistics.median(ordered) / 1000 if ordered else None,
        "hook_p99_us": ordered[int(len(ordered) * 0.99)] / 1000 if ordered else None,
        "loop_s": sum(ordered) / 1e9,
        "delivered_s": done - started,
        "metrics": metrics,
        "metrics_per_s": metrics / (done - started) if done > started else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_floor(args: argparse.Namespace) -> dict[str, Any]:
    queue: deque[tuple[str, dict[str, Any], float]] = deque()

    def hook(run_id: str, *, event: dict[str, Any], cumulative_reward: float) -> None:
        queue.append((run_id, event, cumulative_reward))

    loop = Loop(args.runs, args.steps, "floor")
    started = time.perf_counter()
    loop.drive(lambda r, run_id, event, total: hook(run_id, event=event, cumulative_reward=total))
    return {
        **figures(loop, started, time.perf_counter(), 0),
        "metrics": None,
        "metrics_per_s": None,
        "delivered_s": None,
    }


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    from rlm_mlflow import MLflowSink

    settings = json.loads(args.settings)
    if args.name == "ours-traced":
        settings["traces"] = True
    sink = MLflowSink(True, experiment=args.experiment, tracking_uri=args.uri, **settings)
    loop = Loop(args.runs, args.steps, "ours", rich=args.name in ("ours-rich", "ours-traced"))
    for run_id in loop.run_ids:
        sink.on_run_start(
            run_id, task=TASK, environment="bench", params={**PARAMS, "max_steps": args.steps}
        )
    first_hook = time.perf_counter() - t0  # mlflow is imported by the worker, not here
    sink.flush(timeout=120)  # like the raw ceiling, start the clock once the runs exist
    started, cpu_started = time.perf_counter(), time.process_time()
    if args.threads == 1:
        loop.drive(
            lambda r, run_id, event, total: sink.on_step(
                run_id, event=event, cumulative_reward=total
            )
        )
    else:  # one run per producer thread, all sharing the sink
        loops = [Loop(1, args.steps, f"ours-{r}") for r in range(args.runs)]
        for r, one in enumerate(loops):
            one.run_ids = [loop.run_ids[r]]
        with ThreadPoolExecutor(args.threads) as pool:
            list(
                pool.map(
                    lambda one: one.drive(
                        lambda r, run_id, event, total: sink.on_step(
                            run_id, event=event, cumulative_reward=total
                        )
                    ),
                    loops,
                )
            )
        loop.step_ns = [ns for one in loops for ns in one.step_ns]
        loop.totals = [one.totals[0] for one in loops]
    for r, run_id in enumerate(loop.run_ids):
        sink.on_run_end(
            run_id,
            result={"completed": True, "steps": args.steps, "total_reward": loop.totals[r]},
            run_path=None,
        )
    looped = time.perf_counter()
    closed = sink.close(timeout=900)
    done = time.perf_counter()
    status = sink.status()
    out = figures(loop, started, done, 2 * args.runs * args.steps, cpu_started)
    out.update(
        time_to_first_hook_s=first_hook,
        flush_after_loop_s=done - looped,
        closed=closed,
        dropped=status.get("dropped"),
        failed=status.get("failed"),
    )
    return out


def run_fluent(args: argparse.Namespace, prefix: str, synchronous: bool) -> dict[str, Any]:
    """MLflow's fluent API, as the seed's sink uses it (``synchronous=True``: two blocking
    log_metric calls per step) and as MLflow's async logging is documented
    (``synchronous=False``, flushed at the end). One active run: runs go one after another."""
    import mlflow

    mlflow.set_tracking_uri(args.uri)
    mlflow.set_experiment(args.experiment)
    loop = Loop(1, args.steps, prefix)
    started = time.perf_counter()
    for r in range(args.runs):
        run_id = f"{prefix}-{r}"
        mlflow.start_run(run_name=run_id, tags={"run_id": run_id, "component": "rlm-code-rlm"})
        mlflow.log_params(
            {**PARAMS, "max_steps": args.steps, "environment": "bench", "task_chars": len(TASK)},
            synchronous=synchronous,
        )
        loop.run_ids = [run_id]

        def log_step(_r: int, _id: str, event: dict[str, Any], total: float) -> None:
            step = int(event["step"])
            mlflow.log_metric(
                "step_reward", float(event["reward"]), step=step, synchronous=synchronous
            )
            mlflow.log_metric("cumulative_reward", total, step=step, synchronous=synchronous)

        loop.drive(log_step)
        mlflow.log_metrics(
            {"completed": 1.0, "steps": float(args.steps), "total_reward": loop.totals[0]},
            synchronous=synchronous,
        )
        mlflow.end_run()  # with synchronous=False it does not wait for the queued metrics
    if not synchronous:
        mlflow.flush_async_logging()
    return figures(loop, started, time.perf_counter(), 2 * args.runs * args.steps)


def make_runs(args: argparse.Namespace, prefix: str) -> tuple[Any, list[str]]:
    """The ceilings' runs, made before their clocks start: a client and the runs' ids."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    client = MlflowClient(args.uri)
    experiment = client.get_experiment_by_name(args.experiment)
    experiment_id = (
        experiment.experiment_id
        if experiment is not None
        else client.create_experiment(args.experiment)
    )
    ids = []
    for r in range(args.runs):
        run = client.create_run(
            experiment_id,
            run_name=f"{prefix}-{r}",
            tags={"run_id": f"{prefix}-{r}", "component": "rlm-code-rlm"},
        )
        ids.append(run.info.run_id)
        client.log_batch(
            run.info.run_id,
            params=[Param(k, str(v)) for k, v in {**PARAMS, "max_steps": args.steps}.items()],
        )
    return client, ids


def run_raw(args: argparse.Namespace, threads: int) -> dict[str, Any]:
    """The ceiling: the same data in 1,000-metric log_batch calls, no hooks at all. The clock
    starts once the runs exist, as for our sink; building the entities is inside it."""
    from mlflow.entities import Metric

    client, ids = make_runs(args, "raw")
    started = time.perf_counter()  # building the entities is part of logging them
    cpu_started = time.process_time()
    now = int(time.time() * 1000)
    batches: list[tuple[int, list[Metric]]] = []
    for r in range(args.runs):
        rows = []
        for step in range(args.steps):
            rows.append(Metric("step_reward", reward(r, step), now + step, step))
            rows.append(Metric("cumulative_reward", float(step), now + step, step))
        batches += [(r, rows[i : i + 1000]) for i in range(0, len(rows), 1000)]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda rb: client.log_batch(ids[rb[0]], metrics=rb[1]), batches))
    for mlflow_id in ids:
        client.log_batch(mlflow_id, metrics=[Metric("total_reward", 1.0, now, 0)])
        client.set_terminated(mlflow_id)
    loop = Loop(0, 0, "raw")
    return figures(loop, started, time.perf_counter(), 2 * args.runs * args.steps, cpu_started)


def run_raw_http(args: argparse.Namespace, threads: int) -> dict[str, Any]:
    """The wire's ceiling: the same 1,000-metric batches serialised to JSON before the clock
    starts, then POSTed straight to /api/2.0/mlflow/runs/log-batch from ``threads`` threads
    over kept-alive connections. Only sending is inside the clock."""
    import threading

    import requests

    client, ids = make_runs(args, "rawhttp")
    now = int(time.time() * 1000)
    bodies: list[bytes] = []
    for r in range(args.runs):
        rows = []
        for step in range(args.steps):
            rows.append(
                {
                    "key": "step_reward",
                    "value": reward(r, step),
                    "timestamp": now + step,
                    "step": step,
                }
            )
            rows.append(
                {
                    "key": "cumulative_reward",
                    "value": float(step),
                    "timestamp": now + step,
                    "step": step,
                }
            )
        for i in range(0, len(rows), 1000):
            bodies.append(json.dumps({"run_id": ids[r], "metrics": rows[i : i + 1000]}).encode())
    url = args.uri.rstrip("/") + "/api/2.0/mlflow/runs/log-batch"
    local = threading.local()

    def post(body: bytes) -> None:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
        response = session.post(url, data=body, headers={"Content-Type": "application/json"})
        response.raise_for_status()

    started, cpu_started = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(post, bodies))
    done = time.perf_counter()
    out = figures(Loop(0, 0, "rawhttp"), started, done, 2 * args.runs * args.steps, cpu_started)
    for mlflow_id in ids:
        client.set_terminated(mlflow_id)
    return out


def run_stall(args: argparse.Namespace) -> dict[str, Any]:
    """Our sink while the server is stopped (SIGSTOP by the driver): RSS must stay bounded."""
    from rlm_mlflow import MLflowSink

    settings = json.loads(args.settings)
    texts = settings.pop("texts", 0)  # chars of code and of output per step: rlm-code's events
    sink = MLflowSink(True, experiment=args.experiment, tracking_uri=args.uri, **settings)
    sink.on_run_start("stall", task=TASK, environment="bench", params=PARAMS)
    code, stdout = ("x = 1\n" * texts)[:texts], ("1\n" * texts)[:texts]
    sink.flush(timeout=60)  # connected, the run exists: now the driver stops the server
    print(json.dumps({"ready": True}), flush=True)
    input()  # the driver says when the server is stopped
    baseline = _rss_mb()
    peak = baseline
    stop = time.perf_counter() + args.seconds
    step = 0
    samples = 0
    while time.perf_counter() < stop:
        for _ in range(10_000):
            event: dict[str, Any] = {"step": step, "reward": 0.5}
            if texts:  # texts of their own each step, as a real loop's are
                event["action"] = {"action": "run_python", "code": f"# {step}\n{code}"}
                event["observation"] = {"success": True, "stdout": f"{step}\n{stdout}"}
                event["usage"] = USAGE
            sink.on_step("stall", event=event, cumulative_reward=step)
            step += 1
        samples += 1
        if samples % 10 == 0:
            peak = max(peak, _rss_mb())
    peak = max(peak, _rss_mb())
    status = sink.status()
    out = {
        "steps_logged": step,
        "rss_baseline_mb": baseline,
        "rss_peak_mb": peak,
        "rss_growth_mb": peak - baseline,
        "dropped": status["dropped"],
        "spooled_so_far": status["pending"] - status["queued"],
        "queued": status["queued"],
        "pending": status["pending"],
    }
    return out


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


def verify(args: argparse.Namespace, prefix: str) -> bool:
    """Every point of every run landed, exactly once."""
    from mlflow import MlflowClient

    client = MlflowClient(args.uri)
    experiment = client.get_experiment_by_name(args.experiment)
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.run_id LIKE '{prefix}-%'"
    )
    if len(runs) != args.runs:
        return False
    for run in runs:
        for key in ("step_reward", "cumulative_reward"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            if sorted(steps) != list(range(args.steps)):
                return False
    return True


CONTENDERS: dict[str, tuple[Callable[[argparse.Namespace], dict[str, Any]], str | None]] = {
    "floor": (run_floor, None),
    "ours": (run_ours, "ours"),
    "seed-sync": (lambda a: run_fluent(a, "seed", synchronous=True), "seed"),
    "mlflow-async": (lambda a: run_fluent(a, "async", synchronous=False), "async"),
    "mlflow-async-buffered": (lambda a: run_fluent(a, "async", synchronous=False), "async"),
    "ours-4": (run_ours, "ours"),
    "ours-rich": (run_ours, "ours"),
    "ours-traced": (run_ours, "ours"),
    "raw-1": (lambda a: run_raw(a, 1), "raw"),
    "raw-4": (lambda a: run_raw(a, 4), "raw"),
    "raw-http-1": (lambda a: run_raw_http(a, 1), "rawhttp"),
    "raw-http-4": (lambda a: run_raw_http(a, 4), "rawhttp"),
    "stall": (run_stall, None),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name", choices=sorted(CONTENDERS))
    parser.add_argument("--uri", required=True)
    parser.add_argument("--experiment", default=f"bench-{uuid.uuid4().hex[:8]}")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--settings", default="{}", help="JSON of MLflowSink settings")
    parser.add_argument("--threads", type=int, default=None, help="producer threads (ours)")
    parser.add_argument("--no-verify", action="store_true")
    args = parser.parse_args()
    if args.threads is None:
        args.threads = 4 if args.name == "ours-4" else 1
    contender, prefix = CONTENDERS[args.name]
    out = contender(args)
    if prefix is not None and not args.no_verify:
        out["all_landed"] = verify(args, prefix)
    print(json.dumps({"contender": args.name, "runs": args.runs, "steps": args.steps, **out}))


if __name__ == "__main__":
    main()
