"""The scoring server as a raw ASGI application (no framework).

Routes::

    GET  /                 200 "Healthy" (liveness, as the Azure ML server answers)
    GET  /healthz/live     200 always
    GET  /healthz/ready    200 once init() returned, 503 before
    POST /score            run(); errors as {"status_code": N, "message": "..."}
    GET  /swagger.json     Swagger 2.0; ?version=3 for OpenAPI 3
    GET  /metrics          Prometheus text
    OPTIONS *              CORS preflight

Order of checks on /score: method (405) -> key (401) -> ready (503) -> size (413) ->
media type (415) -> JSON (400) -> run() (500 when it raises).

NOTE on dispatching a sync run() -- "inline" (the default) calls it in the event-loop
thread; "thread" hands it to a one-thread pool (one thread so that scripts, written for
the Azure server's single sync worker, never see two concurrent calls). Measured with
`wrk -t2 -c16 -d6s --latency` on 127.0.0.1, a Ridge on sklearn's diabetes data, 2 rows
per request, one worker, 2 cores, access log on, three interleaved rounds (median req/s):
bare ASGI app on uvicorn 4831, inline 4788 (0.99x), thread pool 4035 (0.84x) -- the pool
costs two thread hand-offs and GIL ping-pong per request. Inline blocks other requests
(health checks too) while run() works, exactly like the Azure sync worker; services with
long runs set MLBUILD_RUN_DISPATCH=thread (or write `async def run`).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import inspect
import json
import logging
import os
import sys
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor

from mlbuild.runtime import jsonenc, nocode, openapi, scoring
from mlbuild.runtime.compat import AMLRequest
from mlbuild.runtime.config import RuntimeConfig
from mlbuild.runtime.metrics import Metrics

log = logging.getLogger("mlbuild.runtime")
access_log = logging.getLogger("mlbuild.runtime.access")

JSON = b"application/json"
TEXT = b"text/plain; charset=utf-8"
# Media types that are certainly not JSON: a JSON-expecting script answers 415 to them.
# Anything else (curl's default form type, text/plain, none) is tried as JSON.
NOT_JSON_PREFIXES = (b"multipart/", b"image/", b"audio/", b"video/",
                     b"application/octet-stream")
CORS_METHODS = b"GET, POST, OPTIONS"
CORS_DEFAULT_HEADERS = b"Authorization, Content-Type, X-Request-Id"


class AccessLog:
    """One line per request, buffered and written at most every ``interval`` seconds.

    NOTE: through ``logging`` the line costs ~35% of the req/s of a 2-row predict
    (measured, wrk c=16); a preformatted line appended to a list costs ~1%. Lines reach
    stderr within ``interval`` seconds, and at shutdown.
    """

    def __init__(self, stream=None, interval: float = 0.2, max_lines: int = 256):
        self._stream = stream
        self._interval = interval
        self._max = max_lines
        self._lines: list[str] = []
        self._scheduled = False
        self._second = -1
        self._stamp = ""

    def line(self, method: str, path: str, status: int, ms: float, rid: bytes) -> None:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        self._lines.append(f"{self._stamp},{int(now * 1000) % 1000:03d} INFO "
                           f"mlbuild.runtime.access: {method} {path} {status} {ms:.2f}ms "
                           f"rid={rid.decode('latin-1')}\n")
        if len(self._lines) >= self._max:
            self.flush()
        elif not self._scheduled:
            try:
                asyncio.get_running_loop().call_later(self._interval, self.flush)
                self._scheduled = True
            except RuntimeError:  # no loop: write now
                self.flush()

    def flush(self) -> None:
        self._scheduled = False
        if self._lines:
            stream = self._stream or sys.stderr
            text, self._lines = "".join(self._lines), []
            try:
                stream.write(text)
                stream.flush()
            except (OSError, ValueError):
                pass


def _error(status: int, message: str) -> bytes:
    return json.dumps({"status_code": status, "message": message}).encode()


def _default_on_fatal(app: "ScoringApp") -> None:
    # NOTE: init() failed in the loader thread; there is nothing to serve. Exit the whole
    # process now (uvicorn would otherwise keep answering 503 forever).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(3)


class ScoringApp:
    """ASGI callable serving one scorer. Loading and ``init()`` run in a background thread
    started at lifespan startup (or at the first request when embedded without lifespan),
    so the port answers -- 503 on /score -- while a slow init() works.
    """

    def __init__(self, config: RuntimeConfig, loader=None, on_fatal=None):
        self.config = config
        self.scorer: scoring.Scorer | None = None
        self.ready = False
        self.failure: str | None = None
        self.metrics = Metrics()
        self._loader = loader or functools.partial(scoring.load, config)
        self._on_fatal = on_fatal or _default_on_fatal
        self._keys = tuple(k.encode() for k in config.auth_keys)
        self._cors = frozenset(o.encode() for o in config.cors_origins)
        self._cors_any = b"*" in self._cors
        self._max_body = config.max_body_bytes
        self._executor = (ThreadPoolExecutor(1, thread_name_prefix="run")
                          if config.dispatch == "thread" else None)
        self._start_lock = threading.Lock()
        self._loader_thread: threading.Thread | None = None
        self._docs: dict[str, bytes] = {}
        self._access = (AccessLog() if config.access_log
                        and access_log.isEnabledFor(logging.INFO) else None)

    # -- loading ---------------------------------------------------------------------
    def start(self) -> None:
        """Start loading the script and running init() (once, in a daemon thread)."""
        with self._start_lock:
            if self._loader_thread is None:
                self._loader_thread = threading.Thread(target=self._load_and_init,
                                                       name="mlbuild-init", daemon=True)
                self._loader_thread.start()

    def _load_and_init(self) -> None:
        started = time.perf_counter()
        try:
            scorer = self._loader()
            log.info("loaded %s (%s mode); running init()", scorer.name, scorer.mode)
            scorer.init()
        except BaseException as exc:  # noqa: BLE001 - SystemExit from init() is fatal too
            self.failure = f"{type(exc).__name__}: {exc}"
            log.error("init failed, the service cannot start:\n%s", traceback.format_exc())
            self._on_fatal(self)
            return
        self.scorer = scorer
        self.ready = True
        log.info("ready: init() took %.2f s", time.perf_counter() - started)

    # -- ASGI ------------------------------------------------------------------------
    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive, send):
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._executor is not None:
                    self._executor.shutdown(wait=False)
                if self._access is not None:
                    self._access.flush()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope, receive, send):
        started = time.perf_counter()
        if self._loader_thread is None:
            self.start()
        method = scope["method"]
        path = scope["path"]
        rid = auth = origin = ctype = clen = req_headers = None
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
            elif name == b"access-control-request-headers":
                req_headers = value
        if rid is None:
            rid = uuid.uuid4().hex.encode()
        headers = [(b"x-request-id", rid)]
        cors_ok = False
        if origin is not None and self._cors:
            cors_ok = self._cors_any or origin in self._cors
            if cors_ok:
                headers.append((b"access-control-allow-origin", origin))
                headers.append((b"vary", b"Origin"))
                headers.append((b"access-control-expose-headers", b"x-request-id"))

        status = 200
        try:
            if path == "/score":
                if method == "POST":
                    status = await self._score(scope, receive, send, headers, auth, ctype, clen)
                    return
                if method == "OPTIONS":
                    status = await self._options(send, headers, origin, cors_ok, req_headers)
                    return
                status = 405
                headers.append((b"allow", b"POST, OPTIONS"))
                await _respond(send, 405, _error(405, f"{method} not allowed on /score"),
                               JSON, headers)
                return
            if method == "OPTIONS":
                status = await self._options(send, headers, origin, cors_ok, req_headers)
                return
            if method not in ("GET", "HEAD"):
                status = 405
                headers.append((b"allow", b"GET, HEAD, OPTIONS"))
                await _respond(send, 405, _error(405, f"{method} not allowed on {path}"),
                               JSON, headers)
                return
            status, body, ctype_out = self._get(path, scope.get("query_string", b""))
            await _respond(send, status, b"" if method == "HEAD" else body, ctype_out, headers)
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.observe(method, path, status, elapsed)
            if self._access is not None:
                self._access.line(method, path, status, elapsed * 1000.0, rid)

    def _get(self, path: str, query: bytes):
        if path == "/":
            return 200, b"Healthy", TEXT
        if path == "/healthz/live":
            return 200, b"Live", TEXT
        if path == "/healthz/ready":
            if self.ready:
                return 200, b"Ready", TEXT
            return 503, _error(503, "the service is starting: init() has not returned yet"), JSON
        if path == "/swagger.json":
            version = "3" if b"version=3" in query else "2"
            return 200, self._document(version), JSON
        if path == "/metrics":
            return 200, self.metrics.render(), b"text/plain; version=0.0.4; charset=utf-8"
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

    def _document(self, version: str) -> bytes:
        cached = self._docs.get(version)
        if cached is not None:
            return cached
        scorer = self.scorer
        cfg = self.config
        in_schema = (scorer.input_schema if scorer else None) or openapi.load_sample_schema(cfg.schema_input)
        out_schema = (scorer.output_schema if scorer else None) or openapi.load_sample_schema(cfg.schema_output)
        title = cfg.service_name or (scorer.name if scorer else "ML service")
        doc = openapi.swagger2(title, in_schema, out_schema, auth=bool(self._keys))
        if version == "3":
            doc = openapi.openapi3(doc)
        body = json.dumps(doc, indent=2).encode()
        if scorer is not None:  # before loading, the decorators are not known yet
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
            await _respond(send, 503, _error(503, "the service is starting: init() has not"
                                             " returned yet"), JSON, headers)
            return 503
        if clen is not None and clen.isdigit() and int(clen) > self._max_body:
            return await self._too_large(send, headers)
        body = await _read_body(receive, self._max_body)
        if body is None:
            return await self._too_large(send, headers)
        if body is False:  # client went away
            return 499

        mode = scorer.mode
        if mode == "text":
            args, kwargs = (body.decode("utf-8", "replace"),), {}
        elif mode == "json":
            if ctype is not None and ctype.lower().startswith(NOT_JSON_PREFIXES):
                await _respond(send, 415, _error(415, f"expected a JSON body, got "
                                                 f"{ctype.decode('latin-1')}"), JSON, headers)
                return 415
            try:
                payload = json.loads(body)
            except ValueError as exc:
                await _respond(send, 400, _error(400, f"invalid JSON in request body: {exc}"),
                               JSON, headers)
                return 400
            if scorer.spread_json:
                if not isinstance(payload, dict):
                    await _respond(send, 400, _error(400, "expected a JSON object whose keys"
                                                     " are run()'s parameters"), JSON, headers)
                    return 400
                args, kwargs = (), payload
            else:
                args, kwargs = (payload,), {}
        else:
            client = scope.get("client")
            request = AMLRequest(scope["method"], scope["path"], scope.get("query_string", b""),
                                 scope["headers"], body, client[0] if client else None)
            args, kwargs = (request,), {}

        try:
            if scorer.is_async:
                result = await scorer.run(*args, **kwargs)
            elif self._executor is not None:
                result = await asyncio.get_running_loop().run_in_executor(
                    self._executor, functools.partial(scorer.run, *args, **kwargs))
            else:
                result = scorer.run(*args, **kwargs)
            return await self._send_result(send, result, headers)
        except nocode.BadInput as exc:
            await _respond(send, 400, _error(400, str(exc)), JSON, headers)
            return 400
        except Exception as exc:  # noqa: BLE001 - any error of the script is a 500
            log.error("run() failed (x-request-id %s):\n%s",
                      dict(headers)[b"x-request-id"].decode("latin-1"), traceback.format_exc())
            message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            headers.append((b"x-ms-run-function-failed", b"True"))
            await _respond(send, 500, _error(500, message), JSON, headers)
            return 500

    async def _too_large(self, send, headers) -> int:
        await _respond(send, 413, _error(413, f"request body larger than {self._max_body} bytes"
                                         " (MLBUILD_MAX_BODY_BYTES)"), JSON, headers)
        return 413

    async def _send_result(self, send, result, headers) -> int:
        if hasattr(result, "status_code") and hasattr(result, "get_data"):  # AMLResponse
            status = int(result.status_code)
            ctype = None
            for name, value in result.headers.items():
                if name.lower() == "content-length":
                    continue
                if name.lower() == "content-type":
                    ctype = str(value).encode("latin-1")
                    continue
                headers.append((name.encode("latin-1"), str(value).encode("latin-1")))
            await _respond(send, status, result.get_data(), ctype, headers)
            return status
        if inspect.isgenerator(result) or inspect.isasyncgen(result):
            await _stream(send, result, headers)
            return 200
        if isinstance(result, (bytes, bytearray, memoryview)):
            await _respond(send, 200, bytes(result), b"application/octet-stream", headers)
            return 200
        await _respond(send, 200, jsonenc.dumps(result), JSON, headers)
        return 200


async def _read_body(receive, limit: int):
    """The request body; None when it exceeds ``limit``, False when the client left."""
    message = await receive()
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


async def _stream(send, result, headers) -> None:
    """Send each item of a generator returned by run() as its own chunk."""
    headers.append((b"content-type", b"text/plain; charset=utf-8"))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    try:
        if inspect.isasyncgen(result):
            async for item in result:
                await send({"type": "http.response.body", "body": _chunk(item), "more_body": True})
        else:
            for item in result:
                await send({"type": "http.response.body", "body": _chunk(item), "more_body": True})
    except Exception:  # noqa: BLE001 - headers are sent; all we can do is log and end
        log.error("run()'s generator failed mid-stream:\n%s", traceback.format_exc())
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def create_app(config: RuntimeConfig | None = None, *, loader=None, on_fatal=None) -> ScoringApp:
    """The ASGI app for ``config`` (default: from the environment).

    Args:
        config: What to serve and how.
        loader: Returns the :class:`~mlbuild.runtime.scoring.Scorer`; default loads
            ``config``'s entry script or no-code model.
        on_fatal: Called with the app when loading or init() fails; default exits the
            process with code 3.
    """
    return ScoringApp(config or RuntimeConfig.from_env(), loader=loader, on_fatal=on_fatal)
