"""The forwarder: buffer + worker (+ journal and spill file with a spool), wired once.

`MLflowSink` has one per sink; replay (`_replay`) one per journal it delivers. Flushing and
closing happen here, by markers put in the buffer behind everything accepted before them;
`close_all` closes many forwarders at once under one deadline (the exit of a process).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

from ._buffer import Buffer
from ._deadletter import DeadLetters
from ._destination import resolve
from ._event import Marker
from ._journal import SPILL_FILE, Journal, journal_meta
from ._log import log
from ._outcomes import Outcomes
from ._payload import steps_per_batch
from ._settings import Settings
from ._spill import Spill
from ._worker import Worker, last_attempt_reserve
from .exporters.base import Exporter


class Forwarder:
    def __init__(
        self,
        settings: Settings,
        tracking_uri: str | None,
        experiment: str,
        dead_letters: DeadLetters,
        *,
        journal: bool = True,
        replaying: bool = False,
        park: bool = True,
        put_timeout: float | None = None,
        exporter: Exporter | None = None,
    ) -> None:
        """``journal``: keep this process's journal in ``settings.spool_dir`` (if set)."""
        s = settings
        self.settings = s
        self.journal: Journal | None = None
        self.spool_refused: str | None = None  # why the spool could not be opened
        if journal and s.spool_dir:
            try:
                self.journal = _open_journal(s, experiment, tracking_uri)
            except OSError as exc:
                self.spool_refused = " ".join(f"{type(exc).__name__}: {exc}".split())
                log.error(
                    "spool_dir refused: the sink runs without a spool",
                    spool_dir=s.spool_dir,
                    error=self.spool_refused,
                )
        outcomes = Outcomes(dead_letters, experiment)  # the counters, of the buffer and worker
        spill = None
        if self.journal is not None and s.when_full == "spill":
            spill = Spill(self.journal.dir / SPILL_FILE, durable=s.fsync == "always")
        self.buffer = Buffer(
            s.queue_size,
            steps_per_batch(s.batch_size),
            s.put_timeout if put_timeout is None else put_timeout,
            s.when_full,
            overflow=spill,
            overflow_max_bytes=s.spool_max_bytes,
            outcomes=outcomes,
        )
        self.worker = Worker(
            self.buffer,
            s,
            tracking_uri,
            experiment,
            dead_letters=dead_letters,
            journal=self.journal,
            replaying=replaying,
            park=park,
            exporter=exporter,
            outcomes=outcomes,
        )
        # Re-entrant: a SIGTERM handler may close while this thread is inside close().
        self._close_lock = threading.RLock()
        self.closing: Marker | None = None  # set once, by the first close

    @property
    def spool(self) -> str:
        """``status()["spool"]``: ``off``, the journal's directory, ``refused: <why>`` (the
        spool could not be opened), or ``failed: <why> (<directory>)`` (a write failed; it
        takes no more records, and is kept for a sync unless everything in it landed)."""
        if self.journal is None:
            return f"refused: {self.spool_refused}" if self.spool_refused else "off"
        if self.worker.journal_error is not None:
            return f"failed: {self.worker.journal_error} ({self.journal.dir})"
        return str(self.journal.dir)

    def flush(self, timeout: float) -> bool:
        """Wait until every event accepted so far is finished (delivered or counted)."""
        marker = self.closing  # once closing, nothing new is accepted: wait for the close
        if marker is None:
            marker = Marker()
            self.buffer.put_marker(marker)
        return self.wait(marker, timeout, "flush")

    def begin_close(self) -> tuple[Marker, bool]:
        """Queue the closing marker (once) and refuse new events; whether this call was the
        first."""
        with self._close_lock:
            if self.closing is not None:
                return self.closing, False
            marker = self.closing = Marker(closing=True)
        self.buffer.put_marker(marker)
        self.buffer.close()
        return marker, True

    def wait(self, marker: Marker, timeout: float, what: str) -> bool:
        if self.buffer.loop_thread == threading.get_ident():
            log.warning(
                "flush()/close() called on the event loop the worker runs in; "
                "await aflush()/aclose() instead",
                call=what,
            )
            return marker.done.is_set()
        if marker.done.wait(timeout if self.worker.alive else 0):
            return True
        stats = self.worker.outcomes.stats
        log.warning(
            "timed out",
            call=what,
            timeout=round(timeout, 3),
            pending=len(self.buffer) + stats.inflight,
        )
        return False

    def release_after_fork(self) -> None:
        """In a forked child: let go of the parent's files (its lock stays the parent's)."""
        self.worker.release_files_after_fork()


def close_all(forwarders: Sequence[Forwarder], timeout: float | None) -> bool:
    """Close ``forwarders`` at once: every flush starts now, all share one deadline (each
    one's ``close_timeout`` unless ``timeout`` is given), and the last attempts run side by
    side. Whether every one finished everything in time."""
    started = time.monotonic()
    closing = []
    for forwarder in forwarders:
        marker, _ = forwarder.begin_close()
        limit = forwarder.settings.close_timeout if timeout is None else max(0.0, timeout)
        closing.append((forwarder, marker, started + limit))
    done = True
    for forwarder, marker, deadline in closing:
        reserve = last_attempt_reserve(deadline - started)
        remaining = max(0.0, deadline - reserve - time.monotonic())
        done = forwarder.wait(marker, remaining, "close") and done
    # Also when another close is under way (the SIGTERM handler interrupting a close() of
    # this thread): the process may not live to see that one finish.
    for forwarder, _, deadline in closing:
        forwarder.worker.stop(deadline)  # a no-op when it already stopped
    for forwarder, _, deadline in closing:
        forwarder.worker.join(deadline)
        forwarder.buffer.close_overflow()
    return done


def _open_journal(s: Settings, experiment: str, tracking_uri: str | None) -> Journal:
    """This process's journal in the spool, for its destination. OSError when the spool
    cannot be: that one setting is refused (said in the log and in status()), and everything
    else works."""
    meta = journal_meta(experiment, resolve(tracking_uri))
    return Journal(Path(s.spool_dir), s.spool_max_bytes, meta, s.fsync)
