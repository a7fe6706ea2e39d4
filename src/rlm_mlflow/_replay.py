"""Replay of orphaned journals: what `rlm-mlflow sync` and the start of a sink do.

Each orphan (a journal whose process is gone) is fed, in order, through a worker of its own
in replay mode: runs it already created are found by their key instead of created again,
and MLflow's store drops exact duplicate metrics, so a replay that repeats part of what was
sent before the crash still leaves every point exactly once. Runs the dead process left open
are ended as KILLED, unless MLflow shows them ended already (a run's end is its end). A
journal is deleted only once all of it has landed.

A journal goes only to the destination it names (`_destination.route`): a sink's start-up
replay takes its own destination's journals alone, `rlm-mlflow sync` sends each to its own
(or, given a URI, those for that URI), and says what it left and for whom.

Replay never stops on bad bytes: an unreadable ``ack.json`` (empty, torn, garbage) means
"replay everything on disk", a record that does not check out is reported with its offset
and skipped, and a journal that cannot be replayed at all is kept and the next one goes on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._deadletter import DeadLetters
from ._destination import Destination, Leave, Send, route
from ._event import Step
from ._forwarder import Forwarder, close_all
from ._log import log
from ._orphans import Orphan, orphans
from ._redact import redact_uri
from ._settings import Settings


@dataclass
class SyncSummary:
    journals: int = 0
    runs: int = 0
    metrics: int = 0
    bytes: int = 0
    delivered: int = 0
    rejected: int = 0
    dead_lettered: int = 0
    failed: int = 0
    corrupt_records: int = 0
    kept: int = 0  # journals left in place because not all of them landed
    sent_to: list[str] = field(default_factory=list)  # the tracking URIs replayed to
    left: list[str] = field(default_factory=list)  # journals for other destinations
    need_uri: list[str] = field(default_factory=list)  # left: sendable with a URI given

    def add(self, other: SyncSummary) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def sync(
    spool_dir: Path,
    tracking_uri: str | None,
    settings: Settings,
    dead_letters: DeadLetters,
    progress: Callable[[int], None] | None = None,
    unreachable: Callable[[str], str | None] | None = None,
    moved_from: str | None = None,
) -> SyncSummary:
    """`rlm-mlflow sync`: deliver the orphaned journals in ``spool_dir``, each to the
    destination it names. With a ``tracking_uri``, only those that name it (or none: the
    caller says where), or ``moved_from`` (the URI the server had before it moved).
    ``unreachable(uri)`` says why a destination cannot be reached now (its journals are then
    kept without a try), or None."""
    return _deliver(
        spool_dir,
        lambda meta: route(meta, tracking_uri, moved_from=moved_from),
        settings,
        dead_letters,
        progress,
        unreachable,
    )


def replay_own(
    spool_dir: Path,
    tracking_uri: str | None,
    experiment: str,
    settings: Settings,
    dead_letters: DeadLetters,
) -> SyncSummary:
    """A sink's start-up replay: the orphaned journals of its own destination alone."""
    owner = Destination.of(tracking_uri, experiment)
    summary = _deliver(
        spool_dir, lambda meta: route(meta, tracking_uri, owner), settings, dead_letters
    )
    if summary.left:
        log.info(
            "journals of other destinations are left in the spool for rlm-mlflow sync",
            journals=len(summary.left),
            destinations=sorted(set(summary.left)),
        )
    return summary


def _deliver(
    spool_dir: Path,
    choose: Callable[[dict[str, Any]], Send | Leave],
    settings: Settings,
    dead_letters: DeadLetters,
    progress: Callable[[int], None] | None = None,
    unreachable: Callable[[str], str | None] | None = None,
) -> SyncSummary:
    total = SyncSummary()
    checked: dict[str, str | None] = {}
    for orphan in orphans(spool_dir):
        send = choose(orphan.meta)
        if isinstance(send, Leave):
            orphan.release(remove=False)
            (total.need_uri if send.needs_uri else total.left).append(send.destination)
            continue
        uri = send.tracking_uri
        if unreachable is not None and uri is not None:
            why = checked[uri] if uri in checked else checked.setdefault(uri, unreachable(uri))
            if why is not None:
                log.error(
                    "journal kept: its tracking server does not answer",
                    journal=str(orphan.dir),
                    tracking_uri=redact_uri(uri),
                    error=why,
                )
                orphan.release(remove=False)
                total.add(SyncSummary(journals=1, kept=1))
                continue
        try:
            summary = _replay(orphan, send, settings, dead_letters, progress)
        except Exception as exc:  # one bad journal must not cost the others
            log.exception(
                "journal could not be replayed; kept for another sync",
                journal=str(orphan.dir),
                error=f"{type(exc).__name__}: {exc}"[:300],
            )
            orphan.release(remove=False)
            summary = SyncSummary(journals=1, kept=1)
        total.add(summary)
    return total


def _replay(
    orphan: Orphan,
    send: Send,
    settings: Settings,
    dead_letters: DeadLetters,
    progress: Callable[[int], None] | None,
) -> SyncSummary:
    """One orphaned journal through a worker of its own; released (deleted if it all
    landed) before returning."""
    tracking_uri, experiment = send
    summary = SyncSummary(journals=1, sent_to=[redact_uri(tracking_uri) or "default"])
    summary.bytes = sum(p.stat().st_size for p in orphan.dir.glob("*.seg"))
    log.info(
        "replaying journal",
        journal=str(orphan.dir),
        tracking_uri=summary.sent_to[0],
        experiment=experiment,
        bytes=summary.bytes,
    )
    # Nothing is dropped while replaying: the hooks here are ours and may wait.
    forwarder = Forwarder(
        settings,
        tracking_uri,
        experiment,
        dead_letters,
        journal=False,
        replaying=True,
        park=False,
        put_timeout=3600.0,
    )
    buffer, worker = forwarder.buffer, forwarder.worker
    worker.start()
    runs: set[str] = set()
    try:
        for start in orphan.open_runs():
            buffer.put_boundary(start)
            runs.add(str(start.run_id))
        for record in orphan.records():
            for event in record:  # the worker admits (or rejects) each, as the live one does
                buffer.put(event)
                if isinstance(event.run_id, str):
                    runs.add(event.run_id)
                if isinstance(event, Step):
                    summary.metrics += 2
            if progress is not None:
                progress(len(record))
    finally:
        finished = close_all([forwarder], settings.retry_deadline + settings.close_timeout)
    stats = worker.outcomes.stats
    summary.runs = len(runs)
    summary.delivered = stats.delivered
    summary.rejected = stats.rejected
    summary.dead_lettered = stats.dead_lettered
    summary.failed = stats.failed + stats.discarded + stats.spooled
    summary.corrupt_records = orphan.corrupt
    landed = finished and summary.failed == 0 and worker.outcomes.unavailable is None
    summary.kept = 0 if landed else 1
    orphan.release(remove=landed)
    log.info(
        "journal replayed" if landed else "journal kept for another sync",
        journal=str(orphan.dir),
        **dataclasses.asdict(summary),
    )
    return summary
