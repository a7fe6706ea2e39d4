"""What `MLflowSink.status()` returns: rlm-code's keys, and the forwarder's counters, read as
one snapshot of the outcomes (`Outcomes.snapshot`), so that every accepted event is in exactly
one of them or in ``pending``, at any moment."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypedDict

if TYPE_CHECKING:
    from ._forwarder import Forwarder


class Status(TypedDict, total=False):
    # rlm-code's sink's keys: always there
    name: str
    enabled: bool
    available: bool
    detail: str
    experiment: str
    # the forwarder's: there once the sink is enabled and has a forwarder
    tracking_uri: str | None
    queued: int  # in the buffer
    pending: int  # accepted and in no counter yet (queued, or taken and not finished)
    delivered: int
    retried: int
    dropped: int  # the buffer did not take them (full, closed), or mlflow was missing
    rejected: int  # bad input
    dead_lettered: int
    failed: int
    spooled: int
    skipped: int  # parts of events not logged
    traces: str
    spool: str | None
    last_error: str | None
    closed: bool


def forwarder_status(status: Status, forwarder: Forwarder, closed: bool) -> Status:
    """``status`` with the forwarder's keys."""
    worker, buffer = forwarder.worker, forwarder.buffer
    stats, queued = worker.outcomes.snapshot(buffer.__len__)
    status.update(
        Status(
            tracking_uri=worker.resolved_uri,
            queued=queued,
            pending=queued + stats.inflight,
            delivered=stats.delivered,
            retried=stats.retried,
            dropped=stats.dropped + stats.discarded,
            rejected=stats.rejected + stats.hook_errors,
            dead_lettered=stats.dead_lettered,
            failed=stats.failed,
            spooled=stats.spooled,
            skipped=stats.skipped,
            traces=worker.traces_status,
            spool=forwarder.spool,
            last_error=stats.last_error,
            closed=closed,
        )
    )
    return status
