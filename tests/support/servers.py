"""Real parts for tests and benchmarks: an `mlflow server` (plain, or with MLflow's basic-auth
app), a fault-injecting proxy, and a scratch PostgreSQL database (this machine's,
127.0.0.1:5432, trust auth, database `test`).

The server starts on 127.0.0.1 in its own process group with the job runner off (it would
keep both cores busy for half a minute and can outlive a SIGTERM of the server); `stop` ends
the whole group. `FaultProxy` sits in front of it on loopback and, on request, answers 503 or
429 with Retry-After, adds latency, resets connections, or refuses chosen log-batch requests;
`AuthServer` is the server with MLflow's basic-auth app (issue 16: the deployments users
actually have). Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import base64
import configparser
import contextlib
import getpass
import http.client
import json
import os
import signal
import socket
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


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of ``target_port`` that injects faults on demand.

    Faults apply to the next requests in the order they were set: ``fail(n, status,
    retry_after)`` answers ``status`` to the next n requests, ``reset(n)`` resets the next n
    connections mid-request, ``delay`` adds seconds to every request, and ``refuse`` answers
    400 INVALID_PARAMETER_VALUE to every log-batch request whose JSON body it matches.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.delay = 0.0
        self.refuse: Callable[[dict[str, Any]], bool] | None = None
        self.missing: set[str] = set()  # paths answered 501 (an endpoint the server lacks)
        self.served: dict[str, int] = {"forwarded": 0, "failed": 0, "reset": 0, "refused": 0}
        self._faults: list[tuple[str, int, int | None]] = []  # (kind, status, retry_after)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail(self, n: int, status: int, retry_after: int | None = None) -> None:
        with self._lock:
            self._faults += [("fail", status, retry_after)] * n

    def reset(self, n: int) -> None:
        with self._lock:
            self._faults += [("reset", 0, None)] * n

    def _next_fault(self) -> tuple[str, int, int | None] | None:
        with self._lock:
            return self._faults.pop(0) if self._faults else None

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

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.delay:
                    time.sleep(proxy.delay)
                fault = proxy._next_fault()
                if fault is not None and fault[0] == "reset":
                    proxy.served["reset"] += 1
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    self.connection.close()
                    self.close_connection = True
                    return
                if fault is not None:
                    proxy.served["failed"] += 1
                    headers = {"Retry-After": str(fault[2])} if fault[2] is not None else {}
                    self._answer(fault[1], b"unavailable", headers)
                    return
                if self.path.split("?")[0] in proxy.missing:
                    self._answer(501, b"not implemented", {})
                    return
                refuse = proxy.refuse
                if (
                    refuse is not None
                    and self.path.endswith("/runs/log-batch")
                    and refuse(json.loads(body or b"{}"))
                ):
                    proxy.served["refused"] += 1
                    message = {
                        "error_code": "INVALID_PARAMETER_VALUE",
                        "message": "refused by the test proxy: bad entity",
                    }
                    self._answer(400, json.dumps(message).encode(), {})
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
                    proxy.served["forwarded"] += 1
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
