"""Where a journal belongs: a tracking URI and an experiment, named in its ``meta.json``.

A journal is replayed only to its own destination (docs/deployments.md, "A spool shared by
several destinations"; docs/failure-behaviour.md, "Destinations"). Its writer names it in the
form every reader compares, so that equal destinations compare equal: the tracking URI as a
sink resolves it without importing mlflow (the URI given, else ``MLFLOW_TRACKING_URI``, else
MLflow's default ``sqlite:///mlflow.db``), a relative SQLite or local path made absolute
against the writer's working directory, trailing slashes dropped, scheme and host in lower
case, and the password masked (the spool never holds it: `_redact`), so the masked forms are
what is compared. Journals of older versions name a URI as it was given (or none): one that
cannot be placed (empty, a relative path) names no destination.

`route` decides, from a journal's meta, whether a replay sends it and where; pure logic.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping
from typing import Any, NamedTuple

from ._redact import redact_text
from ._settings import DEFAULT_EXPERIMENT

#: MLflow's tracking URI when none is set: ``mlflow.db`` in the working directory.
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
#: Tracking URIs that are names, not paths (``databricks``, ``databricks-uc``, ``uc``).
_NAMED_STORES = frozenset({"databricks", "databricks-uc", "uc"})
_MASK = ":***@"


def resolve(tracking_uri: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The tracking URI a sink given ``tracking_uri`` reports to."""
    env = os.environ if environ is None else environ
    return tracking_uri or env.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def normalise(uri: str, cwd: str | None = None) -> str:
    """The comparable form of a resolved URI (see the module's docstring); relative paths
    are taken against ``cwd`` (the working directory)."""
    uri = uri.strip()
    base = os.getcwd() if cwd is None else cwd
    if "://" not in uri:
        if uri in _NAMED_STORES or ":" in uri:
            return redact_text(uri)
        return "file://" + _absolute(uri, base)  # a local path: MLflow's file store
    scheme, rest = uri.split("://", 1)
    scheme = scheme.lower()
    if scheme.split("+", 1)[0] == "sqlite":
        path, query = (rest[1:] if rest.startswith("/") else rest), ""
        if "?" in path:
            path, query = path.split("?", 1)
            query = "?" + query
        if path in ("", ":memory:"):
            return f"{scheme}://{rest}"
        return f"{scheme}:///{_absolute(path, base)}{query}"  # sqlite:////abs/path.db
    if scheme == "file":
        return "file://" + _absolute(urllib.parse.urlsplit(uri).path, base)
    parts = urllib.parse.urlsplit(f"{scheme}://{rest}")
    user, at, host = parts.netloc.rpartition("@")
    netloc = f"{user}{at}{host.lower()}"
    path = parts.path.rstrip("/")
    query = f"?{parts.query}" if parts.query else ""
    return redact_text(f"{scheme}://{netloc}{path}{query}")


def _absolute(path: str, cwd: str) -> str:
    return os.path.normpath(os.path.join(cwd, os.path.expanduser(path)))


def _placed(uri: str) -> bool:
    """Whether a URI from a meta says where it is whoever reads it (not a relative path)."""
    if not uri:
        return False
    if "://" not in uri:
        return uri in _NAMED_STORES or ":" in uri
    scheme, rest = uri.split("://", 1)
    if scheme.lower().split("+", 1)[0] == "sqlite":
        path = rest[1:] if rest.startswith("/") else rest
        return path.split("?", 1)[0] in ("", ":memory:") or os.path.isabs(path)
    if scheme.lower() == "file":
        return os.path.isabs(urllib.parse.urlsplit(uri).path)
    return True


class Destination(NamedTuple):
    tracking_uri: str  # normalised, its password masked
    experiment: str

    @classmethod
    def of(cls, tracking_uri: str | None, experiment: str) -> Destination:
        """A sink's own destination."""
        return cls(normalise(resolve(tracking_uri)), experiment)

    @classmethod
    def named_by(cls, meta: Mapping[str, Any]) -> Destination | None:
        """The destination a journal's meta names; None when it names none it can place."""
        uri = meta.get("tracking_uri")
        if not isinstance(uri, str) or not _placed(uri.strip()):
            return None
        experiment = meta.get("experiment")
        if not isinstance(experiment, str) or not experiment:
            experiment = DEFAULT_EXPERIMENT
        return cls(normalise(uri), experiment)

    @property
    def masked(self) -> bool:
        """Its URI had a password: the spool does not hold it, the user must give the URI."""
        return _MASK in self.tracking_uri

    def __str__(self) -> str:
        return f"{self.tracking_uri} (experiment {self.experiment})"


class Send(NamedTuple):
    """Replay this journal: to ``tracking_uri`` (None: as MLflow resolves it), into
    ``experiment``."""

    tracking_uri: str | None
    experiment: str


class Leave(NamedTuple):
    """Leave this journal in the spool: what it names, and whether a sync given a tracking
    URI could send it (it names no destination, or its URI's password is masked)."""

    destination: str
    needs_uri: bool


def route(
    meta: Mapping[str, Any],
    given: str | None,
    owner: Destination | None = None,
    moved_from: str | None = None,
) -> Send | Leave:
    """Where a replay sends a journal. ``owner``: a sink's start-up replay (its destination,
    ``given`` its own URI) takes only its own journals. Else `rlm-mlflow sync`: with a URI
    ``given``, the journals that name it or none, sent there (and, with ``moved_from``, those
    that name that URI: a server that moved); without, each journal to its own URI, if the
    spool holds all of it."""
    destination = Destination.named_by(meta)
    experiment = destination.experiment if destination is not None else _experiment(meta)
    if owner is not None:
        if destination == owner:
            return Send(given, experiment)
        return Leave(str(destination or _nowhere(meta)), destination is None)
    if given is not None:
        taken = {normalise(given)} | ({normalise(moved_from)} if moved_from else set())
        if destination is None or destination.tracking_uri in taken:
            return Send(given, experiment)
        return Leave(str(destination), False)
    if destination is None:
        return Leave(_nowhere(meta), True)
    if destination.masked:
        return Leave(f"{destination}, its password not kept in the spool", True)
    return Send(destination.tracking_uri, experiment)


def _experiment(meta: Mapping[str, Any]) -> str:
    experiment = meta.get("experiment")
    return experiment if isinstance(experiment, str) and experiment else DEFAULT_EXPERIMENT


def _nowhere(meta: Mapping[str, Any]) -> str:
    return f"no tracking URI (experiment {_experiment(meta)})"
