"""Abuse campaign against the serving runtime: issue 16's "done when", run for real.

    python bench/abuse.py [--quick] [--only SUBSTRING] [--failures-only] [--keep DIR]

Starts the runtime (``python -m mlbuild.runtime``) twice on free 127.0.0.1 ports, both
with auth keys on (MLBUILD_AUTH_KEYS) and short head/keep-alive timeouts:

    text   the demo's entry script (examples/diabetes/src/score.py, a plain run(raw_data))
           with the demo's model trained into a temporary folder, a health port and
           CORS origins: run() gets the body as text, so its JSON errors are run()'s own
           500s (azmlinfsrv's contract), everything before run() is the runtime's
    json   the same model as a no-code model: the runtime parses the JSON, so a bad
           body is the runtime's 400

and sends a catalogue of bad requests (request lines, methods, paths, percent-encoding,
headers, auth, CORS, upgrades, body framing, chunked bodies, smuggling combinations,
Expect, JSON content, slow and abandoned connections, resets, pipelining, the health
port), each with the status(es) it must get. Meanwhile valid scoring requests are sent
to both servers the whole time (every one must get 200) and after every case. At the
end: each server's RSS (at most +RSS_BOUND_MB over the warmed-up start), its open
descriptors (back to the start once the timeouts passed), /metrics against what the
client saw (each status the app answered, counted as that status), and the log (no
line with a raw control character, no forged line).

Prints a table (case, expected, got, ok) and a summary; exits 1 when anything failed.
``--quick`` leaves out the cases that move megabytes or open hundreds of connections
(tests/runtime/test_abuse.py runs it). Runs in about a minute; nothing leaves 127.0.0.1.

Expectation syntax: responses on the connection in order, comma-separated; each is a
status (``413``), a class (``4xx``) or alternatives (``400|505``); ``-`` at the end means
the server must then close the connection, ``-`` alone that it closes without an
answer. ``A or B`` gives two whole alternatives. ``0.9`` is an answer without a status
line (HTTP/0.9). ``any`` accepts whatever comes (resets: the checks that follow count).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "diabetes"
KEY, KEY2 = "abuse-key-0123456789", "second-key-ZYXW"
ORIGIN = "https://good.example"
HEADER_TIMEOUT = 3.0  # MLBUILD_HEADER_TIMEOUT of the servers under test
KEEPALIVE_TIMEOUT = 2.0
MAX_BODY = 10 * 1024 * 1024  # the runtime's default, left as it is
RSS_BOUND_MB = 50  # over the warmed-up start, after both passes
# The second pass may add at most this: JSON of a 10 MB body takes 10-20 times that while
# it is parsed, and glibc keeps some of what it freed (measured: 131 MB, then 174-196 MB
# over eight 5 MB / 200k-key bodies in a row, no trend).
RSS_PASS_BOUND_MB = 25
START_TIMEOUT = 30.0
FORGED = "1999-01-01 00:00:00,000 I [1] azmlinfsrv.access - FORGED"

ROW = [0.03808, 0.05068, 0.0617, 0.02187, -0.04422, -0.03482, -0.0434, -0.00259, 0.01991,
       -0.01765]
VALID = json.dumps({"data": [ROW, ROW]}).encode()


# -- HTTP on raw sockets ------------------------------------------------------------------
@dataclass
class Response:
    status: int | str  # "0.9": bytes without a status line
    headers: dict
    body: bytes
    head: bool = False  # answers a HEAD: no body


@dataclass
class Outcome:
    responses: list = field(default_factory=list)
    closed: bool = False  # the server closed (EOF or reset) before we stopped reading
    timed_out: bool = False
    note: str = ""

    @property
    def statuses(self) -> list:
        return [r.status for r in self.responses]

    def render(self) -> str:
        got = ",".join(str(s) for s in self.statuses)
        if self.closed:
            got = f"{got},-" if got else "-"
        elif self.timed_out:
            got = f"{got},open" if got else "open"
        return got + (f" ({self.note})" if self.note else "")


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def send(sock: socket.socket, data: bytes) -> bool:
    try:
        sock.sendall(data)
        return True
    except OSError:  # the server answered and closed already
        return False


def reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


class Reader:
    """Parses the HTTP/1.1 responses a connection sends, as they arrive."""

    def __init__(self, sock: socket.socket, heads: list[bool] | None = None):
        self.sock = sock
        self.buf = b""
        self.eof = False
        self.heads = list(heads or [])  # per response: True when it answers a HEAD

    def _fill(self, deadline: float) -> bool:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(1 << 20)
        except (socket.timeout, TimeoutError):
            return False
        except OSError:  # reset by the server
            self.eof = True
            return False
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def _need(self, n: int, deadline: float) -> bool:
        while len(self.buf) < n:
            if self.eof or not self._fill(deadline):
                return False
        return True

    def _line(self, deadline: float) -> bytes | None:
        while b"\r\n" not in self.buf:
            if self.eof or not self._fill(deadline):
                return None
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def next(self, deadline: float) -> Response | None:
        """The next response, or None at EOF or the deadline (see .eof)."""
        while not self.buf:
            if self.eof or not self._fill(deadline):
                return None
        if not self.buf.startswith(b"HTTP/"):
            if len(self.buf) < 5 and not self.eof:
                self._fill(deadline)
                if not self.buf.startswith(b"HTTP/") and len(self.buf) < 5 and not self.eof:
                    return None
            if not self.buf.startswith(b"HTTP/"):  # HTTP/0.9: the body, then close
                while not self.eof and self._fill(deadline):
                    pass
                body, self.buf = self.buf, b""
                return Response("0.9", {}, body)
        while b"\r\n\r\n" not in self.buf:
            if self.eof or not self._fill(deadline):
                return None
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        status = int(parts[1])
        headers: dict = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            key = name.strip().lower().decode("latin-1")
            headers[key] = headers[key] + ", " + value.strip().decode("latin-1") \
                if key in headers else value.strip().decode("latin-1")
        if 100 <= status < 200:
            return Response(status, headers, b"")
        is_head = self.heads.pop(0) if self.heads else False
        if is_head or status in (204, 304):
            return Response(status, headers, b"", head=is_head)
        if "content-length" in headers:
            n = int(headers["content-length"])
            if not self._need(n, deadline):
                return Response(status, headers, self.buf)
            body, self.buf = self.buf[:n], self.buf[n:]
            return Response(status, headers, body)
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                line = self._line(deadline)
                if line is None:
                    return Response(status, headers, body)
                size = int(line.split(b";")[0], 16)
                if not self._need(size + 2, deadline):
                    return Response(status, headers, body)
                body += self.buf[:size]
                self.buf = self.buf[size + 2:]
                if size == 0:
                    return Response(status, headers, body)
        while not self.eof and self._fill(deadline):
            pass
        body, self.buf = self.buf, b""
        return Response(status, headers, body)


def exchange(port: int, data: bytes | list, *, want: int | None = 1, until_close=False,
             timeout: float = 4.0, pause: float = 0.0, shut=False, heads=None) -> Outcome:
    """Send ``data`` (a list: pieces sent ``pause`` seconds apart), read ``want``
    responses (and then the close, with ``until_close``)."""
    out = Outcome()
    deadline = time.monotonic() + timeout
    with connect(port) as sock:
        pieces = data if isinstance(data, list) else [data]
        for i, piece in enumerate(pieces):
            if i and pause:
                time.sleep(pause)
            if not send(sock, piece):
                break
        if shut:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        reader = Reader(sock, heads)
        while want is None or len([r for r in out.responses
                                   if not (isinstance(r.status, int) and r.status < 200)]) < want \
                or until_close:
            response = reader.next(deadline)
            if response is None:
                break
            out.responses.append(response)
        out.closed = reader.eof
        out.timed_out = not reader.eof and time.monotonic() >= deadline
    return out


def R(method="GET", target="/", headers=(), body=b"", *, version="HTTP/1.1", auth=False,
      close=True, host=True, clen=None, ctype=None) -> bytes:
    """A raw request. ``clen``: None adds a Content-Length for a body, False none, else
    the value written as given."""
    lines = [f"{method} {target} {version}".encode("latin-1") if version
             else f"{method} {target}".encode("latin-1")]
    if host:
        lines.append(b"Host: 127.0.0.1")
    if auth:
        lines.append(b"Authorization: Bearer " + (auth if isinstance(auth, bytes)
                                                  else KEY.encode()))
    if ctype:
        lines.append(b"Content-Type: " + (ctype if isinstance(ctype, bytes) else ctype.encode()))
    for h in headers:
        lines.append(h if isinstance(h, bytes) else h.encode("latin-1"))
    if clen is None and body:
        lines.append(b"Content-Length: %d" % len(body))
    elif clen is not None and clen is not False:
        value = clen if isinstance(clen, bytes) else str(clen).encode()
        lines.append(b"Content-Length: " + value)
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def P(body=VALID, *, auth=True, ctype="application/json", target="/score", **kw) -> bytes:
    """A scoring POST."""
    return R("POST", target, body=body, auth=auth, ctype=ctype, **kw)


def chunked(*chunks: bytes, trailer: bytes = b"") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n" + trailer + b"\r\n"


# -- the servers ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, args: list[str], env: dict, workdir: Path):
        self.name = name
        self.port = free_port()
        self.health_port = free_port() if name == "text" else None
        self.log_path = workdir / f"{name}.log"
        cmd = [sys.executable, "-m", "mlbuild.runtime", "--host", "127.0.0.1",
               "--port", str(self.port), *args]
        if self.health_port:
            cmd += ["--health-port", str(self.health_port)]
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("MLBUILD_", "AZUREML_", "AML_"))}
        # This checkout's runtime, unless PYTHONPATH names another (to compare with one)
        base.update(env, PYTHONUNBUFFERED="1",
                    PYTHONPATH=os.environ.get("PYTHONPATH") or str(REPO))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=workdir, env=base)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} server exited {self.proc.returncode}:\n"
                                 f"{self.log_path.read_text(errors='replace')}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/healthz/ready")
                if conn.getresponse().status == 200:
                    conn.close()
                    return
                conn.close()
            except OSError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"{self.name} server not ready after {START_TIMEOUT}s")

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
        return 0.0

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


class Tally:
    """What the client saw the app answer (responses carrying x-request-id), per port."""

    def __init__(self):
        self.lock = threading.Lock()
        self.seen: dict[int, dict[int, int]] = {}
        self.uncertain: dict[int, int] = {}

    def add(self, port: int, outcome_or_status, counted=False) -> None:
        """Count what the app answered: responses with x-request-id (``counted``: every
        final response, where the protocol answered a request that reached the app)."""
        statuses = ([r.status for r in outcome_or_status.responses
                     if (counted or "x-request-id" in r.headers) and isinstance(r.status, int)
                     and r.status >= 200]
                    if isinstance(outcome_or_status, Outcome) else [outcome_or_status])
        with self.lock:
            counts = self.seen.setdefault(port, {})
            for s in statuses:
                counts[s] = counts.get(s, 0) + 1

    def maybe(self, port: int, n: int) -> None:
        with self.lock:
            self.uncertain[port] = self.uncertain.get(port, 0) + n


def metrics(port: int) -> dict[int, int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    out: dict[int, int] = {}
    for m in re.finditer(r'^http_server_request_duration_seconds_count\{[^}]*'
                         r'http_response_status_code="(\d+)"[^}]*\} (\S+)$', text, re.M):
        out[int(m.group(1))] = out.get(int(m.group(1)), 0) + int(float(m.group(2)))
    return out


def valid_request(port: int, tally: Tally | None = None,
                  timeout: float = 10.0) -> tuple[int, float]:
    started = time.monotonic()
    out = exchange(port, P(), timeout=timeout)
    if tally is not None:
        tally.add(port, out)
    status = out.statuses[0] if out.statuses else 0
    return status, time.monotonic() - started


class Steady(threading.Thread):
    """Valid scoring requests to every server, over keep-alive connections, the whole time."""

    def __init__(self, ports: list[int], tally: Tally, interval: float = 0.02):
        super().__init__(daemon=True)
        self.ports, self.tally, self.interval = ports, tally, interval
        self.stop_event = threading.Event()
        self.sent = self.failed = 0
        self.worst = 0.0
        self.failures: list[str] = []

    def run(self) -> None:
        conns: dict[int, http.client.HTTPConnection] = {}
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        while not self.stop_event.wait(self.interval):
            for port in self.ports:
                started = time.monotonic()
                try:
                    conn = conns.get(port) or http.client.HTTPConnection("127.0.0.1", port,
                                                                         timeout=10)
                    conns[port] = conn
                    conn.request("POST", "/score", body=VALID, headers=headers)
                    resp = conn.getresponse()
                    resp.read()
                    status = resp.status
                    self.tally.add(port, status)
                    if resp.getheader("connection", "").lower() == "close":
                        conn.close()
                        conns.pop(port, None)
                except (OSError, http.client.HTTPException) as exc:
                    conns.pop(port, None)
                    # A keep-alive connection the server closed as idle between two
                    # requests: retried once on a new one (any client does that).
                    try:
                        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                        conn.request("POST", "/score", body=VALID, headers=headers)
                        resp = conn.getresponse()
                        resp.read()
                        status = resp.status
                        self.tally.add(port, status)
                        conns[port] = conn
                    except (OSError, http.client.HTTPException) as exc2:
                        status = f"{type(exc).__name__}/{type(exc2).__name__}"
                elapsed = time.monotonic() - started
                self.sent += 1
                self.worst = max(self.worst, elapsed)
                if status != 200:
                    self.failed += 1
                    if len(self.failures) < 10:
                        self.failures.append(f"port {port}: {status}")
        for conn in conns.values():
            conn.close()


# -- the catalogue -------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    server: str  # text, json, health
    request: bytes | list | Callable | None
    expect: str
    why: str = ""
    slow: bool = False  # waits for a server timeout: run beside the others
    heavy: bool = False  # megabytes or hundreds of connections: not in --quick
    uncertain: int = 0  # requests the app may count that the client never sees answered
    counted: bool = False  # the protocol's answer (no x-request-id) is counted by the app too
    kw: dict = field(default_factory=dict)  # for exchange()
    check: Callable | None = None  # extra check on the Outcome: returns a problem or None


def no_header(name: str):
    def check(out: Outcome):
        for r in out.responses:
            if name in r.headers:
                return f"response has {name}: {r.headers[name]}"
        return None
    return check


def not_in_body(text: str):
    def check(out: Outcome):
        for r in out.responses:
            if text.encode() in r.body:
                return f"the body holds {text!r}"
        return None
    return check


def header_is(name: str, value: str):
    def check(out: Outcome):
        got = out.responses[0].headers.get(name) if out.responses else None
        return None if got == value else f"{name}: {got!r}, want {value!r}"
    return check


# Connection-level scenarios: each returns an Outcome.
def slow_head(ctx, port=None):
    return exchange(port or ctx.ports["text"],
                    [b"POST /score HTTP/1.1\r\nHost: x\r\nX-Half: "], want=1, until_close=True,
                    timeout=HEADER_TIMEOUT + 4)


def dribble_head(ctx):
    head = R("GET", "/", close=False)
    return exchange(ctx.ports["text"], [bytes([b]) for b in head[:40]], pause=0.15, want=1,
                    until_close=True, timeout=HEADER_TIMEOUT + 5)


def idle_connection(ctx):
    return exchange(ctx.ports["text"], [], want=1, until_close=True,
                    timeout=HEADER_TIMEOUT + 4)


def idle_keepalive(ctx):
    return exchange(ctx.ports["text"], R("GET", "/", close=False), want=1, until_close=True,
                    timeout=KEEPALIVE_TIMEOUT + HEADER_TIMEOUT + 4)


def _slow_body(port: int, head: bytes, dribble: bool, total: float) -> Outcome:
    """Send ``head`` and a byte of body, then a byte every 0.5 s (``dribble``) or nothing;
    read what the server answers until it closes or ``total`` seconds passed."""
    out = Outcome()
    deadline = time.monotonic() + total
    with connect(port) as sock:
        send(sock, head + b"{")
        reader = Reader(sock)
        while time.monotonic() < deadline and not reader.eof:
            step = min(deadline, time.monotonic() + 0.5)
            response = reader.next(step)
            if response is not None:
                out.responses.append(response)
                continue
            if dribble and not reader.eof:
                if not send(sock, b" "):
                    reader.eof = True
        out.closed = reader.eof
        out.timed_out = not reader.eof
    return out


def slow_body(ctx, dribble=False, auth=True, port=None):
    head = R("POST", "/score", auth=auth, ctype="application/json", clen=100000, close=False)
    return _slow_body(port or ctx.ports["json"], head, dribble, HEADER_TIMEOUT + 8)


def expect_then_nothing(ctx):
    head = R("POST", "/score", ["Expect: 100-continue"], auth=True, ctype="application/json",
             clen=len(VALID), close=False)
    return exchange(ctx.ports["json"], head, want=1, until_close=True,
                    timeout=HEADER_TIMEOUT + 8)


def expect_continue_ok(ctx):
    out = Outcome()
    deadline = time.monotonic() + 5
    with connect(ctx.ports["json"]) as sock:
        send(sock, R("POST", "/score", ["Expect: 100-continue"], auth=True,
                     ctype="application/json", clen=len(VALID)))
        reader = Reader(sock)
        first = reader.next(deadline)
        if first is not None:
            out.responses.append(first)
            if first.status == 100:
                send(sock, VALID)
                second = reader.next(deadline)
                if second is not None:
                    out.responses.append(second)
        out.closed = reader.eof
    return out


def half_close_mid(ctx, what: str):
    if what == "head":
        data, port = b"GET / HTTP/1.1\r\nHost: x\r\n", ctx.ports["text"]
    else:
        data, port = R("POST", "/score", auth=True, ctype="application/json", clen=500,
                       close=False) + b'{"data": [', ctx.ports["json"]
    return exchange(port, data, shut=True, want=1, until_close=True, timeout=HEADER_TIMEOUT + 4)


def rst_after(ctx, data: bytes, port_name="json", wait=0.0):
    with connect(ctx.ports[port_name]) as sock:
        send(sock, data)
        if wait:
            time.sleep(wait)
        reset(sock)
    return Outcome(note="reset sent")


def abandon_storm(ctx, n=300):
    """n connections opened at once: a third reset at once, a third closed politely, a
    third left open (the server must close them itself within its header timeout);
    valid requests in the middle must get 200."""
    port = ctx.ports["text"]
    socks = []
    for _ in range(n):
        try:
            socks.append(connect(port, timeout=5))
        except OSError:
            break
    opened = len(socks)
    statuses = [valid_request(port, ctx.tally)[0] for _ in range(5)]
    for i, sock in enumerate(socks):
        if i % 3 == 0:
            reset(sock)
        elif i % 3 == 1:
            sock.close()
    left = [s for i, s in enumerate(socks) if i % 3 == 2]
    deadline = time.monotonic() + HEADER_TIMEOUT + 6
    closed = 0
    for sock in left:
        reader = Reader(sock)
        while not reader.eof and reader._fill(deadline):
            pass
        closed += reader.eof
        sock.close()
    out = Outcome(responses=[Response(s, {}, b"") for s in statuses])
    out.note = f"{opened}/{n} opened, {closed}/{len(left)} left open were closed by the server"
    out.closed = closed == len(left) and opened == n
    return out


def partial_head_storm(ctx, n=150):
    """n connections each sending half a head: each must get 408 and a close."""
    port = ctx.ports["text"]
    socks = [connect(port, timeout=5) for _ in range(n)]
    for sock in socks:
        send(sock, b"POST /score HTTP/1.1\r\nHost: x\r\nX-Half: ")
    statuses = [valid_request(port, ctx.tally)[0] for _ in range(5)]
    deadline = time.monotonic() + HEADER_TIMEOUT + 6
    got_408 = 0
    for sock in socks:
        reader = Reader(sock)
        response = reader.next(deadline)
        got_408 += response is not None and response.status == 408
        sock.close()
    out = Outcome(responses=[Response(s, {}, b"") for s in statuses])
    out.note = f"{got_408}/{n} got 408"
    out.closed = got_408 == n
    return out


def keepalive_many(ctx, n=500):
    """n requests one after another on one keep-alive connection."""
    port = ctx.ports["json"]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    bad = 0
    for _ in range(n):
        conn.request("POST", "/score", body=VALID, headers={
            "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        ctx.tally.add(port, resp.status)
        bad += resp.status != 200
    conn.close()
    return Outcome(responses=[Response(200 if not bad else 500, {}, b"")],
                   note=f"{n - bad}/{n} got 200")


def parallel_valid(ctx, n=50):
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda _: valid_request(ctx.ports["json"], ctx.tally)[0],
                                range(n)))
    bad = [s for s in results if s != 200]
    return Outcome(responses=[Response(200 if not bad else bad[0], {}, b"")],
                   note=f"{n - len(bad)}/{n} got 200")


def big_chunked(ctx, total: int, chunk: int = 65536, declared: int | None = None):
    """A chunked body of ``total`` bytes (one declared chunk, or many small ones), sent
    while reading: the server must answer 413 once past its limit."""
    out = Outcome()
    head = R("POST", "/score", ["Transfer-Encoding: chunked"], auth=True,
             ctype="application/json", close=False)
    deadline = time.monotonic() + 20
    with connect(ctx.ports["json"]) as sock:
        send(sock, head)
        sent = 0
        if declared:
            send(sock, b"%x\r\n" % declared)
        piece = b" " * chunk
        while sent < total:
            data = piece if declared else b"%x\r\n%s\r\n" % (len(piece), piece)
            if not send(sock, data):
                break
            sent += chunk
        reader = Reader(sock)
        response = reader.next(deadline)
        if response is not None:
            out.responses.append(response)
        out.closed = reader.eof
    out.note = f"sent {sent // (1024 * 1024)} MiB"
    return out


def big_body(ctx, size: int, server="text", padded_valid=True):
    body = (b" " * (size - len(VALID)) + VALID) if padded_valid else b" " * size
    return exchange(ctx.ports[server], P(body), timeout=20)


def catalogue() -> list[Case]:
    C = Case
    rng = random.Random(16)
    garbage = bytes(rng.randrange(256) for _ in range(2048))
    tls_hello = bytes.fromhex("16030100c4010000c00303") + bytes(rng.randrange(256)
                                                                for _ in range(190))
    deep = lambda n: b'{"data": ' + b"[" * n + b"]" * n + b"}"  # noqa: E731
    nan_rows = lambda v: ('{"data": [[' + ", ".join([v] * 10) + "]]}").encode()  # noqa: E731
    many_keys = b"{" + b",".join(b'"k%d": %d' % (i, i) for i in range(200000)) + b"}"
    cases = [
        # -- request lines ------------------------------------------------------------
        C("rl empty lines then EOF", "text", b"\r\n\r\n", "- or 400", kw={"shut": True,
          "until_close": True}),
        C("rl method only", "text", b"GET\r\n\r\n", "400"),
        C("rl HTTP/0.9 GET /", "text", b"GET /\r\n\r\n", "200|400|0.9",
          "an HTTP/0.9 simple request: answered or refused, never a 5xx"),
        C("rl HTTP/0.9 POST /score", "text", b"POST /score\r\n\r\n", "4xx"),
        C("rl version HTTP/9.9", "text", R(version="HTTP/9.9"), "400|505"),
        C("rl version HTTP/2.0", "text", R(version="HTTP/2.0"), "200|400|505",
          "llhttp reads 2.0 as an HTTP/1 request"),
        C("rl version HTTP/1.x", "text", R(version="HTTP/1.x"), "400"),
        C("rl version lowercase", "text", R(version="http/1.1"), "400"),
        C("rl extra token", "text", b"GET / HTTP/1.1 extra\r\nHost: x\r\n\r\n", "400"),
        C("rl double space", "text", b"GET  / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
          "200|400", "llhttp reads it as one space"),
        C("rl tabs as separators", "text", b"GET\t/\tHTTP/1.1\r\nHost: x\r\n\r\n", "400"),
        C("rl lowercase method", "text", R("get"), "400"),
        C("rl unknown method", "text", R("FOO"), "400"),
        C("rl 1000-byte method", "text", R("A" * 1000), "400"),
        C("rl bare LF line ends", "text", b"GET / HTTP/1.1\nHost: x\nConnection: close\n\n",
          "200|400"),
        C("rl TLS ClientHello", "text", tls_hello, "400"),
        C("rl HTTP/2 preface", "text", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "400"),
        C("rl binary garbage", "text", garbage, "400"),
        C("rl NUL in path", "text", b"GET /sc\x00ore HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
        C("rl raw space in path", "text", b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
        C("rl raw ESC in path", "text", b"GET /\x1b[31m HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
        C("rl raw 0xff in path", "text", b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
        C("rl raw C1 CSI in query", "text", b"GET /?a=\x9b31m HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
        C("rl raw tab in query", "text", b"GET /?a=\tb HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
        C("rl CONNECT", "text", R("CONNECT", "evil.example:443"), "400|405"),
        C("rl absolute-form /", "text", R("GET", "http://evil.example/"), "200"),
        C("rl absolute-form /score no key", "text", R("GET", "http://evil.example/score"), "401"),
        C("rl absolute-form bad port", "text", R("GET", "https://x:99999/score"), "400|401"),
        C("rl asterisk GET", "text", R("GET", "*"), "400|404"),
        C("rl asterisk OPTIONS", "text", R("OPTIONS", "*"), "204"),
        C("rl 40 KiB URL", "text", R("GET", "/" + "a" * 40000), "414,-"),
        C("rl 30 KiB URL", "text", R("GET", "/" + "a" * 30000), "404"),
        C("rl HTTP/1.1 without Host", "text", R(host=False), "200|400",
          "RFC 9112 asks 400; uvicorn, gunicorn and Flask answer"),
        C("rl two Host headers", "text", R(headers=["Host: other"]), "200|400"),
        C("rl HTTP/1.0 without Host", "text", R(version="HTTP/1.0", host=False, close=False),
          "200"),
        C("rl HTTP/1.0 keep-alive twice", "text",
          R(version="HTTP/1.0", headers=["Connection: keep-alive"], close=False) * 2,
          "200,- or 200,200", "uvicorn closes HTTP/1.0 connections whatever they ask"),
        C("rl leading empty lines", "text", b"\r\n\r\n" + R(), "200"),
        # -- paths -----------------------------------------------------------------
        C("path //score", "text", P(target="//score"), "404"),
        C("path /score/", "text", P(target="/score/"), "404"),
        C("path /SCORE", "text", P(target="/SCORE"), "404"),
        C("path /score;jsessionid", "text", P(target="/score;jsessionid=1"), "404"),
        C("path /scorex", "text", P(target="/scorex"), "404"),
        C("path fragment no key", "text", R("GET", "/score#frag"), "401"),
        C("path traversal", "text", R("GET", "/../../etc/passwd"), "404"),
        C("path traversal encoded", "text", R("GET", "/%2e%2e/%2e%2e/etc/passwd"), "404"),
        C("path %00", "text", R("GET", "/%00"), "404"),
        C("path %0d%0a header injection", "text", R("GET", "/%0d%0aSet-Cookie:%20x=1"), "404",
          check=no_header("set-cookie")),
        C("path %1b escape sequences", "text", R("GET", "/%1b[2J%1b[31mred"), "404"),
        C("path %0a forged log line", "text",
          R("GET", "/x%0a" + FORGED.replace(" ", "%20")), "404"),
        C("path lone %", "text", R("GET", "/%"), "400|404"),
        C("path %zz", "text", R("GET", "/%zz"), "404"),
        C("path overlong UTF-8 %c0%af", "text", R("GET", "/%c0%af"), "404"),
        C("path invalid UTF-8 %ff%fe", "text", R("GET", "/%ff%fe"), "404"),
        C("path encoded /%73core", "text", P(target="/%73core"), "200|404",
          "percent-decoded before routing, as uvicorn does"),
        C("path bidi override U+202E", "text", R("GET", "/%E2%80%AEevil"), "404"),
        C("path C1 CSI %c2%9b", "text", R("GET", "/%c2%9b31m"), "404"),
        C("path 10000 segments", "text", R("GET", "/a" * 10000), "404"),
        # -- query strings ---------------------------------------------------------------
        C("q garbage on /", "text", R("GET", "/?a=%zz&&&=&%%%"), "200"),
        C("q swagger version=4", "text", R("GET", "/swagger.json?version=4"), "404"),
        C("q swagger version=", "text", R("GET", "/swagger.json?version="), "200|404"),
        C("q swagger version=%00", "text", R("GET", "/swagger.json?version=%00"), "404"),
        C("q swagger version twice", "text", R("GET", "/swagger.json?version=3&version=2"), "200"),
        C("q swagger 20 KiB version", "text", R("GET", "/swagger.json?version=" + "A" * 20000),
          "404"),
        C("q GET /score valid data", "json",
          R("GET", "/score?data=" + json.dumps([ROW]).replace(" ", ""), auth=True), "200"),
        C("q GET /score data=%zz", "json", R("GET", "/score?data=%zz", auth=True), "400"),
        C("q GET /score 3000 params", "json",
          R("GET", "/score?" + "&".join(f"p{i}=1" for i in range(3000)), auth=True), "400"),
        C("q GET /score 25 KiB data", "json",
          R("GET", "/score?data=[" + ",".join(["1"] * 12000) + "]", auth=True), "400"),
        C("q GET /score no key", "text", R("GET", "/score?data=[[1]]"), "401"),
        C("q GET /score demo script", "text",
          R("GET", "/score?data=" + json.dumps([ROW]).replace(" ", ""), auth=True), "200"),
        C("q GET /score demo, no data", "text", R("GET", "/score", auth=True), "500",
          "the demo's run() raises KeyError: run()'s own 500 (azmlinfsrv's contract)"),
        C("q %0d%0a in query", "text", R("GET", "/nope?x=%0d%0aSet-Cookie:%20a"), "404",
          check=no_header("set-cookie")),
        # -- headers ---------------------------------------------------------------------
        C("h no colon", "text", R(headers=["NoColonHere"]), "400"),
        C("h space before colon", "text", R(headers=["X-A : 1"]), "400"),
        C("h empty name", "text", R(headers=[": x"]), "400"),
        C("h obs-fold", "text", R(headers=["X-A: a", " folded"]), "400"),
        C("h NUL in value", "text", R(headers=[b"X-A: a\x00b"]), "400"),
        C("h bare CR in value", "text", R(headers=[b"X-A: a\rInjected: 1"]), "400"),
        C("h ESC in value", "text", R(headers=[b"X-A: \x1b[2J"]), "400"),
        C("h DEL in value", "text", R(headers=[b"X-A: a\x7fb"]), "200|400"),
        C("h obs-text value", "text", R(headers=[b"X-A: caf\xe9"]), "200"),
        C("h tab inside value", "text", R(headers=[b"X-A: a\tb"]), "200"),
        C("h non-ASCII name", "text", R(headers=[b"X-\xe9: 1"]), "400"),
        C("h 100 headers", "text", R(headers=[f"X-{i}: v" for i in range(97)]), "200"),
        C("h 101+ headers", "text", R(headers=[f"X-{i}: v" for i in range(110)]), "431,-"),
        C("h 3000 tiny headers", "text", R(headers=[f"X{i}:" for i in range(3000)]), "431,-"),
        C("h 33 KiB value", "text", R(headers=["X-Big: " + "v" * 33000]), "431,-"),
        C("h 33 KiB name", "text", R(headers=["X" * 33000 + ": v"]), "431,-"),
        C("h x-request-id 101 chars", "text", R(headers=["X-Request-Id: " + "r" * 101]), "431"),
        C("h x-request-id 100 chars", "text", R(headers=["X-Request-Id: " + "r" * 100]), "200"),
        C("h x-request-id tab and C1", "text",
          R("GET", "/nope", [b"X-Request-Id: a\tb\x9b31m"]), "404",
          "echoed; must reach the access log escaped (a probe's 200 is not logged: a 404)"),
        C("h x-request-id obs-text", "text", R("GET", "/nope", [b"X-Request-Id: \xe9\xe9"]),
          "404"),
        C("h x-ms-request-id 101", "text", R(headers=["x-ms-request-id: " + "m" * 101]), "431"),
        C("h x-ms-client-request-id 101", "text",
          R(headers=["x-ms-client-request-id: " + "c" * 101]), "431"),
        C("h 20 KiB multipart type", "json", P(ctype="multipart/" + "x" * 20000), "415"),
        C("h X-Forwarded-For spoof", "text", R(headers=["X-Forwarded-For: 1.2.3.4",
                                                        "X-Forwarded-Proto: https"]), "200"),
        C("h Host obs-text", "text", R(host=False, headers=[b"Host: \xff\xfe"]), "200|400"),
        C("h 30 KiB Host", "text", R(host=False, headers=["Host: " + "h" * 30000]), "200|400"),
        C("h two content types", "json", P(headers=["Content-Type: image/png"]), "200|400|415"),
        # -- methods on every route -------------------------------------------------------
        *[C(f"m {m} /score", "text", R(m, "/score", auth=True), "405")
          for m in ("PUT", "DELETE", "PATCH", "TRACE", "PROPFIND", "PURGE")],
        C("m HEAD /score", "text", R("HEAD", "/score", auth=True), "405", kw={"heads": [True]}),
        *[C(f"m {m} {p}", "text", R(m, p), "405")
          for m, p in (("POST", "/"), ("POST", "/healthz/live"), ("PUT", "/healthz/ready"),
                       ("POST", "/swagger.json"), ("DELETE", "/swagger.json"),
                       ("POST", "/metrics"), ("PUT", "/metrics"), ("TRACE", "/"),
                       ("SEARCH", "/"))],
        C("m MKCOL /x (no such path)", "text", R("MKCOL", "/x"), "404"),
        *[C(f"m HEAD {p}", "text", R("HEAD", p), "200", kw={"heads": [True]})
          for p in ("/healthz/ready", "/swagger.json", "/metrics")],
        C("m DELETE unknown path", "text", R("DELETE", "/nowhere"), "404|405"),
        C("m GET /metrics with a body", "text", R("GET", "/metrics", body=b"hello"), "200"),
        C("m OPTIONS /metrics", "text", R("OPTIONS", "/metrics"), "204"),
        # -- auth ----------------------------------------------------------------------
        C("a no Authorization", "text", P(auth=False), "401"),
        C("a empty Authorization", "text", P(auth=False, headers=["Authorization:"]), "401"),
        C("a 'Bearer'", "text", P(auth=False, headers=["Authorization: Bearer"]), "401"),
        C("a 'Bearer ' and spaces", "text", P(auth=False, headers=["Authorization: Bearer    "]),
          "401"),
        C("a scheme lowercase", "text", P(auth=False, headers=[f"Authorization: bearer {KEY}"]),
          "200"),
        C("a scheme uppercase", "text", P(auth=False, headers=[f"Authorization: BEARER {KEY}"]),
          "200"),
        C("a two spaces", "text", P(auth=False, headers=[f"Authorization: Bearer  {KEY}"]),
          "200|401"),
        C("a Basic", "text", P(auth=False, headers=["Authorization: Basic YTpi"]), "401"),
        C("a Token scheme", "text", P(auth=False, headers=[f"Authorization: Token {KEY}"]), "401"),
        C("a key alone", "text", P(auth=False, headers=[f"Authorization: {KEY}"]), "401"),
        C("a wrong key", "text", P(auth=b"nope"), "401"),
        C("a key prefix", "text", P(auth=KEY[:-1].encode()), "401"),
        C("a key plus a byte", "text", P(auth=KEY.encode() + b"x"), "401"),
        C("a key case changed", "text", P(auth=KEY.upper().encode()), "401"),
        C("a two keys in one header", "text", P(auth=f"{KEY}, Bearer {KEY2}".encode()), "401"),
        C("a 30 KiB key", "text", P(auth=b"k" * 30000), "401"),
        C("a UTF-8 key", "text", P(auth="ключ".encode()), "401"),
        C("a latin-1 byte key", "text", P(auth=b"\xe9t\xe9"), "401"),
        C("a NUL in key", "text", P(auth=KEY.encode() + b"\x00"), "400"),
        C("a key in the query", "text", P(auth=False, target=f"/score?key={KEY}"), "401"),
        C("a key in X-Api-Key", "text", P(auth=False, headers=[f"X-Api-Key: {KEY}"]), "401"),
        C("a wrong then right header", "text",
          P(auth=b"wrong", headers=[f"Authorization: Bearer {KEY}"]), "200|400|401"),
        C("a right then wrong header", "text",
          P(headers=["Authorization: Bearer wrong"]), "200|400|401"),
        C("a second key", "text", P(auth=KEY2.encode()), "200"),
        C("a key with trailing tab", "text", P(auth=KEY.encode() + b"\t"), "200"),
        C("a key on a 405", "text", R("PUT", "/score", auth=True), "405"),
        C("a swagger needs no key, shows none", "text", R("GET", "/swagger.json"), "200",
          check=not_in_body(KEY)),
        C("a metrics shows no key", "text", R("GET", "/metrics"), "200", check=not_in_body(KEY)),
        # -- CORS ------------------------------------------------------------------------
        C("c preflight allowed origin", "text",
          R("OPTIONS", "/score", [f"Origin: {ORIGIN}", "Access-Control-Request-Method: POST"]),
          "204", check=header_is("access-control-allow-origin", ORIGIN)),
        C("c preflight other origin", "text",
          R("OPTIONS", "/score", ["Origin: https://evil.example"]), "403"),
        C("c preflight origin null", "text", R("OPTIONS", "/score", ["Origin: null"]), "403"),
        C("c preflight origin suffix", "text",
          R("OPTIONS", "/score", [f"Origin: {ORIGIN}.evil.example"]), "403"),
        C("c preflight origin as subdomain", "text",
          R("OPTIONS", "/score", ["Origin: https://evil.good.example"]), "403"),
        C("c preflight empty origin", "text", R("OPTIONS", "/score", ["Origin:"]), "403|204"),
        C("c preflight no origin", "text", R("OPTIONS", "/score"), "204",
          check=no_header("access-control-allow-origin")),
        C("c preflight 20 KiB request headers", "text",
          R("OPTIONS", "/score", [f"Origin: {ORIGIN}",
                                  "Access-Control-Request-Headers: " + "x," * 10000]), "204"),
        C("c preflight DELETE", "text",
          R("OPTIONS", "/score", [f"Origin: {ORIGIN}", "Access-Control-Request-Method: DELETE"]),
          "204", check=header_is("access-control-allow-methods", "GET, POST, OPTIONS")),
        C("c simple request, other origin", "text", P(headers=["Origin: https://evil.example"]),
          "200", check=no_header("access-control-allow-origin")),
        C("c preflight /", "text", R("OPTIONS", "/", [f"Origin: {ORIGIN}"]), "204"),
        # -- upgrades --------------------------------------------------------------------
        C("u websocket on /score", "text",
          R("GET", "/score", ["Upgrade: websocket", "Connection: Upgrade",
                              "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                              "Sec-WebSocket-Version: 13"], close=False), "4xx",
          "no websocket route: a 4xx (it was a 500)"),
        C("u websocket on / with key", "text",
          R("GET", "/", ["Upgrade: websocket", "Connection: Upgrade",
                         "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                         "Sec-WebSocket-Version: 13"], auth=True, close=False), "200|4xx"),
        C("u websocket bad version", "text",
          R("GET", "/", ["Upgrade: websocket", "Connection: Upgrade",
                         "Sec-WebSocket-Version: 99"], close=False), "200|4xx"),
        C("u h2c upgrade", "text",
          R("GET", "/", ["Upgrade: h2c", "Connection: Upgrade, HTTP2-Settings",
                         "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA"], close=False), "200"),
        C("u Connection: upgrade alone", "text", R(headers=["Connection: upgrade"]), "200"),
        C("u websocket POST /score with body", "json",
          P(headers=["Upgrade: websocket", "Connection: Upgrade"], close=False), "200|4xx"),
        # -- body framing (the json server: the runtime reads the body) --------------------
        C("b Content-Length -1", "json", P(clen="-1"), "400"),
        C("b Content-Length abc", "json", P(clen="abc"), "400"),
        C("b Content-Length +5", "json", P(clen="+5"), "400"),
        C("b Content-Length 5.0", "json", P(clen="5.0"), "400"),
        C("b Content-Length 0x10", "json", P(clen="0x10"), "400"),
        C("b Content-Length 1 0", "json", P(clen="1 0"), "400"),
        C("b Content-Length 2**80", "json", P(b"", clen=str(2 ** 80)), "400|413"),
        C("b Content-Length over the limit", "json", P(b"", clen=str(MAX_BODY + 1)), "413"),
        C("b two different Content-Lengths", "json",
          P(headers=[f"Content-Length: {len(VALID) + 1}"]), "400"),
        C("b two equal Content-Lengths", "json", P(headers=[f"Content-Length: {len(VALID)}"]),
          "200|400"),
        C("b Content-Length list", "json", P(clen=f"{len(VALID)}, {len(VALID)}"), "200|400"),
        C("b Content-Length shorter than body", "json",
          P(clen=10, close=False) + b"GARBAGE\r\n\r\n", "400,400", kw={"want": 2}),
        C("b chunked", "json", P(chunked(VALID[:20], VALID[20:]), clen=False,
                                 headers=["Transfer-Encoding: chunked"]), "200"),
        C("b chunked with extensions", "json",
          P(b"%x;ext=1;q=\"v\"\r\n%s\r\n0\r\n\r\n" % (len(VALID), VALID), clen=False,
            headers=["Transfer-Encoding: chunked"]), "200"),
        C("b chunked with trailers", "json",
          P(chunked(VALID, trailer=b"X-Trailer: 1\r\n"), clen=False,
            headers=["Transfer-Encoding: chunked", "Trailer: X-Trailer"]), "200"),
        C("b chunked, Content-Length in trailers", "json",
          P(chunked(VALID, trailer=b"Content-Length: 99\r\n"), clen=False,
            headers=["Transfer-Encoding: chunked"]), "200|400", counted=True),
        C("b chunked size zz", "json",
          P(b"zz\r\nabc\r\n0\r\n\r\n", clen=False, headers=["Transfer-Encoding: chunked"]), "400",
          counted=True),
        C("b chunked size -1", "json",
          P(b"-1\r\nabc\r\n0\r\n\r\n", clen=False, headers=["Transfer-Encoding: chunked"]), "400",
          counted=True),
        C("b chunked size overflow", "json",
          P(b"ffffffffffffffffffff\r\nabc\r\n", clen=False, headers=["Transfer-Encoding: chunked"]),
          "400|413", counted=True),
        C("b chunked data longer than size", "json",
          P(b"2\r\nabcdef\r\n0\r\n\r\n", clen=False, headers=["Transfer-Encoding: chunked"]),
          "400", counted=True),
        C("b chunked Chunked", "json",
          P(chunked(VALID), clen=False, headers=["Transfer-Encoding: Chunked"]), "200"),
        C("b Transfer-Encoding gzip, chunked", "json",
          P(chunked(VALID), clen=False, headers=["Transfer-Encoding: gzip, chunked"]),
          "200|400|415|501", "a content coding nobody decodes"),
        C("b Transfer-Encoding identity", "json",
          P(headers=["Transfer-Encoding: identity"]), "400|501"),
        C("b Transfer-Encoding xchunked", "json",
          P(chunked(VALID), clen=False, headers=["Transfer-Encoding: xchunked"]), "400|501",
          counted=True),
        C("b Transfer-Encoding : chunked", "json",
          P(chunked(VALID), clen=False, headers=["Transfer-Encoding : chunked"]), "400"),
        C("b TE twice", "json", P(chunked(VALID), clen=False,
                                  headers=["Transfer-Encoding: chunked",
                                           "Transfer-Encoding: chunked"]), "400|200"),
        C("b TE tab chunked", "json",
          P(chunked(VALID), clen=False, headers=["Transfer-Encoding:\tchunked"]), "200|400"),
        C("b CL then TE (CL.TE smuggling)", "json",
          P(b"0\r\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", clen=6,
            headers=["Transfer-Encoding: chunked"], close=False), "400,-"),
        C("b TE then CL (TE.CL smuggling)", "json",
          P(b"5c\r\nGPOST /score HTTP/1.1\r\n\r\n0\r\n\r\n", clen=4, close=False,
            headers=["Transfer-Encoding: chunked"]), "400,-"),
        C("b TE chunked and CL 0", "json",
          P(chunked(VALID), clen=0, headers=["Transfer-Encoding: chunked"]), "400"),
        C("b chunked body on GET /", "text",
          R("GET", "/", ["Transfer-Encoding: chunked"], body=b"0\r\n\r\n", clen=False), "200"),
        C("b GET /score with a body", "json", R("GET", "/score", body=VALID, auth=True), "400"),
        C("b Expect 100-continue over the limit", "json",
          P(b"", clen=str(MAX_BODY * 2), headers=["Expect: 100-continue"]), "413",
          "refused before the body is asked for: no 100"),
        C("b Expect 100-continue without key", "json",
          P(b"", auth=False, clen=len(VALID), headers=["Expect: 100-continue"]), "401"),
        C("b Expect 100-continue then body", "json", expect_continue_ok, "100,200"),
        C("b Expect bogus", "json", P(headers=["Expect: bogus"]), "200|417"),
        # -- JSON content (the json server parses it) ------------------------------------
        C("j empty body", "json", P(b"", clen=0), "400"),
        C("j truncated", "json", P(b'{"data": [[1,'), "400"),
        C("j bad UTF-8", "json", P(b'{"data": "\xff\xfe"}'), "400"),
        C("j UTF-8 BOM", "json", P(b"\xef\xbb\xbf" + VALID), "200|400"),
        C("j UTF-16", "json", P(VALID.decode().encode("utf-16")), "200|400"),
        C("j raw NUL in string", "json", P(b'{"data": "a\x00b"}'), "400"),
        C("j escaped NUL as data", "json", P(b'{"data": "\\u0000"}'), "400"),
        C("j lone surrogate", "json", P(b'{"data": "\\ud800"}'), "400"),
        C("j NaN", "json", P(nan_rows("NaN")), "400"),
        C("j Infinity", "json", P(nan_rows("Infinity")), "400"),
        C("j 1e999", "json", P(nan_rows("1e999")), "400"),
        C("j -1e999", "json", P(nan_rows("-1e999")), "400"),
        C("j 5000-digit integer", "json", P(nan_rows("9" * 5000)), "400"),
        C("j 1e308 values", "json", P(nan_rows("1e308")), "200|400"),
        C("j 200k-digit float", "json", P(nan_rows("1." + "0" * 200000)), "200"),
        C("j 1e-400", "json", P(nan_rows("1e-400")), "200"),
        C("j 5 MiB string", "json", P(b'{"data": "' + b"a" * (5 << 20) + b'"}'), "400",
          heavy=True),
        C("j 200k keys, no data", "json", P(many_keys), "400", heavy=True),
        C("j 200k keys and data", "json", P(many_keys[:-1] + b', "data": ' +
                                            json.dumps([ROW]).encode() + b"}"), "200", heavy=True),
        C("j 100k nested arrays", "json", P(deep(100000)), "400"),
        C("j 100k nested objects", "json", P(b'{"data": ' + b'{"a":' * 100000 + b"1" +
                                             b"}" * 100001), "400"),
        C("j 950 nested arrays", "json", P(deep(950)), "400"),
        C("j 30 nested arrays of data", "json",
          P(b'{"data": ' + b"[" * 30 + b"1" + b"]" * 30 + b"}"),
          "400"),
        C("j top-level 1", "json", P(b"1"), "400"),
        C("j top-level null", "json", P(b"null"), "400"),
        C("j top-level string", "json", P(b'"x"'), "400"),
        C("j top-level true", "json", P(b"true"), "400"),
        C("j data []", "json", P(b'{"data": []}'), "400"),
        C("j data ragged", "json", P(b'{"data": [[1,2],[3]]}'), "400"),
        C("j data strings", "json", P(json.dumps({"data": [["a"] * 10]}).encode()), "400"),
        C("j data objects", "json", P(json.dumps({"data": [[{}] * 10]}).encode()), "400"),
        C("j data lists in cells", "json", P(json.dumps({"data": [[[1]] * 10]}).encode()), "400"),
        C("j data nulls", "json", P(json.dumps({"data": [[None] * 10]}).encode()), "400"),
        C("j data booleans", "json", P(json.dumps({"data": [[True] * 10]}).encode()), "200"),
        C("j data 3 features", "json", P(b'{"data": [[1,2,3]]}'), "400"),
        C("j data 100k features", "json", P(json.dumps({"data": [[1] * 100000]}).encode()), "400"),
        C("j data 50k rows", "json", P(json.dumps({"data": [ROW] * 50000}).encode()), "200",
          heavy=True),
        C("j method fit", "json", P(json.dumps({"data": [ROW], "method": "fit"}).encode()), "400"),
        C("j method __class__", "json",
          P(json.dumps({"data": [ROW], "method": "__class__"}).encode()), "400"),
        C("j method a list", "json", P(json.dumps({"data": [ROW], "method": ["x"]}).encode()),
          "400"),
        C("j method transform (absent)", "json",
          P(json.dumps({"data": [ROW], "method": "transform"}).encode()), "400"),
        C("j ONNX tensor body on sklearn", "json", P(b'{"inputs": {"x": {"dims": [1]}}}'), "400"),
        C("j duplicate keys", "json",
          P(b'{"data": 1, "data": ' + json.dumps([ROW]).encode() + b"}"),
          "200"),
        C("j trailing garbage", "json", P(VALID + b" xyz"), "400"),
        C("j trailing comma", "json", P(b'{"data": [[1,2],],}'), "400"),
        C("j single quotes", "json", P(b"{'data': [[1]]}"), "400"),
        C("j comments", "json", P(b'{"data": /* hi */ [[1]]}'), "400"),
        C("j input_data alias", "json", P(json.dumps({"input_data": [ROW]}).encode()), "200"),
        C("j content type multipart", "json", P(ctype="multipart/form-data; boundary=x"), "415"),
        C("j content type image/png", "json", P(ctype="image/png"), "415"),
        C("j content type octet-stream", "json", P(ctype="application/octet-stream"), "415"),
        C("j content type MULTIPART/FORM-DATA", "json", P(ctype="MULTIPART/FORM-DATA"), "415"),
        C("j multipart garbage", "json",
          P(b"--x\r\nContent-Disposition: form-data; name=\"f\"\r\n\r\n\x00\xff--",
            ctype="multipart/form-data; boundary=x"),
          "415"),
        C("j content type text/plain", "json", P(ctype="text/plain"), "200"),
        C("j content type form", "json", P(ctype="application/x-www-form-urlencoded"), "200"),
        C("j no content type", "json", P(ctype=None), "200"),
        C("j charset utf-16 label, UTF-8 body", "json", P(ctype="application/json; charset=utf-16"),
          "200"),
        # -- the demo script (text mode: run() parses the body itself) ---------------------
        C("t valid", "text", P(), "200"),
        C("t invalid JSON", "text", P(b"{"), "500", "run()'s json.loads raises: run()'s 500",
          check=header_is("x-ms-run-function-failed", "True")),
        C("t 100k nested arrays", "text", P(deep(100000)), "500",
          "the RecursionError is run()'s own: a 500 with the usual body"),
        C("t bad UTF-8", "text", P(b'{"data": "\xff"}'), "500"),
        C("t body at the limit", "text", lambda ctx: big_body(ctx, MAX_BODY), "200", heavy=True),
        C("t body one byte over", "text", lambda ctx: big_body(ctx, MAX_BODY + 1), "413",
          heavy=True),
        # -- connections ---------------------------------------------------------------
        C("k half a head, then nothing", "text", slow_head, "408,-", slow=True),
        C("k head dribbled a byte at a time", "text", dribble_head, "408,-", slow=True),
        C("k connection that sends nothing", "text", idle_connection, "-", slow=True),
        C("k idle keep-alive", "text", idle_keepalive, "200,-", slow=True),
        C("k body never finishes (key)", "json", slow_body, "408,-", slow=True, counted=True,
          why="a body that stops coming holds a connection for ever"),
        C("k body dribbled (key)", "json", lambda ctx: slow_body(ctx, dribble=True), "408,-",
          slow=True, counted=True),
        C("k body dribbled after a 401", "json",
          lambda ctx: slow_body(ctx, dribble=True, auth=False), "401,-", slow=True),
        C("k Expect 100-continue, then no body", "json", expect_then_nothing, "100,408,-",
          slow=True, counted=True),
        C("k half-close after a request", "json", P(close=False), "200", kw={"shut": True}),
        C("k half-close mid-head", "text", lambda ctx: half_close_mid(ctx, "head"),
          "- or 400,- or 408,-", slow=True),
        C("k half-close mid-body", "json", lambda ctx: half_close_mid(ctx, "body"),
          "- or 400,- or 408,-", slow=True, uncertain=1),
        C("k reset mid-head", "json",
          lambda ctx: rst_after(ctx, b"POST /score HTTP/1.1\r\nHost: x\r\n"), "any"),
        C("k reset mid-body", "json",
          lambda ctx: rst_after(ctx, P(clen=1000, close=False) + b'{"da'), "any", uncertain=1),
        C("k reset before the answer", "json", lambda ctx: rst_after(ctx, P()), "any",
          uncertain=1),
        C("k reset while a 10 MB body is refused", "json",
          lambda ctx: rst_after(ctx, P(b" " * (MAX_BODY + 10)), wait=0.05), "any", uncertain=1,
          heavy=True),
        C("k 300 connections opened and abandoned", "text", abandon_storm, "200,200,200,200,200,-",
          slow=True, heavy=True),
        C("k 150 half heads at once", "text", partial_head_storm, "200,200,200,200,200,-",
          slow=True, heavy=True),
        C("k garbage pipelined after two requests", "text",
          R(close=False) + R("GET", "/healthz/live", close=False) + b"\x16\x03garbage\r\n\r\n",
          "200,200,400,-", kw={"want": 3, "until_close": True}),
        C("k 100 pipelined requests", "text", R(close=False) * 99 + R(), ",".join(["200"] * 100),
          kw={"want": 100}),
        C("k pipelined request, then 101 headers", "text",
          R(close=False) + R(headers=[f"X-{i}: v" for i in range(110)]), "200,431,-",
          kw={"want": 2, "until_close": True}),
        C("k pipelined POST then GET", "json", P(close=False) + R("GET", "/healthz/ready"),
          "200,200", kw={"want": 2}),
        C("k pipelined 401 with body, then a valid one", "json",
          P(auth=False, close=False) + P(), "401,200", kw={"want": 2}),
        C("k 500 requests on one connection", "json", keepalive_many, "200"),
        C("k 50 connections at once", "json", parallel_valid, "200"),
        C("k 11 MiB chunked body in 64 KiB chunks", "json",
          lambda ctx: big_chunked(ctx, 11 << 20), "413", heavy=True),
        C("k one 32 MiB chunk declared, 11 MiB sent", "json",
          lambda ctx: big_chunked(ctx, 11 << 20, declared=32 << 20), "413", heavy=True),
        # -- the health port (a stdlib server of its own) ----------------------------------
        C("hp GET /", "health", R("GET", "/"), "200"),
        C("hp POST /", "health", R("POST", "/", body=b"x"), "405"),
        C("hp GET /score", "health", R("GET", "/score"), "404"),
        C("hp OPTIONS /", "health", R("OPTIONS", "/"), "405|501"),
        C("hp unknown method", "health", R("FOO"), "400|405|501",
          "http.server answers 501 to a method it does not know (RFC 9110 15.6.2)"),
        C("hp raw ESC in path", "health", R("GET", "/\x1b[31mred"), "404",
          "must reach the access log escaped"),
        C("hp x-request-id with ESC", "health", R(headers=[b"X-Request-Id: \x1b[2J"]), "200"),
        C("hp x-request-id with NUL", "health", R(headers=[b"X-Request-Id: a\x00b"]), "200"),
        C("hp HTTP/0.9", "health", b"GET /\r\n\r\n", "200|400|0.9"),
        C("hp HTTP/2 preface", "health", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "400|505"),
        C("hp binary garbage", "health", garbage, "400 or -"),
        C("hp 40 KiB URL", "health", R("GET", "/" + "a" * 40000), "414"),
        C("hp 110 headers", "health", R(headers=[f"X-{i}: v" for i in range(110)]), "431"),
        C("hp 33 KiB header", "health", R(headers=["X-Big: " + "v" * 33000]), "431"),
        C("hp ready?wait=1e999", "health", R("GET", "/healthz/ready?wait=1e999"), "200"),
        C("hp ready?wait=nan", "health", R("GET", "/healthz/ready?wait=nan"), "200"),
        C("hp chunked POST", "health",
          R("POST", "/", ["Transfer-Encoding: chunked"], body=b"0\r\n\r\n", clen=False), "405"),
        C("hp half a head", "health", lambda ctx: slow_head(ctx, ctx.ports["health"]),
          "- or 408,-",
          slow=True),
    ]
    return cases


# -- running -------------------------------------------------------------------------------
def spec_matches(spec: str, out: Outcome) -> bool:
    if spec == "any":
        return True
    for alt in spec.split(" or "):
        items = alt.split(",")
        want_close = items[-1] == "-"
        if want_close:
            items = items[:-1]
        got = out.statuses
        if len(got) != len(items) or (want_close and not out.closed):
            continue
        if all(_status_matches(tok, st) for tok, st in zip(items, got)):
            return True
    return False


def _status_matches(tok: str, status) -> bool:
    for one in tok.split("|"):
        if one == "-":
            continue
        if one == str(status):
            return True
        if one.endswith("xx") and isinstance(status, int) and status // 100 == int(one[0]):
            return True
    return False


def body_problem(out: Outcome) -> str | None:
    """An answer of the app (it carries x-request-id) with status >= 400 must have the
    usual error body; no 5xx without x-request-id (nothing but the app may fail)."""
    for r in out.responses:
        if not isinstance(r.status, int) or r.status < 400 or r.head:
            continue
        if "x-request-id" in r.headers:
            try:
                doc = json.loads(r.body)
            except ValueError:
                return f"{r.status} body is not JSON: {r.body[:60]!r}"
            if not isinstance(doc, dict) or doc.get("status_code") != r.status:
                return f"{r.status} body {r.body[:60]!r}"
        elif r.status >= 500 and r.status not in (501, 505):
            return f"{r.status} from below the app: {r.body[:60]!r}"
    return None


@dataclass
class Result:
    case: Case
    got: str
    ok: bool
    problem: str = ""
    seconds: float = 0.0


class Context:
    def __init__(self, ports: dict, tally: Tally):
        self.ports = ports
        self.tally = tally


def run_case(ctx: Context, case: Case) -> Result:
    port = ctx.ports[case.server]
    started = time.monotonic()
    try:
        if callable(case.request):
            out = case.request(ctx)
        else:
            kw = dict(case.kw)
            if any(alt.endswith("-") for alt in case.expect.split(" or ")):
                kw.setdefault("until_close", True)
                kw.setdefault("want", None)
            out = exchange(port, case.request, **kw)
    except Exception as exc:  # noqa: BLE001 - a broken case is a failed case
        out = Outcome(note=f"client error {type(exc).__name__}: {exc}")
        return Result(case, out.render(), False, out.note, time.monotonic() - started)
    if case.server != "health":  # the health port keeps no metrics
        ctx.tally.add(port, out, case.counted)
    if case.uncertain:
        ctx.tally.maybe(port, case.uncertain)
    ok = spec_matches(case.expect, out)
    problem = ""
    extra = body_problem(out) if case.server != "health" else None
    if extra is None and case.check is not None and ok:
        extra = case.check(out)
    if extra:
        ok, problem = False, extra
    return Result(case, out.render(), ok, problem, time.monotonic() - started)


def scan_log(path: Path) -> list[str]:
    """Lines of the server's log with a raw control character, or forged."""
    problems = []
    text = path.read_bytes().decode("utf-8", "replace")
    for n, line in enumerate(text.split("\n"), 1):
        if line.startswith(FORGED[:23]):
            problems.append(f"{path.name}:{n}: forged line: {line[:100]!r}")
        elif not line.isprintable():
            problems.append(f"{path.name}:{n}: control character: {line[:160]!r}")
    return problems


def prepare(workdir: Path) -> dict[str, Server]:
    shutil.copy(DEMO / "src" / "score.py", workdir / "score.py")
    shutil.copy(DEMO / "train.py", workdir / "train.py")
    subprocess.run([sys.executable, "train.py"], cwd=workdir, check=True,
                   stdout=subprocess.DEVNULL)
    model = workdir / "models" / "sklearn_regression_model.pkl"
    common = {"MLBUILD_AUTH_KEYS": f"{KEY},{KEY2}", "MLBUILD_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
              "MLBUILD_KEEPALIVE_TIMEOUT": str(KEEPALIVE_TIMEOUT)}
    servers = {
        "text": Server("text", ["--entry-script", "score.py", "--model-dir", "models"],
                       {**common, "MLBUILD_CORS_ORIGINS": ORIGIN}, workdir),
        "json": Server("json", ["--no-code-model", str(model), "--no-code-framework",
                                "scikit-learn"], common, workdir),
    }
    for server in servers.values():
        server.wait_ready()
    return servers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="leave out the cases that move megabytes or open hundreds of "
                             "connections")
    parser.add_argument("--only", help="run only the cases whose name holds this text")
    parser.add_argument("--failures-only", action="store_true",
                        help="print only the cases that failed, not the whole table")
    parser.add_argument("--keep", help="keep the servers' logs in this folder")
    args = parser.parse_args(argv)

    cases = [c for c in catalogue() if not (args.quick and c.heavy)
             and (not args.only or args.only in c.name)]
    workdir = Path(tempfile.mkdtemp(prefix="mlbuild-abuse-"))
    servers: dict[str, Server] = {}
    failures: list[str] = []
    try:
        servers = prepare(workdir)
        text, js = servers["text"], servers["json"]
        ports = {"text": text.port, "json": js.port, "health": text.health_port}
        tally = Tally()
        for _ in range(200):  # warm up: the first requests allocate what stays
            for server in (text, js):
                valid_request(server.port)
        before = {name: (s.rss_mb(), s.fds(), metrics(s.port)) for name, s in servers.items()}
        for s in servers.values():
            tally.add(s.port, 200)  # the /metrics request just made counts in the next
        ctx = Context(ports, tally)
        steady = Steady([text.port, js.port], tally)
        steady.start()
        started = time.monotonic()

        results: dict[int, Result] = {}
        slow = [(i, c) for i, c in enumerate(cases) if c.slow]
        fast = [(i, c) for i, c in enumerate(cases) if not c.slow]
        pool = ThreadPoolExecutor(max(1, len(slow)))
        futures = {i: pool.submit(run_case, ctx, c) for i, c in slow}
        after_valid: dict[int, tuple] = {}
        for i, case in fast:
            results[i] = run_case(ctx, case)
            after_valid[i] = valid_request(ports[case.server if case.server != "health"
                                                  else "text"], tally)
        for i, future in futures.items():
            results[i] = future.result()
        pool.shutdown()
        middle = {name: s.rss_mb() for name, s in servers.items()}
        # The quick cases once more: memory that grows from one pass to the next leaks;
        # what the first pass took and the second did not add is the allocator's.
        second: list[str] = []
        for i, case in fast:
            r = run_case(ctx, case)
            status = valid_request(ports[case.server if case.server != "health"
                                         else "text"], tally)[0]
            if not r.ok or status != 200:
                after = "" if status == 200 else f"; the valid request after it got {status}"
                second.append(f"case {case.name} (second pass): expected {case.expect}, got "
                              f"{r.got}{f' ({r.problem})' if r.problem else ''}{after}")
        steady.stop_event.set()
        steady.join(15)
        elapsed = time.monotonic() - started

        # Descriptors: once every timeout passed, what the cases opened is closed.
        time.sleep(max(HEADER_TIMEOUT, KEEPALIVE_TIMEOUT) + 1.0)
        after = {name: (s.rss_mb(), s.fds(), metrics(s.port)) for name, s in servers.items()}

        width = max(len(c.name) for c in cases)
        if not args.failures_only:
            print(f"{'case':<{width}}  {'expected':<18} {'got':<24} ok")
        for i, case in enumerate(cases):
            r = results[i]
            status, latency = after_valid.get(i, (200, 0.0))
            if status != 200:
                problem = f"{r.problem}; " if r.problem else ""
                r.ok, r.problem = False, f"{problem}the valid request after it got {status}"
            if not args.failures_only or not r.ok:
                mark = "ok" if r.ok else "FAIL"
                print(f"{case.name:<{width}}  {case.expect:<18} {r.got:<24} {mark}"
                      + (f"  <- {r.problem}" if r.problem else "")
                      + (f"  [{case.why}]" if case.why and not r.ok else ""))
            if not r.ok:
                failures.append(f"case {case.name}: expected {case.expect}, got {r.got}"
                                + (f" ({r.problem})" if r.problem else ""))
        passed = sum(r.ok for r in results.values())
        print(f"\ncases: {len(cases)}, passed: {passed}, failed: {len(cases) - passed}; "
              f"second pass of the {len(fast)} quick ones: {len(fast) - len(second)} passed "
              f"({elapsed:.1f} s)")
        for line in second:
            print(f"  {line}")
        failures += second

        print(f"valid requests alongside: {steady.sent} sent, {steady.failed} not 200, "
              f"slowest {steady.worst * 1000:.0f} ms; after each case: "
              f"{sum(1 for s, _ in after_valid.values() if s == 200)}/{len(after_valid)} got 200")
        if steady.failed:
            failures.append(f"valid requests alongside: {steady.failed}/{steady.sent} failed: "
                            f"{steady.failures}")
        for name, server in servers.items():
            rss0, fds0, m0 = before[name]
            rss1, fds1, m1 = after[name]
            print(f"{name}: RSS {rss0:.1f} -> {middle[name]:.1f} after one pass -> {rss1:.1f} MB "
                  f"after two ({rss1 - rss0:+.1f}, bound +{RSS_BOUND_MB}; second pass "
                  f"{rss1 - middle[name]:+.1f}, bound +{RSS_PASS_BOUND_MB}); open descriptors "
                  f"{fds0} -> {fds1}")
            if rss1 - rss0 > RSS_BOUND_MB:
                failures.append(f"{name}: RSS grew {rss1 - rss0:.1f} MB")
            if rss1 - middle[name] > RSS_PASS_BOUND_MB:
                failures.append(f"{name}: RSS grew {rss1 - middle[name]:.1f} MB in the second "
                                f"pass (a leak?)")
            if fds1 > fds0 + 5:
                failures.append(f"{name}: {fds1 - fds0} more open descriptors after the timeouts")
            seen = tally.seen.get(server.port, {})
            slack = tally.uncertain.get(server.port, 0)
            delta = {s: m1.get(s, 0) - m0.get(s, 0) for s in set(m0) | set(m1)}
            delta = {s: n for s, n in delta.items() if n}
            wrong = {s: (delta.get(s, 0), seen.get(s, 0)) for s in set(delta) | set(seen)
                     if not seen.get(s, 0) <= delta.get(s, 0) <= seen.get(s, 0) + slack}
            total_extra = sum(delta.values()) - sum(seen.values())
            print(f"{name}: /metrics counted {dict(sorted(delta.items()))}; the client saw "
                  f"{dict(sorted(seen.items()))} (+ up to {slack} it could not see)")
            if wrong or not 0 <= total_extra <= slack:
                failures.append(f"{name}: /metrics disagrees with the client: "
                                f"(counted, seen) {wrong}, {total_extra} extra")
    finally:
        for server in servers.values():
            server.stop()
    for server in servers.values():
        problems = scan_log(server.log_path)
        print(f"{server.name} log: {len(problems)} bad lines")
        for p in problems[:10]:
            print(f"  {p}")
        failures += problems
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
        for server in servers.values():
            shutil.copy(server.log_path, Path(args.keep) / server.log_path.name)
    shutil.rmtree(workdir, ignore_errors=True)
    if failures:
        print(f"\nFAILED: {len(failures)} problem(s)")
        for f in failures[:40]:
            print(f"  {f}")
        return 1
    print("\nall held")
    return 0


if __name__ == "__main__":
    sys.exit(main())
