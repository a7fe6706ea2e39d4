"""`shared_sink`: under autolog, one live `MLflowSink` per destination (tracking URI +
experiment) for the whole process, which every `AutologSink` of it sends through.

Only the standard library is imported here until the first call (`_autolog` imports this at
the start of every Python process ``rlm-mlflow instrument`` runs).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._sink import MLflowSink

_lock = threading.RLock()
_shared: dict[tuple[str | None, str], MLflowSink] = {}


def shared_sink(
    enabled: bool = False, experiment: str | None = None, tracking_uri: str | None = None
) -> MLflowSink:
    """The sink every `AutologSink` of this destination sends through.

    One live sink per destination for the whole process: a benchmark that builds a hundred
    runners starts one worker. It is closed at exit like every sink; a destination whose
    sink was closed meanwhile gets a new one.
    """
    from ._settings import DEFAULT_EXPERIMENT
    from ._sink import MLflowSink

    experiment = experiment or DEFAULT_EXPERIMENT
    if not enabled:
        return MLflowSink(False, experiment=experiment, tracking_uri=tracking_uri)
    key = (tracking_uri, experiment)
    with _lock:
        sink = _shared.get(key)
        if sink is None or sink.closed:
            sink = _shared[key] = MLflowSink(True, experiment=experiment, tracking_uri=tracking_uri)
        return sink
