"""The runtime's log, laid out as azmlinfsrv's: one stream (stdout), one line format.

    2026-01-31 12:00:00,123 I [4242] azmlinfsrv - ready for serving traffic
    2026-01-31 12:00:00,456 I [4242] azmlinfsrv.print - Initializing       (a script's print)
    2026-01-31 12:00:00,789 I [4242] azmlinfsrv.access - POST /score 200 0.412ms 17 rid=...

Timestamps are UTC, as azmlinfsrv's ``AMLLogFormatter`` writes them. Loggers are named as
azmlinfsrv names them (``azmlinfsrv``, ``azmlinfsrv.user_script``, ``azmlinfsrv.print``),
so a ``logging.json`` written for azmlinfsrv configures ours: it is looked up in
``AML_APP_ROOT``, then beside the entry script, and applied with ``dictConfig`` (its
``azureml_inference_server_http.log_config`` classes resolve to the ones here when the
Azure package is absent, see compat.py). Unlike azmlinfsrv, the root logger is set up too,
so a script's ``logging.info`` reaches the log; uvicorn's own lines pass through it.

A script's ``print()`` to stdout becomes an INFO line of ``azmlinfsrv.print`` (what
azmlinfsrv does; the line gets a time and a pid); prints to any other file are untouched.
"""

from __future__ import annotations

import builtins
import functools
import json
import logging
import logging.config
import os
import sys
import time

FORMAT = "%(asctime)s %(levelname).1s [%(process)d] %(name)s - %(message)s"
SERVER_LOGGER = "azmlinfsrv"
PRINT_LOGGER = "azmlinfsrv.print"
LOGGING_FILE = "logging.json"


class AMLLogFormatter(logging.Formatter):
    """azmlinfsrv's formatter: its format by default, UTC times."""

    converter = time.gmtime

    def __init__(self, fmt: str = FORMAT, datefmt: str | None = None, style: str = "%"):
        super().__init__(fmt=fmt, datefmt=datefmt, style=style)


class RootAccessFilter(logging.Filter):
    """azmlinfsrv's filter that drops access lines of health probes (``GET /``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "GET / HTTP/1.1" not in record.getMessage()


_default_print = builtins.print


def _print_to_log(*objects, sep=" ", end="\n", file=None, flush=False):
    if file is None or file is sys.stdout:
        logging.getLogger(PRINT_LOGGER).info(
            (" " if sep is None else sep).join(map(str, objects)))
    else:
        _default_print(*objects, sep=sep, end=end, file=file, flush=flush)


def setup(level: str, app_root: str | None = None, entry_script: str | None = None) -> str | None:
    """Log to stdout in azmlinfsrv's format at ``level``; then apply the first
    ``logging.json`` found (``app_root``, then the entry script's folder) and send the
    script's ``print()`` to the log.

    Returns:
        The ``logging.json`` applied, or None.

    Raises:
        ValueError: The logging.json found is not valid JSON or not a valid configuration
            (the message names the file).
    """
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(AMLLogFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # A script's prints are its output, not the server's chatter: shown at any level
    # (a logging.json may still say otherwise).
    logging.getLogger(PRINT_LOGGER).setLevel(logging.INFO)
    loaded = None
    folders = [app_root]
    if entry_script:
        folders.append(os.path.dirname(os.path.abspath(entry_script)))
    for folder in folders:
        path = os.path.join(folder, LOGGING_FILE) if folder else None
        if path and os.path.isfile(path):
            _apply(path)
            loaded = path
            break
    builtins.print = functools.wraps(_default_print)(_print_to_log)
    if loaded:
        logging.getLogger(SERVER_LOGGER).info("Loaded logging config from %s", loaded)
    return loaded


def _apply(path: str) -> None:
    from mlbuild.runtime import compat

    compat.install()  # azureml_inference_server_http.log_config.* in the file
    try:
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
        config.setdefault("disable_existing_loggers", False)
        logging.config.dictConfig(config)
    except (OSError, ValueError, TypeError, AttributeError, ImportError) as exc:
        raise ValueError(f"{path}: not a usable logging configuration: {exc}") from exc
