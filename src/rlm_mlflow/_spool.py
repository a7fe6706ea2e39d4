"""The spool: a write-ahead journal on local disk, one directory per live sink.

What the worker drains is appended here before it is sent; the acknowledged position moves
on once everything before it has finished. A sink that dies (SIGKILL, power loss, a server
that never came back) leaves its directory behind; the next sink on the same spool, or
`rlm-mlflow sync`, replays it from the acknowledged position.

Layout of ``<spool_dir>/journal-<pid>-<id>/`` (directory 0700, files 0600):

- ``lock``: flock-ed by the owner while it lives; a replayer takes it to know the owner is dead.
- ``meta.json``: experiment and (redacted) tracking URI of the owner.
- ``NNNNNNNN.seg``: records ``MAGIC | length | crc32 | JSON payload`` (one drain each).
- ``ack.json``: the position replay starts from, and the starts of the runs open there.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import numbers
import os
import shutil
import struct
import uuid
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._deadletter import open_owner_only, owner_only_dir
from ._event import RunEnd, RunEvent, RunStart, Step
from ._log import log
from ._redact import redact_text

MAGIC = b"RLMJ"
HEADER = struct.Struct(">4sII")  # magic, payload length, crc32 of the payload
SEGMENT_BYTES = 16 << 20
MAX_RECORD_BYTES = 1 << 30
OVERFLOW_FILE = "overflow.log"

Position = tuple[int, int]  # (segment number, byte offset in it)


def _jsonable(value: Any) -> Any:
    """numpy scalars become numbers; anything else JSON cannot hold becomes a marker dict,
    which replay skips exactly as the live path skips a non-scalar param."""
    try:
        if isinstance(value, numbers.Number) and hasattr(value, "item"):
            return value.item()
        if isinstance(value, os.PathLike):
            return os.fspath(value)
    except Exception:
        pass
    return _unserializable(value)


def _unserializable(value: Any) -> dict[str, str]:
    return {"__unserializable__": type(value).__name__}


def encode(events: Sequence[RunEvent]) -> bytes:
    """JSON of the events. Never raises: the journal only gets admitted (plain) events, but
    the spill file takes the hooks' events as they came, so a value JSON cannot hold (a tuple
    key, a cycle, a lone surrogate) becomes the marker, and the worker rejects or skips it."""
    rows = [[type(e).__name__, *e] for e in events]
    try:
        return _dumps(rows)
    except (TypeError, ValueError, RecursionError):
        return _dumps([[row[0], *(_plain(field) for field in row[1:])] for row in rows])


def _dumps(rows: Any) -> bytes:
    return json.dumps(rows, default=_jsonable, separators=(",", ":")).encode(
        "utf-8", "backslashreplace"
    )


def _plain(value: Any) -> Any:
    """``value`` if JSON takes it; a dict keeps its string-keyed entries JSON takes."""
    try:
        _dumps(value)
        return value
    except (TypeError, ValueError, RecursionError):
        pass
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in list(value.items()):
            name = key if isinstance(key, str) else f"<{type(key).__name__} key>"
            try:
                _dumps(item)
                out[name] = item
            except (TypeError, ValueError, RecursionError):
                out[name] = _unserializable(item)
        return out
    return _unserializable(value)


_KINDS: dict[str, type[RunStart] | type[Step] | type[RunEnd]] = {
    "RunStart": RunStart,
    "Step": Step,
    "RunEnd": RunEnd,
}


def frame(events: Sequence[RunEvent]) -> bytes:
    """One record: magic, length and CRC-32 of the JSON payload, then the payload."""
    payload = encode(events)
    return HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def decode(payload: bytes) -> list[RunEvent]:
    """The events of one record; ValueError for anything that is not a list of events."""
    events: list[RunEvent] = []
    for row in json.loads(payload):
        if not isinstance(row, list) or not row or row[0] not in _KINDS:
            raise ValueError(f"not an event: {str(row)[:80]}")
        events.append(_KINDS[row[0]](*row[1:]))
    return events


class Journal:
    """The live sink's own journal (written by the worker thread only)."""

    def __init__(self, spool_dir: Path, max_bytes: int, meta: dict[str, Any]) -> None:
        owner_only_dir(spool_dir)
        self.dir = spool_dir / f"journal-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        owner_only_dir(self.dir)
        self._lock_fd = open_owner_only(self.dir / "lock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        _write_atomic(self.dir / "meta.json", json.dumps(meta).encode())
        self.max_bytes = max_bytes
        self._segment = 0
        self._fd = -1
        self._offset = 0
        self._sizes: dict[int, int] = {}  # bytes of each segment still on disk
        self._open_segment(1)

    @property
    def bytes(self) -> int:
        return sum(self._sizes.values())

    def full(self) -> bool:
        return self.bytes >= self.max_bytes

    def append(self, events: Sequence[RunEvent]) -> Position:
        """Journal one drain; returns the position just after it. One write(2): a process
        crash after it returns cannot lose the record (a power cut can tear it: the
        checksum tells)."""
        record = frame(events)
        if self._offset and self._offset + len(record) > SEGMENT_BYTES:
            self._open_segment(self._segment + 1)
        os.write(self._fd, record)
        self._offset += len(record)
        self._sizes[self._segment] = self._offset
        return (self._segment, self._offset)

    def ack(self, position: Position, open_runs: list[RunStart]) -> None:
        """Everything before ``position`` has finished; replay would start there."""
        state = {
            "segment": position[0],
            "offset": position[1],
            "open_runs": [list(r) for r in open_runs],
        }
        _write_atomic(self.dir / "ack.json", json.dumps(state, default=_jsonable).encode())
        for segment in [s for s in self._sizes if s < position[0]]:
            with contextlib.suppress(FileNotFoundError):
                (self.dir / _segment_name(segment)).unlink()
            del self._sizes[segment]

    def close(self, *, remove: bool) -> None:
        """Release the journal; ``remove`` when everything in it was delivered."""
        os.close(self._fd)
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)
        os.close(self._lock_fd)  # releases the flock: a replayer may take the rest

    def _open_segment(self, number: int) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._segment, self._offset = number, 0
        self._fd = open_owner_only(
            self.dir / _segment_name(number), os.O_WRONLY | os.O_CREAT | os.O_APPEND
        )
        self._sizes[number] = 0


def _segment_name(number: int) -> str:
    return f"{number:08d}.seg"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    fd = open_owner_only(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class Overflow:
    """The ``spill`` policy's disk queue: events that found the buffer full, in order.

    Written by the hooks (under the buffer's lock), read back by the worker once the memory
    buffer is empty; truncated whenever it runs empty. It lives in the journal's directory,
    so a replay after a crash finds what was still in it (`Orphan.records`).
    """

    def __init__(self, path: Path) -> None:
        self._fd = open_owner_only(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        self._write_at = 0
        self._read_at = 0
        self._count = 0  # events written and not yet read
        self._written = 0
        self._markers: list[tuple[int, Any]] = []  # (events written before it, marker)

    def __len__(self) -> int:
        return self._count + len(self._markers)

    @property
    def bytes(self) -> int:
        return self._write_at - self._read_at

    def push(self, event: RunEvent) -> None:
        if self._fd < 0:
            raise OSError("the spill file is closed")  # the hook catches and counts it
        record = frame([event])
        os.pwrite(self._fd, record, self._write_at)
        self._write_at += len(record)
        self._count += 1
        self._written += 1

    def push_marker(self, marker: Any) -> None:
        """Markers stay in memory, placed between the events they came between."""
        self._markers.append((self._written, marker))

    def pop(self, limit: int) -> list[Any]:
        out: list[Any] = []
        read = self._written - self._count
        while len(out) < limit and (self._count or self._markers):
            if self._markers and self._markers[0][0] <= read:
                out.append(self._markers.pop(0)[1])
                continue
            header = os.pread(self._fd, HEADER.size, self._read_at)
            _, length, _ = HEADER.unpack(header)
            payload = os.pread(self._fd, length, self._read_at + HEADER.size)
            self._read_at += HEADER.size + length
            out.extend(decode(payload))
            self._count -= 1
            read += 1
        if not self._count and not self._markers:
            os.ftruncate(self._fd, 0)
            self._write_at = self._read_at = 0
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._count = 0  # what is left was journalled by the worker or is in the file


# -- replay side ---------------------------------------------------------------------------------


@dataclass
class Orphan:
    """A journal whose owner is gone, locked by us while we replay it."""

    dir: Path
    lock_fd: int
    meta: dict[str, Any] = field(default_factory=dict)
    corrupt: int = 0  # records skipped for a bad checksum or length

    def open_runs(self) -> list[RunStart]:
        state = _read_ack(self.dir)
        return [RunStart(*fields) for fields in state.get("open_runs", [])]

    def records(self) -> Iterator[list[RunEvent]]:
        """The journalled drains from the acknowledged position on, skipping corrupt ones."""
        state = _read_ack(self.dir)
        start: Position = (int(state.get("segment", 0)), int(state.get("offset", 0)))
        for path in sorted(self.dir.glob("*.seg")):
            number = int(path.stem)
            if number < start[0]:
                continue
            data = path.read_bytes()
            offset = start[1] if number == start[0] else 0
            yield from self._parse(path, data, offset)
        overflow = self.dir / OVERFLOW_FILE
        if overflow.exists():  # spilled, never drained: newer than every segment
            yield from self._parse(overflow, overflow.read_bytes(), 0)

    def _parse(self, path: Path, data: bytes, offset: int) -> Iterator[list[RunEvent]]:
        while offset + HEADER.size <= len(data):
            magic, length, crc = HEADER.unpack_from(data, offset)
            body = data[offset + HEADER.size : offset + HEADER.size + length]
            if (
                magic == MAGIC
                and length <= MAX_RECORD_BYTES
                and len(body) == length
                and zlib.crc32(body) == crc
            ):
                offset += HEADER.size + length
                try:
                    yield decode(body)
                except (ValueError, TypeError, KeyError) as exc:
                    self._report(path, offset, f"undecodable record: {exc}")
                continue
            self._report(path, offset, "bad checksum or torn record")
            next_magic = data.find(MAGIC, offset + 1)
            if next_magic < 0:
                return
            offset = next_magic
        if offset < len(data):
            self._report(path, offset, "torn record at the end")

    def _report(self, path: Path, offset: int, why: str) -> None:
        self.corrupt += 1
        log.error("journal record skipped", file=str(path), offset=offset, reason=why)

    def release(self, *, remove: bool) -> None:
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)
        os.close(self.lock_fd)


def _read_ack(journal_dir: Path) -> dict[str, Any]:
    try:
        state: dict[str, Any] = json.loads((journal_dir / "ack.json").read_bytes())
        return state
    except FileNotFoundError:
        return {}


def orphans(spool_dir: Path) -> Iterator[Orphan]:
    """Journals in ``spool_dir`` whose owner is no longer alive (their lock is free)."""
    if not spool_dir.is_dir():
        return
    for journal_dir in sorted(spool_dir.glob("journal-*")):
        try:
            fd = os.open(journal_dir / "lock", os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # alive: its owner holds it
            os.close(fd)
            continue
        try:
            meta = json.loads((journal_dir / "meta.json").read_bytes())
        except (FileNotFoundError, ValueError):
            meta = {}
        yield Orphan(journal_dir, fd, meta)


def journal_meta(experiment: str, tracking_uri: str | None) -> dict[str, Any]:
    return {
        "experiment": experiment,
        "tracking_uri": redact_text(tracking_uri or ""),
        "pid": os.getpid(),
    }
