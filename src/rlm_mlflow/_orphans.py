"""Journals left in the spool, as a reader finds them: which are orphans, and what they hold.

An orphan is a journal whose owner is gone (its lock is free) and whose meta says it was
finished being created; `orphans` yields each one locked, for `_replay` to deliver.
`read_journal` reads the records back from the acknowledged position (`read_ack`), skipping
corrupt ones; `waiting_journals` is ``rlm-mlflow status``'s read-only look at a spool.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._destination import Destination
from ._event import RunEvent, RunStart
from ._journal import SPILL_FILE, lock
from ._log import log
from ._records import Position, Problem, parse

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
        """The runs open at the ack (`read_ack` has checked each is a run start)."""
        return [RunStart(*fields) for fields in read_ack(self.dir)[1]]

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
    garbage, or naming an open run that is not a run start) says nothing: replay starts at the
    first record on disk."""
    path = journal_dir / "ack.json"
    try:
        state = json.loads(path.read_bytes())
        position = (int(state["segment"]), int(state["offset"]))
        open_runs = state.get("open_runs", [])
        if position[0] < 0 or position[1] < 0 or not isinstance(open_runs, list):
            raise ValueError("out of range")
        for fields in open_runs:  # a run start it cannot name: its steps would have no run
            if not isinstance(fields, list):
                raise ValueError(f"an open run that is not a run start: {str(fields)[:100]}")
            RunStart(*fields)
        return position, open_runs
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
    its process still holds it, the destination it names, the events and bytes from its
    acknowledged position, and since when it exists."""
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
                "destination": _destination(meta_path),
                "events": events,
                "bytes": sum(p.stat().st_size for p in journal_dir.iterdir() if p.is_file()),
                "since": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)),
            }
        )
    return journals


def _destination(meta_path: Path) -> str:
    try:
        meta = json.loads(meta_path.read_bytes())
    except (OSError, ValueError):
        meta = None
    named = Destination.named_by(meta) if isinstance(meta, dict) else None
    return str(named) if named is not None else "none named (sync needs --tracking-uri)"


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
