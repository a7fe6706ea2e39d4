"""What the docs' screenshots show: two rlm-code benchmarks of the scripted pack, one per model,
under `rlm_mlflow.autolog()` with traces on (DSPY_RLM_MLFLOW_ENABLED, DSPY_RLM_MLFLOW_TRACES and
DSPY_RLM_MLFLOW_EXPERIMENT set by the caller), sent to the server MLFLOW_TRACKING_URI names.
``model-b`` stumbles (a failing step, then 36) where ``model-a`` answers 42, so the two
configurations score apart. Prints, as JSON, the experiment, the benchmarks, their parent runs
and the trace of one case.

Run by `benchmarks/ui_shots.py` (``make screenshots``), with this project's venv.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the scripted connector of the tests

from support.scripted_rlm import (  # noqa: E402
    BENCH_CASES,
    ScriptedConnector,
    scripted_runner,
    shutdown_interpreters,
    write_pack,
)

import rlm_mlflow  # noqa: E402

PRESET = "scripted_pack"


#: model-b on the case model-a gets right: a step whose code fails, then the wrong answer.
_STUMBLE = (
    {"action": "run_python", "code": "assert 6 * 7 == 36", "rationale": "Check.", "done": False},
    {"action": "final", "done": True, "final_response": "The answer is 36."},
)


class StumblingConnector(ScriptedConnector):
    """model-b: on the case model-a answers right, a failing step and then 36."""

    @staticmethod
    def _answer(key: str | None, step: int | None) -> dict[str, Any] | str:
        if key == "answer" and step is not None and step <= len(_STUMBLE):
            return _STUMBLE[step - 1]
        return ScriptedConnector._answer(key, step)


def one_benchmark(workdir: Path, connector: ScriptedConnector) -> str:
    workdir.mkdir(parents=True)
    pack = write_pack(workdir / "pack.json", PRESET, BENCH_CASES)
    runner = scripted_runner(workdir, connector=connector)
    try:
        result = runner.run_benchmark(preset=PRESET, pack_paths=[str(pack)])
    finally:
        shutdown_interpreters(runner)
    for sink in runner.observability.sinks:
        if hasattr(sink, "shared"):  # autolog's sink: every event delivered before we go on
            assert sink.shared.flush(timeout=120)
    return str(json.loads(Path(result.summary_path).read_text())["benchmark_id"])


def main() -> None:
    assert os.environ.get("MLFLOW_TRACKING_URI", "").startswith("http://127.0.0.1:")
    assert os.environ.get("DSPY_RLM_MLFLOW_TRACES") == "true"
    assert rlm_mlflow.autolog() is True
    benchmarks = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cls in (
            ("scripted/model-a", ScriptedConnector),
            ("scripted/model-b", StumblingConnector),
        ):
            connector = cls()
            connector.current_model = name  # type: ignore[misc]
            benchmarks.append(one_benchmark(Path(tmp) / name.replace("/", "-"), connector))
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name(os.environ["DSPY_RLM_MLFLOW_EXPERIMENT"])
    ids = [experiment.experiment_id]
    parents = [
        client.search_runs(ids, f"tags.`rlm.benchmark_id` = '{b}' and run_name = '{b}'")[0]
        for b in benchmarks
    ]
    (case,) = client.search_runs(
        ids, f"tags.`rlm.benchmark_id` = '{benchmarks[0]}' and tags.`rlm.case_id` = 'misses'"
    )
    (trace,) = client.search_traces(
        ids, filter_string=f"tags.`rlm.run_id` = '{case.info.run_name}'"
    )
    (stumbled,) = client.search_runs(  # model-b's failing step
        ids, f"tags.`rlm.benchmark_id` = '{benchmarks[1]}' and tags.`rlm.case_id` = 'matches'"
    )
    (failed,) = client.search_traces(
        ids, filter_string=f"tags.`rlm.run_id` = '{stumbled.info.run_name}'"
    )
    (recursive,) = client.search_runs(
        ids, f"tags.`rlm.benchmark_id` = '{benchmarks[0]}' and tags.`rlm.case_id` = 'recursive'"
    )
    print(
        json.dumps(
            {
                "experiment_id": experiment.experiment_id,
                "benchmarks": benchmarks,
                "parent_runs": [r.info.run_id for r in parents],
                "case_trace": trace.info.trace_id,
                "failed_trace": failed.info.trace_id,
                "session": recursive.info.run_name,
            }
        )
    )


if __name__ == "__main__":
    main()
