"""The counters of `status()` and the outcomes an event can end in; written by `_outcomes`
only."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Outcome(enum.Enum):
    """Where an event ended; the value is its counter in `Stats` (and in ``status()``)."""

    DELIVERED = "delivered"
    REJECTED = "rejected"
    DEAD_LETTERED = "dead_lettered"
    SPOOLED = "spooled"
    FAILED = "failed"
    DISCARDED = "discarded"


@dataclass
class Stats:
    """The counters; written by `Outcomes` only, copied whole by `Outcomes.snapshot`."""

    drained: int = 0  # taken from the buffer (markers aside)
    delivered: int = 0
    rejected: int = 0  # bad input, refused before sending
    dead_lettered: int = 0  # refused by MLflow for good; written to the dead-letter file
    failed: int = 0  # not delivered (unreachable past the deadline, or unavailable), no spool
    spooled: int = 0  # not delivered, kept in the journal for a later sync
    discarded: int = 0  # drained while mlflow cannot be imported
    dropped: int = 0  # not taken by the buffer (full, or the sink closed)
    hook_errors: int = 0  # hook calls that failed inside the sink (status' rejected)
    retried: int = 0
    skipped: int = 0  # parts of an event not logged: non-scalar params, a missing run path
    last_error: str | None = None

    @property
    def finished(self) -> int:
        return (
            self.delivered
            + self.rejected
            + self.dead_lettered
            + self.failed
            + self.spooled
            + self.discarded
        )

    @property
    def inflight(self) -> int:
        """Drained and not finished yet."""
        return self.drained - self.finished
