"""The docs' screenshots of MLflow's own UI, taken in a real browser (headless Chromium).

Starts an ``mlflow server`` on 127.0.0.1 (SQLite, a temporary directory), fills it with
`ui_data.py` (two rlm-code benchmarks, one per model, under autolog with traces on), opens
MLflow's views in Chromium and writes the pictures to docs/images/. Stops the server by its pid.

Run with a Python that has ``playwright`` (not one of our dependencies) and Debian's
``chromium``: ``make screenshots PLAYWRIGHT_PYTHON=/path/to/venv/bin/python``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from playwright.sync_api import Page, sync_playwright

HERE = Path(__file__).parent
ROOT = HERE.parent
IMAGES = ROOT / "docs" / "images"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
EXPERIMENT = "rlm-benchmarks"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def mlflow_server(venv: Path, root: Path) -> Iterator[str]:
    port = free_port()
    command = [
        str(venv / "bin" / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--default-artifact-root",
        str(root / "artifacts"),
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(root / "server.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"no mlflow server: {root / 'server.log'}") from None
                time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def fill(venv: Path, url: str) -> dict[str, Any]:
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": url,
        "DSPY_RLM_MLFLOW_ENABLED": "true",
        "DSPY_RLM_MLFLOW_TRACES": "true",
        "DSPY_RLM_MLFLOW_EXPERIMENT": EXPERIMENT,
    }
    out = subprocess.run(
        [str(venv / "bin" / "python"), str(HERE / "ui_data.py")],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    data: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return data


def settle(page: Page, ms: int = 2500) -> None:
    """MLflow's pages poll the server: never network-idle. Loaded, then a moment to render."""
    page.wait_for_load_state("load")
    page.wait_for_timeout(ms)


def close_popups(page: Page) -> None:
    for name in ("Close", "Got it"):
        button = page.get_by_role("button", name=name, exact=True)
        for i in range(button.count()):
            if button.nth(i).is_visible():
                button.nth(i).click()
                page.wait_for_timeout(300)


def choose_columns(page: Page, off: list[str], on: list[str]) -> None:
    """Columns on and off through the view's own Columns menu (an antd tree of checkboxes)."""
    for name, want in [(n, False) for n in off] + [(n, True) for n in on]:
        search = page.get_by_placeholder("Search columns")
        if not search.is_visible():
            page.get_by_role("button", name="Columns").first.click()
            search.wait_for(state="visible")
        search.fill(name)
        page.wait_for_timeout(400)
        title = page.locator(".du-bois-light-tree-title").get_by_text(name, exact=True)
        node = page.get_by_role("dialog").locator(".du-bois-light-tree-treenode").filter(has=title)
        box = node.first.locator(".du-bois-light-tree-checkbox")
        checked = "checkbox-checked" in (box.get_attribute("class") or "")
        if checked != want:
            box.click()
            page.wait_for_timeout(300)
    page.keyboard.press("Escape")
    page.wait_for_timeout(500)


def runs_table(page: Page, url: str, experiment: str, benchmarks: list[str]) -> None:
    page.goto(f"{url}/#/experiments/{experiment}/runs")
    settle(page)
    close_popups(page)
    choose_columns(
        page,
        off=["Dataset", "Source"],
        on=["rlm.case_id", "answer_match", "avg_reward", "answer_match_rate"],
    )
    for benchmark in benchmarks:  # expand each benchmark (a parent run): its cases below
        cell = page.locator(".ag-row [col-id='attributes.`Run Name`']", has_text=benchmark)
        cell.locator("button").first.click()
        page.wait_for_timeout(500)
    settle(page, 1000)
    page.screenshot(path=IMAGES / "benchmarks-runs.png")


def compare(page: Page, url: str, experiment: str, run_ids: list[str]) -> None:
    runs = json.dumps(run_ids)
    page.goto(f"{url}/#/compare-runs?runs={runs}&experiments={json.dumps([experiment])}")
    settle(page)
    close_popups(page)
    page.get_by_text("Metrics", exact=True).last.scroll_into_view_if_needed()
    page.evaluate("window.scrollBy(0, -120)")
    page.wait_for_timeout(800)
    page.screenshot(path=IMAGES / "benchmarks-compare.png")


def case_trace(page: Page, url: str, experiment: str, trace_id: str) -> None:
    page.goto(f"{url}/#/experiments/{experiment}/traces")
    settle(page, 4000)
    close_popups(page)
    header = page.get_by_role("columnheader", name=re.compile("total_reward")).first
    header.scroll_into_view_if_needed()  # the assessments' columns, right of the tags
    page.wait_for_timeout(800)
    page.screenshot(path=IMAGES / "benchmarks-traces.png")
    page.goto(f"{url}/#/experiments/{experiment}/traces?selectedEvaluationId={trace_id}")
    settle(page, 4000)
    close_popups(page)
    page.get_by_role("button", name=re.compile(r"^Assess trace")).first.click()
    page.wait_for_timeout(1500)
    page.screenshot(path=IMAGES / "benchmarks-trace-feedback.png")


def traces(page: Page, url: str, experiment: str, failed: str) -> None:
    """The trace list's own columns; a failed step marked, its error and its code; a
    recursive run's traces as one session."""
    page.goto(f"{url}/#/experiments/{experiment}/traces")
    settle(page, 4000)
    close_popups(page)
    on = ("Trace name", "User", "Session", "Source", "Run name", "total_reward", "steps")
    off = ("Time", "Output", "Duration", "Tags", "Tokens", "answer_match", "expected_answer")
    for name in (*on, *off):
        page.get_by_role("button", name="Display").first.click()
        page.get_by_text("Columns", exact=True).last.hover()
        item = page.get_by_role("menuitemcheckbox", name=name, exact=True).first
        item.wait_for(state="visible")
        if (item.get_attribute("aria-checked") == "true") != (name in on):
            item.click()
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)
    page.wait_for_timeout(1000)
    page.screenshot(path=IMAGES / "traces-list.png")
    page.get_by_role("button", name="Group traces by session").click()
    page.wait_for_timeout(2500)
    page.screenshot(path=IMAGES / "traces-sessions.png")
    page.goto(f"{url}/#/experiments/{experiment}/traces?selectedEvaluationId={failed}")
    settle(page, 4000)
    close_popups(page)
    page.get_by_text("step 1: run_python", exact=True).first.click()
    page.wait_for_timeout(1500)
    page.screenshot(path=IMAGES / "traces-failed-step.png")
    page.get_by_role("tab", name="Inputs / Outputs").click()
    page.wait_for_timeout(1000)
    page.screenshot(path=IMAGES / "traces-step-code.png")


def logged_models(page: Page, url: str, experiment: str) -> None:
    page.goto(f"{url}/#/experiments/{experiment}/models")
    settle(page)
    close_popups(page)
    page.get_by_role("button", name="Columns").first.click()
    page.wait_for_timeout(600)
    for name in ("Logged from", "Registered models", "Dataset"):  # room for the metrics
        node = page.locator(".du-bois-light-tree-treenode").filter(
            has=page.locator(".du-bois-light-tree-title").get_by_text(name, exact=True)
        )
        node.first.locator(".du-bois-light-tree-checkbox").click()
        page.wait_for_timeout(300)
    page.keyboard.press("Escape")
    page.wait_for_timeout(500)
    page.get_by_role("columnheader", name=re.compile("avg_reward")).first.click()  # sort
    page.wait_for_timeout(1000)
    page.screenshot(path=IMAGES / "benchmarks-models.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--url", help="an already filled server (skips starting one)")
    parser.add_argument("--data", help="ui_data.py's JSON for --url")
    args = parser.parse_args()
    IMAGES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.url:
            url, data = args.url, json.loads(args.data)
            shots(args, url, data)
        else:
            with mlflow_server(args.venv, Path(tmp)) as url:
                shots(args, url, fill(args.venv, url))


def shots(args: argparse.Namespace, url: str, data: dict[str, Any]) -> None:
    experiment = data["experiment_id"]
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=args.chromium, headless=True, args=CHROMIUM_ARGS
        )
        page = browser.new_page(viewport={"width": 1600, "height": 900})
        runs_table(page, url, experiment, data["benchmarks"])
        compare(page, url, experiment, data["parent_runs"])
        case_trace(page, url, experiment, data["case_trace"])
        logged_models(page, url, experiment)
        traces(page, url, experiment, data["failed_trace"])
        browser.close()
    print("\n".join(str(p) for p in sorted(IMAGES.glob("*.png"))), file=sys.stderr)


if __name__ == "__main__":
    main()
