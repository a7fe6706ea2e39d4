"""`MLflowSink`: rlm-code's sink contract (constructor, hooks, `status()`) on a forwarder.

The three hooks are the hot path: each builds one event and puts it in the buffer. They never
raise, never touch the network or the disk, and never import mlflow. The sink's place in the
process (closed at exit and on SIGTERM, started afresh after fork) is `_process`.
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
from uuid import uuid4

import anyio
import anyio.to_thread
from anyio.abc import TaskGroup, TaskStatus

from . import _process
from ._deadletter import DeadLetters
from ._event import RunEnd, RunStart, Step
from ._exporter import Exporter
from ._forwarder import Forwarder, close_all
from ._limits import show
from ._log import log
from ._redact import redact_text, redact_uri
from ._replay import SyncSummary, replay_own
from ._settings import DEFAULT_EXPERIMENT, Settings, parse_bool


class MLflowSink:
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
        self._buffer: Any = None  # the forwarder's buffer: the hooks' one attribute lookup
        self._exporter = exporter
        self._unavailable: str | None = None
        self._hook_errors = 0
        self._hook_lock = threading.Lock()
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

    def _restart_in_child(self) -> None:
        """After os.fork(): the parent's queue, worker and journal stay the parent's. The child
        starts empty (nothing of the parent's is sent twice) and has no runs open."""
        if self._forwarder is not None:
            self._forwarder.release_after_fork()
        self._replayer = None
        self._start_forwarder(replay_orphans=False)

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

    # -- hooks (hot path) --------------------------------------------------------------------

    def on_run_start(
        self, run_id: str, *, task: str, environment: str, params: dict[str, Any]
    ) -> None:
        buffer = self._buffer
        if buffer is None:
            return
        try:  # a run's start is never dropped for room: its whole run hangs on it
            extra = {"task": task} if self.settings.traces else None
            buffer.put_boundary(
                RunStart(
                    run_id, time(), environment, _chars(task), _copy(params), uuid4().hex, extra
                )
            )
        except Exception as exc:
            self._hook_failed("on_run_start", run_id, exc)

    def on_step(self, run_id: str, *, event: dict[str, Any], cumulative_reward: float) -> None:
        buffer = self._buffer
        if buffer is None:
            return
        try:  # tuple.__new__ straight: the NamedTuple's own __new__ is one more Python call
            get = event.get
            fields = (run_id, get("step"), get("reward"), cumulative_reward, time(), get("usage"))
            buffer.put(_new(Step, fields))
        except Exception as exc:
            self._hook_failed("on_step", run_id, exc)

    def _on_step_traced(
        self, run_id: str, *, event: dict[str, Any], cumulative_reward: float
    ) -> None:
        """`on_step` with traces on: a shallow copy of the whole event (action, observation,
        usage) goes with the step; the worker makes a span of it."""
        buffer = self._buffer
        if buffer is None:
            return
        try:
            fields = (run_id, event.get("step"), event.get("reward"), cumulative_reward, time())
            buffer.put(_new(Step, (*fields, dict(event))))
        except Exception as exc:
            self._hook_failed("on_step", run_id, exc)

    def on_run_end(self, run_id: str, *, result: Any, run_path: Path | str | None) -> None:
        buffer = self._buffer
        if buffer is None:
            return
        try:  # never dropped for room either: the run would stay RUNNING
            extra = {"usage_summary": _field(result, "usage_summary", None)}
            if self.settings.traces:
                extra["final_response"] = _field(result, "final_response", None)
            buffer.put_boundary(
                RunEnd(
                    run_id,
                    time(),
                    _field(result, "completed", False),
                    _field(result, "steps", 0),
                    _field(result, "total_reward", 0.0),
                    run_path,
                    "FINISHED",
                    extra,
                )
            )
        except Exception as exc:
            self._hook_failed("on_run_end", run_id, exc)

    # -- runs that carry more than rlm-code's sink logs (benchmarks, imports) -----------------

    def _start(
        self,
        run_id: str,
        *,
        task: Any,
        environment: str,
        params: dict[str, Any],
        tags: dict[str, str] | None = None,
        parent: str | None = None,
        name: str | None = None,
        at: float | None = None,
    ) -> None:
        """`on_run_start` with what `_extras` describes: extra tags, a parent run (by its
        run id), a name, and a start time other than now (an imported run's)."""
        buffer = self._buffer
        if buffer is None:
            return
        extra: dict[str, Any] = {"tags": dict(tags or {})}
        if self.settings.traces:
            extra["task"] = task
        if parent is not None:
            extra["parent"] = parent
        if name is not None:
            extra["name"] = name
        try:
            start = RunStart(
                run_id,
                time() if at is None else at,
                environment,
                _chars(task),
                _copy(params),
                uuid4().hex,
                extra,
            )
            buffer.put_boundary(start)
        except Exception as exc:
            self._hook_failed("on_run_start", run_id, exc)

    def _step(
        self, run_id: str, *, event: dict[str, Any], cumulative_reward: float, at: float
    ) -> None:
        """`on_step` at a time other than now (an imported step's): the same event, the
        usage (or with traces the whole event) with it."""
        buffer = self._buffer
        if buffer is None:
            return
        try:
            get = event.get
            extra = dict(event) if self.settings.traces else get("usage")
            fields = (run_id, get("step"), get("reward"), cumulative_reward, at, extra)
            buffer.put(_new(Step, fields))
        except Exception as exc:
            self._hook_failed("on_step", run_id, exc)

    def _end(
        self,
        run_id: str,
        *,
        result: Any,
        run_path: Path | str | None = None,
        status: str = "FINISHED",
        at: float | None = None,
        **extras: Any,
    ) -> None:
        """`on_run_end` with a status (FAILED, KILLED) and what `_extras` describes
        (``metrics``, ``tags``, ``artifacts``, ``table``, ``model``, ``assessments``); a
        ``result`` of None: a run with no RLM summary of its own (a benchmark)."""
        buffer = self._buffer
        if buffer is None:
            return
        try:
            extra = {"usage_summary": _field(result, "usage_summary", None), **extras}
            if self.settings.traces:
                extra["final_response"] = _field(result, "final_response", None)
            if result is None:
                extra["summary"] = False
            end = RunEnd(
                run_id,
                time() if at is None else at,
                _field(result, "completed", False),
                _field(result, "steps", 0),
                _field(result, "total_reward", 0.0),
                run_path,
                status,
                extra,
            )
            buffer.put_boundary(end)
        except Exception as exc:
            self._hook_failed("on_run_end", run_id, exc)

    def _hook_failed(self, hook: str, run_id: Any, exc: Exception) -> None:
        with self._hook_lock:  # hooks run on many threads; += is not atomic
            self._hook_errors += 1
        try:
            detail = str(exc)[:200]
        except Exception:  # an exception that cannot print itself
            detail = "?"
        log.warning(
            "hook input rejected",
            hook=hook,
            run_id=run_id[:200] if isinstance(run_id, str) else show(run_id),
            error=f"{type(exc).__name__}: {detail}",
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
        the ``close_timeout`` setting) runs out first, its last seconds (at most
        ``LAST_ATTEMPT_S``) go to a last attempt that ends every run created in MLflow
        (FINISHED with its summary if its end came, else KILLED), and every event not
        delivered is counted failed (or spooled): nothing stays pending. Hooks called after
        close do nothing (each is counted as dropped).
        """
        return close_sinks([self], timeout)

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

    def _worker_runs_in(self, thread: int) -> bool:
        """Whether the worker runs as a task of an event loop in ``thread``."""
        forwarder = self._forwarder
        return (
            forwarder is not None
            and forwarder.buffer.loop_thread == thread
            and forwarder.worker.alive
        )

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

    # -- status ------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether close() was called (hooks are dropped from then on)."""
        return self._forwarder is not None and self._forwarder.closing is not None

    @property
    def available(self) -> bool:
        forwarder = self._forwarder
        return forwarder is not None and forwarder.worker.problem is None

    def status(self) -> dict[str, Any]:
        """rlm-code's keys (name, enabled, available, detail, experiment) and the forwarder's."""
        worker = self._forwarder.worker if self._forwarder is not None else None
        unavailable = self._unavailable or (worker.problem if worker else None)
        if not self.enabled:
            detail = "disabled"
        elif unavailable:
            detail = unavailable
        else:
            detail = redact_uri(self.tracking_uri) or "default-tracking-uri"
        status: dict[str, Any] = {
            "name": self.name,
            "enabled": self.enabled,
            "available": self.available,
            "detail": detail,
            "experiment": self.experiment,
        }
        if worker is None or self._forwarder is None:
            return status
        buffer = self._forwarder.buffer
        stats = worker.final or worker.stats  # final: the counts a close settled on
        queued = 0 if worker.final is not None else len(buffer)
        status.update(
            tracking_uri=worker.resolved_uri,
            queued=queued,
            pending=queued + stats.drained - stats.finished,
            delivered=stats.delivered,
            retried=stats.retried,
            dropped=buffer.dropped + stats.discarded,
            rejected=stats.rejected + self._hook_errors,
            dead_lettered=stats.dead_lettered,
            failed=stats.failed,
            spooled=stats.spooled,
            skipped=stats.skipped,
            traces=worker.traces_status,
            spool=self._forwarder.spool,
            last_error=stats.last_error,
            closed=self.closed,
        )
        return status


def _dead_letter_path(settings: Settings) -> Path:
    if settings.dead_letter_file:
        return Path(settings.dead_letter_file)
    if settings.spool_dir:
        return Path(settings.spool_dir) / "dead-letter.jsonl"
    return Path("rlm-mlflow-dead-letter.jsonl").absolute()


_new = tuple.__new__


def _field(result: Any, name: str, default: Any) -> Any:
    """rlm-code's sink reads the result's attributes; a mapping works too. A result that cannot be
    read gives None (the worker then leaves that summary value out, and says so)."""
    try:
        if isinstance(result, Mapping):
            return result.get(name, default)
        return getattr(result, name, default)
    except Exception:
        return None


def _chars(task: Any) -> int | None:
    """``len(task)``, rlm-code's ``task_chars``; None when it has no length."""
    try:
        return len(task)
    except Exception:
        return None


def _copy(params: Any) -> Any:
    """A shallow copy taken in the hook (the caller may change its dict afterwards); what
    cannot be copied goes as it is, and the worker says it is not a mapping."""
    try:
        return dict(params)
    except Exception:
        return params


def _replace(settings: Settings, overrides: dict[str, Any]) -> Settings:
    return dataclasses.replace(settings, **overrides) if overrides else settings


_handover = threading.Lock()


def _worker_without_loop(sink: MLflowSink) -> None:
    """A task-mode sink closed while no event loop runs its worker (``async with`` never
    entered, or its loop gone, as at exit): the worker runs in a thread of its own from now
    on, so the close still delivers and ends the runs."""
    forwarder = sink._forwarder
    if not sink._task_mode or forwarder is None or forwarder.closing is not None:
        return
    with _handover:
        if not forwarder.worker.alive:
            forwarder.buffer.loop_thread = None  # hooks may block again: no loop to freeze
            forwarder.worker.start()


def close_sinks(sinks: list[MLflowSink], timeout: float | None) -> bool:
    """Close ``sinks`` at once, under one deadline (see `close_all`)."""
    open_ = [s for s in sinks if s._forwarder is not None]
    for sink in open_:
        _worker_without_loop(sink)
    forwarders = [s._forwarder for s in open_ if s._forwarder is not None]
    started = time()
    done = close_all(forwarders, timeout)
    for sink in open_:
        if sink._replayer is not None:
            limit = sink.settings.close_timeout if timeout is None else timeout
            sink._replayer.join(max(0.0, started + limit - time()))
        _process.untrack(sink)
    return done
