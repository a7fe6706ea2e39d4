"""Whole-process behaviour: mlflow missing or broken, and the close at interpreter exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import Readback
from support.children import python_result, result_of, run_python
from support.servers import MlflowServer

from rlm_mlflow import MLflowSink

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
    out = python_result("import sys; sys.modules['mlflow'] = None\n" + HOOKS, timeout=60)
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
    shadowed = [str(tmp_path / "shadow"), os.environ.get("PYTHONPATH")]  # first on sys.path
    out = python_result(
        HOOKS, env={"PYTHONPATH": os.pathsep.join(filter(None, shadowed))}, timeout=60
    )
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
    out = python_result(
        f"""
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
    """,
        timeout=60,
    )
    assert out == "exiting without close"
    runs = readback.runs()
    assert runs["ended"].info.status == "FINISHED"
    assert runs["ended"].data.metrics["total_reward"] == 500.0
    assert len(readback.history(runs["ended"], "step_reward")) == 500
    assert runs["open"].info.status == "KILLED"
    assert len(readback.history(runs["open"], "cumulative_reward")) == 100


SIGTERMED = """
import os, signal, sys, time
{user_handler}
from rlm_mlflow import MLflowSink
sink = MLflowSink(True, experiment={experiment!r}, tracking_uri={uri!r}, flush_interval=60)
sink.on_run_start("terminated", task="t", environment="e", params={{}})
for step in range(300):
    sink.on_step("terminated", event={{"step": step, "reward": 1.0}}, cumulative_reward=step)
print("READY", flush=True)
time.sleep(60)
"""

USER_HANDLER = """
def handler(signum, frame):
    open({marker!r}, "w").write("user handler ran")
    sys.exit(3)
signal.signal(signal.SIGTERM, handler)
"""


@pytest.mark.parametrize("with_user_handler", [False, True])
def test_sigterm_delivers_what_was_logged_and_then_chains_to_the_previous_handler(
    mlflow_server: MlflowServer, experiment: str, tmp_path: Path, with_user_handler: bool
) -> None:
    marker = tmp_path / "marker"
    user_handler = USER_HANDLER.format(marker=str(marker)) if with_user_handler else ""
    code = SIGTERMED.format(user_handler=user_handler, experiment=experiment, uri=mlflow_server.url)
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    for line in child.stdout:
        if line.strip() == "READY":
            break
    child.send_signal(signal.SIGTERM)
    returncode = child.wait(timeout=60)

    if with_user_handler:
        assert returncode == 3 and marker.read_text() == "user handler ran"
    else:
        assert returncode == -signal.SIGTERM  # it still dies of the signal, as without us
    readback = Readback(mlflow_server.url, experiment)
    run = readback.runs()["terminated"]
    assert len(readback.history(run, "step_reward")) == 300
    assert run.info.status == "KILLED"


def test_a_forked_child_starts_clean_and_neither_process_sends_the_others_events(
    mlflow_server: MlflowServer, experiment: str
) -> None:
    sink = MLflowSink(
        True, experiment=experiment, tracking_uri=mlflow_server.url, flush_interval=60
    )
    sink.on_run_start("parent", task="t", environment="e", params={})
    for step in range(100):  # still in the buffer when we fork
        sink.on_step("parent", event={"step": step, "reward": 1.0}, cumulative_reward=step)
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            sink.on_run_start("child", task="t", environment="e", params={})
            for step in range(50):
                sink.on_step(
                    "child", event={"step": step, "reward": 2.0}, cumulative_reward=step * 2.0
                )
            sink.on_run_end(
                "child",
                result={"completed": True, "steps": 50, "total_reward": 100.0},
                run_path=None,
            )
            code = 0 if sink.close(timeout=30) and sink.status()["delivered"] == 52 else 2
        finally:
            os._exit(code)
    _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0
    sink.on_run_end(
        "parent", result={"completed": True, "steps": 100, "total_reward": 1.0}, run_path=None
    )
    assert sink.close(timeout=30)

    readback = Readback(mlflow_server.url, experiment)
    runs = readback.runs()
    assert sorted(runs) == ["child", "parent"]
    assert [m.step for m in readback.history(runs["parent"], "step_reward")] == list(range(100))
    assert [m.step for m in readback.history(runs["child"], "step_reward")] == list(range(50))
    assert {r.info.status for r in runs.values()} == {"FINISHED"}


PORTABLE = """
import os, sys, json, logging
logging.basicConfig(level=logging.ERROR, format="%(message)s")
sys.modules["fcntl"] = None  # what Windows lacks: hidden, as if we were there
for name in ("fork", "register_at_fork", "pwrite", "pread", "fchmod", "O_CLOEXEC"):
    delattr(os, name)
from rlm_mlflow import MLflowSink
from rlm_mlflow._spill import Spill
spill = Spill(__import__("pathlib").Path({spill!r}))
from rlm_mlflow._event import Step
for i in range(3):
    spill.push(Step("r", i, 0.5, 0.5, 1.0))
popped = [e.step for e in spill.pop(10)]
statuses = []
for spool in ({spool!r}, ""):
    sink = MLflowSink(True, experiment={experiment!r}, tracking_uri={uri!r}, spool_dir=spool)
    run_id = "with-spool" if spool else "without"
    sink.on_run_start(run_id, task="t", environment="e", params={{}})
    for i in range(5):
        sink.on_step(run_id, event={{"step": i, "reward": 1.0}}, cumulative_reward=float(i))
    sink.on_run_end(run_id, result={{"completed": True}}, run_path=None)
    assert sink.close(timeout=60)
    statuses.append(sink.status()["delivered"])
print("RESULT", json.dumps({{"popped": popped, "delivered": statuses}}))
"""


def test_the_sink_imports_and_works_without_the_posix_only_names(
    tmp_path: Path, embedded_uri: str, experiment: str
) -> None:
    code = PORTABLE.format(
        spill=str(tmp_path / "spill.log"),
        spool=str(tmp_path / "spool"),
        experiment=experiment,
        uri=embedded_uri,
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    result = result_of(done)
    assert result == {"popped": [0, 1, 2], "delivered": [7, 7]}
    # the one piece that cannot work there is refused, in one clear line; the rest works
    assert "spool_dir refused: the sink runs without a spool" in done.stderr
    assert "no file locking" in done.stderr
    runs = Readback(embedded_uri, experiment).runs()
    assert sorted(runs) == ["with-spool", "without"]


FORGOTTEN_TASK_SINK = """
import json, anyio
from rlm_mlflow import MLflowSink
sink = MLflowSink(True, experiment={experiment!r}, tracking_uri={uri!r}, worker="task")

async def benchmark():
    {enter}
    sink.on_run_start("forgotten", task="t", environment="e", params={{}})
    for step in range(50):
        await anyio.sleep(0)  # the awaited LLM call
        sink.on_step("forgotten", event={{"step": step, "reward": 1.0}}, cumulative_reward=step)

anyio.run(benchmark, backend={backend!r})
print("RESULT", json.dumps("the loop is gone, the sink was never closed"))
"""


@pytest.mark.parametrize(
    ("backend", "enter"),
    [
        pytest.param("asyncio", "pass  # no worker ever ran", id="asyncio-never-entered"),
        pytest.param("trio", "pass  # no worker ever ran", id="trio-never-entered"),
        pytest.param(
            "asyncio",
            "await sink.__aenter__()  # never exited: asyncio.run cancels the worker task",
            id="asyncio-never-exited",
        ),
    ],
)
def test_a_task_mode_sink_never_closed_still_ends_its_runs_at_exit(
    tracking_uri: str, experiment: str, readback: Readback, backend: str, enter: str
) -> None:
    script = FORGOTTEN_TASK_SINK.format(
        experiment=experiment, uri=tracking_uri, backend=backend, enter=enter
    )
    out = python_result(script, timeout=60)
    assert out == "the loop is gone, the sink was never closed"
    run = readback.runs()["forgotten"]
    assert run.info.status == "KILLED"
    assert [m.step for m in readback.history(run, "step_reward")] == list(range(50))


SIGTERM_IN_THE_LOOP = """
import json, os, signal, anyio
from rlm_mlflow import MLflowSink
said = []
signal.signal(signal.SIGTERM, lambda signum, frame: said.append("user handler"))
threaded = MLflowSink(True, experiment={experiment!r}, tracking_uri={uri!r})  # our handler
tasked = MLflowSink(True, experiment={experiment!r}, tracking_uri={uri!r}, worker="task")

async def benchmark():
    async with tasked:
        tasked.on_run_start("tasked", task="t", environment="e", params={{}})
        for step in range(20):
            if step == 10:  # the handler runs in this thread, inside the worker's loop
                os.kill(os.getpid(), signal.SIGTERM)
                assert said == ["user handler"]
            tasked.on_step("tasked", event={{"step": step, "reward": 1.0}}, cumulative_reward=1.0)
        result = {{"completed": True, "steps": 20, "total_reward": 20.0}}
        tasked.on_run_end("tasked", result=result, run_path=None)

anyio.run(benchmark)
print("RESULT", json.dumps({{"tasked": tasked.status(), "threaded": threaded.closed}}))
"""


def test_a_sigterm_inside_the_loop_of_a_task_mode_worker_leaves_that_sink_to_its_block(
    embedded_uri: str, experiment: str
) -> None:
    # The handler cannot drive the loop it interrupts: it closes the other sinks, calls the
    # user's handler, and the task-mode sink goes on until its `async with` closes it.
    code = SIGTERM_IN_THE_LOOP.format(experiment=experiment, uri=embedded_uri)
    out = python_result(code, timeout=60)
    assert out["threaded"] is True  # closed by the handler
    status = out["tasked"]
    assert status["closed"] and status["delivered"] == 22 and status["dropped"] == 0
    run = Readback(embedded_uri, experiment).runs()["tasked"]
    assert run.info.status == "FINISHED"
