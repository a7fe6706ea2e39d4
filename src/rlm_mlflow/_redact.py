"""Secrets never leave through us: URIs lose their password, tokens are masked.

Used for everything we write where a person or a file could read it: status(), log lines,
the dead-letter file and the spool.
"""

from __future__ import annotations

import os
import re

#: Environment variables whose values are secrets (MLflow's auth settings).
SECRET_ENV_VARS = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD")
_USERINFO = re.compile(
    r"(?P<scheme>[a-zA-Z][\w+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@/\s]*)@"
)


def redact_uri(uri: str | None) -> str | None:
    """``scheme://user:pass@host/...`` becomes ``scheme://user:***@host/...``."""
    return redact_text(uri) if uri else uri


def redact_text(text: str) -> str:
    """Mask the password of every URI in ``text`` and the value of every secret variable."""
    text = _USERINFO.sub(r"\g<scheme>\g<user>:***@", text)
    for name in SECRET_ENV_VARS:
        secret = os.environ.get(name)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text
