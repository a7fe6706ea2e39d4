"""The seam to MLflow: one protocol, two real exporters, and the async face the lanes call.

- `RestExporter` for tracking servers (``http(s)://``, and any store MLflow reaches over its
  REST API): builds the REST JSON straight from our rows and sends it with MLflow's own host
  credentials and request helper (`http_request`: tokens, basic auth, request-header
  providers, TLS settings), with our timeout and no inner retries.
- `MlflowClientExporter` for every other store (embedded ``sqlite:///``, ``postgresql://``,
  a file store): ``MlflowClient`` calls.

Exporter calls are blocking; `Connection` runs them in threads under one capacity limiter
and retries transient failures with one tenacity policy (honouring a 429/503's Retry-After).
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
import os
import posixpath
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Protocol, TypeVar

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
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, HttpError):
        return exc.status in TRANSIENT_HTTP
    status = getattr(exc, "get_http_status_code", None)
    if callable(status):  # MlflowException and RestException
        return status() in TRANSIENT_HTTP
    cause = exc.__cause__ or exc.__context__
    return cause is not None and is_transient(cause)


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


class Exporter(Protocol):
    """Blocking calls to one MLflow experiment (run in worker threads by `Connection`)."""

    tracking_uri: str
    experiment_id: str

    def create_run(self, run_name: str, start_ms: int, tags: dict[str, str]) -> str: ...
    def find_run(self, key: str) -> str | None: ...
    def log_params(self, run_id: str, params: Sequence[tuple[str, str]]) -> None: ...
    def log_metrics(self, run_id: str, rows: Sequence[MetricRow]) -> None: ...
    def set_terminated(self, run_id: str, status: str, end_ms: int) -> None: ...
    def log_path(self, run_id: str, path: str) -> None: ...
    def experiment_state(self) -> str: ...


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
    uri = _resolve_tracking_uri(tracking_uri)
    store = _get_store(uri)
    exporter: RestExporter | MlflowClientExporter
    if isinstance(store, RestStore):
        exporter = RestExporter(uri, store.get_host_creds, settings.request_timeout)
    else:
        exporter = MlflowClientExporter(MlflowClient(uri))
    exporter.experiment_id = exporter.experiment(experiment, settings.restore_deleted_experiment)
    return exporter


class MlflowClientExporter:
    """``MlflowClient`` calls, for stores MLflow reaches without HTTP."""

    def __init__(self, client: Any) -> None:
        from mlflow.entities import Metric, Param

        self._client = client
        self._metric, self._param = Metric, Param
        self.tracking_uri: str = client.tracking_uri
        self.experiment_id = ""

    def experiment(self, name: str, restore: bool) -> str:
        """Get or create; another process may create it between our get and create. A
        deleted experiment is restored if ``restore``, else ExperimentDeleted."""
        from mlflow.exceptions import MlflowException

        found = self._client.get_experiment_by_name(name)
        if found is None:
            try:
                return str(self._client.create_experiment(name))
            except MlflowException:
                found = self._client.get_experiment_by_name(name)
                if found is None:
                    raise
        experiment_id = str(found.experiment_id)
        if found.lifecycle_stage == "deleted":
            if not restore:
                raise ExperimentDeleted(name, experiment_id)
            self._client.restore_experiment(experiment_id)
            log.warning("restored the deleted experiment", experiment=name, id=experiment_id)
        return experiment_id

    def create_run(self, run_name: str, start_ms: int, tags: dict[str, str]) -> str:
        run = self._client.create_run(
            self.experiment_id, start_time=start_ms, tags=tags, run_name=run_name
        )
        return str(run.info.run_id)

    def find_run(self, key: str) -> str | None:
        runs = self._client.search_runs(
            [self.experiment_id], filter_string=_key_filter(key), max_results=1
        )
        return str(runs[0].info.run_id) if runs else None

    def log_params(self, run_id: str, params: Sequence[tuple[str, str]]) -> None:
        self._client.log_batch(run_id, params=[self._param(k, v) for k, v in params])

    def log_metrics(self, run_id: str, rows: Sequence[MetricRow]) -> None:
        metrics = [self._metric(key, value, ts, step) for key, value, ts, step in rows]
        self._client.log_batch(run_id, metrics=metrics)

    def set_terminated(self, run_id: str, status: str, end_ms: int) -> None:
        self._client.set_terminated(run_id, status=status, end_time=end_ms)

    def log_path(self, run_id: str, path: str) -> None:
        """A file lands at the artifact root (as in rlm-code's sink); a directory under its
        own name."""
        if os.path.isdir(path):
            name = os.path.basename(os.path.normpath(path))
            self._client.log_artifacts(run_id, path, artifact_path=name)
        else:
            self._client.log_artifact(run_id, path)

    def experiment_state(self) -> str:
        """``active``, ``deleted``, or ``missing`` (deleted for good)."""
        from mlflow.exceptions import MlflowException

        try:
            return str(self._client.get_experiment(self.experiment_id).lifecycle_stage)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return "missing"
            raise


class RestExporter:
    """MLflow's REST API, JSON built from our rows, sent by MLflow's own `http_request`."""

    def __init__(self, uri: str, host_creds: Callable[[], Any], timeout: float) -> None:
        from mlflow.utils.rest_utils import http_request

        self.tracking_uri = uri
        self.experiment_id = ""
        self._host_creds = host_creds
        self._http_request = http_request
        self._timeout = timeout
        self._artifact_uris: dict[str, str] = {}

    def _request(
        self, method: str, endpoint: str, body: Any = None, *, data: Any = None
    ) -> dict[str, Any]:
        """One request, no inner retries (ours are around it), our timeout."""
        import requests

        kwargs: dict[str, Any] = {}
        if method == "GET":
            kwargs["params"] = body
        elif data is not None:
            kwargs["data"] = data
        else:
            kwargs["data"] = json.dumps(body, separators=(",", ":"))
            kwargs["extra_headers"] = {"Content-Type": "application/json"}
        try:
            response = self._http_request(
                self._host_creds(),
                endpoint,
                method,
                max_retries=0,
                backoff_factor=0,
                backoff_jitter=0,
                timeout=self._timeout,
                raise_on_status=False,
                respect_retry_after_header=False,
                **kwargs,
            )
        except requests.exceptions.RequestException as exc:
            raise Unreachable(f"{method} {endpoint}: {type(exc).__name__}: {exc}") from exc
        if response.status_code == 200:
            try:
                answer: dict[str, Any] = response.json() if response.content else {}
            except ValueError:
                answer = {}
            return answer
        raise _http_error(response)

    def experiment(self, name: str, restore: bool) -> str:
        """Get or create (see `MlflowClientExporter.experiment`)."""
        by_name = f"{API}/experiments/get-by-name"
        try:
            found = self._request("GET", by_name, {"experiment_name": name})
        except HttpError as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            try:
                created = self._request("POST", f"{API}/experiments/create", {"name": name})
                return str(created["experiment_id"])
            except HttpError as again:  # another process created it meanwhile
                if again.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                found = self._request("GET", by_name, {"experiment_name": name})
        experiment = found["experiment"]
        experiment_id = str(experiment["experiment_id"])
        if experiment.get("lifecycle_stage") == "deleted":
            if not restore:
                raise ExperimentDeleted(name, experiment_id)
            self._request("POST", f"{API}/experiments/restore", {"experiment_id": experiment_id})
            log.warning("restored the deleted experiment", experiment=name, id=experiment_id)
        return experiment_id

    def create_run(self, run_name: str, start_ms: int, tags: dict[str, str]) -> str:
        body = {
            "experiment_id": self.experiment_id,
            "run_name": run_name,
            "start_time": start_ms,
            "tags": [{"key": k, "value": v} for k, v in tags.items()],
        }
        if "mlflow.user" in tags:
            body["user_id"] = tags["mlflow.user"]
        info = self._request("POST", f"{API}/runs/create", body)["run"]["info"]
        self._artifact_uris[info["run_id"]] = info.get("artifact_uri", "")
        return str(info["run_id"])

    def find_run(self, key: str) -> str | None:
        body = {
            "experiment_ids": [self.experiment_id],
            "filter": _key_filter(key),
            "max_results": 1,
        }
        runs = self._request("POST", f"{API}/runs/search", body).get("runs", [])
        if not runs:
            return None
        info = runs[0]["info"]
        self._artifact_uris[info["run_id"]] = info.get("artifact_uri", "")
        return str(info["run_id"])

    def log_params(self, run_id: str, params: Sequence[tuple[str, str]]) -> None:
        body = {"run_id": run_id, "params": [{"key": k, "value": v} for k, v in params]}
        self._request("POST", f"{API}/runs/log-batch", body)

    def log_metrics(self, run_id: str, rows: Sequence[MetricRow]) -> None:
        metrics = [{"key": k, "value": v, "timestamp": ts, "step": s} for k, v, ts, s in rows]
        self._request("POST", f"{API}/runs/log-batch", {"run_id": run_id, "metrics": metrics})

    def set_terminated(self, run_id: str, status: str, end_ms: int) -> None:
        body = {"run_id": run_id, "status": status, "end_time": end_ms}
        self._request("POST", f"{API}/runs/update", body)

    def experiment_state(self) -> str:
        try:
            answer = self._request(
                "GET", f"{API}/experiments/get", {"experiment_id": self.experiment_id}
            )
        except HttpError as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return "missing"
            raise
        return str(answer["experiment"].get("lifecycle_stage", "active"))

    def log_path(self, run_id: str, path: str) -> None:
        """Files go to the server's artifact proxy by our own requests (our timeout, no inner
        retries); other artifact stores (a path the server names, S3, ...) through MLflow's
        artifact repository. A file lands at the root, a directory under its own name."""
        artifact_uri = self._artifact_uris.get(run_id)
        if artifact_uri is None:
            info = self._request("GET", f"{API}/runs/get", {"run_id": run_id})["run"]["info"]
            artifact_uri = self._artifact_uris[run_id] = info.get("artifact_uri", "")
        if not artifact_uri.startswith("mlflow-artifacts:/") or artifact_uri.startswith(
            "mlflow-artifacts://"
        ):
            from mlflow.store.artifact.artifact_repository_registry import (
                get_artifact_repository,
            )

            repo = get_artifact_repository(artifact_uri, tracking_uri=self.tracking_uri)
            if os.path.isdir(path):
                name = os.path.basename(os.path.normpath(path))
                repo.log_artifacts(path, artifact_path=name)
            else:
                repo.log_artifact(path)
            return
        root = artifact_uri.removeprefix("mlflow-artifacts:").strip("/")
        files = [(path, os.path.basename(path))]
        if os.path.isdir(path):
            base = os.path.basename(os.path.normpath(path))
            files = [
                (os.path.join(top, f), posixpath.join(base, os.path.relpath(top, path), f))
                for top, _, names in os.walk(path)
                for f in names
            ]
        unreadable: list[OSError] = []
        for local, relative in files:
            try:
                with open(local, "rb") as handle:
                    endpoint = "/api/2.0/mlflow-artifacts/artifacts/" + posixpath.normpath(
                        posixpath.join(root, relative)
                    )
                    self._request("PUT", endpoint, data=handle)
            except OSError as exc:
                if exc.filename is None:
                    raise  # not a local file's trouble
                unreadable.append(exc)
        if unreadable:  # the readable files landed; say which could not be read
            first = unreadable[0]
            raise OSError(first.errno, f"{len(unreadable)} file(s) unreadable", first.filename)


def _key_filter(key: str) -> str:
    return f"tags.`{RUN_KEY_TAG}` = '{key}'"


def _http_error(response: Any) -> HttpError:
    try:
        body = response.json()
        code, message = str(body.get("error_code", "")), str(body.get("message", ""))
    except ValueError:
        code, message = "", response.text[:500]
    retry_after: float | None = None
    header = response.headers.get("Retry-After")
    if header:
        try:
            retry_after = min(MAX_RETRY_AFTER, max(0.0, float(header)))
        except ValueError:
            retry_after = None
    return HttpError(
        response.status_code, code or f"HTTP_{response.status_code}", message, retry_after
    )


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


class Connection:
    """The async face of one exporter: calls run in threads, at most ``max_in_flight`` at
    once (one for a local store), transient failures retried to the deadline."""

    def __init__(
        self,
        exporter: Exporter,
        max_in_flight: int,
        deadline: float,
        on_retry: Callable[[RetryCallState], None],
    ) -> None:
        self.exporter = exporter
        self.experiment_id = exporter.experiment_id
        self.tracking_uri = exporter.tracking_uri
        self.context_tags = context_tags()
        # A local store (sqlite file) serialises writes anyway; parallel writers only contend.
        self._limiter = anyio.CapacityLimiter(max_in_flight if is_http(self.tracking_uri) else 1)
        self._deadline = deadline
        self._on_retry = on_retry
        self._backoff = wait_random_exponential(multiplier=0.25, max=10)

    @classmethod
    def open(
        cls,
        tracking_uri: str | None,
        experiment: str,
        settings: Settings,
        on_retry: Callable[[RetryCallState], None],
    ) -> Connection:
        """Connect (blocking): see `connect`."""
        exporter = connect(tracking_uri, experiment, settings)
        return cls(exporter, settings.max_in_flight, settings.retry_deadline, on_retry)

    def _wait(self, state: RetryCallState) -> float:
        """Exponential backoff with jitter, or the server's Retry-After if it asked for more."""
        backoff = float(self._backoff(state))
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        return max(backoff, retry_after) if retry_after is not None else backoff

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking exporter call in a thread, retrying transient failures to the
        deadline. A cancelled call (the close deadline ran out) is abandoned, not waited for:
        it may still land, but the worker counts it as not delivered."""
        retrying = AsyncRetrying(
            stop=stop_after_delay(self._deadline),
            wait=self._wait,
            retry=retry_if_exception(is_transient),
            sleep=anyio.sleep,
            before_sleep=self._on_retry,
            reraise=True,
        )
        job = partial(fn, *args)
        async for attempt in retrying:
            with attempt:
                return await anyio.to_thread.run_sync(
                    job, limiter=self._limiter, abandon_on_cancel=True
                )
        raise AssertionError("unreachable: tenacity reraises the last error")

    async def create_run(self, run_name: str, start_ms: int, tags: dict[str, str]) -> str:
        """A run with MLflow's context tags (user, source), as ``mlflow.start_run`` makes it."""
        return await self.call(
            self.exporter.create_run, run_name, start_ms, {**self.context_tags, **tags}
        )

    async def find_run(self, key: str) -> str | None:
        """The run a previous life of this journal created for ``key``, if any."""
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
