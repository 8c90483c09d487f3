"""Runtime configuration: two frozen objects, read from the environment and the CLI.

:class:`RuntimeConfig` says what the app serves and how it answers; :class:`ServerOptions`
says where and how the process listens (ports, workers, replacement support, limits on
request heads and keep-alive).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace

DEFAULT_PORT = 5001
DEFAULT_HEALTH_PORT = 5000  # azmlinfsrv's, with SEPERATE_HEALTH_ENDPOINT=true
DEFAULT_GRACEFUL_TIMEOUT = 30.0  # seconds; Kubernetes' default grace period
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
# Request heads (see headlimits.py). 32 KiB is what nginx (and so ingress-nginx) accepts
# by default (4 buffers of 8 KiB): whatever a default front proxy passes, we take. 10 s
# for a head of a few hundred bytes is ages for any real client, and a slow connection
# is gone within it.
DEFAULT_MAX_HEADER_BYTES = 32 * 1024
MIN_MAX_HEADER_BYTES = 1024
DEFAULT_HEADER_TIMEOUT = 10.0  # seconds
DEFAULT_KEEPALIVE_TIMEOUT = 5.0  # seconds; uvicorn's default
DISPATCH_MODES = ("inline", "thread")
DEFAULT_MAX_REQUEST_WAIT_MS = 500
DEFAULT_START_HOLD = 300.0  # seconds a request may wait for init() to return
DEFAULT_BATCH_MAX_LATENCY_MS = 10.0  # with MLBUILD_BATCH_MAX_SIZE and no latency given
LOG_LEVELS = ("debug", "info", "warning", "error")
_LOG_LEVEL_ALIASES = {"warn": "warning", "critical": "error", "fatal": "error"}


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in (value or "").split(",") if p.strip())


def _bool(value: str | None, default: bool) -> bool:
    if value is None or value == "":
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def _number(env, name: str, kind=float):
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected a number") from None


def _positive(env, name: str) -> int | None:
    value = _number(env, name, int)
    if value is not None and value < 1:
        raise ValueError(f"{name}={value}: give 1 or more (unset for no cap)")
    return value


def _wait_ms(env) -> int:
    value = _number(env, "MLBUILD_MAX_REQUEST_WAIT_MS", int)
    if value is not None and value < 0:
        raise ValueError(f"MLBUILD_MAX_REQUEST_WAIT_MS={value}: give 0 or more")
    return DEFAULT_MAX_REQUEST_WAIT_MS if value is None else value


def _batch_size(env) -> int | None:
    value = _number(env, "MLBUILD_BATCH_MAX_SIZE", int)
    if value is not None and value < 1:
        raise ValueError(f"MLBUILD_BATCH_MAX_SIZE={value}: give 1 or more (unset for no "
                         "batching)")
    return value


def _batch_latency_ms(env) -> float:
    value = _number(env, "MLBUILD_BATCH_MAX_LATENCY_MS")
    if value is None:
        return DEFAULT_BATCH_MAX_LATENCY_MS
    if not 0 <= value < math.inf:
        raise ValueError(f"MLBUILD_BATCH_MAX_LATENCY_MS={value}: give 0 or more milliseconds")
    return value


def _workers(env) -> int | None:
    """MLBUILD_WORKERS (else azmlinfsrv's WORKER_COUNT): a number, or ``auto`` for
    :func:`available_cpus`."""
    for name in ("MLBUILD_WORKERS", "WORKER_COUNT"):
        value = (env.get(name) or "").strip()
        if value.lower() == "auto":
            return available_cpus()
        if value and (n := _number(env, name, int)):
            return n
    return None


def available_cpus(root: str = "/", affinity: int | None = None) -> int:
    """The CPUs this process may use: the smaller of its CPU affinity and its cgroup's
    CPU quota (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, the
    tightest of the process's own cgroup and its ancestors), rounded up, at least 1.

    Rounded up: a container limited to 1.5 CPUs gets 2 workers, which keep its quota
    busy where one would leave half of it unused (the quota throttles the excess, it
    does not add memory). ``services.NAME.workers: auto`` on every target.

    Args:
        root: the file system root ``proc/self/cgroup`` and ``sys/fs/cgroup`` are read
            under (a test's fake tree).
        affinity: the number of CPUs of the affinity mask (default: this process's).
    """
    if affinity is None:
        try:
            affinity = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not on Linux
            affinity = os.cpu_count() or 1
    quota = _cgroup_cpu_quota(root)
    cpus = affinity if quota is None else min(affinity, math.ceil(quota - 1e-9))
    return max(1, cpus)


def _cgroup_cpu_quota(root: str) -> float | None:
    """The cgroup CPU quota of this process in CPUs, or None when there is none."""
    try:
        with open(os.path.join(root, "proc/self/cgroup"), encoding="ascii") as fh:
            lines = fh.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    mounts = os.path.join(root, "sys/fs/cgroup")
    found = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # cgroup v2 (unified): cpu.max holds "quota period"
            for folder in _cgroup_folders(mounts, path):
                found.append(_read_quota(os.path.join(folder, "cpu.max")))
        elif "cpu" in controllers.split(","):  # cgroup v1: the cpu controller's folder
            base = next((os.path.join(mounts, name) for name in
                         (controllers, "cpu", "cpu,cpuacct", "cpuacct,cpu")
                         if os.path.isdir(os.path.join(mounts, name))), None)
            if base is None:
                continue
            for folder in _cgroup_folders(base, path):
                found.append(_read_quota(os.path.join(folder, "cpu.cfs_quota_us"),
                                         os.path.join(folder, "cpu.cfs_period_us")))
    quotas = [q for q in found if q is not None]
    return min(quotas) if quotas else None


def _cgroup_folders(base: str, path: str):
    """The folders of a cgroup ``path`` under its mount ``base`` and of its ancestors.
    Inside a container the mount is the container's own cgroup (its ``path``, the
    host's name for it, is not below it): then ``base`` alone."""
    parts = [p for p in path.strip("/").split("/") if p]
    if not os.path.isdir(os.path.join(base, *parts)):
        parts = []
    while True:
        yield os.path.join(base, *parts)
        if not parts:
            return
        parts.pop()


def _read_quota(file: str, period_file: str | None = None) -> float | None:
    """CPUs allowed by a v2 ``cpu.max`` (``max 100000``, ``150000 100000``), or by a v1
    quota file and its period file (``-1``: none); None when unlimited or unreadable."""
    try:
        with open(file, encoding="ascii") as fh:
            fields = fh.read().split()
        if period_file is not None:
            with open(period_file, encoding="ascii") as fh:
                fields = fields[:1] + fh.read().split()[:1]
        if len(fields) < 2 or fields[0] in ("max", "-1"):
            return None
        quota, period = int(fields[0]), int(fields[1])
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def _start_hold(env) -> float:
    value = _number(env, "MLBUILD_START_HOLD")
    return DEFAULT_START_HOLD if value is None or value < 0 else value


def _log_level(env) -> str:
    """MLBUILD_LOG_LEVEL, else azmlinfsrv's AZUREML_LOG_LEVEL (INFO, WARNING, ...)."""
    value = (env.get("MLBUILD_LOG_LEVEL") or env.get("AZUREML_LOG_LEVEL") or "info").lower()
    return _LOG_LEVEL_ALIASES.get(value, value)


def _timeout(env) -> float | None:
    """MLBUILD_REQUEST_TIMEOUT (seconds), else azmlinfsrv's SCORING_TIMEOUT_MS; 0 = none."""
    seconds = _number(env, "MLBUILD_REQUEST_TIMEOUT")
    if seconds is None:
        ms = _number(env, "SCORING_TIMEOUT_MS")
        seconds = None if ms is None else ms / 1000.0
    return seconds if seconds and seconds > 0 else None


@dataclass(frozen=True)
class RuntimeConfig:
    """Everything the server needs. Build with :meth:`from_env`, override with ``replace``.

    Attributes:
        entry_script: Path of the script defining ``init()``/``run()``; relative paths
            are resolved against ``app_root``.
        model_dir: Exported to the script as ``MLBUILD_MODEL_DIR`` and
            ``AZUREML_MODEL_DIR``, exactly as given.
        app_root: Folder the entry script is resolved against (``AML_APP_ROOT``).
        no_code_model / no_code_framework: Serve a model file without an entry script.
        max_body_bytes: Larger request bodies get 413.
        auth_keys: Accepted ``Authorization: Bearer`` keys; empty means no auth.
        cors_origins: Allowed browser origins (``*`` allows any).
        schema_input / schema_output: JSON sample files for ``/swagger.json``.
        service_name: Title of the OpenAPI document.
        service_version: ``info.version`` of the OpenAPI document.
        dispatch: ``inline`` calls a sync ``run`` in the event-loop thread,
            ``thread`` in the run thread (see app.py for the measured trade-off).
        request_timeout: Seconds a request may wait for run(); None for no limit. A
            timeout implies ``thread`` dispatch for a sync run() (see app.py).
        access_log: One line per request on stdout.
        server_version: The ``x-ms-server-version`` response header (azmlinfsrv's
            ``HTTP_X_MS_SERVER_VERSION``); None sends none.
        show_errors: A 500 from run() also carries the exception's text (``mlbuild serve
            SERVICE``, the development server); otherwise only the log has it.
        start_hold: Seconds a request to the scoring port waits for init() to return
            before it gets 503 (``MLBUILD_START_HOLD``).
        source_dir: azmlinfsrv's ``AZUREML_SOURCE_DIRECTORY``: ``app_root/source_dir`` is
            put on ``sys.path``.
        max_concurrent_requests: /score requests admitted at once (being scored or queued
            for the run thread); None for no cap (AKS v1's
            ``replica_max_concurrent_requests``). With a cap, a sync run() runs in the run
            thread, so the event loop stays free to turn the excess away.
        max_request_wait_ms: How long a request past the cap waits for a free slot
            before 503 (AKS v1's ``max_request_wait_time``).
        path_prefix: Routes are answered below this path too (``/svc/score`` as
            ``/score``): an Ingress that routes ``host/svc`` without a rewrite.
        batch_max_size: Adaptive batching (batching.py): most requests scored in one
            call; None for no batching (a ``@batched`` run() then gets one at a time).
        batch_max_latency_ms: With batching, how long the first request of a batch
            waits for others (0: only those that queued while the last batch ran).
    """

    entry_script: str | None = None
    model_dir: str | None = None
    app_root: str | None = None
    no_code_model: str | None = None
    no_code_framework: str = "scikit-learn"
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    auth_keys: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    schema_input: str | None = None
    schema_output: str | None = None
    service_name: str | None = None
    service_version: str = "1.0"
    dispatch: str = "inline"
    request_timeout: float | None = None
    access_log: bool = True
    server_version: str | None = None
    show_errors: bool = False
    start_hold: float = DEFAULT_START_HOLD
    source_dir: str | None = None
    max_concurrent_requests: int | None = None
    max_request_wait_ms: int = DEFAULT_MAX_REQUEST_WAIT_MS
    path_prefix: str | None = None
    batch_max_size: int | None = None
    batch_max_latency_ms: float = DEFAULT_BATCH_MAX_LATENCY_MS
    extra: dict = field(default_factory=dict, compare=False)

    @classmethod
    def from_env(cls, environ: os._Environ | dict | None = None) -> RuntimeConfig:
        """Read ``MLBUILD_*`` variables, with the Azure ML spellings as fallbacks.

        Raises:
            ValueError: A variable has a malformed value, or the keys file is unreadable.
        """
        env = os.environ if environ is None else environ
        keys = list(_split(env.get("MLBUILD_AUTH_KEYS")))
        keys_file = env.get("MLBUILD_AUTH_KEYS_FILE")
        if keys_file:
            keys.extend(read_keys_file(keys_file))
        if env.get("MLBUILD_AUTH", "none") == "key" and not keys:
            # Fail closed: an image built with auth: key never serves without a key.
            raise ValueError("MLBUILD_AUTH=key but no key was given: set MLBUILD_AUTH_KEYS "
                             "(comma-separated) or MLBUILD_AUTH_KEYS_FILE")
        max_body = env.get("MLBUILD_MAX_BODY_BYTES")
        dispatch = env.get("MLBUILD_RUN_DISPATCH", "inline")
        if dispatch not in DISPATCH_MODES:
            raise ValueError(f"MLBUILD_RUN_DISPATCH={dispatch!r}: expected one of {DISPATCH_MODES}")
        return cls(
            entry_script=env.get("MLBUILD_ENTRY_SCRIPT") or env.get("AZUREML_ENTRY_SCRIPT") or None,
            model_dir=env.get("MLBUILD_MODEL_DIR") or env.get("AZUREML_MODEL_DIR") or None,
            app_root=env.get("AML_APP_ROOT") or None,
            no_code_model=env.get("MLBUILD_NO_CODE_MODEL") or None,
            no_code_framework=env.get("MLBUILD_NO_CODE_FRAMEWORK") or "scikit-learn",
            max_body_bytes=int(max_body) if max_body else DEFAULT_MAX_BODY_BYTES,
            auth_keys=tuple(keys),
            cors_origins=_split(env.get("MLBUILD_CORS_ORIGINS")
                                or env.get("AML_CORS_ORIGINS")),
            schema_input=env.get("MLBUILD_SCHEMA_INPUT") or None,
            schema_output=env.get("MLBUILD_SCHEMA_OUTPUT") or None,
            service_name=env.get("MLBUILD_SERVICE_NAME") or env.get("SERVICE_NAME") or None,
            service_version=env.get("SERVICE_VERSION") or "1.0",
            dispatch=dispatch,
            request_timeout=_timeout(env),
            access_log=_bool(env.get("MLBUILD_ACCESS_LOG"), True),
            server_version=env.get("HTTP_X_MS_SERVER_VERSION") or None,
            show_errors=_bool(env.get("MLBUILD_SHOW_ERRORS"), False),
            start_hold=_start_hold(env),
            source_dir=env.get("AZUREML_SOURCE_DIRECTORY") or None,
            max_concurrent_requests=_positive(env, "MLBUILD_MAX_CONCURRENT_REQUESTS"),
            max_request_wait_ms=_wait_ms(env),
            path_prefix=(env.get("MLBUILD_PATH_PREFIX") or "").rstrip("/") or None,
            batch_max_size=_batch_size(env),
            batch_max_latency_ms=_batch_latency_ms(env),
        )

    def with_overrides(self, **changes) -> RuntimeConfig:
        """A copy with the non-None values of ``changes`` applied."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def export_model_dir(self, environ=None) -> None:
        """Set both model-dir variables to ``model_dir`` exactly as given (if given)."""
        env = os.environ if environ is None else environ
        if self.model_dir:
            env["MLBUILD_MODEL_DIR"] = self.model_dir
            env["AZUREML_MODEL_DIR"] = self.model_dir


@dataclass(frozen=True)
class ServerOptions:
    """Where and how the process listens. Build with :meth:`from_env`, then the CLI's
    :meth:`with_overrides`.

    Attributes:
        host / port: The main listener (scoring and health).
        health_port: A second listener serving only ``GET /``, ``/healthz/live`` and
            ``/healthz/ready``; None (or the main port itself) for none.
        workers: Worker processes; 1 serves in this process. ``MLBUILD_WORKERS=auto``:
            as many as :func:`available_cpus`.
        reuse_port: Replacement support: the main socket gets SO_REUSEPORT and is bound
            and listening only after init() returned (see server.py).
        ready_file: Written (atomically) once init() returned and the main socket
            listens: ``{"pid": ..., "port": ..., "health_port": ...}``.
        graceful_timeout: Seconds in-flight requests get to finish after SIGTERM.
        log_level: ``debug``, ``info``, ``warning`` or ``error``.
        header_timeout: Seconds a request's head (request line and headers) may take
            from the connection's start, or from its first byte after a keep-alive
            request; then 408 and close (a connection that sent nothing is just
            closed). On the health port too. A body gets as long again plus 1 s per KiB
            received (then 408 too).
        max_header_bytes: Largest request head accepted: a longer request line gets 414,
            longer headers 431, then the connection closes. On the health port too.
        keepalive_timeout: Seconds an idle keep-alive connection stays open.
    """

    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    health_port: int | None = None
    workers: int = 1
    reuse_port: bool = False
    ready_file: str | None = None
    graceful_timeout: float = DEFAULT_GRACEFUL_TIMEOUT
    log_level: str = "info"
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT

    @classmethod
    def from_env(cls, environ: os._Environ | dict | None = None) -> ServerOptions:
        """Read ``MLBUILD_*`` variables, with azmlinfsrv's spellings as fallbacks.

        The health port: ``MLBUILD_HEALTH_PORT``; or, as azmlinfsrv does, with
        ``SEPERATE_HEALTH_ENDPOINT=true`` (its spelling) ``HEALTH_PORT``, default 5000.

        Raises:
            ValueError: A variable has a malformed value.
        """
        env = os.environ if environ is None else environ
        port = _number(env, "MLBUILD_PORT", int)
        if port is None:
            port = _number(env, "AZUREML_SERVER_PORT", int)
        health_port = _number(env, "MLBUILD_HEALTH_PORT", int)
        if health_port is None and _bool(env.get("SEPERATE_HEALTH_ENDPOINT"), False):
            health_port = _number(env, "HEALTH_PORT", int) or DEFAULT_HEALTH_PORT
        workers = _workers(env)
        graceful = _number(env, "MLBUILD_GRACEFUL_TIMEOUT")
        header_timeout = _number(env, "MLBUILD_HEADER_TIMEOUT")
        max_header = _number(env, "MLBUILD_MAX_HEADER_BYTES", int)
        keepalive = _number(env, "MLBUILD_KEEPALIVE_TIMEOUT")
        return cls(
            host=env.get("MLBUILD_HOST") or "0.0.0.0",
            port=DEFAULT_PORT if port is None else port,
            health_port=health_port,
            workers=workers or 1,
            reuse_port=_bool(env.get("MLBUILD_REUSE_PORT"), False),
            ready_file=env.get("MLBUILD_READY_FILE") or None,
            graceful_timeout=DEFAULT_GRACEFUL_TIMEOUT if graceful is None else graceful,
            log_level=_log_level(env),
            header_timeout=DEFAULT_HEADER_TIMEOUT if header_timeout is None else header_timeout,
            max_header_bytes=DEFAULT_MAX_HEADER_BYTES if max_header is None else max_header,
            keepalive_timeout=DEFAULT_KEEPALIVE_TIMEOUT if keepalive is None else keepalive,
        )

    def with_overrides(self, **changes) -> ServerOptions:
        """A copy with the non-None values of ``changes`` applied."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def problems(self) -> list[str]:
        """Everything wrong with these options (empty when they can be served)."""
        out = []
        for name, value in (("port", self.port), ("health port", self.health_port)):
            if value is not None and not 0 <= value <= 65535:
                out.append(f"{name} {value} is not in 0..65535")
        if self.workers < 1:
            out.append(f"workers {self.workers}: give 1 or more")
        if self.reuse_port and self.port == 0:
            out.append("reuse-port needs a fixed port, not 0")
        if self.graceful_timeout < 0:
            out.append(f"graceful timeout {self.graceful_timeout} is negative")
        for name, value in (("header timeout", self.header_timeout),
                            ("keep-alive timeout", self.keepalive_timeout)):
            if not 0 < value < math.inf:
                out.append(f"{name} {value}: give a number of seconds above 0")
        if self.max_header_bytes < MIN_MAX_HEADER_BYTES:
            out.append(f"max header bytes {self.max_header_bytes}: give "
                       f"{MIN_MAX_HEADER_BYTES} or more")
        if self.log_level not in LOG_LEVELS:
            out.append(f"log level {self.log_level!r}: expected debug, info, warning or error")
        if self.ready_file:
            folder = os.path.dirname(os.path.abspath(self.ready_file))
            if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
                out.append(f"ready file {self.ready_file!r}: folder {folder!r} is missing "
                           "or not writable")
        return out


def read_keys_file(path: str) -> list[str]:
    """Keys from a mounted file: one per line or comma-separated; ``#`` comments."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ValueError(f"MLBUILD_AUTH_KEYS_FILE {path!r}: {exc.strerror}") from exc
    keys = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        keys.extend(_split(line))
    return keys
