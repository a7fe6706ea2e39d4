"""Put first on PYTHONPATH by ``rlm-mlflow instrument``: `rlm_mlflow.autolog()` at interpreter
start, then the ``sitecustomize`` this one shadows, if there is one.

Not a module of the package: it runs in every Python process started under ``instrument``,
so it stays short and never raises (a failing sitecustomize would only print a warning, and
the user's command must run either way).
"""

from __future__ import annotations

import os
import sys


def _say(message: str) -> None:
    sys.stderr.write(f"rlm-mlflow instrument: {message}\n")


def _autolog() -> None:
    try:
        import rlm_mlflow

        found = rlm_mlflow.autolog()
    except Exception as exc:
        _say(f"rlm_mlflow cannot be used by {sys.executable} ({exc}); nothing is forwarded")
        return
    if not found:
        _say(f"rlm-code was not found by {sys.executable}; nothing is forwarded")


def _chain() -> None:
    """Import the next ``sitecustomize`` on the path (site.py imports only the first)."""
    here = os.path.dirname(os.path.abspath(__file__))
    saved = sys.path[:]
    this = sys.modules.pop("sitecustomize", None)
    sys.path[:] = [p for p in saved if os.path.abspath(p or os.curdir) != here]
    try:
        import sitecustomize  # type: ignore[import-not-found]  # noqa: F401  (the shadowed one)
    except ModuleNotFoundError as exc:
        if exc.name != "sitecustomize":
            raise
        if this is not None:
            sys.modules["sitecustomize"] = this
    finally:
        sys.path[:] = saved


_autolog()
_chain()
