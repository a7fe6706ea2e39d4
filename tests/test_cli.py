from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from mlflow import MlflowClient
from support.checks import snapshot
from support.children import CLI
from support.servers import MlflowServer

from rlm_mlflow._event import RunStart, Step
from rlm_mlflow._journal import Journal, journal_meta


def test_run_drives_a_recursive_benchmark_into_the_default_local_store(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run(
        [
            CLI,
            "run",
            "--task",
            "Create a DSPy signature",
            "--environment",
            "dspy",
            "--steps",
            "300",
            "--runs",
            "2",
            "--depth",
            "1",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in done.stdout
    assert (tmp_path / "mlflow.db").exists()

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rlm-code-rlm")
    runs = {r.data.tags["run_id"]: r for r in client.search_runs([exp.experiment_id])}
    assert len(runs) == 6  # two roots, each with two children
    by_mlflow_id = {r.info.run_id: name for name, r in runs.items()}
    for name, run in runs.items():
        assert run.info.status == "FINISHED"
        steps = 300 if run.data.params["depth"] == "0" else 150
        history = client.get_metric_history(run.info.run_id, "step_reward")
        assert sorted(m.step for m in history) == list(range(steps))
        if run.data.params["depth"] == "1":
            assert by_mlflow_id[run.data.tags["mlflow.parentRunId"]] == name.rsplit(".", 1)[0]
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == [f"{name}.jsonl"]
    trajectory = (tmp_path / "rlm-runs" / f"{name}.jsonl").read_text().splitlines()
    assert json.loads(trajectory[0])["step"] == 0


def test_status_prints_the_sinks_status_as_configured_by_the_environment() -> None:
    env = {**os.environ, "DSPY_RLM_MLFLOW_ENABLED": "0", "DSPY_RLM_MLFLOW_EXPERIMENT": "e1"}
    done = subprocess.run(
        [CLI, "status", "--json"], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    status = json.loads(done.stdout)
    assert {k: status[k] for k in ("name", "enabled", "available", "detail", "experiment")} == {
        "name": "mlflow",
        "enabled": False,
        "available": False,
        "detail": "disabled",
        "experiment": "e1",
    }


def test_status_reads_as_a_table_by_default() -> None:
    env = {**os.environ, "DSPY_RLM_MLFLOW_ENABLED": "0"}
    done = subprocess.run(
        [CLI, "status"], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    rows = dict(line.split(None, 1) for line in done.stdout.splitlines())
    assert rows["name"] == "mlflow" and rows["detail"] == "disabled"


@pytest.mark.parametrize(
    ("argv", "env", "code", "message"),
    [
        (
            ["--queue-size", "-5"],
            {},
            2,
            "bad setting: queue_size (env DSPY_RLM_MLFLOW_QUEUE_SIZE) must be a positive number",
        ),
        (
            [],
            {"DSPY_RLM_MLFLOW_WHEN_FULL": "explode"},
            2,
            "bad setting: when_full (env DSPY_RLM_MLFLOW_WHEN_FULL) must be one of",
        ),
        (["--tracking-uri", "ftp://example"], {}, 2, "unsupported tracking URI 'ftp://example'"),
        (
            ["--tracking-uri", "http://u:hunter22@127.0.0.1:9"],
            {},
            3,
            "cannot reach the tracking server at http://u:***@127.0.0.1:9",
        ),
    ],
)
def test_run_fails_in_one_clear_line_with_an_exit_code(
    tmp_path: Path, argv: list[str], env: dict[str, str], code: int, message: str
) -> None:
    done = subprocess.run(
        [CLI, "run", "--task", "t", "--environment", "e", "--steps", "10", *argv],
        cwd=tmp_path,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == code
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("rlm-mlflow: ") and message in line
    assert "hunter22" not in done.stderr


def test_every_setting_is_a_flag_whose_help_names_its_variable_and_default() -> None:
    done = subprocess.run(
        [CLI, "run", "--help"], capture_output=True, text=True, timeout=60, check=True
    )
    text = " ".join(done.stdout.split())
    for flag, env, default in [
        ("--queue-size", "DSPY_RLM_MLFLOW_QUEUE_SIZE", "100000"),
        ("--when-full", "DSPY_RLM_MLFLOW_WHEN_FULL", "'block'"),
        ("--max-in-flight", "DSPY_RLM_MLFLOW_MAX_IN_FLIGHT", "4"),
    ]:
        assert flag in text
        assert f"env {env}, default {default}" in text


def test_status_is_read_only_and_says_what_a_sink_would_find(
    tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    spool = tmp_path / "spool"
    journal = Journal(spool, 1 << 30, journal_meta("left-behind", None))
    journal.append(
        [RunStart("r", 1.0, "e", 1, {}, "k"), *(Step("r", i, 0.5, 0.5, 1.0) for i in range(7))]
    )
    journal.close(remove=False)  # its process is gone: it waits for a sync
    experiment = f"never-created-{tmp_path.name}"
    before = snapshot(tmp_path)
    env = {
        **os.environ,
        "DSPY_RLM_MLFLOW_ENABLED": "true",
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "DSPY_RLM_MLFLOW_EXPERIMENT": experiment,
        "DSPY_RLM_MLFLOW_SPOOL_DIR": str(spool),
        "DSPY_RLM_MLFLOW_QUEUE_SIZE": "500",
    }
    done = subprocess.run(
        [CLI, "status", "--json", "--batch-size", "10"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    status = json.loads(done.stdout)
    assert status["available"] is True and status["mlflow"] == "importable"
    assert status["store_reachable"] is True
    assert status["settings"]["batch_size"] == {"value": 10, "source": "flag"}
    assert status["settings"]["queue_size"] == {"value": 500, "source": "env"}
    assert status["settings"]["put_timeout"] == {"value": 5.0, "source": "default"}
    (waiting,) = status["journals"]
    assert waiting["state"] == "waiting for sync" and waiting["events"] == 8
    assert snapshot(tmp_path) == before  # nothing written: no journal, no file, no dead letter
    assert MlflowClient(mlflow_server.url).get_experiment_by_name(experiment) is None

    table = subprocess.run(
        [CLI, "status"],
        cwd=tmp_path,
        env={**env, "MLFLOW_TRACKING_URI": "sqlite:///new.db"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows = dict(line.split(None, 1) for line in table.stdout.splitlines())
    assert rows["store_reachable"] == "None" and "does not exist yet" in rows["store"]
    assert not (tmp_path / "new.db").exists()


@pytest.mark.parametrize(
    ("argv", "env", "names"),
    [
        (["status"], {"DSPY_RLM_MLFLOW_WHEN_FULL": "sometimes"}, "DSPY_RLM_MLFLOW_WHEN_FULL"),
        (["status", "--fsync", "often"], {}, "DSPY_RLM_MLFLOW_FSYNC"),
        (["status", "--handle-sigterm", "maybe"], {}, "--handle-sigterm"),
        (["run", "--task", "t", "--environment", "e", "--steps", "0"], {}, "--steps"),
        (["run", "--task", "t", "--environment", "e"], {}, "--steps"),
        (["sync"], {}, "spool_dir"),
        (["sync", "/nonexistent/spool"], {}, "spool_dir"),
        (["nonsense"], {}, "nonsense"),
        (["--log-format", "xml", "status"], {}, "--log-format"),
    ],
)
def test_every_bad_setting_or_argument_is_one_line_naming_it_and_exit_2(
    tmp_path: Path, argv: list[str], env: dict[str, str], names: str
) -> None:
    done = subprocess.run(
        [CLI, *argv],
        cwd=tmp_path,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("rlm-mlflow: ") and names in line and "Traceback" not in line


def test_help_reads_well() -> None:
    top = subprocess.run([CLI, "--help"], capture_output=True, text=True, timeout=60, check=True)
    for command in ("run", "status", "sync", "instrument"):
        assert f"`{command}`" in top.stdout  # the description names every command
    run = subprocess.run(
        [CLI, "run", "--help"], capture_output=True, text=True, timeout=60, check=True
    )
    assert "(default: None)" not in run.stdout
    assert "(default: 1)" in " ".join(run.stdout.split())  # --runs still shows its default


def test_sync_writes_refusals_to_the_dead_letter_file_it_is_given(
    tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    spool = tmp_path / "spool"
    journal = Journal(spool, 1 << 30, journal_meta(f"dl-{tmp_path.name}", None))
    start = RunStart("r", 1.0, "e", 1, {"p": "one"}, "k")
    journal.append([start, Step("r", 0, 0.5, 0.5, 1.0)])
    journal.close(remove=False)
    client = MlflowClient(mlflow_server.url)
    experiment_id = client.create_experiment(f"dl-{tmp_path.name}")
    run = client.create_run(experiment_id, tags={"rlm_mlflow.run_key": "k"})
    client.log_param(run.info.run_id, "p", "another")  # the replayed param will be refused
    dead = tmp_path / "elsewhere" / "refused.jsonl"
    done = subprocess.run(
        [
            CLI,
            "sync",
            str(spool),
            "--tracking-uri",
            mlflow_server.url,
            "--dead-letter-file",
            str(dead),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "dead-lettered 1" in done.stdout, done.stderr
    (line,) = dead.read_text().splitlines()
    assert json.loads(line)["call"] == "log_params"
    assert not (spool / "dead-letter.jsonl").exists()


def test_log_lines_can_be_json(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run(
        [CLI, "--log-format", "json", "run", "--task", "t", "--environment", "e", "--steps", "5"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    ours = [json.loads(x) for x in done.stderr.splitlines() if x.startswith('{"time"')]
    (connected,) = [x for x in ours if x["event"] == "connected"]
    assert connected["level"] == "info" and connected["experiment"] == "rlm-code-rlm"
