"""Where every event ends: the counters of `status()`, and the rules that pick one.

Every event that leaves the buffer ends in exactly one `Outcome`: delivered, rejected (bad
input), dead-lettered (refused by MLflow for good), spooled (kept in the journal for a later
sync), failed (not delivered, no spool) or discarded (mlflow missing); one the buffer could
not take is dropped. `Outcomes` is the only writer of the counters (`Stats`): the worker's
loop through `record` and `took`, the hooks' threads through `dropped` and `hook_failed`.
Writes are made under one lock, and `snapshot` copies the counters under it, so a status
never shows an event taken from the buffer and not yet counted as taken.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from tenacity import RetryCallState

from ._counters import Outcome, Stats
from ._deadletter import DeadLetters
from ._event import Event, RunEnd, RunEvent, RunStart, Step
from ._limits import show
from ._log import log
from ._payload import BadInput, admit
from ._redact import redact_text
from .exporters.base import ExperimentDeleted, Misconfigured, is_kept


class Counted(Protocol):
    """What outcomes are counted for besides the totals: a run (see `Run.finished`)."""

    finished: int

    @property
    def run_id(self) -> str: ...

    @property
    def mlflow_id(self) -> str | None: ...


class Outcomes:
    """Counts each event once, logs what a user must know once, and decides where what did
    not land goes: dead letters for MLflow's refusals, else the spool or `failed`."""

    def __init__(self, dead_letters: DeadLetters | None, experiment: str) -> None:
        self.stats = Stats()  # read freely by the worker's loop; copied by `snapshot`
        self._lock = threading.Lock()
        self._taking = threading.Lock()  # held while the buffer is drained (see `taking`)
        #: The counts a close settled on when the worker did not stop in time (`settle`).
        self.final: Stats | None = None
        self.dead_letters = dead_letters
        self.experiment = experiment
        self.spooling = False  # a journal holds every drained event (set by the worker)
        self.keep_journal = False  # something is kept for a later replay: no more acks
        self.import_error: str | None = None
        self.unavailable: str | None = None  # why nothing can be sent (status' detail)
        #: Why the store refuses our calls for now (credentials, a redirect, ...): the calls
        #: are tried again slowly and nothing is given up (status' detail meanwhile).
        self.misconfigured: str | None = None
        #: Asks MLflow whether the experiment is still active (set once connected).
        self.experiment_state: Callable[[], Awaitable[str]] | None = None
        self._experiment_checked = 0.0
        self._experiment_id = ""
        self._rejections_logged: set[tuple[str, str]] = set()

    @property
    def problem(self) -> str | None:
        """Why nothing is delivered now, for status(): unavailable for good, or refused by
        the store until its configuration (or ours) is fixed."""
        return self.unavailable or self.misconfigured

    def record(
        self, outcome: Outcome, events: int, reason: str = "", run: Counted | None = None
    ) -> None:
        """The one way an event ends: ``events`` of them in ``outcome`` (and as finished for
        their ``run``). ``reason`` is logged when it says something (an error, not a success)."""
        if events <= 0:
            return
        with self._lock:
            stats, name = self.stats, outcome.value
            setattr(stats, name, getattr(stats, name) + events)
            if run is not None:
                run.finished += events
        if reason:
            log.debug("events ended", outcome=name, events=events, reason=reason)

    @contextmanager
    def taking(self) -> Iterator[Callable[[int], None]]:
        """Around a drain of the buffer: the events taken are counted in the same breath,
        so that a snapshot sees each either in the buffer or as taken. A lock of its own, not
        the counters' (a drain may wait for the buffer's lock, which a hook interrupted by a
        SIGTERM handler may hold while the close settles the counters)."""
        with self._taking:
            yield self.took

    def took(self, events: int) -> None:
        """Events taken from the buffer outside a `taking` (what a close leaves over)."""
        with self._lock:
            self.stats.drained += events

    def dropped(self) -> None:
        """A hook's event the buffer did not take. Called under the buffer's lock (which
        keeps drops apart from each other), never under ours: no lock of ours is taken."""
        self.stats.dropped += 1

    def hook_failed(self) -> None:
        """A hook call that failed inside the sink: counted as rejected in status()."""
        with self._lock:
            self.stats.hook_errors += 1

    def retry(self) -> None:
        with self._lock:
            self.stats.retried += 1

    def crashed(self, events: int, exc: BaseException) -> None:
        """The worker's loop crashed: what was in flight is counted failed."""
        with self._lock:
            self.stats.last_error = redact_text(f"worker crashed: {exc!r}")[:500]
            self.stats.failed += events

    def snapshot(self, queued: Callable[[], int]) -> tuple[Stats, int]:
        """A copy of the counters, and the events ``queued`` says wait in the buffer, read
        under the lock (the final counts once a close settled on them: nothing queued)."""
        # Not forever: should a drain be stuck (see `taking`), a status one drain off is
        # better than a status() that never returns.
        between_drains = self._taking.acquire(timeout=0.5)
        try:
            return self._copy(queued)
        finally:
            if between_drains:
                self._taking.release()

    def _copy(self, queued: Callable[[], int]) -> tuple[Stats, int]:
        with self._lock:
            if self.final is not None:  # the hooks' own counts go on (a hook after close)
                live = self.stats
                return dataclasses.replace(
                    self.final, dropped=live.dropped, hook_errors=live.hook_errors
                ), 0
            return dataclasses.replace(self.stats), queued()

    def settle(self, queued: int) -> Stats:
        """The worker did not stop in time: the final counts, as it would have made them:
        what the buffer still holds (``queued``) was never journalled, so failed; what was in
        flight is spooled with a journal (it stays for a sync), else failed."""
        with self._lock:
            final = dataclasses.replace(self.stats)
            held = final.inflight
            final.drained += queued
            final.failed += queued
            if self.spooling:
                final.spooled += held
            else:
                final.failed += held
            self.final = final
            return final

    def give_up(self, events: int, lane: Counted | None = None) -> None:
        """Events this worker will not send: discarded without mlflow, else kept in the
        journal (spooled) or lost (failed)."""
        if self.import_error is not None:
            self.record(Outcome.DISCARDED, events, run=lane)
        elif self.spooling:
            self.keep_journal = True
            self.record(Outcome.SPOOLED, events, run=lane)
        else:
            self.record(Outcome.FAILED, events, run=lane)

    def reject(self, event: Event, reason: str, lane: Counted | None = None) -> None:
        """Count every rejection; log the first one per run and hook, not one per event."""
        self.record(Outcome.REJECTED, 1, run=lane)
        run_id = getattr(event, "run_id", None)
        shown = run_id if isinstance(run_id, str) else show(run_id)
        key = (shown[:200], hook_name(event))
        if key in self._rejections_logged:
            return
        if len(self._rejections_logged) < 10_000:
            self._rejections_logged.add(key)
        log.warning(
            "event rejected; further rejections of this run and hook are only counted",
            run_id=key[0],
            hook=key[1],
            reason=reason,
        )

    def skip(self, message: str, **fields: Any) -> None:
        """One part of an event not logged (its run path, say): counted, and said."""
        self.skipped_parts(1)
        log.warning(message, **fields)

    def admitted(self, event: RunEvent, text_limit: int) -> RunEvent | None:
        """``event`` as admitted (`_payload.admit`: the one place where values are checked),
        or None: rejected (counted, and said), alone."""
        try:
            admitted, problems = admit(event, text_limit)
        except BadInput as exc:
            self.reject(event, str(exc))
            return None
        except Exception as exc:  # a value that broke a check: reject it, alone
            self.reject(event, f"cannot be read: {type(exc).__name__}: {str(exc)[:200]}")
            return None
        if problems:
            self.skipped(admitted.run_id, hook_name(admitted), problems)
        return admitted

    def skipped_parts(self, parts: int) -> None:
        """Parts of events not logged, already said (a store without traces, say)."""
        with self._lock:
            self.stats.skipped += parts

    def skipped(self, run_id: str, hook: str, problems: list[str]) -> None:
        """Parts of an event that were not logged (a param, a summary value, the run path)."""
        self.skipped_parts(len(problems))
        log.warning(
            "parts of an event not logged", run_id=run_id, hook=hook, reason="; ".join(problems)
        )

    async def undeliverable(
        self, events: int, lane: Counted, call: str, exc: BaseException, entities: list[Any]
    ) -> None:
        """What did not land: dead-lettered if MLflow refused it, else spooled or failed."""
        self.note_error(call, exc)
        if is_kept(exc) or self.unavailable is not None or await self._experiment_gone():
            log.error(
                "mlflow unavailable"
                if self.unavailable is not None
                else "mlflow unreachable past the retry deadline",
                run_id=lane.run_id,
                call=call,
                events=events,
                kept_in_spool=self.spooling,
                error=self.stats.last_error,
            )
            self.give_up(events, lane)
            return
        assert self.dead_letters is not None, "a worker's outcomes have a dead-letter file"
        self.dead_letters.write(
            run_id=lane.run_id,
            mlflow_run_id=lane.mlflow_id,
            call=call,
            entities=entities,
            reason=str(exc),
        )
        log.error(
            "mlflow refused; dead-lettered",
            run_id=lane.run_id,
            call=call,
            events=events,
            error=self.stats.last_error,
            dead_letter_file=str(self.dead_letters.path),
        )
        self.record(Outcome.DEAD_LETTERED, events, run=lane)

    def failed_call(self, lane: Counted, exc: BaseException, events: int = 1) -> None:
        """Count ``events`` whose call failed (already logged by `undeliverable`)."""
        if self.unavailable is not None or is_kept(exc):
            self.give_up(events, lane)
        else:
            self.record(Outcome.DEAD_LETTERED, events, run=lane)

    async def _experiment_gone(self) -> bool:
        """After a refusal: was the experiment deleted under us? (asked at most every 5 s)"""
        now = time.monotonic()
        if self.experiment_state is None or now - self._experiment_checked < 5.0:
            return self.unavailable is not None
        self._experiment_checked = now
        try:
            state = await self.experiment_state()
        except Exception:
            return False
        if state == "active":
            return False
        self.set_unavailable(
            f"unavailable: {ExperimentDeleted(self.experiment, self._experiment_id)}"
        )
        return True

    def connected(self, experiment_id: str, state: Callable[[], Awaitable[str]]) -> None:
        self._experiment_id = experiment_id
        self.experiment_state = state

    def set_unavailable(self, reason: str) -> None:
        """From now on nothing is sent: events are kept in the journal (spooled) if there is
        one, else counted failed (discarded when mlflow is missing)."""
        if self.unavailable is None and self.import_error is None:
            log.error(
                "MLflow sink unavailable; events are kept in the spool"
                if self.spooling
                else "MLflow sink unavailable; events are counted failed (no spool)",
                reason=reason,
            )
        self.unavailable = reason
        self.stats.last_error = reason[:500]

    def refused_by_configuration(self, exc: Misconfigured) -> None:
        """A call refused for a reason of configuration (`Misconfigured`; it is tried again,
        slowly): said once per cause, and shown by status() until a call gets through."""
        if exc.detail != self.misconfigured:
            log.error(
                "the tracking store refuses our calls; events are kept, and the calls are "
                "tried again slowly until it takes them",
                reason=exc.detail,
                kept_in_spool=self.spooling,
            )
        self.misconfigured = exc.detail
        self.stats.last_error = exc.detail[:500]

    def answered(self) -> None:
        """A call got MLflow's answer: whatever refused us before is fixed."""
        if self.misconfigured is not None:
            log.info("the tracking store takes our calls again", was=self.misconfigured)
            self.misconfigured = None

    def note_error(self, what: str, exc: BaseException) -> None:
        self.stats.last_error = redact_text(f"{what}: {type(exc).__name__}: {str(exc)[:500]}")

    def on_retry(self, state: RetryCallState) -> None:
        """tenacity's ``before_sleep``: count the retry and say why, once per attempt."""
        self.retry()
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "mlflow call failed, retrying",
            attempt=state.attempt_number,
            retry_in=round(state.upcoming_sleep, 2),
            error=redact_text(str(exc))[:300],
        )


def hook_name(event: Event) -> str:
    return {RunStart: "on_run_start", Step: "on_step", RunEnd: "on_run_end"}.get(
        type(event), "marker"
    )
