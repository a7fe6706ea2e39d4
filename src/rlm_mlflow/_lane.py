"""A lane: one run's ordered stream of events, and the task that sends it.

The router appends each event of the run (`enqueue`); the lane's task (`drive`) takes what is
pending as a batch and sends it through the run's calls (`_run_calls`): steps between two
boundaries (a start, an end) go together, a boundary waits for every event before it. A
batch is counted ``completed`` once sent, which is what flush markers wait for (`_markers`).
Lanes of different runs never wait on each other. The lane writes its own fields only: after
a crash of the loop (`drop_all`), a loop that went away (`restart`), or a close whose deadline
ran out (`take_unsent`), it is asked, not reached into.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import anyio

from . import _run_calls as calls
from ._counters import Outcome
from ._event import Event, Marker, RunEnd, RunStart, Step
from ._log import log
from ._run import Run
from ._sending import Sending


def countable(events: Sequence[Event]) -> int:
    """Caller's events among ``events``: not markers, not the sink's own KILLED ends."""
    return sum(
        1 for e in events if not isinstance(e, Marker) and not (isinstance(e, RunEnd) and e.own)
    )


@dataclass(eq=False)
class Lane:
    run: Run
    pending: list[Event] = field(default_factory=list)
    boundaries: int = 0  # starts and ends in ``pending``
    sending: list[Event] = field(default_factory=list)  # the batch its task is sending
    pending_bytes: float = 0.0  # what ``pending`` holds in memory (`_memory`'s estimate)
    sending_bytes: float = 0.0  # what ``sending`` holds
    resume: int = 0  # index in ``sending`` of the first event not counted yet
    resumed: bool = False  # sent again after a cut-off: find the run before creating it
    completed: int = 0  # advanced only when a whole batch of pending events is done
    running: bool = False  # a task drives it (or is about to)

    @property
    def run_id(self) -> str:
        return self.run.run_id

    @property
    def enqueued(self) -> int:
        """Events ever given to this lane (a flush waits until ``completed`` reaches it)."""
        return self.completed + len(self.sending) + len(self.pending)

    def enqueue(self, event: Event, weight: float) -> bool:
        """Append one event (``weight``: the bytes it holds). True when the lane needs a
        task to drive it (it had none)."""
        self.pending.append(event)
        self.pending_bytes += weight
        if event.__class__ is not Step:
            self.boundaries += 1
        if self.running:
            return False
        self.running = True
        return True

    def enqueue_steps(self, steps: list[Event], weight: float) -> bool:
        """`enqueue` for plain steps (no boundary among them), all at once."""
        self.pending.extend(steps)
        self.pending_bytes += weight
        if self.running:
            return False
        self.running = True
        return True

    async def drive(self, s: Sending, connected: anyio.Event, done: Callable[[Lane], None]) -> None:
        """The lane's task: send its batches one after the other; ``done`` after each."""
        await connected.wait()
        run = self.run
        while self.pending:
            batch, self.pending = self.pending, []
            self.sending_bytes, self.pending_bytes = self.pending_bytes, 0.0
            boundaries, self.boundaries = self.boundaries, 0
            self.sending, self.resume = batch, 0
            before = run.finished
            try:
                if s.connection is None or s.outcomes.unavailable is not None:
                    s.outcomes.give_up(countable(batch), run)
                else:
                    await self._send(batch, s, boundaries)
            except Exception as exc:  # a bug of ours: this batch alone pays for it
                lost = countable(batch) - (run.finished - before)
                log.exception(
                    "internal error sending a run's events; they are counted failed",
                    run_id=self.run_id,
                    events=lost,
                    error=repr(exc)[:300],
                )
                s.outcomes.record(Outcome.FAILED, max(0, lost), run=run)
            self.completed += len(batch)
            self.sending, self.sending_bytes = [], 0.0
            done(self)
        self.running = False

    async def _send(self, batch: list[Event], s: Sending, boundaries: int) -> None:
        """One batch of this run's events, in order: steps between boundaries go together.
        ``boundaries``: how many starts and ends it holds (none, most of the time)."""
        run = self.run
        if run.recreate:
            run.recreate = False
            await calls.create(run, s, counted=False)
        if not boundaries:
            await calls.send_steps(run, batch, s)  # type: ignore[arg-type]
            self.resume = len(batch)
            return
        steps: list[Step] = []
        for i, event in enumerate(batch):
            if event.__class__ is Step:
                steps.append(event)
                continue
            await calls.send_steps(run, steps, s)
            self.resume, steps = i, []
            if isinstance(event, RunStart):
                await calls.create(run, s, find=self.resumed)
            elif isinstance(event, RunEnd):
                await calls.end(run, event, s)
            self.resume = i + 1
        await calls.send_steps(run, steps, s)
        self.resume = len(batch)

    def restart(self) -> bool:
        """In a new loop (after a park, a crash, or a task-mode worker whose loop went away):
        the part of the batch whose task was cancelled in the middle of sending and that was
        not counted yet goes back in front of what is pending (MLflow drops the metrics that
        land twice; the run is found before it is created again). True when it has events
        to send (it needs a task)."""
        self.running = False
        if self.sending:
            rest = self.rewind()
            self.pending = rest + self.pending
            self.boundaries += sum(1 for e in rest if e.__class__ is not Step)
            self.pending_bytes += self.sending_bytes
            self.sending_bytes = 0.0
        if self.pending:
            self.running = True
            return True
        return False

    def rewind(self) -> list[Event]:
        """After the task sending ``sending`` was cancelled with its loop: the part of the
        batch not counted yet, to be sent again, with the run's trajectory as it was before
        it. What was counted stays so."""
        rest = self.sending[self.resume :]
        self.completed += len(self.sending) - len(rest)
        self.run.trajectory.restore()
        self.sending, self.resumed = [], True
        return rest

    def drop_all(self) -> None:
        """After a crash of the loop (what was in flight is counted failed): let go of every
        event, as if they had been sent."""
        self.completed = self.enqueued
        self.pending, self.sending, self.boundaries = [], [], 0
        self.pending_bytes = self.sending_bytes = 0.0
        self.running = False

    def take_unsent(self) -> RunEnd | None:
        """The close deadline ran out: the lane gives up what it has not sent (steps are not
        sent any more); the run's end among it, if it came."""
        unsent = self.sending + self.pending
        self.sending, self.pending, self.boundaries = [], [], 0
        return next((e for e in unsent if isinstance(e, RunEnd)), None)
