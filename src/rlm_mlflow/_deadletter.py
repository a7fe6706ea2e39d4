"""The dead-letter file: what MLflow refused for good, with its reason, one JSON line each."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from ._redact import redact_text


def owner_only_dir(path: Path) -> None:
    """Create ``path`` (and parents) with mode 0700; an existing directory is left alone."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def open_owner_only(path: Path, flags: int) -> int:
    """``os.open`` with mode 0600, whatever the umask."""
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o600)
    if hasattr(os, "fchmod"):  # POSIX; Windows has no such modes
        os.fchmod(fd, 0o600)
    return fd


class DeadLetters:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def write(
        self, *, run_id: str, mlflow_run_id: str | None, call: str, entities: list[Any], reason: str
    ) -> None:
        record = {
            "time": time.time(),
            "run_id": run_id,
            "mlflow_run_id": mlflow_run_id,
            "call": call,
            "reason": redact_text(reason),
            "entities": entities,
        }
        line = (json.dumps(record, default=repr) + "\n").encode()
        with self._lock:
            owner_only_dir(self.path.parent)
            fd = open_owner_only(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
