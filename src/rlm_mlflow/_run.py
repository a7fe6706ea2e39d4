"""A run as MLflow knows it: its start, its parent, its id once created, what its creation
ran into, whether it was ended, and its trajectory. What the lanes' calls (`_run_calls`,
`_run_extras`) read and write; how a run's events are ordered is the lane's (`_lane`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio

from ._event import RunStart
from ._trajectory import Trajectory


@dataclass(eq=False)
class Run:
    start: RunStart
    parent: Run | None
    created: anyio.Event = field(default_factory=anyio.Event)  # set once creation was tried
    mlflow_id: str | None = None
    found_status: str | None = None  # the run's status in MLflow when a replay found it
    start_error: BaseException | None = None
    create_tried: bool = False  # a create_run call was made (it may have landed, unanswered)
    finished: int = 0  # events of this run counted in Stats (written by `Outcomes` only)
    terminated: bool = False
    recreate: bool = False  # its start was lost in a crash of the loop: create it again
    trajectory: Trajectory = field(init=False)

    def __post_init__(self) -> None:
        self.trajectory = Trajectory(self.start)

    @property
    def run_id(self) -> str:
        return self.start.run_id

    def ancestors(self) -> list[Run]:
        """Its parent, the parent's parent, ..., up to the recursion's root."""
        chain, parent = [], self.parent
        while parent is not None:
            chain.append(parent)
            parent = parent.parent
        return chain

    def top(self) -> Run:
        """The recursion's root run (this one, for a run without a parent)."""
        return (self.ancestors() or [self])[-1]

    def depth(self) -> int:
        return len(self.ancestors())

    def lost_creation(self) -> None:
        """The loop crashed before the run was created: it will be, by the next event that
        is sent (a new event to wait on)."""
        if self.mlflow_id is None and self.start_error is None:
            self.recreate = True
            self.created = anyio.Event()

    def renew_created(self) -> None:
        """In a new event loop: an `anyio.Event` not set yet belongs to the old one."""
        if not self.created.is_set():
            self.created = anyio.Event()
