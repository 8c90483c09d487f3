"""Prometheus metrics of the whole service, whatever the number of worker processes.

Every process that serves (the single process, or each worker under ``--workers N``)
writes its numbers to files of its own in one folder per service run, in
``prometheus_client``'s multiprocess format (``histogram_PID.db``, ``gauge_livesum_PID.db``,
``gauge_max_PID.db``); a scrape, answered by any one worker, reads and merges all of them
with ``prometheus_client.multiprocess.MultiProcessCollector`` and renders the text with
``prometheus_client.generate_latest``. So every scrape reports every worker's requests.

The folder: ``MLBUILD_METRICS_DIR`` when set (the run owns it: its ``*.db`` and
``window_*.bin`` files are removed at the start), else a new temporary folder made by the
supervising (or the single) process before any worker starts and removed when it stops
(server.py, :func:`prepare_dir`). Workers find it in ``MLBUILD_METRICS_DIR``.
A worker that dies and is replaced: its counters and histograms stay in its files and
keep being counted (nothing is lost), the new worker writes files of its own pid
(nothing is counted twice); its in-flight gauge (``livesum``) file is removed
(:func:`mark_process_dead`), as prometheus_client does.

NOTE on the hot path: prometheus_client's own metric objects in multiprocess mode cost
~29 us per request here (the seven observations a request makes: each a labels() look-up
under a lock, a pid check, a linear bucket scan, a struct packed into the mmap under a
lock), against 0.3 us for the hand-written per-process counters before: on
bench/serve.py (c=16, one worker, 20 interleaved rounds) the runtime with them answered
0.89x the req/s of the runtime with the writes below (CPU per request +12 %), far over
the 3 % allowed. So the writes are done here, in the same files: each labelled series
knows the indexes of its values in a memoryview of doubles over its process's file, and
an observation adds to two of them in place (~2.3 us per request in all, the /score
window included; on bench/serve.py 1.00x the req/s of the hand-written counters, CPU per
request +0.9 %, 30 rounds). prometheus_client still reads, merges and renders the files.
The format is prometheus_client's (mmap_dict.py): a 4-byte "used" length, 4 bytes of
padding, then entries of a 4-byte key length, the JSON key padded to 8 bytes, a double
value and a double timestamp.
tests/runtime/test_metrics_workers.py parses what prometheus_client reads back.

Names, as OpenTelemetry's HTTP semantic conventions are exported to Prometheus
(attribute dots become underscores, the unit a suffix):

- ``http_server_request_duration_seconds`` histogram; labels ``http_request_method``
  (GET, POST, ...; another method is ``_OTHER``), ``http_route`` (one of the routes, else
  ``other``: a client cannot grow the label set) and ``http_response_status_code``.
- ``http_server_active_requests`` gauge (summed over the live workers), label
  ``http_request_method``.
- ``http_server_request_body_size_bytes`` (from Content-Length, or the body read when it
  came chunked) and ``http_server_response_body_size_bytes`` (not for streamed answers)
  histograms, same labels as the duration.
- ``mlbuild_model_inference_duration_seconds`` histogram of run()'s calls (including
  the batcher's queue for a batched service), labels ``model`` and ``version``: the
  service's models from the model folder (``NAME/VERSION``); a service of several models
  gets one series labelled with all of them, comma-separated in the same order.
- ``mlbuild_init_duration_seconds`` gauge: the longest init() of the run's workers.
- ``mlbuild_build_info`` gauge, 1, labels ``version`` (mlbuild's), ``python``, ``service``.
- ``mlbuild_batch_size`` and ``mlbuild_batch_wait_seconds`` histograms with adaptive
  batching (batching.py): requests scored per call, time a request waited in the queue.
- The last minute of ``/score`` (``mlbuild status`` shows it): ``mlbuild_recent_requests
  {status_class}`` and ``mlbuild_recent_request_duration_seconds{quantile}`` gauges over
  the last ``mlbuild_recent_window_seconds`` (60), from per-second slots every worker
  keeps in its ``window_PID.bin`` file, summed at the scrape. Cumulative counters cannot
  tell a last minute from one scrape, and ``status`` is one scrape.
- Old names, kept one release as aliases computed at the scrape (nothing on the hot
  path): ``mlbuild_requests_total{method,path,status}`` and
  ``mlbuild_score_duration_seconds`` (the duration histogram of ``/score``).
"""

from __future__ import annotations

import atexit
import bisect
import glob
import json
import math
import mmap
import os
import platform
import shutil
import struct
import tempfile
import threading
import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.multiprocess import mark_process_dead as _mark_dead
from prometheus_client.utils import floatToGoString

import mlbuild

DIR_VAR = "MLBUILD_METRICS_DIR"
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216,
                67108864)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BATCH_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
KNOWN_PATHS = frozenset({"/", "/score", "/swagger.json", "/healthz/live", "/healthz/ready",
                         "/metrics"})
OTHER_ROUTE = "other"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE",
                     "PATCH"})
OTHER_METHOD = "_OTHER"  # OpenTelemetry's value for a method it does not know

DURATION = "http_server_request_duration_seconds"
ACTIVE = "http_server_active_requests"
REQUEST_SIZE = "http_server_request_body_size_bytes"
RESPONSE_SIZE = "http_server_response_body_size_bytes"
INFERENCE = "mlbuild_model_inference_duration_seconds"
INIT = "mlbuild_init_duration_seconds"
BUILD_INFO = "mlbuild_build_info"
BATCH_SIZE = "mlbuild_batch_size"
BATCH_WAIT = "mlbuild_batch_wait_seconds"
HELP = {
    DURATION: "Duration of HTTP server requests.",
    ACTIVE: "Number of active HTTP server requests.",
    REQUEST_SIZE: "Size of HTTP server request bodies.",
    RESPONSE_SIZE: "Size of HTTP server response bodies.",
    INFERENCE: "Time run() took (with adaptive batching: from the request's arrival in the "
               "queue to its result).",
    INIT: "Seconds init() took (the longest of the workers).",
    BUILD_INFO: "The mlbuild runtime serving this service.",
    BATCH_SIZE: "Requests scored together in one call (adaptive batching).",
    BATCH_WAIT: "Time a request waited in the queue for its batch to start.",
}

# -- the last minute of /score ------------------------------------------------------------
WINDOW_SECONDS = 60
QUANTILES = (0.5, 0.9, 0.99)
# Latency buckets of the window: 50 us times 2**(i/4), up to past 60 s (a bucket is 19 %
# wide, so a quantile read from it is within 19 %, interpolated inside it).
WINDOW_BOUNDS = tuple(50e-6 * 2 ** (i / 4) for i in range(82))
_CLASSES = 5  # 1xx .. 5xx
_SLOT = 1 + _CLASSES + len(WINDOW_BOUNDS) + 1  # stamp, classes, buckets, +Inf
_FIRST_BUCKET = 1 + _CLASSES
_time = time.time
_bisect = bisect.bisect_left
_WINDOW_BYTES = WINDOW_SECONDS * _SLOT * 8

SEGMENT = 1 << 20  # bytes of one metrics file (sparse until used)
_INT = struct.Struct("i")


def served_models(model_dir: str | None) -> tuple[str, str]:
    """``(model, version)`` labels for the models under ``model_dir``.

    One model mounted as ``.../NAME/VERSION`` (as mlbuild's images and process target do)
    gives ``(NAME, VERSION)``; the several-models layout ``NAME/VERSION/...`` gives the
    names and versions comma-separated in the same order; any other folder its own name
    and version ``""``; no folder ``("", "")``.
    """
    if not model_dir:
        return "", ""
    path = os.path.abspath(model_dir)
    if os.path.isfile(path):
        path = os.path.dirname(path)
    base, parent = os.path.basename(path), os.path.basename(os.path.dirname(path))
    if base.isdigit() and parent:
        return parent, base
    names, versions = [], []
    try:
        for name in sorted(os.listdir(path)):
            sub = os.path.join(path, name)
            if name.startswith(".") or not os.path.isdir(sub):
                continue
            for v in sorted((v for v in os.listdir(sub) if v.isdigit()), key=int):
                names.append(name)
                versions.append(v)
    except OSError:
        pass
    if names:
        return ",".join(names), ",".join(versions)
    return base, ""


# -- the folder ---------------------------------------------------------------------------
def prepare_dir(directory: str | None = None) -> tuple[str, bool]:
    """Make this service run's metrics folder ready before any worker starts, and export
    it as ``MLBUILD_METRICS_DIR`` for the workers.

    Args:
        directory: The folder to use (default: ``MLBUILD_METRICS_DIR``, else a new
            temporary one).

    Returns:
        ``(folder, made)``: ``made`` is True for a temporary folder, which the caller
        removes with :func:`remove_dir` when the run ends.

    Raises:
        OSError: The folder cannot be made or emptied.
    """
    directory = directory or os.environ.get(DIR_VAR)
    made = not directory
    if made:
        directory = tempfile.mkdtemp(prefix="mlbuild-metrics-")
    else:
        os.makedirs(directory, exist_ok=True)
        # NOTE: a previous run's files would be counted again (and a dead pid's never
        # goes away): the run starts from nothing.
        for stale in glob.glob(os.path.join(directory, "*.db")) + \
                glob.glob(os.path.join(directory, "window_*.bin")):
            os.unlink(stale)
    os.environ[DIR_VAR] = directory
    return directory, made


def remove_dir(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def mark_process_dead(pid: int, directory: str | None = None) -> None:
    """A worker exited: drop its in-flight gauge (its counts stay and keep counting)."""
    directory = directory or os.environ.get(DIR_VAR)
    if directory:
        _mark_dead(pid, directory)


# -- writing ------------------------------------------------------------------------------
class _File:
    """One per-process file in prometheus_client's multiprocess format (see the module
    docstring). Entries are added under a lock (the loader thread adds some); values are
    written in place through a memoryview of doubles, without one (only the event-loop
    thread writes them, and an aligned 8-byte store is never seen half-done).

    NOTE: an mmap cannot grow while a memoryview of it exists, so a file never grows:
    when its SEGMENT bytes are full, entries go on in a further file of the same process
    (``histogram_PID-1.db``; prometheus_client reads every ``*.db``).
    """

    def __init__(self, directory: str, prefix: str, pid: int):
        self._directory, self._prefix, self._pid = directory, prefix, pid
        self._lock = threading.Lock()
        self.positions: dict[str, tuple[memoryview, int]] = {}
        self._segments = 0
        self._open(f"{prefix}_{pid}.db")

    def _open(self, name: str) -> None:
        path = os.path.join(self._directory, name)
        with open(path, "a+b") as fh:
            if os.fstat(fh.fileno()).st_size < SEGMENT:
                fh.truncate(SEGMENT)
            m = mmap.mmap(fh.fileno(), SEGMENT)
        self._m = m
        self._v = memoryview(m).cast("d")
        self._used = _INT.unpack_from(m, 0)[0]
        if self._used == 0:
            self._used = 8
            m[0:4] = _INT.pack(8)
        else:  # a pid reused within the run: continue its numbers
            pos = 8
            while pos < self._used:
                n = _INT.unpack_from(m, pos)[0]
                key = m[pos + 4:pos + 4 + n].decode("utf-8")
                pos += 4 + n + (8 - (n + 4) % 8)
                self.positions[key] = (self._v, pos // 8)
                pos += 16

    def slots(self, keys: list[str]) -> tuple[memoryview, list[int]]:
        """Where the values of ``keys`` are: one memoryview of doubles and an index per
        key. New keys are added at 0, all in the same segment (a series' keys are always
        added together, so its values share one memoryview)."""
        with self._lock:
            found = [self.positions.get(k) for k in keys]
            if all(f is not None for f in found):
                return found[0][0], [i for _, i in found]
            entries = []
            for key in keys:
                encoded = key.encode("utf-8")
                padded = encoded + b" " * (8 - (len(encoded) + 4) % 8)
                entries.append(struct.pack(f"i{len(padded)}sdd", len(encoded), padded,
                                           0.0, 0.0))
            size = sum(len(e) for e in entries)
            if size + 8 > SEGMENT:
                raise ValueError(f"metric keys too long: {keys[0][:200]}")
            if self._used + size > SEGMENT:
                self._segments += 1
                self._open(f"{self._prefix}_{self._pid}-{self._segments}.db")
            m = self._m
            indexes = []
            for key, entry in zip(keys, entries):
                m[self._used:self._used + len(entry)] = entry
                self._used += len(entry)
                index = (self._used - 16) // 8
                self.positions[key] = (self._v, index)
                indexes.append(index)
            m[0:4] = _INT.pack(self._used)
            return self._v, indexes


def _key(metric: str, sample: str, labels: dict, help_text: str) -> str:
    return json.dumps([metric, sample, labels, help_text], sort_keys=True)


class _Histogram:
    """One labelled histogram series: counts per bucket (not cumulative, as
    prometheus_client's multiprocess files hold them) and the sum, updated in place."""

    __slots__ = ("bounds", "v", "buckets", "sum")

    def __init__(self, file: _File, name: str, bounds: tuple, labels: dict):
        self.bounds = bounds
        help_text = HELP[name]
        keys = [_key(name, f"{name}_bucket", dict(labels, le=floatToGoString(le)), help_text)
                for le in (*bounds, math.inf)]
        keys.append(_key(name, f"{name}_sum", labels, help_text))
        self.v, indexes = file.slots(keys)
        self.buckets, self.sum = indexes[:-1], indexes[-1]

    def observe(self, value: float) -> None:
        v = self.v
        v[self.buckets[bisect.bisect_left(self.bounds, value)]] += 1.0
        v[self.sum] += value


class _HttpSeries:
    """The three histograms of one (method, route, status), observed in one call: each
    as a tuple (values, bucket indexes, bounds, sum index) unpacked in place, which is
    ~0.3 us a request cheaper than three method calls."""

    __slots__ = ("_d", "_q", "_r")

    def __init__(self, file: _File, labels: dict):
        d = _Histogram(file, DURATION, BUCKETS, labels)
        q = _Histogram(file, REQUEST_SIZE, SIZE_BUCKETS, labels)
        r = _Histogram(file, RESPONSE_SIZE, SIZE_BUCKETS, labels)
        self._d = (d.v, d.buckets, d.bounds, d.sum)
        self._q = (q.v, q.buckets, q.bounds, q.sum)
        self._r = (r.v, r.buckets, r.bounds, r.sum)

    def observe(self, seconds: float, request_bytes: int | None,
                response_bytes: int | None) -> None:
        v, buckets, bounds, total = self._d
        v[buckets[_bisect(bounds, seconds)]] += 1.0
        v[total] += seconds
        if request_bytes is not None:
            v, buckets, bounds, total = self._q
            v[buckets[_bisect(bounds, request_bytes)]] += 1.0
            v[total] += request_bytes
        if response_bytes is not None:
            v, buckets, bounds, total = self._r
            v[buckets[_bisect(bounds, response_bytes)]] += 1.0
            v[total] += response_bytes


class _Window:
    """This process's per-second slots of ``/score`` answers: counts per status class
    and latency buckets, in ``window_PID.bin`` (int64s; readers sum every file's slots
    of the last minute)."""

    def __init__(self, path: str):
        with open(path, "a+b") as fh:
            if os.fstat(fh.fileno()).st_size < _WINDOW_BYTES:
                fh.truncate(_WINDOW_BYTES)
            self._m = mmap.mmap(fh.fileno(), _WINDOW_BYTES)
        self.v = memoryview(self._m).cast("q")

    def observe(self, status: int, seconds: float) -> None:
        now = int(_time())
        base = now % WINDOW_SECONDS * _SLOT
        v = self.v
        if v[base] != now:  # a new second in this slot: forget the minute-old one
            v[base + 1:base + _SLOT] = _ZEROS
            v[base] = now
        if 100 <= status < 600:
            v[base + status // 100] += 1
        v[base + _FIRST_BUCKET + _bisect(WINDOW_BOUNDS, seconds)] += 1


_ZEROS = memoryview(bytes(8 * (_SLOT - 1))).cast("q")


def read_window(directory: str, now: float | None = None) -> tuple[list[int], list[int]]:
    """The last minute of every process's slots in ``directory``: counts per status
    class (1xx..5xx) and per latency bucket (WINDOW_BOUNDS, then +Inf)."""
    now = int(now if now is not None else time.time())
    classes = [0] * _CLASSES
    buckets = [0] * (len(WINDOW_BOUNDS) + 1)
    for path in glob.glob(os.path.join(directory, "window_*.bin")):
        try:
            with open(path, "rb") as fh:
                data = fh.read(_WINDOW_BYTES)
        except OSError:
            continue
        if len(data) < _WINDOW_BYTES:
            continue
        v = memoryview(data).cast("q")
        for slot in range(WINDOW_SECONDS):
            base = slot * _SLOT
            if not now - WINDOW_SECONDS < v[base] <= now:
                continue
            for i in range(_CLASSES):
                classes[i] += v[base + 1 + i]
            row = v[base + 1 + _CLASSES:base + _SLOT]
            for i, n in enumerate(row):
                if n:
                    buckets[i] += n
    return classes, buckets


def quantile(q: float, buckets: list[int]) -> float:
    """The ``q`` quantile of window bucket counts, interpolated inside its bucket as
    Prometheus' histogram_quantile does; NaN without observations."""
    total = sum(buckets)
    if not total:
        return math.nan
    rank = q * total
    seen = 0
    for i, n in enumerate(buckets):
        if n and seen + n >= rank:
            if i >= len(WINDOW_BOUNDS):  # +Inf: the highest finite bound
                return WINDOW_BOUNDS[-1]
            lower = WINDOW_BOUNDS[i - 1] if i else 0.0
            return lower + (WINDOW_BOUNDS[i] - lower) * (rank - seen) / n
        seen += n
    return WINDOW_BOUNDS[-1]


# -- the process's metrics ----------------------------------------------------------------
class Metrics:
    """This process's metrics, written to the run's folder; :meth:`render` shows every
    process's.

    Observations come from the event-loop thread only (entries may be added from the
    loader thread too: those take the file's lock).
    """

    def __init__(self, directory: str | None = None, *, service: str | None = None,
                 model_dir: str | None = None):
        """Open this process's files.

        Args:
            directory: The run's folder (default: ``MLBUILD_METRICS_DIR``; without it --
                an app embedded in a test -- a private temporary folder).
            service: The ``service`` label of ``mlbuild_build_info``.
            model_dir: Where the models are (the inference histogram's labels).
        """
        directory = directory or os.environ.get(DIR_VAR)
        if not directory:
            directory = tempfile.mkdtemp(prefix="mlbuild-metrics-")
            atexit.register(remove_dir, directory)
        self.directory = directory
        pid = os.getpid()
        self._hist = _File(directory, "histogram", pid)
        self._live = _File(directory, "gauge_livesum", pid)
        self._max = _File(directory, "gauge_max", pid)
        self._window = _Window(os.path.join(directory, f"window_{pid}.bin"))
        self._series: dict[tuple[str, str, int], _HttpSeries] = {}
        self._active: dict[str, tuple[memoryview, int]] = {}  # method -> its value
        model, version = served_models(model_dir)
        self._inference = _Histogram(self._hist, INFERENCE, BUCKETS,
                                     {"model": model, "version": version})
        self.batch_sizes: _Histogram | None = None
        self.batch_waits: _Histogram | None = None
        v, (info, self._init) = self._max.slots([
            _key(BUILD_INFO, BUILD_INFO, {"version": mlbuild.__version__,
                                          "python": platform.python_version(),
                                          "service": service or ""}, HELP[BUILD_INFO]),
            _key(INIT, INIT, {}, HELP[INIT])])
        v[info] = 1.0
        self._init_v = v
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_Collector(directory))

    # -- the hot path ---------------------------------------------------------------------
    def begin(self, method: str) -> None:
        """A request starts (``http_server_active_requests``)."""
        slot = self._active.get(method)
        if slot is None:
            slot = self._active_slot(method)
        slot[0][slot[1]] += 1.0

    def _active_slot(self, method: str) -> tuple[memoryview, int]:
        if len(self._active) > 100:  # keyed by what clients send: bounded
            self._active.clear()
        label = method if method in METHODS else OTHER_METHOD
        v, (i,) = self._live.slots([_key(ACTIVE, ACTIVE, {"http_request_method": label},
                                         HELP[ACTIVE])])
        slot = self._active[method] = (v, i)
        return slot

    def observe(self, method: str, path: str, status: int, seconds: float,
                request_bytes: int | None = None, response_bytes: int | None = None) -> None:
        """A request ended (after :meth:`begin` with the same ``method``)."""
        slot = self._active.get(method)
        if slot is None:  # cleared since begin()
            slot = self._active_slot(method)
        slot[0][slot[1]] -= 1.0
        route = path if path in KNOWN_PATHS else OTHER_ROUTE
        series = self._series.get((method, route, status))
        if series is None:
            series = self._new_series(method, route, status)
        series.observe(seconds, request_bytes, response_bytes)
        if route == "/score":
            self._window.observe(status, seconds)

    def _new_series(self, method: str, route: str, status: int) -> _HttpSeries:
        if len(self._series) > 1000:  # keyed by the method as sent: bounded
            self._series.clear()
        labels = {"http_request_method": method if method in METHODS else OTHER_METHOD,
                  "http_route": route, "http_response_status_code": str(status)}
        series = self._series[(method, route, status)] = _HttpSeries(self._hist, labels)
        return series

    def observe_inference(self, seconds: float) -> None:
        """run() answered (or raised) after ``seconds``."""
        self._inference.observe(seconds)

    # -- the rest -------------------------------------------------------------------------
    def init_done(self, seconds: float) -> None:
        """init() took ``seconds`` in this process."""
        self._init_v[self._init] = seconds

    def enable_batching(self) -> None:
        """Show the batch histograms (empty until the first batch)."""
        if self.batch_sizes is None:
            self.batch_waits = _Histogram(self._hist, BATCH_WAIT, BATCH_WAIT_BUCKETS, {})
            self.batch_sizes = _Histogram(self._hist, BATCH_SIZE, BATCH_SIZE_BUCKETS, {})

    def observe_batch(self, size: int, waits: list[float]) -> None:
        """A batch of ``size`` requests starts; ``waits``: seconds each was queued."""
        if self.batch_sizes is None:
            self.enable_batching()
        self.batch_sizes.observe(size)
        observe = self.batch_waits.observe
        for seconds in waits:
            observe(seconds)

    def render(self) -> bytes:
        """The whole service's metrics (every process's files), as Prometheus text."""
        return generate_latest(self._registry)


class _Collector:
    """Merges the run's files (prometheus_client) and adds the aliases and the window."""

    def __init__(self, directory: str):
        self._dir = directory

    def collect(self):
        files = glob.glob(os.path.join(self._dir, "*.db"))
        families = MultiProcessCollector.merge(files, accumulate=True)
        duration = None
        for family in families:
            if family.name == DURATION:
                duration = family
            yield family
        yield from _aliases(duration)
        yield from _window_families(self._dir)


def _aliases(duration: Metric | None):
    """The old names, from the duration histogram (kept one release; see README)."""
    requests = Metric("mlbuild_requests", "HTTP requests by method, path and status "
                      "(deprecated: http_server_request_duration_seconds_count).", "counter")
    score = Metric("mlbuild_score_duration_seconds", "Time to answer POST /score "
                   "(deprecated: http_server_request_duration_seconds{http_route=\"/score\"}).",
                   "histogram")
    score_buckets: dict[str, float] = {}
    score_sum = score_count = 0.0
    for s in duration.samples if duration is not None else ():
        labels = s.labels
        if s.name.endswith("_count"):
            requests.add_sample("mlbuild_requests_total", {
                "method": labels["http_request_method"], "path": labels["http_route"],
                "status": labels["http_response_status_code"]}, s.value)
        if labels.get("http_route") != "/score":
            continue
        if s.name.endswith("_bucket"):
            score_buckets[labels["le"]] = score_buckets.get(labels["le"], 0.0) + s.value
        elif s.name.endswith("_sum"):
            score_sum += s.value
        elif s.name.endswith("_count"):
            score_count += s.value
    for le in (*BUCKETS, math.inf):
        text = floatToGoString(le)
        score.add_sample("mlbuild_score_duration_seconds_bucket", {"le": text},
                         score_buckets.get(text, 0.0))
    score.add_sample("mlbuild_score_duration_seconds_count", {}, score_count)
    score.add_sample("mlbuild_score_duration_seconds_sum", {}, score_sum)
    yield requests
    yield score


def _window_families(directory: str):
    classes, buckets = read_window(directory)
    requests = GaugeMetricFamily(
        "mlbuild_recent_requests", f"Answers of /score in the last {WINDOW_SECONDS} s, by "
        "status class (all workers).", labels=["status_class"])
    for i, n in enumerate(classes):
        requests.add_metric([f"{i + 1}xx"], n)
    latency = GaugeMetricFamily(
        "mlbuild_recent_request_duration_seconds", f"Quantiles of the time to answer "
        f"/score over the last {WINDOW_SECONDS} s (all workers; NaN without requests).",
        labels=["quantile"])
    for q in QUANTILES:
        latency.add_metric([str(q)], quantile(q, buckets))
    yield requests
    yield latency
    yield GaugeMetricFamily("mlbuild_recent_window_seconds", "The window of the "
                            "mlbuild_recent_* gauges.", value=WINDOW_SECONDS)

