"""MLflow's limits on what it stores, and the checks every value passes against them (pure;
no mlflow here): keys, lengths, text that can be encoded, and a short repr for messages."""

from __future__ import annotations

import posixpath
import re
import reprlib
from typing import Any

#: MLflow's log_batch takes at most 100 params and tags per call.
MAX_PARAMS_PER_BATCH = 100
#: MLflow's limits on what it stores (mlflow/utils/validation.py).
MAX_PARAM_VALUE_CHARS = 6000
MAX_TAG_VALUE_CHARS = 8000
MAX_KEY_CHARS = 250
MAX_RUN_NAME_CHARS = 250
MAX_STEP = 2**63 - 1
_VALID_KEY = re.compile(r"[/\w.\- :]+")


_shorten = reprlib.Repr()
_shorten.maxstring = _shorten.maxother = 80


def show(value: Any) -> str:
    """A short repr for messages, of any value (a repr that raises, or a huge one, too)."""
    try:
        return _shorten.repr(value)
    except Exception:
        return f"<{type(value).__name__}>"


def encodable(text: str) -> bool:
    """Whether ``text`` can be stored: a lone surrogate (e.g. from bytes decoded with
    ``surrogateescape``) cannot be encoded as UTF-8, and MLflow's stores fail on it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def key_problem(key: Any) -> str | None:
    """Why MLflow would refuse ``key`` as a param or tag name, or None."""
    if not isinstance(key, str) or not key:
        return f"key is not a non-empty string: {show(key)}"
    if len(key) > MAX_KEY_CHARS:
        return f"key longer than {MAX_KEY_CHARS} characters"
    if not _VALID_KEY.fullmatch(key) or not key.isascii():
        return f"key {show(key)} has characters MLflow refuses (allowed: letters, digits, _-./: )"
    normalized = posixpath.normpath(key)
    if normalized != key or normalized == "." or key.startswith(("..", "/")):
        return f"key {show(key)} is not a plain path"
    return None
