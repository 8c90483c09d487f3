"""Running the app under uvicorn: one process, or a supervisor with ``workers`` processes."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import signal
import socket
import sys
import tempfile

from mlbuild.runtime.app import ScoringApp, create_app
from mlbuild.runtime.config import RuntimeConfig

log = logging.getLogger("mlbuild.runtime")

EXIT_INIT_FAILED = 3
_CONFIG_ENV = "MLBUILD_RUNTIME_CONFIG_JSON"   # hands the config to worker processes
_FATAL_ENV = "MLBUILD_RUNTIME_FATAL_FILE"     # a worker whose init() failed writes it


def _fast_options() -> dict:
    # httptools and uvloop when installed (requirements.txt has them); the pure-Python
    # fallbacks still work, several times slower.
    return {
        "http": "httptools" if importlib.util.find_spec("httptools") else "h11",
        "loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
    }


def _bind(host: str, port: int) -> socket.socket:
    """Bind before anything else, so a busy port fails fast and touches nothing.

    Raises:
        OSError: The address is in use or cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # SO_REUSEADDR (not SO_REUSEPORT): restarts do not wait for TIME_WAIT, yet a port
    # with a live listener still refuses the bind.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def run_server(config: RuntimeConfig, host: str = "0.0.0.0", port: int = 5001,
               workers: int = 1, log_level: str = "info") -> int:
    """Serve ``config`` until stopped; returns the process exit code.

    Returns:
        0 after a normal shutdown, 1 when the port cannot be bound, 3 when loading the
        entry script or its init() failed.
    """
    import uvicorn

    try:
        sock = _bind(host, port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", host, port, exc.strerror or exc)
        return 1
    uv_options = dict(_fast_options(), log_level=log_level, access_log=False,
                      server_header=False, lifespan="on", timeout_graceful_shutdown=5)

    if workers <= 1:
        server_box: list = []

        def on_fatal(app: ScoringApp) -> None:
            app.exit_code = EXIT_INIT_FAILED
            server_box[0].should_exit = True

        app = create_app(config, on_fatal=on_fatal)
        app.exit_code = 0
        server = uvicorn.Server(uvicorn.Config(app, **uv_options))
        server_box.append(server)
        server.run(sockets=[sock])
        return app.exit_code

    # Several workers: uvicorn's supervisor forks processes that each import the app
    # through `worker_app()`, which reads the configuration from the environment.
    fd, fatal_file = tempfile.mkstemp(prefix="mlbuild-fatal-")
    os.close(fd)
    os.unlink(fatal_file)
    os.environ[_CONFIG_ENV] = json.dumps(dataclasses.asdict(config))
    os.environ[_FATAL_ENV] = fatal_file
    config.export_model_dir()
    sock.close()  # uvicorn's supervisor binds (and fails on a busy port) itself
    try:
        uvicorn.run("mlbuild.runtime.server:worker_app", factory=True, host=host, port=port,
                    workers=workers, **uv_options)
    except SystemExit as exc:
        return int(exc.code or 0)
    if os.path.exists(fatal_file):
        os.unlink(fatal_file)
        return EXIT_INIT_FAILED
    return 0


def _worker_fatal(app: ScoringApp) -> None:
    # A worker cannot serve without its init(): record it, stop the supervisor (which
    # would otherwise restart workers in a loop) and leave.
    fatal_file = os.environ.get(_FATAL_ENV)
    if fatal_file:
        with open(fatal_file, "w", encoding="utf-8") as fh:
            fh.write(app.failure or "init failed")
    sys.stderr.flush()
    os.kill(os.getppid(), signal.SIGTERM)
    os._exit(EXIT_INIT_FAILED)


def worker_app() -> ScoringApp:
    """App factory for worker processes (configuration from the parent's environment)."""
    raw = os.environ.get(_CONFIG_ENV)
    if raw:
        data = json.loads(raw)
        for key in ("auth_keys", "cors_origins"):
            data[key] = tuple(data[key])
        config = RuntimeConfig(**data)
    else:
        config = RuntimeConfig.from_env()
    return create_app(config, on_fatal=_worker_fatal)
