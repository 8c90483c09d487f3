"""What bench/abuse.py found in the runtime (issue 16, "done when"), one test each, over
real sockets on 127.0.0.1: bodies that stop coming, websocket upgrades, bad requests
pipelined behind good ones, broken chunked bodies, methods on unknown paths, control
characters in request ids and on the health port, a no-code body of objects."""

from __future__ import annotations

import json
import re
import socket
import time

from conftest import free_port, write_script

SCRIPT = """
    def init():
        pass

    def run(raw_data):
        return {"n": len(raw_data)}
"""
KEY = "key-123"
HEADER_TIMEOUT = 1.0
SLACK = 4.0
ENV = {"MLBUILD_AUTH_KEYS": KEY, "MLBUILD_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
       "MLBUILD_KEEPALIVE_TIMEOUT": "60"}  # only the deadlines under test close anything


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_until_closed(sock: socket.socket, seconds: float,
                       dribble: bytes = b"") -> tuple[bytes, bool]:
    """What the server sends until it closes (True) or ``seconds`` pass (False); with
    ``dribble``, that is sent every 0.3 s meanwhile."""
    deadline = time.monotonic() + seconds
    data = b""
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(min(left, 0.3))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            if dribble:
                try:
                    sock.sendall(dribble)
                except OSError:
                    return data, True
            continue
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def _statuses(data: bytes) -> list[int]:
    """The status of every response in ``data`` (a body may end right before the next)."""
    return [int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]


def _head(method: str, path: str, *extra: str) -> bytes:
    return "\r\n".join([f"{method} {path} HTTP/1.1", "Host: x", *extra, "", ""]).encode()


def _metrics(server) -> str:
    return server.get("/metrics").text


def _counted(metrics: str, status: int) -> int:
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in metrics.splitlines()
               if line.startswith("http_server_request_duration_seconds_count{")
               and f'http_response_status_code="{status}"' in line)


def _score_head(length: int, *extra: str) -> bytes:
    return _head("POST", "/score", f"Authorization: Bearer {KEY}",
                 "Content-Type: application/json", f"Content-Length: {length}", *extra)


# -- a body that stops coming (the head limits' slowloris, one phase later) -------------
def test_a_body_that_stops_coming_gets_408_and_a_close(start_server, tmp_path):
    server = start_server(["--entry-script", str(write_script(tmp_path, SCRIPT))], env=ENV)
    stalled, dribbled = _connect(server.port), _connect(server.port)
    stalled.sendall(_score_head(1000) + b"{")
    dribbled.sendall(_score_head(1000) + b"{")
    answer, closed = _read_until_closed(stalled, HEADER_TIMEOUT * 2 + SLACK)
    assert closed and _statuses(answer) == [408], answer
    assert b"request body" in answer
    # A byte now and then does not buy the connection for ever: the body must arrive at
    # a minimum rate once its grace time has passed.
    answer, closed = _read_until_closed(dribbled, HEADER_TIMEOUT * 2 + SLACK, dribble=b" ")
    assert closed and _statuses(answer) == [408], answer
    assert server.post(body=b"{}", headers={"Authorization": f"Bearer {KEY}"}).status == 200
    assert _counted(_metrics(server), 408) == 2  # counted as what the client got, not 499


def test_a_body_dribbled_after_the_answer_does_not_hold_the_connection(start_server, tmp_path):
    server = start_server(["--entry-script", str(write_script(tmp_path, SCRIPT))], env=ENV)
    sock = _connect(server.port)
    sock.sendall(_head("POST", "/score", "Content-Length: 100000") + b"{")  # no key: 401
    answer, closed = _read_until_closed(sock, HEADER_TIMEOUT * 2 + SLACK, dribble=b" ")
    assert closed and _statuses(answer)[:1] == [401], answer


def test_a_body_slowed_by_the_server_is_not_cut(start_server, tmp_path):
    """A request queued behind a slow one (the client pipelined) waits with its body
    unread: that is the server's time, not the client's."""
    script = write_script(tmp_path, """
        import time

        def init():
            pass

        def run(raw_data):
            if raw_data == "slow":
                time.sleep(3 * 1.0)
            return {"n": len(raw_data)}
    """)
    server = start_server(["--entry-script", str(script)],
                          env={**ENV, "MLBUILD_RUN_DISPATCH": "thread"})
    sock = _connect(server.port)
    sock.sendall(_score_head(4) + b"slow" + _score_head(20000) + b" " * 20000)
    answer, _ = _read_until_closed(sock, 3 * HEADER_TIMEOUT + SLACK)
    assert _statuses(answer) == [200, 200], answer


# -- upgrades ----------------------------------------------------------------------------
def test_a_websocket_upgrade_is_answered_as_plain_http_and_counted(start_server, tmp_path):
    server = start_server(["--entry-script", str(write_script(tmp_path, SCRIPT))], env=ENV)
    sock = _connect(server.port)
    sock.sendall(_head("GET", "/score", "Upgrade: websocket", "Connection: Upgrade",
                       "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"))
    answer, closed = _read_until_closed(sock, SLACK)
    assert _statuses(answer) == [401], answer  # no websocket route: the key check answers
    assert closed  # nothing is read after an upgrade request: the connection ends
    assert _counted(_metrics(server), 401) == 1
    server.stop()
    assert "Unsupported upgrade" not in server.output()
    assert "ASGI callable returned without completing handshake" not in server.output()


# -- bad requests after good ones on one connection --------------------------------------
def test_garbage_pipelined_after_valid_requests_is_answered_after_them(start_server, tmp_path):
    server = start_server(["--entry-script", str(write_script(tmp_path, SCRIPT))], env=ENV)
    sock = _connect(server.port)
    sock.sendall(_head("GET", "/healthz/live") + _head("GET", "/") + b"\x16\x03garbage\r\n\r\n")
    answer, closed = _read_until_closed(sock, SLACK)
    assert closed and _statuses(answer) == [200, 200, 400], answer


def test_a_body_shorter_than_announced_with_garbage_after_it(start_server, tmp_path):
    server = start_server(["--entry-script", str(write_script(tmp_path, SCRIPT))], env=ENV)
    sock = _connect(server.port)
    sock.sendall(_score_head(2) + b"{}GARBAGE\r\n\r\n")
    answer, closed = _read_until_closed(sock, SLACK)
    assert closed and _statuses(answer) == [200, 400], answer


def test_a_broken_chunked_body_is_a_400_counted_as_400(start_server, tmp_path):
    server = start_server(["--entry-script", str(write_script(tmp_path, SCRIPT))], env=ENV)
    sock = _connect(server.port)
    sock.sendall(_head("POST", "/score", f"Authorization: Bearer {KEY}",
                       "Transfer-Encoding: chunked") + b"2\r\n{}\r\nzz\r\n")
    answer, closed = _read_until_closed(sock, SLACK)
    assert closed and _statuses(answer) == [400], answer
    assert b'"status_code": 400' in answer
    metrics = _metrics(server)
    assert _counted(metrics, 400) == 1 and _counted(metrics, 499) == 0, metrics


# -- routes ------------------------------------------------------------------------------
def test_an_unknown_path_is_404_not_405(start_server, tmp_path):
    server = start_server(["--entry-script", str(write_script(tmp_path, SCRIPT))], env=ENV)
    for method in ("POST", "PUT", "DELETE"):
        answer = server.request(method, "/scorex", body=b"{}")
        assert answer.status == 404, (method, answer.body)
    assert server.request("DELETE", "/").status == 405  # a route without that method


# -- the log -----------------------------------------------------------------------------
def test_request_ids_reach_the_access_log_escaped(start_server, tmp_path):
    server = start_server(["--entry-script", str(write_script(tmp_path, SCRIPT))], env=ENV)
    sock = _connect(server.port)
    sock.sendall(_head("GET", "/nope", "X-Request-Id: a\tb\xc2\x9b31m", "Connection: close"))
    answer, _ = _read_until_closed(sock, SLACK)
    assert _statuses(answer) == [404]
    server.stop()
    lines = [ln for ln in server.output().splitlines() if "GET /nope" in ln]
    assert lines and all(ln.isprintable() for ln in lines), lines
    assert "rid=a\\tb" in lines[0]


def test_the_health_port_escapes_its_log_and_answers_errors_with_a_status_line(
        start_server, tmp_path):
    health = free_port()
    server = start_server(["--entry-script", str(write_script(tmp_path, SCRIPT)),
                           "--health-port", str(health)], env=ENV)
    for request in (b"GET /\x1b[31mred HTTP/1.1\r\nConnection: close\r\n\r\n",
                    b"GET / HTTP/1.1\r\nX-Request-Id: \x1b[2J\x00\r\nConnection: close\r\n\r\n"):
        sock = _connect(health)
        sock.sendall(request)
        answer, _ = _read_until_closed(sock, SLACK)
        assert _statuses(answer) in ([404], [200]), answer
    sock = _connect(health)
    sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    answer, _ = _read_until_closed(sock, SLACK)
    assert answer.startswith(b"HTTP/1.1 505 "), answer  # was a bare HTML body
    server.stop()
    lines = [ln for ln in server.output().splitlines() if "(health port)" in ln]
    assert len(lines) == 2 and all(ln.isprintable() for ln in lines), lines


# -- the no-code path --------------------------------------------------------------------
def test_no_code_data_the_model_cannot_convert_is_a_400(start_server, tmp_path):
    import joblib
    from sklearn.linear_model import LinearRegression

    model = tmp_path / "model.pkl"
    joblib.dump(LinearRegression().fit([[0, 1], [1, 0], [1, 1]], [1, 2, 3]), model)
    server = start_server(["--no-code-model", str(model)], env=ENV)
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for data in ([[{}, {}]], [[[1], [2]]], [["a", "b"]], [[None, 1]]):
        answer = server.post(body=json.dumps({"data": data}), headers=auth)
        assert answer.status == 400, (data, answer.body)
        assert answer.json()["status_code"] == 400
    # The error names what is wrong without sending the body back (scikit-learn's
    # message quotes the array, here a 1 MB string).
    answer = server.post(body=json.dumps({"data": "a" * 1_000_000}), headers=auth)
    assert answer.status == 400 and len(answer.body) < 3000, len(answer.body)
