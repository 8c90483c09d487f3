"""A closed-loop HTTP/1.1 load generator for one URL.

``concurrency`` keep-alive connections each keep exactly one request in flight: send,
wait for the whole response, send the next (round-robin over the pre-encoded requests,
one per body). After an optional warm-up, a window of ``duration`` seconds is measured::

    start ── warm-up (connect, first-call costs; nothing counted) ── window ── stop
                                                                 ^          ^
                     requests in flight here count as sent       abandoned here

Counted in the window: requests sent (in flight at its start included, so
``responses + errors <= requests``), complete responses by status, errors by kind, the
latency of every response (HDR histogram, microseconds, send to last byte), reconnects,
and the generator's own CPU time.

Error kinds:
    connect   a connection could not be made (refused, unreachable, no answer in time)
    timeout   no complete response within ``timeout``: the connection is dropped
    closed    the server closed the connection with a request in flight
    reset     the connection broke (ECONNRESET, EPIPE) with a request in flight
    parse     the response was not HTTP/1.x as understood here

A connection that ends is made again (counted in ``reconnects``); one ended after a
response that said ``Connection: close`` (or HTTP/1.0) is no error.

Why it is fast enough to measure a Python model server from one core: asyncio Protocols
(on uvloop when importable) writing pre-encoded bytes, and response parsing reduced to
the status line and Content-Length (chunked and read-until-close are the slow paths);
per response one read and one write system call, a handful of bytes operations, two clock
reads and one histogram count (~6 us of Python). With ``processes`` > 1 (the default is
2, see :func:`generate_load`) the connections are split over that many Python
subprocesses, started together on a shared monotonic deadline, their results merged.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import resource
import select
import struct
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Mapping, Sequence
from urllib.parse import urlsplit

from mlbuild.errors import InvalidInput, MlbuildError
from mlbuild.profile.histogram import LatencyHistogram

ERROR_KINDS = ("connect", "timeout", "closed", "reset", "parse")

_HEAD = -1      # reading the status line and headers
_CHUNKED = -2   # reading a chunked body
_TO_CLOSE = -3  # reading a body delimited by the end of the connection
_MAX_HEAD = 64 * 1024
_CONNECT_BACKOFF = 0.01  # seconds between failed connects: a refused port must not spin


# --- the result ------------------------------------------------------------------------

@dataclass
class LoadResult:
    """What one window of load measured.

    Attributes:
        url: the URL loaded.
        concurrency: connections (each with one request in flight).
        duration: seconds measured (the window as it really ran).
        requests: requests sent in the window, those in flight at its start included.
        responses: complete responses received in the window.
        status: responses by HTTP status.
        errors: errors by kind (see the module docstring), only kinds that occurred.
        reconnects: connections made again after the server or a timeout closed one.
        latency: microseconds from sending a request to the last byte of its response,
            for every response (whatever its status).
        cpu_seconds: user + system CPU time of the generator in the window.
        processes: generator processes that shared the connections.
        started: ``time.monotonic()`` when the window began (system-wide on Linux, so
            comparable across processes): lets a caller match its own samples (a
            container's CPU counter) to the window.
    """

    url: str
    concurrency: int
    duration: float = 0.0
    requests: int = 0
    responses: int = 0
    status: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    reconnects: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    cpu_seconds: float = 0.0
    processes: int = 1
    started: float = 0.0

    @property
    def successes(self) -> int:
        """Responses with a 2xx status."""
        return sum(n for code, n in self.status.items() if 200 <= code < 300)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def success_rate(self) -> float:
        """Successes over the requests that ended (a response or an error)."""
        ended = self.responses + self.error_count
        return self.successes / ended if ended else 0.0

    @property
    def rps(self) -> float:
        """Responses per second."""
        return self.responses / self.duration if self.duration > 0 else 0.0

    @property
    def cpu_us_per_response(self) -> float:
        return self.cpu_seconds * 1e6 / self.responses if self.responses else 0.0

    def merge(self, other: LoadResult) -> None:
        """Fold in another process's share of the same window."""
        self.concurrency += other.concurrency
        self.duration = max(self.duration, other.duration)
        self.requests += other.requests
        self.responses += other.responses
        for code, n in other.status.items():
            self.status[code] = self.status.get(code, 0) + n
        for kind, n in other.errors.items():
            self.errors[kind] = self.errors.get(kind, 0) + n
        self.reconnects += other.reconnects
        self.latency.merge(other.latency)
        self.cpu_seconds += other.cpu_seconds
        self.processes += other.processes
        if other.started and (not self.started or other.started < self.started):
            self.started = other.started

    def summary(self, percentiles: Sequence[float] = (50, 90, 95, 99, 99.9)) -> dict:
        """A JSON-ready digest: counts, rates, and latency percentiles in milliseconds."""
        values = self.latency.percentiles(percentiles)
        return {
            "url": self.url, "concurrency": self.concurrency,
            "duration_s": round(self.duration, 3), "requests": self.requests,
            "responses": self.responses, "successes": self.successes,
            "success_rate": round(self.success_rate, 5), "rps": round(self.rps, 1),
            "status": {str(k): v for k, v in sorted(self.status.items())},
            "errors": dict(sorted(self.errors.items())), "reconnects": self.reconnects,
            "latency_ms": {f"p{q:g}": round(v / 1000, 3) for q, v in zip(percentiles, values)}
            | {"mean": round(self.latency.mean / 1000, 3),
               "max": round(self.latency.max / 1000, 3)},
            "cpu_us_per_response": round(self.cpu_us_per_response, 1),
            "processes": self.processes,
        }


# --- requests --------------------------------------------------------------------------

def build_requests(url: str, bodies: Sequence[bytes] = (), *, method: str | None = None,
                   content_type: str = "application/json", authorization: str | None = None,
                   headers: Mapping[str, str] | None = None) -> tuple[str, int, list[bytes]]:
    """The host, port and pre-encoded HTTP/1.1 requests (one per body, or one without).

    Args:
        url: ``http://host[:port]/path[?query]``.
        bodies: request bodies (str is sent UTF-8); with none, one request without one.
        method: default POST with bodies, else GET.
        content_type: the Content-Type of the bodies.
        authorization: the whole Authorization value (``Bearer KEY``), if any.
        headers: further headers.

    Raises:
        InvalidInput: not an http URL, a GET with bodies, a header with a line break.
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise InvalidInput(f"load generator: {url!r} is not an http:// URL",
                           hint="https is not supported: load the service's plain port")
    try:
        port = parts.port or 80
    except ValueError as exc:
        raise InvalidInput(f"load generator: {url!r}: {exc}") from None
    method = (method or ("POST" if bodies else "GET")).upper()
    if bodies and method in ("GET", "HEAD"):
        raise InvalidInput(f"load generator: a {method} request cannot carry a body")
    host = parts.hostname
    host_header = f"[{host}]" if ":" in host else host
    if parts.port:
        host_header += f":{parts.port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host_header}",
             "User-Agent: mlbuild-loadgen", "Accept: */*"]
    if authorization:
        lines.append(f"Authorization: {authorization}")
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if any(c in line for line in lines for c in "\r\n"):
        raise InvalidInput("load generator: a header name or value holds a line break")
    head = "\r\n".join(lines).encode("latin-1")
    if not bodies:
        extra = b"\r\nContent-Length: 0" if method in ("POST", "PUT", "PATCH") else b""
        return host, port, [head + extra + b"\r\n\r\n"]
    ctype = f"\r\nContent-Type: {content_type}".encode("latin-1")
    bodies = [b.encode() if isinstance(b, str) else bytes(b) for b in bodies]
    return host, port, [head + ctype + b"\r\nContent-Length: %d\r\n\r\n" % len(b) + b
                        for b in bodies]


# --- one process's share ---------------------------------------------------------------

class _Run:
    """The state shared by one process's connections (one event loop, no locks)."""

    def __init__(self, host: str, port: int, reqs: list[bytes], timeout: float,
                 result: LoadResult):
        self.host, self.port, self.reqs = host, port, reqs
        self.nreqs = len(reqs)
        self.next_req = 0
        self.timeout = timeout
        self.timeout_ns = int(timeout * 1e9)
        self.running = False    # send requests, make connections
        self.measuring = False  # count what happens
        self.result = result
        self.status = result.status
        self.record = result.latency.record
        self.conns: list[_Conn] = []
        self.loop: asyncio.AbstractEventLoop | None = None

    def error(self, kind: str) -> None:
        if self.measuring:
            errors = self.result.errors
            errors[kind] = errors.get(kind, 0) + 1

    def reconnect(self, conn: _Conn) -> None:
        if self.measuring:
            self.result.reconnects += 1
        self.loop.create_task(self.connect(conn))

    async def connect(self, conn: _Conn) -> None:
        loop = self.loop
        while self.running:
            try:
                await asyncio.wait_for(
                    loop.create_connection(lambda: conn, self.host, self.port), self.timeout)
                return
            except (OSError, asyncio.TimeoutError):
                self.error("connect")
                await asyncio.sleep(_CONNECT_BACKOFF)

    def sweep(self) -> None:
        """Drop the connections whose request is older than the timeout."""
        now = time.perf_counter_ns()
        for conn in self.conns:
            if (conn.busy and now - conn.t0 > self.timeout_ns and not conn.dropped
                    and conn.transport is not None):
                self.error("timeout")
                conn.drop()


class _Conn(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    __slots__ = ("run", "transport", "buf", "busy", "t0", "left", "code", "close_after",
                 "dropped")

    def __init__(self, run: _Run):
        self.run = run
        self.transport = None
        self._reset()

    def _reset(self) -> None:
        self.buf = b""
        self.busy = False
        self.t0 = 0
        self.left = _HEAD
        self.code = 0
        self.close_after = False
        self.dropped = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._reset()
        if self.run.running:
            self.send()
        else:
            transport.abort()

    def send(self) -> None:
        run = self.run
        i = run.next_req
        run.next_req = i + 1 if i + 1 < run.nreqs else 0
        self.busy = True
        if run.measuring:
            run.result.requests += 1
        self.t0 = time.perf_counter_ns()
        self.transport.write(run.reqs[i])

    def drop(self) -> None:
        """Abort the connection; what it had in flight is already counted."""
        self.dropped = True
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.buf:
            data = self.buf + data
            self.buf = b""
        try:
            if self.left == _HEAD:
                data = self._head(data)
                if data is None:
                    return
            left = self.left
            if left >= 0:
                if len(data) < left:
                    self.left = left - len(data)
                    return
                if len(data) > left:  # nothing may follow: one request in flight
                    raise ValueError("bytes after the response")
                self._done()
            elif left == _CHUNKED:
                self._chunked(data)
            # _TO_CLOSE: the body ends with the connection (connection_lost)
        except ValueError:
            self.run.error("parse")
            self.drop()

    def _head(self, data: bytes) -> bytes | None:
        """Parse a response head; returns the bytes after it, None while incomplete."""
        while True:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > _MAX_HEAD:
                    raise ValueError("response head too long")
                self.buf = data
                return None
            if data[:7] != b"HTTP/1." or data[12:13] not in (b" ", b"\r"):
                raise ValueError("not an HTTP/1.x status line")
            code = int(data[9:12])
            if 100 <= code < 200 and code != 101:  # interim (100 Continue): skip it
                data = data[end + 4:]
                continue
            break
        self.code = code
        head = data[:end].lower()
        i = head.find(b"\r\ncontent-length:")
        if head.find(b"\r\nconnection:") >= 0:
            self.close_after = b"\r\nconnection: close" in head
        elif data[5:8] == b"1.0":
            self.close_after = True
        if code == 204 or code == 304:
            self.left = 0
        elif i >= 0:
            j = head.find(b"\r", i + 17)
            self.left = int(head[i + 17:j] if j >= 0 else head[i + 17:])
            if self.left < 0:
                raise ValueError("negative Content-Length")
        elif b"chunked" in head and b"\r\ntransfer-encoding:" in head:
            self.left = _CHUNKED
        else:
            self.left = _TO_CLOSE
            self.close_after = True
        return data[end + 4:]

    def _chunked(self, data: bytes) -> None:
        """Consume whole chunks; keep an incomplete one in ``buf``."""
        pos = 0
        while True:
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(data[pos:eol].split(b";", 1)[0], 16)
            if size == 0:  # the last chunk, then trailers and an empty line
                if data[eol + 2:eol + 4] == b"\r\n":
                    end = eol + 4
                else:
                    end = data.find(b"\r\n\r\n", eol + 2)
                    if end < 0:
                        break
                    end += 4
                if end != len(data):
                    raise ValueError("bytes after the response")
                self._done()
                return
            if len(data) < eol + 2 + size + 2:
                break
            pos = eol + 2 + size + 2
        self.buf = data[pos:]

    def _done(self) -> None:
        """A whole response arrived: count it, then send the next request."""
        t = time.perf_counter_ns()
        run = self.run
        self.busy = False
        self.left = _HEAD
        if run.measuring:
            run.result.responses += 1
            status = run.status
            status[self.code] = status.get(self.code, 0) + 1
            run.record((t - self.t0) // 1000)
        if self.transport is None:
            return
        if self.close_after:  # the server will close: make a new connection instead
            self.dropped = True
            self.transport.close()
        elif run.running:
            self.send()

    def eof_received(self):
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc) -> None:
        self.transport = None
        run = self.run
        if self.busy and not self.dropped:
            if self.left == _TO_CLOSE and exc is None:
                self._done()
            else:
                run.error("reset" if exc is not None else "closed")
        self.busy = False
        if run.running:
            run.reconnect(self)


def _cpu_seconds(who: int) -> float:
    ru = resource.getrusage(who)
    return ru.ru_utime + ru.ru_stime


async def _drive(url: str, host: str, port: int, reqs: list[bytes], conns: int,
                 start_at: float, warmup: float, duration: float, timeout: float,
                 rusage_who: int) -> LoadResult:
    """Run ``conns`` connections from ``start_at`` (time.monotonic) for the warm-up and
    the window; the result of this process's share."""
    loop = asyncio.get_running_loop()
    result = LoadResult(url=url, concurrency=conns)
    run = _Run(host, port, reqs, timeout, result)
    run.loop = loop
    run.conns = [_Conn(run) for _ in range(conns)]

    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    run.running = True
    for conn in run.conns:
        loop.create_task(run.connect(conn))
    tick = min(0.1, timeout / 5)

    def sweep():
        if run.running:
            run.sweep()
            loop.call_later(tick, sweep)
    loop.call_later(tick, sweep)

    await asyncio.sleep(max(0.0, start_at + warmup - time.monotonic()))
    cpu0 = _cpu_seconds(rusage_who)
    result.started = time.monotonic()
    t0 = time.perf_counter()
    run.measuring = True
    result.requests = sum(c.busy for c in run.conns)
    await asyncio.sleep(max(0.0, start_at + warmup + duration - time.monotonic()))
    run.measuring = False
    run.running = False
    result.duration = time.perf_counter() - t0
    result.cpu_seconds = _cpu_seconds(rusage_who) - cpu0
    for conn in run.conns:
        if conn.transport is not None:
            conn.drop()
    await asyncio.sleep(0)  # let the transports close
    # the connect tasks still waiting end at their next check of run.running
    pending = [t for t in asyncio.all_tasks(loop) if t is not asyncio.current_task()]
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return result


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _run_here(args: dict, rusage_who: int) -> LoadResult:
    loop = _new_loop()
    try:
        return loop.run_until_complete(_drive(**args, rusage_who=rusage_who))
    finally:
        loop.close()


def _send_msg(fd: int, msg) -> None:
    """One pickled message, length first (see :func:`_recv_msg`)."""
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(struct.pack("<Q", len(data)) + data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _recv_msg(fd: int, deadline: float):
    """The next message on ``fd``; EOFError at its end, TimeoutError after ``deadline``.

    NOTE: framed, and moved with os.write / os.read on the pipes' descriptors: through
    the buffered pipe objects a result (~190 KB, mostly histogram) now and then arrived
    cut short ("pickle data was truncated", or EOF after 128 KiB).
    """
    def read(n: int) -> bytes:
        parts = []
        while n:
            if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise TimeoutError
            chunk = os.read(fd, min(n, 1 << 20))
            if not chunk:
                raise EOFError
            parts.append(chunk)
            n -= len(chunk)
        return b"".join(parts)

    (size,) = struct.unpack("<Q", read(8))
    return pickle.loads(read(size))


def _worker_main() -> None:
    """A generator process (``python -c``): its arguments come pickled on stdin; it says
    ready, waits for the start time, and sends its result back pickled on stdout."""
    inp, out = sys.stdin.fileno(), sys.stdout.fileno()
    sys.stdout = sys.stderr  # nothing else may write to the result channel
    args, cpus = _recv_msg(inp, time.monotonic() + 60)
    try:
        if cpus:
            os.sched_setaffinity(0, cpus)
        _send_msg(out, ("ready", None))
        start_at = _recv_msg(inp, time.monotonic() + 120)
        _send_msg(out, ("ok", _run_here(dict(args, start_at=start_at), resource.RUSAGE_SELF)))
    except BaseException:  # noqa: BLE001  (reported to the parent, which raises)
        _send_msg(out, ("error", traceback.format_exc()))


def generate_load(url: str, *, concurrency: int, duration: float, warmup: float = 0.0,
                  bodies: Sequence[bytes] = (), method: str | None = None,
                  content_type: str = "application/json", authorization: str | None = None,
                  headers: Mapping[str, str] | None = None, timeout: float = 10.0,
                  processes: int = 2, cpus: Sequence[int] | None = None) -> LoadResult:
    """Load ``url`` closed-loop with ``concurrency`` connections; see the module docstring.

    Args:
        url: ``http://host:port/path``.
        concurrency: connections, each with one request in flight.
        duration: seconds of the measured window.
        warmup: seconds of load before the window, not counted.
        bodies: request bodies, sent round-robin (see :func:`build_requests` for the
            method, content_type, authorization and headers arguments).
        timeout: seconds a request (and a connect) may take before it is an error.
        processes: generator processes (at most ``concurrency``); 1 runs in this
            thread, more split the connections over that many Python subprocesses.
            NOTE: 2 by default, even on one CPU: on a 2-vCPU VM, against a trivial
            uvicorn app (~20k req/s) at c=16, one process pinned to one CPU reached
            0.3-0.7x of ``wrk -t2`` while using a third of that CPU (it sleeps, and each
            wake-up of an idle vCPU is slow), two processes (like wrk's two threads)
            0.6-1.3x, mostly ~1x (a handful of noisy pairs each). Against a model server (~2k req/s, bench/loadgen.py) the two are
            within the machine's noise of each other.
        cpus: CPUs the generator runs on (sched_setaffinity), e.g. those the server
            does not use; None leaves placement to the kernel.

    Returns:
        The window's :class:`LoadResult`.

    Raises:
        InvalidInput: a bad URL, header or number.
        MlbuildError: a generator process failed.
        RuntimeError: called from a thread running an event loop (use a thread).
    """
    if concurrency < 1 or duration <= 0 or warmup < 0 or timeout <= 0 or processes < 1:
        raise InvalidInput("load generator: concurrency and processes must be >= 1, "
                           "duration and timeout > 0, warmup >= 0")
    host, port, reqs = build_requests(url, bodies, method=method, content_type=content_type,
                                      authorization=authorization, headers=headers)
    cpus = sorted(set(cpus)) if cpus else None
    if cpus and not hasattr(os, "sched_setaffinity"):
        raise InvalidInput("load generator: cpus needs sched_setaffinity (Linux)")
    processes = min(processes, concurrency)
    args = dict(url=url, host=host, port=port, reqs=reqs, warmup=warmup, duration=duration,
                timeout=timeout)
    if processes == 1:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("generate_load() blocks: call it from a thread without "
                               "a running event loop")
        saved = os.sched_getaffinity(0) if cpus else None
        try:
            if cpus:
                os.sched_setaffinity(0, cpus)  # this thread only (Linux)
            return _run_here(dict(args, conns=concurrency, start_at=time.monotonic()),
                             getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF))
        finally:
            if saved:
                os.sched_setaffinity(0, saved)
    return _run_processes(args, concurrency, processes, cpus)


def _run_processes(args: dict, concurrency: int, processes: int, cpus) -> LoadResult:
    """Split the connections over ``processes`` workers started together.

    NOTE: plain subprocesses rather than multiprocessing: its "spawn" re-imports the
    caller's ``__main__`` (a script without a ``__name__`` guard starts workers forever)
    and "fork" copies whatever threads the caller has running.
    """
    import mlbuild

    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(mlbuild.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (root, env.get("PYTHONPATH"))))
    cmd = [sys.executable, "-c",
           "from mlbuild.profile.loadgen import _worker_main; _worker_main()"]
    workers: list[subprocess.Popen] = []
    try:
        for i in range(processes):
            conns = concurrency // processes + (i < concurrency % processes)
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    env=env)
            workers.append(proc)
            _send_msg(proc.stdin.fileno(), (dict(args, conns=conns), cpus))
        for proc in workers:
            _expect(proc, "ready", 60)
        start_at = time.monotonic() + 0.05
        for proc in workers:
            _send_msg(proc.stdin.fileno(), start_at)
        wait = args["warmup"] + args["duration"] + args["timeout"] + 30
        result = None
        for proc in workers:
            part = _expect(proc, "ok", wait)
            if result is None:
                result = part
            else:
                result.merge(part)
        return result
    finally:
        for proc in workers:
            for stream in (proc.stdin, proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _expect(proc: subprocess.Popen, what: str, timeout: float):
    """The next message of a worker, which must be ``what``."""
    try:
        kind, value = _recv_msg(proc.stdout.fileno(), time.monotonic() + timeout)
    except TimeoutError:
        raise MlbuildError(f"load generator process {proc.pid} sent nothing in "
                           f"{timeout:.0f} s") from None
    except EOFError:
        raise MlbuildError(f"load generator process {proc.pid} died "
                           f"(exit code {proc.wait()})") from None
    if kind != what:
        raise MlbuildError(f"load generator process {proc.pid} failed:\n{value}")
    return value
