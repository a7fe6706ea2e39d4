"""The async face, on asyncio and on trio: hooks from tasks, aflush, and `async with`."""

from __future__ import annotations

import threading
import time

import anyio
import pytest
from conftest import Readback

from rlm_mlflow import MLflowSink


async def agent(sink: MLflowSink, run_id: str, steps: int) -> None:
    """An async RLM loop: it awaits its LLM calls between steps."""
    sink.on_run_start(run_id, task="t", environment="async", params={"model": "m"})
    total = 0.0
    for step in range(steps):
        await anyio.sleep(0)  # the awaited LLM call
        total += 0.5
        sink.on_step(run_id, event={"step": step, "reward": 0.5}, cumulative_reward=total)
    sink.on_run_end(
        run_id, result={"completed": True, "steps": steps, "total_reward": total}, run_path=None
    )


def assert_landed(readback: Readback, run_ids: list[str], steps: int) -> None:
    runs = readback.runs()
    assert sorted(runs) == sorted(run_ids)
    for run in runs.values():
        assert [m.step for m in readback.history(run, "step_reward")] == list(range(steps))
        assert run.info.status == "FINISHED"


@pytest.mark.anyio
async def test_hooks_from_tasks_with_the_worker_in_its_thread(
    tracking_uri: str, experiment: str, readback: Readback
) -> None:
    async with MLflowSink(True, experiment=experiment, tracking_uri=tracking_uri) as sink:
        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(agent, sink, f"a{i}", 200)
        assert await sink.aflush(timeout=60)
        assert sink.status()["pending"] == 0
    assert sink.status()["closed"]
    assert_landed(readback, [f"a{i}" for i in range(4)], 200)


@pytest.mark.anyio
async def test_the_worker_can_run_as_a_task_of_the_callers_loop(
    tracking_uri: str, experiment: str, readback: Readback
) -> None:
    before = {t.name for t in threading.enumerate()}
    async with MLflowSink(
        True, experiment=experiment, tracking_uri=tracking_uri, worker="task"
    ) as sink:
        assert "rlm-mlflow" not in {t.name for t in threading.enumerate()} - before
        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(agent, sink, f"t{i}", 300)
        assert await sink.aflush(timeout=60)
        landed = sink.status()["delivered"]
        assert landed == 3 * 302
    assert_landed(readback, [f"t{i}" for i in range(3)], 300)


@pytest.mark.anyio
async def test_a_full_buffer_never_blocks_the_loop_the_worker_runs_in(
    embedded_uri: str, experiment: str
) -> None:
    # block with a 5 s put timeout would freeze a loop whose own task must drain the buffer:
    # in task mode a full buffer drops (counted) at once instead.
    async with MLflowSink(
        True,
        experiment=experiment,
        tracking_uri=embedded_uri,
        worker="task",
        queue_size=100,
        put_timeout=5.0,
    ) as sink:
        sink.on_run_start("burst", task="t", environment="e", params={})
        started = time.perf_counter()
        for step in range(1_000):  # no await: the worker gets no chance to drain
            sink.on_step("burst", event={"step": step, "reward": 1.0}, cumulative_reward=1.0)
        assert time.perf_counter() - started < 2.0
        assert sink.status()["dropped"] > 0
        sink.on_run_end(
            "burst", result={"completed": True, "steps": 1000, "total_reward": 1.0}, run_path=None
        )
    status = sink.status()
    assert status["pending"] == 0
    assert status["delivered"] + status["dropped"] == 1_002


@pytest.mark.anyio
async def test_a_task_cancelled_inside_async_with_still_closes_its_task_mode_sink(
    tracking_uri: str, experiment: str, readback: Readback
) -> None:
    sink = MLflowSink(True, experiment=experiment, tracking_uri=tracking_uri, worker="task")
    logged = anyio.Event()

    async def benchmark() -> None:
        async with sink:
            sink.on_run_start("cancelled", task="t", environment="e", params={})
            for step in range(100):
                sink.on_step(
                    "cancelled", event={"step": step, "reward": 1.0}, cumulative_reward=1.0
                )
            logged.set()
            await anyio.sleep_forever()  # cancelled here, its run never ended

    async with anyio.create_task_group() as tg:
        tg.start_soon(benchmark)
        await logged.wait()
        tg.cancel_scope.cancel()
    status = sink.status()
    assert status["closed"] and status["pending"] == 0
    assert status["delivered"] == 101 and status["failed"] == 0
    run = readback.runs()["cancelled"]
    assert run.info.status == "KILLED"
    assert [m.step for m in readback.history(run, "step_reward")] == list(range(100))


def test_a_batch_cut_off_mid_send_when_its_loop_goes_is_sent_again_once() -> None:
    """asyncio.run() ends with the task-mode worker inside a log_batch call: the close that
    follows (here; at exit it is the same) sends that batch again, without a second run."""
    from support.memory import MemoryExporter

    class Gated(MemoryExporter):
        def __init__(self) -> None:
            super().__init__()
            self.inside, self.release = threading.Event(), threading.Event()

        def log_metrics(self, run_id, rows):  # type: ignore[no-untyped-def]
            if not self.release.is_set():
                self.inside.set()
                self.release.wait(30)
                raise ConnectionResetError("the loop that sent this is gone")
            super().log_metrics(run_id, rows)

    exporter = Gated()
    sink = MLflowSink(True, experiment="e", worker="task", exporter=exporter, flush_interval=0.05)

    async def main() -> None:
        await sink.__aenter__()  # and never __aexit__: the loop just ends
        sink.on_run_start("cut", task="t", environment="async", params={})
        for step in range(100):
            sink.on_step("cut", event={"step": step, "reward": 0.5}, cumulative_reward=step / 2)
        sink.on_run_end(
            "cut", result={"completed": True, "steps": 100, "total_reward": 50.0}, run_path=None
        )
        await anyio.to_thread.run_sync(exporter.inside.wait, 30)

    import asyncio

    asyncio.run(main())
    exporter.release.set()
    assert sink.close(timeout=20)
    status = sink.status()
    assert (status["delivered"], status["failed"], status["pending"]) == (102, 0, 0)
    (run,) = exporter.by_run_id().values()
    assert exporter.steps(run) == list(range(100)) and run.status == "FINISHED"
