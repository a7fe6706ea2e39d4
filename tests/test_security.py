"""No secret leaves through us: not in status(), log lines, the spool or the dead letters."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Readback, capture_logs
from support.servers import FaultProxy

from rlm_mlflow import MLflowSink

PASSWORD = "pa55-w0rd-SECRET"
TOKEN = "t0ken-SECRET-abcdef"


def test_passwords_and_tokens_are_redacted_everywhere(
    proxy: FaultProxy,
    experiment: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", TOKEN)
    uri = f"http://rlm:{PASSWORD}@127.0.0.1:{proxy.port}"
    spool = tmp_path / "spool"
    proxy.refuse = lambda body: any(int(m["step"]) == 3 for m in body.get("metrics", []))
    proxy.fail(3, 503)  # retries, with the URL in MLflow's error text
    with capture_logs() as logs:
        sink = MLflowSink(True, experiment=experiment, tracking_uri=uri, spool_dir=str(spool))
        sink.on_run_start("secretive", task="t", environment="e", params={"token": "fine"})
        for step in range(10):
            sink.on_step(
                "secretive", event={"step": step, "reward": 1.0}, cumulative_reward=step + 1.0
            )
        sink.on_run_end(
            "secretive",
            result={"completed": True, "steps": 10, "total_reward": 10.0},
            run_path=None,
        )
        assert sink.close(timeout=60)
        status = sink.status()

    assert status["dead_lettered"] == 1 and status["retried"] >= 1  # the paths were taken
    dead_letters = (spool / "dead-letter.jsonl").read_text()
    assert "refused by the test proxy" in dead_letters
    written = [p.read_bytes().decode(errors="replace") for p in spool.rglob("*") if p.is_file()]
    captured = capfd.readouterr()
    for where, text in {
        "status": repr(status),
        "logs": repr(logs),
        "files": repr(written),
        "stdout": captured.out,
        "stderr": captured.err,
    }.items():
        assert PASSWORD not in text, where
        assert TOKEN not in text, where
    assert status["detail"] == f"http://rlm:***@127.0.0.1:{proxy.port}"
    assert "rlm:***@" in repr(logs)  # the URI did reach a log line: masked
    run = Readback(f"http://127.0.0.1:{proxy.target_port}", experiment).runs()["secretive"]
    assert run.info.status == "FINISHED"
