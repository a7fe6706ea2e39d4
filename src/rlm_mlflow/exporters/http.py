"""What a tracking server's HTTP answer means: MLflow's answer to what we sent, or a failure of
one of three kinds (docs/deployments.md, "Three kinds of failure").

A 2xx is a delivery only if its body is MLflow's: a JSON object (or, from ``/v1/traces``,
OTLP's protobuf), never an HTML page. Failures are *transient* (408, 429, 500, 502, 503, 504,
no answer: `HttpError` / `Unreachable`, retried to the deadline), *configuration* (401, 403,
a redirect that turns our POST into a GET, no MLflow API at the path, a body that is not
MLflow's, a TLS check that fails: `Misconfigured`, with the cause and the remedy in one
line), or MLflow's own refusal with its JSON error (`HttpError`: bisected when it refuses a
value, see `is_entity_error`).
"""

from __future__ import annotations

import urllib.parse
from typing import Any

from .._redact import redact_text
from .base import (
    MAX_RETRY_AFTER,
    TRANSIENT_HTTP,
    FeatureUnsupported,
    HttpError,
    Misconfigured,
    TracesUnsupported,
    Unreachable,
)

#: Redirects on which HTTP clients re-send a POST as a GET, without its body.
METHOD_CHANGING = frozenset({301, 302, 303})


def answer(
    response: Any,
    uri: str,
    *,
    traces: bool = False,
    upload: bool = False,
    feature: str | None = None,
) -> dict[str, Any]:
    """MLflow's answer as a dict, or the failure it is, raised. ``uri``: the tracking URI
    (for messages); ``traces``: the request went to ``/v1/traces``, where a 404, 405 or 501
    means the store takes no traces (`TracesUnsupported`); ``upload``: a file PUT to the
    artifact proxy, which MLflow 3.17's artifact router answers 200 with no body at all;
    ``feature``: the request is one of that feature's, which the store lacks if it answers
    405, 501, or a 404 that is not MLflow's "no such entity" (`FeatureUnsupported`)."""
    where = redact_text(uri)
    moved = next((r for r in response.history if r.status_code in METHOD_CHANGING), None)
    if moved is not None:
        raise _redirected(moved, where)
    status = response.status_code
    media = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    body = None if media == "text/html" else _json_object(response)  # a page is never ours
    if 200 <= status < 300:
        if body is not None:
            return body
        if traces and media == "application/x-protobuf":
            return {}
        if upload and not response.content and media != "text/html":
            return {}
        raise Misconfigured(
            f"the answer from {where} is not MLflow's ({media or 'no content type'} {status}): "
            "a proxy or login page in between? check the tracking URI"
        )
    if 300 <= status < 400:
        raise _redirected(response, where)
    if status == 401:
        raise Misconfigured(
            f"401 from {where}: the server refuses our credentials; check "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
        )
    if status == 403:
        raise Misconfigured(
            f"403 from {where} for {_path(response)}: this user has no permission for it; "
            "grant it EDIT on the experiment (or use a user who has it)"
        )
    if traces and status in (404, 405, 501):
        raise TracesUnsupported(f"{status} from /v1/traces")
    if feature is not None and _lacks(status, body):
        raise FeatureUnsupported(feature, f"{status} from {where} for {_path(response)}")
    error = _http_error(response, body)
    if status in TRANSIENT_HTTP or status == 413 or body is not None:
        raise error  # transient, too large (bisected), or MLflow's own refusal
    raise Misconfigured(
        f"{status} from {where} for {_path(response)}, and not MLflow's answer "
        f"({media or 'no content type'}): is this an MLflow tracking server (a path prefix "
        "missing from the tracking URI)?"
    )


def request_failure(exc: Exception, uri: str, what: str) -> Exception:
    """What a request that got no answer means: a TLS check or a URL that cannot work
    (`Misconfigured`), else no answer for now (`Unreachable`, transient). An exception that
    is not the HTTP client's comes back as it is."""
    import requests

    where = redact_text(uri)
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, requests.exceptions.SSLError):
            return Misconfigured(
                f"the TLS check of {where} failed ({redact_text(str(cause))[:200]}); set "
                "MLFLOW_TRACKING_SERVER_CERT_PATH (or REQUESTS_CA_BUNDLE) to the CA bundle that "
                "signed the server's certificate, or MLFLOW_TRACKING_INSECURE_TLS=true"
            )
        if isinstance(cause, requests.exceptions.TooManyRedirects):
            return Misconfigured(f"{where} redirects in a loop; check the tracking URI")
        if isinstance(cause, (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema)):
            return Misconfigured(f"{where} is not a URL requests can use; check the tracking URI")
        if isinstance(cause, requests.exceptions.RequestException):
            return Unreachable(f"{what}: {type(exc).__name__}: {redact_text(str(exc))[:300]}")
        cause = cause.__cause__ or cause.__context__
    return exc


def _lacks(status: int, body: dict[str, Any] | None) -> bool:
    """An answer that says the endpoint is not there (an older MLflow, a proxy that does not
    route it, a store without it: MLflow answers NOT_IMPLEMENTED with 501)."""
    if status in (405, 501):
        return True
    return status == 404 and (body is None or body.get("error_code") == "ENDPOINT_NOT_FOUND")


def _redirected(response: Any, where: str) -> Misconfigured:
    location = response.headers.get("Location", "")
    target = urllib.parse.urljoin(response.url or "", location) if location else "elsewhere"
    target = urllib.parse.urlunsplit(urllib.parse.urlsplit(target)._replace(query="", fragment=""))
    path = urllib.parse.urlsplit(response.url or "").path
    base = target[: -len(path)] if path and target.endswith(path) else target
    return Misconfigured(
        f"{where} redirects ({response.status_code}) to {redact_text(base)}: use that as the "
        "tracking URI (a redirect turns our POSTs into GETs)"
    )


def _path(response: Any) -> str:
    request = getattr(response, "request", None)
    method = getattr(request, "method", None) or "a request"
    return f"{method} {urllib.parse.urlsplit(response.url or '').path or '/'}"


def _json_object(response: Any) -> dict[str, Any] | None:
    try:
        body = response.json() if response.content else None
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _http_error(response: Any, body: dict[str, Any] | None) -> HttpError:
    if body is not None:
        code, message = str(body.get("error_code", "")), str(body.get("message", body))
    else:
        code, message = "", response.text[:500]
    retry_after: float | None = None
    header = response.headers.get("Retry-After")
    if header:
        try:
            retry_after = min(MAX_RETRY_AFTER, max(0.0, float(header)))
        except ValueError:
            retry_after = None
    return HttpError(
        response.status_code, code or f"HTTP_{response.status_code}", message, retry_after
    )
