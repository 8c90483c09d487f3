"""The scoring server as a raw ASGI application (no framework).

Routes::

    GET  /                 200 "Healthy" (as the Azure ML server answers)
    GET  /healthz/live     200 always, at once (also while init() runs)
    GET  /healthz/ready    200 once init() returned, 503 before, at once
    POST /score            run(); errors as {"status_code": N, "message": "..."}
    GET  /score            run() with the query's arguments (as azmlinfsrv)
    GET  /swagger.json     Swagger 2.0; ?version=3 (or 3.0) OpenAPI 3.0, ?version=3.1 3.1
    GET  /metrics          Prometheus text, at once
    OPTIONS *              CORS preflight

Any other path is a 404 whatever the method (OPTIONS, a CORS preflight, is answered
anywhere); a 405 only on these routes, as azmlinfsrv's Flask answers.

Every route but the three "at once" is held until init() returned (ScoringApp.
_until_ready), as azmlinfsrv answers nothing before its worker loaded the script.

Order of checks on /score: held until ready (503 past MLBUILD_START_HOLD) -> method
(405) -> key (401) -> size (413) -> media type (415) -> JSON (400) -> run() (500 when it
raises or times out).

Headers, as azmlinfsrv sets them: every response carries ``x-request-id`` (the client's,
else a new uuid4; longer than 100 characters is a 431) and ``x-ms-request-id`` (the
client's ``x-ms-request-id``, else its ``x-ms-client-request-id``, else the request id);
``x-ms-client-request-id`` is echoed when sent. ``x-ms-run-function-failed: True`` marks
a /score answer whose run() raised or timed out, or returned a 5xx AMLResponse. (NOTE:
azmlinfsrv also sends ``x-ms-run-function-failed: False`` and ``x-ms-run-fn-exec-ms`` on
every /score answer; each response header costs uvicorn ~1 us, so they are left out.)

NOTE on dispatching a sync run() -- "inline" (the default) calls it in the event-loop
thread; "thread" hands it to the run thread (one thread, so that scripts written for the
Azure server's single sync worker never see two concurrent calls). Measured with
`wrk -t2 -c16 -d6s --latency` on 127.0.0.1, a Ridge on sklearn's diabetes data, 2 rows
per request, one worker, 2 cores, access log on, three interleaved rounds (median req/s):
bare ASGI app on uvicorn 4831, inline 4788 (0.99x), thread pool 4035 (0.84x) -- the pool
costs two thread hand-offs and GIL ping-pong per request. Inline blocks other requests
(health checks too) while run() works, exactly like the Azure sync worker; services with
long runs set MLBUILD_RUN_DISPATCH=thread (or write `async def run`).

NOTE on adaptive batching (batching.py): with MLBUILD_BATCH_MAX_SIZE set, a no-code
model's requests, and always a ``@batched`` run()'s, go to the :class:`~mlbuild.runtime.
batching.Batcher` instead, which scores them in batches in the run thread; a request's
answer is made from its own result exactly as below (its own 400 or 500; 500 with the
batcher's message when its batch failed as a whole; 503 when the server stopped first).
Without it nothing changes: one ``is None`` test a request.

NOTE on the request timeout (MLBUILD_REQUEST_TIMEOUT seconds, else azmlinfsrv's
SCORING_TIMEOUT_MS; none by default, as the hot path stays inline then). An inline run()
holds the event loop, so nothing could answer at the deadline: with a timeout set, a sync
run() always goes to the run thread. At the deadline the request is answered like
azmlinfsrv does -- 500, ``{"status_code": 500, "message": "Scoring timeout after N
ms"}``, ``x-ms-run-function-failed: True`` -- and the run thread is asked to abandon the
call: a ``TimeoutError`` is raised inside run() at its next Python bytecode (what
azmlinfsrv's SIGALRM does; code inside one long C call, a numpy op or ``time.sleep``,
finishes that call first). A call still queued behind a busy run thread is dropped, never
started: the deadline counts from arrival, queueing included. An ``async def run`` is
cancelled at the deadline. A generator's items are not bounded, only producing the
generator is.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import inspect
import json
import logging
import os
import queue
import random
import sys
import threading
import time
import traceback
from time import perf_counter
from urllib.parse import parse_qs

from mlbuild.runtime import batching, compat, jsonenc, nocode, openapi, scoring, tracing
from mlbuild.runtime.compat import AMLRequest
from mlbuild.runtime.config import RuntimeConfig
from mlbuild.runtime.metrics import CONTENT_TYPE as METRICS_TYPE
from mlbuild.runtime.metrics import Metrics

log = logging.getLogger("azmlinfsrv")
script_log = logging.getLogger("azmlinfsrv.user_script")
access_log = logging.getLogger("azmlinfsrv.access")

JSON = b"application/json"
TEXT = b"text/plain; charset=utf-8"
# Media types that are certainly not JSON: a JSON-expecting script answers 415 to them.
# Anything else (curl's default form type, text/plain, none) is tried as JSON.
NOT_JSON_PREFIXES = (b"multipart/", b"image/", b"audio/", b"video/",
                     b"application/octet-stream")
CORS_METHODS = b"GET, POST, OPTIONS"
CORS_DEFAULT_HEADERS = b"Authorization, Content-Type, X-Request-Id"
REQUEST_ID_LIMIT = 100  # characters, as azmlinfsrv: longer request ids get 431
RUN_FAILED = (b"x-ms-run-function-failed", b"True")
# run() results answered as JSON without looking further (see _send_result for the rest).
PLAIN_JSON = frozenset({list, dict, str, int, float, bool, type(None)})
SWAGGER_VERSIONS = {"2": "2", "2.0": "2", "3": "3", "3.0": "3", "3.1": "3.1"}


class AccessLog:
    """One line per request, buffered and written at most every ``interval`` seconds::

        2026-01-31 12:00:00,123 I [4242] azmlinfsrv.access - POST /score 200 0.420ms 17 rid=ID

    (azmlinfsrv's access line -- method, path with its query, status, milliseconds with
    three decimals, response bytes or ``N/A`` for a streamed answer -- in its log format,
    UTC, on stdout; then the request id.)

    NOTE: through ``logging`` the line costs ~35% of the req/s of a 2-row predict
    (measured, wrk c=16); a preformatted line appended to a list costs ~1%: ~10.6k of
    the ~950k instructions of such a request with format specs (``:03d``, ``:.2f``),
    7.8k with the tables of digits below (valgrind). A request's values are kept as a
    tuple and the lines formatted together at flush, where this code stays in the
    CPU's caches. Lines reach the stream within ``interval`` seconds, and at shutdown.
    """

    _MS = tuple(f"{i:03d}" for i in range(1000))

    def __init__(self, stream=None, interval: float = 0.2, max_lines: int = 256):
        self._stream = stream
        self._interval = interval
        self._max = max_lines
        self._lines: list[tuple] = []  # the requests to write, as line() got them
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._stamp = ""
        self._pid = -1
        self._who = ""

    def line(self, method: str, path: str, status: int, seconds: float, rid: bytes,
             length: bytes | None = None, now: float | None = None) -> None:
        """Record one request: ``seconds`` it took, ``rid`` its request id, ``length``
        the response's content-length (None: streamed), ``now`` when it ended (default:
        now). Kept as it is; written as a line at :meth:`flush`."""
        self._lines.append((method, path, status, seconds, rid, length,
                            time.time() if now is None else now))
        if len(self._lines) >= self._max:
            self.flush()
        elif self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(self._interval,
                                                                    self._on_timer)
            except RuntimeError:  # no loop: write now
                self.flush()

    def _text(self, records: list[tuple]) -> str:
        """The lines of ``records``. A path or request id with control characters
        (``%0a`` is decoded before we see the path; a header value may hold a tab and
        bytes 0x80-0x9f, C1 controls such as CSI once read as latin-1) is written
        escaped: a client cannot forge a log line or send escape sequences to a terminal
        that shows the log."""
        ms = self._MS
        out = []
        for method, path, status, seconds, rid, length, now in records:
            if not path.isprintable():
                path = path.encode("unicode_escape").decode("ascii")
            rid_text = rid.decode("latin-1")
            if not rid_text.isprintable():
                rid_text = rid_text.encode("unicode_escape").decode("ascii")
            second = int(now)
            if second != self._second:
                self._second = second
                self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(second))
                pid = os.getpid()
                if pid != self._pid:
                    self._pid = pid
                    self._who = f" I [{pid}] azmlinfsrv.access - "
            micros = int(seconds * 1000000.0 + 0.5)
            out.append(f"{self._stamp},{ms[int(now * 1000.0) % 1000]}{self._who}"
                       f"{method} {path} {status} {micros // 1000}.{ms[micros % 1000]}ms "
                       f"{'N/A' if length is None else length.decode('latin-1')} "
                       f"rid={rid_text}\n")
        return "".join(out)

    def _on_timer(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        """Write the waiting lines."""
        if self._lines:
            stream = self._stream or sys.stdout
            records, self._lines = self._lines, []
            text = self._text(records)
            try:
                stream.write(text)
                stream.flush()
            except (OSError, ValueError):
                pass


# NOTE: uuid.uuid4() costs ~4 us, a tenth of what a small request costs in Python. The
# same text from a private PRNG, put together by bytes.hex() with a separator, costs
# ~0.6 us (os.urandom: ~1 us, a system call each). Request ids need uniqueness, not
# secrecy; the generator is private so that a script's random.seed() cannot make ids
# repeat, and reseeded in forked children.
_rng = random.Random()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_rng.seed)
_randbits = _rng.getrandbits
_UUID4_CLEAR = ~(0xF000 << 64 | 0xC000 << 48) & ((1 << 128) - 1)
_UUID4_SET = 0x4000 << 64 | 0x8000 << 48  # version 4, RFC 4122 variant


def new_request_id() -> bytes:
    """A random (version 4) UUID in its canonical text form."""
    b = (_randbits(128) & _UUID4_CLEAR | _UUID4_SET).to_bytes(16, "big")
    h = b[:10].hex("-", 2)  # "xxxx-xxxx-xxxx-xxxx-xxxx": the first two groups are one
    return f"{h[:4]}{h[5:]}-{b[10:].hex()}".encode()


def _error(status: int, message: str) -> bytes:
    return json.dumps({"status_code": status, "message": message}).encode()


MESSAGE_LIMIT = 2000  # characters of a 400's message: enough to say what is wrong


def _clip(message: str) -> str:
    """``message`` cut to MESSAGE_LIMIT characters. A message about the input may quote
    it (numpy's repr of a 5 MB string is the string): the answer says what is wrong, it
    does not send the body back."""
    if len(message) <= MESSAGE_LIMIT:
        return message
    return f"{message[:MESSAGE_LIMIT]}... ({len(message) - MESSAGE_LIMIT} more characters)"


NOT_READY = _error(503, "the service is starting: init() has not returned yet")
RUN_FAILED_MESSAGE = ("An unexpected error occurred in scoring script. Check the logs for "
                      "more info.")  # azmlinfsrv's words: a 500 never carries the script's
RUN_FAILED_BODY = _error(500, RUN_FAILED_MESSAGE)
# Answered while init() runs; every other path waits for it (ScoringApp._until_ready).
UNHELD_PATHS = frozenset({"/healthz/live", "/healthz/ready", "/metrics"})
# Health probes: a 200 of theirs is not written to the access log (as azmlinfsrv's
# RootAccessFilter drops "GET /"), every other answer is.
PROBE_PATHS = frozenset({"/", "/healthz/live", "/healthz/ready"})
MAX_HELD = 1000  # requests held at once during init(); more get 503 at once
# The routes: a method one does not take is a 405 there, a 404 anywhere else.
ROUTES = frozenset({"/", "/healthz/live", "/healthz/ready", "/score", "/swagger.json",
                    "/metrics"})
# Scope key set by the protocol (headlimits.py) when it answered a request in the app's
# place -- its body was late or broken: the status the client got, for the metrics and
# the access log, where the app sees only the client leave.
REFUSED_KEY = "mlbuild.refused"
# Scope key: the size of a body that came without Content-Length (chunked), for the metrics.
BODY_SIZE_KEY = "mlbuild.body_size"


def health_response(path: str, ready: bool):
    """``(status, body, content type)`` of a health route, or None for another path.

    Shared by the main app and the separate health listener (server.py).
    """
    if path == "/":
        return 200, b"Healthy", TEXT
    if path == "/healthz/live":
        return 200, b"Live", TEXT
    if path == "/healthz/ready":
        return (200, b"Ready", TEXT) if ready else (503, NOT_READY, JSON)
    return None


def _default_on_fatal(app: ScoringApp) -> None:
    # NOTE: init() failed in the loader thread; there is nothing to serve. Exit the whole
    # process now (uvicorn would otherwise keep answering 503 forever).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(3)


# -- the run thread ----------------------------------------------------------------------
class RunTimedOut(Exception):
    """A request's run() did not finish within the request timeout."""

    def __init__(self, seconds: float):
        super().__init__(f"Scoring timeout after {round(seconds * 1000)} ms")


class ScoringTimeout(TimeoutError):
    """Raised inside a sync run() that passed its deadline (it sees a ``TimeoutError``)."""


_QUEUED, _RUNNING, _ABANDONED, _DONE = range(4)


class _Job:
    __slots__ = ("fn", "future", "loop", "state")

    def __init__(self, fn, loop, future):
        self.fn = fn
        self.loop = loop
        self.future = future
        self.state = _QUEUED


def _deliver(future, ok: bool, value) -> None:
    if not future.done():  # a timed-out request has its answer already
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


def _set_async_exc(ident: int, exc) -> bool:
    """Raise ``exc`` (None: clear a pending one) in thread ``ident`` at its next bytecode."""
    try:
        import ctypes
    except ImportError:  # pragma: no cover - CPython builds have ctypes
        return False
    done = ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(ident), ctypes.py_object(exc) if exc is not None else None)
    return done == 1


class RunThread:
    """One thread that runs sync calls one at a time, in arrival order.

    ``await call(fn, timeout)`` returns ``fn()``'s value or raises its exception; past
    ``timeout`` seconds it raises :class:`RunTimedOut` and abandons the call (dropped when
    still queued, interrupted with :class:`ScoringTimeout` when running: see the module
    docstring).
    """

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ident = 0

    def _ensure_started(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    thread = threading.Thread(target=self._work, name="mlbuild-run",
                                              daemon=True)
                    thread.start()
                    self._thread = thread

    async def call(self, fn, timeout: float | None = None):
        if self._thread is None:
            self._ensure_started()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        job = _Job(fn, loop, future)
        self._queue.put(job)
        if timeout is None:
            return await future
        handle = loop.call_later(timeout, self._expire, job, timeout)
        try:
            return await future
        finally:
            handle.cancel()

    def _expire(self, job: _Job, timeout: float) -> None:
        if job.future.done():
            return
        job.future.set_exception(RunTimedOut(timeout))
        with self._lock:
            state = job.state
            job.state = _ABANDONED
            if state == _RUNNING:
                _set_async_exc(self._ident, ScoringTimeout)

    def stop(self) -> None:
        """Let the thread end after the calls already queued (it is a daemon anyway)."""
        if self._thread is not None:
            self._queue.put(None)

    def _work(self) -> None:
        self._ident = threading.get_ident()
        while True:
            try:
                if self._run_one():
                    return
            except ScoringTimeout:
                pass  # arrived just after the abandoned call returned; nothing to undo

    def _run_one(self) -> bool:
        job = self._queue.get()
        if job is None:
            return True
        with self._lock:
            if job.state == _ABANDONED:
                return False
            job.state = _RUNNING
        try:
            value, ok = job.fn(), True
        except Exception as exc:  # noqa: BLE001 - handed to the request
            value, ok = exc, False
        except BaseException as exc:  # noqa: BLE001 - SystemExit in run() is a 500 too
            value, ok = RuntimeError(f"run() raised {type(exc).__name__}: {exc}"), False
        with self._lock:
            abandoned = job.state == _ABANDONED
            job.state = _DONE
            if abandoned:
                _set_async_exc(self._ident, None)  # an exception not yet raised: drop it
        if not abandoned:
            try:
                job.loop.call_soon_threadsafe(_deliver, job.future, ok, value)
            except RuntimeError:  # the loop is closed: the server stopped
                pass
        return False


async def _with_deadline(coro, timeout: float):
    """Await ``coro``; past ``timeout`` seconds cancel it and raise :class:`RunTimedOut`."""
    task = asyncio.ensure_future(coro)
    expired = []

    def expire():
        expired.append(True)
        task.cancel()

    handle = asyncio.get_running_loop().call_later(timeout, expire)
    try:
        return await task
    except asyncio.CancelledError:
        if expired:
            raise RunTimedOut(timeout) from None
        raise
    finally:
        handle.cancel()


_END = object()


class ScoringApp:
    """ASGI callable serving one scorer. Loading and ``init()`` run in a background thread
    started at lifespan startup (or at the first request when embedded without lifespan),
    so the port answers -- 503 on /score -- while a slow init() works.
    """

    def __init__(self, config: RuntimeConfig, loader=None, on_fatal=None, on_ready=None):
        self.config = config
        self.scorer: scoring.Scorer | None = None
        self.ready = False
        self.failure: str | None = None
        self.metrics = Metrics(service=config.service_name, model_dir=config.model_dir
                               or config.no_code_model)
        self._loader = loader or functools.partial(scoring.load, config)
        self._on_fatal = on_fatal or _default_on_fatal
        self._on_ready = on_ready
        # None unless OTEL_EXPORTER_OTLP_ENDPOINT is set: then nothing else is paid.
        self._tracing = tracing.setup(config, ROUTES)
        self._keys = tuple(k.encode() for k in config.auth_keys)
        self._cors = frozenset(o.encode() for o in config.cors_origins)
        self._cors_any = b"*" in self._cors
        self._max_body = config.max_body_bytes
        self._timeout = config.request_timeout
        self._runner = (RunThread() if config.dispatch == "thread" or self._timeout
                        or config.max_concurrent_requests else None)
        self._batcher: batching.Batcher | None = None  # set once loaded, if batching
        # max_concurrent_requests: admission to /score (see _score_limited).
        self._slots = (asyncio.Semaphore(config.max_concurrent_requests)
                       if config.max_concurrent_requests else None)
        self._slot_wait = config.max_request_wait_ms / 1000.0
        self._prefix = config.path_prefix
        self._start_lock = threading.Lock()
        self._loader_thread: threading.Thread | None = None
        self._docs: dict[str, bytes] = {}
        self._access = (AccessLog() if config.access_log
                        and access_log.isEnabledFor(logging.INFO) else None)
        self._version = ((b"x-ms-server-version", config.server_version.encode("latin-1"))
                         if config.server_version else None)
        # Requests held until init() returned (see _until_ready).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready_event: asyncio.Event | None = None
        self._held = 0
        # Requests answered, and run() times, not yet in the metrics and access log: they
        # go in once per turn of the event loop (_record).
        self._answered: list[tuple] = []
        self._run_times: list[float] = []
        self._record_due = False

    # -- loading ---------------------------------------------------------------------
    def start(self) -> None:
        """Start loading the script and running init() (once, in a daemon thread)."""
        with self._start_lock:
            if self._loader_thread is None:
                self._loader_thread = threading.Thread(target=self._load_and_init,
                                                       name="mlbuild-init", daemon=True)
                self._loader_thread.start()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Wait for :meth:`start`'s loading and init(); True once it ended (either way)."""
        self.start()
        self._loader_thread.join(timeout)
        return not self._loader_thread.is_alive()

    def _load_and_init(self) -> None:
        started = time.perf_counter()
        stage = "load"
        try:
            scorer = self._loader()
            log.info("loaded %s (%s mode); running init()", scorer.name, scorer.mode)
            stage = "init"
            script_log.info("Invoking user's init function")
            scorer.init()
        except BaseException as exc:  # noqa: BLE001 - SystemExit from init() is fatal too
            self.failure = f"{type(exc).__name__}: {exc}"
            if stage == "init":
                script_log.error("User's init function failed")
            if isinstance(exc, scoring.LoadError):  # ours: the message says it all
                log.error("the service cannot start: %s", exc)
            else:
                log.error("the service cannot start: %s failed:\n%s",
                          "loading the entry script" if stage == "load" else "init()",
                          traceback.format_exc())
            self._wake_held_from_thread()  # they get 503 now, and the server can stop
            self._on_fatal(self)
            return
        script_log.info("Users's init has completed successfully")  # azmlinfsrv's words
        self.metrics.init_done(time.perf_counter() - started)
        self._batcher = self._make_batcher(scorer)
        if self._tracing is not None:  # once: run() and batches get their spans
            self._tracing.instrument(scorer, self._batcher, self._runner)
        self.scorer = scorer
        self.ready = True
        self._wake_held_from_thread()
        log.info("ready: init() took %.2f s; scoring timeout %s; worker with pid %d ready "
                 "for serving traffic", time.perf_counter() - started,
                 f"{self._timeout * 1000:g} ms" if self._timeout else "none", os.getpid())
        if self._on_ready is not None:
            self._on_ready(self)

    def _make_batcher(self, scorer: scoring.Scorer) -> batching.Batcher | None:
        """The batcher for ``scorer``, or None when its requests are scored one by one."""
        cfg = self.config
        spec = scorer.batch
        size = cfg.batch_max_size
        if spec is None:
            if size:
                log.warning("batching is set (MLBUILD_BATCH_MAX_SIZE=%d) but run() is not "
                            "@batched: each request is scored alone (mark run() with "
                            "@batched, from mlbuild.runtime, to batch it)", size)
            return None
        if size:
            latency = cfg.batch_max_latency_ms / 1000.0
            log.info("adaptive batching: up to %d requests a call, the first waiting at most "
                     "%g ms for others", size, cfg.batch_max_latency_ms)
        elif spec.from_script:
            size, latency = 1, 0.0
            log.warning("run() is @batched but batching is not set (services.NAME.batching, "
                        "MLBUILD_BATCH_MAX_SIZE): each call gets a list of one input")
        else:
            return None  # a no-code model, not asked to batch
        if self._runner is None and not spec.is_async:
            self._runner = RunThread()
        self.metrics.enable_batching()
        return batching.Batcher(spec, size, latency, runner=self._runner, timeout=self._timeout,
                                metrics=self.metrics, timeout_error=RunTimedOut)

    def _wake_held(self) -> None:
        if self._ready_event is not None:
            self._ready_event.set()

    def _wake_held_from_thread(self) -> None:
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._wake_held)
            except RuntimeError:  # the loop is closed: the server stopped
                pass

    async def _until_ready(self) -> bool:
        """Hold a request until init() returned: True then; False after
        ``config.start_hold`` seconds, or at once when MAX_HELD requests wait already.

        NOTE: azmlinfsrv (gunicorn) accepts nothing until its worker loaded the script:
        a client that polls ``GET /`` and then posts gets its answer. Holding here keeps
        that promise while the explicit probes (/healthz/*) answer at once. Costs nothing
        once ready: the caller checks ``self.ready`` first.
        """
        if self._held >= MAX_HELD:
            return False
        if self._ready_event is None:
            self._loop = asyncio.get_running_loop()
            self._ready_event = asyncio.Event()
        if self.ready or self.failure is not None:  # between the caller's check and now
            return self.ready
        self._held += 1
        try:
            await asyncio.wait_for(self._ready_event.wait(), self.config.start_hold)
        except asyncio.TimeoutError:
            pass
        finally:
            self._held -= 1
        return self.ready

    # -- ASGI ------------------------------------------------------------------------
    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind == "http":
            if self._tracing is None:
                await self._http(scope, receive, send)
            else:  # OTEL_EXPORTER_OTLP_ENDPOINT: a span around it (tracing.py)
                await self._tracing.serve(scope, receive, send, self._http)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive, send):
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._batcher is not None:  # what is still queued gets 503
                    self._batcher.close()
                if self._runner is not None:
                    self._runner.stop()
                self._record()
                if self._access is not None:
                    self._access.flush()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope, receive, send):
        started = scope["mlbuild.started"] = perf_counter()
        if self._loader_thread is None:
            self.start()
        method = scope["method"]
        path = scope["path"]
        if self._prefix is not None and path.startswith(self._prefix):
            path = path[len(self._prefix):] or "/"
        rid = auth = origin = ctype = clen = req_headers = ms_rid = client_rid = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                ctype = value
            elif name == b"content-length":
                clen = value
            elif name == b"authorization":
                auth = value
            elif name == b"x-request-id":
                rid = value
            elif name == b"origin":
                origin = value
            elif name == b"x-ms-request-id":
                ms_rid = value
            elif name == b"x-ms-client-request-id":
                client_rid = value
            elif name == b"access-control-request-headers":
                req_headers = value
        too_long = None
        if rid is None:
            rid = new_request_id()
        elif len(rid) > REQUEST_ID_LIMIT:
            too_long, rid = "x-request-id", new_request_id()
        if ms_rid is None and client_rid is None:
            headers = [(b"x-request-id", rid), (b"x-ms-request-id", rid)]
        else:  # azmlinfsrv's rules for the legacy and the client request id
            headers = [(b"x-request-id", rid)]
            if ms_rid is None:
                ms_rid = client_rid
            elif client_rid is None:
                client_rid = ms_rid
            if len(ms_rid) > REQUEST_ID_LIMIT or len(client_rid) > REQUEST_ID_LIMIT:
                too_long = too_long or "x-ms-request-id and x-ms-client-request-id"
            else:
                headers.append((b"x-ms-request-id", ms_rid))
                headers.append((b"x-ms-client-request-id", client_rid))
        cors_ok = False
        if origin is not None and self._cors:
            cors_ok = self._cors_any or origin in self._cors
            if cors_ok:
                headers.append((b"access-control-allow-origin", origin))
                headers.append((b"vary", b"Origin"))
                headers.append((b"access-control-expose-headers", b"x-request-id"))

        if self._version is not None:
            headers.append(self._version)
        status = 200
        self.metrics.begin(method)
        try:
            if not self.ready and path not in UNHELD_PATHS and not await self._until_ready():
                status = 503
                headers.append((b"retry-after", b"5"))
                await _respond(send, 503, NOT_READY, JSON, headers)
                return
            if too_long is not None:
                status = 431
                await _respond(send, 431, _error(431, f"{too_long} must not exceed "
                                                 f"{REQUEST_ID_LIMIT} characters"), JSON, headers)
                return
            if path == "/score":
                if method == "POST" or method == "GET":
                    score = self._score if self._slots is None else self._score_limited
                    status = await score(scope, receive, send, headers, auth, ctype, clen)
                    return
                if method == "OPTIONS":
                    status = await self._options(send, headers, origin, cors_ok, req_headers)
                    return
                status = 405
                headers.append((b"allow", b"GET, POST, OPTIONS"))
                await _respond(send, 405, _error(405, f"{method} not allowed on /score"),
                               JSON, headers)
                return
            if method == "OPTIONS":
                status = await self._options(send, headers, origin, cors_ok, req_headers)
                return
            if method not in ("GET", "HEAD") and path in ROUTES:
                status = 405
                headers.append((b"allow", b"GET, HEAD, OPTIONS"))
                await _respond(send, 405, _error(405, f"{method} not allowed on {path}"),
                               JSON, headers)
                return
            status, body, ctype_out = self._get(path, scope.get("query_string", b""))
            await _respond(send, status, b"" if method == "HEAD" else body, ctype_out, headers)
        finally:
            elapsed = perf_counter() - started
            last = headers[-1]
            if last[0] == b"content-length":
                length = last[1]
            else:  # streamed (none), or a header after it
                length = next((v for k, v in headers if k == b"content-length"), None)
            if self._access is not None and (status != 200 or path not in PROBE_PATHS) \
                    and "mlbuild.logged" not in scope:
                query = scope.get("query_string")
                logged = f"{path}?{query.decode('latin-1')}" if query else path
            else:
                logged = None
            self._answered.append((method, path, status, elapsed,
                                   clen if clen is not None else scope.get(BODY_SIZE_KEY),
                                   length, rid, logged))
            if not self._record_due:
                self._record_due = True
                asyncio.get_running_loop().call_soon(self._record)

    def _record(self) -> None:
        """Put the requests answered since the last call into the metrics and the access
        log: called once per turn of the event loop that answered some (and before
        /metrics renders, and at shutdown).

        NOTE: the same work done as each request ends cost ~3x as much CPU (~10 us of a
        ~200 us predict, measured in place with the app alone; ~3 us in a loop of its
        own): a request's path evicts this code and its data from the CPU's caches.
        Done together for the requests of one turn, they stay warm. A scrape by another
        worker may miss the requests of the turn in progress: microseconds.
        """
        self._record_due = False
        answered, self._answered = self._answered, []
        run_times, self._run_times = self._run_times, []
        metrics = self.metrics
        for seconds in run_times:
            metrics.observe_inference(seconds)
        observe = metrics.observe
        access = self._access
        now = time.time()
        for method, path, status, elapsed, size, length, rid, logged in answered:
            if size.__class__ is bytes:  # Content-Length as sent
                size = int(size) if size.isdigit() else None
            observe(method, path, status, elapsed, size, None if length is None else int(length))
            if logged is not None and access is not None:
                access.line(method, logged, status, elapsed, rid, length, now)

    def _get(self, path: str, query: bytes):
        health = health_response(path, self.ready)
        if health is not None:
            return health
        if path == "/swagger.json":
            asked = parse_qs(query.decode("latin-1")).get("version", ["2"])[0]
            version = SWAGGER_VERSIONS.get(asked)
            if version is None:
                return 404, _error(404, f"Swagger version [{asked}] is not valid. Supported "
                                        f"versions: [2, 3, 3.1]."), JSON
            return 200, self._document(version), JSON
        if path == "/metrics":
            self._record()
            return 200, self.metrics.render(), METRICS_TYPE
        return 404, _error(404, f"no route {path}"), JSON

    async def _options(self, send, headers, origin, cors_ok, req_headers) -> int:
        if origin is not None and not cors_ok:
            await _respond(send, 403, _error(403, "origin not allowed (MLBUILD_CORS_ORIGINS)"),
                           JSON, headers)
            return 403
        headers.append((b"allow", b"GET, POST, OPTIONS"))
        if cors_ok:
            headers.append((b"access-control-allow-methods", CORS_METHODS))
            headers.append((b"access-control-allow-headers", req_headers or CORS_DEFAULT_HEADERS))
            headers.append((b"access-control-max-age", b"600"))
        await _respond(send, 204, b"", None, headers)
        return 204

    def _user_document(self, version: str) -> bytes | None:
        """The script's own swagger file, as azmlinfsrv serves it: ``swagger.json`` or
        ``swagger2.json`` (version 2), ``swagger3.json``, ``swagger3.1.json``, looked up in
        AML_APP_ROOT, else beside the entry script."""
        cfg = self.config
        folders = [f for f in (cfg.app_root, os.path.dirname(os.path.abspath(cfg.entry_script))
                               if cfg.entry_script else None) if f]
        names = ("swagger.json", "swagger2.json") if version == "2" else (f"swagger{version}.json",)
        for path in (os.path.join(folder, name) for folder in dict.fromkeys(folders)
                     for name in names):
            try:
                with open(path, encoding="utf-8") as fh:
                    return json.dumps(json.load(fh), indent=2).encode()
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as exc:
                log.warning("ignoring %s (generating the document instead): %s", path, exc)
        return None

    def _document(self, version: str) -> bytes:
        cached = self._docs.get(version)
        if cached is not None:
            return cached
        body = self._user_document(version)
        if body is None:
            scorer = self.scorer
            cfg = self.config
            in_schema = (scorer.input_schema if scorer else None) \
                or openapi.load_sample_schema(cfg.schema_input)
            out_schema = (scorer.output_schema if scorer else None) \
                or openapi.load_sample_schema(cfg.schema_output)
            title = cfg.service_name or "ML service"  # azmlinfsrv's title (SERVICE_NAME)
            doc = openapi.swagger2(title, in_schema, out_schema, auth=bool(self._keys),
                                   version=cfg.service_version)
            if version != "2":
                doc = openapi.openapi3(doc, "3.1.0" if version == "3.1" else "3.0.3")
            body = json.dumps(doc, indent=2).encode()
        if self.scorer is not None:  # before loading, the decorators are not known yet
            self._docs[version] = body
        return body

    # -- scoring ---------------------------------------------------------------------
    def _authorized(self, auth: bytes | None) -> bool:
        if auth is None or auth[:7].lower() != b"bearer ":
            return False
        given = auth[7:].strip()
        ok = False
        for key in self._keys:  # no early exit: the time does not depend on which key
            ok |= hmac.compare_digest(key, given)
        return ok

    async def _score(self, scope, receive, send, headers, auth, ctype, clen) -> int:
        if self._keys and not self._authorized(auth):
            headers.append((b"www-authenticate", b"Bearer"))
            await _respond(send, 401, _error(401, "missing or wrong key: send "
                                             "'Authorization: Bearer <key>'"), JSON, headers)
            return 401
        scorer = self.scorer
        if scorer is None:
            headers.append((b"retry-after", b"1"))
            await _respond(send, 503, NOT_READY, JSON, headers)
            return 503
        if scope["method"] == "GET":  # run() with the query's arguments, as azmlinfsrv
            return await self._score_get(scope, send, headers, scorer)
        if clen is not None and clen.isdigit() and int(clen) > self._max_body:
            return await self._too_large(send, headers)
        message = await receive()
        if message.get("more_body") or message["type"] != "http.request":
            body = await _read_body(receive, self._max_body, message)
            if body is None:
                return await self._too_large(send, headers)
            if body is False:  # client went away, or the protocol refused its body
                return scope.get(REFUSED_KEY, 499)
            scope[BODY_SIZE_KEY] = len(body)
        else:
            body = message.get("body", b"")
            if len(body) > self._max_body:
                return await self._too_large(send, headers)

        mode = scorer.mode
        kwargs = None
        if mode == "text":
            arg = body.decode("utf-8", "replace")
        elif mode == "json":
            if ctype is not None and ctype.lower().startswith(NOT_JSON_PREFIXES):
                await _respond(send, 415, _error(415, f"expected a JSON body, got "
                                                 f"{ctype.decode('latin-1')}"), JSON, headers)
                return 415
            try:
                arg = json.loads(body)
            except ValueError as exc:
                await _respond(send, 400, _error(400, f"invalid JSON in request body: {exc}"),
                               JSON, headers)
                return 400
            except RecursionError:  # json's C decoder counts its depth against Python's
                await _respond(send, 400, _error(400, "invalid JSON in request body: nested "
                                                 "too deeply"), JSON, headers)
                return 400
            if scorer.spread_json:
                if not isinstance(arg, dict):
                    await _respond(send, 400, _error(400, "expected a JSON object whose keys"
                                                     " are run()'s parameters"), JSON, headers)
                    return 400
                kwargs = arg
        else:
            arg = _aml_request(scope, body)
        return await self._call_run(send, headers, scorer, scope, arg, kwargs)

    async def _score_limited(self, scope, receive, send, headers, auth, ctype, clen) -> int:
        """``_score`` behind max_concurrent_requests: past the cap a request waits up to
        max_request_wait_ms for a slot, then gets 503 (as AKS v1's front end answered)."""
        slots = self._slots
        if slots.locked():
            try:
                await asyncio.wait_for(slots.acquire(), self._slot_wait)
            except asyncio.TimeoutError:
                headers.append((b"retry-after", b"1"))
                await _respond(send, 503, _error(503, (
                    f"too many requests: {self.config.max_concurrent_requests} are being "
                    f"scored and none finished within {self.config.max_request_wait_ms} ms "
                    "(max_concurrent_requests, max_request_wait_ms)")), JSON, headers)
                return 503
        else:
            await slots.acquire()
        try:
            return await self._score(scope, receive, send, headers, auth, ctype, clen)
        finally:
            slots.release()

    async def _score_get(self, scope, send, headers, scorer) -> int:
        """``GET /score?a=1&b=[1,2]``: the arguments, each parsed as JSON where it is JSON
        (a repeated one as a list), as azmlinfsrv hands them: the JSON text of the object
        to a plain run(), the object's keys to a schema-decorated one, the object to a
        no-code model; the request itself to ``@rawhttp``."""
        if scorer.mode == "raw":
            return await self._call_run(send, headers, scorer, scope,
                                        _aml_request(scope, b""), None)
        params = _query_params(scope.get("query_string", b""))
        if scorer.mode == "text":
            return await self._call_run(send, headers, scorer, scope, json.dumps(params), None)
        if scorer.spread_json:
            return await self._call_run(send, headers, scorer, scope, None, params)
        return await self._call_run(send, headers, scorer, scope, params, None)

    async def _call_run(self, send, headers, scorer, scope, arg, kwargs) -> int:
        called = None  # when run() was called, until its time is in the metrics
        try:
            run = scorer.run
            if scorer.wants_headers:
                run = functools.partial(run, request_headers=dict(
                    compat.Headers.from_asgi(scope["headers"]).items()))
            if kwargs is not None:
                run = functools.partial(run, **kwargs)
            run = compat.with_request_id(run, headers[0][1])  # for ModelDataCollector
            called = perf_counter()
            if self._batcher is not None:
                result = await self._batcher.submit(arg)
            elif scorer.is_async:
                call = run(arg) if kwargs is None else run()
                if self._timeout:
                    result = await _with_deadline(call, self._timeout)
                else:
                    result = await call
            elif self._runner is not None:
                result = await self._runner.call(
                    functools.partial(run, arg) if kwargs is None else run, self._timeout)
            else:
                result = run(arg) if kwargs is None else run()
            self._run_times.append(perf_counter() - called)
            called = None
            if result.__class__ not in PLAIN_JSON:  # an AMLResponse, bytes, a generator...
                return await self._send_result(send, result, headers, scope)
            out = jsonenc.dumps(result)
        except nocode.BadInput as exc:
            await _respond(send, 400, _error(400, _clip(str(exc))), JSON, headers)
            return 400
        except RunTimedOut as exc:
            log.error("run() timed out (x-request-id %s): %s",
                      headers[0][1].decode("latin-1"), exc)
            headers.append(RUN_FAILED)
            await _respond(send, 500, _error(500, str(exc)), JSON, headers)
            return 500
        except batching.BatchError as exc:  # the batcher logged it, once for the batch
            headers.append(RUN_FAILED)
            await _respond(send, 500, _error(500, str(exc)), JSON, headers)
            return 500
        except batching.Stopped as exc:
            headers.append((b"retry-after", b"1"))
            await _respond(send, 503, _error(503, str(exc)), JSON, headers)
            return 503
        except asyncio.CancelledError:
            # NOTE: uvicorn cancels the requests still in flight when the graceful timeout
            # of a shutdown ends; one queued for a batch gets its 503 instead of nothing.
            if self._batcher is None:
                raise
            headers.append((b"retry-after", b"1"))
            await _respond(send, 503, _error(503, str(batching.Stopped())), JSON, headers)
            return 503
        except Exception as exc:  # noqa: BLE001 - any error of the script is a 500
            if called is not None:  # run() raised
                self._run_times.append(perf_counter() - called)
            log.error("run() failed (x-request-id %s): Encountered Exception: %s",
                      headers[0][1].decode("latin-1"), traceback.format_exc())
            headers.append(RUN_FAILED)
            if self.config.show_errors:  # the development server: the text, marked
                text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                body = json.dumps({"status_code": 500, "message": RUN_FAILED_MESSAGE,
                                   "development_server_error": text}).encode()
            else:
                body = RUN_FAILED_BODY
            await _respond(send, 500, body, JSON, headers)
            return 500
        headers += ((b"content-type", JSON), (b"content-length", b"%d" % len(out)))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": out})
        return 200

    async def _too_large(self, send, headers) -> int:
        await _respond(send, 413, _error(413, f"request body larger than {self._max_body} bytes"
                                         " (MLBUILD_MAX_BODY_BYTES)"), JSON, headers)
        return 413

    def _log_stream(self, scope, status: int, headers) -> None:
        """The access line of a streamed answer, written as it starts (as azmlinfsrv's,
        whose Flask logs before the body is iterated): time to the first byte, ``N/A``
        bytes. Flushed at once: a stream may last longer than the buffer waits."""
        if self._access is None:
            return
        scope["mlbuild.logged"] = True
        query = scope.get("query_string")
        path = scope["path"]
        self._access.line(scope["method"], f"{path}?{query.decode('latin-1')}" if query else path,
                          status, perf_counter() - scope["mlbuild.started"], headers[0][1])
        self._access.flush()

    async def _send_result(self, send, result, headers, scope) -> int:
        if hasattr(result, "status_code") and hasattr(result, "get_data"):  # AMLResponse
            status = int(result.status_code)
            ctype = None
            failed = status >= 500 or bool(getattr(result, "run_function_failed", False))
            for name, value in result.headers.items():
                lower = name.lower()
                if lower == "x-ms-run-function-failed":  # Azure's AMLResponse always sets it
                    failed = failed or str(value) == "True"
                    continue
                if lower in ("content-length", "transfer-encoding"):
                    continue  # ours
                if lower == "content-type":
                    ctype = str(value).encode("latin-1")
                    continue
                headers.append((name.encode("latin-1"), str(value).encode("latin-1")))
            if failed:
                headers.append(RUN_FAILED)
            if getattr(result, "is_streamed", False):  # AMLResponse(generator): a chunk each
                headers.append((b"content-type", ctype or TEXT))
                self._log_stream(scope, status, headers)
                await _stream(send, result.response, headers, self._runner, status)
                return status
            await _respond(send, status, result.get_data(), ctype, headers)
            return status
        if inspect.isgenerator(result) or inspect.isasyncgen(result):
            headers.append((b"content-type", TEXT))
            self._log_stream(scope, 200, headers)
            await _stream(send, result, headers, self._runner)
            return 200
        if isinstance(result, (bytes, bytearray, memoryview)):
            await _respond(send, 200, bytes(result), b"application/octet-stream", headers)
            return 200
        await _respond(send, 200, jsonenc.dumps(result), JSON, headers)
        return 200


async def _read_body(receive, limit: int, message: dict):
    """The request body from its first ``message`` on; None when it exceeds ``limit``,
    False when the client left."""
    if message["type"] == "http.disconnect":
        return False
    body = message.get("body", b"")
    if not message.get("more_body", False):
        return body if len(body) <= limit else None
    chunks = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return False
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _respond(send, status: int, body: bytes, ctype: bytes | None, headers: list) -> None:
    if ctype is not None:
        headers.append((b"content-type", ctype))
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _chunk(item) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, str):
        return item.encode("utf-8")
    return jsonenc.dumps(item) + b"\n"


async def _stream(send, result, headers, runner: RunThread | None = None,
                  status: int = 200) -> None:
    """Send each item of a generator returned by run() (or given to an AMLResponse) as
    its own chunk.

    A sync iterator is advanced off the event loop -- in the run thread when there is
    one, else in the loop's default executor -- so a slow item (a generator that waits
    for its next token) holds neither other requests nor health checks. The generator's
    code runs with the request's id as run()'s does (ModelDataCollector records it).
    """
    await send({"type": "http.response.start", "status": status, "headers": headers})
    rid = headers[0][1]  # x-request-id comes first
    try:
        if hasattr(result, "__anext__"):
            compat.tag_this_task(rid)  # an async generator runs in the request's task
            async for item in result:
                await send({"type": "http.response.body", "body": _chunk(item), "more_body": True})
        else:
            iterator = iter(result)
            step = compat.with_request_id(functools.partial(next, iterator, _END), rid)
            loop = asyncio.get_running_loop()
            while True:
                if runner is not None:
                    item = await runner.call(step)
                else:
                    item = await loop.run_in_executor(None, step)
                if item is _END:
                    break
                await send({"type": "http.response.body", "body": _chunk(item), "more_body": True})
    except Exception:  # noqa: BLE001 - headers are sent; all we can do is log and end
        log.error("run()'s generator failed mid-stream:\n%s", traceback.format_exc())
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _aml_request(scope, body: bytes) -> AMLRequest:
    client = scope.get("client")
    return AMLRequest(scope["method"], scope["path"], scope.get("query_string", b""),
                      scope["headers"], body, client[0] if client else None,
                      scheme=scope.get("scheme", "http"), server=scope.get("server"))


def _query_params(query: bytes) -> dict:
    """azmlinfsrv's reading of GET arguments: each value parsed as JSON where it is JSON,
    else kept as text; a repeated name gives a list."""
    out: dict = {}
    for key, values in parse_qs(query.decode("latin-1"), keep_blank_values=True).items():
        parsed = [_json_or_text(v) for v in values]
        out[key] = parsed[0] if len(parsed) == 1 else parsed
    return out


def _json_or_text(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def create_app(config: RuntimeConfig | None = None, *, loader=None, on_fatal=None,
               on_ready=None) -> ScoringApp:
    """The ASGI app for ``config`` (default: from the environment).

    Args:
        config: What to serve and how.
        loader: Returns the :class:`~mlbuild.runtime.scoring.Scorer`; default loads
            ``config``'s entry script or no-code model.
        on_fatal: Called with the app (in the loader thread) when loading or init()
            fails; default exits the process with code 3.
        on_ready: Called with the app (in the loader thread) once init() returned.
    """
    return ScoringApp(config or RuntimeConfig.from_env(), loader=loader, on_fatal=on_fatal,
                      on_ready=on_ready)
