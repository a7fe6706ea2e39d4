"""`RestExporter`: MLflow's REST API for tracking servers, without MlflowClient in between.

The JSON of each call is built straight from our rows (no MLflow entities, no protobuf) and
sent by MLflow's own `http_request` with the tracking store's host credentials, so every
auth MLflow supports (tokens, basic auth, Databricks, request-header providers, TLS settings)
keeps working; with our timeout and no inner retries (`Connection` retries, honouring a
429/503's Retry-After). Same validation and limits as MLflow's client: `_payload` checked
everything before it got here.

The hot path, log-batch of step metrics, skips what `http_request` works out again for every
request (the request-header providers' headers, the auth header, proxies and TLS from the
environment: about 1.3 ms of CPU a request here, more than the request itself) by working it
out with MLflow's own functions once every `REFRESH_S`, and at once after a 401/403. Auths
MLflow resolves per request (Databricks SDK, AWS SigV4, auth plugins, workspaces) always go
through `http_request`.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from .._log import log
from .._payload import MetricRow
from .._spans import otlp_request
from . import rest_extras as extras
from .base import API, ExperimentDeleted, ExporterClosed, HttpError, key_filter
from .http import answer, request_failure

_JSON = {"Content-Type": "application/json"}
TRACES = "/v1/traces"  # MLflow's OTLP endpoint
#: Seconds the headers, auth and TLS settings of the fast path are reused before worked out anew.
REFRESH_S = 30.0


class _Prepared(NamedTuple):
    """What `http_request` would work out for a request, worked out once for a while."""

    url: str  # of log-batch
    headers: dict[str, str]
    settings: dict[str, Any]  # proxies, verify, cert: requests' environment merged in
    expires: float


_KEY_JSON: dict[str, str] = {}  # metric key -> its JSON string


def _key_json(key: str) -> str:
    if len(_KEY_JSON) < 1000:
        _KEY_JSON[key] = json.dumps(key)
    return json.dumps(key)


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
        self._prepared: _Prepared | None = None
        self._prepare_lock = threading.Lock()
        self._session: Any = None  # ours: trust_env off, the environment is merged at prepare
        self._session_lock = threading.Lock()  # the session is made and closed under it
        self._closed = False

    def close(self) -> None:
        """Our requests session closed (its pooled connections with it); a second close does
        nothing, and a request after it raises ExporterClosed. The session `http_request`
        uses is MLflow's, shared by the process: not ours to close."""
        with self._session_lock:
            self._closed = True
            session, self._session, self._prepared = self._session, None, None
        if session is not None:
            session.close()

    def _refuse_closed(self) -> None:
        if self._closed:
            raise ExporterClosed("the exporter is closed")

    def _request(
        self,
        method: str,
        endpoint: str,
        body: Any = None,
        *,
        data: Any = None,
        json_body: bool = False,
        headers: dict[str, str] | None = None,
        feature: str | None = None,
    ) -> dict[str, Any]:
        """One request, no inner retries (ours are around it), our timeout; MLflow's answer,
        or the failure it is (`http.answer`; ``feature``: the request is one of that
        feature's). ``data`` goes as it is (JSON already when ``json_body``); ``body`` is
        sent as JSON, or as the query of a GET."""
        self._refuse_closed()
        kwargs: dict[str, Any] = {}
        if method == "GET":
            kwargs["params"] = body
        elif data is not None:
            kwargs["data"] = data
            if json_body:
                kwargs["extra_headers"] = _JSON
        else:
            kwargs["data"] = json.dumps(body, separators=(",", ":"))
            kwargs["extra_headers"] = _JSON
        if headers:
            kwargs["extra_headers"] = {**kwargs.get("extra_headers", {}), **headers}
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
        except Exception as exc:  # MLflow wraps the HTTP client's errors in MlflowException
            raise request_failure(exc, self.tracking_uri, f"{method} {endpoint}") from exc
        upload = method == "PUT" and endpoint.startswith(extras.ARTIFACTS)
        traces = endpoint == TRACES
        return answer(response, self.tracking_uri, traces=traces, upload=upload, feature=feature)

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

    def find_run(self, key: str) -> tuple[str, str] | None:
        body = {
            "experiment_ids": [self.experiment_id],
            "filter": key_filter(key),
            "max_results": 1,
        }
        runs = self._request("POST", f"{API}/runs/search", body).get("runs", [])
        if not runs:
            return None
        info = runs[0]["info"]
        self._artifact_uris[info["run_id"]] = info.get("artifact_uri", "")
        return str(info["run_id"]), str(info.get("status", "RUNNING"))

    def log_params(self, run_id: str, params: Sequence[tuple[str, str]]) -> None:
        body = {"run_id": run_id, "params": [{"key": k, "value": v} for k, v in params]}
        self._request("POST", f"{API}/runs/log-batch", body)

    def log_tags(self, run_id: str, tags: Sequence[tuple[str, str]]) -> None:
        body = {"run_id": run_id, "tags": [{"key": k, "value": v} for k, v in tags]}
        self._request("POST", f"{API}/runs/log-batch", body)

    def log_metrics(self, run_id: str, rows: Sequence[MetricRow]) -> None:
        """The log-batch JSON written directly: a step's metrics are the bulk of what we send,
        and formatting them costs a fraction of building dicts for json.dumps. Values are
        finite floats (admitted), whose repr is JSON."""
        keys = _KEY_JSON
        metrics = ",".join(
            f'{{"key":{keys.get(k) or _key_json(k)},"value":{v!r},"timestamp":{ts},"step":{s}}}'
            for k, v, ts, s in rows
        )
        body = f'{{"run_id":{json.dumps(run_id)},"metrics":[{metrics}]}}'.encode()
        prepared = self._prepare()
        if prepared is None:
            self._request("POST", f"{API}/runs/log-batch", data=body, json_body=True)
            return
        self._post(prepared, body, refreshed=False)

    def _post(self, prepared: _Prepared, body: bytes, *, refreshed: bool) -> None:
        session = self._session
        if session is None:  # closed since it was prepared
            raise ExporterClosed("the exporter is closed")
        try:
            response = session.post(
                prepared.url,
                data=body,
                headers=prepared.headers,
                timeout=self._timeout,
                **prepared.settings,
            )
        except Exception as exc:
            raise request_failure(exc, self.tracking_uri, "POST log-batch") from exc
        if response.status_code in (401, 403) and not refreshed:  # a token that expired
            self._prepared = None
            again = self._prepare()
            if again is not None:
                self._post(again, body, refreshed=True)
                return
        answer(response, self.tracking_uri)  # a 200 that is MLflow's, or the failure it is

    def _prepare(self) -> _Prepared | None:
        """The fast path's headers and settings, worked out with MLflow's own functions once
        every `REFRESH_S`; None when the credentials need `http_request` for every request."""
        prepared = self._prepared
        if prepared is not None and time.monotonic() < prepared.expires:
            return prepared
        with self._prepare_lock:
            self._prepared = prepared = self._work_out()
        return prepared

    def _work_out(self) -> _Prepared | None:
        import requests
        from mlflow.tracking.request_header.registry import resolve_request_headers
        from mlflow.utils.workspace_context import get_request_workspace

        creds = self._host_creds()
        per_request = (
            getattr(creds, "use_databricks_sdk", False)
            or getattr(creds, "aws_sigv4", False)
            or getattr(creds, "auth", None)
            or getattr(creds, "client_secret", None)
            or getattr(creds, "workspace_id", None)
            or get_request_workspace()
            or os.environ.get("_MLFLOW_DATABRICKS_TRAFFIC_ID")
        )
        if per_request:
            return None
        headers = {**resolve_request_headers(), **_JSON}
        if creds.username and creds.password:
            pair = f"{creds.username}:{creds.password}".encode()
            headers["Authorization"] = "Basic " + base64.standard_b64encode(pair).decode()
        elif creds.token:
            headers["Authorization"] = f"Bearer {creds.token}"
        url = creds.host.rstrip("/") + f"{API}/runs/log-batch"
        with self._session_lock:
            self._refuse_closed()
            if self._session is None:
                self._session = requests.Session()
                self._session.trust_env = False
        with requests.Session() as probe:  # requests' own reading of the environment
            merged = probe.merge_environment_settings(
                url, {}, False, creds.verify, creds.client_cert_path
            )
        settings = {k: merged[k] for k in ("proxies", "verify", "cert")}
        return _Prepared(url, headers, settings, time.monotonic() + REFRESH_S)

    def set_terminated(self, run_id: str, status: str, end_ms: int) -> None:
        body = {"run_id": run_id, "status": status, "end_time": end_ms}
        self._request("POST", f"{API}/runs/update", body)

    def log_spans(self, run_id: str, spans: Sequence[dict[str, Any]], link: bool) -> None:
        """OTLP/JSON to the server's ``/v1/traces``; with ``link``, the run's id in the
        header that makes the server link the traces the batch completes to the run."""
        headers = {"x-mlflow-experiment-id": self.experiment_id}
        if link:
            headers["x-mlflow-run-id"] = run_id
        body = json.dumps(otlp_request(spans), separators=(",", ":")).encode()
        self._request("POST", TRACES, data=body, json_body=True, headers=headers)

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
        extras.log_path(self, run_id, path)

    def artifact_uri(self, run_id: str) -> str:
        """The run's artifact root, as the server named it (asked once per run)."""
        artifact_uri = self._artifact_uris.get(run_id)
        if artifact_uri is None:
            info = self._request("GET", f"{API}/runs/get", {"run_id": run_id})["run"]["info"]
            artifact_uri = self._artifact_uris[run_id] = info.get("artifact_uri", "")
        return artifact_uri

    # MLflow 3's parts (tables, logged models, assessments, trace info): in `rest_extras`.
    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        extras.log_text(self, run_id, text, artifact_file)

    def find_logged_model(self, key: str) -> str | None:
        return extras.find_logged_model(self, key)

    def create_logged_model(
        self,
        name: str,
        source_run_id: str,
        params: Sequence[tuple[str, str]],
        tags: Sequence[tuple[str, str]],
    ) -> str:
        return extras.create_logged_model(self, name, source_run_id, params, tags)

    def log_model_metrics(self, run_id: str, model_id: str, rows: Sequence[MetricRow]) -> None:
        extras.log_model_metrics(self, run_id, model_id, rows)

    def log_assessments(self, trace_id: str, assessments: Sequence[dict[str, Any]]) -> None:
        extras.log_assessments(self, trace_id, assessments)

    def set_trace_info(self, trace_id: str, info: dict[str, Any]) -> None:
        extras.set_trace_info(self, trace_id, info)
