"""The seam to MLflow: the `Exporter` protocol, `connect`, and the async face the lanes call.

Two real exporters plug in (and, in tests, an in-memory one):

- `RestExporter` (`_rest`) for tracking servers (``http(s)://``, and any store MLflow
  reaches over its REST API): the REST JSON built straight from our rows, sent with MLflow's
  own host credentials and request helper, our timeout, no inner retries.
- `MlflowClientExporter` (`_mlflow_client`) for every other store (embedded ``sqlite:///``, ``postgresql://``,
  a file store): ``MlflowClient`` calls.

Exporter calls are blocking; `Connection` runs them in threads under one capacity limiter
and retries transient failures with one `RetryPolicy` (honouring a 429/503's Retry-After),
the same one the worker connects with.
mlflow is imported here, in the worker, never on the caller's thread, and nothing here
changes process-wide state: no ``os.environ`` writes, no global tracking URI.
"""

from __future__ import annotations

# mlflow's import pulls in concurrent.futures.thread, which registers a thread-shutdown hook and
# fails once the interpreter is exiting. Importing it now keeps the close at exit working when
# the worker is still importing mlflow then (a short script that never called close()).
import concurrent.futures.thread  # noqa: F401
import functools
import json
from collections.abc import Awaitable, Callable, Iterable, Sequence
from functools import partial
from typing import Any, Protocol, TypeVar

import anyio
import anyio.to_thread
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_delay,
    stop_never,
    wait_random_exponential,
)

from ._log import log
from ._payload import RUN_KEY_TAG, MetricRow
from ._settings import Settings

T = TypeVar("T")

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


def is_transient(exc: BaseException) -> bool:
    """Connection trouble and 408/429/5xx are transient; anything else (400s) is permanent."""
    if isinstance(exc, Misconfigured):
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
    if isinstance(exc, (Misconfigured, TracesUnsupported, FeatureUnsupported, ExperimentDeleted)):
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
    return is_transient(exc) or isinstance(exc, Misconfigured)


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


class Exporter(Protocol):
    """Blocking calls to one MLflow experiment (run in worker threads by `Connection`)."""

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


def connect(tracking_uri: str | None, experiment: str, settings: Settings) -> Exporter:
    """Import mlflow, pick the exporter for the store, find or create the experiment.

    Raises ImportError when mlflow cannot be imported, ExperimentDeleted when the experiment
    is deleted (and the settings do not allow restoring it)."""
    try:
        from mlflow.store.tracking.rest_store import RestStore
        from mlflow.tracking import MlflowClient
        from mlflow.tracking._tracking_service.utils import _get_store, _resolve_tracking_uri
    except Exception as exc:  # a broken install fails in many ways: all mean "unavailable"
        raise ImportError(str(exc)) from exc
    from ._mlflow_client import MlflowClientExporter
    from ._rest import RestExporter

    uri = _resolve_tracking_uri(tracking_uri)
    exporter: RestExporter | MlflowClientExporter
    if is_http(uri):
        # What MLflow's store registry builds for an http(s) URI, without the registry: it
        # builds every store under one process-wide lock, which a database that does not
        # answer holds for minutes (MLflow's own engine retries), for every other sink too.
        from mlflow.utils.credentials import get_default_host_creds

        creds = partial(get_default_host_creds, uri)
        exporter = RestExporter(uri, creds, settings.request_timeout)
    elif isinstance(store := _get_store(uri), RestStore):  # databricks and the like
        exporter = RestExporter(uri, store.get_host_creds, settings.request_timeout)
    else:
        exporter = MlflowClientExporter(MlflowClient(uri))
    exporter.experiment_id = exporter.experiment(experiment, settings.restore_deleted_experiment)
    return exporter


def key_filter(key: str) -> str:
    return f"tags.`{RUN_KEY_TAG}` = '{key}'"


#: The logged model's tag naming what it stands for (`Exporter.find_logged_model`).
MODEL_KEY_TAG = "rlm_mlflow.model_key"


def model_key_filter(key: str) -> str:
    return f"tags.`{MODEL_KEY_TAG}` = '{key}'"


@functools.cache
def context_tags() -> dict[str, str]:
    """The tags ``mlflow.start_run`` adds from the process's context (``mlflow.user``,
    ``mlflow.source.name``/``type``, ``mlflow.source.git.commit`` in a repository), so the
    run page shows "Created by" and "Source". Resolved once per process, by MLflow's own
    resolver; without them a run is still created."""
    try:
        from mlflow.tracking.context.registry import resolve_tags

        return {str(k): str(v) for k, v in resolve_tags().items()}
    except Exception as exc:
        log.warning("mlflow's context tags could not be resolved", error=str(exc)[:300])
        return {}


#: Seconds before a call refused for a configuration reason is tried again: doubling from the
#: first to the last, so a fixed credential or URI is picked up without a restart, and a
#: refusing server is not hammered meanwhile.
MISCONFIGURED_RETRY_S = (2.0, 30.0)


class RetryPolicy:
    """The one retry policy of every call to MLflow, connecting included: transient failures
    with exponential backoff and jitter (capped at 10 s), or the server's Retry-After when it
    asked for more, up to the deadline; configuration errors slowly, until they go away."""

    def __init__(
        self,
        deadline: float,
        before_sleep: Callable[[RetryCallState], None],
        *,
        misconfigured: Callable[[Misconfigured], None] = lambda exc: None,
        answered: Callable[[], None] = lambda: None,
    ) -> None:
        self.deadline = deadline
        self.before_sleep = before_sleep
        self.misconfigured = misconfigured  # told of each configuration refusal
        self.answered = answered  # told of each call that got MLflow's answer
        #: A close's last attempt: a configuration error is not waited out, so that every
        #: run still gets its ``set_terminated`` tried before the deadline.
        self.closing = False
        self._backoff = wait_random_exponential(multiplier=0.25, max=10)

    def wait(self, state: RetryCallState) -> float:
        backoff = float(self._backoff(state))
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        return max(backoff, retry_after) if retry_after is not None else backoff

    def attempts(
        self,
        *,
        retry_on: Callable[[BaseException], bool] = is_transient,
        forever: bool = False,
        before_sleep: Callable[[RetryCallState], None] | None = None,
    ) -> AsyncRetrying:
        """Attempts until one works, the failure is not worth a retry (``retry_on``), or the
        deadline passes (``forever``: until cancelled)."""
        return AsyncRetrying(
            stop=stop_never if forever else stop_after_delay(self.deadline),
            wait=self.wait,
            retry=retry_if_exception(retry_on),
            sleep=anyio.sleep,
            before_sleep=before_sleep or self.before_sleep,
            reraise=True,
        )

    async def run(
        self,
        call: Callable[[], Awaitable[T]],
        *,
        retry_on: Callable[[BaseException], bool] = is_transient,
        forever: bool = False,
        before_sleep: Callable[[RetryCallState], None] | None = None,
    ) -> T:
        """``call()`` under the policy: `attempts` for what ``retry_on`` accepts; a
        configuration error (never one of those) is tried again at `MISCONFIGURED_RETRY_S`'s
        pace for as long as it lasts (the caller's cancel scope ends it: a close), except in
        a close's last attempt (`closing`)."""
        pause = MISCONFIGURED_RETRY_S[0]
        while True:
            try:
                async for attempt in self.attempts(
                    retry_on=retry_on, forever=forever, before_sleep=before_sleep
                ):
                    with attempt:
                        result = await call()
            except Misconfigured as exc:
                self.misconfigured(exc)
                if self.closing:
                    raise
                await anyio.sleep(pause)
                pause = min(2 * pause, MISCONFIGURED_RETRY_S[1])
                continue
            self.answered()
            return result


class Connection:
    """The async face of one exporter: calls run in threads, at most ``max_in_flight`` at
    once (one for a local store), failures retried by the `RetryPolicy`."""

    def __init__(self, exporter: Exporter, max_in_flight: int, policy: RetryPolicy) -> None:
        self.exporter = exporter
        self.experiment_id = exporter.experiment_id
        self.tracking_uri = exporter.tracking_uri
        self.context_tags = context_tags()
        # A local store (sqlite file) serialises writes anyway; parallel writers only contend.
        self._limiter = anyio.CapacityLimiter(max_in_flight if is_http(self.tracking_uri) else 1)
        self._policy = policy

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking exporter call in a thread under the retry policy. A cancelled call
        (the close deadline ran out) is abandoned, not waited for: it may still land, but the
        worker counts it as not delivered."""
        job = partial(fn, *args)
        return await self._policy.run(
            lambda: anyio.to_thread.run_sync(job, limiter=self._limiter, abandon_on_cancel=True)
        )

    async def create_run(self, run_name: str, start_ms: int, tags: dict[str, str]) -> str:
        """A run with MLflow's context tags (user, source), as ``mlflow.start_run`` makes it."""
        return await self.call(
            self.exporter.create_run, run_name, start_ms, {**self.context_tags, **tags}
        )

    async def find_run(self, key: str) -> tuple[str, str] | None:
        """The run a previous life of this journal created for ``key``, and its status."""
        return await self.call(self.exporter.find_run, key)

    async def log_metrics(self, run_id: str, rows: Sequence[MetricRow]) -> None:
        await self.call(self.exporter.log_metrics, run_id, rows)

    async def log_params(self, run_id: str, params: Sequence[tuple[str, str]]) -> None:
        await self.call(self.exporter.log_params, run_id, params)

    async def log_path(self, run_id: str, path: str) -> None:
        await self.call(self.exporter.log_path, run_id, path)

    async def set_terminated(self, run_id: str, status: str, end_ms: int) -> None:
        await self.call(self.exporter.set_terminated, run_id, status, end_ms)

    async def experiment_state(self) -> str:
        return await self.call(self.exporter.experiment_state)

    async def log_spans(self, run_id: str, spans: Sequence[dict[str, Any]], link: bool) -> None:
        await self.call(self.exporter.log_spans, run_id, spans, link)

    async def log_tags(self, run_id: str, tags: Sequence[tuple[str, str]]) -> None:
        await self.call(self.exporter.log_tags, run_id, tags)

    async def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        await self.call(self.exporter.log_text, run_id, text, artifact_file)

    async def find_logged_model(self, key: str) -> str | None:
        return await self.call(self.exporter.find_logged_model, key)

    async def create_logged_model(
        self,
        name: str,
        source_run_id: str,
        params: Sequence[tuple[str, str]],
        tags: Sequence[tuple[str, str]],
    ) -> str:
        return await self.call(self.exporter.create_logged_model, name, source_run_id, params, tags)

    async def log_model_metrics(
        self, run_id: str, model_id: str, rows: Sequence[MetricRow]
    ) -> None:
        await self.call(self.exporter.log_model_metrics, run_id, model_id, rows)

    async def log_assessments(self, trace_id: str, assessments: Sequence[dict[str, Any]]) -> None:
        await self.call(self.exporter.log_assessments, trace_id, assessments)

    async def set_trace_info(self, trace_id: str, info: dict[str, Any]) -> None:
        await self.call(self.exporter.set_trace_info, trace_id, info)
