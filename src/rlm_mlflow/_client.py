"""The MLflow client adapter: MlflowClient's blocking calls, made async, bounded and retried.

Every call runs in a worker thread (``anyio.to_thread``) under one capacity limiter, so at most
``max_in_flight`` requests are open at once, and is retried by one tenacity policy when the
failure is transient. mlflow is imported here, in the worker, never on the caller's thread.
"""

from __future__ import annotations

# mlflow's import pulls in concurrent.futures.thread, which registers a thread-shutdown hook and
# fails once the interpreter is exiting. Importing it now keeps the close at exit working when
# the worker is still importing mlflow then (a short script that never called close()).
import concurrent.futures.thread  # noqa: F401
import functools
import os
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_delay,
    wait_random_exponential,
)

from ._batcher import RUN_KEY_TAG, MetricRow
from ._log import log
from ._settings import Settings

T = TypeVar("T")


#: HTTP statuses worth a retry: timeout, rate limit, and the server's own failures.
TRANSIENT_HTTP = frozenset({408, 429, 500, 502, 503, 504})


def is_transient(exc: BaseException) -> bool:
    """Connection trouble and 408/429/5xx are transient; anything else (400s) is permanent."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    status = getattr(exc, "get_http_status_code", None)
    if callable(status):  # MlflowException and RestException
        return status() in TRANSIENT_HTTP
    cause = exc.__cause__ or exc.__context__
    return cause is not None and is_transient(cause)


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


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


class MlflowAdapter:
    """Async face of one ``MlflowClient``, bound to one experiment."""

    def __init__(
        self,
        client: Any,
        experiment_id: str,
        max_in_flight: int,
        deadline: float,
        on_retry: Callable[[RetryCallState], None],
    ) -> None:
        from mlflow.entities import Metric, Param

        self._client = client
        self._metric, self._param = Metric, Param
        self.experiment_id = experiment_id
        self.tracking_uri: str = client.tracking_uri
        self.context_tags = context_tags()
        # A local store (sqlite file) serialises writes anyway; parallel writers only contend.
        self._limiter = anyio.CapacityLimiter(max_in_flight if is_http(self.tracking_uri) else 1)
        self._deadline = deadline
        self._on_retry = on_retry

    @classmethod
    def connect_sync(
        cls,
        tracking_uri: str | None,
        experiment: str,
        settings: Settings,
        on_retry: Callable[[RetryCallState], None],
    ) -> MlflowAdapter:
        """Import mlflow, build the client and find or create the experiment (blocking).

        Raises ImportError when mlflow cannot be imported, ExperimentDeleted when the
        experiment is deleted (and the settings do not allow restoring it)."""
        # Our tenacity policy does the retrying: MLflow's own HTTP retries (7 tries, ~4 min)
        # would stack under it and stall a batch for minutes. One inner retry stays: it is
        # where urllib3 honours a 429/503's Retry-After, which never reaches us otherwise.
        # A user's explicit setting wins.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault(
            "MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(settings.request_timeout)))
        )
        # set_terminated would print "View run ... at: URL" to the caller's stdout, from our
        # thread, at a random moment of their output.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        try:
            from mlflow.tracking import MlflowClient
        except Exception as exc:  # a broken install fails in many ways: all mean "unavailable"
            raise ImportError(str(exc)) from exc

        client = MlflowClient(tracking_uri)
        experiment_id = _experiment_id(client, experiment, settings.restore_deleted_experiment)
        return cls(client, experiment_id, settings.max_in_flight, settings.retry_deadline, on_retry)

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking client call in a thread, retrying transient failures to the deadline.

        A cancelled call (the close deadline ran out) is abandoned, not waited for: it may
        still land, but the worker counts it as not delivered."""
        retrying = AsyncRetrying(
            stop=stop_after_delay(self._deadline),
            wait=wait_random_exponential(multiplier=0.25, max=10),
            retry=retry_if_exception(is_transient),
            sleep=anyio.sleep,
            before_sleep=self._on_retry,
            reraise=True,
        )
        job = partial(fn, *args, **kwargs)
        async for attempt in retrying:
            with attempt:
                return await anyio.to_thread.run_sync(
                    job, limiter=self._limiter, abandon_on_cancel=True
                )
        raise AssertionError("unreachable: tenacity reraises the last error")

    async def create_run(self, run_name: str, start_ms: int, tags: dict[str, str]) -> str:
        """A run with MLflow's context tags (user, source), as ``mlflow.start_run`` makes it."""
        run = await self.call(
            self._client.create_run,
            self.experiment_id,
            start_time=start_ms,
            tags={**self.context_tags, **tags},
            run_name=run_name,
        )
        return str(run.info.run_id)

    async def find_run(self, key: str) -> str | None:
        """The run a previous life of this journal created for ``key``, if any."""
        runs = await self.call(
            self._client.search_runs,
            [self.experiment_id],
            filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'",
            max_results=1,
        )
        return str(runs[0].info.run_id) if runs else None

    async def log_metrics(self, run_id: str, rows: Sequence[MetricRow]) -> None:
        await self.call(self._log_metrics_sync, run_id, rows)

    def _log_metrics_sync(self, run_id: str, rows: Sequence[MetricRow]) -> None:
        # Built in the sender thread, not on the event loop: a 1000-metric batch takes ~1 ms.
        metrics = [self._metric(key, value, ts, step) for key, value, ts, step in rows]
        self._client.log_batch(run_id, metrics=metrics)

    async def log_params(self, run_id: str, params: Sequence[tuple[str, str]]) -> None:
        await self.call(
            self._client.log_batch, run_id, params=[self._param(k, v) for k, v in params]
        )

    async def log_path(self, run_id: str, path: str) -> None:
        """A file lands at the artifact root (as in the seed); a directory under its own name."""
        if os.path.isdir(path):
            name = os.path.basename(os.path.normpath(path))
            await self.call(self._client.log_artifacts, run_id, path, artifact_path=name)
        else:
            await self.call(self._client.log_artifact, run_id, path)

    async def set_terminated(self, run_id: str, status: str, end_ms: int) -> None:
        await self.call(self._client.set_terminated, run_id, status=status, end_time=end_ms)

    async def experiment_state(self) -> str:
        """``active``, ``deleted``, or ``missing`` (deleted for good)."""
        from mlflow.exceptions import MlflowException

        try:
            experiment = await self.call(self._client.get_experiment, self.experiment_id)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return "missing"
            raise
        return str(experiment.lifecycle_stage)


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


def _experiment_id(client: Any, name: str, restore: bool) -> str:
    """Get or create; another process may create it between our get and create. A deleted
    experiment is restored if ``restore``, else ExperimentDeleted."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        experiment_id = str(experiment.experiment_id)
        if experiment.lifecycle_stage == "deleted":
            if not restore:
                raise ExperimentDeleted(name, experiment_id)
            client.restore_experiment(experiment_id)
            log.warning("restored the deleted experiment", experiment=name, id=experiment_id)
        return experiment_id
    try:
        return str(client.create_experiment(name))
    except MlflowException:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return str(experiment.experiment_id)
