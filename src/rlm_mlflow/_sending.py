"""What every lane of a worker shares: the outcomes, the connection once made, the batch
size, the runs created and not yet ended, and what the store was found to lack (traces,
features), said once."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from ._connect import Connection
from ._log import log
from ._outcomes import Outcomes
from ._run import Run
from .exporters.base import TracesUnsupported, is_entity_error

U = TypeVar("U")


@dataclass
class Sending:
    outcomes: Outcomes
    batch_size: int
    replaying: bool  # a run may already exist: look it up by its key first
    connection: Connection | None = None  # set once connected
    unended: set[Run] = field(default_factory=set)  # created in MLflow, not yet terminated
    traces: bool = False  # the traces setting (status' traces); a run's own is its trajectory's
    max_spans: int = 2000
    traces_unavailable: str | None = None  # why the store takes no traces (status' traces)
    unsupported: set[str] = field(default_factory=set)  # features the store lacks, said once

    def traces_refused(self, exc: BaseException) -> bool:
        """Whether ``exc`` says the store takes no traces at all (then: metrics only)."""
        if not isinstance(exc, TracesUnsupported):
            return False
        if self.traces_unavailable is None:
            self.traces_unavailable = f"unavailable: {exc}"
            log.warning("the tracking store takes no traces; sending metrics only", reason=str(exc))
        return True

    def ready(self) -> Connection:
        assert self.connection is not None, "lanes send only once connected"
        return self.connection

    async def bisect(
        self, units: list[U], send: Callable[[list[U]], Awaitable[None]]
    ) -> list[tuple[list[U], Exception]]:
        """Send ``units``; when MLflow refuses a value in them, halve until the refused ones
        are isolated, so the rest lands. Returns the parts that did not land, with the error.
        Only a refused value is bisected (`is_entity_error`): not trouble that is the same
        for every part, nor once the sink is unavailable (a deleted experiment refuses all)."""
        if not units:
            return []
        try:
            await send(units)
        except Exception as exc:
            if len(units) == 1 or not is_entity_error(exc) or self.outcomes.unavailable is not None:
                return [(units, exc)]
            middle = len(units) // 2
            return await self.bisect(units[:middle], send) + await self.bisect(units[middle:], send)
        return []
