"""azmlinfsrv's command line and environment (Azure ML inference server 1.5.1), applied
before the runtime reads its configuration.

What azmlinfsrv does at start, and so does this module:

- A configuration file: ``--config_file``, else ``AZUREML_CONFIG_FILE``, else a
  ``config.json`` in ``AML_APP_ROOT`` or beside the entry script. Its keys are the
  environment variables of :data:`CONFIG_KEYS`; a variable set in the environment wins.
  Other keys are warned about. (A ``config.json`` found by looking, not named, that holds
  none of these keys is someone else's file -- a model's, say -- and is left alone.)
- Exports for the script, before ``init()``: ``AML_APP_ROOT`` (default: the current
  folder), ``AZUREML_ENTRY_SCRIPT`` (the real path of ``--entry_script``),
  ``AZUREML_MODEL_DIR`` (as given), ``AZUREML_CONFIG_FILE``, ``WORKER_COUNT``,
  ``SERVER_PORT`` and ``HEALTH_PORT`` (the ports served; the health port is the scoring
  port unless a separate one listens), ``AML_APP_INSIGHTS_ENABLED`` (``true`` only with a
  valid instrumentation key, else ``false``), ``AML_APP_INSIGHTS_KEY``,
  ``AML_CORS_ORIGINS``, ``HTTP_X_MS_SERVER_VERSION`` (``azmlinfsrv/1.5.1`` unless
  ``SERVER_VERSION_LOG_RESPONSE_ENABLED`` is set to anything but ``true``; sent as the
  ``x-ms-server-version`` response header) and ``TRANSPORT_PROTOCOL``.
- The start-up banner on stdout: server settings and routes, in azmlinfsrv's words.

Accepted and not used, each said in the banner: Application Insights (mlbuild sends no
telemetry; the script still sees the variables), ``WORKER_TIMEOUT`` and
``WORKER_PRELOAD`` (gunicorn's; the runtime bounds run() with ``SCORING_TIMEOUT_MS``),
``--rest``.
"""

from __future__ import annotations

import json
import os
import re
import sys

AZMLINFSRV_VERSION = "1.5.1"
SERVER_VERSION = f"azmlinfsrv/{AZMLINFSRV_VERSION}"

# The keys azmlinfsrv reads from its configuration file (its config.py alias_mapping).
CONFIG_KEYS = ("AML_APP_ROOT", "AZUREML_SOURCE_DIRECTORY", "AZUREML_ENTRY_SCRIPT",
               "SERVICE_NAME", "WORKSPACE_NAME", "SERVICE_PATH_PREFIX", "SERVICE_VERSION",
               "SCORING_TIMEOUT_MS", "AZUREML_LOG_LEVEL", "AML_APP_INSIGHTS_ENABLED",
               "AML_APP_INSIGHTS_KEY", "AML_MODEL_DC_STORAGE_ENABLED",
               "APP_INSIGHTS_LOG_RESPONSE_ENABLED", "AML_CORS_ORIGINS", "AZUREML_MODEL_DIR",
               "HOSTNAME", "AZUREML_DEBUG_PORT")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z", re.I)


class ConfigFileError(ValueError):
    """The configuration file cannot be read or is not a JSON object."""


def find_config_file(given: str | None, env) -> tuple[str | None, bool]:
    """``(path, named)``: the configuration file to read, and whether it was named
    (``--config_file``/``AZUREML_CONFIG_FILE``) rather than found by looking."""
    if given:
        return os.path.realpath(given), True
    named = env.get("AZUREML_CONFIG_FILE")
    if named and os.path.isfile(named) and os.path.getsize(named):
        return named, True
    roots = [env.get("AML_APP_ROOT") or os.getcwd()]
    entry = env.get("AZUREML_ENTRY_SCRIPT")
    if entry:
        roots.append(os.path.dirname(os.path.abspath(entry)))
    for root in roots:
        path = os.path.join(root, "config.json")
        if os.path.isfile(path) and os.path.getsize(path):
            return path, False
    return None, False


def apply_config_file(path: str, named: bool, env) -> list[str]:
    """Set the file's keys that the environment does not set; returns warnings.

    Raises:
        ConfigFileError: A named file is missing, not JSON, or not an object.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise ConfigFileError(f"config file {path!r} does not exist") from None
    except (OSError, ValueError) as exc:
        if not named:
            return [f"ignoring {path}: not a JSON configuration ({exc})"]
        raise ConfigFileError(f"config file {path!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        if not named:
            return [f"ignoring {path}: not a JSON object"]
        raise ConfigFileError(f"config file {path!r}: expected a JSON object of "
                              f"settings, got {type(data).__name__}")
    known = [k for k in data if k in CONFIG_KEYS]
    if not named and not known:
        return []
    for key in known:
        value = data[key]
        if value is None or key in env:
            continue
        env[key] = json.dumps(value) if isinstance(value, bool) else str(value).strip()
    warnings = []
    extra = [k for k in data if k not in CONFIG_KEYS]
    if extra:
        warnings.append("Found extra keys in the config file that are not supported by the "
                        f"server.\nExtra keys = {extra}")
    env["AZUREML_CONFIG_FILE"] = path
    return warnings


def export_before_load(args, env) -> list[str]:
    """azmlinfsrv's exports that depend on the command line only (before the runtime
    reads its configuration from ``env``); returns the lines to print.

    ``args`` has the parsed ``entry_script``, ``model_dir``, ``config_file``,
    ``appinsights_instrumentation_key``, ``cors_origins`` and ``rest``.

    Raises:
        ConfigFileError: From the configuration file.
    """
    lines: list[str] = []
    env.setdefault("AML_APP_ROOT", os.getcwd())
    if args.entry_script:
        env["AZUREML_ENTRY_SCRIPT"] = os.path.realpath(args.entry_script) \
            if os.path.exists(args.entry_script) else args.entry_script
    path, named = find_config_file(args.config_file, env)
    if path:
        lines += apply_config_file(path, named, env)
    env["TRANSPORT_PROTOCOL"] = "rest" if args.rest else "grpc"
    if args.model_dir is not None:
        env["AZUREML_MODEL_DIR"] = args.model_dir
    enabled = env.get("SERVER_VERSION_LOG_RESPONSE_ENABLED")
    if enabled is None or enabled.lower() == "true":
        env["HTTP_X_MS_SERVER_VERSION"] = SERVER_VERSION
    if args.appinsights_instrumentation_key is not None:
        env["AML_APP_INSIGHTS_ENABLED"] = "true"
        env["AML_APP_INSIGHTS_KEY"] = args.appinsights_instrumentation_key
    if args.cors_origins is not None:
        env["AML_CORS_ORIGINS"] = args.cors_origins
    if "AZUREML_MODEL_DIR" not in env and "MLBUILD_MODEL_DIR" not in env:
        lines.append("The environment variable 'AZUREML_MODEL_DIR' has not been set.")
        lines.append("Use the --model_dir command line argument to set it.")
    # Application Insights: on only with a key that is a UUID, as azmlinfsrv decides.
    if "AML_APP_INSIGHTS_ENABLED" in env and "AML_APP_INSIGHTS_KEY" in env:
        if env["AML_APP_INSIGHTS_ENABLED"] == "true":
            if _UUID.match(env["AML_APP_INSIGHTS_KEY"]):
                lines.append("Valid Application Insights instrumentation key provided.")
            else:
                env["AML_APP_INSIGHTS_ENABLED"] = "false"
                lines.append("Invalid Application Insights instrumentation key provided.")
                lines.append("Application Insights has been disabled.")
        else:
            env["AML_APP_INSIGHTS_ENABLED"] = "false"
    else:
        env["AML_APP_INSIGHTS_ENABLED"] = "false"
    return lines


def export_after_options(env, *, port: int, health_port: int | None, workers: int) -> None:
    """The exports that depend on the resolved ports and worker count."""
    env["SERVER_PORT"] = str(port)
    env["HEALTH_PORT"] = str(health_port if health_port is not None else port)
    env["WORKER_COUNT"] = str(workers)


def banner(env, *, version: str, host: str, port: int, health_port: int | None,
           cors: tuple[str, ...], timeout: float | None) -> str:
    """The start-up text, azmlinfsrv's settings and routes with mlbuild's additions."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    health = health_port if health_port is not None else port
    if cors:
        raw = env.get("AML_CORS_ORIGINS") or ", ".join(cors)
        cors_line = f"Enabling CORS for {raw}"
    else:
        cors_line = "None"
    key = "AppInsights key provided" if "AML_APP_INSIGHTS_KEY" in env else "None"
    settings = [
        ("Entry Script Name", env.get("AZUREML_ENTRY_SCRIPT")),
        ("Model Directory", env.get("AZUREML_MODEL_DIR")),
        ("Config File", env.get("AZUREML_CONFIG_FILE")),
        ("Worker Count", env.get("WORKER_COUNT")),
        ("Worker Timeout (seconds)", env.get("WORKER_TIMEOUT")),
        ("Server Port", port),
        ("Health Port", health),
        ("Application Insights Enabled", env.get("AML_APP_INSIGHTS_ENABLED")),
        ("Application Insights Key", key),
        ("Inferencing HTTP server version", env.get("HTTP_X_MS_SERVER_VERSION")),
        ("CORS for the specified origins", cors_line),
        ("Create dedicated endpoint for health", env.get("SEPERATE_HEALTH_ENDPOINT")),
        ("Scoring timeout", f"{timeout * 1000:g} ms" if timeout else "None"),
    ]
    out = ["", f"mlbuild runtime {version} (Azure ML Inferencing HTTP server "
               f"v{AZMLINFSRV_VERSION} compatible)", "", "Server Settings", "---------------"]
    out += [f"{name}: {value}" for name, value in settings]
    ignored = []
    if env.get("AML_APP_INSIGHTS_ENABLED") == "true":
        ignored.append("Application Insights: mlbuild sends no telemetry of its own; the "
                       "script sees AML_APP_INSIGHTS_ENABLED/KEY")
    for name in ("WORKER_TIMEOUT", "WORKER_PRELOAD"):
        if env.get(name):
            ignored.append(f"{name}: accepted, not used (gunicorn's setting; run() is "
                           "bounded by SCORING_TIMEOUT_MS)")
    if env.get("TRANSPORT_PROTOCOL") == "rest":
        ignored.append("--rest: accepted, not used (HTTP is the only transport)")
    if ignored:
        out += ["", "Not used here"] + ignored
    out += ["", "Server Routes", "---------------",
            f"Liveness Probe: GET   {shown}:{health}/",
            f"Score:          POST  {shown}:{port}/score",
            f"Readiness:      GET   {shown}:{health}/healthz/ready",
            ""]
    return "\n".join(out) + "\n"


def write(text: str) -> None:
    """Write to stdout as it is (not through the print hook or the log)."""
    sys.stdout.write(text)
    sys.stdout.flush()
