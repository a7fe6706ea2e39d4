"""Replay of orphaned journals: what `rlm-mlflow sync` and the start of a sink do.

Each orphan (a journal whose process is gone) is fed, in order, through a worker of its own
in replay mode: runs it already created are found by their key instead of created again,
and MLflow's store drops exact duplicate metrics, so a replay that repeats part of what was
sent before the crash still leaves every point exactly once. Runs the dead process left open
are ended as KILLED. A journal is deleted only once all of it has landed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ._batcher import steps_per_batch
from ._buffer import Buffer
from ._deadletter import DeadLetters
from ._event import Marker, Step
from ._log import log
from ._settings import DEFAULT_EXPERIMENT, Settings
from ._spool import Orphan, orphans
from ._worker import LAST_ATTEMPT_S, Worker


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

    def add(self, other: SyncSummary) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def sync(
    spool_dir: Path,
    tracking_uri: str | None,
    settings: Settings,
    dead_letters: DeadLetters,
    progress: Callable[[int], None] | None = None,
) -> SyncSummary:
    """Deliver every orphaned journal in ``spool_dir``; returns what was done."""
    total = SyncSummary()
    for orphan in orphans(spool_dir):
        try:
            summary = _replay(orphan, tracking_uri, settings, dead_letters, progress)
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
    tracking_uri: str | None,
    settings: Settings,
    dead_letters: DeadLetters,
    progress: Callable[[int], None] | None,
) -> SyncSummary:
    """One orphaned journal through a worker of its own; released (deleted if it all
    landed) before returning."""
    summary = SyncSummary(journals=1)
    summary.bytes = sum(p.stat().st_size for p in orphan.dir.glob("*.seg"))
    experiment = str(orphan.meta.get("experiment") or DEFAULT_EXPERIMENT)
    log.info(
        "replaying journal", journal=str(orphan.dir), experiment=experiment, bytes=summary.bytes
    )
    # Nothing is dropped while replaying: the hooks here are ours and may wait.
    buffer = Buffer(settings.queue_size, steps_per_batch(settings.batch_size), put_timeout=3600.0)
    worker = Worker(
        buffer,
        settings,
        tracking_uri,
        experiment,
        dead_letters=dead_letters,
        replaying=True,
        park=False,
    )
    worker.start()
    runs: set[str] = set()
    finished = False
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
        done = Marker(closing=True)
        buffer.put_marker(done)
        finished = done.done.wait(settings.retry_deadline + settings.close_timeout)
        deadline = time.monotonic() + LAST_ATTEMPT_S
        worker.stop(deadline)
        worker.join(deadline)
    stats = worker.stats
    summary.runs = len(runs)
    summary.delivered = stats.delivered
    summary.rejected = stats.rejected
    summary.dead_lettered = stats.dead_lettered
    summary.failed = stats.failed + stats.discarded + stats.spooled
    summary.corrupt_records = orphan.corrupt
    landed = finished and summary.failed == 0 and worker.unavailable is None
    summary.kept = 0 if landed else 1
    orphan.release(remove=landed)
    log.info(
        "journal replayed" if landed else "journal kept for another sync",
        journal=str(orphan.dir),
        **dataclasses.asdict(summary),
    )
    return summary
