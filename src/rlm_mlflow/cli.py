"""`rlm-mlflow`: a synthetic RLM benchmark loop that reports through the sink, and `status`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._deadletter import DeadLetters
from ._exporter import is_http
from ._log import RECORD_KEY, stdlib_logger
from ._redact import redact_uri
from ._settings import DEFAULT_EXPERIMENT, PARSERS, Settings, env_name, parse_bool
from ._sink import MLflowSink
from ._sync import sync

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
KNOWN_SCHEMES = frozenset(
    {"http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks"}
)
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_NOT_FOUND = 127  # what a shell answers for a command it cannot run
#: The directory ``instrument`` puts first on PYTHONPATH: it holds only a sitecustomize.
BOOTSTRAP = Path(__file__).parent / "_bootstrap"


@dataclass(frozen=True)
class Result:
    """What rlm-code's runner hands to ``on_run_end``."""

    completed: bool
    steps: int
    total_reward: float


@dataclass(frozen=True)
class Plan:
    task: str
    environment: str
    steps: int
    depth: int
    seed: int
    run_dir: Path


class Progress:
    """One status line on stderr: steps done, steps/s, and the sink's queue depth."""

    def __init__(self, total: int, sink: MLflowSink) -> None:
        self.total, self.sink, self.done = total, sink, 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._start = time.perf_counter()
        self._tty = sys.stderr.isatty()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._draw(final=True)

    def advance(self) -> None:
        with self._lock:
            self.done += 1

    def _loop(self) -> None:
        while not self._stop.wait(0.2 if self._tty else 5.0):
            self._draw()

    def _draw(self, final: bool = False) -> None:
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} steps "
            f"{self.done / elapsed:,.0f} steps/s  queue {self.sink.status().get('queued', 0)}"
        )
        end = "\n" if final or not self._tty else ""
        sys.stderr.write(("\r" if self._tty else "") + line + end)
        sys.stderr.flush()


def run_rlm(
    sink: MLflowSink,
    plan: Plan,
    run_id: str,
    path: str,
    depth: int,
    parent: str | None,
    progress: Progress,
) -> None:
    """One RLM run: deterministic rewards from (seed, position in the tree); at half-time a
    non-leaf run spawns two child runs in parallel threads and waits for them."""
    steps = plan.steps if depth == 0 else max(plan.steps >> depth, 1)
    params: dict[str, Any] = {
        "max_steps": steps,
        "model": "synthetic",
        "seed": plan.seed,
        "depth": depth,
        "parent_run_id": parent,
    }
    sink.on_run_start(run_id, task=plan.task, environment=plan.environment, params=params)
    rng = random.Random(f"{plan.seed}:{path}")
    trajectory = plan.run_dir / f"{run_id}.jsonl"
    cumulative = 0.0
    with trajectory.open("w", encoding="utf-8") as out:
        for step in range(steps):
            if step == steps // 2 and depth < plan.depth:
                children = [
                    threading.Thread(
                        target=run_rlm,
                        args=(
                            sink,
                            plan,
                            f"{run_id}.{i}",
                            f"{path}.{i}",
                            depth + 1,
                            run_id,
                            progress,
                        ),
                    )
                    for i in range(2)
                ]
                for child in children:
                    child.start()
                for child in children:
                    child.join()
            # A learning curve with noise: the reward drifts from ~0.2 up to ~0.8.
            reward = round(min(1.0, max(0.0, 0.2 + 0.6 * step / steps + rng.gauss(0, 0.1))), 4)
            cumulative += reward
            event = {
                "step": step,
                "action": {"type": "code", "chars": rng.randint(20, 400)},
                "observation": {"success": reward > 0.5},
                "reward": reward,
            }
            out.write(json.dumps(event) + "\n")
            sink.on_step(run_id, event=event, cumulative_reward=cumulative)
            progress.advance()
    sink.on_run_end(run_id, result=Result(True, steps, cumulative), run_path=trajectory)


def mlflow_command() -> str:
    """``mlflow`` when it is on PATH, else the one installed beside this Python (a venv)."""
    beside = Path(sys.executable).with_name("mlflow")
    if shutil.which("mlflow") is None and beside.exists():
        return str(beside)
    return "mlflow"


def total_steps(steps: int, max_depth: int) -> int:
    return sum((2**d) * max(steps >> d, 1) for d in range(max_depth + 1))


class CliError(Exception):
    """A one-line message for the user, and the exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def settings_from(args: argparse.Namespace, **fixed: Any) -> Settings:
    """Defaults, then DSPY_RLM_MLFLOW_* variables, then the flags given."""
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(Settings)
        if getattr(args, f.name, None) is not None
    }
    try:
        return Settings.from_env(**{**given, **fixed})
    except ValueError as exc:
        raise CliError(f"bad setting: {exc}") from None


def resolve_uri(args: argparse.Namespace) -> str:
    uri: str = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme.split("+", 1)[0] not in KNOWN_SCHEMES:
        raise CliError(
            f"unsupported tracking URI {redact_uri(uri)!r}: use http(s)://host:port, "
            "sqlite:///path.db, or a database URI (postgresql://, mysql://)"
        )
    return uri


def preflight(uri: str, spooled: bool) -> None:
    """Fail fast, in one line, when a tracking server is not there (unless journalling)."""
    if not is_http(uri) or spooled:
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5):
            return
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CliError(
            f"cannot reach the tracking server at {redact_uri(uri)} ({reason}); "
            "start it, or pass --spool-dir to journal offline and sync later",
            EXIT_UNREACHABLE,
        ) from None


def cmd_run(args: argparse.Namespace) -> int:
    tracking_uri = resolve_uri(args)
    settings = settings_from(args)
    preflight(tracking_uri, bool(settings.spool_dir))
    sink = MLflowSink(
        True, experiment=args.experiment, tracking_uri=tracking_uri, settings=settings
    )
    plan = Plan(args.task, args.environment, args.steps, args.depth, args.seed, Path(args.run_dir))
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    batch = f"rlm-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    total = args.runs * total_steps(args.steps, args.depth)
    print(
        f"{args.runs} run(s) of {args.steps} steps, depth {args.depth}: {total} steps "
        f"-> {tracking_uri} (experiment {args.experiment})",
        file=sys.stderr,
    )
    started = time.perf_counter()
    with Progress(total, sink) as progress:
        for k in range(args.runs):
            run_rlm(sink, plan, f"{batch}-{k}", str(k), 0, None, progress)
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
        print(f"open: {tracking_uri}")
    else:
        print(
            f"open: {mlflow_command()} ui --backend-store-uri {tracking_uri}   "
            "(then http://127.0.0.1:5000)"
        )
    ok = flushed and not (status.get("failed") or status.get("dropped") or status.get("rejected"))
    return 0 if ok else 1


def cmd_status(args: argparse.Namespace) -> int:
    sink = MLflowSink.from_env()
    status = sink.status()
    sink.close(timeout=1.0)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    width = max(len(key) for key in status)
    for key, value in status.items():
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    spool = Path(args.spool_dir)
    if not spool.is_dir():
        print(f"rlm-mlflow sync: {spool} is not a directory", file=sys.stderr)
        return 2
    tracking_uri = resolve_uri(args)
    preflight(tracking_uri, spooled=False)
    settings = settings_from(args, spool_dir=str(spool))
    replayed = 0
    started = time.perf_counter()

    def progress(events: int) -> None:
        nonlocal replayed
        replayed += events
        rate = replayed / max(time.perf_counter() - started, 1e-9)
        end = "" if sys.stderr.isatty() else "\n"
        sys.stderr.write(f"\rreplayed {replayed} events ({rate:,.0f}/s){end}")

    summary = sync(
        spool, tracking_uri, settings, DeadLetters(spool / "dead-letter.jsonl"), progress=progress
    )
    if replayed:
        sys.stderr.write("\n")
    print(
        f"synced {summary.journals} journal(s) to {redact_uri(tracking_uri)}: "
        f"{summary.runs} runs, {summary.metrics} metrics, {summary.bytes} bytes read; "
        f"delivered {summary.delivered} events, rejected {summary.rejected}, "
        f"dead-lettered {summary.dead_lettered}, failed {summary.failed}, "
        f"corrupt records skipped {summary.corrupt_records}, journals kept {summary.kept}"
    )
    return 0 if summary.kept == 0 else 1


def cmd_instrument(args: argparse.Namespace) -> int:
    """Run the command with `autolog()` done at the start of each Python interpreter in it.

    The command replaces this process (exec): its exit code and the signals sent to it are
    its own, as with ``opentelemetry-instrument`` and ``ddtrace-run``.
    """
    command = list(args.cmd)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise CliError("instrument needs a command: rlm-mlflow instrument -- COMMAND [ARGS...]")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BOOTSTRAP), env.get("PYTHONPATH")]))
    if shutil.which(command[0], path=env.get("PATH")) is None:
        raise CliError(f"cannot run {command[0]!r}: command not found", EXIT_NOT_FOUND)
    if not parse_bool(env.get("DSPY_RLM_MLFLOW_ENABLED")):
        print(
            "rlm-mlflow instrument: DSPY_RLM_MLFLOW_ENABLED is not true, so rlm-code's MLflow "
            "slot stays off (export DSPY_RLM_MLFLOW_ENABLED=true)",
            file=sys.stderr,
        )
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(command[0], command, env)
    except OSError as exc:
        raise CliError(
            f"cannot run {command[0]!r}: {exc.strerror or exc}", EXIT_NOT_FOUND
        ) from None


class JsonLines(logging.Formatter):
    """One JSON object per log line: time, level, the event and its pairs."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, RECORD_KEY, None) or {"event": record.getMessage()}
        line = {"time": record.created, "level": record.levelname.lower(), **fields}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=repr)


def log_to_stderr(log_format: str) -> None:
    """The CLI is the application here: it shows our log lines on stderr (stdout carries the
    results), as text or JSON lines, from INFO up."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonLines()
        if log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S")
    )
    stdlib_logger.addHandler(handler)
    stdlib_logger.setLevel(logging.INFO)
    stdlib_logger.propagate = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlm-mlflow", description=__doc__)
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="how log lines look on stderr (default: text)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run a synthetic RLM benchmark loop that reports to MLflow",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run.add_argument("--task", required=True, help="the task text (its length is logged)")
    run.add_argument("--environment", required=True, help="the RLM environment name")
    run.add_argument("--steps", type=int, required=True, help="steps per root run")
    run.add_argument("--runs", type=int, default=1, help="root runs, one after the other")
    run.add_argument(
        "--depth",
        type=int,
        default=0,
        help="recursion depth: each level spawns two child runs at half-time",
    )
    run.add_argument("--seed", type=int, default=0, help="seed of the reward generator")
    run.add_argument(
        "--tracking-uri",
        default=None,
        help=f"MLflow tracking URI (env MLFLOW_TRACKING_URI, else {DEFAULT_TRACKING_URI})",
    )
    run.add_argument(
        "--experiment",
        default=os.environ.get("DSPY_RLM_MLFLOW_EXPERIMENT") or DEFAULT_EXPERIMENT,
        help="experiment (env DSPY_RLM_MLFLOW_EXPERIMENT)",
    )
    run.add_argument("--run-dir", default="rlm-runs", help="where trajectory JSONL files go")
    run.add_argument(
        "--flush-timeout", type=float, default=600.0, help="seconds to wait for delivery at the end"
    )
    add_setting_flags(run)
    run.set_defaults(func=cmd_run)
    status = sub.add_parser("status", help="print the sink's status() as configured by the env")
    status.add_argument("--json", action="store_true", help="JSON instead of a table")
    status.set_defaults(func=cmd_status)
    sync_ = sub.add_parser(
        "sync",
        help="deliver what dead or offline processes left in a spool directory",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sync_.add_argument("spool_dir", help="the spool directory (DSPY_RLM_MLFLOW_SPOOL_DIR)")
    sync_.add_argument(
        "--tracking-uri",
        default=None,
        help=f"MLflow tracking URI (env MLFLOW_TRACKING_URI, else {DEFAULT_TRACKING_URI})",
    )
    add_setting_flags(sync_, skip=("spool_dir", "when_full", "spool_max_bytes"))
    sync_.set_defaults(func=cmd_sync)
    instrument = sub.add_parser(
        "instrument",
        help="run a command (rlm-code, python script.py, ...) with our sink in rlm-code's slot",
        description="Run COMMAND with rlm_mlflow.autolog() done at the start of every Python "
        "interpreter it starts: each RLMObservability.default() of rlm-code then sends through "
        "this forwarder, configured by the same variables (DSPY_RLM_MLFLOW_ENABLED, "
        "MLFLOW_TRACKING_URI, DSPY_RLM_MLFLOW_EXPERIMENT). Exit code and signals are COMMAND's.",
    )
    instrument.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]")
    instrument.set_defaults(func=cmd_instrument)
    return parser


def add_setting_flags(parser: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    """Every setting as a flag; its help names the variable and the default."""
    group = parser.add_argument_group("sink settings (a flag wins over its variable)")
    for f in dataclasses.fields(Settings):
        if f.name in skip:
            continue
        kind = PARSERS[str(f.type)]
        help_text = f"{f.metadata['help']} (env {env_name(f.name)}, default {f.default!r})"
        group.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            type=kind,
            default=argparse.SUPPRESS,
            help=help_text.replace("%", "%%"),
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 done, 1 done but something was not delivered, 2 bad usage or setting,
    3 tracking server unreachable."""
    args = build_parser().parse_args(argv)
    log_to_stderr(args.log_format)
    try:
        code: int = args.func(args)
    except CliError as exc:
        print(f"rlm-mlflow: {exc}", file=sys.stderr)
        return exc.code
    return code


if __name__ == "__main__":
    sys.exit(main())
