"""Real parts for tests and benchmarks: an `mlflow server` (plain, or with MLflow's basic-auth
app), a fault-injecting proxy (plain HTTP or TLS), and a scratch PostgreSQL database (this
machine's, 127.0.0.1:5432, trust auth, database `test`).

The server starts on 127.0.0.1 in its own process group with the job runner off (it would
keep both cores busy for half a minute and can outlive a SIGTERM of the server); `stop` ends
the whole group. `FaultProxy` sits in front of it on loopback and, on request, answers 503 or
429 with Retry-After, adds latency, resets connections, refuses chosen log-batch requests,
answers an HTML login page with 200, redirects, or plays a server without an endpoint: the
deployments users actually have (issue 16). Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import base64
import configparser
import contextlib
import datetime
import getpass
import http.client
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any


@contextlib.contextmanager
def scratch_postgres_database(prefix: str = "rlm_mlflow") -> Iterator[str]:
    """A database of its own on this machine's PostgreSQL (127.0.0.1:5432, trust auth, as
    the current user), yielded as a ``postgresql://`` URI and dropped afterwards."""
    import psycopg2  # the test extra; only what needs PostgreSQL imports it

    user = getpass.getuser()
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(host="127.0.0.1", port=5432, dbname="test", user=user)
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        yield f"postgresql://{user}@127.0.0.1:5432/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class MlflowServer:
    def __init__(
        self,
        root: Path,
        *,
        store_args: Sequence[str] | None = None,
        workers: int = 1,
        port: int | None = None,
    ) -> None:
        """``store_args`` are the backend and artifact options; by default a SQLite file and
        an artifact root under ``root``; ``[]`` for the server's own defaults."""
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.store_args = (
            list(store_args)
            if store_args is not None
            else [
                "--backend-store-uri",
                f"sqlite:///{root / 'mlflow.db'}",
                "--default-artifact-root",
                str(root / "artifacts"),
            ]
        )
        self.workers = workers
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = root / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        mlflow = Path(sys.executable).with_name("mlflow")
        return [
            str(mlflow),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
            *self.store_args,
        ]

    def environment(self) -> dict[str, str]:
        """The server's environment: ours, with the job runner off and no tracking URI."""
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        return env

    def start(self, timeout: float = 120.0) -> MlflowServer:
        env = self.environment()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                env=env,
                cwd=self.root,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            if self.healthy():
                return self
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"mlflow server not healthy after {timeout} s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, timeout: float = 15.0) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        pgid = process.pid  # start_new_session: the server leads its own group
        os.killpg(pgid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            process.wait()
        with contextlib.suppress(ProcessLookupError):  # children that ignored SIGTERM
            os.killpg(pgid, signal.SIGKILL)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class AuthApiError(RuntimeError):
    """A call to the auth server's REST API that it did not answer with a 2xx."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"{method} {path}: {status} {body[:300]}")
        self.status = status
        self.body = body


class AuthServer(MlflowServer):
    """`mlflow server --app-name basic-auth`: MLflow's own users, passwords and per-experiment
    permissions, with helpers that call the server's auth REST API as the admin.

    What it answers (MLflow 3.17, measured with ``requests``):

    - no credentials, a wrong password or an unknown user: ``401``, ``text/html; charset=utf-8``,
      ``WWW-Authenticate: Basic realm="mlflow"``, body ``You are not authenticated. Please see
      https://www.mlflow.org/docs/latest/auth/index.html#authenticating-to-mlflow on how to
      authenticate.`` (not JSON: no ``error_code``);
    - a missing permission (``runs/log-batch`` or ``runs/create`` in an experiment where the
      user has only READ): ``403``, ``text/html; charset=utf-8``, body ``Permission denied``;
    - ``POST /v1/traces``: the same two answers with ``text/plain; charset=utf-8`` (401 body as
      above, 403 ``Permission denied``); without the ``x-mlflow-experiment-id`` header ``400``
      ``Missing required header: X-Mlflow-Experiment-Id`` (text/plain) once authenticated;
    - ``/health`` and ``/api/3.0/mlflow/server-info`` are public (200 without credentials);
      ``/version`` and a path the server lacks answer 401 before they would answer 404.

    Facts that shape the helpers: passwords need at least 12 characters (else 400
    INVALID_PARAMETER_VALUE); a second grant on the same experiment is refused (400
    RESOURCE_ALREADY_EXISTS), so `grant` replaces; ``NO_PERMISSIONS`` is no longer grantable
    on an experiment (400; ``DENY`` is the explicit "nothing", and an absent grant falls back to
    ``default_permission``); any user, even with default READ, may create an experiment and gets
    MANAGE on it. A rotated password fails at once, with the credential cache on too as long
    as there is one worker (the update drops that worker's entry; other workers keep it up to
    the TTL). Without the cache every authenticated request costs the server 0.3-0.4 s here.
    """

    def __init__(
        self,
        root: Path,
        *,
        admin: tuple[str, str] = ("admin", "rig-admin-password"),
        default_permission: str = "READ",
        auth_cache_ttl: int = 0,
        store_args: Sequence[str] | None = None,
        workers: int = 1,
        port: int | None = None,
    ) -> None:
        """``auth_cache_ttl`` (seconds) turns on the server's credential cache: without it
        every authenticated request hashes the password again (PBKDF2)."""
        if len(admin[1]) < 12:
            raise ValueError("the auth server refuses passwords under 12 characters")
        super().__init__(root, store_args=store_args, workers=workers, port=port)
        self.admin = admin
        self.default_permission = default_permission
        self.auth_cache_ttl = auth_cache_ttl
        self.config_path = root / "basic_auth.ini"

    def command(self) -> list[str]:
        return [*super().command(), "--app-name", "basic-auth"]

    def environment(self) -> dict[str, str]:
        """Our config file, not the environment's: the ``MLFLOW_AUTH_ADMIN_*`` variables
        would take precedence over it; the CSRF secret the basic-auth app refuses to start
        without."""
        config = configparser.ConfigParser()
        config["mlflow"] = {
            "default_permission": self.default_permission,
            "database_uri": f"sqlite:///{self.root / 'basic_auth.db'}",
            "admin_username": self.admin[0],
            "admin_password": self.admin[1],
            "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
            "auth_cache_ttl_seconds": str(self.auth_cache_ttl),
        }
        with self.config_path.open("w") as f:
            config.write(f)
        env = super().environment()
        for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
            env.pop(name, None)
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(self.config_path)
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = f"rlm-mlflow-tests-{uuid.uuid4().hex}"
        return env

    def call(
        self,
        method: str,
        path: str,
        payload: Mapping[str, Any] | None = None,
        *,
        auth: tuple[str, str] | None = None,
    ) -> tuple[int, str]:
        """One request to the server (as the admin unless ``auth`` says otherwise), JSON in;
        returns the status and the body text, whatever the status."""
        url = self.url + path
        data = None
        if payload is not None and method == "GET":
            url += "?" + urllib.parse.urlencode(payload)
        elif payload is not None:
            data = json.dumps(payload).encode()
        user, password = auth or self.admin
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Authorization", f"Basic {token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as error:
            return int(error.code), error.read().decode(errors="replace")

    def _admin(self, method: str, path: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        status, body = self.call(method, path, payload)
        if not 200 <= status < 300:
            raise AuthApiError(method, path, status, body)
        answer: dict[str, Any] = json.loads(body or "{}")
        return answer

    def create_user(self, name: str, password: str) -> None:
        credentials = {"username": name, "password": password}
        self._admin("POST", "/api/2.0/mlflow/users/create", credentials)

    def update_password(self, name: str, password: str) -> None:
        """Rotate ``name``'s password on the server, as its admin would."""
        credentials = {"username": name, "password": password}
        self._admin("PATCH", "/api/2.0/mlflow/users/update-password", credentials)

    def create_experiment(self, name: str) -> str:
        """An experiment the admin owns (so a user has only ``default_permission`` on it)."""
        answer = self._admin("POST", "/api/2.0/mlflow/experiments/create", {"name": name})
        return str(answer["experiment_id"])

    def experiment_id(self, experiment: str) -> str:
        """The id of the experiment named ``experiment``, or ``experiment`` itself if no
        experiment has that name (it is taken for an id)."""
        status, body = self.call(
            "GET", "/api/2.0/mlflow/experiments/get-by-name", {"experiment_name": experiment}
        )
        if status == 200:
            return str(json.loads(body)["experiment"]["experiment_id"])
        return experiment

    def grant(self, experiment: str, user: str, permission: str) -> None:
        """Give ``user`` exactly ``permission`` (READ, USE, EDIT, MANAGE or DENY) on the
        experiment (a name or an id), replacing any grant it had there."""
        self.revoke(experiment, user)
        self._admin(
            "POST",
            "/api/3.0/mlflow/users/permissions/grant",
            {
                "username": user,
                "resource_type": "experiment",
                "resource_id": self.experiment_id(experiment),
                "permission": permission,
            },
        )

    def revoke(self, experiment: str, user: str) -> None:
        """Remove ``user``'s grant on the experiment (back to ``default_permission``); a grant
        that is not there is no error."""
        try:
            self._admin(
                "POST",
                "/api/3.0/mlflow/users/permissions/revoke",
                {
                    "username": user,
                    "resource_type": "experiment",
                    "resource_id": self.experiment_id(experiment),
                },
            )
        except AuthApiError as error:
            if error.status != 404 or "Permission for user=" not in error.body:
                raise

    def permission(self, experiment: str, user: str) -> str:
        """``user``'s effective permission on the experiment, as the server resolves it."""
        answer = self._admin(
            "GET",
            "/api/3.0/mlflow/users/permissions/get",
            {
                "username": user,
                "resource_type": "experiment",
                "resource_id": self.experiment_id(experiment),
            },
        )
        return str(answer["permission"])

    @staticmethod
    def credentials_env(user: str, password: str) -> dict[str, str]:
        """The variables MLflow's own client reads for basic auth (for a subprocess or
        ``monkeypatch``)."""
        return {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}


@dataclass(frozen=True)
class Certificate:
    """A throwaway TLS identity for 127.0.0.1 and localhost: ``ca_path`` is what a client
    trusts (``REQUESTS_CA_BUNDLE``, ``MLFLOW_TRACKING_SERVER_CERT_PATH``), ``cert_path`` and
    ``key_path`` what the server presents."""

    ca_path: Path
    cert_path: Path
    key_path: Path


def make_certificate(
    directory: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost")
) -> Certificate:
    """A test CA and a server certificate it signs for ``hosts``, written under ``directory``
    (made at test time with ``cryptography``, which mlflow installs). A CA and a leaf rather
    than one self-signed leaf, so strict X.509 verification accepts the chain too."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def usage(**allowed: bool) -> x509.KeyUsage:
        flags = "digital_signature content_commitment key_encipherment data_encipherment"
        flags += " key_agreement key_cert_sign crl_sign encipher_only decipher_only"
        return x509.KeyUsage(**{flag: allowed.get(flag, False) for flag in flags.split()})

    def alt_name(host: str) -> x509.GeneralName:
        try:
            return x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            return x509.DNSName(host)

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    begin, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=2)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("rlm-mlflow test CA"))
        .issuer_name(name("rlm-mlflow test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(begin)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage(digital_signature=True, key_cert_sign=True, crl_sign=True), True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(name(hosts[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(begin)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([alt_name(h) for h in hosts]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    certificate = Certificate(
        directory / "ca.pem", directory / "server.pem", directory / "server.key"
    )
    certificate.ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    certificate.cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    certificate.key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return certificate


# What an SSO proxy or a maintenance page answers in front of a server: 200, and not MLflow's.
LOGIN_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head>\n<body><h1>Sign in</h1>\n"
    b'<form method="post" action="/login"><input name="username">'
    b'<input name="password" type="password"><button>Sign in</button></form>\n</body></html>\n'
)
# What Werkzeug answers for a path or a method a Flask app lacks; MLflow 3.17 serves these very
# pages (measured), and so does a 2.x server for /v1/traces, which it does not have.
NOT_FOUND_PAGE = (
    b"<!doctype html>\n<html lang=en>\n<title>404 Not Found</title>\n<h1>Not Found</h1>\n"
    b"<p>The requested URL was not found on the server. If you entered the URL manually please "
    b"check your spelling and try again.</p>\n"
)
METHOD_NOT_ALLOWED_PAGE = (
    b"<!doctype html>\n<html lang=en>\n<title>405 Method Not Allowed</title>\n"
    b"<h1>Method Not Allowed</h1>\n<p>The method is not allowed for the requested URL.</p>\n"
)
HTML = "text/html; charset=utf-8"
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
MISSING_STATUSES = (404, 405, 501)


@dataclass
class _HtmlMode:
    remaining: int | None  # None: until cleared
    matches: Callable[[str], bool]
    body: bytes


class _QuietServer(ThreadingHTTPServer):
    """A client that refuses our certificate or drops its connection is a test's business,
    not a traceback on stderr."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):  # ssl.SSLError, resets, broken pipes
            return
        super().handle_error(request, client_address)


class FaultProxy:
    """An HTTP(S) proxy on 127.0.0.1 in front of ``target_port`` that injects faults on demand.

    Faults apply to the next requests in the order they were set: ``fail(n, status,
    retry_after)`` answers ``status`` to the next n requests, ``reset(n)`` resets the next n
    connections mid-request, ``delay`` adds seconds to every request, and ``refuse`` answers
    400 INVALID_PARAMETER_VALUE to every log-batch request whose JSON body it matches. While
    ``down`` is set, every connection is reset, as by a server that is not there.

    Modes, until `clear`: `redirect` sends every request elsewhere, `html` answers 200 with a
    login page, a path in ``missing`` is answered as by a server without that endpoint (501, or
    the status `lack` chose). A request meets them in this order: queued fail/reset, redirect,
    html, missing, refuse, then it is forwarded. ``served`` counts outcomes, ``served_paths``
    every request that arrived, by path (without the query).

    With ``tls`` it speaks HTTPS (``url`` says ``https://``) and forwards in plain HTTP: a TLS
    front for the plain server, whose handshakes that fail count as ``served["handshake_failed"]``.
    """

    def __init__(self, target_port: int, *, tls: Certificate | None = None) -> None:
        self.target_port = target_port
        self.tls = tls
        self.delay = 0.0
        self.down = False
        self.refuse: Callable[[dict[str, Any]], bool] | None = None
        self.missing: set[str] = set()  # paths answered as missing (an endpoint the server lacks)
        self.missing_status: dict[str, int] = {}  # their status, when not 501
        self.served: dict[str, int] = dict.fromkeys(self._OUTCOMES, 0)
        self.served_paths: dict[str, int] = {}
        self._faults: list[tuple[str, int, int | None]] = []  # (kind, status, retry_after)
        self._html: _HtmlMode | None = None
        self._redirect: tuple[int, str] | None = None
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), self._handler())
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(tls.cert_path, tls.key_path)
            # The handshake happens in the request's thread (Handler.setup), so a client that
            # stalls or refuses the certificate never holds up the accept loop.
            self._server.socket = context.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )  # a short poll: shutdown() waits for it, at the end of every test that has a proxy

    _OUTCOMES = (
        "forwarded",
        "failed",
        "reset",
        "refused",
        "html",
        "redirected",
        "missing",
        "handshake_failed",
    )

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def fail(self, n: int, status: int, retry_after: int | None = None) -> None:
        with self._lock:
            self._faults += [("fail", status, retry_after)] * n

    def reset(self, n: int) -> None:
        with self._lock:
            self._faults += [("reset", 0, None)] * n

    def html(
        self,
        n: int | None = None,
        paths: str | Callable[[str], bool] | None = None,
        *,
        body: bytes = LOGIN_PAGE,
    ) -> None:
        """Answer 200 ``text/html`` with ``body`` (a login page, as an SSO proxy or a
        maintenance page would) to the next ``n`` requests whose path matches ``paths`` (a
        prefix or a predicate on the path without its query; None: every path); ``n=None``
        until cleared."""
        prefix = paths if isinstance(paths, str) else ""
        matches = paths if callable(paths) else lambda path: path.startswith(prefix)
        with self._lock:
            self._html = _HtmlMode(n, matches, body) if n is None or n > 0 else None

    def redirect(self, status: int, location: str) -> None:
        """Answer every request (until cleared) ``status`` with ``Location: location +
        the request's path and query``, e.g. ``redirect(308, server.url)``."""
        if status not in REDIRECT_STATUSES:
            raise ValueError(f"not a redirect status: {status}")
        with self._lock:
            self._redirect = (status, location.rstrip("/"))

    def lack(self, *paths: str, status: int = 404) -> None:
        """Answer these paths as a server without them: 404 with Werkzeug's HTML page (a plain
        web server, an MLflow 2.x without ``/v1/traces``), 405 with its HTML page and an
        ``Allow`` header (a static server that takes no POST), or 501 ``not implemented``."""
        if status not in MISSING_STATUSES:
            raise ValueError(f"status {status} is not one of {MISSING_STATUSES}")
        with self._lock:
            self.missing.update(paths)
            self.missing_status.update(dict.fromkeys(paths, status))

    def clear(self, *, counts: bool = False) -> None:
        """Stop every fault and mode (queued failures and resets, delay, refuse, missing, html,
        redirect); with ``counts``, zero ``served`` and ``served_paths`` too."""
        with self._lock:
            self._faults.clear()
            self.delay = 0.0
            self.refuse = None
            self.missing.clear()
            self.missing_status.clear()
            self._html = None
            self._redirect = None
            if counts:
                self.served.update(dict.fromkeys(self.served, 0))
                self.served_paths.clear()

    def _next_fault(self) -> tuple[str, int, int | None] | None:
        with self._lock:
            return self._faults.pop(0) if self._faults else None

    def _count(self, outcome: str) -> None:
        with self._lock:
            self.served[outcome] = self.served.get(outcome, 0) + 1

    def _arrived(self, path: str) -> None:
        with self._lock:
            self.served_paths[path] = self.served_paths.get(path, 0) + 1

    def _take_html(self, path: str) -> bytes | None:
        """The page to answer ``path`` with, if html mode wants it (one of its n spent)."""
        with self._lock:
            mode = self._html
            if mode is None or not mode.matches(path):
                return None
            if mode.remaining is not None:
                mode.remaining -= 1
                if mode.remaining <= 0:
                    self._html = None
            return mode.body

    def _missing_answer(self, path: str) -> tuple[int, bytes, dict[str, str]] | None:
        with self._lock:
            if path not in self.missing:
                return None
            status = self.missing_status.get(path, 501)
        if status == 404:
            return 404, NOT_FOUND_PAGE, {"Content-Type": HTML}
        if status == 405:
            return 405, METHOD_NOT_ALLOWED_PAGE, {"Content-Type": HTML, "Allow": "GET, HEAD"}
        return status, b"not implemented", {}

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def setup(self) -> None:
                tls = self.request  # the accepted socket (``connection`` once set up)
                if isinstance(tls, ssl.SSLSocket):
                    tls.settimeout(10)
                    try:
                        tls.do_handshake()
                    except OSError:
                        proxy._count("handshake_failed")
                        raise
                    tls.settimeout(None)
                super().setup()

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?")[0]
                proxy._arrived(path)
                if proxy.delay:
                    time.sleep(proxy.delay)
                fault = ("reset", 0, None) if proxy.down else proxy._next_fault()
                if fault is not None and fault[0] == "reset":
                    proxy._count("reset")
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    self.connection.close()
                    self.close_connection = True
                    return
                if fault is not None:
                    proxy._count("failed")
                    headers = {"Retry-After": str(fault[2])} if fault[2] is not None else {}
                    self._answer(fault[1], b"unavailable", headers)
                    return
                redirect = proxy._redirect
                if redirect is not None:
                    proxy._count("redirected")
                    location = redirect[1] + self.path
                    moved = f'<a href="{location}">moved</a>\n'.encode()
                    self._answer(redirect[0], moved, {"Location": location, "Content-Type": HTML})
                    return
                page = proxy._take_html(path)
                if page is not None:
                    proxy._count("html")
                    self._answer(200, page, {"Content-Type": HTML})
                    return
                missing = proxy._missing_answer(path)
                if missing is not None:
                    proxy._count("missing")
                    self._answer(*missing)
                    return
                refuse = proxy.refuse
                if (
                    refuse is not None
                    and path.endswith("/runs/log-batch")
                    and refuse(json.loads(body or b"{}"))
                ):
                    proxy._count("refused")
                    message = {
                        "error_code": "INVALID_PARAMETER_VALUE",
                        "message": "refused by the test proxy: bad entity",
                    }
                    self._answer(
                        400, json.dumps(message).encode(), {"Content-Type": "application/json"}
                    )
                    return
                self._forward(body)

            def _forward(self, body: bytes) -> None:
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.target_port, timeout=60)
                try:
                    headers = {
                        k: v
                        for k, v in self.headers.items()
                        if k.lower() not in {"host", "connection", "content-length"}
                    }
                    upstream.request(self.command, self.path, body=body or None, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                    keep = {
                        k: v
                        for k, v in response.getheaders()
                        if k.lower() not in {"transfer-encoding", "connection", "content-length"}
                    }
                    proxy._count("forwarded")
                    self._answer(response.status, data, keep)
                except OSError:
                    self._answer(502, b"upstream unreachable", {})
                finally:
                    upstream.close()

            def _answer(self, status: int, data: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _handle

        return Handler
