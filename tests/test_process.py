"""Whole-process behaviour: mlflow missing or broken, and the close at interpreter exit."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from conftest import Readback


def run_python(code: str, *, env_path: Path | None = None, timeout: float = 60) -> Any:
    """Run ``code`` in a fresh interpreter; it prints one line ``RESULT <json>``."""
    import os

    env = dict(os.environ)
    if env_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(env_path), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    (result,) = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(result.removeprefix("RESULT "))


HOOKS = """
import json, threading, time
from rlm_mlflow import MLflowSink
sink = MLflowSink(True, experiment="exp", tracking_uri="sqlite:////nonexistent/never.db")
started = time.perf_counter()
sink.on_run_start("r", task="t", environment="e", params={"a": 1})
for step in range(1000):
    sink.on_step("r", event={"step": step, "reward": 1.0}, cumulative_reward=step)
sink.on_run_end("r", result=None, run_path="/nonexistent")
hooks_s = time.perf_counter() - started
flushed = sink.flush(timeout=20)
closed = sink.close(timeout=20)
print("RESULT", json.dumps({"status": sink.status(), "hooks_s": hooks_s, "flushed": flushed,
                  "closed": closed, "threads": threading.active_count()}))
"""


def test_without_mlflow_the_sink_says_so_and_hooks_do_nothing() -> None:
    # sys.modules[name] = None is how Python itself marks a module as unimportable.
    out = run_python("import sys; sys.modules['mlflow'] = None\n" + HOOKS)
    assert out["status"] == {
        "name": "mlflow",
        "enabled": True,
        "available": False,
        "detail": "unavailable: No module named 'mlflow'",
        "experiment": "exp",
    }
    assert out["threads"] == 1  # no worker was started
    assert out["hooks_s"] < 0.5
    assert out["flushed"] and out["closed"]


def test_a_broken_mlflow_install_is_reported_and_events_are_counted_as_dropped(
    tmp_path: Path,
) -> None:
    broken = tmp_path / "shadow" / "mlflow"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('mlflow is half-installed')\n")
    out = run_python(HOOKS, env_path=tmp_path / "shadow")
    status = out["status"]
    assert status["available"] is False
    assert status["detail"] == "unavailable: mlflow is half-installed"
    assert status["delivered"] == 0
    assert status["dropped"] == 1002  # every event is accounted for
    assert status["pending"] == 0
    assert out["hooks_s"] < 0.5


def test_a_process_that_forgets_to_close_still_delivers_at_exit(
    tracking_uri: str, experiment: str, readback: Readback, tmp_path: Path
) -> None:
    out = run_python(f"""
        import json
        from rlm_mlflow import MLflowSink
        sink = MLflowSink(True, experiment={experiment!r}, tracking_uri={tracking_uri!r},
                          flush_interval=60)
        sink.on_run_start("ended", task="t", environment="e", params={{}})
        sink.on_run_start("open", task="t", environment="e", params={{}})
        for step in range(500):
            sink.on_step("ended", event={{"step": step, "reward": 1.0}},
                         cumulative_reward=step + 1.0)
            if step < 100:
                sink.on_step("open", event={{"step": step, "reward": 0.5}},
                             cumulative_reward=0.5 * step)
        sink.on_run_end("ended", result={{"completed": True, "steps": 500,
                                         "total_reward": 500.0}}, run_path=None)
        print("RESULT", json.dumps("exiting without close"))
    """)
    assert out == "exiting without close"
    runs = readback.runs()
    assert runs["ended"].info.status == "FINISHED"
    assert runs["ended"].data.metrics["total_reward"] == 500.0
    assert len(readback.history(runs["ended"], "step_reward")) == 500
    assert runs["open"].info.status == "KILLED"
    assert len(readback.history(runs["open"], "cumulative_reward")) == 100
