"""``mlbuild.profile.loadgen``: the load generator against real servers on 127.0.0.1.

Servers: a small uvicorn ASGI app in a subprocess (``/sleep`` answers after 50 ms,
``/status`` answers 400 to bodies starting with ``bad``), and raw-socket servers in a
thread of this process that answer with exact bytes (framings, closes, resets, silence).
Each test loads for about a second; the comparison with ``wrk`` (when /usr/bin/wrk is
installed) for a few.
"""

from __future__ import annotations

import os
import re
import resource
import socket
import socketserver
import struct
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
import warnings
from pathlib import Path

import pytest
from clitools import free_port

from mlbuild.errors import InvalidInput
from mlbuild.profile.loadgen import build_requests, generate_load

SLEEP_S = 0.05

APP = textwrap.dedent("""\
    import asyncio


    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        status = 200
        if scope["path"] == "/sleep":
            await asyncio.sleep(%r)
        elif scope["path"] == "/status":
            status = 400 if body.startswith(b"bad") else 200
        out = b'{"ok": true}'
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})
    """ % SLEEP_S)


def cpu_ns(pid: int) -> int:
    """CPU time (ns) a process's threads have run so far, from /proc/PID/task/*/schedstat
    (exact, where /proc/PID/stat counts 10 ms ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    """The ASGI app on uvicorn (httptools, uvloop: the runtime's settings); its base URL
    and process."""
    work = tmp_path_factory.mktemp("loadgen-app")
    (work / "lgapp.py").write_text(APP)
    port = free_port()
    log = open(work / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(work), "lgapp:app",
         "--host", "127.0.0.1", "--port", str(port), "--http", "httptools",
         "--loop", "uvloop", "--no-access-log", "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            pytest.fail(f"uvicorn exited {proc.returncode}:\n"
                        + (work / "server.log").read_text(errors="replace"))
        try:
            urllib.request.urlopen(base + "/", timeout=2).read()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail("uvicorn did not answer in 30 s")
            time.sleep(0.1)
    yield base, proc
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- against the ASGI app --------------------------------------------------------------

def test_latency_at_concurrency_1(app_server):
    base, _ = app_server
    r = generate_load(base + "/sleep", concurrency=1, duration=1.5, warmup=0.2,
                      bodies=[b'{"data": [1]}'])
    assert r.processes == 1 and r.concurrency == 1
    assert r.errors == {} and r.status == {200: r.responses}
    p50 = r.latency.percentile(50) / 1e6
    assert abs(p50 - SLEEP_S) <= 0.2 * SLEEP_S, r.summary()
    assert r.rps == pytest.approx(1 / SLEEP_S, rel=0.2), r.summary()
    assert r.requests - r.responses in (0, 1)  # the one in flight when the window closed


def test_rate_at_concurrency_4_over_two_processes(app_server):
    base, _ = app_server
    r = generate_load(base + "/sleep", concurrency=4, duration=1.5, warmup=0.3,
                      bodies=[b"{}"], processes=2)
    assert r.processes == 2 and r.concurrency == 4
    assert r.errors == {} and r.successes == r.responses > 0
    assert r.rps == pytest.approx(4 / SLEEP_S, rel=0.15), r.summary()
    assert abs(r.latency.percentile(50) / 1e6 - SLEEP_S) <= 0.2 * SLEEP_S, r.summary()
    assert 0 <= r.requests - r.responses <= 4
    s = r.summary()
    assert set(s["latency_ms"]) == {"p50", "p90", "p95", "p99", "p99.9", "mean", "max"}
    assert s["success_rate"] == 1.0 and s["status"] == {"200": r.responses}


def test_status_counting(app_server):
    base, _ = app_server
    # round-robin over the bodies: every other request is a 400
    r = generate_load(base + "/status", concurrency=2, duration=1.0,
                      bodies=[b'{"ok": 1}', b"bad body"], processes=1,
                      headers={"X-Test": "1"}, authorization="Bearer k")
    assert set(r.status) == {200, 400}
    assert abs(r.status[200] - r.status[400]) <= 2, r.status
    assert r.successes == r.status[200]
    assert r.success_rate == pytest.approx(0.5, abs=0.01)
    assert r.errors == {}


def test_nothing_listening_counts_connect_errors():
    t = time.monotonic()
    r = generate_load(f"http://127.0.0.1:{free_port()}/score", concurrency=2, duration=0.5,
                      processes=1, timeout=1)
    assert time.monotonic() - t < 3
    assert r.responses == 0 and r.requests == 0
    assert set(r.errors) == {"connect"} and r.errors["connect"] >= 2
    assert r.success_rate == 0.0


def test_bad_input():
    for url in ("https://127.0.0.1/score", "ftp://x/", "http:///nohost", "http://h:99999/"):
        with pytest.raises(InvalidInput):
            generate_load(url, concurrency=1, duration=1)
    with pytest.raises(InvalidInput):
        generate_load("http://127.0.0.1:1/", concurrency=0, duration=1)
    with pytest.raises(InvalidInput):
        build_requests("http://127.0.0.1:1/", [b"x"], method="GET")
    with pytest.raises(InvalidInput):
        build_requests("http://127.0.0.1:1/", headers={"X": "a\r\nInjected: 1"})


def test_requests_are_pre_encoded_as_given():
    host, port, reqs = build_requests("http://localhost:8080/score?v=2", [b"{}", b"[1]"],
                                      authorization="Bearer KEY", content_type="text/csv")
    assert (host, port, len(reqs)) == ("localhost", 8080, 2)
    head, body = reqs[1].split(b"\r\n\r\n")
    assert body == b"[1]"
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /score?v=2 HTTP/1.1"
    assert {b"Host: localhost:8080", b"Authorization: Bearer KEY", b"Content-Type: text/csv",
            b"Content-Length: 3"} <= set(lines)
    assert build_requests("http://h/")[2] == [
        b"GET / HTTP/1.1\r\nHost: h\r\nUser-Agent: mlbuild-loadgen\r\nAccept: */*\r\n\r\n"]


# --- against raw servers ---------------------------------------------------------------

def read_request(sock: socket.socket, buf: bytearray) -> bool:
    """Read one whole request into nothing; False when the client closed."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return False
        buf += chunk
    end = buf.index(b"\r\n\r\n") + 4
    m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", bytes(buf[:end]))
    need = end + (int(m.group(1)) if m else 0)
    while len(buf) < need:
        chunk = sock.recv(65536)
        if not chunk:
            return False
        buf += chunk
    del buf[:need]
    return True


class RawServer:
    """A threaded TCP server calling ``serve(sock)`` per connection."""

    def __init__(self, serve):
        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                try:
                    serve(self.request)
                except OSError:
                    pass

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/score"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def raw_server():
    servers = []

    def start(serve) -> str:
        servers.append(RawServer(serve))
        return servers[-1].url

    yield start
    for s in servers:
        s.close()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def test_server_closing_with_a_request_in_flight(raw_server):
    def serve(sock):  # two answers per connection, then a close instead of the third
        buf = bytearray()
        for _ in range(2):
            if not read_request(sock, buf):
                return
            sock.sendall(OK)
            time.sleep(0.002)
        read_request(sock, buf)

    r = generate_load(raw_server(serve), concurrency=2, duration=1.0, bodies=[b"{}"],
                      processes=1)
    assert r.responses > 20 and r.status == {200: r.responses}
    assert set(r.errors) == {"closed"}
    assert r.errors["closed"] == pytest.approx(r.responses / 2, abs=4)
    assert r.reconnects == pytest.approx(r.errors["closed"], abs=2)
    assert r.success_rate == pytest.approx(2 / 3, abs=0.05)


def test_connection_reset(raw_server):
    def serve(sock):  # one answer, then an RST (SO_LINGER 0) with a request in flight
        buf = bytearray()
        if read_request(sock, buf):
            sock.sendall(OK)
            read_request(sock, buf)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()

    r = generate_load(raw_server(serve), concurrency=2, duration=0.8, processes=1)
    assert r.responses > 5
    assert set(r.errors) <= {"reset", "closed"} and r.errors.get("reset", 0) > 0, r.errors


def test_connection_close_is_a_reconnect_not_an_error(raw_server):
    def serve(sock):
        if read_request(sock, bytearray()):
            sock.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2"
                         b"\r\n\r\nok")

    r = generate_load(raw_server(serve), concurrency=2, duration=0.8, processes=1)
    assert r.errors == {} and r.responses > 10
    assert r.reconnects == pytest.approx(r.responses, abs=2)


def test_timeouts(raw_server):
    def serve(sock):  # reads and never answers
        buf = bytearray()
        while read_request(sock, buf):
            pass

    t = time.monotonic()
    r = generate_load(raw_server(serve), concurrency=3, duration=1.0, timeout=0.3,
                      processes=1)
    assert time.monotonic() - t < 3
    assert r.responses == 0
    # each connection times out every ~0.3 s (+ the 0.06 s sweep), 3 connections, 1 s
    assert set(r.errors) == {"timeout"} and 6 <= r.errors["timeout"] <= 12, r.errors
    assert r.reconnects >= r.errors["timeout"] - 3


FRAMINGS = {
    # name: the response as written, in pieces (a short pause between pieces)
    "content-length split": [b"HTTP/1.1 201 Created\r\nContent-Le", b"ngth: 5\r\n\r\nab",
                             b"c", b"de"],
    "chunked": [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n0\r\n\r\n"],
    "chunked split, extension, trailer": [
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4;x=1\r\nab",
        b"cd\r\n1", b"0\r\n0123456789abcdef\r\n0\r\nX-Trailer: 1\r\n", b"\r\n"],
    "100 continue first": [b"HTTP/1.1 100 Continue\r\n\r\n",
                           b"HTTP/1.1 200 OK\r\nCONTENT-LENGTH: 2\r\n\r\nok"],
    "204 without length": [b"HTTP/1.1 204 No Content\r\nServer: x\r\n\r\n"],
}


@pytest.mark.parametrize("name", FRAMINGS)
def test_response_framings(raw_server, name):
    pieces = FRAMINGS[name]

    def serve(sock):
        buf = bytearray()
        while read_request(sock, buf):
            for i, piece in enumerate(pieces):
                if i:
                    time.sleep(0.001)
                sock.sendall(piece)

    r = generate_load(raw_server(serve), concurrency=2, duration=0.5, processes=1)
    code = int(pieces[-1].split(b" ")[1]) if name.startswith("100") else \
        int(pieces[0].split(b" ")[1])
    assert r.errors == {} and r.responses > 10 and r.status == {code: r.responses}
    assert r.reconnects == 0


def test_body_until_close_and_garbage(raw_server):
    def until_close(sock):  # HTTP/1.0, no length: the body ends with the connection
        if read_request(sock, bytearray()):
            sock.sendall(b"HTTP/1.0 200 OK\r\n\r\nthe whole body")

    r = generate_load(raw_server(until_close), concurrency=2, duration=0.5, processes=1)
    assert r.errors == {} and r.responses > 10 and r.status == {200: r.responses}

    def garbage(sock):
        if read_request(sock, bytearray()):
            sock.sendall(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
            time.sleep(0.5)

    r = generate_load(raw_server(garbage), concurrency=1, duration=0.5, processes=1)
    assert r.responses == 0 and set(r.errors) == {"parse"}


# --- beside wrk ------------------------------------------------------------------------

WRK = "/usr/bin/wrk"


def run_wrk(url: str, conns: int, seconds: int) -> tuple[float, int, float]:
    """wrk's req/s, requests and CPU seconds (its rusage, reaped here)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([WRK, "-t2", f"-c{conns}", f"-d{seconds}s", url], check=True,
                         capture_output=True, text=True, timeout=seconds + 30).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    done = int(re.search(r"(\d+) requests in", out).group(1))
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return rps, done, cpu


def test_agrees_with_wrk_and_costs_less_cpu_than_the_server(app_server):
    """Issue 17's acceptance: against a fixed server (50 ms per request at c=8, so the
    server sets the rate: 160 req/s) the generator's req/s is within 10 % of wrk's, and
    it spends less CPU per request than the server it loads."""
    if not os.access(WRK, os.X_OK):
        reason = (f"{WRK} is not installed (apt-get install wrk): the load generator was "
                  "NOT compared with wrk")
        warnings.warn(reason)
        pytest.skip(reason)
    base, proc = app_server
    url, conns, seconds = base + "/sleep", 8, 2
    for attempt in (1, 2):  # a second pair only when noise spoiled the first
        wrk_rps, _, wrk_cpu = run_wrk(url, conns, seconds)
        cpu0 = cpu_ns(proc.pid)
        # no warm-up, so that the server's CPU measured is that of the window
        r = generate_load(url, concurrency=conns, duration=seconds)
        server_us = (cpu_ns(proc.pid) - cpu0) / 1e3 / r.responses
        ratio = r.rps / wrk_rps
        if abs(ratio - 1) <= 0.10:
            break
    gen_us = r.cpu_us_per_response
    print(f"\nc={conns} /sleep: generator {r.rps:.1f} req/s, wrk {wrk_rps:.1f} req/s "
          f"(ratio {ratio:.3f}, attempt {attempt}); CPU us/req: generator {gen_us:.0f}, "
          f"server {server_us:.0f}, wrk {wrk_cpu * 1e6 / (wrk_rps * seconds):.0f}")
    assert r.errors == {} and r.successes == r.responses
    assert r.rps == pytest.approx(conns / SLEEP_S, rel=0.15), r.summary()
    assert abs(ratio - 1) <= 0.10, f"generator/wrk req/s = {ratio:.3f}"
    assert gen_us < server_us, f"generator {gen_us:.0f} us/req >= server {server_us:.0f}"
