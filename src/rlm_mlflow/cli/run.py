"""`rlm-mlflow run`: a synthetic RLM benchmark loop reporting through the sink, with a
progress line on stderr."""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from .._redact import redact_uri
from ..exporters.base import is_http
from .common import CliError, preflight, resolve_uri, settings_from


class Progress:
    """One status line on stderr: steps done, steps/s, and the sink's queue depth. It starts
    drawing once the sink has connected (so the "connected" line comes first)."""

    def __init__(self, total: int, sink: Any) -> None:
        self.total, self.sink, self.done = total, sink, 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._start = time.perf_counter()
        self._tty = sys.stderr.isatty()
        self._ended: float | None = None
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ended = time.perf_counter()  # the rate is the loop's, not the wait's below
        self._stop.set()
        self._thread.join()
        self._wait_connected(time.monotonic() + 30)  # a fast loop ends before it connects
        self._draw(final=True)

    def advance(self) -> None:
        with self._lock:
            self.done += 1

    def _connected(self) -> bool:
        status = self.sink.status()
        return status.get("tracking_uri") is not None or not status.get("available")

    def _wait_connected(self, deadline: float) -> None:
        while not self._connected() and time.monotonic() < deadline:
            time.sleep(0.05)

    def _loop(self) -> None:
        deadline = time.monotonic() + 30
        while not self._stop.wait(0.05) and not self._connected():
            if time.monotonic() > deadline:
                break
        while not self._stop.wait(0.2 if self._tty else 5.0):
            self._draw()

    def _draw(self, final: bool = False) -> None:
        elapsed = max((self._ended or time.perf_counter()) - self._start, 1e-9)
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} steps "
            f"{self.done / elapsed:,.0f} steps/s  queue {self.sink.status().get('queued', 0)}"
        )
        end = "\n" if final or not self._tty else ""
        sys.stderr.write(("\r" if self._tty else "") + line + end)
        sys.stderr.flush()


def mlflow_command() -> str:
    """``mlflow`` when it is on PATH, else the one installed beside this Python (a venv)."""
    beside = Path(sys.executable).with_name("mlflow")
    if shutil.which("mlflow") is None and beside.exists():
        return str(beside)
    return "mlflow"


def cmd_run(args: argparse.Namespace) -> int:
    from .._sink import MLflowSink
    from .._workload import Plan, run_rlm, total_steps

    tracking_uri = resolve_uri(args)
    settings = settings_from(args)
    preflight(tracking_uri, bool(settings.spool_dir))
    plan = Plan(args.task, args.environment, args.steps, args.depth, args.seed, Path(args.run_dir))
    try:
        plan.run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"--run-dir {plan.run_dir}: {exc.strerror or exc}") from None
    sink = MLflowSink(
        True, experiment=args.experiment, tracking_uri=tracking_uri, settings=settings
    )
    # Short and distinct at the front: the UI's Run Name column shows about 15 characters.
    batch = f"{args.environment[:8]}-{uuid.uuid4().hex[:4]}"
    total = args.runs * total_steps(args.steps, args.depth)
    print(
        f"{args.runs} run(s) of {args.steps} steps, depth {args.depth}: {total} steps "
        f"-> {redact_uri(tracking_uri)} (experiment {args.experiment})",
        file=sys.stderr,
    )
    started = time.perf_counter()
    with Progress(total, sink) as progress:
        for k in range(args.runs):
            run_rlm(sink, plan, f"{batch}-{k}", str(k), 0, None, progress.advance)
        looped = time.perf_counter() - started
    flushed = sink.flush(timeout=args.flush_timeout)
    flush_s = time.perf_counter() - started - looped
    sink.close()
    status = sink.status()
    print(
        f"loop {looped:.2f} s, then flush {flush_s:.2f} s "
        f"({'complete' if flushed else 'TIMED OUT'}): delivered {status.get('delivered')} "
        f"events, failed {status.get('failed')}, dropped {status.get('dropped')}, "
        f"rejected {status.get('rejected')}"
    )
    print(f"runs: {batch}-0 .. {batch}-{args.runs - 1} in experiment '{args.experiment}'")
    print(f"trajectories: {plan.run_dir.resolve()}")
    if is_http(tracking_uri):
        print(f"open: {redact_uri(tracking_uri)}")
    else:
        print(
            f"open: {mlflow_command()} ui --backend-store-uri {redact_uri(tracking_uri)}   "
            "(then http://127.0.0.1:5000)"
        )
    ok = flushed and not (status.get("failed") or status.get("dropped") or status.get("rejected"))
    return 0 if ok else 1
