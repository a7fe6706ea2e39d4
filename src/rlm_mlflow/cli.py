"""The `rlm-mlflow` command: its five commands, each a function, and their parser.

Longer than the library's modules because it holds all five (and `status`'s read-only look
at a store and a spool); what they drive lives in the library (`_workload`, `_replay`,
`_autolog`'s bootstrap, `_instrument`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from ._deadletter import DeadLetters
from ._destination import DEFAULT_TRACKING_URI
from ._exporter import is_http
from ._instrument import blind_flags, warning
from ._log import RECORD_KEY, stdlib_logger
from ._orphans import waiting_journals
from ._redact import redact_uri
from ._settings import DEFAULT_EXPERIMENT, PARSERS, Settings, env_name, parse_bool

KNOWN_SCHEMES = frozenset(
    {"http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks"}
)
DESCRIPTION = """rlm-mlflow: forward RLM benchmark runs to MLflow.

Commands: `run` (a synthetic RLM benchmark loop that reports to MLflow), `status` (what a
sink would use and find, read-only), `sync` (deliver what dead or offline processes left in a
spool directory), `instrument` (run a command with this forwarder in rlm-code's MLflow slot),
`import` (backfill MLflow from the run and benchmark files rlm-code wrote).
"""
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_NOT_FOUND = 127  # what a shell answers for a command it cannot run
#: The directory ``instrument`` puts first on PYTHONPATH: it holds only a sitecustomize.
BOOTSTRAP = Path(__file__).parent / "_bootstrap"


class CliError(Exception):
    """A one-line message for the user, and the exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


class Parser(argparse.ArgumentParser):
    """Usage errors in one line (naming the flag), exit 2, as every other error here."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"rlm-mlflow: {message} (see {self.prog} --help)\n")


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except where there is none to show (required options)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default in (None, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def _count(minimum: int) -> Any:
    """An argparse type: an integer of at least ``minimum``."""

    def parse(raw: str) -> int:
        value = int(raw)
        if value < minimum:
            raise ValueError(raw)
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


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


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags."""
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(Settings)
        if getattr(args, f.name, None) is not None
    }


def settings_from(args: argparse.Namespace, **fixed: Any) -> Settings:
    """Defaults, then DSPY_RLM_MLFLOW_* variables, then the flags given."""
    try:
        return Settings.from_env(**{**given_settings(args), **fixed})
    except ValueError as exc:
        raise CliError(f"bad setting: {exc}") from None


def resolve_uri(args: argparse.Namespace) -> str:
    return checked_uri(
        args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    )


def checked_uri(uri: str) -> str:
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme.split("+", 1)[0] not in KNOWN_SCHEMES:
        raise CliError(
            f"unsupported tracking URI {redact_uri(uri)!r}: use http(s)://host:port, "
            "sqlite:///path.db, or a database URI (postgresql://, mysql://)"
        )
    return uri


def probe(uri: str) -> tuple[bool | None, str]:
    """Whether the tracking store can be reached, by one cheap look that changes nothing:
    a server's /health, a database's port, a SQLite file's presence."""
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.split("+", 1)[0]
    if is_http(uri):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5):
                return True, "the server answers /health"
        except (urllib.error.URLError, OSError) as exc:
            return False, f"no answer: {getattr(exc, 'reason', exc)}"
    if scheme == "sqlite":
        path = Path(urllib.parse.unquote(uri.removeprefix("sqlite:///")))
        if path.is_file():
            return True, f"{path} exists"
        return None, f"{path} does not exist yet (MLflow creates it on first use)"
    if scheme in {"postgresql", "mysql", "mssql"} and parts.hostname:
        default_port = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}[scheme]
        try:
            with socket.create_connection((parts.hostname, parts.port or default_port), 5):
                return True, f"{parts.hostname}:{parts.port or default_port} accepts connections"
        except OSError as exc:
            return False, f"{parts.hostname}:{parts.port or default_port}: {exc}"
    return None, "not checked for this kind of store"


def preflight(uri: str, spooled: bool) -> None:
    """Fail fast, in one line, when a tracking server is not there (unless journalling)."""
    if not is_http(uri) or spooled:
        return
    reachable, detail = probe(uri)
    if not reachable:
        raise CliError(
            f"cannot reach the tracking server at {redact_uri(uri)} ({detail}); "
            "start it, or pass --spool-dir to journal offline and sync later",
            EXIT_UNREACHABLE,
        )


def cmd_run(args: argparse.Namespace) -> int:
    from ._sink import MLflowSink
    from ._workload import Plan, run_rlm, total_steps

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


def cmd_status(args: argparse.Namespace) -> int:
    """What a sink configured like this would use and find. Read-only: imports no mlflow,
    creates no experiment, no file and no journal, replays nothing."""
    settings = settings_from(args)
    flags = given_settings(args)
    enabled = parse_bool(os.environ.get("DSPY_RLM_MLFLOW_ENABLED"))
    experiment = os.environ.get("DSPY_RLM_MLFLOW_EXPERIMENT") or DEFAULT_EXPERIMENT
    configured = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    importable = importlib.util.find_spec("mlflow") is not None
    if not enabled:
        detail = "disabled"
    elif not importable:
        detail = "unavailable: No module named 'mlflow'"
    else:
        detail = redact_uri(configured) or "default-tracking-uri"
    uri = resolve_uri(args)
    reachable, store_detail = probe(uri)
    status: dict[str, Any] = {
        "name": "mlflow",
        "enabled": enabled,
        "available": enabled and importable,
        "detail": detail,
        "experiment": experiment,
        "tracking_uri": redact_uri(uri),
        "mlflow": "importable" if importable else "not installed",
        "store_reachable": reachable,
        "store": store_detail,
        "settings": {
            f.name: {
                "value": getattr(settings, f.name),
                "source": "flag"
                if f.name in flags
                else "env"
                if env_name(f.name) in os.environ
                else "default",
            }
            for f in dataclasses.fields(Settings)
        },
        "journals": [
            {**journal, "dir": str(journal["dir"])}
            for journal in waiting_journals(Path(settings.spool_dir))
        ]
        if settings.spool_dir
        else [],
    }
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return 0
    width = max(len(key) for key in status)
    for key, value in status.items():
        if key == "settings":
            for name, setting in value.items():
                shown = setting["value"] if setting["value"] != "" else "''"
                print(f"{name:<{width}}  {shown} ({setting['source']})")
        elif key == "journals":
            for journal in value:
                print(
                    f"{'journal':<{width}}  {journal['dir']}: {journal['state']}, "
                    f"for {journal['destination']}, {journal['events']} events, "
                    f"{journal['bytes']} bytes, since {journal['since']}"
                )
        else:
            print(f"{key:<{width}}  {value}")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from ._replay import sync

    spool = Path(args.spool_dir)
    if not spool.is_dir():
        raise CliError(f"{spool} is not a directory (the spool_dir argument)")
    # Given (flag or MLFLOW_TRACKING_URI): only the journals for it. Else each to its own.
    given = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    tracking_uri = checked_uri(given) if given else None
    settings = settings_from(args, spool_dir=str(spool))
    if tracking_uri is not None:
        preflight(tracking_uri, spooled=False)
    dead_letters = Path(settings.dead_letter_file or spool / "dead-letter.jsonl")
    replayed = 0
    started = time.perf_counter()

    def progress(events: int) -> None:
        nonlocal replayed
        replayed += events
        rate = replayed / max(time.perf_counter() - started, 1e-9)
        end = "" if sys.stderr.isatty() else "\n"
        sys.stderr.write(f"\rreplayed {replayed} events ({rate:,.0f}/s){end}")

    def unreachable(uri: str) -> str | None:  # a server that is not there: kept, not tried
        if not is_http(uri):
            return None
        reachable, detail = probe(uri)
        return None if reachable else detail

    if args.moved_from and tracking_uri is None:
        raise CliError("--moved-from needs --tracking-uri (where the server is now)")
    summary = sync(
        spool,
        tracking_uri,
        settings,
        DeadLetters(dead_letters),
        progress,
        unreachable,
        moved_from=args.moved_from,
    )
    if replayed:
        sys.stderr.write("\n")
    to = redact_uri(tracking_uri) or ", ".join(sorted(set(summary.sent_to)))
    line = (
        f"synced {summary.journals} journal(s){f' to {to}' if to else ''}: "
        f"{summary.runs} runs, {summary.metrics} metrics, {summary.bytes} bytes read; "
        f"delivered {summary.delivered} events, rejected {summary.rejected}, "
        f"dead-lettered {summary.dead_lettered}, failed {summary.failed}, "
        f"corrupt records skipped {summary.corrupt_records}, journals kept {summary.kept}"
    )
    if summary.left:
        line += (
            f"; left {len(summary.left)} journal(s) for other destinations: {listing(summary.left)}"
        )
    if summary.need_uri:
        line += (
            f"; left {len(summary.need_uri)} journal(s) that need --tracking-uri: "
            f"{listing(summary.need_uri)}"
        )
    print(line)
    if summary.dead_lettered:
        print(f"dead letters: {dead_letters}")
    # Journals for other destinations are not this sync's to send; kept ones, and ones it
    # could not send for want of a URI, are what the user still has to see to.
    return 0 if summary.kept == 0 and not summary.need_uri else 1


def cmd_import(args: argparse.Namespace) -> int:
    """Backfill MLflow from an rlm-code workdir's files; what is there already stays."""
    from ._import import Importer, existing_runs, units
    from ._import_find import find
    from ._sink import MLflowSink

    paths = [Path(p) for p in args.paths]
    for path in paths:
        if not path.exists():
            raise CliError(f"{path} does not exist (a PATH argument)")
    tracking_uri = resolve_uri(args)
    # The files are the journal: a failed import is done again, never spooled.
    # Waits as long as a backfill may need, unless told otherwise (flag or variable).
    waits = {
        name: 600.0
        for name in ("put_timeout", "close_timeout")
        if name not in given_settings(args) and env_name(name) not in os.environ
    }
    settings = settings_from(args, spool_dir="", when_full="block", **waits)
    preflight(tracking_uri, spooled=False)
    plan = find(paths)
    if not plan.runs and not plan.benchmarks and not plan.problems:
        raise CliError(f"no rlm-code run or benchmark files under {', '.join(map(str, paths))}")
    try:
        existing = existing_runs(tracking_uri, args.experiment)
    except Exception as exc:  # the store, as MLflow says it
        raise CliError(
            f"cannot read experiment {args.experiment!r} at {redact_uri(tracking_uri)}: "
            f"{str(exc)[:300]}",
            EXIT_UNREACHABLE,
        ) from None
    total = units(plan)
    done = 0

    def progress() -> None:
        nonlocal done
        done += 1
        if sys.stderr.isatty() or done == total:
            filled = int(30 * done / max(total, 1))
            end = "\n" if done == total else ""
            bar = f"[{'#' * filled}{'.' * (30 - filled)}] {done}/{total} runs"
            sys.stderr.write(f"\r{bar}{end}")
            sys.stderr.flush()

    sink = MLflowSink(
        True, experiment=args.experiment, tracking_uri=tracking_uri, settings=settings
    )
    counts = Importer(sink, existing, progress).run(plan)
    for problem in counts.problems:
        print(f"rlm-mlflow import: skipped {problem}", file=sys.stderr)
    closed = sink.close()
    status = sink.status()
    print(
        f"imported into {redact_uri(tracking_uri)} (experiment {args.experiment}): "
        f"created {counts.created} runs, found {counts.found} already there, "
        f"skipped {len(counts.problems)}; delivered {status.get('delivered')} events, "
        f"failed {status.get('failed')}, dead-lettered {status.get('dead_lettered')}, "
        f"rejected {status.get('rejected')}, dropped {status.get('dropped')}"
    )
    lost = any(status.get(k) for k in ("failed", "dead_lettered", "rejected", "dropped"))
    return 0 if closed and not lost and not counts.problems else 1


def listing(destinations: list[str]) -> str:
    """Each destination once, in order, with its number of journals when more than one."""
    counts: dict[str, int] = {}
    for destination in destinations:
        counts[destination] = counts.get(destination, 0) + 1
    return ", ".join(d if n == 1 else f"{d} x{n}" for d, n in counts.items())


def cmd_instrument(args: argparse.Namespace) -> int:
    """Run the command with `autolog()` done at the start of each Python interpreter in it.

    The command replaces this process (exec): its exit code and the signals sent to it are
    its own, as with ``opentelemetry-instrument`` and ``ddtrace-run``. A command whose Python
    would skip the sitecustomize (``-I``, ``-E``, ``-S``) gets one line saying so, and runs.
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
    blind = blind_flags(command, env.get("PATH"))
    if blind:  # the command runs all the same: it is the user's
        print(warning(blind), file=sys.stderr)
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


def add_tracking_uri(parser: argparse.ArgumentParser, help_text: str | None = None) -> None:
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help=help_text
        or f"MLflow tracking URI (env MLFLOW_TRACKING_URI, else {DEFAULT_TRACKING_URI})",
    )


def add_setting_flags(parser: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    """Every setting as a flag; its help names the variable and the default."""
    group = parser.add_argument_group("sink settings (a flag wins over its variable)")
    for f in dataclasses.fields(Settings):
        if f.name in skip:
            continue
        help_text = f"{f.metadata['help']} (env {env_name(f.name)}, default {f.default!r})"
        group.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            type=PARSERS[str(f.type)],
            default=argparse.SUPPRESS,
            help=help_text.replace("%", "%%"),
        )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="rlm-mlflow", description=DESCRIPTION, formatter_class=Help)
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="how log lines look on stderr",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="run a synthetic RLM benchmark loop that reports to MLflow",
        description="A deterministic synthetic RLM loop (recursive runs, a learning curve, "
        "one trajectory JSONL per run) reporting through the sink.",
        formatter_class=Help,
    )
    run.add_argument("--task", required=True, help="the task text (its length is logged)")
    run.add_argument("--environment", required=True, help="the RLM environment name")
    run.add_argument("--steps", type=_count(1), required=True, help="steps per root run")
    run.add_argument("--runs", type=_count(1), default=1, help="root runs, one after the other")
    run.add_argument(
        "--depth",
        type=_count(0),
        default=0,
        help="recursion depth: each level spawns two child runs at half-time",
    )
    run.add_argument("--seed", type=int, default=0, help="seed of the reward generator")
    add_tracking_uri(run)
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
    status = sub.add_parser(
        "status",
        help="what a sink configured by the environment would use and find (read-only)",
        description="The sink's status() keys as the environment configures it, the "
        "settings in effect and where each comes from, whether mlflow is importable and the "
        "tracking store reachable, and the journals waiting for sync. Changes nothing.",
        formatter_class=Help,
    )
    status.add_argument("--json", action="store_true", help="JSON instead of a table")
    add_tracking_uri(status)
    add_setting_flags(status)
    status.set_defaults(func=cmd_status)
    sync_ = sub.add_parser(
        "sync",
        help="deliver what dead or offline processes left in a spool directory",
        description="Deliver every journal that dead or offline processes left in the spool "
        "to the destination it names (tracking URI and experiment). With --tracking-uri (or "
        "MLFLOW_TRACKING_URI) only the journals for that URI, and those that name none; the "
        "summary says what was left, and for which destinations.",
        formatter_class=Help,
    )
    sync_.add_argument("spool_dir", help="the spool directory (DSPY_RLM_MLFLOW_SPOOL_DIR)")
    add_tracking_uri(
        sync_,
        "only the journals for this tracking URI (env MLFLOW_TRACKING_URI), and those that "
        "name none; else each journal to the URI it names",
    )
    sync_.add_argument(
        "--moved-from",
        metavar="URI",
        default=None,
        help="also send the journals that name URI to --tracking-uri: the server moved (a "
        "redirect said where), or the journals were written through a proxy since replaced",
    )
    add_setting_flags(sync_, skip=("spool_dir", "when_full", "spool_max_bytes"))
    sync_.set_defaults(func=cmd_sync)
    import_ = sub.add_parser(
        "import",
        help="backfill MLflow from what rlm-code wrote (runs, benchmarks); idempotent",
        description="Every run JSONL under PATH becomes its MLflow run (params, each step's "
        "metrics at its time, summary, the JSONL as artifact, children nested; KILLED "
        "without a final record), every benchmark summary its parent run with the case "
        "runs under it. PATH: an rlm-code workdir's .rlm_code directory, its rlm/runs or "
        "rlm/benchmarks, one summary JSON or one run JSONL. Runs already in the experiment "
        "(logged live, or by an earlier import) are left as they are; unreadable lines are "
        "skipped and named (file:line).",
        formatter_class=Help,
    )
    import_.add_argument("paths", nargs="+", metavar="PATH", help="what rlm-code wrote")
    add_tracking_uri(import_)
    import_.add_argument(
        "--experiment",
        default=os.environ.get("DSPY_RLM_MLFLOW_EXPERIMENT") or DEFAULT_EXPERIMENT,
        help="experiment (env DSPY_RLM_MLFLOW_EXPERIMENT)",
    )
    add_setting_flags(
        import_, skip=("spool_dir", "when_full", "spool_max_bytes", "fsync", "handle_sigterm")
    )
    import_.set_defaults(func=cmd_import)
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


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 done, 1 done but something was not delivered (for sync: a journal
    kept, or one that needs --tracking-uri; journals for other destinations are not
    failures; for import: a file, line or case skipped, or an event not delivered), 2 bad
    usage or setting, 3 tracking server unreachable, 127 instrument's command not found."""
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
