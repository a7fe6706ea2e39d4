"""The exporters' calls for MLflow 3's parts (run tags, table files, logged models and their
metrics, assessments, trace info), each against both real stores (the embedded one through
`MlflowClientExporter`, a server through `RestExporter`) and read back through MlflowClient
as the UI reads them; a server without the endpoints raises FeatureUnsupported; the memory
exporter keeps the same behaviour in memory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.tracking._tracking_service.utils import _use_tracking_uri
from support.memory import MemoryExporter
from support.servers import FaultProxy, MlflowServer

from rlm_mlflow import _spans
from rlm_mlflow._connect import Connection, RetryPolicy, connect
from rlm_mlflow._settings import Settings
from rlm_mlflow._tables import LOGGED_ARTIFACTS_TAG, logged_artifacts_tag, table_artifact
from rlm_mlflow._trace_info import check_trace_info
from rlm_mlflow.exporters.base import (
    ASSESSMENTS,
    LOGGED_MODELS,
    MODEL_KEY_TAG,
    TRACE_INFO,
    Exporter,
    FeatureUnsupported,
    HttpError,
    is_entity_error,
    is_http,
    is_kept,
    is_transient,
)

COLUMNS = ["case_id", "completed", "steps", "total_reward", "error"]
ROWS: list[list[Any]] = [
    ["case-1", True, 4, 1.5, None],
    ["case-2", False, 7, 0.25, "timeout"],
]


@pytest.fixture
def exporter(tracking_uri: str, experiment: str) -> Exporter:
    """The exporter `connect` picks for the store: MlflowClient's for the embedded store,
    REST for the server."""
    return connect(tracking_uri, experiment, Settings())


def new_run(exporter: Exporter, name: str) -> str:
    return exporter.create_run(name, 1_000, {"run_id": name})


def stored_trace(exporter: Exporter, run_id: str, key: str) -> str:
    """A trace stored as the lanes send it (a step, then the root that ends it): its id."""
    span = {"name": "run_python", "inputs": {"code": "print(1)"}, "outputs": {"ok": True}}
    step = _spans.step_span(key, 1, 1.0, 1.5, 0.5, 0.5, span, None)
    root = _spans.root_span(key, "traced", 0.0, 2.0, {"task": "t"}, {}, 0, None, True)
    exporter.log_spans(run_id, [step, root], True)
    return _spans.mlflow_trace_id(key)


# -- run tags and table files -----------------------------------------------------------------


def test_log_tags_sets_and_resets_run_tags(exporter: Exporter, tracking_uri: str) -> None:
    run_id = new_run(exporter, "tagged")
    exporter.log_tags(run_id, [("rlm.preset", "dspy_quick"), ("rlm.benchmark", "bench_1")])
    exporter.log_tags(run_id, [("rlm.preset", "pure_rlm")])  # a tag takes a new value
    tags = MlflowClient(tracking_uri).get_run(run_id).data.tags
    assert tags["rlm.preset"] == "pure_rlm" and tags["rlm.benchmark"] == "bench_1"


def test_a_table_artifact_is_what_log_table_writes_and_load_table_reads_it_back(
    exporter: Exporter, tracking_uri: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    client = MlflowClient(tracking_uri)
    ours, theirs = new_run(exporter, "ours"), new_run(exporter, "theirs")
    exporter.log_text(ours, table_artifact(COLUMNS, ROWS), "case_results.json")
    tag = logged_artifacts_tag(None, "case_results.json")
    exporter.log_tags(ours, [(LOGGED_ARTIFACTS_TAG, tag)])
    # mlflow.log_table of the same table on another run: the same file, the same tag
    columns = {c: [row[i] for row in ROWS] for i, c in enumerate(COLUMNS)}
    client.log_table(theirs, columns, "case_results.json")
    ours_file, theirs_file = (
        Path(client.download_artifacts(run, "case_results.json", str(tmp_path / run)))
        for run in (ours, theirs)
    )
    assert json.loads(ours_file.read_text()) == json.loads(theirs_file.read_text())
    assert tag == client.get_run(theirs).data.tags[LOGGED_ARTIFACTS_TAG]
    # what the UI's table view and mlflow.load_table read: the rows, with their types
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", exporter.experiment_id)
    with _use_tracking_uri(tracking_uri):
        table = mlflow.load_table("case_results.json", run_ids=[ours])
    assert list(table.columns) == COLUMNS
    loaded = table.astype(object).where(table.notna(), None).values.tolist()
    assert loaded == ROWS
    assert [type(v) for v in loaded[0][:4]] == [str, bool, int, float]


def test_files_and_tables_through_the_servers_artifact_proxy_land_and_read_back(
    tmp_path: Path, experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MLflow 3's `mlflow server` serves artifacts (mlflow-artifacts:/ run roots): log_path and
    # log_text PUT the files to its proxy, whose answer to an upload is a 200 with no body.
    # (The shared server has a local artifact root.)
    root = tmp_path / "served"
    args = ["--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "served-artifacts")]  # fmt: skip
    trajectory = tmp_path / "run.jsonl"
    trajectory.write_text('{"step": 1}\n')
    with MlflowServer(root, store_args=args) as server:
        client = MlflowClient(server.url)
        exporter = connect(server.url, experiment, Settings())
        run_id = new_run(exporter, "proxied")
        assert client.get_run(run_id).info.artifact_uri.startswith("mlflow-artifacts:/")
        exporter.log_path(run_id, str(trajectory))  # raised Misconfigured before 0b16cad
        exporter.log_text(run_id, table_artifact(COLUMNS, ROWS), "tables/case_results.json")
        tag = logged_artifacts_tag(None, "tables/case_results.json")
        exporter.log_tags(run_id, [(LOGGED_ARTIFACTS_TAG, tag)])
        files = [f.path for f in client.list_artifacts(run_id)]
        monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", exporter.experiment_id)
        with _use_tracking_uri(server.url):
            table = mlflow.load_table("tables/case_results.json", run_ids=[run_id])
    assert files == ["run.jsonl", "tables"]
    assert table.astype(object).where(table.notna(), None).values.tolist() == ROWS
    assert list((root / "served-artifacts").rglob("case_results.json"))


def test_log_text_lands_under_a_directory_and_replaces_the_file(
    exporter: Exporter, tracking_uri: str, tmp_path: Path
) -> None:
    run_id = new_run(exporter, "texts")
    exporter.log_text(run_id, "first", "bench/summary.md")
    exporter.log_text(run_id, "second — ünïcode", "bench/summary.md")
    client = MlflowClient(tracking_uri)
    assert [f.path for f in client.list_artifacts(run_id, "bench")] == ["bench/summary.md"]
    local = client.download_artifacts(run_id, "bench/summary.md", str(tmp_path))
    assert Path(local).read_text(encoding="utf-8") == "second — ünïcode"
    with pytest.raises(ValueError):
        exporter.log_text(run_id, "x", "../outside.txt")


# -- logged models --------------------------------------------------------------------------


def test_a_logged_model_is_created_ready_and_found_by_its_key(
    exporter: Exporter, tracking_uri: str
) -> None:
    run_id = new_run(exporter, "source")
    assert exporter.find_logged_model("config-a") is None
    params = [("model", "gpt-4o-mini"), ("max_steps", "8")]
    model_id = exporter.create_logged_model(
        "rlm gpt-4o-mini", run_id, params, [(MODEL_KEY_TAG, "config-a"), ("rlm.preset", "q")]
    )
    model = MlflowClient(tracking_uri).get_logged_model(model_id)
    assert str(model.status) == "READY" and model.name == "rlm gpt-4o-mini"
    assert model.source_run_id == run_id and model.experiment_id == exporter.experiment_id
    assert model.params == dict(params)
    assert model.tags[MODEL_KEY_TAG] == "config-a" and model.tags["rlm.preset"] == "q"
    assert exporter.find_logged_model("config-a") == model_id
    assert exporter.find_logged_model("config-b") is None


def test_model_metrics_are_the_runs_and_the_models_and_rank_the_models(
    exporter: Exporter, tracking_uri: str
) -> None:
    client = MlflowClient(tracking_uri)
    models = {}
    for name, reward in (("low", 0.4), ("high", 0.9)):
        run_id = new_run(exporter, name)
        model_id = exporter.create_logged_model(name, run_id, [], [(MODEL_KEY_TAG, name)])
        rows = [("avg_reward", reward, 5_000, 0), ("avg_steps", 6.0, 5_000, 0)]
        exporter.log_model_metrics(run_id, model_id, rows)
        exporter.log_model_metrics(run_id, model_id, rows)  # a retry: no second copy
        models[name] = (run_id, model_id)
    run_id, model_id = models["high"]
    metrics = client.get_logged_model(model_id).metrics or []
    assert sorted((m.key, m.value, m.step, m.run_id, m.model_id) for m in metrics) == [
        ("avg_reward", 0.9, 0, run_id, model_id),
        ("avg_steps", 6.0, 0, run_id, model_id),
    ]
    assert client.get_run(run_id).data.metrics == {"avg_reward": 0.9, "avg_steps": 6.0}
    assert len(client.get_metric_history(run_id, "avg_reward")) == 1
    ranked = client.search_logged_models(
        [exporter.experiment_id],
        order_by=[{"field_name": "metrics.avg_reward", "ascending": False}],
    )
    assert [m.model_id for m in ranked] == [models["high"][1], models["low"][1]]


# -- assessments ----------------------------------------------------------------------------

ASSESSED: list[dict[str, Any]] = [
    {"name": "answer_match", "kind": "feedback", "value": True, "source_type": "CODE",
     "source_id": "rlm-mlflow", "rationale": "the final answer equals the expected one"},
    {"name": "total_reward", "kind": "feedback", "value": 0.75, "source_type": "CODE",
     "source_id": "rlm-mlflow", "rationale": None},
    {"name": "steps", "kind": "feedback", "value": 4, "source_type": "CODE",
     "source_id": "rlm-mlflow"},
    {"name": "expected_answer", "kind": "expectation", "value": "42", "source_type": "CODE",
     "source_id": "rlm-mlflow", "rationale": None},
    {"name": "expected_facts", "kind": "expectation", "value": {"facts": ["a", 1]},
     "source_type": "HUMAN", "source_id": "curator"},
]  # fmt: skip


def test_assessments_land_on_a_stored_trace_with_their_types_and_once(
    exporter: Exporter, tracking_uri: str
) -> None:
    run_id = new_run(exporter, "assessed")
    trace_id = stored_trace(exporter, run_id, "assessed-key")
    with_run = [{**a, "run_id": run_id} if a["name"] == "answer_match" else a for a in ASSESSED]
    exporter.log_assessments(trace_id, with_run)
    exporter.log_assessments(trace_id, with_run)  # again (a retry, a replay): no copy
    later = {"name": "judge", "kind": "feedback", "value": "good", "source_type": "LLM_JUDGE",
             "source_id": "gpt-4o", "rationale": "reads well"}  # fmt: skip
    exporter.log_assessments(trace_id, [ASSESSED[0], later])  # only the new one is added
    assessments = MlflowClient(tracking_uri).get_trace(trace_id).info.assessments
    by_name = {a.name: a for a in assessments}
    assert len(assessments) == len(by_name) == 6
    feedback, reward, steps = by_name["answer_match"], by_name["total_reward"], by_name["steps"]
    assert feedback.value is True and feedback.rationale.startswith("the final answer")
    assert feedback.run_id == run_id and feedback.source.source_type == "CODE"
    assert feedback.source.source_id == "rlm-mlflow" and feedback.trace_id == trace_id
    assert isinstance(reward.value, float) and reward.value == 0.75 and reward.run_id is None
    # an int stays one in the embedded store; through a server it is 4.0 (protobuf's Value,
    # which carries a feedback's value, holds numbers as doubles)
    assert steps.value == 4 and type(steps.value) is (float if is_http(tracking_uri) else int)
    assert type(by_name["expected_answer"]).__name__ == "Expectation"
    assert by_name["expected_answer"].value == "42"
    assert by_name["expected_facts"].value == {"facts": ["a", 1]}
    assert by_name["expected_facts"].source.source_type == "HUMAN"
    assert by_name["judge"].source.source_type == "LLM_JUDGE" and by_name["judge"].value == "good"


def test_assessments_need_the_trace_stored_first(exporter: Exporter) -> None:
    # MLflow's "no such trace": an HttpError 404 from a server, an MlflowException from the
    # store; not a missing feature
    with pytest.raises(Exception) as raised:
        exporter.log_assessments(_spans.mlflow_trace_id("never-sent"), ASSESSED[:1])
    assert getattr(raised.value, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"
    assert not isinstance(raised.value, FeatureUnsupported)


def test_a_malformed_assessment_is_refused_before_anything_is_sent(exporter: Exporter) -> None:
    run_id = new_run(exporter, "malformed")
    trace_id = stored_trace(exporter, run_id, "malformed-key")
    for bad in ({**ASSESSED[0], "kind": "issue"}, {**ASSESSED[1], "value": float("nan")}):
        with pytest.raises(ValueError):
            exporter.log_assessments(trace_id, [ASSESSED[3], bad])
    assert MlflowClient(exporter.tracking_uri).get_trace(trace_id).info.assessments == []


# -- a store without the features -----------------------------------------------------------


@pytest.mark.parametrize("status", [404, 405, 501])
def test_a_server_without_logged_models_raises_feature_unsupported(
    proxy: FaultProxy, experiment: str, status: int
) -> None:
    exporter = connect(proxy.url, experiment, Settings())
    run_id = new_run(exporter, "plain")
    models = "/api/2.0/mlflow/logged-models"
    proxy.lack(models, f"{models}/search", status=status)
    with pytest.raises(FeatureUnsupported) as raised:
        exporter.find_logged_model("k")
    assert raised.value.feature == LOGGED_MODELS and str(status) in str(raised.value)
    # neither retried nor bisected nor kept: the caller goes on without logged models
    assert not (is_transient(raised.value) or is_entity_error(raised.value))
    assert not is_kept(raised.value)
    with pytest.raises(FeatureUnsupported) as raised:
        exporter.create_logged_model("m", run_id, [], [(MODEL_KEY_TAG, "k")])
    assert raised.value.feature == LOGGED_MODELS
    exporter.log_tags(run_id, [("still", "works")])  # the rest of the API is there


def test_a_server_without_assessments_raises_feature_unsupported(
    proxy: FaultProxy, mlflow_server: MlflowServer, experiment: str
) -> None:
    exporter = connect(proxy.url, experiment, Settings())
    run_id = new_run(exporter, "traced")
    trace_id = stored_trace(exporter, run_id, "unassessable")
    proxy.lack(f"/api/3.0/mlflow/traces/{trace_id}/assessments", status=404)
    with pytest.raises(FeatureUnsupported) as raised:
        exporter.log_assessments(trace_id, ASSESSED)
    assert raised.value.feature == ASSESSMENTS
    proxy.lack(f"/api/3.0/mlflow/traces/{trace_id}", status=404)  # no v3 trace API at all
    with pytest.raises(FeatureUnsupported):
        exporter.log_assessments(trace_id, ASSESSED)
    assert MlflowClient(mlflow_server.url).get_trace(trace_id).info.assessments == []


# -- the memory exporter --------------------------------------------------------------------


def test_the_memory_exporter_keeps_what_the_real_ones_store() -> None:
    memory = MemoryExporter()
    run_id = new_run(memory, "m")
    memory.log_tags(run_id, [("a", "1")])
    memory.log_text(run_id, table_artifact(COLUMNS, ROWS), "case_results.json")
    model_id = memory.create_logged_model("model", run_id, [("p", "1")], [(MODEL_KEY_TAG, "k")])
    assert memory.find_logged_model("k") == model_id and memory.find_logged_model("z") is None
    memory.log_model_metrics(run_id, model_id, [("avg_reward", 0.5, 1, 0)] * 2)
    with pytest.raises(HttpError):  # the trace is not stored yet
        memory.log_assessments(_spans.mlflow_trace_id("mk"), ASSESSED)
    trace_id = stored_trace(memory, run_id, "mk")
    memory.log_assessments(trace_id, ASSESSED)
    memory.log_assessments(trace_id, ASSESSED)
    run, model, trace = memory.runs[run_id], memory.models[model_id], memory.trace_of("mk")
    assert run.tags["a"] == "1" and json.loads(run.texts["case_results.json"])["data"] == ROWS
    assert model.source_run_id == run_id and model.params == {"p": "1"}
    assert run.metrics["avg_reward"] == model.metrics["avg_reward"] == [(0.5, 1, 0)]
    assert trace is not None and trace.run_id == run_id and len(trace.spans) == 2
    assert [a["name"] for a in trace.assessments] == [a["name"] for a in ASSESSED]
    memory.lack(LOGGED_MODELS)
    with pytest.raises(FeatureUnsupported):
        memory.find_logged_model("k")


def test_the_memory_exporter_implements_the_whole_protocol(tmp_path: Path) -> None:
    api = pytest.importorskip("mypy.api")
    memory = Path(__file__).parent / "support" / "memory.py"
    out, err, status = api.run(["--strict", "--cache-dir", str(tmp_path), str(memory)])
    assert status == 0, out + err


@pytest.mark.anyio
async def test_connection_sends_each_call_and_does_not_retry_a_missing_feature() -> None:
    memory = MemoryExporter()
    policy = RetryPolicy(5.0, lambda state: None)
    connection = Connection(memory, 2, policy)
    run_id = await connection.create_run("c", 1, {"run_id": "c"})
    memory.fail("create_logged_model", 1)  # a 503: retried
    model_id = await connection.create_logged_model("m", run_id, [], [(MODEL_KEY_TAG, "c")])
    assert await connection.find_logged_model("c") == model_id
    await connection.log_tags(run_id, [("t", "v")])
    await connection.log_text(run_id, "text", "notes.txt")
    await connection.log_model_metrics(run_id, model_id, [("avg_reward", 1.0, 1, 0)])
    await connection.log_spans(run_id, [_spans.root_span("ck", "c", 0, 1, {}, {}, 0, None, True)],
                               True)  # fmt: skip
    await connection.log_assessments(_spans.mlflow_trace_id("ck"), ASSESSED[:2])
    memory.lack(ASSESSMENTS)
    before = len(memory.calls)
    with pytest.raises(FeatureUnsupported):
        await connection.log_assessments(_spans.mlflow_trace_id("ck"), ASSESSED)
    assert len(memory.calls) == before + 1  # said once, not retried
    assert [c for c, _ in memory.calls].count("create_logged_model") == 2


# -- trace info -----------------------------------------------------------------------------


def used_trace(exporter: Exporter, run_id: str, key: str) -> str:
    """A trace of a step that used tokens and its root, stored not linked to the run (so only
    ``mlflow.sourceRun`` ties it to it): its id."""
    trace, root = _spans.trace_id(key), _spans.span_id(key, "root")
    usage = {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15}
    step = {"traceId": trace, "spanId": _spans.span_id(key, 1), "parentSpanId": root,
            "name": "step 1", "startTimeUnixNano": "1000000000", "endTimeUnixNano": "1500000000",
            "attributes": _spans.attributes({"mlflow.spanType": "LLM",
                                             "mlflow.chat.tokenUsage": usage}),
            "status": {"code": 1}}  # fmt: skip
    top = {"traceId": trace, "spanId": root, "name": "run", "startTimeUnixNano": "0",
           "endTimeUnixNano": "2000000000", "status": {"code": 1},
           "attributes": _spans.attributes({"mlflow.spanType": "AGENT",
                                            "mlflow.spanInputs": {"task": "t"}})}  # fmt: skip
    exporter.log_spans(run_id, [step, top], False)
    return _spans.mlflow_trace_id(key)


def ui_info(run_id: str, key: str) -> dict[str, Any]:
    return {
        "metadata": {
            "mlflow.sourceRun": run_id,
            "mlflow.trace.user": "ada",
            "mlflow.trace.session": f"session-{key}",
            "mlflow.source.name": "/home/ada/bench.py",
            "mlflow.source.type": "LOCAL",
        },
        "tags": {"rlm.run_id": key, "mlflow.traceName": f"run {key}", "long": "x" * 5000},
        "request_time_ms": 1_700_000_000_123,
        "execution_ms": 2_500,
        "state": "ERROR",
        "request_preview": "what is 6 times 7?",
        "response_preview": "42",
    }


def test_trace_info_is_what_the_ui_reads_and_keeps_spans_usage_and_assessments(
    exporter: Exporter, tracking_uri: str
) -> None:
    client = MlflowClient(tracking_uri)
    run_id = new_run(exporter, "described")
    key = f"described-{exporter.experiment_id}"
    trace_id = used_trace(exporter, run_id, key)
    exporter.log_assessments(trace_id, ASSESSED[:2])
    assert client.search_traces(locations=[exporter.experiment_id], run_id=run_id) == []
    exporter.set_trace_info(trace_id, ui_info(run_id, key))
    exporter.set_trace_info(trace_id, ui_info(run_id, key))  # a replay: the same record
    trace = client.get_trace(trace_id)
    info, metadata, sent = trace.info, trace.info.trace_metadata, ui_info(run_id, key)
    # the session among them: a column of its own in the store, given back as metadata
    assert {k: metadata.get(k) for k in sent["metadata"]} == sent["metadata"]
    assert info.tags["rlm.run_id"] == key and info.tags["mlflow.traceName"] == f"run {key}"
    assert info.tags["long"] == "x" * 4096  # cut as MLflow's client cuts a tag
    assert str(info.state) == "ERROR" and info.execution_duration == 2_500
    assert info.request_time == 1_700_000_000_123
    assert (info.request_preview, info.response_preview) == ("what is 6 times 7?", "42")
    # what the merge keeps: the spans, the usage MLflow summed from them, the assessments
    assert len(trace.data.spans) == 2
    assert info.token_usage == {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15}
    assert json.loads(metadata["mlflow.trace.tokenUsage"])["total_tokens"] == 15
    assert sorted(a.name for a in info.assessments) == ["answer_match", "total_reward"]
    # found as the run page's Traces tab and the trace list's filters find it
    where = [exporter.experiment_id]
    by_run = client.search_traces(locations=where, run_id=run_id)
    assert [t.info.trace_id for t in by_run] == [trace_id]
    for query in (f"tags.`rlm.run_id` = '{key}'",
                  f"metadata.`mlflow.trace.session` = 'session-{key}'",
                  "metadata.`mlflow.trace.user` = 'ada'"):  # fmt: skip
        found = client.search_traces(locations=where, filter_string=query)
        assert [t.info.trace_id for t in found] == [trace_id], query


def test_trace_info_again_replaces_what_it_names_and_keeps_the_rest(
    exporter: Exporter, tracking_uri: str
) -> None:
    run_id = new_run(exporter, "redescribed")
    key = f"redescribed-{exporter.experiment_id}"
    trace_id = used_trace(exporter, run_id, key)
    exporter.set_trace_info(trace_id, ui_info(run_id, key))
    exporter.set_trace_info(
        trace_id,
        {"metadata": {"mlflow.trace.user": "grace"}, "tags": {"rlm.status": "done"},
         "request_time_ms": 5_000, "execution_ms": 10, "state": "OK"},
    )  # fmt: skip
    info = MlflowClient(tracking_uri).get_trace(trace_id).info
    assert info.trace_metadata["mlflow.trace.user"] == "grace"
    assert info.trace_metadata["mlflow.sourceRun"] == run_id  # not named: kept
    assert info.trace_metadata["mlflow.trace.session"] == f"session-{key}"
    assert info.tags["rlm.status"] == "done" and info.tags["mlflow.traceName"] == f"run {key}"
    assert (str(info.state), info.request_time, info.execution_duration) == ("OK", 5_000, 10)
    assert (info.request_preview, info.response_preview) == ("what is 6 times 7?", "42")
    assert info.token_usage == {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15}


def test_a_malformed_trace_info_is_refused_before_anything_is_sent(exporter: Exporter) -> None:
    run_id = new_run(exporter, "malformed-info")
    key = f"malformed-info-{exporter.experiment_id}"
    trace_id = used_trace(exporter, run_id, key)
    good = ui_info(run_id, key)
    bad = [
        (trace_id.removeprefix("tr-"), good),
        (trace_id, {**good, "state": "IN_PROGRESS"}),
        (trace_id, {**good, "metadata": {"mlflow.sourceRun": 7}}),
        (trace_id, {**good, "request_time_ms": -1}),
        (trace_id, {**good, "execution_ms": 2.5}),
        (trace_id, {**good, "request_preview": {"task": "t"}}),
        (trace_id, {**good, "previews": "typo"}),
    ]
    for bad_id, bad_info in bad:
        with pytest.raises(ValueError):
            exporter.set_trace_info(bad_id, bad_info)
    info = MlflowClient(exporter.tracking_uri).get_trace(trace_id).info
    assert "mlflow.sourceRun" not in info.trace_metadata and str(info.state) == "OK"


@pytest.mark.parametrize("status", [404, 405, 501])
def test_a_server_without_start_trace_v3_raises_feature_unsupported(
    proxy: FaultProxy, mlflow_server: MlflowServer, experiment: str, status: int
) -> None:
    exporter = connect(proxy.url, experiment, Settings())
    run_id = new_run(exporter, "undescribed")
    trace_id = stored_trace(exporter, run_id, f"undescribed-{status}-{experiment}")
    proxy.lack("/api/3.0/mlflow/traces", status=status)
    with pytest.raises(FeatureUnsupported) as raised:
        exporter.set_trace_info(trace_id, ui_info(run_id, "undescribed"))
    assert raised.value.feature == TRACE_INFO and str(status) in str(raised.value)
    assert not (is_transient(raised.value) or is_entity_error(raised.value))
    info = MlflowClient(mlflow_server.url).get_trace(trace_id).info
    assert "mlflow.sourceRun" not in info.trace_metadata


def test_the_memory_exporter_merges_trace_info_as_mlflow_does() -> None:
    memory = MemoryExporter()
    run_id = new_run(memory, "m")
    trace_id = stored_trace(memory, run_id, "mi")
    memory.set_trace_info(trace_id, ui_info(run_id, "mi"))
    again = {"metadata": {"mlflow.trace.user": "grace"}, "request_time_ms": 5, "execution_ms": 1,
             "state": "OK"}  # fmt: skip
    memory.set_trace_info(trace_id, again)
    trace = memory.trace_of("mi")
    assert trace is not None and trace.info is not None and len(trace.spans) == 2
    expected = check_trace_info(trace_id, ui_info(run_id, "mi"))
    assert trace.info == {
        **expected,
        "metadata": {**expected["metadata"], "mlflow.trace.user": "grace"},
        "request_time_ms": 5,
        "execution_ms": 1,
        "state": "OK",
    }
    with pytest.raises(ValueError):
        memory.set_trace_info(trace_id, {**again, "state": "RUNNING"})
    memory.lack(TRACE_INFO)
    with pytest.raises(FeatureUnsupported):
        memory.set_trace_info(trace_id, again)


@pytest.mark.anyio
async def test_connection_sets_trace_info_and_does_not_retry_a_missing_feature() -> None:
    memory = MemoryExporter()
    connection = Connection(memory, 2, RetryPolicy(5.0, lambda state: None))
    trace_id = _spans.mlflow_trace_id("ci")
    info = ui_info("m1", "ci")
    memory.fail("set_trace_info", 1)  # a 503: retried
    await connection.set_trace_info(trace_id, info)
    trace = memory.traces[trace_id]
    assert trace.info is not None and trace.info["metadata"]["mlflow.sourceRun"] == "m1"
    memory.lack(TRACE_INFO)
    with pytest.raises(FeatureUnsupported):
        await connection.set_trace_info(trace_id, info)
    assert [c for c, _ in memory.calls].count("set_trace_info") == 3  # the 503, once, once


# -- the table helpers ----------------------------------------------------------------------


def test_table_artifact_writes_pandas_split_json() -> None:
    text = table_artifact(["a", "b"], [[1, float("nan")], ["x", float("inf")]])
    assert text == '{"columns":["a","b"],"data":[[1,null],["x",null]]}'
    with pytest.raises(ValueError):
        table_artifact(["a", "b"], [[1]])


def test_logged_artifacts_tag_lists_each_table_once() -> None:
    first = logged_artifacts_tag(None, "case_results.json")
    assert first == '[{"path": "case_results.json", "type": "table"}]'
    both = logged_artifacts_tag(first, "dir/more.json")
    assert json.loads(both) == [
        {"path": "case_results.json", "type": "table"},
        {"path": "dir/more.json", "type": "table"},
    ]
    assert logged_artifacts_tag(both, "dir/more.json") == both
    assert logged_artifacts_tag("not json", "t.json") == logged_artifacts_tag(None, "t.json")
    for bad in ("a,b.json", "../up.json", "/abs.json"):
        with pytest.raises(ValueError):
            logged_artifacts_tag(None, bad)
