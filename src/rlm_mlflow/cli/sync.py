"""`rlm-mlflow sync`: deliver the journals that dead or offline processes left in a spool."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .._deadletter import DeadLetters
from .._redact import redact_uri
from ..exporters.base import is_http
from .common import CliError, checked_uri, preflight, probe, settings_from


def cmd_sync(args: argparse.Namespace) -> int:
    from .._replay import sync

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


def listing(destinations: list[str]) -> str:
    """Each destination once, in order, with its number of journals when more than one."""
    counts: dict[str, int] = {}
    for destination in destinations:
        counts[destination] = counts.get(destination, 0) + 1
    return ", ".join(d if n == 1 else f"{d} x{n}" for d, n in counts.items())
