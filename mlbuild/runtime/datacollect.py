"""Model data collection: ``azureml.monitoring.ModelDataCollector`` for v1 scoring scripts.

A v1 script keeps its ``from azureml.monitoring import ModelDataCollector`` (compat.py
serves that module from here when the real package is absent) and its calls::

    inputs_dc = ModelDataCollector("ridge", designation="inputs", feature_names=["a", "b"])
    correlations = inputs_dc.collect(rows)             # a dict for "inputs", as Azure
    preds_dc.collect(preds_dc.add_correlations(preds, correlations))

Switched on by ``MLBUILD_COLLECT_MODEL_DATA=1`` (or Azure's own
``AML_MODEL_DC_STORAGE_ENABLED=true``; ``AML_MODEL_DC_DEBUG=true`` switches it on with
records on stdout, as Azure's debug mode printed them). Off, ``collect()`` returns None at
once, as Azure's did when collection was off. Records go to ``MLBUILD_MODEL_DATA_DIR``, as
JSON lines, one per ``collect()`` call::

    DIR/{service}/{model}/{version}/{designation}/{yyyy}/{mm}/{dd}/data.jsonl
    {"mlbuild_model_data": 1, "timestamp": "2026-12-05T10:11:12.345678Z",
     "correlation_id": "...", "request_id": "...", "service": "diabetes", "model": "ridge",
     "model_version": "3", "designation": "inputs", "data": [{"a": 1, "b": 2}, ...]}

``-`` (also the default) writes the same lines to stdout, where the runtime's log lines
(``2026-... I [pid] azmlinfsrv - ...``) never start with ``{"mlbuild_model_data"``.
``service`` is ``MLBUILD_SERVICE_NAME`` (else azmlinfsrv's ``SERVICE_NAME``, else
"default"); ``version`` is the model's version in the model dir (``MODEL_DIR/NAME/VERSION``
with several models, ``.../NAME/VERSION`` as the model dir with one), else "unknown";
the date is the record's, in UTC. ``request_id`` is the ``x-request-id`` of the request
whose run() (or the generator it returned, as it streams) called collect()
(compat.CURRENT_REQUEST_ID; null outside a request and in batched runs, whose one run()
serves several requests).

NOTE on the request path: ``collect()`` turns the data into plain lists (numpy's
``tolist``, a DataFrame's columns and values) -- so a script may reuse its buffers at
once -- and puts one record on a bounded queue (``MLBUILD_MODEL_DATA_QUEUE``, default
10000): ~12 us for an "inputs" call with a 2x3 array (what Azure's did on the request
path, CSV conversion, cost at least as much). A background thread serialises and appends the records in batches, a record
waiting at most ``MLBUILD_MODEL_DATA_INTERVAL`` seconds (default 1); one ``write`` per file
and batch, with ``O_APPEND``, so several workers can share a file. A full queue, a full
disk or an unwritable folder drops records and counts them (:func:`stats`,
:data:`COUNTERS`), with one log line a minute at most; a request never waits for a disk
and never fails because of one. At exit (SIGTERM too: the runtime ends
through ``atexit``) what is queued is written, for up to ``MLBUILD_MODEL_DATA_FLUSH_S``
seconds (default 5), and a summary line is logged.

Differences from Azure, on purpose: JSON lines instead of CSV, a local folder (or stdout)
instead of blob storage (no ``AML_MODEL_DC_STORAGE`` upload), no ``{workspace}`` level in
the path, no SIGTERM handler of its own (Azure's replaced the server's with
``sys.exit(0)``), and a list of lists or of dicts is rows (Azure wrote a list as one row).
"""

from __future__ import annotations

import atexit
import datetime
import json
import logging
import math
import os
import queue
import random
import sys
import threading
import time
import uuid

from mlbuild.runtime import compat
from mlbuild.runtime.models import model_dir

log = logging.getLogger("azmlinfsrv.model_data")

RECORD_KEY = "mlbuild_model_data"  # first key of every line, value: the format version
RECORD_VERSION = 1
STDOUT = "-"
DEFAULT_QUEUE = 10000
DEFAULT_FLUSH_TIMEOUT = 5.0
FLUSH_INTERVAL = 1.0  # seconds a record may wait in the writer before it is written
MAX_BATCH = 2000  # records written at once at most
LOG_EVERY = 60.0  # seconds between two "dropping records" lines

# Azure's designations; "default" is "general" there too.
DESIGNATIONS = ("inputs", "predictions", "labels", "signals", "general")
# The correlation columns Azure appends (collect() on "inputs", add_correlations()).
CORRELATION_ID = "$aml_dc_correlation_id"
SCORING_TIMESTAMP = "$aml_dc_scoring_timestamp"
BOUNDARY = "$aml_dc_boundary"
WORKSPACE = "$aml_workspace"
SERVICE_NAME = "$aml_service_name"
MODEL_NAME = "$aml_model_name"
MODEL_VERSION = "$aml_model_version"
REQUEST_ID = "$aml_request_id"
CORRELATION_HEADERS = (CORRELATION_ID, SCORING_TIMESTAMP, BOUNDARY, WORKSPACE, SERVICE_NAME,
                       MODEL_NAME, MODEL_VERSION, REQUEST_ID)
NO_REQUEST_ID = "00000000-0000-0000-0000-000000000000"  # Azure's, outside a request
DAY_MINUTES = 60 * 24


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def enabled(environ=None) -> bool:
    """Whether collection is on: ``MLBUILD_COLLECT_MODEL_DATA``, else Azure's variables."""
    env = os.environ if environ is None else environ
    ours = env.get("MLBUILD_COLLECT_MODEL_DATA")
    if ours is not None and ours.strip() != "":
        return _truthy(ours)
    return _truthy(env.get("AML_MODEL_DC_STORAGE_ENABLED")) or \
        _truthy(env.get("AML_MODEL_DC_DEBUG"))


def destination(environ=None) -> str:
    """``MLBUILD_MODEL_DATA_DIR``, or ``-`` (stdout) when unset."""
    env = os.environ if environ is None else environ
    return env.get("MLBUILD_MODEL_DATA_DIR") or STDOUT


def _env_number(name: str, default, kind):
    raw = os.environ.get(name)
    try:
        value = kind(raw) if raw else default
    except ValueError:
        log.warning("%s=%r is not a number; using %s", name, raw, default)
        return default
    return value if value > 0 else default


# -- counters --------------------------------------------------------------------------
class Counters:
    """Records written and dropped by this process (read by /metrics)."""

    __slots__ = ("written", "dropped", "_lock")

    def __init__(self):
        self.written = 0
        self.dropped = 0
        self._lock = threading.Lock()

    def add(self, written: int = 0, dropped: int = 0) -> None:
        with self._lock:
            self.written += written
            self.dropped += dropped


COUNTERS = Counters()


def stats() -> dict:
    """``{"written": N, "dropped": M}``: records of this process since it started."""
    return {"written": COUNTERS.written, "dropped": COUNTERS.dropped}


# -- converting what a script collects -------------------------------------------------
class Unsupported(TypeError):
    """Data of a kind Azure's collector did not take either."""


def to_rows(data, feature_names=None) -> list:
    """Plain rows of ``data``: a dict per row when there are names, else a list.

    A list is one row (as Azure wrote it), unless it holds lists, tuples, dicts or numpy
    arrays: then each is a row. A dict is one row. A numpy array: 1-D one row, 2-D a row
    per line. A pandas DataFrame (or anything with ``toPandas()``, as Spark's) a dict per
    row, keyed by its columns. With ``feature_names`` a row of the same length becomes a
    dict (a DataFrame's own columns win).

    Raises:
        Unsupported: Anything else (a string, a number, None...).
    """
    return _convert(data, feature_names)[0]


def _convert(data, feature_names=None, correlated: bool = False) -> tuple[list, dict | None]:
    """:func:`to_rows`, and the correlation values Azure's add_correlations() appended
    (taken out of the rows; see :func:`_split_correlations`)."""
    names = None
    if isinstance(data, (list, tuple)):
        if data and all(isinstance(r, (list, tuple, dict)) or _is_array(r, 1) for r in data):
            rows = [r.copy() if isinstance(r, dict) else r.tolist() if _is_array(r, 1)
                    else list(r) for r in data]
        else:
            rows = [list(data)]
    elif isinstance(data, dict):
        rows = [dict(data)]
    elif hasattr(data, "columns") and hasattr(data, "to_numpy"):  # pandas.DataFrame
        names = [str(c) for c in data.columns.tolist()]
        rows = [dict(zip(names, r)) for r in data.to_numpy(dtype=object).tolist()]
    elif hasattr(data, "toPandas"):  # pyspark.sql.DataFrame, as Azure took it
        return _convert(data.toPandas(), feature_names, correlated)
    elif _is_array(data, 0):  # numpy.ndarray
        if data.ndim == 0:
            rows = [[data.item()]]
        elif data.ndim == 1:
            rows = [data.tolist()]
        else:
            rows = data.tolist()
    else:
        raise Unsupported(f"cannot collect {type(data).__name__}: expected a list, a numpy "
                          "array or a pandas DataFrame")
    rows, carried = _split_correlations(rows, correlated)
    if feature_names and names is None:
        width = len(feature_names)
        rows = [dict(zip(feature_names, r)) if isinstance(r, list) and len(r) == width else r
                for r in rows]
    return rows, carried


def _is_array(value, min_ndim: int) -> bool:
    """Whether ``value`` is a numpy array (duck-typed: numpy is not imported here)."""
    return hasattr(value, "tolist") and getattr(value, "ndim", -1) >= min_ndim \
        and not isinstance(value, (str, bytes))


def _split_correlations(rows: list, correlated: bool) -> tuple[list, dict | None]:
    """Rows without Azure's correlation columns, and those columns' values (first row).

    Named rows lose their ``$aml_*`` keys. A list row loses its last eight values when
    this collector's add_correlations() appended them (``correlated``) and they look it.
    """
    found = None
    out = []
    for row in rows:
        if isinstance(row, dict) and CORRELATION_ID in row:
            values = {h: row.pop(h) for h in CORRELATION_HEADERS if h in row}
            found = found or values
        elif correlated and isinstance(row, list) and len(row) >= 8 and \
                isinstance(row[-8], str) and isinstance(row[-1], str) and \
                row[-6] in (60, DAY_MINUTES):
            found = found or dict(zip(CORRELATION_HEADERS, row[-8:]))
            row = row[:-8]
        out.append(row)
    return out, found


def _json_default(value):
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, (set, frozenset)):
        return list(value)
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    return str(value)


def _finite(value):
    """``value`` with every NaN and infinity replaced by None (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def dumps(record: dict) -> str:
    """One JSON line (strict JSON: NaN and infinities become null)."""
    try:
        return json.dumps(record, default=_json_default, allow_nan=False,
                          ensure_ascii=False) + "\n"
    except ValueError:
        return json.dumps(_finite(record), default=_json_default, ensure_ascii=False) + "\n"


# -- where the records go --------------------------------------------------------------
def _safe_part(text) -> str:
    """A path component from a name: no separators, never "." or ".."."""
    part = str(text).replace("/", "_").replace("\\", "_").replace("\0", "_").strip()
    return part if part not in ("", ".", "..") else "_"


def record_path(record: dict) -> str:
    """``{service}/{model}/{version}/{designation}/{yyyy}/{mm}/{dd}/data.jsonl``."""
    day = record["timestamp"][:10]  # YYYY-MM-DD
    return os.path.join(_safe_part(record["service"]), _safe_part(record["model"]),
                        _safe_part(record["model_version"]),
                        _safe_part(record["designation"]),
                        day[0:4], day[5:7], day[8:10], "data.jsonl")


class Sink:
    """A bounded queue of records and the thread that writes them (see the module doc).

    ``put`` never blocks and never raises; ``close`` writes what is queued, for up to a
    timeout.
    """

    def __init__(self, target: str, queue_size: int = DEFAULT_QUEUE,
                 interval: float = FLUSH_INTERVAL, counters: Counters = COUNTERS):
        self.target = target
        self.interval = interval
        self.counters = counters
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._closed = False
        self._made: set[str] = set()
        self._log_lock = threading.Lock()
        self._last_log = -math.inf
        self._unlogged = 0  # drops since the last log line
        self._failing = False
        self._in_flight = 0  # records the writer holds, being written
        self._thread = threading.Thread(target=self._work, name="mlbuild-model-data",
                                        daemon=True)
        self._thread.start()

    def put(self, record: dict) -> bool:
        if self._closed:
            self._dropped(1, "collection has stopped (the service is shutting down)")
            return False
        try:
            self._queue.put_nowait(record)
            return True
        except queue.Full:
            self._dropped(1, f"the queue is full ({self._queue.maxsize} records waiting to "
                             "be written; MLBUILD_MODEL_DATA_QUEUE)")
            return False

    def _dropped(self, n: int, why: str) -> None:
        """Count ``n`` dropped records; log it, once a minute at most."""
        self.counters.add(dropped=n)
        with self._log_lock:
            self._unlogged += n
            now = time.monotonic()
            if now - self._last_log < LOG_EVERY:
                return
            self._last_log = now
            n, self._unlogged = self._unlogged, 0
        log.error("model data: dropped %d record(s) (%d in all; at most one such line a "
                  "minute): %s", n, self.counters.dropped, why)

    # -- the writer thread ------------------------------------------------------------
    def _work(self) -> None:
        # NOTE: the writer sleeps, then takes what queued up, rather than waiting on the
        # queue: a thread woken by every put() would take the GIL from the request
        # thread each time (measured: 35 us instead of 10 us a collect() here).
        while True:
            stopping = self._stop.wait(self.interval)
            while True:
                batch = []
                try:
                    while len(batch) < MAX_BATCH:
                        batch.append(self._queue.get_nowait())
                except queue.Empty:
                    pass
                if not batch:
                    break
                self._in_flight = len(batch)
                try:
                    self._write(batch)
                except Exception as exc:  # noqa: BLE001 - the writer must outlive any record
                    self._dropped(len(batch), f"{type(exc).__name__}: {exc}")
                self._in_flight = 0
            if stopping:
                return

    def _write(self, batch: list) -> None:
        if self.target == STDOUT:
            text = "".join(dumps(r) for r in batch)
            try:
                sys.stdout.write(text)
                sys.stdout.flush()
            except (OSError, ValueError) as exc:
                self._dropped(len(batch), f"cannot write to stdout: {exc}")
                return
            self.counters.add(written=len(batch))
            return
        groups: dict[str, list[str]] = {}
        for record in batch:
            groups.setdefault(record_path(record), []).append(dumps(record))
        for rel, lines in groups.items():
            path = os.path.join(self.target, rel)
            try:
                self._append(path, "".join(lines).encode("utf-8"))
            except OSError as exc:
                self._failing = True
                self._dropped(len(lines), f"cannot write {path}: {exc.strerror or exc}")
                continue
            if self._failing:
                self._failing = False
                log.warning("model data: writing again (%s); %d record(s) dropped so far",
                            path, self.counters.dropped)
            self.counters.add(written=len(lines))

    def _append(self, path: str, data: bytes) -> None:
        folder = os.path.dirname(path)
        if folder not in self._made:
            os.makedirs(folder, exist_ok=True)
            self._made.add(folder)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o644)
        except FileNotFoundError:  # the folder went away since (a clean-up): make it again
            os.makedirs(folder, exist_ok=True)
            fd = os.open(path, flags, 0o644)
        try:
            view = memoryview(data)
            while view:  # one write() almost always; more only after a short write
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)

    def close(self, timeout: float = DEFAULT_FLUSH_TIMEOUT) -> bool:
        """Stop taking records, write what is queued; False when ``timeout`` ran out."""
        self._closed = True
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():  # a write hangs (a stuck network disk...)
            left = self._queue.qsize() + self._in_flight
            self.counters.add(dropped=left)
            log.error("model data: %d record(s) not written within %gs at exit",
                      left, timeout)
            return False
        return True


_SINK: Sink | None = None
_SINK_LOCK = threading.Lock()


def sink() -> Sink:
    """The process's sink, started at the first use (and closed at exit)."""
    global _SINK
    if _SINK is None:
        with _SINK_LOCK:
            if _SINK is None:
                target = destination()
                new = Sink(target,
                           queue_size=_env_number("MLBUILD_MODEL_DATA_QUEUE", DEFAULT_QUEUE,
                                                  int),
                           interval=_env_number("MLBUILD_MODEL_DATA_INTERVAL", FLUSH_INTERVAL,
                                                float))
                log.info("model data collection on: records to %s",
                         "stdout" if target == STDOUT else target)
                atexit.register(_close_at_exit, new)
                compat.set_request_tagging(True)
                _SINK = new
    return _SINK


def _close_at_exit(s: Sink) -> None:
    s.close(_env_number("MLBUILD_MODEL_DATA_FLUSH_S", DEFAULT_FLUSH_TIMEOUT, float))
    log.info("model data: %d record(s) written, %d dropped",
             s.counters.written, s.counters.dropped)


# -- the service's models ----------------------------------------------------------------
def find_model_version(name: str) -> str:
    """The version of model ``name`` in the model dir (the highest present), or "unknown"."""
    root = model_dir()
    if not root:
        return "unknown"
    try:
        named = os.path.join(root, name)
        if os.path.isdir(named):
            versions = [v for v in os.listdir(named)
                        if v.isdigit() and os.path.isdir(os.path.join(named, v))]
            if versions:
                return max(versions, key=int)
        parent, last = os.path.split(os.path.normpath(os.path.abspath(root)))
        if os.path.basename(parent) == name and last.isdigit():  # one model: NAME/VERSION
            return last
    except OSError:
        pass
    return "unknown"


def service_name() -> str:
    return os.environ.get("MLBUILD_SERVICE_NAME") or os.environ.get("SERVICE_NAME") \
        or "default"


def new_id() -> str:
    """A random (version 4) UUID. NOTE: from ``random``, not ``os.urandom`` as uuid4():
    a correlation id needs no secrecy, and urandom's system call took 5 us here."""
    return str(uuid.UUID(int=random.getrandbits(128), version=4))


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


# -- the Azure class -------------------------------------------------------------------
class ModelDataCollector:
    """``azureml.monitoring.ModelDataCollector`` (azureml-monitoring 0.1.0a21's signature).

    Args:
        model_name: The model the data belongs to: the ``{model}`` in the path.
        designation: "inputs", "predictions", "labels", "signals" or "general"
            ("default" is "general"). Any other value: a warning, and nothing is
            collected (as Azure did).
        feature_names: Names of the columns: each row of a list or array becomes a dict.
        workspace: Azure's ``subscription/resource_group/workspace``; kept in the record
            when given, not in the path.
        webservice_name: The ``{service}``; default the service's name.
        model_version: The ``{version}``; default the model's version in the model dir.
        collection_name: Kept in the record ("collection") for "signals" and "general".
        **kwargs: Accepted and ignored (forward compatibility).
    """

    AML_DC_CORRELATION_HEADER = CORRELATION_ID
    AML_DC_SCORING_TIMESTAMP_HEADER = SCORING_TIMESTAMP
    AML_DC_BOUNDARY_HEADER = BOUNDARY
    AML_WORKSPACE_HEADER = WORKSPACE
    AML_SERVICE_NAME_HEADER = SERVICE_NAME
    AML_MODEL_NAME_HEADER = MODEL_NAME
    AML_MODEL_VERSION_HEADER = MODEL_VERSION
    AML_REQUEST_ID_HEADER = REQUEST_ID

    def __init__(self, model_name, designation="default", feature_names=None,
                 workspace="default/default/default", webservice_name="default",
                 model_version="default", collection_name="default", **kwargs):
        self.model_name = model_name
        self.workspace = str(workspace).lower()
        self.feature_names = list(feature_names) if feature_names is not None else None
        self.collection_name = collection_name
        self._correlated = False
        self._warned = False
        self._designation = "general" if designation == "default" else designation
        self._active = enabled()
        if self._designation not in DESIGNATIONS:
            log.warning("ModelDataCollector(%r, designation=%r): not a designation Azure "
                        "supports (%s); nothing will be collected", model_name, designation,
                        ", ".join(("default",) + DESIGNATIONS))
            self._active = False
        self.service_name = service_name() if webservice_name == "default" \
            else str(webservice_name)
        self.model_version = find_model_version(str(model_name)) \
            if model_version == "default" else str(model_version)
        self._sink = sink() if self._active else None

    @property
    def designation(self) -> str:
        return self._designation

    def _correlations(self, user_correlation_id, request_id, now) -> dict:
        generated = new_id()
        return {
            SCORING_TIMESTAMP: now.replace(tzinfo=None).isoformat(),  # Azure's: no zone
            REQUEST_ID: request_id or NO_REQUEST_ID,
            CORRELATION_ID: f"{user_correlation_id}-{generated}" if user_correlation_id
            else generated,
            BOUNDARY: DAY_MINUTES,
            WORKSPACE: self.workspace,
            SERVICE_NAME: self.service_name,
            MODEL_NAME: self.model_name,
            MODEL_VERSION: self.model_version,
        }

    def collect(self, input_data, user_correlation_id=""):
        """Queue ``input_data`` to be written (see the module doc); never raises.

        Args:
            input_data: A list, numpy array or pandas DataFrame.
            user_correlation_id: Prefix of the generated correlation id (as Azure).

        Returns:
            For the "inputs" designation the correlation dict Azure returned (the
            ``$aml_*`` keys: correlation id, timestamp, request id...), to hand to another
            collector's :meth:`add_correlations`; else None. None whenever collection is
            off, as Azure's.
        """
        if not self._active:
            return None
        try:
            rows, carried = _convert(input_data, self.feature_names, self._correlated)
        except Unsupported as exc:
            if not self._warned:
                self._warned = True
                log.warning("ModelDataCollector(%r, %r).collect: %s; not collected",
                            self.model_name, self._designation, exc)
            return None
        except Exception as exc:  # noqa: BLE001 - a script's data must not fail its request
            self._sink._dropped(1, f"cannot convert the data: {type(exc).__name__}: {exc}")
            return None
        rid = compat.CURRENT_REQUEST_ID.get()
        if isinstance(rid, bytes):
            rid = rid.decode("latin-1")
        returned = None
        now = _utc_now()
        if self._designation == "inputs":
            returned = self._correlations(user_correlation_id, rid, now)
        if carried:  # rows another collector's collect() correlated: keep its id
            correlation_id = str(carried.get(CORRELATION_ID))
            if not rid and carried.get(REQUEST_ID) not in (None, NO_REQUEST_ID):
                rid = str(carried[REQUEST_ID])
        elif returned:
            correlation_id = returned[CORRELATION_ID]
        else:
            correlation_id = f"{user_correlation_id}-{new_id()}" if user_correlation_id \
                else new_id()
        record = {
            RECORD_KEY: RECORD_VERSION,
            "timestamp": now.isoformat().replace("+00:00", "Z"),
            "correlation_id": correlation_id,
            "request_id": rid,
            "service": self.service_name,
            "model": self.model_name,
            "model_version": self.model_version,
            "designation": self._designation,
        }
        if self._designation in ("signals", "general") and self.collection_name != "default":
            record["collection"] = self.collection_name
        if self.workspace != "default/default/default":
            record["workspace"] = self.workspace
        record["data"] = rows
        self._sink.put(record)
        return returned

    def add_correlations(self, input_data, correlations):
        """``input_data`` with Azure's eight correlation columns appended (what Azure's
        did: values at the end of a list, columns of a numpy array or DataFrame).
        ``collect()`` on the result records them as the record's correlation id and
        request id instead of as data."""
        if correlations is None:
            return input_data
        self._correlated = True
        values = [correlations.get(h) for h in CORRELATION_HEADERS]
        if isinstance(input_data, list):
            return input_data + values
        if hasattr(input_data, "columns") and hasattr(input_data, "insert"):  # pandas
            frame = input_data.copy(deep=False)
            at = len(frame.columns)
            for i, (name, value) in enumerate(zip(CORRELATION_HEADERS, values)):
                frame.insert(at + i, name, value)
            return frame
        if hasattr(input_data, "ndim") and hasattr(input_data, "shape"):  # numpy
            import numpy as np

            array = np.array([input_data]) if input_data.ndim == 1 else input_data
            extra = np.repeat(np.array([values], dtype=object), array.shape[0], axis=0)
            return np.append(array, extra, axis=1)
        log.warning("ModelDataCollector.add_correlations: cannot add to %s; unchanged",
                    type(input_data).__name__)
        return input_data
