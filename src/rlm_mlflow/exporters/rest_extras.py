"""`RestExporter`'s artifact uploads (files, table texts) and its calls for MLflow 3's parts:
logged models, metrics linked to a logged model, assessments and trace info. Functions of
the exporter (`Rest`: what they use of it), REST JSON as MLflow's
own ``RestStore`` sends it (the shapes are those of MLflow 3.17's ``service.proto`` and
``assessments.proto``, checked against its handlers):

- logged models: ``POST /api/2.0/mlflow/logged-models`` (create: ``experiment_id``, ``name``,
  ``source_run_id``, ``params`` and ``tags`` as key/value lists), ``PATCH
  /api/2.0/mlflow/logged-models/{model_id}`` (finalize: ``model_id``, ``status``
  ``LOGGED_MODEL_READY``), ``POST /api/2.0/mlflow/logged-models/search``;
- model metrics: ``runs/log-batch`` with a ``model_id`` on each metric (the store keeps
  them on the run and on the model);
- assessments: ``GET /api/3.0/mlflow/traces/{trace_id}`` (the trace's info, with its
  assessments), then ``POST /api/3.0/mlflow/traces/{trace_id}/assessments`` with one
  ``assessment`` each;
- trace info: ``POST /api/3.0/mlflow/traces`` (StartTraceV3) with ``trace.trace_info``, a
  ``TraceInfo`` v3 (``trace_location`` the experiment, ``request_time`` a Timestamp and
  ``execution_duration`` a Duration in their JSON forms, ``trace_metadata`` and ``tags``
  maps); the store merges it into the stored trace.

A store without logged models, assessments or StartTraceV3 answers their endpoints
404/405/501: `FeatureUnsupported`.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, Protocol

from .._payload import MetricRow
from .._tables import relative_artifact_path
from .._trace_info import check_trace_info
from .base import (
    API,
    ASSESSMENT_RUN_KEY,
    ASSESSMENTS,
    LOGGED_MODELS,
    TRACE_INFO,
    model_key_filter,
    new_assessments,
)

MODELS = f"{API}/logged-models"
TRACES_V3 = "/api/3.0/mlflow/traces"
ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts/"


class Rest(Protocol):
    """What these functions use of `RestExporter` (whose module imports this one)."""

    tracking_uri: str
    experiment_id: str

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
    ) -> dict[str, Any]: ...

    def artifact_uri(self, run_id: str) -> str: ...


def proxied_root(artifact_uri: str) -> str | None:
    """The path under the server's artifact proxy of a ``mlflow-artifacts:/`` URI (one that
    names no other host), else None: the artifacts go elsewhere, through MLflow's artifact
    repository."""
    if not artifact_uri.startswith("mlflow-artifacts:/") or artifact_uri.startswith(
        "mlflow-artifacts://"
    ):
        return None
    return artifact_uri.removeprefix("mlflow-artifacts:").strip("/")


def log_path(rest: Rest, run_id: str, path: str) -> None:
    """`RestExporter.log_path`: files go to the server's artifact proxy by our own requests
    (our timeout, no inner retries); other artifact stores (a path the server names, S3, ...)
    through MLflow's artifact repository. A file lands at the root, a directory under its
    own name."""
    artifact_uri = rest.artifact_uri(run_id)
    root = proxied_root(artifact_uri)
    if root is None:
        from mlflow.store.artifact.artifact_repository_registry import (
            get_artifact_repository,
        )

        repo = get_artifact_repository(artifact_uri, tracking_uri=rest.tracking_uri)
        if os.path.isdir(path):
            name = os.path.basename(os.path.normpath(path))
            repo.log_artifacts(path, artifact_path=name)
        else:
            repo.log_artifact(path)
        return
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
                endpoint = ARTIFACTS + posixpath.normpath(posixpath.join(root, relative))
                rest._request("PUT", endpoint, data=handle)
        except OSError as exc:
            if exc.filename is None:
                raise  # not a local file's trouble
            unreadable.append(exc)
    if unreadable:  # the readable files landed; say which could not be read
        first = unreadable[0]
        raise OSError(first.errno, f"{len(unreadable)} file(s) unreadable", first.filename)


def log_text(rest: Rest, run_id: str, text: str, artifact_file: str) -> None:
    """Through the artifact proxy, as `RestExporter.log_path` sends files; to other artifact
    stores through MLflow's artifact repository, from a temporary file."""
    path = relative_artifact_path(artifact_file)
    artifact_uri = rest.artifact_uri(run_id)
    root = proxied_root(artifact_uri)
    if root is not None:
        endpoint = ARTIFACTS + posixpath.normpath(posixpath.join(root, path))
        rest._request("PUT", endpoint, data=text.encode())
        return
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo: Any = get_artifact_repository(artifact_uri, tracking_uri=rest.tracking_uri)
    with tempfile.TemporaryDirectory(prefix="rlm-mlflow-") as tmp:
        local = os.path.join(tmp, posixpath.basename(path))
        with open(local, "w", encoding="utf-8") as handle:
            handle.write(text)
        repo.log_artifact(local, artifact_path=posixpath.dirname(path) or None)


def find_logged_model(rest: Rest, key: str) -> str | None:
    body = {
        "experiment_ids": [rest.experiment_id],
        "filter": model_key_filter(key),
        "max_results": 1,
        "order_by": [{"field_name": "creation_timestamp", "ascending": True}],
    }
    found = rest._request("POST", f"{MODELS}/search", body, feature=LOGGED_MODELS)
    models = found.get("models", [])
    return str(models[0]["info"]["model_id"]) if models else None


def create_logged_model(
    rest: Rest,
    name: str,
    source_run_id: str,
    params: Sequence[tuple[str, str]],
    tags: Sequence[tuple[str, str]],
) -> str:
    body = {
        "experiment_id": rest.experiment_id,
        "name": name,
        "source_run_id": source_run_id,
        "params": [{"key": k, "value": v} for k, v in params],
        "tags": [{"key": k, "value": v} for k, v in tags],
    }
    created = rest._request("POST", MODELS, body, feature=LOGGED_MODELS)
    model_id = str(created["model"]["info"]["model_id"])
    ready = {"model_id": model_id, "status": "LOGGED_MODEL_READY"}
    rest._request("PATCH", f"{MODELS}/{model_id}", ready, feature=LOGGED_MODELS)
    return model_id


def log_model_metrics(rest: Rest, run_id: str, model_id: str, rows: Sequence[MetricRow]) -> None:
    metrics = [
        {"key": k, "value": v, "timestamp": ts, "step": s, "model_id": model_id}
        for k, v, ts, s in rows
    ]
    rest._request("POST", f"{API}/runs/log-batch", {"run_id": run_id, "metrics": metrics})


def log_assessments(rest: Rest, trace_id: str, assessments: Sequence[dict[str, Any]]) -> None:
    """The trace's assessments first (a 404 RESOURCE_DOES_NOT_EXIST: the trace is not stored,
    an HttpError), then one create for each new one."""
    found = rest._request("GET", f"{TRACES_V3}/{trace_id}", feature=ASSESSMENTS)
    have = [
        (a.get("assessment_name", ""), kind)
        for a in found.get("trace", {}).get("trace_info", {}).get("assessments", [])
        for kind in ("feedback", "expectation")
        if kind in a
    ]
    for assessment in new_assessments(have, assessments):
        body = {"assessment": assessment_json(trace_id, assessment, time.time())}
        rest._request("POST", f"{TRACES_V3}/{trace_id}/assessments", body, feature=ASSESSMENTS)


def assessment_json(trace_id: str, assessment: dict[str, Any], now: float) -> dict[str, Any]:
    """``assessments.proto``'s Assessment in JSON, as ``Assessment.to_proto`` makes it: a
    feedback's value is a ``google.protobuf.Value`` (any JSON), an expectation's too when a
    scalar, else its JSON text (``serialized_value``); the run in the metadata, where MLflow
    reads ``Assessment.run_id`` from. MLflow keeps a rationale on feedback only."""
    value = assessment["value"]
    if assessment["kind"] == "feedback":
        wrapped: dict[str, Any] = {"feedback": {"value": value}}
    elif isinstance(value, (bool, int, float, str)):
        wrapped = {"expectation": {"value": value}}
    else:
        serialized = {"serialization_format": "JSON_FORMAT", "value": json.dumps(value)}
        wrapped = {"expectation": {"serialized_value": serialized}}
    stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    body: dict[str, Any] = {
        "assessment_name": assessment["name"],
        "trace_id": trace_id,
        "source": {"source_type": assessment["source_type"], "source_id": assessment["source_id"]},
        "create_time": stamp,
        "last_update_time": stamp,
        **wrapped,
    }
    if assessment.get("rationale") is not None:
        body["rationale"] = assessment["rationale"]
    if assessment.get("run_id"):
        body["metadata"] = {ASSESSMENT_RUN_KEY: assessment["run_id"]}
    return body


def set_trace_info(rest: Rest, trace_id: str, info: dict[str, Any]) -> None:
    """StartTraceV3, which the store merges into the stored trace (a malformed ``info`` is a
    ValueError before anything is sent)."""
    body = {"trace": {"trace_info": trace_info_json(rest.experiment_id, trace_id, info)}}
    rest._request("POST", TRACES_V3, body, feature=TRACE_INFO)


def trace_info_json(experiment_id: str, trace_id: str, info: dict[str, Any]) -> dict[str, Any]:
    """``service.proto``'s TraceInfo v3 in JSON, as ``TraceInfo.to_proto`` and MLflow's JSON
    mapping make it, of `check_trace_info`'s ``info``: milliseconds in a Timestamp's RFC 3339
    text and a Duration's seconds (``"2.500s"``); a preview only when given (one left out
    keeps what the store has)."""
    checked = check_trace_info(trace_id, info)
    seconds, millis = divmod(checked["request_time_ms"], 1000)
    stamp = datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    duration = divmod(checked["execution_ms"], 1000)
    body: dict[str, Any] = {
        "trace_id": trace_id,
        "trace_location": {
            "type": "MLFLOW_EXPERIMENT",
            "mlflow_experiment": {"experiment_id": experiment_id},
        },
        "request_time": f"{stamp}.{millis:03d}Z",
        "execution_duration": f"{duration[0]}.{duration[1]:03d}s",
        "state": checked["state"],
        "trace_metadata": checked["metadata"],
        "tags": checked["tags"],
    }
    for preview in ("request_preview", "response_preview"):
        if checked[preview] is not None:
            body[preview] = checked[preview]
    return body
