"""`rlm-mlflow instrument`: run a command with `autolog()` done in each of its Pythons."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from .._instrument import blind_flags, warning
from .._settings import parse_bool
from .common import EXIT_NOT_FOUND, CliError

#: The directory ``instrument`` puts first on PYTHONPATH: it holds only a sitecustomize.
BOOTSTRAP = Path(__file__).parent.parent / "_bootstrap"


def cmd_instrument(args: argparse.Namespace) -> int:
    """Run the command with `autolog()` done at the start of each Python interpreter in it.

    The command replaces this process (exec): its exit code and the signals sent to it are
    its own, as with ``opentelemetry-instrument`` and ``ddtrace-run``. A command whose Python
    would skip the sitecustomize (``-I``, ``-E``, ``-S``) gets one line saying so, and runs.
    """
    command = list(args.cmd)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise CliError("instrument needs a command: rlm-mlflow instrument -- COMMAND [ARGS...]")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BOOTSTRAP), env.get("PYTHONPATH")]))
    if shutil.which(command[0], path=env.get("PATH")) is None:
        raise CliError(f"cannot run {command[0]!r}: command not found", EXIT_NOT_FOUND)
    blind = blind_flags(command, env.get("PATH"))
    if blind:  # the command runs all the same: it is the user's
        print(warning(blind), file=sys.stderr)
    if not parse_bool(env.get("DSPY_RLM_MLFLOW_ENABLED")):
        print(
            "rlm-mlflow instrument: DSPY_RLM_MLFLOW_ENABLED is not true, so rlm-code's MLflow "
            "slot stays off (export DSPY_RLM_MLFLOW_ENABLED=true)",
            file=sys.stderr,
        )
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(command[0], command, env)
    except OSError as exc:
        raise CliError(
            f"cannot run {command[0]!r}: {exc.strerror or exc}", EXIT_NOT_FOUND
        ) from None
