"""Fixtures that run the serving runtime as a real subprocess on 127.0.0.1."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

START_TIMEOUT = 20.0  # seconds: python + uvicorn import on a slow CI box
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers  # lower-cased names
        self.body = body

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def json(self):
        import json

        return json.loads(self.body)


class Server:
    """A runtime subprocess. ``request`` speaks HTTP with http.client (stdlib only)."""

    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path):
        self.proc = proc
        self.port = port
        self.log_path = log_path

    def request(self, method, path, body=None, headers=None, timeout=10.0) -> Response:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            if isinstance(body, str):
                body = body.encode()
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        finally:
            conn.close()

    def post(self, path="/score", body=None, headers=None, **kw) -> Response:
        return self.request("POST", path, body, headers, **kw)

    def get(self, path, headers=None, **kw) -> Response:
        return self.request("GET", path, None, headers, **kw)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait(self, path: str, ok, what: str, timeout: float) -> None:
        """Poll ``GET path`` until ``ok(response)``; fail if the server exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.output()}")
            try:
                if ok(self.get(path, timeout=2)):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"server not {what} after {timeout}s:\n{self.output()}")

    def wait_ready(self, timeout=START_TIMEOUT) -> None:
        self._wait("/healthz/ready", lambda r: r.status == 200, "ready", timeout)

    def wait_listening(self, timeout=START_TIMEOUT) -> None:
        self._wait("/healthz/live", lambda r: True, "listening", timeout)

    def wait_exit(self, timeout=START_TIMEOUT) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def write_script(folder: Path, source: str, name="score.py") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(source))
    return path


def runtime_env(extra: dict | None = None, pythonpath: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLBUILD_", "AZUREML_", "AML_", "SEPERATE_HEALTH_ENDPOINT",
                                "HEALTH_PORT", "SCORING_TIMEOUT_MS", "WORKER_COUNT",
                                "SERVICE_NAME", "SERVICE_VERSION"))}
    env["PYTHONUNBUFFERED"] = "1"
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    env.update(extra or {})
    return env


@pytest.fixture
def start_server(tmp_path):
    """``start_server(args=[...], env={...}, wait="ready"|"listening"|None) -> Server``."""
    servers: list[Server] = []

    def start(args=(), env=None, wait="ready", cwd=None, port=None, pythonpath=None):
        port = port or free_port()
        log_path = tmp_path / f"server-{port}-{len(servers)}.log"
        log = open(log_path, "wb")
        cmd = [sys.executable, "-m", "mlbuild.runtime", "--host", "127.0.0.1",
               "--port", str(port), *args]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                cwd=cwd or tmp_path, env=runtime_env(env, pythonpath))
        log.close()
        server = Server(proc, port, log_path)
        servers.append(server)
        if wait == "ready":
            server.wait_ready()
        elif wait == "listening":
            server.wait_listening()
        return server

    yield start
    for server in servers:
        server.stop()
