"""``mlbuild status`` shows a running service's last minute of /score (requests, errors,
p99), read from its /metrics: the process target, the real runtime, real HTTP on
127.0.0.1 (mlbuild/traffic.py; the window itself: mlbuild/runtime/metrics.py)."""

from __future__ import annotations

import json
import urllib.request

import pytest
from clitools import CLI, free_port
from test_process_target import SAMPLE, keys_of, post, status_of, use_port


@pytest.fixture
def dev(diabetes):
    """The diabetes example on a free port, default target dev; stopped afterwards."""
    port = free_port()
    use_port(diabetes, port)
    cli = CLI(diabetes)
    yield cli, f"http://127.0.0.1:{port}", port
    cli("down", "dev", check=None)


def test_status_shows_the_last_minute_of_a_running_service(dev):
    cli, url, _ = dev
    cli("deploy", timeout=300)
    before = status_of(cli)
    assert before["state"] == "Healthy"
    assert before["traffic"] == {"window_seconds": 60, "requests": 0, "errors": 0,
                                 "client_errors": 0, "p99_ms": None}

    key, _ = keys_of(cli)
    body = (cli.cwd / SAMPLE).read_bytes()
    ok, failed, refused = 23, 4, 3
    for _ in range(ok):
        assert post(url, body, key)[0] == 200
    for _ in range(failed):  # run() raises: 500
        assert post(url, json.dumps({"data": "not numbers"}).encode(), key)[0] == 500
    for _ in range(refused):  # no key: 401
        assert post(url, body)[0] == 401
    for _ in range(5):  # health checks and scrapes are not scoring requests
        urllib.request.urlopen(f"{url}/healthz/ready", timeout=5).read()

    after = status_of(cli)
    seen = after["traffic"]
    assert seen["requests"] == ok + failed + refused
    assert seen["errors"] == failed
    assert seen["client_errors"] == refused
    assert seen["window_seconds"] == 60
    assert 0 < seen["p99_ms"] < 5000

    text = cli("status", "dev").stdout
    assert "LAST MINUTE" in text
    assert f"{ok + failed + refused} req, {failed} err, p99 " in text

    # `mlbuild logs` points at the metrics and at the status (on stderr: stdout is the log).
    r = cli("logs", "diabetes", "-n", "5")
    assert f"(metrics: {url}/metrics; last minute: mlbuild status dev)" in r.stderr
    assert "metrics:" not in r.stdout
