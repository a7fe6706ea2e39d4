"""rlm-code with no code change: `autolog()` and `rlm-mlflow instrument`, against the real
rlm-code runner (a scripted connector, no LLM) and real MLflow stores."""

from __future__ import annotations

import getpass
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Readback
from support.children import CLI, run_python
from support.scripted_rlm import CHILD_STEPS, ROOT_STEPS, RUN_COUNT, ScriptedConnector, run_scripted

import rlm_mlflow
from rlm_mlflow import MLflowSink

TESTS = Path(__file__).parent


def instrument(*command: str, env: dict[str, str] | None = None) -> Any:
    """``rlm-mlflow instrument -- COMMAND...``, run to its end."""
    return subprocess.run(
        [CLI, "instrument", "--", *command],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=False,
    )


def trajectories(runs_dir: Path) -> dict[str, dict[str, Any]]:
    """What rlm-code wrote for each RLM run: its steps and its final line, by run id."""
    runs: dict[str, dict[str, Any]] = {}
    for path in runs_dir.glob("*.jsonl"):
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        (final,) = [line for line in lines if line["type"] == "final"]
        steps = [line for line in lines if line["type"] == "step"]
        runs[final["run_id"]] = {"final": final, "steps": steps, "path": path}
    return runs


def assert_landed(readback: Readback, runs_dir: Path) -> dict[str, Any]:
    """Every RLM run exactly once in MLflow, children nested, every step once, FINISHED."""
    expected = trajectories(runs_dir)
    assert len(expected) == RUN_COUNT
    landed = readback.runs()
    # exactly one MLflow run per RLM run: rlm-code's own sink made none
    assert sorted(landed) == sorted(expected)
    (root_id,) = [rid for rid, run in expected.items() if run["final"]["depth"] == 0]
    for run_id, run in expected.items():
        mlflow_run = landed[run_id]
        final = run["final"]
        assert mlflow_run.info.status == "FINISHED"
        assert mlflow_run.info.run_name == run_id
        if final["depth"] == 0:
            assert "mlflow.parentRunId" not in mlflow_run.data.tags
            assert len(run["steps"]) == ROOT_STEPS
        else:
            assert final["parent_run_id"] == root_id
            assert mlflow_run.data.tags["mlflow.parentRunId"] == landed[root_id].info.run_id
            assert mlflow_run.data.params["parent_run_id"] == root_id
            assert len(run["steps"]) == CHILD_STEPS
        assert mlflow_run.data.params["depth"] == str(final["depth"])
        assert mlflow_run.data.tags["component"] == "rlm-code-rlm"
        rewards = [step["reward"] for step in run["steps"]]
        step_reward = readback.history(mlflow_run, "step_reward")
        assert [(m.step, m.value) for m in step_reward] == [
            (step["step"], step["reward"]) for step in run["steps"]
        ]
        cumulative = readback.history(mlflow_run, "cumulative_reward")
        assert [m.step for m in cumulative] == [step["step"] for step in run["steps"]]
        running = [sum(rewards[: i + 1]) for i in range(len(rewards))]
        assert [m.value for m in cumulative] == pytest.approx(running)
        metrics = mlflow_run.data.metrics
        assert metrics["completed"] == 1.0
        assert metrics["steps"] == final["steps"] == len(run["steps"])
        assert metrics["total_reward"] == pytest.approx(final["total_reward"])
        assert readback.artifacts(mlflow_run) == [run["path"].name]
    return landed


@pytest.fixture
def rlm_env(monkeypatch: pytest.MonkeyPatch, tracking_uri: str, experiment: str) -> None:
    """rlm-code's MLflow setup guide: the three variables."""
    monkeypatch.setenv("DSPY_RLM_MLFLOW_ENABLED", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.setenv("DSPY_RLM_MLFLOW_EXPERIMENT", experiment)


@pytest.fixture
def autologged(rlm_env: None) -> Iterator[None]:
    assert rlm_mlflow.autolog() is True
    assert rlm_mlflow.autolog() is True  # idempotent
    yield
    rlm_mlflow.autolog(disable=True)


def test_rlm_code_runner_sends_every_run_once_through_our_sink(
    autologged: None, tmp_path: Path, readback: Readback
) -> None:
    from rlm_code.rlm import observability as rlm_obs
    from rlm_code.rlm.observability import RLMObservability

    connector = ScriptedConnector()
    run_scripted(tmp_path, connector=connector)  # no observability argument: default()
    assert connector.children_overlapped()  # the two children really ran in parallel
    observability = RLMObservability.default(workdir=tmp_path, run_dir=tmp_path / "runs")
    mlflow_sinks = [sink for sink in observability.sinks if sink.name == "mlflow"]
    assert len(mlflow_sinks) == 1 and isinstance(mlflow_sinks[0], rlm_obs.MLflowSink)
    assert isinstance(mlflow_sinks[0].shared, MLflowSink)  # ours behind rlm-code's class
    sink = mlflow_sinks[0]
    assert sink.close(timeout=60)
    status = sink.status()
    # 3 starts + 11 steps + 3 ends, nothing lost or refused
    assert status["delivered"] == RUN_COUNT * 2 + ROOT_STEPS + 2 * CHILD_STEPS
    assert status["pending"] == 0 and status["rejected"] == 0 and status["dead_lettered"] == 0
    landed = assert_landed(readback, tmp_path / "runs")
    for run in landed.values():  # what mlflow.start_run would have set: "Created by", "Source"
        assert run.data.tags["mlflow.user"] == getpass.getuser()
        assert run.data.tags["mlflow.source.type"] == "LOCAL"
        assert run.data.tags["mlflow.source.name"]


def test_runners_of_a_process_share_one_forwarder_per_destination(
    autologged: None, tmp_path: Path, experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rlm_code.rlm.observability import RLMObservability

    def workers() -> int:
        return sum(1 for t in threading.enumerate() if t.name == "rlm-mlflow")

    before = workers()
    sinks = [  # each slot holds an rlm-code MLflowSink; behind them, one of ours
        RLMObservability.default(workdir=tmp_path, run_dir=tmp_path / "runs")
        .get_sink("mlflow")
        .shared
        for _ in range(100)
    ]
    assert len({id(sink) for sink in sinks}) == 1
    assert workers() == before + 1
    # another experiment is another destination: a sink of its own
    monkeypatch.setenv("DSPY_RLM_MLFLOW_EXPERIMENT", experiment + "-other")
    other = RLMObservability.default(workdir=tmp_path, run_dir=tmp_path / "runs")
    assert other.get_sink("mlflow").shared is not sinks[0]
    for sink in (sinks[0], other.get_sink("mlflow").shared):
        assert isinstance(sink, MLflowSink) and sink.close(timeout=30)
    # a closed destination gets a fresh sink, not a closed one
    monkeypatch.setenv("DSPY_RLM_MLFLOW_EXPERIMENT", experiment)
    again = RLMObservability.default(workdir=tmp_path, run_dir=tmp_path / "runs")
    fresh = again.get_sink("mlflow").shared
    assert isinstance(fresh, MLflowSink) and fresh is not sinks[0] and not fresh.closed
    fresh.close(timeout=30)


def test_disable_gives_the_slot_back_to_rlm_code(tmp_path: Path) -> None:
    from rlm_code.rlm import observability

    original = observability.MLflowSink
    assert rlm_mlflow.autolog()
    assert observability.MLflowSink is not original
    assert rlm_mlflow.autolog(disable=True)
    assert observability.MLflowSink is original
    built = observability.RLMObservability.default(workdir=tmp_path, run_dir=tmp_path / "runs")
    sink = built.get_sink("mlflow")
    assert isinstance(sink, original) and not isinstance(sink, MLflowSink)


def test_the_patched_name_stays_rlm_codes_class_for_isinstance_and_subclassing(
    autologged: None,
    tmp_path: Path,
    experiment: str,
    tracking_uri: str,
    readback: Readback,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import rlm_code.rlm
    from rlm_code.rlm import observability

    from rlm_mlflow._autolog_sink import AutologSink

    patched = observability.MLflowSink
    original = AutologSink.__bases__[0]
    assert patched is AutologSink and rlm_code.rlm.MLflowSink is patched
    assert isinstance(patched, type) and issubclass(patched, original)
    theirs = original(False, experiment)  # made by rlm-code's class, as before autolog
    assert isinstance(theirs, original) and not isinstance(theirs, patched)  # not ours
    post_inits: list[object] = []  # rlm-code's own set-up (import mlflow, set a global URI)
    monkeypatch.setattr(original, "__post_init__", lambda self: post_inits.append(self))

    slot = observability.RLMObservability.default(
        workdir=tmp_path, run_dir=tmp_path / "runs"
    ).get_sink("mlflow")
    assert isinstance(slot, patched) and isinstance(slot, original)  # no TypeError
    assert isinstance(slot.shared, MLflowSink)
    # rlm-code's constructor and attributes
    made = patched(enabled=True, experiment=experiment, tracking_uri=tracking_uri)
    assert made.shared is slot.shared  # the same destination: the same forwarder
    assert (made.name, made.enabled, made.experiment, made.tracking_uri) == (
        "mlflow",
        True,
        experiment,
        tracking_uri,
    )
    assert made.status()["name"] == "mlflow" and made.status()["experiment"] == experiment
    assert made == made and made != slot and made in {made}  # not rlm-code's field compare
    assert not patched(False, experiment).status()["enabled"]

    seen: list[int] = []

    class Recording(observability.MLflowSink):
        def on_step(self, run_id: str, *, event: dict[str, Any], cumulative_reward: float) -> None:
            seen.append(event["step"])
            super().on_step(run_id, event=event, cumulative_reward=cumulative_reward)

    mine = Recording(True, experiment, tracking_uri)
    assert isinstance(mine, original) and mine.shared is slot.shared  # still one worker
    mine.on_run_start("subclassed", task="t", environment="e", params={})
    for step in range(5):
        mine.on_step("subclassed", event={"step": step, "reward": 1.0}, cumulative_reward=1.0)
    result = {"completed": True, "steps": 5, "total_reward": 5.0}
    mine.on_run_end("subclassed", result=result, run_path=None)
    assert seen == [0, 1, 2, 3, 4]  # the overridden hook ran, each time
    assert mine.close(timeout=60)  # the forwarder's lifecycle, through the instance
    assert slot.closed and post_inits == []
    run = readback.runs()["subclassed"]
    assert run.info.status == "FINISHED"
    assert [m.step for m in readback.history(run, "step_reward")] == [0, 1, 2, 3, 4]

    # Disabled again: rlm-code's class under both names; what was made meanwhile is still
    # an instance of it, and of its subclass's class.
    assert rlm_mlflow.autolog(disable=True)
    assert observability.MLflowSink is original and rlm_code.rlm.MLflowSink is original
    assert isinstance(slot, observability.MLflowSink) and isinstance(mine, Recording)
    assert isinstance(theirs, observability.MLflowSink)


def test_autolog_before_rlm_code_is_imported_patches_it_on_import() -> None:
    done = run_python(
        """
        import sys
        import rlm_mlflow
        assert rlm_mlflow.autolog() is True
        assert "rlm_code" not in sys.modules   # autolog never imports rlm-code itself
        from rlm_code.rlm import observability, MLflowSink
        from rlm_mlflow._autolog_sink import AutologSink
        assert observability.MLflowSink is AutologSink and MLflowSink is AutologSink
        original = AutologSink.__bases__[0]
        assert original.__module__ == "rlm_code.rlm.observability"
        assert rlm_mlflow.autolog(disable=True)
        import rlm_code.rlm
        assert observability.MLflowSink is original and rlm_code.rlm.MLflowSink is original
        print("OK")
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("OK")


def test_autolog_without_rlm_code_returns_false_and_never_raises() -> None:
    # sys.modules[name] = None is how Python marks a module as not importable
    done = run_python(
        """
        import logging, sys
        logging.basicConfig()  # the host shows warnings on stderr
        sys.modules["rlm_code"] = None
        import rlm_mlflow
        print("RESULT", rlm_mlflow.autolog(), rlm_mlflow.autolog(disable=True))
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "RESULT False True"  # the reason is a log line, on stderr
    (line,) = done.stderr.splitlines()
    assert "rlm-code is not installed" in line


SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from support.scripted_rlm import run_scripted
result = run_scripted(Path(sys.argv[1]))
print("RESULT", json.dumps({{"run_id": result.run_id, "steps": result.steps}}))
"""


def test_instrument_runs_an_unchanged_rlm_code_script(
    rlm_env: None, tmp_path: Path, readback: Readback
) -> None:
    # The script lives in a git repository: the runs carry its commit, as with start_run.
    repo = tmp_path / "bench"
    repo.mkdir()
    script = repo / "bench.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)))
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "bench.py"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "bench"], check=True)
    commit = subprocess.run(
        [*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    done = instrument(sys.executable, str(script), str(tmp_path / "work"))
    assert done.returncode == 0, done.stderr
    assert "RESULT" in done.stdout
    assert "rlm-mlflow instrument:" not in done.stderr  # rlm-code was found, nothing to say
    landed = assert_landed(readback, tmp_path / "work" / "runs")
    for run in landed.values():
        assert run.data.tags["mlflow.source.name"] == str(script)
        assert run.data.tags["mlflow.source.git.commit"] == commit


def test_instrument_passes_the_exit_code_through(tmp_path: Path) -> None:
    done = instrument(sys.executable, "-c", "import sys; sys.exit(7)")
    assert done.returncode == 7, done.stderr


def test_instrument_passes_signals_through(tmp_path: Path) -> None:
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGINT, lambda *a: sys.exit(42))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    process = subprocess.Popen(
        [CLI, "instrument", "--", sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        process.send_signal(signal.SIGINT)  # the command's own handler answers
        assert process.wait(timeout=30) == 42
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_instrument_says_in_one_line_when_the_interpreter_has_no_rlm_code(
    tmp_path: Path,
) -> None:
    # The base interpreter of this venv has neither rlm-code nor our dependencies; our
    # package and structlog (all that autolog needs) are given to it by PYTHONPATH.
    base = getattr(sys, "_base_executable", sys.executable)
    probe = subprocess.run(
        [base, "-c", "import importlib.util as u; print(u.find_spec('rlm_code') is None)"],
        capture_output=True,
        text=True,
        check=True,
    )
    if probe.stdout.strip() != "True":
        pytest.skip(f"{base} has rlm-code installed: no interpreter without it here")
    import structlog

    deps = tmp_path / "deps"
    deps.mkdir()
    (deps / "structlog").symlink_to(Path(structlog.__file__).parent)
    src = Path(rlm_mlflow.__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(deps)])}
    done = instrument(base, "-c", "print('ran')", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ran"
    lines = [line for line in done.stderr.splitlines() if "rlm-code was not found" in line]
    assert len(lines) == 1, done.stderr


# -c code that says whether our sitecustomize ran, then exits with a code of its own
RAN = "import sys; print('ran', 'rlm_mlflow' in sys.modules); sys.exit(5)"


def enabled_env() -> dict[str, str]:
    """The environment with the slot on: the only line instrument may say is ours here."""
    return {**os.environ, "DSPY_RLM_MLFLOW_ENABLED": "true"}


@pytest.mark.parametrize("flags", [["-I"], ["-E"], ["-IS"], ["-sE"], ["-X", "dev", "-I"]])
def test_instrument_says_in_one_line_when_python_skips_its_sitecustomize(
    flags: list[str],
) -> None:
    done = instrument(sys.executable, *flags, "-c", RAN, env=enabled_env())
    assert done.returncode == 5  # the command ran, unchanged
    assert done.stdout.split() == ["ran", "False"]  # and indeed without autolog
    (line,) = done.stderr.splitlines()
    assert line.startswith("rlm-mlflow instrument: cannot instrument this command")
    assert "ignores PYTHONPATH" in line and "rlm_mlflow.autolog()" in line
    assert "-I" in line if "I" in "".join(flags) else "-E" in line


@pytest.mark.parametrize(
    "shebang", ["#!{python} -E", "#!/usr/bin/env -S {python} -I"], ids=["path", "env"]
)
def test_instrument_reads_the_shebang_of_a_script_run_by_name(tmp_path: Path, shebang: str) -> None:
    script = tmp_path / "bench"
    script.write_text(shebang.format(python=sys.executable) + "\n" + RAN.replace("; ", "\n"))
    script.chmod(0o755)
    done = instrument(str(script), env=enabled_env())
    assert done.returncode == 5
    assert done.stdout.split() == ["ran", "False"]
    (line,) = done.stderr.splitlines()
    assert "cannot instrument this command" in line and "ignores PYTHONPATH" in line


def test_instrument_says_nothing_for_a_python_that_runs_its_sitecustomize(
    tmp_path: Path,
) -> None:
    script = tmp_path / "bench"
    script.write_text(f"#!{sys.executable} -u\n" + RAN.replace("; ", "\n"))
    script.chmod(0o755)
    for command in ([sys.executable, "-u", "-W", "ignore", "-c", RAN], [str(script)]):
        done = instrument(*command, env=enabled_env())
        assert done.returncode == 5
        assert done.stdout.split() == ["ran", "True"]
        assert done.stderr == ""


@pytest.mark.parametrize(
    ("command", "flags"),
    [
        (["python3", "-I", "x.py"], ["I"]),
        (["/usr/bin/python3.11", "-sEu", "x.py"], ["E"]),
        (["python", "-IS", "-c", "pass"], ["I", "S"]),
        (["python", "-WI", "x.py"], []),  # "I" is -W's argument
        (["python", "-W", "-I", "x.py"], []),  # so is the next word
        (["python", "-X", "dev", "-E", "x.py"], ["E"]),
        (["python", "--check-hash-based-pycs", "always", "-I"], ["I"]),
        (["python", "-c", "-I"], []),  # the code
        (["python", "-m", "bench", "-I"], []),  # the module's own argument
        (["python", "x.py", "-I"], []),  # the script's
        (["python", "-", "-E"], []),
        (["git", "-I"], []),  # not Python
    ],
)
def test_blind_flags_reads_a_pythons_options_only(command: list[str], flags: list[str]) -> None:
    from rlm_mlflow._instrument import blind_flags

    assert blind_flags(command) == flags


@pytest.mark.parametrize(
    ("line", "flags"),
    [
        (b"#!/usr/bin/env python3 -I", ["I"]),  # Linux passes "python3 -I" as one word
        (b"#!/usr/bin/env -S python3 -I", ["I"]),
        (b"#!/usr/bin/env FOO=1 python3 -E", ["E"]),
        (b"#! /opt/py/bin/python -IS", ["I", "S"]),
        (b"#!/usr/bin/python3", []),
        (b"#!/bin/sh -e", []),
        (b"\x7fELF\x02\x01", []),  # a binary
    ],
)
def test_blind_flags_reads_a_scripts_shebang_line(
    tmp_path: Path, line: bytes, flags: list[str]
) -> None:
    from rlm_mlflow._instrument import blind_flags

    script = tmp_path / "bench"
    script.write_bytes(line + b"\nprint(1)\n")
    script.chmod(0o755)
    assert blind_flags([str(script)]) == flags
    assert blind_flags([str(tmp_path / "missing")]) == []


def test_instrument_chains_to_the_sitecustomize_it_shadows(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "sitecustomize.py").write_text("import os\nos.environ['THEIRS_RAN'] = 'yes'\n")
    env = {**os.environ, "PYTHONPATH": str(theirs)}
    code = "import os, rlm_mlflow._autolog as a; print(os.environ.get('THEIRS_RAN'), a.enabled())"
    done = instrument(sys.executable, "-c", code, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["yes", "True"]


def test_instrument_without_a_command_or_with_a_missing_one_says_so() -> None:
    for argv, code in (([], 2), (["--"], 2), (["--", "no-such-command-xyz"], 127)):
        done = subprocess.run(
            [CLI, "instrument", *argv], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == code
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "Traceback" not in done.stderr
