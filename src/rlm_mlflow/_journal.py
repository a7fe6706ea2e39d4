"""The write-ahead journal of a live sink: one directory per process in the spool.

What the worker drains is appended here (one record per drain, `_records`) before it is sent;
the acknowledged position moves on once everything before it has finished, and segments
before it are deleted. A sink that dies (SIGKILL, power loss, a server that never came back)
leaves its directory behind; the next sink on the same spool, or `rlm-mlflow sync`, replays
it from the acknowledged position (`_replay`).

Layout of ``<spool_dir>/journal-<pid>-<id>/`` (directory 0700, files 0600):

- ``lock``: locked by the owner while it lives; a replayer takes it to know the owner is dead.
- ``meta.json``: the destination (experiment, tracking URI with its password masked) of the
  owner; written once the owner holds the lock, so a journal without it is being created
  and a replayer leaves it alone.
- ``NNNNNNNN.seg``: records, one per drain.
- ``ack.json``: the position replay starts from, and the starts of the runs open there.
- ``spill.log``: the ``spill`` policy's overflow (`_spill`), newer than every segment.

Durability (the ``fsync`` setting): ``never`` survives a crash of the process (every record
is one ``write``), not a power cut; ``batch`` also fsyncs each drain's record, the ack and the
directory entries, so a power cut loses at most the drain being written; ``always`` also
fsyncs every event spilled by a hook.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ._deadletter import open_owner_only, owner_only_dir
from ._destination import normalise
from ._event import RunEvent, RunStart
from ._records import Position, _jsonable, frame
from ._settings import Fsync

SEGMENT_BYTES = 16 << 20
SPILL_FILE = "spill.log"


def _locker() -> Callable[[int, bool], bool] | None:
    """The platform's whole-file lock: flock on POSIX, msvcrt.locking on Windows."""
    try:
        import fcntl
    except ImportError:
        pass
    else:

        def flock(fd: int, wait: bool) -> bool:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                return False
            return True

        return flock
    try:
        import msvcrt
    except ImportError:
        return None
    locking: Any = getattr(msvcrt, "locking")  # noqa: B009 (Windows only: mypy on Linux)
    mode = getattr(msvcrt, "LK_LOCK"), getattr(msvcrt, "LK_NBLCK")  # noqa: B009

    def lock_byte(fd: int, wait: bool) -> bool:
        try:
            locking(fd, mode[0] if wait else mode[1], 1)
        except OSError:
            return False
        return True

    return lock_byte


_LOCK = _locker()


def lock(fd: int, *, wait: bool) -> bool:
    """Take the owner's lock on ``fd``; False when another process holds it. OSError where
    the platform has no file lock (the spool is then refused; the sink works without it)."""
    if _LOCK is None:
        raise OSError("this platform has no file locking (fcntl or msvcrt): no spool")
    return _LOCK(fd, wait)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (files created, renamed) durable; a no-op where a
    directory cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, durable: bool) -> None:
    """Replace ``path`` with ``data``: a reader sees the old or the new content, never a mix."""
    tmp = path.with_suffix(".tmp")
    fd = open_owner_only(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.write(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


class Journal:
    """The live sink's own journal (written by the worker thread only)."""

    def __init__(
        self, spool_dir: Path, max_bytes: int, meta: dict[str, Any], fsync: Fsync = "batch"
    ) -> None:
        self._durable = fsync != "never"
        owner_only_dir(spool_dir)
        self.dir = spool_dir / f"journal-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        owner_only_dir(self.dir)
        self._lock_fd = self._fd = -1
        try:
            if self._durable:
                fsync_dir(spool_dir)
            self._lock_fd = open_owner_only(self.dir / "lock", os.O_RDWR | os.O_CREAT)
            # Waits at most for a replayer's look: it finds no meta yet, and lets go.
            lock(self._lock_fd, wait=True)
            data = json.dumps(meta).encode()
            write_atomic(self.dir / "meta.json", data, durable=self._durable)
            self.max_bytes = max_bytes
            self._segment = 0
            self._offset = 0
            self._sizes: dict[int, int] = {}  # bytes of each segment still on disk
            self._open_segment(1)
        except OSError:  # a full disk, say: leave nothing behind
            shutil.rmtree(self.dir, ignore_errors=True)
            for fd in (self._fd, self._lock_fd):
                if fd >= 0:
                    os.close(fd)
            raise

    @property
    def bytes(self) -> int:
        return sum(self._sizes.values())

    def full(self) -> bool:
        return self.bytes >= self.max_bytes

    def append(self, events: Sequence[RunEvent]) -> Position:
        """Journal one drain; returns the position just after it. One write(2): a process
        crash after it returns cannot lose the record; with fsync it survives a power cut
        too (without, a cut can tear it: the checksum tells)."""
        record = frame(events)
        if self._offset and self._offset + len(record) > SEGMENT_BYTES:
            self._open_segment(self._segment + 1)
        written = os.write(self._fd, record)
        if written < len(record):  # a full disk can take part of it: a torn record
            self._offset += written
            self._sizes[self._segment] = self._offset
            raise OSError(
                errno.ENOSPC, f"record written in part ({written} of {len(record)} bytes)"
            )
        if self._durable:
            os.fsync(self._fd)
        self._offset += len(record)
        self._sizes[self._segment] = self._offset
        return (self._segment, self._offset)

    @property
    def position(self) -> Position:
        """Where the next record goes: the end of the last one."""
        return (self._segment, self._offset)

    def ack(self, position: Position, open_runs: list[RunStart]) -> None:
        """Everything before ``position`` has finished; replay would start there."""
        state = {
            "segment": position[0],
            "offset": position[1],
            "open_runs": [list(r) for r in open_runs],
        }
        data = json.dumps(state, default=_jsonable).encode()
        write_atomic(self.dir / "ack.json", data, durable=self._durable)
        for segment in [s for s in self._sizes if s < position[0]]:
            with contextlib.suppress(FileNotFoundError):
                (self.dir / segment_name(segment)).unlink()
            del self._sizes[segment]

    def close(self, *, remove: bool) -> None:
        """Release the journal; ``remove`` when everything in it was delivered."""
        os.close(self._fd)
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)
        os.close(self._lock_fd)  # releases the lock: a replayer may take the rest

    def _open_segment(self, number: int) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._segment, self._offset = number, 0
        self._fd = open_owner_only(
            self.dir / segment_name(number), os.O_WRONLY | os.O_CREAT | os.O_APPEND
        )
        if self._durable:
            fsync_dir(self.dir)
        self._sizes[number] = 0


def read_between(journal_dir: Path, start: Position, end: Position) -> bytes:
    """A journal's bytes from ``start`` to ``end`` (the end of a record). A record never
    spans segments, so a ``start`` in an earlier segment means the start of ``end``'s."""
    offset = start[1] if start[0] == end[0] else 0
    path = journal_dir / segment_name(end[0])
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        return _read_at(fd, end[1] - offset, offset)
    finally:
        os.close(fd)


def _read_at(fd: int, size: int, offset: int) -> bytes:
    if hasattr(os, "pread"):
        return os.pread(fd, size, offset)
    os.lseek(fd, offset, os.SEEK_SET)  # Windows: this fd is ours alone
    return os.read(fd, size)


def segment_name(number: int) -> str:
    return f"{number:08d}.seg"


def journal_meta(experiment: str, tracking_uri: str | None) -> dict[str, Any]:
    """What a journal's writer records: its destination, ``tracking_uri`` as
    `_destination.resolve` gives it, normalised here (in the writer's working directory,
    its password masked); None when no destination is known."""
    return {
        "experiment": experiment,
        "tracking_uri": normalise(tracking_uri) if tracking_uri else "",
        "pid": os.getpid(),
    }
