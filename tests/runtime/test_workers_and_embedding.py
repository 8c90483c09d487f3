"""Several worker processes, and the ASGI app embedded in-process via create_app."""

from __future__ import annotations

import asyncio
import json

import pytest

from conftest import write_script
from mlbuild.runtime.app import create_app
from mlbuild.runtime.config import RuntimeConfig
from mlbuild.runtime.scoring import Scorer

SCRIPT = """
    import os

    def init():
        pass

    def run(raw_data):
        return os.getpid()
"""


@pytest.mark.slow
def test_two_workers_serve_and_failing_init_stops_all(start_server, tmp_path):
    script = write_script(tmp_path, SCRIPT)
    server = start_server(["--entry-script", str(script), "--workers", "2"])
    pids = {server.post(body="{}").json() for _ in range(20)}
    assert pids and all(isinstance(p, int) for p in pids)
    bad = write_script(tmp_path, "def init():\n    raise RuntimeError('no model')\n"
                                 "def run(raw_data):\n    return 1\n", name="bad.py")
    failing = start_server(["--entry-script", str(bad), "--worker_count", "2"], wait=None)
    assert failing.wait_exit(timeout=30) == 3
    assert "no model" in failing.output()


async def _call(app, method, path, body=b"", headers=()):
    sent = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
             "client": ("127.0.0.1", 1)}
    await app(scope, receive, send)
    start = sent[0]
    return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


def test_create_app_in_process_with_a_custom_loader():
    calls = []
    scorer = Scorer(lambda payload: {"got": payload}, init=lambda: calls.append("init"),
                    mode="json")
    app = create_app(RuntimeConfig(auth_keys=("k1",), access_log=False), loader=lambda: scorer)
    app.start()
    app._loader_thread.join(timeout=5)
    assert app.ready and calls == ["init"]

    async def scenario():
        status, headers, body = await _call(app, "POST", "/score", b'{"a": 1}',
                                            [("Authorization", "Bearer k1")])
        assert (status, json.loads(body)) == (200, {"got": {"a": 1}})
        assert headers[b"content-type"] == b"application/json"
        status, headers, _ = await _call(app, "POST", "/score", b"{}")
        assert status == 401 and headers[b"www-authenticate"] == b"Bearer"
        status, _, body = await _call(app, "POST", "/score", b"{x",
                                      [("Authorization", "Bearer k1")])
        assert status == 400

    asyncio.run(scenario())


def test_create_app_loader_failure_calls_on_fatal():
    failed = []

    def loader():
        raise RuntimeError("broken")

    app = create_app(RuntimeConfig(access_log=False), loader=loader, on_fatal=failed.append)
    app.start()
    app._loader_thread.join(timeout=5)
    assert failed == [app] and not app.ready and "broken" in app.failure
