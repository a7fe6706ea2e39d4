"""The seam to MLflow: the `Exporter` protocol, the failures an exporter raises and what
each means (retried, kept, refused), and the limits and names the exporters share.

Two real exporters plug in (and, in tests, an in-memory one):

- `RestExporter` (`exporters.rest`) for tracking servers (``http(s)://``, and any store MLflow
  reaches over its REST API): the REST JSON built straight from our rows, sent with MLflow's
  own host credentials and request helper, our timeout, no inner retries.
- `MlflowClientExporter` (`exporters.mlflow_client`) for every other store (embedded
  ``sqlite:///``, ``postgresql://``, a file store): ``MlflowClient`` calls.

Which one a store gets, and the retries around their calls, are `_connect`'s. This module
imports none of the exporters, nor mlflow.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from .._payload import RUN_KEY_TAG, MetricRow

#: HTTP statuses worth a retry: timeout, rate limit, and the server's own failures.
TRANSIENT_HTTP = frozenset({408, 429, 500, 502, 503, 504})
#: The longest Retry-After we honour, in seconds (a server asking for more is retried sooner).
MAX_RETRY_AFTER = 60.0
API = "/api/2.0/mlflow"


class HttpError(Exception):
    """A tracking server's answer other than 200: its status, MLflow's error code and message,
    and the Retry-After it asked for."""

    def __init__(
        self, status: int, error_code: str, message: str, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{error_code} ({status}): {message}")
        self.status, self.error_code, self.retry_after = status, error_code, retry_after


class Unreachable(ConnectionError):
    """The request did not get an answer (refused, reset, timed out)."""


class Misconfigured(Exception):
    """The store answers, but not as MLflow answers what we sent: credentials refused (401),
    no permission (403), a redirect, no MLflow API at that path, a page that is not MLflow's
    (a login or maintenance page), a TLS check that fails. Nothing is wrong with the events:
    they are kept and the call is tried again, slowly, until the configuration is fixed.
    ``detail`` names the cause and the remedy in one line (what ``status()`` shows)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class TracesUnsupported(Exception):
    """The tracking store takes no traces (a file store, a server without the endpoint)."""


#: The features a store may lack (`FeatureUnsupported.feature`).
LOGGED_MODELS = "logged models"
ASSESSMENTS = "assessments"
TRACE_INFO = "trace info"


class FeatureUnsupported(Exception):
    """The store lacks an MLflow feature we call (``feature``: `LOGGED_MODELS`,
    `ASSESSMENTS`, `TRACE_INFO`): a server without the endpoint (404, 405 or 501 on it), a
    store that raises NotImplementedError. Nothing is wrong with what was sent, and trying
    again will not help: the caller goes on without the feature (one warning)."""

    def __init__(self, feature: str, detail: str) -> None:
        super().__init__(f"the tracking store does not support {feature}: {detail}")
        self.feature = feature


class ExperimentDeleted(Exception):
    """The experiment exists in MLflow, deleted: nothing can be logged to it."""

    def __init__(self, name: str, experiment_id: str) -> None:
        super().__init__(
            f"experiment {name!r} (id {experiment_id}) is deleted in MLflow; restore it "
            f"(mlflow experiments restore --experiment-id {experiment_id}, or the UI) and run "
            f"`rlm-mlflow sync` on the spool, or set DSPY_RLM_MLFLOW_RESTORE_DELETED_EXPERIMENT"
            f"=true to let the sink restore it"
        )
        self.name, self.experiment_id = name, experiment_id


class ExporterClosed(Exception):
    """A call after the exporter was closed (`Exporter.close`): never sent. Nothing is wrong
    with its events, and trying again will not help: they are kept (spooled, else counted
    failed), as an unreachable store's are."""


def is_transient(exc: BaseException) -> bool:
    """Connection trouble and 408/429/5xx are transient; anything else (400s) is permanent."""
    if isinstance(exc, (Misconfigured, ExporterClosed)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, HttpError):
        return exc.status in TRANSIENT_HTTP
    status = getattr(exc, "get_http_status_code", None)
    if callable(status):  # MlflowException and RestException
        return status() in TRANSIENT_HTTP
    cause = exc.__cause__ or exc.__context__
    return cause is not None and is_transient(cause)


#: HTTP statuses of a refused value: bisecting the batch isolates it.
ENTITY_HTTP = frozenset({400, 413, 422})


def is_entity_error(exc: BaseException) -> bool:
    """Whether MLflow refused a value we sent (bisect to isolate it), as opposed to trouble
    that is the same for every value: transient, a configuration error, no traces, a deleted
    experiment. A local store's own exception (its database or encoder refusing a value)
    counts as a refused value."""
    if isinstance(
        exc,
        (Misconfigured, TracesUnsupported, FeatureUnsupported, ExperimentDeleted, ExporterClosed),
    ):
        return False
    if is_transient(exc):
        return False
    if isinstance(exc, HttpError):
        return exc.status in ENTITY_HTTP
    status = getattr(exc, "get_http_status_code", None)
    if callable(status):  # MlflowException: INVALID_PARAMETER_VALUE is 400
        return status() in ENTITY_HTTP
    return True


def is_kept(exc: BaseException) -> bool:
    """Whether the events of a failed call are kept (spooled, else counted failed) rather than
    dead-lettered: nothing was wrong with them."""
    return is_transient(exc) or isinstance(exc, (Misconfigured, ExporterClosed))


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


class Exporter(Protocol):
    """Blocking calls to one MLflow experiment (run in worker threads by `Connection`), until
    `close`."""

    tracking_uri: str
    experiment_id: str

    def create_run(self, run_name: str, start_ms: int, tags: dict[str, str]) -> str: ...
    def find_run(self, key: str) -> tuple[str, str] | None:
        """The run created for start ``key``, as (MLflow run id, its status), if any."""
        ...

    def log_params(self, run_id: str, params: Sequence[tuple[str, str]]) -> None: ...
    def log_metrics(self, run_id: str, rows: Sequence[MetricRow]) -> None: ...
    def set_terminated(self, run_id: str, status: str, end_ms: int) -> None: ...
    def log_path(self, run_id: str, path: str) -> None: ...
    def log_spans(self, run_id: str, spans: Sequence[dict[str, Any]], link: bool) -> None:
        """Spans in OTLP/JSON form (`_spans`); ``link``: the batch ends a trace, which then
        shows in the run's Traces tab. TracesUnsupported where the store takes none."""
        ...

    def experiment_state(self) -> str: ...

    def log_tags(self, run_id: str, tags: Sequence[tuple[str, str]]) -> None:
        """Run tags, at most 100 a call, values within MLflow's limits (the caller's job)."""
        ...

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """A file holding ``text`` (UTF-8) at ``artifact_file``, a relative posix path under
        the run's artifact root; a file already there is replaced."""
        ...

    def find_logged_model(self, key: str) -> str | None:
        """The id of the experiment's logged model whose tag `MODEL_KEY_TAG` is ``key`` (the
        oldest, if a retry made two), if any. FeatureUnsupported(LOGGED_MODELS)."""
        ...

    def create_logged_model(
        self,
        name: str,
        source_run_id: str,
        params: Sequence[tuple[str, str]],
        tags: Sequence[tuple[str, str]],
    ) -> str:
        """A logged model in the experiment, made by run ``source_run_id``, with these params
        and tags (`MODEL_KEY_TAG` among them, for `find_logged_model`), finalized READY: its
        model id. Not idempotent: a retry after a failed finalize leaves a PENDING model
        behind. FeatureUnsupported(LOGGED_MODELS)."""
        ...

    def log_model_metrics(self, run_id: str, model_id: str, rows: Sequence[MetricRow]) -> None:
        """Metrics of the run that are also the logged model's (MLflow 3 metrics carry a
        ``model_id``): the model's page and the experiment's Models view show them. An exact
        duplicate is dropped, as for `log_metrics`."""
        ...

    def log_assessments(self, trace_id: str, assessments: Sequence[dict[str, Any]]) -> None:
        """Assessments on a stored trace, each `check_assessment`'s shape; one whose name
        and kind the trace has already is not created again (nor a second in the same
        call). FeatureUnsupported(ASSESSMENTS)."""
        ...

    def set_trace_info(self, trace_id: str, info: dict[str, Any]) -> None:
        """The record of a trace whose spans are stored (``tr-`` and 32 hex digits) as MLflow's
        UI reads it, ``info`` of `_trace_info.check_trace_info`'s shape: MLflow's StartTraceV3,
        which merges into the stored trace (time, duration and state replaced, previews when
        given, tags and metadata added key by key; spans, assessments and, unless the
        metadata names them, token usage and session kept). Idempotent. On a trace not
        stored yet it makes one without spans. FeatureUnsupported(TRACE_INFO)."""
        ...

    def close(self) -> None:
        """Release what the exporter holds (an HTTP session); a second close does nothing. A
        call after it may raise `ExporterClosed`; one already running may still finish."""
        ...


#: Assessment kinds and sources MLflow takes (``AssessmentSource.SourceType``).
ASSESSMENT_KINDS = frozenset({"feedback", "expectation"})
ASSESSMENT_SOURCES = frozenset({"CODE", "HUMAN", "LLM_JUDGE"})
#: The metadata key in which MLflow keeps an assessment's run (``Assessment.run_id``).
ASSESSMENT_RUN_KEY = "mlflow.assessment.sourceRunId"


def check_assessment(assessment: dict[str, Any]) -> None:
    """ValueError unless ``assessment`` is ``{"name": str, "kind": "feedback" | "expectation",
    "value": JSON (bool, int, float, str, list, dict; finite), "source_type": "CODE" | "HUMAN"
    | "LLM_JUDGE", "source_id": str, "rationale": str | None, "run_id": str | None}``
    (rationale and run_id optional). A refused value, so the caller dead-letters it alone."""
    name, kind = assessment.get("name"), assessment.get("kind")
    if not isinstance(name, str) or not name:
        raise ValueError(f"an assessment needs a name, not {name!r}")
    if kind not in ASSESSMENT_KINDS:
        raise ValueError(f"assessment {name!r}: kind {kind!r} is not one of {ASSESSMENT_KINDS}")
    if assessment.get("source_type") not in ASSESSMENT_SOURCES:
        raise ValueError(f"assessment {name!r}: source_type is not one of {ASSESSMENT_SOURCES}")
    if not isinstance(assessment.get("source_id"), str):
        raise ValueError(f"assessment {name!r}: source_id must be a string")
    for optional in ("rationale", "run_id"):
        if not isinstance(assessment.get(optional), (str, type(None))):
            raise ValueError(f"assessment {name!r}: {optional} must be a string or None")
    value = assessment.get("value")
    if value is None:
        raise ValueError(f"assessment {name!r} has no value")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"assessment {name!r}: its value is not JSON ({exc})") from exc


def new_assessments(
    have: Iterable[tuple[str, str]], assessments: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Of ``assessments`` (each checked), those whose (name, kind) is neither in ``have``
    (what the trace holds) nor earlier in the list."""
    seen = set(have)
    fresh = []
    for assessment in assessments:
        check_assessment(assessment)
        identity = (assessment["name"], assessment["kind"])
        if identity not in seen:
            seen.add(identity)
            fresh.append(assessment)
    return fresh


def key_filter(key: str) -> str:
    return f"tags.`{RUN_KEY_TAG}` = '{key}'"


#: The logged model's tag naming what it stands for (`Exporter.find_logged_model`).
MODEL_KEY_TAG = "rlm_mlflow.model_key"


def model_key_filter(key: str) -> str:
    return f"tags.`{MODEL_KEY_TAG}` = '{key}'"
