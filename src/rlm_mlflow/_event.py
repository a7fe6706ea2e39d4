"""Events: small immutable records made by the hooks.

Everything an event carries is captured when the hook is called (docs/how-it-works.md, "The
hooks"): the wall-clock time, the step and the values, so that a retried batch is
byte-identical to the first try (docs/failure-behaviour.md, promise 3). Validation happens
later, in the worker, so the hot path stays a tuple and an append. ``extra`` is what the
trajectory (traces, token usage) needs beyond the metrics: references taken in the hook, made
plain by the worker.
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple


class RunStart(NamedTuple):
    run_id: str
    time: float
    environment: str
    task_chars: int | None  # len(task); None when the task has no length
    params: dict[str, Any]  # a shallow copy taken in the hook
    key: str  # unique per start: a replay finds the run it already created by this tag
    extra: Any = None  # with traces {"task": the task text}; and `_extras`' tags, name, parent


class Step(NamedTuple):
    run_id: str
    step: Any  # validated by the worker: int >= 0
    reward: Any  # validated by the worker: a finite real number
    cumulative_reward: Any
    time: float
    extra: Any = None  # the step's ``usage``; with traces, a shallow copy of the whole event


class RunEnd(NamedTuple):
    run_id: str
    time: float
    completed: Any
    steps: Any
    total_reward: Any
    run_path: Any  # str | os.PathLike | None
    status: str = "FINISHED"  # FINISHED, FAILED or KILLED
    #: {"usage_summary": ..., "final_response": ...} when the result has them; and what
    #: `_extras` describes (metrics, tags, artifacts, a table, a model, assessments).
    extra: Any = None
    own: bool = False  # the sink's own end (KILLED) of a run the caller never ended


class Marker:
    """Put in the buffer by ``flush``/``close``; done once all events before it are finished.

    The worker also places its own markers after each journalled drain (``ack``): when one is
    done, the journal may release everything before that position.
    """

    __slots__ = ("ack", "closing", "done")

    def __init__(self, closing: bool = False, ack: Any = None) -> None:
        self.closing = closing
        self.ack = ack
        self.done = threading.Event()


RunEvent = RunStart | Step | RunEnd  # what the hooks make, and the journal keeps
Event = RunEvent | Marker
