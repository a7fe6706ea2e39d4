"""`rlm-mlflow import`: backfill MLflow from the run and benchmark files rlm-code wrote."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .._redact import redact_uri
from .._settings import env_name
from .common import (
    EXIT_UNREACHABLE,
    CliError,
    given_settings,
    preflight,
    resolve_uri,
    settings_from,
)


def cmd_import(args: argparse.Namespace) -> int:
    """Backfill MLflow from an rlm-code workdir's files; what is there already stays."""
    from .._import import Importer, existing_runs, units
    from .._import_find import find
    from .._sink import MLflowSink

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
