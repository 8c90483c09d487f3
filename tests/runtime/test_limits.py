"""Slow and oversized request heads (issue 16, points 1 and 2), on 127.0.0.1.

A head that does not arrive in time is answered 408 and closed (a connection that sent
nothing is just closed); one too large is answered 414 (request line) or 431 (headers),
with ``Connection: close``; meanwhile valid requests keep their answers and the server
keeps its memory. Timeouts are set short through the environment; every wait is bounded.
"""

from __future__ import annotations

import os
import resource
import socket
import time

import pytest
from conftest import free_port, write_script

from mlbuild.runtime.__main__ import build_parser
from mlbuild.runtime.config import (
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_KEEPALIVE_TIMEOUT,
    DEFAULT_MAX_HEADER_BYTES,
    ServerOptions,
)

SCRIPT = """
    def init():
        pass

    def run(raw_data):
        return {"n": len(raw_data)}
"""

HEADER_TIMEOUT = 1.0
SLACK = 4.0  # seconds beyond a timeout before a test calls it "never": a loaded CI box
# Idle keep-alive kept long, so that only the header deadline can close a connection.
SLOW_ENV = {"MLBUILD_HEADER_TIMEOUT": str(HEADER_TIMEOUT), "MLBUILD_KEEPALIVE_TIMEOUT": "60"}
HALF_HEAD = b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Half: "
MIB = 1024 * 1024


# -- raw-socket helpers ------------------------------------------------------------------
def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _send(sock: socket.socket, data: bytes) -> None:
    """sendall, ignoring a server that stopped listening (it answered already)."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


def _until_closed(sock: socket.socket, deadline: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes the connection (True), or until
    ``deadline`` (False: still open)."""
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return data, False
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data, False
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk


def _status(answer: bytes) -> int | None:
    """The status code of the first response in ``answer``."""
    parts = answer.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[0].startswith(b"HTTP/") else None


def _headers(answer: bytes) -> dict[str, str]:
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in head)}


def _refused(sock: socket.socket, deadline: float) -> tuple[int | None, dict]:
    answer, closed = _until_closed(sock, deadline)
    assert closed, f"connection still open; received {answer[:200]!r}"
    return _status(answer), _headers(answer) if answer else {}


def _statuses(sock: socket.socket, count: int) -> list[int | None]:
    """Read ``count`` responses with Content-Length bodies (the connection stays open)."""
    data, out = b"", []
    while len(out) < count:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"closed mid-response: {data!r}"
            data += chunk
        head, data = data.split(b"\r\n\r\n", 1)
        length = int(_headers(head + b"\r\n\r\n")["content-length"])
        while len(data) < length:
            chunk = sock.recv(65536)
            assert chunk, "closed mid-body"
            data += chunk
        out.append(_status(head))
        data = data[length:]
    return out


def _get(path: str, extra: bytes = b"") -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n"


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _assert_serving(server) -> None:
    assert server.get("/healthz/live", timeout=5).status == 200
    scored = server.post(body='{"data": [1]}', timeout=5)
    assert scored.status == 200, scored.body


# -- point 1: slow clients ---------------------------------------------------------------
def test_slow_heads_are_closed_while_valid_requests_are_answered(start_server, tmp_path):
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    count = max(20, min(300, (soft - 200) // 2))  # this process and the server hold one each
    server = start_server(["--entry-script", str(write_script(tmp_path, SCRIPT))],
                          env=SLOW_ENV)
    baseline_fds = _open_fds(server.proc.pid)
    opened = time.monotonic()
    half, silent = [], []
    for i in range(count):
        sock = _connect(server.port)
        if i % 5:
            sock.sendall(HALF_HEAD)
            half.append(sock)
        else:
            silent.append(sock)  # connects, sends nothing
    try:
        _assert_serving(server)  # while every slow connection is open
        deadline = opened + HEADER_TIMEOUT + SLACK
        for sock in half:
            status, headers = _refused(sock, deadline)
            assert (status, headers.get("connection")) == (408, "close")
            sock.close()  # the server drains a refused connection until the client closes
        for sock in silent:
            assert _until_closed(sock, deadline) == (b"", True)
        assert time.monotonic() - opened >= HEADER_TIMEOUT * 0.9  # the deadline, not sooner
        _assert_serving(server)
        until = time.monotonic() + SLACK
        while _open_fds(server.proc.pid) > baseline_fds + 5 and time.monotonic() < until:
            time.sleep(0.05)
        assert _open_fds(server.proc.pid) <= baseline_fds + 5  # the descriptors are back
    finally:
        for sock in half + silent:
            sock.close()


def test_a_head_dribbled_byte_by_byte_meets_a_total_deadline(start_server, tmp_path):
    # A byte every 0.2 s: every gap is far below the timeout, only a deadline on the
    # whole head cuts it.
    server = start_server(["--entry-script", str(write_script(tmp_path, SCRIPT))],
                          env=SLOW_ENV)
    sock = _connect(server.port)
    started = time.monotonic()
    answer, closed = b"", False
    with sock:
        for byte in (HALF_HEAD + b"x" * 200):
            if time.monotonic() - started > HEADER_TIMEOUT + SLACK:
                break
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            answer, closed = _until_closed(sock, time.monotonic() + 0.2)
            if answer or closed:
                break
        if answer and not closed:
            answer += _until_closed(sock, time.monotonic() + SLACK)[0]
    assert closed or answer, "a dribbled head was never cut"
    assert _status(answer) == 408
    assert time.monotonic() - started < HEADER_TIMEOUT + SLACK
    _assert_serving(server)


def test_a_half_request_after_a_keepalive_request_is_closed(start_server, tmp_path):
    server = start_server(["--entry-script", str(write_script(tmp_path, SCRIPT))],
                          env=SLOW_ENV)
    with _connect(server.port) as sock:
        for _ in range(2):  # completed keep-alive requests on the connection
            sock.sendall(_get("/healthz/live"))
            assert _statuses(sock, 1) == [200]
        time.sleep(HEADER_TIMEOUT * 1.5)  # idle for longer than the header deadline: fine
        sock.sendall(_get("/healthz/live"))
        assert _statuses(sock, 1) == [200]
        sock.sendall(HALF_HEAD)
        status, headers = _refused(sock, time.monotonic() + HEADER_TIMEOUT + SLACK)
    assert (status, headers.get("connection")) == (408, "close")


SLOW_RUN_SCRIPT = """
    import time

    def init():
        pass

    def run(raw_data):
        time.sleep(2.5)
        return {"n": len(raw_data)}
"""


@pytest.mark.parametrize("dispatch", ["thread", "inline"])
def test_a_head_sent_while_a_slow_run_answers_is_not_cut(start_server, tmp_path, dispatch):
    # The header deadline (1 s) is for the client, not for the server's slowness: a head
    # split around a run() of 2.5 s is not refused. "thread": the client sent its next
    # request early on the same connection. "inline": run() holds the event loop while
    # another connection's head arrives in two parts: the loop reads what came meanwhile
    # before it runs the overdue timer (asyncio does; libuv since 1.45).
    server = start_server(["--entry-script", str(write_script(tmp_path, SLOW_RUN_SCRIPT)),
                           "--dispatch", dispatch], env=SLOW_ENV)
    post = b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
    first, rest = _get("/healthz/live")[:20], _get("/healthz/live")[20:]
    with _connect(server.port) as sock, _connect(server.port) as other:
        if dispatch == "thread":
            sock.sendall(post)
            time.sleep(0.2)  # read apart: the next head's clock starts with its first byte
            sock.sendall(first)
        else:
            other.sendall(first)
            sock.sendall(post)
        time.sleep(HEADER_TIMEOUT + 0.5)  # run() is still running
        if dispatch == "thread":
            sock.sendall(rest)
            assert _statuses(sock, 2) == [200, 200]
        else:
            other.sendall(rest)
            assert _statuses(sock, 1) == _statuses(other, 1) == [200]


def test_idle_keepalive_connections_close_after_the_keepalive_timeout(start_server, tmp_path):
    server = start_server(["--entry-script", str(write_script(tmp_path, SCRIPT))],
                          env={"MLBUILD_KEEPALIVE_TIMEOUT": "1"})
    with _connect(server.port) as sock:
        sock.sendall(_get("/healthz/live"))
        assert _statuses(sock, 1) == [200]
        idle = time.monotonic()
        assert _until_closed(sock, idle + 1 + SLACK / 2) == (b"", True)
        assert time.monotonic() - idle >= 0.9


# -- point 2: oversized heads ------------------------------------------------------------
def test_oversized_heads_are_refused_and_others_served(start_server, tmp_path):
    server = start_server(["--entry-script", str(write_script(tmp_path, SCRIPT))])
    limit = DEFAULT_MAX_HEADER_BYTES

    def refused(request: bytes) -> tuple[int | None, dict]:
        with _connect(server.port) as sock:
            _send(sock, request)
            return _refused(sock, time.monotonic() + 10)

    huge_value = _get("/", b"X-Huge: " + b"a" * (16 * MIB) + b"\r\n")
    status, headers = refused(huge_value)
    assert (status, headers["connection"], headers["content-type"]) == \
        (431, "close", "application/json")
    _assert_serving(server)
    assert refused(_get("/score?" + "a" * MIB))[0] == 414
    assert refused(_get("/", b"".join(b"X-%d: 1\r\n" % i for i in range(150))))[0] == 431
    assert refused(_get("/", b"".join(b"X-%d: %s\r\n" % (i, b"v" * 600)
                                      for i in range(99))))[0] == 431  # 60 KB in all
    _assert_serving(server)

    # At the limit, many headers, and a body far larger than the limit in the same send.
    near = server.get("/healthz/live", headers={"X-Big": "b" * (limit - 200)})
    assert near.status == 200
    assert server.get("/healthz/live", headers={f"X-{i}": "1" for i in range(90)}).status \
        == 200
    body = b'{"data": "' + b"x" * MIB + b'"}'
    with _connect(server.port) as sock:
        sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        assert _statuses(sock, 1) == [200]
    # Pipelined: a valid request, then an oversized head in the same send.
    with _connect(server.port) as sock:
        _send(sock, _get("/healthz/live") + huge_value[: 2 * limit])
        answer, closed = _until_closed(sock, time.monotonic() + 10)
    assert closed and _status(answer) == 200
    assert b"HTTP/1.1 431 " in answer


def test_unfinished_huge_heads_do_not_grow_memory(start_server, tmp_path):
    server = start_server(["--entry-script", str(write_script(tmp_path, SCRIPT))])
    for _ in range(20):
        _assert_serving(server)
    before = _rss_kib(server.proc.pid)
    socks = [_connect(server.port) for _ in range(8)]
    try:
        for sock in socks:  # 8 MiB of a header value that never ends, on each
            _send(sock, b"GET / HTTP/1.1\r\nHost: x\r\nX-Never-Ends: " + b"a" * (8 * MIB))
        time.sleep(0.3)
        grown_mib = (_rss_kib(server.proc.pid) - before) / 1024
        assert grown_mib < 16, f"RSS grew by {grown_mib:.0f} MiB for 8 unfinished heads"
        for sock in socks:
            assert _refused(sock, time.monotonic() + 10)[0] == 431
    finally:
        for sock in socks:
            sock.close()
    _assert_serving(server)


# -- the health port ---------------------------------------------------------------------
def test_health_port_limits_slow_and_large_heads(start_server, tmp_path):
    health = free_port()
    server = start_server(["--entry-script", str(write_script(tmp_path, SCRIPT)),
                           "--health-port", str(health)], env=SLOW_ENV)
    started = time.monotonic()
    slow = _connect(health)
    slow.sendall(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\nX-Half: ")
    dribbled = _connect(health)
    try:
        with _connect(health) as probe:  # a valid probe meanwhile
            probe.sendall(_get("/healthz/live"))
            assert _statuses(probe, 1) == [200]
        cut = False
        for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Drip: " + b"d" * 200:
            if time.monotonic() - started > HEADER_TIMEOUT + SLACK:
                break
            try:
                dribbled.sendall(bytes([byte]))
            except OSError:
                cut = True
                break
            if _until_closed(dribbled, time.monotonic() + 0.2)[1]:
                cut = True
                break
        assert cut, "a dribbled head on the health port was never cut"
        assert _until_closed(slow, started + HEADER_TIMEOUT + SLACK)[1]
    finally:
        slow.close()
        dribbled.close()
    for request, expected in ((_get("/", b"X-Huge: " + b"a" * (4 * MIB) + b"\r\n"), 431),
                              (_get("/" + "a" * MIB), 414)):
        with _connect(health) as sock:
            _send(sock, request)
            status, headers = _refused(sock, time.monotonic() + 10)
        assert (status, headers.get("connection")) == (expected, "close")
    with _connect(health) as probe:
        probe.sendall(_get("/healthz/live"))
        assert _statuses(probe, 1) == [200]
    _assert_serving(server)


# -- configuration -----------------------------------------------------------------------
def test_limits_come_from_the_environment_and_the_command_line():
    default = ServerOptions.from_env({})
    assert (default.header_timeout, default.max_header_bytes, default.keepalive_timeout) == \
        (DEFAULT_HEADER_TIMEOUT, DEFAULT_MAX_HEADER_BYTES, DEFAULT_KEEPALIVE_TIMEOUT)
    env = ServerOptions.from_env({"MLBUILD_HEADER_TIMEOUT": "2.5",
                                  "MLBUILD_MAX_HEADER_BYTES": "65536",
                                  "MLBUILD_KEEPALIVE_TIMEOUT": "75"})
    assert (env.header_timeout, env.max_header_bytes, env.keepalive_timeout) == \
        (2.5, 65536, 75.0)
    args = build_parser().parse_args(["--header-timeout", "3", "--max-header-bytes", "8192",
                                      "--keepalive-timeout", "9"])
    assert (args.header_timeout, args.max_header_bytes, args.keepalive_timeout) == \
        (3.0, 8192, 9.0)
    bad = ServerOptions(header_timeout=0, keepalive_timeout=-1, max_header_bytes=100)
    assert len(bad.problems()) == 3
    with pytest.raises(ValueError, match="MLBUILD_MAX_HEADER_BYTES"):
        ServerOptions.from_env({"MLBUILD_MAX_HEADER_BYTES": "lots"})
