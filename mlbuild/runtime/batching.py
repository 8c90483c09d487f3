"""Adaptive micro-batching: requests that arrive close together are scored in one call.

A service turns it on with ``batching: {max_batch_size: N, max_latency_ms: M}`` in the
manifest, which reaches the runtime as ``MLBUILD_BATCH_MAX_SIZE`` and
``MLBUILD_BATCH_MAX_LATENCY_MS``. What is batched:

    no-code scikit-learn / ONNX   rows of compatible requests concatenated along the first
                                  axis, one model call, the answer split back by row counts
    @batched run(inputs)          an entry script's run() takes a list of inputs (what a
                                  plain run() gets one of) and returns a list of results
                                  of the same length, in the same order

How a batch forms (one :class:`Batcher` per worker process, in the event-loop thread)::

    request ─▶ prepare(arg) in the loop ─▶ a bad input is its own 400 and never joins
            ─▶ queued; the first request of an empty queue opens a window of M ms
    dispatch: the queue holds N ─┐
              the window closed ─┼─▶ one batch at a time, in the run thread ─▶ each request
              (and the previous  │    gets its own slice, as its own future's result or
               batch finished) ──┘    exception; one failed item fails alone

While a batch runs, the next one gathers: a request queued then waits for the running
batch and at most the rest of its own window, so under load batches fill up by
themselves and no request waits more than M ms for company. M = 0 batches only what
queued while the previous batch ran.

Adaptive at light traffic: a window that closed on one request alone gathered nobody,
so the windows stop: the next request that finds the worker idle and nothing queued is
scored at once. The first request that finds company (others queued, or a batch
running) brings the windows back. A lone client pays the window once, not per request.

Isolation: a batch's failure never becomes a neighbour's. The no-code models run each
group of requests that can share a call (same method, same row shape and dtype, finite
numbers) together and, when that call fails, every request of the group alone (see
nocode.py). A ``@batched`` run() that raises is called once per input of that batch,
so that only the inputs that fail get a 500. A ``@batched`` run() that returns the wrong
number of results fails its whole batch with a 500 that says so, and one log line.

Timeouts (``MLBUILD_REQUEST_TIMEOUT``/``SCORING_TIMEOUT_MS``) count from a request's
arrival: it is answered 500 at its deadline wherever it is; a request still queued then is
dropped, never scored. A sync batch that runs past the timeout is abandoned as a single
run() call is (app.py's run thread); an ``async def`` one is left to finish.

Shutdown: queued requests keep being scored while the server drains (the graceful
timeout); whatever is still queued when the app shuts down, or cancelled by the server
at the end of the drain, is answered 503. None waits for ever.

Only the standard library is imported (``from mlbuild.runtime import batched`` in a script
loads this module, and asyncio, on first use).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import logging
import traceback

log = logging.getLogger("azmlinfsrv")

BATCHED_ATTR = "__mlbuild_batched__"


def batched(run):
    """Mark an entry script's ``run`` as batched: it takes a list of inputs and returns
    a list of results of the same length, in the same order::

        from mlbuild.runtime import batched

        @batched
        def run(inputs):                       # inputs: list of request bodies (str)
            rows = [json.loads(i)["data"] for i in inputs]
            return model.predict(np.array(rows)).tolist()

    The service's ``batching:`` settings say how many inputs a call gets and how long a
    request may wait for others; without them each call gets one. ``async def run``
    and ``@rawhttp`` (a list of requests; each result may be an ``AMLResponse``) work
    too; ``inference_schema`` decorators and a ``request_headers`` parameter do not.
    """
    setattr(run, BATCHED_ATTR, True)
    return run


def is_batched(run) -> bool:
    """Whether ``run`` (or a function it wraps) was marked with :func:`batched`."""
    return bool(getattr(run, BATCHED_ATTR, False)
                or getattr(inspect.unwrap(run), BATCHED_ATTR, False))


class ItemFailed:
    """In a batch's list of results: this item's request fails with ``exc``."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException):
        self.exc = exc


class BatchError(Exception):
    """A whole batch failed (run() answered with the wrong number of results): a 500
    for each of its requests, whose message is this text (ours, no data of the script)."""


class Stopped(Exception):
    """The server stopped before the request was scored (a 503)."""

    def __init__(self):
        super().__init__("the server is stopping: the request was not scored; retry")


class BatchSpec:
    """How a scorer is called in batches.

    Attributes:
        call: ``call(items) -> results``: one result per item, in order, an
            :class:`ItemFailed` for an item that failed alone; raises for the batch.
        prepare: ``prepare(arg) -> item``, run in the event loop when the request arrives
            (raises ``BadInput`` for a request that must not join); None keeps ``arg``.
        is_async: ``call`` is a coroutine function (awaited in the loop, not the thread).
        from_script: run() is a ``@batched`` entry script's (batches of one without
            batching settings); False for the no-code models (not batched without them).
    """

    __slots__ = ("call", "prepare", "is_async", "from_script")

    def __init__(self, call, prepare=None, is_async=False, from_script=False):
        self.call = call
        self.prepare = prepare
        self.is_async = is_async
        self.from_script = from_script


def _as_results(out, count: int) -> list:
    """``out``, a @batched run()'s answer to ``count`` inputs, as a list of ``count``.

    Raises:
        BatchError: Not a sequence, or not ``count`` long.
    """
    if isinstance(out, (str, bytes, bytearray, dict)) or not hasattr(out, "__len__") \
            or not hasattr(out, "__iter__"):
        raise BatchError(f"run() is @batched but returned a {type(out).__name__}, not a "
                         f"list of {count} result{'s' if count != 1 else ''} (one per input, "
                         "in order)")
    if len(out) != count:
        raise BatchError(f"run() is @batched but returned {len(out)} result"
                         f"{'s' if len(out) != 1 else ''} for {count} input"
                         f"{'s' if count != 1 else ''}; it must return one per input, in order")
    return list(out)


def script_spec(run) -> BatchSpec:
    """The :class:`BatchSpec` of a ``@batched`` run(): called with the list of inputs;
    when it raises, called again once per input, so that only the failing inputs fail.

    NOTE: the calls one per input happen outside the ``except`` of the batch's failure,
    so an input's own traceback is not chained to the batch's (the log shows it once).
    """
    if inspect.iscoroutinefunction(inspect.unwrap(run)) or inspect.iscoroutinefunction(run):
        async def call_async(items: list) -> list:
            try:
                out = await run(items)
            except Exception as exc:  # noqa: BLE001 - retried alone, below
                if len(items) == 1:
                    return [ItemFailed(exc)]
                _retrying(len(items), exc)
            else:
                return _as_results(out, len(items))
            results = []
            for item in items:
                try:
                    results.append(_as_results(await run([item]), 1)[0])
                except Exception as one:  # noqa: BLE001 - this input's own failure
                    results.append(ItemFailed(one))
            return results

        return BatchSpec(call_async, is_async=True, from_script=True)

    def call(items: list) -> list:
        try:
            out = run(items)
        except Exception as exc:  # noqa: BLE001 - retried alone, below
            if len(items) == 1:
                return [ItemFailed(exc)]
            _retrying(len(items), exc)
        else:
            return _as_results(out, len(items))
        results = []
        for item in items:
            try:
                results.append(_as_results(run([item]), 1)[0])
            except Exception as one:  # noqa: BLE001 - this input's own failure
                results.append(ItemFailed(one))
        return results

    return BatchSpec(call, from_script=True)


def _retrying(count: int, exc: Exception) -> None:
    log.warning("run() raised %s on a batch of %d inputs; calling it once per input so that "
                "only the failing ones fail", type(exc).__name__, count)


class _Entry:
    __slots__ = ("item", "future", "arrived", "timer")

    def __init__(self, item, future, arrived: float):
        self.item = item
        self.future = future
        self.arrived = arrived
        self.timer = None


def _set(future, ok: bool, value) -> None:
    if not future.done():  # a request past its deadline has its answer already
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


class Batcher:
    """Gathers requests into batches and runs them one at a time (see the module
    docstring). Used from the event-loop thread only.

    Args:
        spec: What to call.
        max_size: Most items in one call.
        max_latency: Seconds the first request of a batch waits for others (>= 0).
        runner: The app's run thread (``await runner.call(fn, timeout)``), for a sync call.
        timeout: The request timeout in seconds, or None.
        metrics: Gets ``observe_batch(size, waits)`` as each batch starts.
        timeout_error: The exception a request past its deadline gets, made with the
            timeout (app.py's ``RunTimedOut``, which ``runner.call`` raises too).
    """

    def __init__(self, spec: BatchSpec, max_size: int, max_latency: float, runner=None,
                 timeout: float | None = None, metrics=None, timeout_error=TimeoutError):
        if max_size < 1 or max_latency < 0:
            raise ValueError(f"batch size {max_size} (>= 1) or latency {max_latency} (>= 0)")
        if runner is None and not spec.is_async:
            raise ValueError("a sync batch call needs a run thread")
        self.spec = spec
        self.max_size = max_size
        self.max_latency = max_latency
        self._runner = runner
        self._timeout = timeout
        self._metrics = metrics
        self._timeout_error = timeout_error
        self._queue: collections.deque[_Entry] = collections.deque()
        self._busy = False
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # The last window gathered nobody, and no request found company since.
        self._lonely = False
        self._task: asyncio.Task | None = None  # the running batch (the loop holds tasks weakly)

    async def submit(self, arg):
        """Score ``arg`` in the next batch; its own result, or its own exception.

        Raises:
            BadInput: From ``prepare``: the request never joined a batch.
            timeout_error: Past the request timeout.
            BatchError: Its batch failed as a whole.
            Stopped: The server stopped before it was scored.
        """
        prepare = self.spec.prepare
        item = arg if prepare is None else prepare(arg)
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        if self._closed:
            raise Stopped()
        entry = _Entry(item, loop.create_future(), loop.time())
        queue = self._queue
        queue.append(entry)
        if self._busy or len(queue) > 1:
            self._lonely = False  # company: windows gather something again
        if not self._busy:
            if len(queue) >= self.max_size or self.max_latency == 0 or self._lonely:
                self._dispatch()
            elif self._timer is None:
                self._timer = loop.call_at(entry.arrived + self.max_latency, self._on_timer)
        if self._timeout is not None:
            entry.timer = loop.call_later(self._timeout, self._expire, entry)
        try:
            return await entry.future
        except asyncio.CancelledError:
            self._forget(entry)
            raise
        finally:
            if entry.timer is not None:
                entry.timer.cancel()

    def _forget(self, entry: _Entry) -> None:
        """Take a request that will not be answered through its future out of the queue."""
        try:
            self._queue.remove(entry)
        except ValueError:  # in a running batch, or gone already
            pass

    def _expire(self, entry: _Entry) -> None:
        entry.timer = None
        self._forget(entry)  # still queued: dropped, never scored
        _set(entry.future, False, self._timeout_error(self._timeout))

    def _on_timer(self) -> None:
        self._timer = None
        if not self._busy and self._queue:
            self._lonely = len(self._queue) == 1
            self._dispatch()

    def _dispatch(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        queue = self._queue
        batch = [queue.popleft() for _ in range(min(len(queue), self.max_size))]
        self._busy = True
        if self._metrics is not None:
            now = self._loop.time()
            self._metrics.observe_batch(len(batch), [now - e.arrived for e in batch])
        self._task = self._loop.create_task(self._run(batch))

    async def _run(self, batch: list[_Entry]) -> None:
        items = [e.item for e in batch]
        try:
            if self.spec.is_async:
                results = await self.spec.call(items)
            else:
                results = await self._runner.call(functools.partial(self.spec.call, items),
                                                  self._timeout)
            if len(results) != len(batch):  # ours (the no-code models) or _as_results
                raise BatchError(f"a batch of {len(batch)} got {len(results)} results")
        except asyncio.CancelledError:
            for e in batch:
                _set(e.future, False, Stopped())
            raise
        except Exception as exc:  # noqa: BLE001 - the batch as a whole: each request fails
            self._fail_batch(batch, exc)
        else:
            for e, result in zip(batch, results):
                if result.__class__ is ItemFailed:
                    _set(e.future, False, result.exc)
                else:
                    _set(e.future, True, result)
        finally:
            self._busy = False
            self._task = None
            self._next()

    def _fail_batch(self, batch: list[_Entry], exc: Exception) -> None:
        if isinstance(exc, self._timeout_error):  # every request of it is past its deadline
            for e in batch:
                _set(e.future, False, self._timeout_error(self._timeout))
            return
        if isinstance(exc, BatchError):
            log.error("a batch of %d requests failed: %s", len(batch), exc)
            message = str(exc)
        else:
            log.error("a batch of %d requests failed:\n%s", len(batch),
                      "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
            message = f"the batch failed: {type(exc).__name__}"
        for e in batch:  # one exception each: they are raised in different tasks
            _set(e.future, False, BatchError(message))

    def _next(self) -> None:
        """After a batch: start the next at once if it is full or its oldest request
        waited out its window, else when that window closes."""
        queue = self._queue
        if self._closed:
            self._fail_queued()
            return
        if not queue:
            return
        loop = self._loop
        deadline = queue[0].arrived + self.max_latency
        if len(queue) >= self.max_size or loop.time() >= deadline:
            self._dispatch()
        elif self._timer is None:
            self._timer = loop.call_at(deadline, self._on_timer)

    def _fail_queued(self) -> None:
        while self._queue:
            _set(self._queue.popleft().future, False, Stopped())

    def close(self) -> None:
        """Stop taking requests: the queued ones get :class:`Stopped` (a 503); a running
        batch finishes and answers its own."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._fail_queued()

    @property
    def queued(self) -> int:
        """Requests waiting for a batch (not counting a running one)."""
        return len(self._queue)
