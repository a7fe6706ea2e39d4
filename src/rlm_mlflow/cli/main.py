"""The `rlm-mlflow` parser and `main`: the flags of each command, the log lines on stderr,
and one line (with its exit code) for each error."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from .._destination import DEFAULT_TRACKING_URI
from .._log import RECORD_KEY, stdlib_logger
from .._settings import DEFAULT_EXPERIMENT, PARSERS, Settings, env_name
from .common import EXIT_USAGE, CliError
from .import_ import cmd_import
from .instrument import cmd_instrument
from .run import cmd_run
from .status import cmd_status
from .sync import cmd_sync

DESCRIPTION = """rlm-mlflow: forward RLM benchmark runs to MLflow.

Commands: `run` (a synthetic RLM benchmark loop that reports to MLflow), `status` (what a
sink would use and find, read-only), `sync` (deliver what dead or offline processes left in a
spool directory), `instrument` (run a command with this forwarder in rlm-code's MLflow slot),
`import` (backfill MLflow from the run and benchmark files rlm-code wrote).
"""


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
