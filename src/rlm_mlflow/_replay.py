"""Replay of orphaned journals: what `rlm-mlflow sync` and the start of a sink do.

Each orphan (a journal whose process is gone) is fed, in order, through a worker of its own
in replay mode: runs it already created are found by their key instead of created again,
and MLflow's store drops exact duplicate metrics, so a replay that repeats part of what was
sent before the crash still leaves every point exactly once. Runs the dead process left open
are ended as KILLED. A journal is deleted only once all of it has landed.

Replay never stops on bad bytes: an unreadable ``ack.json`` (empty, torn, garbage) means
"replay everything on disk", a record that does not check out is reported with its offset
and skipped, and a journal that cannot be replayed at all is kept and the next one goes on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._deadletter import DeadLetters
from ._event import RunEvent, RunStart, Step
from ._forwarder import Forwarder, close_all
from ._journal import SPILL_FILE, lock
from ._log import log
from ._records import Position, Problem, parse
from ._settings import DEFAULT_EXPERIMENT, Settings

#: What the spill file was called before version 1 of the record format.
LEGACY_SPILL_FILE = "overflow.log"


@dataclass
class Orphan:
    """A journal whose owner is gone, locked by us while we replay it."""

    dir: Path
    lock_fd: int
    meta: dict[str, Any] = field(default_factory=dict)
    corrupt: int = 0  # records (or stretches of bytes) skipped, each reported

    def open_runs(self) -> list[RunStart]:
        starts: list[RunStart] = []
        for fields in read_ack(self.dir)[1]:
            try:
                starts.append(RunStart(*fields))
            except TypeError:
                self._report(self.dir / "ack.json", 0, "an open run that is not a run start")
        return starts

    def records(self) -> Iterator[list[RunEvent]]:
        """The journalled drains from the acknowledged position on, skipping corrupt ones."""
        for path, _, item in read_journal(self.dir, read_ack(self.dir)[0]):
            if isinstance(item, Problem):
                self._report(path, item.offset, item.reason)
            else:
                yield item

    def _report(self, path: Path, offset: int, why: str) -> None:
        self.corrupt += 1
        log.error("journal record skipped", file=str(path), offset=offset, reason=why)

    def release(self, *, remove: bool) -> None:
        if remove:
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)
        os.close(self.lock_fd)


def read_ack(journal_dir: Path) -> tuple[Position, list[Any]]:
    """Where replay starts, and the runs open there. An ack that cannot be read (empty, torn,
    garbage) says nothing: replay starts at the first record on disk."""
    path = journal_dir / "ack.json"
    try:
        state = json.loads(path.read_bytes())
        position = (int(state["segment"]), int(state["offset"]))
        open_runs = state.get("open_runs", [])
        if position[0] < 0 or position[1] < 0 or not isinstance(open_runs, list):
            raise ValueError("out of range")
        return position, [fields for fields in open_runs if isinstance(fields, list)]
    except FileNotFoundError:
        return (0, 0), []
    except (OSError, ValueError, TypeError, KeyError, RecursionError) as exc:
        log.error(
            "ack.json cannot be read; replaying every record on disk",
            file=str(path),
            error=f"{type(exc).__name__}: {str(exc)[:200]}",
        )
        return (0, 0), []


def read_journal(
    journal_dir: Path, start: Position
) -> Iterator[tuple[Path, int, list[RunEvent] | Problem]]:
    """Every record of a journal from ``start``: segments in order, then the spill file."""
    for path in sorted(journal_dir.glob("*.seg")):
        try:
            number = int(path.stem)
        except ValueError:
            continue
        if number < start[0]:
            continue
        data = path.read_bytes()
        offset = start[1] if number == start[0] else 0
        for end, item in parse(data, min(offset, len(data))):
            yield path, end, item
    for name in (SPILL_FILE, LEGACY_SPILL_FILE):  # spilled, never drained: newer than all
        spill = journal_dir / name
        if spill.exists():
            for end, item in parse(spill.read_bytes()):
                yield spill, end, item


def orphans(spool_dir: Path) -> Iterator[Orphan]:
    """Journals in ``spool_dir`` whose owner is no longer alive (their lock is free).

    A journal's owner writes its ``meta.json`` only once it holds the lock (`Journal`), so a
    free lock means a dead owner only where the meta is there; without it the journal is
    being created (its owner waits for the lock we hold for this instant) and is left alone.
    """
    if not spool_dir.is_dir():
        return
    for journal_dir in sorted(spool_dir.glob("journal-*")):
        lock_path = journal_dir / "lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        if not lock(fd, wait=False):  # alive: its owner holds it
            os.close(fd)
            continue
        try:
            if os.fstat(fd).st_ino != os.stat(lock_path).st_ino:
                raise FileNotFoundError(lock_path)  # removed since we opened it
            raw = (journal_dir / "meta.json").read_bytes()
        except OSError:  # no meta (yet): nothing to judge it by
            os.close(fd)
            continue
        try:
            meta = json.loads(raw)
        except ValueError:
            meta = {}
        yield Orphan(journal_dir, fd, meta if isinstance(meta, dict) else {})


def waiting_journals(spool_dir: Path) -> list[dict[str, Any]]:
    """What ``rlm-mlflow status`` shows of a spool, writing nothing: each journal, whether
    its process still holds it, the events and bytes from its acknowledged position, and
    since when it exists."""
    if not spool_dir.is_dir():
        return []
    journals = []
    for journal_dir in sorted(spool_dir.glob("journal-*")):
        meta_path = journal_dir / "meta.json"
        since = (meta_path if meta_path.exists() else journal_dir).stat().st_mtime
        events = 0
        for _, _, item in read_journal(journal_dir, read_ack(journal_dir)[0]):
            if not isinstance(item, Problem):
                events += len(item)
        journals.append(
            {
                "dir": journal_dir,
                "state": "live"
                if _held(journal_dir / "lock")
                else "waiting for sync"
                if meta_path.exists()
                else "never replayed: no meta.json",
                "events": events,
                "bytes": sum(p.stat().st_size for p in journal_dir.iterdir() if p.is_file()),
                "since": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)),
            }
        )
    return journals


def _held(lock_path: Path) -> bool:
    """Whether a live process holds this journal's lock (asked without waiting; taking it
    for an instant writes nothing)."""
    try:
        fd = os.open(lock_path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        return not lock(fd, wait=False)
    except OSError:
        return False
    finally:
        os.close(fd)


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
