"""What every command shares: the settings from flags and variables, the tracking URI, the
one-line error with its exit code, and the cheap look at a tracking store."""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from .._destination import DEFAULT_TRACKING_URI
from .._redact import redact_uri
from .._settings import Settings
from ..exporters.base import is_http

KNOWN_SCHEMES = frozenset(
    {"http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks"}
)
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_NOT_FOUND = 127  # what a shell answers for a command it cannot run


class CliError(Exception):
    """A one-line message for the user, and the exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags."""
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(Settings)
        if getattr(args, f.name, None) is not None
    }


def settings_from(args: argparse.Namespace, **fixed: Any) -> Settings:
    """Defaults, then DSPY_RLM_MLFLOW_* variables, then the flags given."""
    try:
        return Settings.from_env(**{**given_settings(args), **fixed})
    except ValueError as exc:
        raise CliError(f"bad setting: {exc}") from None


def resolve_uri(args: argparse.Namespace) -> str:
    return checked_uri(
        args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    )


def checked_uri(uri: str) -> str:
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme.split("+", 1)[0] not in KNOWN_SCHEMES:
        raise CliError(
            f"unsupported tracking URI {redact_uri(uri)!r}: use http(s)://host:port, "
            "sqlite:///path.db, or a database URI (postgresql://, mysql://)"
        )
    return uri


def probe(uri: str) -> tuple[bool | None, str]:
    """Whether the tracking store can be reached, by one cheap look that changes nothing:
    a server's /health, a database's port, a SQLite file's presence."""
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.split("+", 1)[0]
    if is_http(uri):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5):
                return True, "the server answers /health"
        except (urllib.error.URLError, OSError) as exc:
            return False, f"no answer: {getattr(exc, 'reason', exc)}"
    if scheme == "sqlite":
        path = Path(urllib.parse.unquote(uri.removeprefix("sqlite:///")))
        if path.is_file():
            return True, f"{path} exists"
        return None, f"{path} does not exist yet (MLflow creates it on first use)"
    if scheme in {"postgresql", "mysql", "mssql"} and parts.hostname:
        default_port = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}[scheme]
        try:
            with socket.create_connection((parts.hostname, parts.port or default_port), 5):
                return True, f"{parts.hostname}:{parts.port or default_port} accepts connections"
        except OSError as exc:
            return False, f"{parts.hostname}:{parts.port or default_port}: {exc}"
    return None, "not checked for this kind of store"


def preflight(uri: str, spooled: bool) -> None:
    """Fail fast, in one line, when a tracking server is not there (unless journalling)."""
    if not is_http(uri) or spooled:
        return
    reachable, detail = probe(uri)
    if not reachable:
        raise CliError(
            f"cannot reach the tracking server at {redact_uri(uri)} ({detail}); "
            "start it, or pass --spool-dir to journal offline and sync later",
            EXIT_UNREACHABLE,
        )
