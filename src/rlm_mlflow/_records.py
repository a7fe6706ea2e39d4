"""The record format of the journal and the spill file: events as framed, checksummed JSON.

A record is ``MAGIC | version | length | crc32 | payload`` (big-endian; version 1), the
payload a JSON list of events. Version 0 (no version byte: ``MAGIC | length | crc32``) is
still read: its first length byte is always 0, which is how the two are told apart.

`parse` reads records back from bytes and never raises: a record whose length or checksum
does not hold (a torn write, a flipped bit) is reported with its offset and skipped, and
reading goes on at the next magic; every intact record comes back once, in order.
"""

from __future__ import annotations

import json
import numbers
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ._event import RunEnd, RunEvent, RunStart, Step

MAGIC = b"RLMJ"
VERSION = 1
HEADER = struct.Struct(">4sBII")  # magic, version, payload length, crc32 of the payload
HEADER_V0 = struct.Struct(">4sII")  # magic, payload length, crc32
MAX_RECORD_BYTES = 1 << 30

Position = tuple[int, int]  # (segment number, byte offset in it)

_KINDS: dict[str, type[RunStart] | type[Step] | type[RunEnd]] = {
    "RunStart": RunStart,
    "Step": Step,
    "RunEnd": RunEnd,
}


def _jsonable(value: Any) -> Any:
    """numpy scalars become numbers; anything else JSON cannot hold becomes a marker dict,
    which the worker rejects or skips as it would the value itself."""
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


def decode(payload: bytes) -> list[RunEvent]:
    """The events of one record; ValueError for anything that is not a list of events."""
    events: list[RunEvent] = []
    for row in json.loads(payload):
        if not isinstance(row, list) or not row or row[0] not in _KINDS:
            raise ValueError(f"not an event: {str(row)[:80]}")
        try:
            events.append(_KINDS[row[0]](*row[1:]))
        except TypeError as exc:
            raise ValueError(f"not an event: {exc}") from None
    return events


def frame(events: Sequence[RunEvent]) -> bytes:
    """One record: the header, then the JSON payload."""
    payload = encode(events)
    return HEADER.pack(MAGIC, VERSION, len(payload), zlib.crc32(payload)) + payload


@dataclass(frozen=True)
class Problem:
    """Bytes that did not make a usable record: where, and why."""

    offset: int
    reason: str


def parse(data: bytes, offset: int = 0) -> Iterator[tuple[int, list[RunEvent] | Problem]]:
    """Each record from ``offset`` on, as (its end offset, its events), or a `Problem`."""
    while offset < len(data):
        header = _header(data, offset)
        if header is None:
            rest = data[offset:]
            if len(rest) < HEADER.size and rest[:4] == MAGIC[: len(rest[:4])]:
                yield offset, Problem(offset, "torn record at the end")
                return
            yield offset, Problem(offset, "bad header or torn record")
            resume = data.find(MAGIC, offset + 1)
            if resume < 0:
                return
            offset = resume
            continue
        size, length, crc = header
        body = data[offset + size : offset + size + length]
        if len(body) < length or zlib.crc32(body) != crc:
            resume = data.find(MAGIC, offset + 1)
            if resume < 0 and len(body) < length:
                yield offset, Problem(offset, "torn record at the end")
                return
            yield offset, Problem(offset, "bad length or checksum")
            if resume < 0:
                return
            offset = resume
            continue
        end = offset + size + length
        try:
            yield end, decode(body)
        except (ValueError, TypeError, KeyError, RecursionError) as exc:
            yield end, Problem(offset, f"undecodable record: {str(exc)[:200]}")
        offset = end


def _header(data: bytes, offset: int) -> tuple[int, int, int] | None:
    """(header size, payload length, crc) of the record at ``offset``, or None."""
    if data[offset : offset + 4] != MAGIC or offset + HEADER_V0.size > len(data):
        return None
    version = data[offset + 4]
    if version == VERSION and offset + HEADER.size <= len(data):
        _, _, length, crc = HEADER.unpack_from(data, offset)
        size = HEADER.size
    elif version == 0:  # version 0: the first byte of a length below 16 MiB
        _, length, crc = HEADER_V0.unpack_from(data, offset)
        size = HEADER_V0.size
    else:
        return None
    if length > MAX_RECORD_BYTES:
        return None
    return size, length, crc
