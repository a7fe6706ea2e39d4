"""`MlflowClientExporter`: ``MlflowClient`` calls, for the stores MLflow reaches without HTTP
(embedded ``sqlite:///``, ``postgresql://``, a file store)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

from .._log import log
from .._payload import MetricRow
from .._spans import otlp_request
from .._tables import relative_artifact_path
from .._trace_info import check_trace_info
from .base import (
    ASSESSMENT_RUN_KEY,
    ASSESSMENTS,
    LOGGED_MODELS,
    TRACE_INFO,
    ExperimentDeleted,
    ExporterClosed,
    FeatureUnsupported,
    TracesUnsupported,
    key_filter,
    model_key_filter,
    new_assessments,
)


class MlflowClientExporter:
    """``MlflowClient`` calls, for stores MLflow reaches without HTTP."""

    def __init__(self, client: Any) -> None:
        from mlflow.entities import Metric, Param, RunTag

        self._client = client
        self._metric, self._param, self._tag = Metric, Param, RunTag
        self.tracking_uri: str = client.tracking_uri
        self.experiment_id = ""

    def close(self) -> None:
        """The client let go of, for a stand-in that raises ExporterClosed on any call. Its
        store (a database engine, a file store) is MLflow's, cached for the process and shared
        with the caller's own mlflow calls: not ours to dispose of."""
        self._client = _Closed()

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

    def find_run(self, key: str) -> tuple[str, str] | None:
        runs = self._client.search_runs(
            [self.experiment_id], filter_string=key_filter(key), max_results=1
        )
        return (str(runs[0].info.run_id), str(runs[0].info.status)) if runs else None

    def log_params(self, run_id: str, params: Sequence[tuple[str, str]]) -> None:
        self._client.log_batch(run_id, params=[self._param(k, v) for k, v in params])

    def log_metrics(self, run_id: str, rows: Sequence[MetricRow]) -> None:
        metrics = [self._metric(key, value, ts, step) for key, value, ts, step in rows]
        self._client.log_batch(run_id, metrics=metrics)

    def log_tags(self, run_id: str, tags: Sequence[tuple[str, str]]) -> None:
        self._client.log_batch(run_id, tags=[self._tag(k, v) for k, v in tags])

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._client.log_text(run_id, text, relative_artifact_path(artifact_file))

    def find_logged_model(self, key: str) -> str | None:
        with _feature(LOGGED_MODELS):
            models = self._client.search_logged_models(
                [self.experiment_id],
                filter_string=model_key_filter(key),
                max_results=1,
                order_by=[{"field_name": "creation_timestamp", "ascending": True}],
            )
        return str(models[0].model_id) if models else None

    def create_logged_model(
        self,
        name: str,
        source_run_id: str,
        params: Sequence[tuple[str, str]],
        tags: Sequence[tuple[str, str]],
    ) -> str:
        with _feature(LOGGED_MODELS):
            model = self._client.create_logged_model(
                self.experiment_id,
                name=name,
                source_run_id=source_run_id,
                params=dict(params),
                tags=dict(tags),
            )
            self._client.finalize_logged_model(model.model_id, "READY")
        return str(model.model_id)

    def log_model_metrics(self, run_id: str, model_id: str, rows: Sequence[MetricRow]) -> None:
        """``log_batch`` of metrics that carry the model's id: the store keeps them on the run
        and on the model."""
        metrics = [self._metric(k, v, ts, s, model_id=model_id) for k, v, ts, s in rows]
        self._client.log_batch(run_id, metrics=metrics)

    def log_assessments(self, trace_id: str, assessments: Sequence[dict[str, Any]]) -> None:
        """Through the store, as the server's handler does it (MlflowClient 3.17 has no
        assessment call; ``mlflow.log_feedback`` goes through the store too): the trace's
        assessments, then ``create_assessment`` of each new one."""
        from mlflow.entities import AssessmentSource, Expectation, Feedback

        store = self._client._tracking_client.store
        with _feature(ASSESSMENTS):
            info = store.get_trace_info(trace_id)
            have = [
                (a.name, "feedback" if isinstance(a, Feedback) else "expectation")
                for a in info.assessments
                if isinstance(a, (Feedback, Expectation))
            ]
            for new in new_assessments(have, assessments):
                source = AssessmentSource(
                    source_type=new["source_type"], source_id=new["source_id"]
                )
                metadata = {ASSESSMENT_RUN_KEY: new["run_id"]} if new.get("run_id") else None
                common: dict[str, Any] = {
                    "source": source,
                    "trace_id": trace_id,
                    "metadata": metadata,
                }
                entity = (
                    Feedback(new["name"], new["value"], rationale=new.get("rationale"), **common)
                    if new["kind"] == "feedback"
                    else Expectation(new["name"], new["value"], **common)
                )
                store.create_assessment(entity)

    def set_trace_info(self, trace_id: str, info: dict[str, Any]) -> None:
        """``start_trace`` of the store, as the server's StartTraceV3 handler calls it."""
        from mlflow.entities import TraceInfo, TraceLocation, TraceState

        checked = check_trace_info(trace_id, info)
        trace_info = TraceInfo(
            trace_id=trace_id,
            trace_location=TraceLocation.from_experiment_id(self.experiment_id),
            request_time=checked["request_time_ms"],
            execution_duration=checked["execution_ms"],
            state=TraceState(checked["state"]),
            request_preview=checked["request_preview"],
            response_preview=checked["response_preview"],
            trace_metadata=checked["metadata"],
            tags=checked["tags"],
        )
        with _feature(TRACE_INFO):
            self._client._tracking_client.store.start_trace(trace_info)

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

    def log_spans(self, run_id: str, spans: Sequence[dict[str, Any]], link: bool) -> None:
        """Into the store as the server's ``/v1/traces`` puts them: OTLP spans made MLflow
        spans by MLflow's own ``Span.from_otel_proto``, then ``log_spans`` of the store; with
        ``link``, the traces the batch completes are linked to the run."""
        from google.protobuf.json_format import ParseDict
        from mlflow.entities.span import Span as MlflowSpan
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        request = ParseDict(_base64_ids(otlp_request(spans)), ExportTraceServiceRequest())
        mlflow_spans = [
            MlflowSpan.from_otel_proto(span)
            for resource in request.resource_spans
            for scope in resource.scope_spans
            for span in scope.spans
        ]
        store = self._client._tracking_client.store  # what MlflowClient itself writes to
        try:
            store.log_spans(self.experiment_id, mlflow_spans)
        except NotImplementedError as exc:
            raise TracesUnsupported(f"{type(store).__name__} stores no spans") from exc
        if link:
            roots = [s.trace_id for s in mlflow_spans if s.parent_id is None]
            if roots:
                store.link_traces_to_run(roots, run_id)


class _Closed:
    """In place of a closed exporter's client: whatever is asked of it raises."""

    def __getattr__(self, name: str) -> Any:
        raise ExporterClosed("the exporter is closed")


@contextlib.contextmanager
def _feature(feature: str) -> Iterator[None]:
    """A store without ``feature`` (NotImplementedError, MLflow's NOT_IMPLEMENTED) raises
    FeatureUnsupported."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except NotImplementedError as exc:
        raise FeatureUnsupported(feature, f"{type(exc).__name__}: {exc}"[:300]) from exc
    except MlflowException as exc:
        if exc.error_code not in ("NOT_IMPLEMENTED", "ENDPOINT_NOT_FOUND"):
            raise
        raise FeatureUnsupported(feature, str(exc)[:300]) from exc


def _base64_ids(request: dict[str, Any]) -> dict[str, Any]:
    """OTLP/JSON carries ids in hex; protobuf's JSON mapping of bytes is base64. A new
    request of new span dicts: the spans are the lane's own batch, which a retry or a
    bisection sends again as it is."""
    import base64

    def ids(span: dict[str, Any]) -> dict[str, Any]:
        return {
            **span,
            **{
                key: base64.b64encode(bytes.fromhex(span[key])).decode()
                for key in ("traceId", "spanId", "parentSpanId")
                if span.get(key)
            },
        }

    return {
        **request,
        "resourceSpans": [
            {
                **resource,
                "scopeSpans": [
                    {**scope, "spans": [ids(span) for span in scope["spans"]]}
                    for scope in resource["scopeSpans"]
                ],
            }
            for resource in request["resourceSpans"]
        ],
    }
