"""`make bench-scale`: many producer processes, one `mlflow server --workers 4` on PostgreSQL.

P processes (default 4), each with R runs (8) of S steps, all at once against one server whose
backend store is a fresh database on this machine's PostgreSQL (127.0.0.1:5432). Contenders,
interleaved in rounds: our sink in every process, and the server's ceiling: raw 1,000-metric
log_batch calls from the same number of processes, 4 threads each (our sink's default
max_in_flight). Reported: aggregate delivered metrics/s of each and their ratio (medians).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))  # the test rig: real servers
from support.servers import MlflowServer, scratch_postgres_database

HERE = Path(__file__).parent


def one_round(url: str, contender: str, processes: int, runs: int, steps: int) -> dict[str, Any]:
    experiment = f"scale-{uuid.uuid4().hex[:8]}"
    children = [
        subprocess.Popen(
            [
                sys.executable,
                str(HERE / "contenders.py"),
                contender,
                "--uri",
                url,
                "--experiment",
                experiment,
                "--runs",
                str(runs),
                "--steps",
                str(steps),
                "--no-verify",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    results = []
    for child in children:
        out, err = child.communicate(timeout=1800)
        lines = [line for line in out.splitlines() if line.startswith('{"contender"')]
        if child.returncode != 0 or not lines:
            raise RuntimeError(f"{contender} failed:\n{err[-3000:]}")
        results.append(json.loads(lines[-1]))
    metrics = sum(r["metrics"] for r in results)
    wall = max(r["delivered_s"] for r in results)
    return {"metrics": metrics, "slowest_s": wall, "metrics_per_s": metrics / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2_500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    samples: dict[str, list[dict[str, Any]]] = {"ours": [], "raw-4": []}
    with (
        scratch_postgres_database("rlm_mlflow_bench") as database,
        tempfile.TemporaryDirectory() as tmp,
    ):
        store = [
            "--backend-store-uri",
            database,
            "--artifacts-destination",
            str(Path(tmp) / "artifacts"),
        ]
        with MlflowServer(Path(tmp), store_args=store, workers=4) as server:
            for r in range(args.rounds):
                for name in ["ours", "raw-4"] if r % 2 == 0 else ["raw-4", "ours"]:
                    result = one_round(server.url, name, args.processes, args.runs, args.steps)
                    samples[name].append(result)
                    print(
                        f"round {r + 1}/{args.rounds} {name:<6} "
                        f"{result['metrics_per_s']:,.0f} metrics/s "
                        f"({result['metrics']:,} metrics, slowest process "
                        f"{result['slowest_s']:.1f} s)",
                        flush=True,
                    )
    ours = statistics.median(s["metrics_per_s"] for s in samples["ours"])
    ceiling = statistics.median(s["metrics_per_s"] for s in samples["raw-4"])
    print(
        f"\n{args.processes} processes x {args.runs} runs x {args.steps} steps, "
        f"mlflow server --workers 4 on PostgreSQL, medians of {args.rounds} rounds:"
    )
    print(f"  ours     {ours:,.0f} metrics/s")
    print(f"  ceiling  {ceiling:,.0f} metrics/s (raw log_batch, same processes)")
    print(f"  ratio    {ours / ceiling:.2f}")
    out = HERE / "results" / "scale-latest.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "args": vars(args),
                "samples": samples,
                "ours": ours,
                "ceiling": ceiling,
                "ratio": ours / ceiling,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
