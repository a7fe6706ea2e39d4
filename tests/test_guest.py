"""A guest in someone else's process: it prints nothing, changes no process-wide setting the
host's own MLflow calls depend on, can be silenced with `logging`, and never deadlocks its
host on SIGTERM (each case in a fresh interpreter)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from support.children import result_of, run_python
from support.servers import MlflowServer, free_port

GUEST = """
import json, os
before = {{k: v for k, v in os.environ.items() if k.startswith("MLFLOW")}}
from rlm_mlflow import MLflowSink
sink = MLflowSink(True, experiment={experiment!r}, tracking_uri={url!r})
sink.on_run_start("ours", task="t", environment="e", params={{}})
sink.on_step("ours", event={{"step": 0, "reward": 1.0}}, cumulative_reward=1.0)
sink.on_run_end("ours", result={{"completed": True}}, run_path="/nonexistent/path.jsonl")
assert sink.close(timeout=60)
after = {{k: v for k, v in os.environ.items() if k.startswith("MLFLOW")}}
import mlflow
from mlflow.environment_variables import (
    MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT,
    MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT,
)
client = mlflow.MlflowClient({url!r})
run = client.create_run(client.get_experiment_by_name({experiment!r}).experiment_id)
client.set_terminated(run.info.run_id)  # MLflow's default: a "View run" line on stdout
print("RESULT", json.dumps({{
    "env_unchanged": before == after,
    "retries": MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(),
    "timeout": MLFLOW_HTTP_REQUEST_TIMEOUT.get(),
    "suppress": MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.get(),
}}))
"""


def test_the_hosts_own_mlflow_keeps_its_defaults_and_we_print_nothing(
    mlflow_server: MlflowServer, experiment: str
) -> None:
    done = run_python(GUEST.format(experiment=experiment, url=mlflow_server.url))
    assert done.returncode == 0, done.stderr
    result = result_of(done)
    assert result == {"env_unchanged": True, "retries": 7, "timeout": 120, "suppress": False}
    # MLflow's lines for the host's own run; none for ours, nothing else at all from us
    others = [x for x in done.stdout.splitlines() if not x.startswith("RESULT ")]
    assert [x.split()[1:3] for x in others] == [["View", "run"], ["View", "experiment"]]
    assert "View run ours" not in done.stdout
    assert "run_path does not exist" not in done.stderr and "connected" not in done.stderr


HOST_LOGGING = """
import logging
logging.basicConfig(level=logging.INFO, format="HOST %(name)s %(levelname)s %(message)s")
logging.getLogger("rlm_mlflow").setLevel({level})
from rlm_mlflow import MLflowSink
sink = MLflowSink(True, experiment={experiment!r}, tracking_uri={url!r})
sink.on_run_start("r", task="t", environment="e", params={{"nested": {{"a": 1}}}})
sink.on_run_end("r", result={{"completed": True}}, run_path="/nonexistent/path.jsonl")
assert sink.close(timeout=60)
"""


@pytest.mark.parametrize("level", ["logging.INFO", "logging.ERROR"])
def test_the_host_decides_what_our_log_lines_look_like_and_can_silence_them(
    embedded_uri: str, experiment: str, level: str
) -> None:
    done = run_python(HOST_LOGGING.format(experiment=experiment, url=embedded_uri, level=level))
    assert done.returncode == 0, done.stderr
    ours = [x for x in done.stderr.splitlines() if x.startswith("HOST rlm_mlflow ")]
    if level == "logging.INFO":
        assert any("INFO connected" in x for x in ours)
        assert any("WARNING run_path does not exist" in x and "run_id='r'" in x for x in ours)
        assert any("WARNING parts of an event not logged" in x for x in ours)
    else:
        assert ours == []
    assert done.stdout == ""


SIGTERMED = """
import signal, sys, threading, time
from rlm_mlflow import MLflowSink
sink = MLflowSink(True, experiment="x", tracking_uri={url!r}, close_timeout=3,
                  queue_size=10, put_timeout=60)
sink.on_run_start("r", task="t", environment="e", params={{}})
print("handler", signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL, flush=True)

def say_when_inside(names):  # prints "inside" once the main thread waits in the action
    main = threading.main_thread().ident
    while True:
        frame, stack = sys._current_frames().get(main), set()
        while frame is not None:
            stack.add(frame.f_code.co_name)
            frame = frame.f_back
        if "wait" in stack and stack & names:
            print("inside", flush=True)
            return
        time.sleep(0.005)

threading.Thread(target=say_when_inside, args=({inside!r},), daemon=True).start()
{action}
print("not reached", flush=True)
"""
ACTIONS = {
    "during-close": "sink.close(timeout=60)",
    "during-flush": "sink.flush(timeout=60)",
    "during-a-blocked-hook": (
        "for i in range(100):\n"
        "    sink.on_step('r', event={'step': i, 'reward': 1.0}, cumulative_reward=1.0)"
    ),
}
#: The function the main thread waits in, in each action (the child says when it is there).
INSIDE = {
    "during-close": {"close"},
    "during-flush": {"flush"},
    "during-a-blocked-hook": {"_wait_for_room"},
}


@pytest.mark.parametrize("action", sorted(ACTIONS))
def test_sigterm_never_deadlocks_and_exits_within_the_close_timeout(action: str) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # unreachable: every wait runs to its end
    code = textwrap.dedent(SIGTERMED.format(url=url, action=ACTIONS[action], inside=INSIDE[action]))
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().split() == ["handler", "True"]
        assert process.stdout.readline().split() == ["inside"]  # the child says where it is
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=3 + 10)
        took = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert returncode == -signal.SIGTERM  # died of the signal, as it would have without us
    assert took < 3 + 3, f"{action}: exit took {took:.1f} s after SIGTERM"


def test_sigterm_handling_can_be_turned_off() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code = textwrap.dedent(
        SIGTERMED.format(url=url, action=ACTIONS["during-flush"], inside=INSIDE["during-flush"])
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "DSPY_RLM_MLFLOW_HANDLE_SIGTERM": "false"},
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().split() == ["handler", "False"]
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == -signal.SIGTERM
        assert time.monotonic() - sent < 1.0  # the default action: at once, no close
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
