"""`MLflowSink`: rlm-code's sink contract (constructor, hooks, `status()`) on a forwarder.

The hooks are the hot path (`_hooks`): each builds one event and puts it in the buffer. They
never raise, never touch the network or the disk, and never import mlflow. The sink's place in
the process (closed at exit and on SIGTERM, started afresh after fork) is `_process`, where
each sink registers itself.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from time import time
from typing import Any, Literal

import anyio
import anyio.to_thread
from anyio.abc import TaskGroup, TaskStatus

from . import _process
from ._deadletter import DeadLetters
from ._forwarder import Forwarder
from ._hooks import Hooks
from ._log import log
from ._redact import redact_text, redact_uri
from ._replay import SyncSummary, replay_own
from ._settings import DEFAULT_EXPERIMENT, Settings, parse_bool
from ._status import Status, forwarder_status
from .exporters.base import Exporter


class MLflowSink(Hooks):
    """Send RLM runs to MLflow: params and tags at start, two metrics per step, a summary at end.

    ``MLflowSink(enabled, experiment, tracking_uri)`` is rlm-code's constructor. Queue settings
    (see `Settings`) come from keyword arguments, else ``DSPY_RLM_MLFLOW_*``, else defaults.
    ``exporter`` sends through that exporter instead of connecting to MLflow (tests).
    """

    name = "mlflow"

    def __init__(
        self,
        enabled: bool = False,
        experiment: str = DEFAULT_EXPERIMENT,
        tracking_uri: str | None = None,
        *,
        settings: Settings | None = None,
        worker: Literal["thread", "task"] = "thread",
        exporter: Exporter | None = None,
        **overrides: Any,
    ) -> None:
        if worker not in ("thread", "task"):
            raise ValueError(f"worker must be 'thread' or 'task', got {worker!r}")
        self.enabled = enabled
        self._task_mode = worker == "task"  # the worker runs inside `async with sink:`
        self._task_group: TaskGroup | None = None
        self.experiment = experiment
        self.tracking_uri = tracking_uri
        self.settings = (
            Settings.from_env(**overrides) if settings is None else _replace(settings, overrides)
        )
        self._forwarder: Forwarder | None = None
        self._buffer = None  # the forwarder's buffer: the hooks' one attribute lookup
        self._exporter = exporter
        self._unavailable: str | None = None
        self._replayer: threading.Thread | None = None
        self.replayed: SyncSummary | None = None  # what the start-up replay of the spool did
        if not enabled:
            return
        if exporter is None and importlib.util.find_spec("mlflow") is None:
            self._unavailable = "unavailable: No module named 'mlflow'"
            log.warning(
                "mlflow is not installed; the MLflow sink does nothing",
                hint="pip install 'rlm-mlflow[mlflow]'",
            )
            return
        self.dead_letters = DeadLetters(_dead_letter_path(self.settings))
        if self.settings.traces:  # the hot path stays one function, without a test of the mode
            self.on_step = self._on_step_traced  # type: ignore[method-assign]
        self._start_forwarder(replay_orphans=True)
        _process.track(self)  # a task-mode one too: its loop may be gone before it is closed
        if not self._task_mode and self.settings.handle_sigterm:
            _process.install_sigterm_handler()

    def _start_forwarder(self, *, replay_orphans: bool) -> None:
        """Buffer, worker, and (with a spool) this process's own journal."""
        forwarder = Forwarder(
            self.settings,
            self.tracking_uri,
            self.experiment,
            self.dead_letters,
            exporter=self._exporter,
            park=not self._task_mode,
        )
        self._forwarder, self._buffer = forwarder, forwarder.buffer
        if forwarder.journal is not None and replay_orphans:
            self._replayer = threading.Thread(
                target=self._replay_orphans, name="rlm-mlflow-sync", daemon=True
            )
            self._replayer.start()
        if not self._task_mode:
            forwarder.worker.start()

    def _replay_orphans(self) -> None:
        """Deliver what dead processes left in the spool for this sink's destination (runs
        beside the live worker); other destinations' journals wait for `rlm-mlflow sync`."""
        try:
            self.replayed = replay_own(
                Path(self.settings.spool_dir),
                self.tracking_uri,
                self.experiment,
                self.settings,
                self.dead_letters,
            )
        except Exception as exc:  # never into the caller; say it
            log.exception("replay of the spool failed", error=redact_text(str(exc)))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> MLflowSink:
        """rlm-code's activation: ``DSPY_RLM_MLFLOW_ENABLED``, ``MLFLOW_TRACKING_URI``,
        ``DSPY_RLM_MLFLOW_EXPERIMENT``, plus one ``DSPY_RLM_MLFLOW_*`` per queue setting."""
        env = os.environ if environ is None else environ
        return cls(
            enabled=parse_bool(env.get("DSPY_RLM_MLFLOW_ENABLED")),
            experiment=env.get("DSPY_RLM_MLFLOW_EXPERIMENT") or DEFAULT_EXPERIMENT,
            tracking_uri=env.get("MLFLOW_TRACKING_URI") or None,
            settings=Settings.from_env(env, **overrides),
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every event accepted so far is finished (delivered or counted as lost).

        Returns False, and logs how many events are still pending, if ``timeout`` (default:
        the ``close_timeout`` setting) passes first.
        """
        if self._forwarder is None:
            return True
        return self._forwarder.flush(self.settings.close_timeout if timeout is None else timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Flush, end every run still open as KILLED, and stop the worker. Idempotent.

        Returns True when everything accepted was finished in time. When ``timeout`` (default:
        the ``close_timeout`` setting) runs out first, its last seconds (`last_attempt_reserve`)
        go to a last attempt that ends every run (FINISHED with its summary if its end came,
        else KILLED; terminated first, summaries after; it may take up to a second past the
        timeout), and every event not delivered is counted failed (or spooled): nothing stays
        pending. Hooks called after close do nothing (each is counted as dropped).
        """
        return _process.close_sinks([self], timeout)

    def __enter__(self) -> MLflowSink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- async face (anyio: asyncio or trio) ---------------------------------------------------

    async def aflush(self, timeout: float | None = None) -> bool:
        """`flush` without blocking the event loop."""
        return await anyio.to_thread.run_sync(self.flush, timeout)

    async def aclose(self, timeout: float | None = None) -> bool:
        """`close` without blocking the event loop."""
        return await anyio.to_thread.run_sync(self.close, timeout)

    async def __aenter__(self) -> MLflowSink:
        """With ``worker="task"`` the worker runs as a task of this block's task group, in
        the caller's event loop, instead of in a thread of its own."""
        forwarder = self._forwarder
        if self._task_mode and forwarder is not None and not forwarder.worker.alive:
            worker = forwarder.worker

            async def run(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
                # Shielded: a cancelled block still needs its worker for the close. It stops
                # when the sink is closed (which __aexit__ does, cancelled or not).
                with anyio.CancelScope(shield=True):
                    task_status.started()
                    await worker.run()  # counts itself alive before its first await

            self._task_group = anyio.create_task_group()
            await self._task_group.__aenter__()
            forwarder.buffer.loop_thread = threading.get_ident()
            await self._task_group.start(run, name="rlm-mlflow worker")
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        """Close, even when the block was cancelled (shielded): its runs end, nothing stays
        pending."""
        try:
            with anyio.CancelScope(shield=True):
                await self.aclose()
        finally:
            if self._task_group is not None:
                await self._task_group.__aexit__(None, None, None)

    # -- in the process (`_process.Tracked`: the registry's calls, not the caller's) -----------

    def worker_runs_in(self, thread: int) -> bool:
        """Whether the worker runs as a task of an event loop in ``thread``."""
        forwarder = self._forwarder
        return (
            forwarder is not None
            and forwarder.buffer.loop_thread == thread
            and forwarder.worker.alive
        )

    def restart_in_child(self) -> None:
        """After os.fork(): the parent's queue, worker and journal stay the parent's. The child
        starts empty (nothing of the parent's is sent twice) and has no runs open."""
        if self._forwarder is not None:
            self._forwarder.release_after_fork()
        self._replayer = None
        self._start_forwarder(replay_orphans=False)

    def prepare_close(self) -> Forwarder | None:
        """The forwarder to close (None: none was started). A task-mode sink closed while no
        event loop runs its worker (``async with`` never entered, or its loop gone, as at
        exit): the worker runs in a thread of its own from now on, so the close still
        delivers and ends the runs."""
        forwarder = self._forwarder
        if not self._task_mode or forwarder is None or forwarder.closing is not None:
            return forwarder
        with _handover:
            if not forwarder.worker.alive:
                forwarder.buffer.loop_thread = None  # hooks may block again: no loop to freeze
                forwarder.worker.start()
        return forwarder

    def finish_close(self, started: float, timeout: float | None) -> None:
        """The start-up replay gets what is left of the close's deadline to finish."""
        if self._replayer is not None:
            limit = self.settings.close_timeout if timeout is None else timeout
            self._replayer.join(max(0.0, started + limit - time()))

    # -- status ------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether close() was called (hooks are dropped from then on)."""
        return self._forwarder is not None and self._forwarder.closing is not None

    @property
    def available(self) -> bool:
        forwarder = self._forwarder
        return forwarder is not None and forwarder.worker.outcomes.problem is None

    def status(self) -> Status:
        """rlm-code's keys (name, enabled, available, detail, experiment) and the forwarder's."""
        forwarder = self._forwarder
        unavailable = self._unavailable or (
            forwarder.worker.outcomes.problem if forwarder else None
        )
        if not self.enabled:
            detail = "disabled"
        elif unavailable:
            detail = unavailable
        else:
            detail = redact_uri(self.tracking_uri) or "default-tracking-uri"
        status = Status(
            name=self.name,
            enabled=self.enabled,
            available=self.available,
            detail=detail,
            experiment=self.experiment,
        )
        if forwarder is None:
            return status
        return forwarder_status(status, forwarder, self.closed)


def _dead_letter_path(settings: Settings) -> Path:
    if settings.dead_letter_file:
        return Path(settings.dead_letter_file)
    if settings.spool_dir:
        return Path(settings.spool_dir) / "dead-letter.jsonl"
    return Path("rlm-mlflow-dead-letter.jsonl").absolute()


def _replace(settings: Settings, overrides: dict[str, Any]) -> Settings:
    return dataclasses.replace(settings, **overrides) if overrides else settings


_handover = threading.Lock()
