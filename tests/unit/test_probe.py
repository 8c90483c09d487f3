"""``mlbuild.backends.process.probe``: the health probe of status and no-op deploys,
against a real HTTP server and a listener that does not speak HTTP, on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mlbuild.backends.process import probe


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        code = {"/healthz/ready": 200, "/busy": 503}.get(self.path, 404)
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_status_codes(server):
    assert probe(f"{server}/healthz/ready") == 200
    assert probe(f"{server}/busy") == 503
    assert probe(f"{server}/elsewhere") == 404
    assert probe(server) == 404  # no path: GET /


def test_nothing_listening_or_not_http_is_none():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert probe(f"http://127.0.0.1:{port}/healthz/ready", timeout=1) is None

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def garbage():
            conn, _ = listener.accept()
            conn.recv(1024)
            conn.sendall(b"SSH-2.0-OpenSSH\r\n")
            conn.close()

        t = threading.Thread(target=garbage)
        t.start()
        assert probe(f"http://127.0.0.1:{listener.getsockname()[1]}/x", timeout=2) is None
        t.join(5)
