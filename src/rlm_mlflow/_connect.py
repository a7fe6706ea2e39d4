"""Reaching MLflow: `connect` chooses the exporter for the store, `Connection` is the async
face the lanes call, `RetryPolicy` the one retry policy of both.

Exporter calls are blocking; `Connection` runs them in threads under one capacity limiter
and retries transient failures with one `RetryPolicy` (honouring a 429/503's Retry-After),
the same one the worker connects with. The worker owns the exporter's lifetime: it ends it
with `Connection.close`.
mlflow is imported here, in the worker, never on the caller's thread, and nothing here
changes process-wide state: no ``os.environ`` writes, no global tracking URI.
"""

from __future__ import annotations

# mlflow's import pulls in concurrent.futures.thread, which registers a thread-shutdown hook and
# fails once the interpreter is exiting. Importing it now keeps the close at exit working when
# the worker is still importing mlflow then (a short script that never called close()).
import concurrent.futures.thread  # noqa: F401
import functools
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

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
from ._payload import MetricRow
from ._redact import redact_text, redact_uri
from ._settings import Settings

if TYPE_CHECKING:
    from ._outcomes import Outcomes
from .exporters.base import (
    ExperimentDeleted,
    Exporter,
    ExporterClosed,
    Misconfigured,
    is_http,
    is_transient,
)

T = TypeVar("T")


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
    from .exporters.mlflow_client import MlflowClientExporter
    from .exporters.rest import RestExporter

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
    once (one for a local store), failures retried by the `RetryPolicy`; until `close`."""

    def __init__(self, exporter: Exporter, max_in_flight: int, policy: RetryPolicy) -> None:
        self.exporter = exporter
        self.experiment_id = exporter.experiment_id
        self.tracking_uri = exporter.tracking_uri
        self.context_tags = context_tags()
        # A local store (sqlite file) serialises writes anyway; parallel writers only contend.
        self._limiter = anyio.CapacityLimiter(max_in_flight if is_http(self.tracking_uri) else 1)
        self._policy = policy
        self.closed = False

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking exporter call in a thread under the retry policy. A cancelled call
        (the close deadline ran out) is abandoned, not waited for: it may still land, but the
        worker counts it as not delivered. Once closed, an attempt raises ExporterClosed
        (not retried; its events are kept, as any call's that did not get out)."""
        job = partial(fn, *args)

        async def attempt() -> T:
            if self.closed:
                raise ExporterClosed("the connection to MLflow is closed")
            return await anyio.to_thread.run_sync(
                job, limiter=self._limiter, abandon_on_cancel=True
            )

        return await self._policy.run(attempt)

    def close(self) -> None:
        """The worker's end: the exporter is closed (its HTTP session released), once; a
        second close does nothing, and a failing one is logged, never raised. A call still
        running in its thread (abandoned at the deadline) may finish; none starts after."""
        if self.closed:
            return
        self.closed = True
        try:
            self.exporter.close()
        except Exception as exc:
            log.warning("closing the exporter failed", error=redact_text(str(exc))[:300])

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


async def establish(
    tracking_uri: str | None,
    experiment: str,
    settings: Settings,
    policy: RetryPolicy,
    outcomes: Outcomes,
    exporter: Exporter | None = None,
) -> Connection | None:
    """Import mlflow and reach the store (``exporter``, when given: no connecting), retried
    by the policy of every call until it works or the sink is closed; a server that is down
    at start costs nothing but the wait. None when nothing can ever be sent: mlflow cannot be
    imported, or the experiment is deleted (said in ``outcomes``)."""

    def retrying(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        outcomes.retry()
        if exc is not None:
            outcomes.note_error("connect", exc)
        log.warning(
            "tracking store unreachable, retrying",
            retry_in=round(state.upcoming_sleep, 2),
            tracking_uri=redact_uri(tracking_uri),
            error=redact_text(str(exc))[:300],
        )

    def worth_a_retry(exc: BaseException) -> bool:  # any trouble reaching a store
        return isinstance(exc, Exception) and not isinstance(
            exc, (ImportError, ExperimentDeleted, Misconfigured)
        )

    async def reach() -> Exporter:
        return await anyio.to_thread.run_sync(
            connect, tracking_uri, experiment, settings, abandon_on_cancel=True
        )

    try:
        if exporter is None:
            exporter = await policy.run(
                reach, retry_on=worth_a_retry, forever=True, before_sleep=retrying
            )
        assert exporter is not None
        connection = Connection(exporter, settings.max_in_flight, policy)
    except ImportError as exc:
        outcomes.import_error = f"unavailable: {exc}"
        outcomes.set_unavailable(outcomes.import_error)
        log.error("mlflow cannot be imported; events are discarded", error=str(exc))
        return None
    except ExperimentDeleted as exc:
        outcomes.set_unavailable(f"unavailable: {exc}")
        return None
    outcomes.connected(connection.experiment_id, connection.experiment_state)
    log.info(
        "connected",
        tracking_uri=redact_uri(connection.tracking_uri),
        experiment=experiment,
        experiment_id=connection.experiment_id,
    )
    return connection
