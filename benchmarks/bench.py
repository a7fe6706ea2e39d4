"""`make bench`: every contender on the same RLM workload, against the same real servers.

For each tracking store (an `mlflow server` with SQLite and 1 worker, the same with 4
workers, the embedded `sqlite:///` store) the contenders run in rounds, each in a fresh
process, in a rotated order so that none always runs first or last. Reported: medians over
the rounds, and the ratios the targets are stated in. Then two scenarios on the 4-worker
server: memory while the server is stopped (SIGSTOP) for --stall seconds (plain steps and
traced 4 KB steps, with drop_newest, spill, and a spool), and the flush at
shutdown of a 100,000-step run against the ceiling's time for the same data.

Writes benchmarks/results/bench-<time>.json (and latest.json) and benchmarks/results/bench.png.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))  # the test rig: real servers
from support.servers import MlflowServer

from rlm_mlflow._settings import Settings

DEFAULT_MEMORY_MAX_BYTES = Settings().memory_max_bytes
#: The RSS growth docs/tuning.md promises at most, in memory_max_bytes.
RSS_FACTOR = 3

HERE = Path(__file__).parent
RESULTS = HERE / "results"

#: contender: (runs, steps). The slow peers get fewer steps; their per-step cost and rate
#: are what is compared, and the fast ones need enough data to reach a steady state.
WORKLOAD = {
    "floor": (4, 5000),
    "ours": (4, 5000),
    "ours-4": (4, 5000),
    "ours-rich": (4, 5000),
    "ours-traced": (4, 5000),
    "raw-1": (4, 5000),
    "raw-4": (4, 5000),
    "raw-http-1": (4, 5000),
    "raw-http-4": (4, 5000),
    "mlflow-async-buffered": (4, 500),
    "mlflow-async": (4, 50),
    "seed-sync": (4, 10),
}
EMBEDDED = ["floor", "ours", "raw-1"]
#: The spool's durability levels, on the 4-worker server: the journal's fsync with the default
#: policy, and the spill file's with a small buffer that spills (``always`` fsyncs each
#: spilled event in the hook; with ``block`` it costs what ``batch`` costs).
SPOOL = {
    "ours": {},
    "spool-never": {"fsync": "never"},
    "spool-batch": {"fsync": "batch"},
    "spill-batch": {"fsync": "batch", "when_full": "spill", "queue_size": 2000},
    "spill-always": {"fsync": "always", "when_full": "spill", "queue_size": 2000},
}


def trial(script: str, args: list[str], first_key: str, **env: str) -> dict[str, Any]:
    """One trial of ``script`` (in this directory) in a fresh process, without the caller's
    tracking URI (and with ``env`` added): its last JSON line that starts with ``first_key``."""
    environment = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run(
        [sys.executable, str(HERE / script), *args],
        capture_output=True,
        text=True,
        env={**environment, **env},
        timeout=900,
        check=False,
    )
    marker = f'{{"{first_key}"'
    lines = [line for line in done.stdout.splitlines() if line.startswith(marker)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{script} {args[0]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def run_contender(name: str, uri: str, runs: int, steps: int, **extra: Any) -> dict[str, Any]:
    args = [name, "--uri", uri, "--runs", str(runs), "--steps", str(steps)]
    args += ["--experiment", f"bench-{uuid.uuid4().hex[:8]}"]
    for key, value in extra.items():
        args += [f"--{key}", str(value)]
    env = {"MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS": "1"} if name == "mlflow-async-buffered" else {}
    return trial("contenders.py", args, "contender", **env)


def median_of(samples: list[dict[str, Any]], key: str) -> float | None:
    values = [s[key] for s in samples if s.get(key) is not None]
    return statistics.median(values) if values else None


def rounds(
    uri: str,
    contenders: list[str],
    count: int,
    settings: dict[str, dict[str, Any]] | None = None,
    spool: Path | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """``settings``: a contender name -> our sink's settings (the ``ours`` contender run
    under that name), each with a spool of its own under ``spool``."""
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
    for r in range(count):
        order = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
        for name in order:
            runs, steps = WORKLOAD.get(name, WORKLOAD["ours"])
            if settings is not None and name in settings:
                extra = dict(settings[name])
                if extra and spool is not None:
                    extra["spool_dir"] = str(spool / f"{name}-{r}")
                result = run_contender("ours", uri, runs, steps, settings=json.dumps(extra))
            else:
                result = run_contender(name, uri, runs, steps)
            samples[name].append(result)
            print(
                f"  round {r + 1}/{count} {name:<22} "
                f"hook {fmt(result.get('hook_median_us'))} us  "
                f"{fmt(result.get('metrics_per_s'))} metrics/s",
                flush=True,
            )
    return samples


def summarize(samples: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    return {
        name: {
            "hook_median_us": median_of(runs, "hook_median_us"),
            "hook_p99_us": median_of(runs, "hook_p99_us"),
            "metrics_per_s": median_of(runs, "metrics_per_s"),
            "delivered_s": median_of(runs, "delivered_s"),
            "peak_rss_mb": median_of(runs, "peak_rss_mb"),
            "cpu_us_per_metric": median_of(runs, "cpu_us_per_metric"),
            "time_to_first_hook_s": median_of(runs, "time_to_first_hook_s"),
            "all_landed": all(r.get("all_landed", True) for r in runs),
            "rounds": len(runs),
            "workload": f"{runs[0]['runs']}x{runs[0]['steps']}",
        }
        for name, runs in samples.items()
    }


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}g}" if value < 1000 else f"{value:,.0f}"


def print_table(title: str, table: dict[str, dict[str, Any]]) -> None:
    print(f"\n{title}")
    print(
        f"{'contender':<22} {'workload':>9} {'hook med us':>12} {'hook p99 us':>12} "
        f"{'metrics/s':>10} {'CPU us/metric':>14} {'all on server s':>16} {'peak RSS MB':>12} "
        f"{'landed':>7}"
    )
    for name, row in table.items():
        print(
            f"{name:<22} {row['workload']:>9} {fmt(row['hook_median_us']):>12} "
            f"{fmt(row['hook_p99_us']):>12} {fmt(row['metrics_per_s']):>10} "
            f"{fmt(row['cpu_us_per_metric']):>14} "
            f"{fmt(row['delivered_s']):>16} {fmt(row['peak_rss_mb']):>12} "
            f"{'yes' if row['all_landed'] else 'NO':>7}"
        )


def ratios(table: dict[str, dict[str, Any]]) -> list[tuple[str, float, str, bool]]:
    """(what, measured ratio, target, met) for the targets of issue 4."""
    ours = table["ours"]
    ceiling = max(table["raw-1"]["metrics_per_s"], table.get("raw-4", {}).get("metrics_per_s") or 0)
    checks = [
        (
            "our hook median / deque floor",
            ours["hook_median_us"] / table["floor"]["hook_median_us"],
            "<= 5",
            ours["hook_median_us"] / table["floor"]["hook_median_us"] <= 5,
        ),
        ("our hook p99 (us)", ours["hook_p99_us"], "<= 20", ours["hook_p99_us"] <= 20),
        (
            "our throughput / best raw ceiling",
            ours["metrics_per_s"] / ceiling,
            ">= 0.90",
            ours["metrics_per_s"] / ceiling >= 0.9,
        ),
    ]
    if "raw-http-4" in table and "ours-4" in table:
        four, one = table["ours-4"]["metrics_per_s"], ours["metrics_per_s"]
        for what, value, target in (
            (
                "4 threads: ours / MlflowClient 4-thread ceiling",
                four / table["raw-4"]["metrics_per_s"],
                1.0,
            ),
            (
                "4 threads: ours / raw HTTP 4-thread ceiling",
                four / table["raw-http-4"]["metrics_per_s"],
                0.9,
            ),
            (
                "1 thread: ours / MlflowClient 1-thread ceiling",
                one / table["raw-1"]["metrics_per_s"],
                1.0,
            ),
            (
                "1 thread: ours / raw HTTP 1-thread ceiling",
                one / table["raw-http-1"]["metrics_per_s"],
                1.0,
            ),
        ):
            checks.append((what, value, f">= {target}", value >= target))
        cpu = ours["cpu_us_per_metric"] / table["raw-http-1"]["cpu_us_per_metric"]
        checks.append(("CPU per metric: ours / raw HTTP (1 thread)", cpu, "<= 2", cpu <= 2))
    if "ours-traced" in table and "ours-rich" in table:
        traced = table["ours-traced"]["hook_median_us"] / table["ours-rich"]["hook_median_us"]
        checks.append(("traces on: hook median / traces off", traced, "<= 2", traced <= 2))
    if "mlflow-async" in table:
        cheaper = table["mlflow-async"]["hook_median_us"] / ours["hook_median_us"]
        checks.append(("mlflow async hook / our hook", cheaper, ">= 300", cheaper >= 300))
    if "mlflow-async-buffered" in table:
        faster = ours["metrics_per_s"] / table["mlflow-async-buffered"]["metrics_per_s"]
        checks.append(("our throughput / mlflow async buffered", faster, ">= 2", faster >= 2))
    if "seed-sync" in table:
        checks.append(
            (
                "seed sink hook / our hook",
                table["seed-sync"]["hook_median_us"] / ours["hook_median_us"],
                "(info)",
                True,
            )
        )
    return checks


def print_ratios(checks: list[tuple[str, float, str, bool]]) -> None:
    for what, value, target, met in checks:
        print(f"  {what:<42} {fmt(value):>10}   target {target:<8} {'met' if met else 'MISSED'}")


#: The memory scenarios: what the sink holds while the server is stopped and the loop runs at
#: full speed. Plain steps, and rlm-code-shaped traced steps with 4 KB of code and 4 KB of
#: output each (the text limit's default), with the full-buffer policies that keep the loop
#: at full speed, and with a spool (the journal takes what memory cannot hold).
MEMORY = {
    "plain": {"when_full": "drop_newest"},
    "traced-4k": {"when_full": "drop_newest", "traces": True, "texts": 4096},
    "traced-4k-spill": {"when_full": "spill", "traces": True, "texts": 4096},
    "traced-4k-spool": {"when_full": "drop_newest", "traces": True, "texts": 4096},
}
SPOOLED = {"traced-4k-spill", "traced-4k-spool"}


def stall(server: MlflowServer, seconds: float, settings: dict[str, Any]) -> dict[str, Any]:
    """Our sink's memory while the server is stopped (SIGSTOP) and the loop runs at full
    speed for ``seconds``: the RSS it grows by, against the bound in bytes."""
    child = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "contenders.py"),
            "stall",
            "--uri",
            server.url,
            "--seconds",
            str(seconds),
            "--settings",
            json.dumps(settings),
            "--no-verify",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    for line in child.stdout:
        if line.startswith('{"ready"'):
            break
    assert server.process is not None
    os.killpg(server.process.pid, signal.SIGSTOP)
    try:
        child.stdin.write("go\n")
        child.stdin.flush()
        out = next(line for line in child.stdout if line.startswith('{"contender"'))
    finally:
        os.killpg(server.process.pid, signal.SIGCONT)
    child.wait(timeout=600)  # its close delivers the backlog to the resumed server
    result: dict[str, Any] = json.loads(out)
    # The documented bound: the events' bytes stay within memory_max_bytes (its default
    # here); the process's RSS also keeps what the allocator holds after they are gone.
    result["bound_mb"] = RSS_FACTOR * DEFAULT_MEMORY_MAX_BYTES / (1 << 20)
    result["within_bound"] = result["rss_growth_mb"] <= result["bound_mb"]
    return result


#: Steps of one loop-cost trial (after its warm-up), and the targets its figures are held to.
LOOP_STEPS = 50_000
LOOP_RATIO_TARGET = 1.2
LOOP_RSS_TARGET_MB = 30.0


def run_loop_cost(sink: str, uri: str) -> dict[str, Any]:
    args = [sink, "--uri", uri, "--steps", str(LOOP_STEPS)]
    args += ["--experiment", f"loop-{uuid.uuid4().hex[:8]}"]
    result: dict[str, Any] = trial("loop_cost.py", args, "loop_cost")["loop_cost"]
    return result


def loop_cost(uri: str, count: int) -> dict[str, Any]:
    """What a loop with its own per-step I/O (a JSONL line written and flushed, as rlm-code's
    runner does) pays per step with our sink and without: fresh processes, rounds that
    alternate which goes first, medians and their ratio."""
    samples: dict[str, list[dict[str, Any]]] = {"none": [], "ours": []}
    for r in range(count):
        for sink in ("none", "ours") if r % 2 == 0 else ("ours", "none"):
            result = run_loop_cost(sink, uri)
            samples[sink].append(result)
            print(f"  round {r + 1}/{count} loop, {sink:<5} {result['us_per_step']:.2f} us/step")
    bare = statistics.median(s["us_per_step"] for s in samples["none"])
    ours = statistics.median(s["us_per_step"] for s in samples["ours"])
    rss = statistics.median(s["rss_growth_mb"] for s in samples["ours"])
    return {
        "steps": LOOP_STEPS,
        "rounds": count,
        "bare_us_per_step": bare,
        "ours_us_per_step": ours,
        "ratio": ours / bare,
        "ratio_met": ours / bare <= LOOP_RATIO_TARGET,
        "rss_growth_mb": rss,
        "rss_met": rss <= LOOP_RSS_TARGET_MB,
        "delivered_after_loop_s": statistics.median(
            s["delivered_after_loop_s"] for s in samples["ours"]
        ),
        "mlflow_in_host": any(s["mlflow_in_host"] for s in samples["ours"]),
        "all_delivered": all(s["not_delivered"] == 0 for s in samples["ours"]),
        "samples": {k: [s["us_per_step"] for s in v] for k, v in samples.items()},
    }


def print_loop_cost(label: str, c: dict[str, Any]) -> None:
    print(
        f"loop cost, {label}: {c['bare_us_per_step']:.2f} -> {c['ours_us_per_step']:.2f} us per "
        f"step, {c['ratio']:.2f}x (target <= {LOOP_RATIO_TARGET}: "
        f"{'met' if c['ratio_met'] else 'MISSED'}); host RSS +{c['rss_growth_mb']:.0f} MB "
        f"(target <= {LOOP_RSS_TARGET_MB:.0f}: {'met' if c['rss_met'] else 'MISSED'}); "
        f"mlflow in the host: {c['mlflow_in_host']}; the rest delivered "
        f"{c['delivered_after_loop_s']:.1f} s after the loop"
        + ("" if c["all_delivered"] else " (NOT all delivered)")
    )


def memory(server: MlflowServer, seconds: float, spools: Path) -> dict[str, Any]:
    results = {}
    for name, settings in MEMORY.items():
        if name in SPOOLED:
            settings = {**settings, "spool_dir": str(spools / name)}
        print(f"  memory, server stopped: {name}", flush=True)
        results[name] = stall(server, seconds, settings)
    return results


def shutdown_flush(server: MlflowServer, ceiling: str, rounds_: int, steps: int) -> dict[str, Any]:
    """Flush at shutdown of one long run, against the raw ceiling (the better of raw-1 and
    raw-4 in this server's rounds) for the same data, interleaved."""
    samples: dict[str, list[dict[str, Any]]] = {"ours": [], ceiling: []}
    for r in range(rounds_):
        for name in ["ours", ceiling] if r % 2 == 0 else [ceiling, "ours"]:
            samples[name].append(run_contender(name, server.url, 1, steps))
    ours = statistics.median(s["delivered_s"] for s in samples["ours"])
    raw = statistics.median(s["delivered_s"] for s in samples[ceiling])
    flush = statistics.median(s["flush_after_loop_s"] for s in samples["ours"])
    return {
        "steps": steps,
        "rounds": rounds_,
        "ceiling": ceiling,
        "ours_all_on_server_s": ours,
        "ours_flush_after_loop_s": flush,
        "ceiling_s": raw,
        "ratio": ours / raw,
        "met": ours / raw <= 1.2,
        "samples": {k: [s["delivered_s"] for s in v] for k, v in samples.items()},
        "all_landed": all(s["all_landed"] for v in samples.values() for s in v),
    }


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = results["stores"]["server-4-workers"]
    names = [n for n in WORKLOAD if n in table]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    hooks = [table[n]["hook_median_us"] or 0 for n in names]
    left.barh(names, hooks, color=["#2b8a3e" if n == "ours" else "#868e96" for n in names])
    left.set_xscale("log")
    left.set_xlabel("time in the loop per step, median (µs, log scale)")
    left.invert_yaxis()
    rates = [table[n]["metrics_per_s"] or 0 for n in names]
    right.barh(names, rates, color=["#2b8a3e" if n == "ours" else "#868e96" for n in names])
    right.set_xscale("log")
    right.set_xlabel("delivered metrics per second (log scale)")
    right.invert_yaxis()
    right.set_yticklabels([])
    fig.suptitle("rlm-mlflow vs peers: mlflow server (SQLite, 4 workers) on 127.0.0.1, 2 cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--stall", type=float, default=30.0, help="seconds the server stops")
    parser.add_argument("--flush-steps", type=int, default=100_000)
    parser.add_argument("--flush-rounds", type=int, default=3)
    parser.add_argument(
        "--stores",
        default="server-1-worker,server-4-workers,embedded",
        help="which stores to run (comma-separated)",
    )
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    started = time.time()
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "stores": {},
        "ratios": {},
        "cpus": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        stores = args.stores.split(",")
        for label, workers in (("server-1-worker", 1), ("server-4-workers", 4)):
            if label not in stores:
                continue
            print(f"\n== mlflow server, SQLite, --workers {workers}", flush=True)
            with MlflowServer(Path(tmp) / label, workers=workers) as server:
                table = summarize(rounds(server.url, list(WORKLOAD), args.rounds))
                results["stores"][label] = table
                results["ratios"][label] = ratios(table)
                if workers == 4:
                    print("  the spool's fsync levels", flush=True)
                    spool = summarize(
                        rounds(server.url, list(SPOOL), args.rounds, SPOOL, Path(tmp) / "spools")
                    )
                    results["spool"] = spool
                    results["memory"] = memory(server, args.stall, Path(tmp) / "memory")
                    print("  loop cost", flush=True)
                    results["loop_cost"] = {label: loop_cost(server.url, args.rounds)}
                    print("  flush at shutdown of a long run", flush=True)
                    ceiling = max(("raw-1", "raw-4"), key=lambda n: table[n]["metrics_per_s"])
                    results["shutdown_flush"] = shutdown_flush(
                        server, ceiling, args.flush_rounds, args.flush_steps
                    )
        if "embedded" in stores:
            print("\n== embedded store (sqlite:///, no server)", flush=True)
            uri = f"sqlite:///{Path(tmp) / 'embedded.db'}"
            table = summarize(rounds(uri, EMBEDDED, args.rounds))
            results["stores"]["embedded"] = table
            results["ratios"]["embedded"] = ratios(table)
            print("  loop cost", flush=True)
            embedded = f"sqlite:///{Path(tmp) / 'loop.db'}"
            results.setdefault("loop_cost", {})["embedded"] = loop_cost(embedded, args.rounds)
    results["seconds"] = time.time() - started

    for label, table in results["stores"].items():
        print_table(f"{label} (medians of {args.rounds} rounds)", table)
        print_ratios(results["ratios"][label])
    if "spool" in results:
        print_table(
            f"the spool, server-4-workers (medians of {args.rounds} rounds)", results["spool"]
        )
    for label, cost in results.get("loop_cost", {}).items():
        print_loop_cost(label, cost)
    if "memory" not in results:
        return
    print(f"\nserver stopped {args.stall:.0f} s, loop at full speed:")
    for name, s in results["memory"].items():
        print(
            f"  {name:<16} {s['steps_logged']:>10,} steps, RSS +{s['rss_growth_mb']:.1f} MB "
            f"(bound {s['bound_mb']:.0f} MB: {'within' if s['within_bound'] else 'EXCEEDED'}), "
            f"{s['dropped']:,} dropped (counted)"
        )
    f = results["shutdown_flush"]
    print(
        f"{f['steps']:,}-step run: all on the server {f['ours_all_on_server_s']:.1f} s after "
        f"the loop started (flush after the loop {f['ours_flush_after_loop_s']:.1f} s); "
        f"ceiling ({f['ceiling']}) {f['ceiling_s']:.1f} s; ratio {f['ratio']:.2f} (target <= 1.2: "
        f"{'met' if f['met'] else 'MISSED'})"
    )
    ttfh = results["stores"]["server-4-workers"]["ours"]["time_to_first_hook_s"]
    print(f"time to first hook (import rlm_mlflow + MLflowSink() + on_run_start): {ttfh:.3f} s")
    print(f"total {results['seconds']:.0f} s")

    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in (f"bench-{stamp}.json", "latest.json"):
        (RESULTS / name).write_text(json.dumps(results, indent=2))
    plot(results, RESULTS / "bench.png")
    print(f"wrote {RESULTS / 'latest.json'} and {RESULTS / 'bench.png'}")


if __name__ == "__main__":
    main()
