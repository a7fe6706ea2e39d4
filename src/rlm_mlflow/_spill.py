"""The ``spill`` policy's disk queue: events that found the buffer full, in order.

Written by the hooks (under the buffer's lock), read back by the worker once the memory
buffer is empty; truncated whenever it runs empty. It lives in the journal's directory, so a
replay after a crash finds what was still in it. Portable: positioned reads and writes
(``os.pread``/``pwrite`` where they exist, else seek + read/write under the same lock).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ._deadletter import open_owner_only
from ._event import RunEvent
from ._records import HEADER, decode, frame


def _pwrite(fd: int, data: bytes, offset: int) -> None:
    if hasattr(os, "pwrite"):
        os.pwrite(fd, data, offset)
    else:  # the buffer's lock serialises every use of the file
        os.lseek(fd, offset, os.SEEK_SET)
        os.write(fd, data)


def _pread(fd: int, size: int, offset: int) -> bytes:
    if hasattr(os, "pread"):
        return os.pread(fd, size, offset)
    os.lseek(fd, offset, os.SEEK_SET)
    return os.read(fd, size)


class Spill:
    def __init__(self, path: Path, *, durable: bool = False) -> None:
        self._fd = open_owner_only(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        self._durable = durable  # fsync=always: every spilled event survives a power cut
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
        _pwrite(self._fd, record, self._write_at)
        if self._durable:
            os.fsync(self._fd)
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
            header = _pread(self._fd, HEADER.size, self._read_at)
            _, _, length, _ = HEADER.unpack(header)
            payload = _pread(self._fd, length, self._read_at + HEADER.size)
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
