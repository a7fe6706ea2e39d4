"""Our log lines: structlog's API on the standard library's ``logging.getLogger("rlm_mlflow")``.

We are a guest in the host's process, so we never print and never touch the host's logging or
structlog configuration: each line goes to that logger as one message (the event, then its
key=value pairs), with the pairs also on the record as ``record.rlm_mlflow`` (a dict) for
handlers that want them structured. Like urllib3, the logger has a NullHandler only: the
host decides handlers and levels (``logging.getLogger("rlm_mlflow").setLevel(...)``).
"""

from __future__ import annotations

import logging
from typing import Any

import structlog
from structlog.typing import EventDict, WrappedLogger

LOGGER_NAME = "rlm_mlflow"
#: The record attribute that carries the event and its pairs as a dict.
RECORD_KEY = "rlm_mlflow"

stdlib_logger = logging.getLogger(LOGGER_NAME)
stdlib_logger.addHandler(logging.NullHandler())


def _to_stdlib(_: WrappedLogger, __: str, event_dict: EventDict) -> tuple[Any, ...]:
    """The last processor: one message for humans, the dict for structured handlers."""
    exc_info = event_dict.pop("exc_info", None)
    pairs = " ".join(f"{key}={value!r}" for key, value in event_dict.items() if key != "event")
    message = f"{event_dict.get('event', '')} {pairs}".rstrip()
    return (message,), {"exc_info": exc_info, "extra": {RECORD_KEY: event_dict}}


log: structlog.stdlib.BoundLogger = structlog.wrap_logger(
    stdlib_logger,
    processors=[structlog.stdlib.filter_by_level, _to_stdlib],
    wrapper_class=structlog.stdlib.BoundLogger,
)
