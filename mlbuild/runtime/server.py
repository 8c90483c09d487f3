"""Running the app under uvicorn: listeners, one process or a supervisor of workers, and
the replacement contract that mlbuild's ``process`` target relies on.

Listeners::

    main    host:port          everything: /score, health, /swagger.json, /metrics
    health  host:health_port   only GET /, /healthz/live, /healthz/ready (optional): a
                               stdlib HTTP server in a thread of the first process, up
                               before anything is loaded; ready = init() returned (every
                               worker's, with several); ``/healthz/ready?wait=S``
                               holds a 503 for up to S seconds (at most 30) and answers
                               200 as soon as ready: how a deploy waits for a release
                               with one request instead of a poll every few ms

Request heads, on both listeners: the request line and headers must arrive within
``header_timeout`` seconds (MLBUILD_HEADER_TIMEOUT, default 10; counted from the
connection's start or a request's first byte) and fit in ``max_header_bytes``
(MLBUILD_MAX_HEADER_BYTES, default 32 KiB): else 408, 414 (request line) or 431
(headers), then the connection closes; idle keep-alive connections close after
``keepalive_timeout`` seconds (MLBUILD_KEEPALIVE_TIMEOUT, default 5). A body on the main
port gets ``header_timeout`` more, then must keep arriving (408 when it does not). The
main port's protocol is headlimits.py's; the health listener reads through
:class:`_HeadReader`.

Start-up::

    default      bind+listen main (a busy port fails here, touching nothing), health
                 -> uvicorn -> load + init() in a thread, /score answers 503 meanwhile
    reuse-port   probe main, bind+listen health -> load + init() -> bind+listen main
                 with SO_REUSEPORT -> uvicorn

Replacement contract (``MLBUILD_REUSE_PORT=1`` or ``--reuse-port``; ``MLBUILD_READY_FILE=
PATH`` or ``--ready-file PATH``):

- The main socket gets SO_REUSEADDR and SO_REUSEPORT and is bound and listening only after
  init() returned, so a new release started beside a running one on the same port takes
  no connection before it can answer them. Before loading anything the port is probed: a
  port held by a listener that did not set SO_REUSEPORT (another program) is exit 1,
  "port in use", at once (and again if such a listener appears during init()).
- Once init() returned and the main socket listens, PATH is written atomically (a
  temporary file beside it, then ``os.replace``) with ``{"pid": <this process>, "port":
  <main port>, "health_port": <port or null>}``. With ``--workers N`` it is written by
  the supervising process once *all* N workers are ready (each listens only after its own
  init() in reuse-port mode), so the old release is stopped only when the new one has its
  full capacity. PATH is removed at exit if it still names this process.
- SIGTERM (or SIGINT): the listeners close, in-flight requests finish (up to
  ``graceful_timeout`` seconds, MLBUILD_GRACEFUL_TIMEOUT, default 30), exit 0. During
  init() in reuse-port mode nothing is in flight: exit 0 at once.
- A health port in reuse-port mode gets SO_REUSEPORT too, so old and new release can both
  hold it; during the overlap a probe reaches either one, and each answers for itself.

Without reuse-port nothing changes: bind first and fail fast on a busy port, 503 while
init() runs. Exit codes: 0 stopped, 1 a port cannot be listened on (or the metrics
folder cannot be made: metrics.py), 3 loading the script or its init() failed (2, bad
options, comes from ``__main__``).

Workers (``--workers N`` > 1): this process supervises N processes (multiprocessing
"spawn"), each loading the script and running init() itself. By default they share the
main socket bound here; in reuse-port mode each binds its own (SO_REUSEPORT) after its
init(). A worker that exits before it was ready stops everything (exit 3, or 1 for a
port); one that dies later is replaced. Workers leave when this process goes away.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import multiprocessing
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

import uvicorn

from mlbuild.runtime import metrics
from mlbuild.runtime import tracing
from mlbuild.runtime.app import (
    JSON,
    ScoringApp,
    _error,
    create_app,
    health_response,
    new_request_id,
)
from mlbuild.runtime.config import (
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_MAX_HEADER_BYTES,
    RuntimeConfig,
    ServerOptions,
)

log = logging.getLogger("azmlinfsrv")
access_log = logging.getLogger("azmlinfsrv.access")

EXIT_OK = 0
EXIT_PORT = 1
EXIT_INIT_FAILED = 3
BACKLOG = 2048
# GET /healthz/ready?wait=S on the health port (see _HealthHandler._wait_ready).
LONG_POLL_MAX = 30.0
WAIT_TICK = 0.01
LINGER = 2.0  # seconds a refused connection drains before it closes (as headlimits.py)


def _fast_options(options: ServerOptions) -> dict:
    """uvicorn's protocol, loop and request-head limits.

    httptools and uvloop when installed (requirements.txt has them); the pure-Python
    fallbacks still work, several times slower. With httptools the protocol is
    headlimits.py's (header deadline and size); h11 gets only the size limit (its own
    ``h11_max_incomplete_event_size``, answered 400): no header deadline without httptools.
    """
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    if importlib.util.find_spec("httptools"):
        from mlbuild.runtime.headlimits import protocol_class

        return {"http": protocol_class(options.header_timeout, options.max_header_bytes),
                "loop": loop}
    return {"http": "h11", "loop": loop,
            "h11_max_incomplete_event_size": options.max_header_bytes}


def _trust_proxy_headers() -> bool:
    """Whether X-Forwarded-For/-Proto set the client address and scheme of a request.

    NOTE: only when FORWARDED_ALLOW_IPS names the trusted proxies (uvicorn's variable;
    ``*`` trusts any). azmlinfsrv never honours these headers, and uvicorn's default --
    trust 127.0.0.1 -- costs ~1.5 us a request (a middleware layer and a header scan),
    ~1% of a small predict, for a feature only raw-mode scripts could notice.
    """
    return bool(os.environ.get("FORWARDED_ALLOW_IPS"))


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def listen_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A bound, listening TCP socket.

    SO_REUSEADDR always (restarts do not wait for TIME_WAIT, yet a port with a live
    listener still refuses the bind); SO_REUSEPORT with ``reuse_port``, so listeners of
    an old and a new release share the port.

    Raises:
        OSError: The address is in use or cannot be bound.
    """
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def probe_reuse_port(host: str, port: int) -> None:
    """Check that a SO_REUSEPORT listener could bind ``host:port`` (nothing stays bound).

    Raises:
        OSError: A listener without SO_REUSEPORT (another program) holds the port.
    """
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))


def _port_error(host: str, port: int, exc: OSError, reuse_port: bool) -> None:
    why = exc.strerror or str(exc)
    hint = (" (held by a program that did not set SO_REUSEPORT)" if reuse_port
            else " (another server listens there: stop it or choose another --port)")
    log.error("cannot listen on %s:%d: port in use? %s%s", host, port, why, hint)


# -- ready file --------------------------------------------------------------------------
def write_ready_file(path: str, port: int, health_port: int | None) -> None:
    """Write ``{"pid", "port", "health_port"}`` to ``path`` atomically."""
    data = json.dumps({"pid": os.getpid(), "port": port, "health_port": health_port})
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(data)
    os.replace(tmp, path)


def remove_ready_file(path: str) -> None:
    """Remove ``path`` if it names this process (a newer release may have rewritten it)."""
    try:
        with open(path, encoding="utf-8") as fh:
            ours = json.load(fh).get("pid") == os.getpid()
    except (OSError, ValueError, AttributeError):
        return
    if ours:
        try:
            os.unlink(path)
        except OSError:
            pass


class _ReadyGate:
    """Calls ``then(port)`` once, when init() returned and the main socket listens."""

    def __init__(self, then):
        self._then = then
        self._lock = threading.Lock()
        self._init = False
        self._port: int | None = None
        self._fired = False

    def init_done(self, _app=None) -> None:
        with self._lock:
            self._init = True
        self._maybe_fire()

    def listening(self, port: int) -> None:
        with self._lock:
            self._port = port
        self._maybe_fire()

    def _maybe_fire(self) -> None:
        with self._lock:
            if self._fired or not self._init or self._port is None:
                return
            self._fired = True
        self._then(self._port)


# -- health listener ---------------------------------------------------------------------
class _HeadTooLarge(Exception):
    pass


class _HeadReader(io.RawIOBase):
    """The health handler's socket reads, giving each request head the main port's limits
    (headlimits.py): ``timeout`` seconds in all and ``limit`` bytes.

    NOTE: a socket timeout alone bounds each read, not the head: a client sending a byte
    a second would hold its thread for ever. So every read waits only for what is left of
    the head's time, and reads no more than what is left of its bytes.
    """

    def __init__(self, sock: socket.socket, timeout: float, limit: int):
        self._sock = sock
        self._timeout = timeout
        self._limit = limit
        self.start()

    def start(self) -> None:
        """A new request head begins (idle keep-alive time counts against it)."""
        self._deadline = time.monotonic() + self._timeout
        self._left = self._limit

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request head not received in time")
        if self._left <= 0:
            raise _HeadTooLarge
        self._sock.settimeout(remaining)
        try:
            n = self._sock.recv_into(memoryview(buf)[:self._left])
        finally:
            self._sock.settimeout(self._timeout)  # the answer's writes
        self._left -= n
        return n


def _printable(text: str) -> str:
    """``text`` with control characters escaped, for a log line (as the main port's)."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


class _HealthHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # NOTE: http.server's default, "HTTP/0.9", is also what it answers a request line it
    # cannot read with: a bare HTML page without status line or headers. Answers always
    # carry a status line, as on the main port.
    default_request_version = "HTTP/1.1"

    def setup(self):
        super().setup()  # self.timeout is None: the reader sets the socket's timeouts
        self.rfile.close()  # the socket's own reader: ours replaces it
        self._reader = _HeadReader(self.connection, self.server.header_timeout,
                                   self.server.max_header_bytes)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self):
        """http.server's, with a deadline and a size limit on the request head; a head
        that takes too long just closes the connection (http.server's TimeoutError)."""
        self._reader.start()
        self.requestline = None
        try:
            super().handle_one_request()
        except _HeadTooLarge:
            self._refuse_too_large()

    def _refuse_too_large(self) -> None:
        limit = self.server.max_header_bytes
        status, what = ((414, "request line") if self.requestline is None
                        else (431, "request head (request line and headers)"))
        payload = _error(status, f"{what} larger than {limit} bytes")
        self.requestline = self.requestline or ""
        self.request_version, self.command = "HTTP/1.1", ""
        self.close_connection = True
        self.send_response(status)
        self.send_header("content-type", JSON.decode())
        self.send_header("content-length", str(len(payload)))
        self.send_header("connection", "close")
        self.end_headers()
        self.wfile.write(payload)
        self.wfile.flush()
        # Unread data would turn the close into a reset that the client may see instead
        # of the answer: drop what it still sends, for at most LINGER seconds.
        try:
            self.connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER
            while (left := deadline - time.monotonic()) > 0:
                self.connection.settimeout(left)
                if not self.connection.recv(65536):
                    break
        except OSError:  # TimeoutError too
            pass

    def version_string(self) -> str:
        return "mlbuild"

    def do_GET(self):  # http.server's naming
        self._answer(body=True)

    def do_HEAD(self):
        self._answer(body=False)

    def do_POST(self):
        self._answer(body=True, allowed=False)

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_POST

    def _answer(self, body: bool, allowed: bool = True) -> None:
        started = time.perf_counter()
        path, _, query = self.path.partition("?")
        rid = self.headers.get("x-request-id") or new_request_id().decode()
        ready = self.server.is_ready()
        if not ready and allowed and path == "/healthz/ready" and query:
            ready = self._wait_ready(query)
        answer = health_response(path, ready) if allowed else None
        if answer is not None:
            status, payload, ctype = answer
        elif not allowed:
            status, payload, ctype = 405, _error(405, f"{self.command} not allowed on the "
                                                 "health port"), JSON
        else:
            status, payload, ctype = 404, _error(404, f"no route {path} on the health port "
                                                 "(only /, /healthz/live, /healthz/ready)"), JSON
        self.send_response(status)
        self.send_header("content-type", ctype.decode())
        self.send_header("content-length", str(len(payload)))
        self.send_header("x-request-id", rid)
        self.send_header("x-ms-request-id", rid)
        if status == 405:
            self.send_header("allow", "GET, HEAD")
        self.end_headers()
        if body:
            self.wfile.write(payload)
        if access_log.isEnabledFor(logging.INFO):
            access_log.info("%s %s %d %.2fms rid=%s (health port)", self.command,
                            _printable(path), status, (time.perf_counter() - started) * 1000.0,
                            _printable(rid))

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a request line, version or method it cannot take,
        too many headers) in the runtime's JSON error form, not an HTML page."""
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = ""
        self.close_connection = True
        payload = _error(code, message or phrase)
        self.send_response(code, phrase)
        self.send_header("content-type", JSON.decode())
        self.send_header("content-length", str(len(payload)))
        self.send_header("connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _wait_ready(self, query: str) -> bool:
        """``?wait=SECONDS`` (at most LONG_POLL_MAX): hold the answer until ready or the
        time is up. One request instead of a poll every few ms: a deploy waiting for a
        new release no longer takes the GIL from its init() (a new thread, a parse and
        an access line per poll) and learns of readiness within WAIT_TICK."""
        try:
            wait = float(parse_qs(query).get("wait", ["0"])[0])
        except ValueError:
            return False
        deadline = time.monotonic() + min(max(wait, 0.0), LONG_POLL_MAX)
        while time.monotonic() < deadline:
            time.sleep(WAIT_TICK)
            if self.server.is_ready():
                return True
        return False

    def log_message(self, format, *args):  # the access line is written in _answer
        pass


class _HealthHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, reuse_port: bool, header_timeout: float,
                 max_header_bytes: int):
        self.address_family = _family(address[0])
        self._reuse_port = reuse_port
        self.header_timeout = header_timeout
        self.max_header_bytes = max_header_bytes
        self.is_ready = lambda: False
        super().__init__(address, _HealthHandler)

    def handle_error(self, request, client_address):
        # A client that went away (a probe that gave up, a reset) is not our error: no
        # traceback in the service's log for it.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)

    def server_bind(self):
        if self._reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        # NOTE: not HTTPServer.server_bind, whose getfqdn() may wait on DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class HealthListener:
    """GET /, /healthz/live and /healthz/ready on a port of their own, served by a daemon
    thread of this process; readiness comes from a callable set with :meth:`set_source`.
    """

    def __init__(self, host: str, port: int, reuse_port: bool = False,
                 header_timeout: float = DEFAULT_HEADER_TIMEOUT,
                 max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES):
        """Bind and listen (not yet serve).

        Args:
            header_timeout / max_header_bytes: Limits of a request head, as on the main
                port (see ServerOptions).

        Raises:
            OSError: The port cannot be bound.
        """
        self._server = _HealthHTTPServer((host, port), reuse_port, header_timeout,
                                         max_header_bytes)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def set_source(self, is_ready) -> None:
        self._server.is_ready = is_ready

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.2,),
                                        name="mlbuild-health", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
        self._server.server_close()


# -- signals -----------------------------------------------------------------------------
class _Stop:
    """SIGTERM/SIGINT seen by this process (uvicorn's own handling comes on top while it
    serves; it hands the signal back afterwards, which lands here)."""

    def __init__(self):
        self.event = threading.Event()

    def install(self) -> _Stop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.event.set()


class _Server(uvicorn.Server):
    """uvicorn's server, telling ``on_started`` once its sockets accept connections."""

    def __init__(self, config: uvicorn.Config, on_started):
        super().__init__(config)
        self._on_started = on_started

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._on_started(self)


def _watch_parent(server: uvicorn.Server) -> None:
    """Stop ``server`` gracefully when the process that started this one goes away."""
    parent = os.getppid()

    def watch():
        while not server.should_exit:
            time.sleep(1.0)
            if os.getppid() != parent:
                log.warning("supervising process [%d] is gone; stopping", parent)
                server.should_exit = True
                return

    threading.Thread(target=watch, name="mlbuild-parent-watch", daemon=True).start()


# -- one serving process -----------------------------------------------------------------
def _serve(config: RuntimeConfig, options: ServerOptions, sock: socket.socket | None, *,
           on_ready_port, stop: _Stop, health: HealthListener | None = None,
           watch_parent: bool = False) -> int:
    """Load, init() and serve in this process until stopped; returns the exit code.

    Args:
        sock: The listening main socket; None in reuse-port mode, where it is bound here
            once init() returned.
        on_ready_port: Called with the main port once init() returned and it listens.
        stop: Signals seen before uvicorn took over.
        health: The health listener to feed with this app's readiness.
        watch_parent: Stop when the parent process goes away (workers).
    """
    state: dict = {"code": EXIT_OK, "server": None}
    gate = _ReadyGate(on_ready_port)

    def on_fatal(app: ScoringApp) -> None:
        state["code"] = EXIT_INIT_FAILED
        server = state["server"]
        if server is not None:
            server.should_exit = True

    app = create_app(config, on_fatal=on_fatal, on_ready=gate.init_done)
    if health is not None:
        health.set_source(lambda: app.ready)
    if sock is None:  # reuse-port: nothing listens before init() returned
        app.start()
        while not app.wait_loaded(0.1):
            if stop.event.is_set():
                log.info("stopped while init() ran")
                return EXIT_OK
        if app.failure is not None:
            return EXIT_INIT_FAILED
        if stop.event.is_set():
            return EXIT_OK
        try:
            sock = listen_socket(options.host, options.port, reuse_port=True)
        except OSError as exc:
            _port_error(options.host, options.port, exc, reuse_port=True)
            return EXIT_PORT

    def on_started(server: uvicorn.Server) -> None:
        gate.listening(sock.getsockname()[1])
        if stop.event.is_set():  # a signal between our handler and uvicorn's
            server.should_exit = True

    # NOTE: log_config=None: uvicorn's lines go through the root logger (logformat.py),
    # in the runtime's format and on its stream.
    # NOTE: ws="none": there is no websocket route, and with a websocket library
    # installed uvicorn would hand an upgrade request to the app as a websocket scope,
    # which it cannot answer (uvicorn: a 500, uncounted). Upgrades are answered as plain
    # HTTP (headlimits.py), whatever is installed.
    uv_config = uvicorn.Config(app, **_fast_options(options), log_level=options.log_level,
                               ws="none", log_config=None, access_log=False,
                               server_header=False, lifespan="on",
                               proxy_headers=_trust_proxy_headers(),
                               timeout_keep_alive=options.keepalive_timeout,
                               timeout_graceful_shutdown=options.graceful_timeout)
    server = _Server(uv_config, on_started)
    state["server"] = server
    if watch_parent:
        _watch_parent(server)
    try:
        server.run(sockets=[sock])
    except SystemExit as exc:  # uvicorn's startup failures
        return int(exc.code or 0) if state["code"] == EXIT_OK else state["code"]
    finally:
        sock.close()
        if tracing.active is not None:  # the spans still queued, before the process ends
            tracing.shutdown()
    return state["code"]


def exit_fast(code: int) -> None:
    """End this process with ``code`` without tearing the interpreter down.

    The atexit handlers (the service's own too) run, the logs are flushed and so is
    every file still open (a scoring script's unflushed writes are not lost), but the
    modules are not freed one by one: for numpy/scipy/scikit-learn that took ~0.3 s of
    every stop (measured in a container: "Finished server process" to the container's
    exit), and a redeploy waits for the old release to stop; finding the open files
    takes ~0.08 s of it back. Non-daemon threads a service started are not waited for,
    as a SIGTERM'd process's would not be.
    """
    import atexit
    import gc
    import io

    try:
        atexit._run_exitfuncs()
        logging.shutdown()
        for obj in gc.get_objects():
            if isinstance(obj, io.IOBase):
                try:
                    if not obj.closed:
                        obj.flush()
                except Exception:  # noqa: BLE001 - a file that cannot flush is not ours to fix
                    pass
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


# -- several workers ---------------------------------------------------------------------
def _worker_main(config: RuntimeConfig, options: ServerOptions, sock: socket.socket | None,
                 ready, log_level: str) -> None:
    """Entry point of a worker process (spawned: nothing is inherited but the args)."""
    from mlbuild.runtime import logformat

    logformat.setup(log_level, config.app_root, config.entry_script)
    code = _serve(config, options, sock, on_ready_port=lambda _port: ready.set(),
                  stop=_Stop().install(), watch_parent=True)
    exit_fast(code)


class _Worker:
    def __init__(self, process, ready):
        self.process = process
        self.ready_event = ready
        self.ready = False

    def is_ready(self) -> bool:
        if not self.ready and self.ready_event.is_set():
            self.ready = True
        return self.ready


class Supervisor:
    """Runs ``options.workers`` worker processes until stopped (see the module docstring)."""

    def __init__(self, config: RuntimeConfig, options: ServerOptions,
                 sock: socket.socket | None, stop: _Stop, on_ready_port):
        self._config = config
        self._options = options
        self._sock = sock
        self._stop = stop
        self._on_ready_port = on_ready_port
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []

    def _spawn(self) -> _Worker:
        ready = self._ctx.Event()
        process = self._ctx.Process(
            target=_worker_main, name="mlbuild-worker", daemon=False,
            args=(self._config, self._options, self._sock, ready, self._options.log_level))
        process.start()
        log.info("started worker process [%d]", process.pid)
        return _Worker(process, ready)

    def all_ready(self) -> bool:
        workers = list(self._workers)
        return bool(workers) and all(w.is_ready() and w.process.is_alive() for w in workers)

    def _check(self) -> int | None:
        """Replace workers that died after they were ready; an exit code when one died
        before (nothing can be served then)."""
        for i, worker in enumerate(self._workers):
            if worker.process.is_alive():
                continue
            code = worker.process.exitcode
            if not worker.is_ready():
                log.error("worker process [%d] exited (code %s) before it was ready; "
                          "stopping", worker.process.pid, code)
                return EXIT_PORT if code == EXIT_PORT else EXIT_INIT_FAILED
            log.warning("worker process [%d] exited (code %s); starting another",
                        worker.process.pid, code)
            metrics.mark_process_dead(worker.process.pid)  # its counts stay counted
            self._workers[i] = self._spawn()
        return None

    def run(self) -> int:
        code = EXIT_OK
        announced = False
        self._workers = [self._spawn() for _ in range(self._options.workers)]
        try:
            while not self._stop.event.wait(0.1):
                failed = self._check()
                if failed is not None:
                    code = failed
                    break
                if not announced and self.all_ready():
                    announced = True
                    self._on_ready_port(self._sock.getsockname()[1] if self._sock
                                        else self._options.port)
        finally:
            self._shutdown()
        return code

    def _shutdown(self) -> None:
        if self._sock is not None:
            self._sock.close()  # this copy must not keep accepting into its backlog
        for worker in self._workers:
            if worker.process.is_alive():
                try:
                    os.kill(worker.process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + self._options.graceful_timeout + 5.0
        for worker in self._workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                log.error("worker process [%d] did not stop in time; killing it",
                          worker.process.pid)
                worker.process.kill()
                worker.process.join(5.0)


# -- entry point -------------------------------------------------------------------------
def run_server(config: RuntimeConfig, options: ServerOptions | None = None) -> int:
    """Serve ``config`` as ``options`` say until stopped; returns the process exit code.

    Returns:
        0 after SIGTERM/SIGINT, 1 when a port cannot be listened on, 3 when loading the
        entry script or its init() failed.
    """
    options = options or ServerOptions()
    host = options.host
    stop = _Stop().install()
    sock = None
    try:
        if options.reuse_port:
            probe_reuse_port(host, options.port)
        else:
            sock = listen_socket(host, options.port)
    except OSError as exc:
        _port_error(host, options.port, exc, options.reuse_port)
        return EXIT_PORT
    health = None
    if options.health_port is not None:
        try:
            health = HealthListener(host, options.health_port, reuse_port=options.reuse_port,
                                    header_timeout=options.header_timeout,
                                    max_header_bytes=options.max_header_bytes)
        except OSError as exc:
            if sock is not None:
                sock.close()
            _port_error(host, options.health_port, exc, options.reuse_port)
            return EXIT_PORT
        health.start()
    port = sock.getsockname()[1] if sock is not None else options.port
    health_port = health.port if health is not None else None
    log.info("serving %s on http://%s:%d%s (workers=%d, dispatch=%s, timeout=%s, auth=%s%s)",
             config.entry_script or config.no_code_model, host, port,
             f", health on port {health_port}" if health_port else "", options.workers,
             "thread" if config.request_timeout else config.dispatch,
             f"{config.request_timeout:g}s" if config.request_timeout else "none",
             "key" if config.auth_keys else "none",
             ", reuse-port: listening once init() returned" if options.reuse_port else "")

    def on_ready_port(actual_port: int) -> None:
        if options.ready_file:
            try:
                write_ready_file(options.ready_file, actual_port, health_port)
            except OSError as exc:
                log.error("cannot write the ready file %s: %s", options.ready_file, exc)
                return
            log.info("ready: wrote %s", options.ready_file)

    metrics_dir = None
    try:
        # NOTE: before any worker starts: each writes its own files there (metrics.py).
        try:
            metrics_dir, made = metrics.prepare_dir()
        except OSError as exc:
            log.error("cannot prepare the metrics folder (%s): %s", metrics.DIR_VAR, exc)
            return EXIT_PORT
        if not made:
            metrics_dir = None  # the user's folder: emptied at start, not removed
        if options.workers > 1:
            supervisor = Supervisor(config, options, sock, stop, on_ready_port)
            if health is not None:
                health.set_source(supervisor.all_ready)
            return supervisor.run()
        return _serve(config, options, sock, on_ready_port=on_ready_port, stop=stop,
                      health=health)
    finally:
        if health is not None:
            health.close()
        if options.ready_file:
            remove_ready_file(options.ready_file)
        if metrics_dir is not None:
            metrics.remove_dir(metrics_dir)
