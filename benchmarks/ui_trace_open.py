"""How long MLflow's UI takes to open a trace of N steps (2N + 1 spans), in a real browser
(headless Chromium): the time from asking for the trace's page until its span tree shows and
the page answers again (a script run in it returns), median of interleaved rounds per N. Sets
the default span cap (`trace_max_spans`). Writes benchmarks/results/trace-open.json.

``PLAYWRIGHT_PYTHON benchmarks/ui_trace_open.py`` (a Python with playwright, and Debian's
chromium), as for `make screenshots`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import sync_playwright
from ui_shots import CHROMIUM_ARGS, ROOT, close_popups, mlflow_server

#: Steps per trace; each step is two spans (the step's and its LLM span's), plus the root.
SIZES = (50, 100, 200, 250, 400, 800, 1600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, mlflow_server(args.venv, Path(tmp)) as url:
        env = {**os.environ, "MLFLOW_TRACKING_URI": url, "DSPY_RLM_MLFLOW_EXPERIMENT": "spans"}
        out = subprocess.run(
            [str(args.venv / "bin" / "python"), str(Path(__file__).with_name("ui_trace_data.py"))]
            + [str(n) for n in SIZES],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        data = json.loads(out.strip().splitlines()[-1])
        seconds: dict[int, list[float]] = {n: [] for n in SIZES}
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=args.chromium, headless=True, args=CHROMIUM_ARGS
            )
            page = browser.new_page(viewport={"width": 1600, "height": 900})
            page.goto(f"{url}/#/experiments/{data['experiment_id']}/traces")
            page.wait_for_timeout(3000)
            close_popups(page)
            for round_ in range(args.rounds + 1):  # round 0 warms the page's caches
                order = SIZES[round_ % len(SIZES) :] + SIZES[: round_ % len(SIZES)]
                for n in order:
                    page.goto(f"{url}/#/experiments/{data['experiment_id']}/overview")
                    page.wait_for_timeout(500)
                    trace = data["traces"][str(n)]
                    started = time.perf_counter()
                    page.goto(
                        f"{url}/#/experiments/{data['experiment_id']}/traces"
                        f"?selectedEvaluationId={trace}"
                    )
                    page.get_by_text("step 1: run_python", exact=True).first.wait_for(
                        timeout=120_000
                    )
                    page.evaluate("() => new Promise(r => requestAnimationFrame(() => r(1)))")
                    if round_:
                        seconds[n].append(time.perf_counter() - started)
                print(f"round {round_}/{args.rounds}", file=sys.stderr)
            browser.close()
    report = {str(n): statistics.median(v) for n, v in seconds.items()}
    print("| steps | spans | opens in, median |\n|---|---|---|")
    for n in SIZES:
        print(f"| {n} | {2 * n + 1} | {report[str(n)]:.2f} s |")
    out_path = ROOT / "benchmarks" / "results" / "trace-open.json"
    out_path.write_text(json.dumps({"rounds": args.rounds, "seconds": report}, indent=2) + "\n")


if __name__ == "__main__":
    main()
