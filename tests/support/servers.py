"""Real parts for tests and benchmarks: an `mlflow server`, a fault-injecting proxy, and a
scratch PostgreSQL database (this machine's, 127.0.0.1:5432, trust auth, database `test`).

The server starts on 127.0.0.1 in its own process group with the job runner off (it would
keep both cores busy for half a minute and can outlive a SIGTERM of the server); `stop` ends
the whole group. `FaultProxy` sits in front of it on loopback and, on request, answers 503 or
429 with Retry-After, adds latency, resets connections, or refuses chosen log-batch requests.
"""

from __future__ import annotations

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
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
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

    def start(self, timeout: float = 120.0) -> MlflowServer:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
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


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of ``target_port`` that injects faults on demand.

    Faults apply to the next requests in the order they were set: ``fail(n, status,
    retry_after)`` answers ``status`` to the next n requests, ``reset(n)`` resets the next n
    connections mid-request, ``delay`` adds seconds to every request, and ``refuse`` answers
    400 INVALID_PARAMETER_VALUE to every log-batch request whose JSON body it matches. While
    ``down`` is set, every connection is reset, as by a server that is not there.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.delay = 0.0
        self.down = False
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
                fault = ("reset", 0, None) if proxy.down else proxy._next_fault()
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
