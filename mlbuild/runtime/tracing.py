"""Opt-in OpenTelemetry traces: a SERVER span per request, a child span per run() call.

On when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set
(and ``OTEL_SDK_DISABLED`` is not true, ``OTEL_TRACES_EXPORTER`` not ``none``); the
packages come with ``pip install 'mlbuild[otel]'`` (``requirements-otel.txt`` beside this
file, which images install for ``services.NAME.tracing: true``). Everything else is the
SDK's own reading of the standard variables: ``OTEL_SERVICE_NAME`` and
``OTEL_RESOURCE_ATTRIBUTES`` (service.name defaults to the service's name,
MLBUILD_SERVICE_NAME), ``OTEL_TRACES_SAMPLER``/``_ARG``, ``OTEL_PROPAGATORS`` (W3C
``traceparent`` and baggage by default), ``OTEL_EXPORTER_OTLP_*`` (headers, timeout,
compression, certificates) and ``OTEL_BSP_*`` (the batch processor's delay and sizes).
``MLBUILD_TRACING=1`` (what ``tracing: true`` sets) without an endpoint only logs that no
spans are exported.
Spans go over OTLP http/protobuf (the OTLP default; no grpcio), exported in batches by
the SDK's BatchSpanProcessor thread, never on the request path; a collector that is down
costs dropped spans and a log line per batch, not slower requests.

What a request produces::

    POST /score  SERVER  parent: the incoming traceparent, if any
        http.request.method, http.route (an app route), url.path, url.scheme,
        network.protocol.version, client.address, user_agent.original,
        http.response.status_code, error.type (5xx: status ERROR),
        mlbuild.request_id (the x-request-id answered), mlbuild.models ("name:version")
      run        INTERNAL the script's run() or the no-code model's predict; an exception
                 raised by it is recorded and sets status ERROR. Under the request's span
                 whichever thread it runs in (inline, the run thread, async).
    run batch    INTERNAL with adaptive batching: one span per batched call, child of the
                 first request's span and linked to the span of every request in it.

Without the variables nothing of OpenTelemetry is imported, and a request pays one
``is None`` test (app.py's ``ScoringApp.__call__``): the rest is set up once, when the
scorer is loaded (:meth:`Tracing.instrument`). Missing packages with the variables set:
one log line at start, and the service serves without traces.

NOTE on the cost (opentelemetry-sdk 1.45, Python 3.11): a sampled request's two spans
cost ~130 us of CPU in-process, ~70 us of them on the request path (creating, attributes,
ending: the SDK's Python code) and ~60 us in the export thread (encoding OTLP protobuf in
Python, the HTTP post); a request not sampled ~35 us. That is about as much again as a
small predict: bench/serve.py measured 0.58-0.61x the untraced req/s and +183-207 us of
server CPU per request with every request sampled. Busy services sample:
``OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.1``.
opentelemetry-instrumentation-asgi does the server span as a middleware, but by default
opens more spans per request (one per ``receive`` and per ``send`` message; its
``exclude_spans`` drops them) and knows neither the request id nor the run thread: a
dependency that would cost more, not less.

This module imports only the standard library until :func:`setup` finds tracing on.
"""

from __future__ import annotations

import atexit
import contextvars
import functools
import logging
import os
import threading

log = logging.getLogger("azmlinfsrv")

ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
SHUTDOWN_SECONDS = 3.0  # most a stop waits for the last spans to reach the collector
INSTRUMENTATION_NAME = "mlbuild.runtime"
# http.request.method's known values (semantic conventions); others are "_OTHER".
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS",
                          "TRACE", "PATCH"})

# The process's tracing, once :func:`setup` turned it on; None otherwise (and always
# when the variables are not set). server.py flushes it at shutdown.
active: Tracing | None = None
_lock = threading.Lock()
_checked = False


def enabled(environ=None) -> bool:
    """Whether the environment asks for traces (an OTLP endpoint, the SDK not disabled,
    the traces exporter not ``none``)."""
    env = os.environ if environ is None else environ
    if not any(env.get(name, "").strip() for name in ENDPOINT_VARS):
        return False
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = {e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",")}
    return exporters != {"none"}


def setup(config, routes=frozenset()) -> Tracing | None:
    """This process's :class:`Tracing` when the environment asks for traces (made on the
    first call), else None.

    Args:
        config: The app's :class:`~mlbuild.runtime.config.RuntimeConfig` (service name,
            model dir, path prefix).
        routes: The app's routes (``http.route`` is set for these only).
    """
    global active, _checked
    if active is not None or _checked:
        return active
    with _lock:
        if active is not None or _checked:
            return active
        _checked = True
        if not enabled():
            if os.environ.get("MLBUILD_TRACING", "").strip().lower() in ("1", "true"):
                log.info("tracing: the service traces (tracing: true) but no spans are "
                         "exported: set OTEL_EXPORTER_OTLP_ENDPOINT (e.g. "
                         "http://collector:4318) to send them")
            return None
        try:
            active = Tracing(config, routes)
        except ImportError as exc:
            log.warning("tracing is off: OTEL_EXPORTER_OTLP_ENDPOINT is set but the OpenTelemetry "
                        "packages are missing (%s); install them with pip install "
                        "'mlbuild[otel]' (services.NAME.tracing: true in images). Serving "
                        "without traces", exc)
            return None
        except Exception as exc:  # noqa: BLE001 - traces are not worth a service that is down
            log.error("tracing is off: setting up OpenTelemetry failed (%s: %s); check the "
                      "OTEL_* variables. Serving without traces", type(exc).__name__, exc)
            return None
        atexit.register(active.shutdown)
        return active


def shutdown() -> None:
    """Flush the spans still queued (at most SHUTDOWN_SECONDS) and stop exporting."""
    if active is not None:
        active.shutdown()


def service_models(model_dir: str | None) -> tuple[str, ...]:
    """``name:version`` of the models under ``model_dir`` as mlbuild lays them out (one
    model: ``.../NAME/VERSION``; several: ``NAME/VERSION/`` folders); ``()`` for any other
    layout."""
    if not model_dir or not os.path.isdir(model_dir):
        return ()
    path = os.path.normpath(os.path.abspath(model_dir))
    version, name = os.path.basename(path), os.path.basename(os.path.dirname(path))
    if version.isdigit() and name:
        return (f"{name}:{version}",)
    from mlbuild.runtime.models import _model_names

    out = []
    for name in _model_names(path):
        versions = sorted((v for v in os.listdir(os.path.join(path, name)) if v.isdigit()),
                          key=int)
        out += [f"{name}:{v}" for v in versions]
    return tuple(out)


class _Traced:
    """A batched request's item with the context of its request's span."""

    __slots__ = ("item", "span_context")

    def __init__(self, item, span_context):
        self.item = item
        self.span_context = span_context


class Tracing:
    """The tracer provider, exporter and the hooks the app calls.

    Raises:
        ImportError: The OpenTelemetry packages are not installed.
    """

    def __init__(self, config, routes=frozenset()):
        from opentelemetry import context, propagate, trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import Link, SpanKind, Status, StatusCode

        resource = Resource.create()  # OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service") \
                and config.service_name:
            resource = resource.merge(Resource({SERVICE_NAME: config.service_name}))
        # NOTE: shutdown_on_exit=False: the SDK's own atexit hook waits up to 30 s for a
        # collector that is down; ours (setup) waits SHUTDOWN_SECONDS.
        self._provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        # The global provider too: spans a script makes with opentelemetry's API nest
        # under its run() span and go to the same collector.
        trace.set_tracer_provider(self._provider)
        self._tracer = self._provider.get_tracer(INSTRUMENTATION_NAME)
        self._attach = context.attach
        self._detach = context.detach
        self._extract = propagate.extract
        self._in_context = trace.set_span_in_context
        self._current_span = trace.get_current_span
        self._link = Link
        self._server = SpanKind.SERVER
        self._error = StatusCode.ERROR
        self._status = Status
        self._prefix = config.path_prefix
        self._routes = frozenset(routes)
        model_dir = config.model_dir
        if not model_dir and config.no_code_model:  # --no-code-model .../NAME/VERSION/FILE
            model_dir = (config.no_code_model if os.path.isdir(config.no_code_model)
                         else os.path.dirname(config.no_code_model))
        self._models = service_models(model_dir)
        self._closed = False
        endpoint = os.environ.get(ENDPOINT_VARS[0], "").strip() or \
            os.environ[ENDPOINT_VARS[1]].strip().rstrip("/") + "/v1/traces"
        self.endpoint = endpoint
        protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                    or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf")
        if protocol.strip().lower() != "http/protobuf":
            log.warning("tracing: OTEL_EXPORTER_OTLP_PROTOCOL=%s is not supported; spans go "
                        "over http/protobuf (port 4318 on a collector)", protocol)
        log.info("tracing: OpenTelemetry spans to %s as service.name=%s", endpoint,
                 resource.attributes.get(SERVICE_NAME))

    # -- per request -----------------------------------------------------------------
    async def serve(self, scope, receive, send, app) -> None:
        """Call ``app`` (the ASGI app's own handler) for an HTTP request inside its SERVER
        span, the span current (contextvars) while it runs."""
        method = scope["method"]
        path = scope["path"]
        route = path
        if self._prefix is not None and path.startswith(self._prefix):
            route = path[len(self._prefix):] or "/"
        if route not in self._routes:
            route = None
        known = method if method in HTTP_METHODS else "_OTHER"
        headers = scope["headers"]
        attributes = {"http.request.method": known, "url.path": path,
                      "url.scheme": scope.get("scheme", "http"),
                      "network.protocol.version": scope.get("http_version", "1.1")}
        if known == "_OTHER":
            attributes["http.request.method_original"] = method
        if route is not None:
            attributes["http.route"] = route
        client = scope.get("client")
        if client:
            attributes["client.address"] = client[0]
        for name, value in headers:
            if name == b"user-agent":
                attributes["user_agent.original"] = value.decode("latin-1")
                break
        if self._models:
            attributes["mlbuild.models"] = self._models
        parent = self._extract(headers, getter=_GETTER)
        span = self._tracer.start_span(
            (f"{known} {route}" if route is not None else known) if known != "_OTHER" else
            (f"HTTP {route}" if route is not None else "HTTP"),
            parent, self._server, attributes)
        token = self._attach(self._in_context(span, parent))
        answer = []

        async def send_traced(message):
            if message["type"] == "http.response.start":
                answer.append(message)
            await send(message)

        try:
            await app(scope, receive, send_traced)
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(self._status(self._error, f"{type(exc).__name__}: {exc}"))
            span.set_attribute("error.type", type(exc).__qualname__)
            raise
        finally:
            self._detach(token)
            if answer and span.is_recording():
                start = answer[0]
                status = start["status"]
                span.set_attribute("http.response.status_code", status)
                for name, value in start.get("headers", ()):
                    if name == b"x-request-id":  # the first header: found at once
                        span.set_attribute("mlbuild.request_id", value.decode("latin-1"))
                        break
                if status >= 500:
                    span.set_attribute("error.type", str(status))
                    span.set_status(self._status(self._error))
            span.end()

    # -- set up once, when the scorer is loaded --------------------------------------
    def instrument(self, scorer, batcher=None, runner=None) -> None:
        """Trace ``scorer``'s run() (and the batches of ``batcher``), and make ``runner``
        (app.py's run thread) run its calls in the caller's context.

        Called once, before the first request is scored: from then on the wrapped
        functions are what the app calls.
        """
        scorer.run = self._traced_run(scorer.run, scorer.is_async, scorer.name)
        if batcher is not None:
            batcher.spec = self._traced_batch(batcher.spec, scorer.name)
        if runner is not None:
            _propagate_context(runner)

    def _traced_run(self, run, is_async: bool, name: str):
        start = self._tracer.start_as_current_span
        attributes = {"mlbuild.scorer": name}

        if is_async:
            @functools.wraps(run)
            async def traced_async(*args, **kwargs):
                with start("run", attributes=attributes):
                    return await run(*args, **kwargs)

            return traced_async

        @functools.wraps(run)
        def traced(*args, **kwargs):
            with start("run", attributes=attributes):
                return run(*args, **kwargs)

        return traced

    def _traced_batch(self, spec, name: str):
        """``spec`` (a :class:`~mlbuild.runtime.batching.BatchSpec`) whose items carry
        their request's span context, and whose calls are "run batch" spans."""
        from opentelemetry.trace import NonRecordingSpan

        from mlbuild.runtime.batching import BatchSpec, ItemFailed

        prepare = spec.prepare
        current = self._current_span
        start = self._tracer.start_as_current_span
        in_context = self._in_context
        link = self._link

        def traced_prepare(arg):  # in the request's task: its span is current
            item = arg if prepare is None else prepare(arg)
            return _Traced(item, current().get_span_context())

        def open_span(items):
            links = [link(i.span_context) for i in items if i.span_context.is_valid]
            parent = (in_context(NonRecordingSpan(items[0].span_context))
                      if items and items[0].span_context.is_valid else None)
            return start("run batch", context=parent, links=links,
                         attributes={"mlbuild.scorer": name, "mlbuild.batch.size": len(items)})

        def count_failed(span, results) -> None:
            failed = sum(1 for r in results if r.__class__ is ItemFailed)
            if failed:
                span.set_attribute("mlbuild.batch.failed", failed)

        call = spec.call
        if spec.is_async:
            async def traced_call_async(items):
                with open_span(items) as span:
                    results = await call([i.item for i in items])
                    count_failed(span, results)
                    return results

            traced_call = traced_call_async
        else:
            def traced_call(items):
                with open_span(items) as span:
                    results = call([i.item for i in items])
                    count_failed(span, results)
                    return results

        return BatchSpec(traced_call, prepare=traced_prepare, is_async=spec.is_async,
                         from_script=spec.from_script)

    # -- shutdown --------------------------------------------------------------------
    def shutdown(self, timeout: float = SHUTDOWN_SECONDS) -> None:
        """Export the spans still queued, waiting at most ``timeout`` seconds (a
        collector that is down does not hold the stop), then stop exporting."""
        if self._closed:
            return
        self._closed = True
        flusher = threading.Thread(target=self._provider.shutdown, name="mlbuild-otel-flush",
                                   daemon=True)
        flusher.start()
        flusher.join(timeout)
        if flusher.is_alive():
            log.warning("tracing: the last spans did not reach %s within %g s; dropped",
                        self.endpoint, timeout)


def _propagate_context(runner) -> None:
    """Make ``runner.call(fn, timeout)`` run ``fn`` in a copy of the caller's context.

    NOTE: app.py's run thread is a plain thread: contextvars (the current span) do not
    follow a call into it. Wrapping the one instance's ``call`` here, once, costs the
    untraced service nothing.
    """
    call = runner.call
    copy_context = contextvars.copy_context

    async def call_in_context(fn, timeout=None):
        return await call(functools.partial(copy_context().run, fn), timeout)

    runner.call = call_in_context


class _HeaderGetter:
    """opentelemetry's Getter over ASGI headers (lower-case byte names, byte values)."""

    def get(self, carrier, key: str):
        name = key.lower().encode("latin-1")
        values = [v.decode("latin-1") for n, v in carrier if n == name]
        return values or None

    def keys(self, carrier):
        return [n.decode("latin-1") for n, _ in carrier]


_GETTER = _HeaderGetter()
