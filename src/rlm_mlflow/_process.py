"""The sinks' place in the host process: closed at exit and on SIGTERM, restarted after fork.

Every live sink (not closed) registers itself here (`track`) as a `Tracked`: the registry
needs no import of the sink's class. At interpreter exit they are closed together, under one
deadline, while threads can still be started (Python 3.12 refuses new threads in plain atexit
callbacks; concurrent.futures uses the same hook): a task-mode sink whose event loop is gone
gets a thread for its worker then. The SIGTERM handler, if the settings allow it, closes them
and then does what the process did before. Strong references: a sink dropped without close()
still has events in flight.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Sequence
from time import time
from types import FrameType
from typing import Any, Protocol

from ._forwarder import Forwarder, close_all
from ._log import log


class Tracked(Protocol):
    """What the registry asks of a sink (`MLflowSink` is one)."""

    def worker_runs_in(self, thread: int) -> bool:
        """Whether its worker runs as a task of an event loop in ``thread``."""

    def restart_in_child(self) -> None:
        """After os.fork(), in the child: start afresh, with nothing of the parent's."""

    def prepare_close(self) -> Forwarder | None:
        """Ready to close: the forwarder to close (None: it never started one)."""

    def finish_close(self, started: float, timeout: float | None) -> None:
        """After its forwarder's close (begun at ``started``, under ``timeout``)."""


_live_sinks: set[Tracked] = set()


def track(sink: Tracked) -> None:
    _live_sinks.add(sink)


def untrack(sink: Tracked) -> None:
    _live_sinks.discard(sink)


def close_sinks(sinks: Sequence[Tracked], timeout: float | None) -> bool:
    """Close ``sinks`` at once, under one deadline (see `close_all`)."""
    ready = [(sink, sink.prepare_close()) for sink in sinks]
    open_ = [(sink, forwarder) for sink, forwarder in ready if forwarder is not None]
    started = time()
    done = close_all([forwarder for _, forwarder in open_], timeout)
    for sink, _ in open_:
        sink.finish_close(started, timeout)
        untrack(sink)
    return done


def close_live_sinks() -> None:
    """At exit (or on SIGTERM): every sink the user did not close, concurrently. Except a
    task-mode sink whose worker runs in this very thread's event loop (a SIGTERM landing in
    it): nothing can drive that loop from here; its ``async with`` closes it."""
    here = threading.get_ident()
    close_sinks([s for s in list(_live_sinks) if not s.worker_runs_in(here)], None)


def _restart_live_sinks_in_child() -> None:
    for sink in list(_live_sinks):
        sink.restart_in_child()


if hasattr(os, "register_at_fork"):  # POSIX: Windows does not fork
    os.register_at_fork(after_in_child=_restart_live_sinks_in_child)

_previous_sigterm: Any = None
_sigterm_installed = False


def install_sigterm_handler() -> None:
    """On SIGTERM, close every sink (deliver, or journal, within close_timeout), then do what
    the process did before: the user's handler, ignoring, or dying of the signal."""
    global _previous_sigterm, _sigterm_installed
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread
    _previous_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)
    _sigterm_installed = True


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    log.warning("SIGTERM: closing the MLflow sink(s) before exit", sinks=len(_live_sinks))
    close_live_sinks()
    previous = _previous_sigterm
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:  # the default: die of SIGTERM, as without us
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


_register_atexit = getattr(threading, "_register_atexit", None)
if _register_atexit is not None:
    _register_atexit(close_live_sinks)
else:  # pragma: no cover - every supported CPython has it
    import atexit

    atexit.register(close_live_sinks)
