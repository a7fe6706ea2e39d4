"""The processes the tests start: the ``rlm-mlflow`` command of this environment, and a fresh
interpreter running a piece of code (``python -c``), for what only a process of its own shows:
its exit, its signals, its imports, what it prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: The ``rlm-mlflow`` command installed next to this interpreter.
CLI = str(Path(sys.executable).with_name("rlm-mlflow"))


def run_python(
    code: str,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (dedented) in a fresh interpreter of this environment and wait for its end;
    its stdout and stderr are captured as text. ``env`` adds to this process's environment
    (or overrides a variable of it); without it the child inherits the environment as is."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else {**os.environ, **env},
        check=check,
    )


def result_of(done: subprocess.CompletedProcess[str]) -> Any:
    """The value the child printed as its one line ``RESULT <json>``."""
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))


def python_result(code: str, *, env: Mapping[str, str] | None = None, timeout: float = 120) -> Any:
    """Run ``code`` as :func:`run_python` does; it must exit 0 (else the assertion shows its
    stderr) and print one line ``RESULT <json>``, whose value is returned."""
    done = run_python(code, env=env, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return result_of(done)
