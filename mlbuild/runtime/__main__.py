"""``python -m mlbuild.runtime``: serve one entry script (or no-code model).

A drop-in for Azure's ``azmlinfsrv`` 1.5.1: every option of its ``--help``
(``--entry_script``, ``--model_dir``, ``--port``, ``--health_port``, ``--worker_count``,
``--access_control_allow_origins``, ``--appinsights_instrumentation_key``,
``--config_file``, ``--rest``) beside mlbuild's spellings, its environment variables and
its configuration file (azml.py), the environment it exports for the script and its
start-up banner. Options given on the command line win over the environment, which wins
over the configuration file. ``mlbuild serve`` forwards to :func:`main` with the same
arguments.

Exit codes: 0 stopped (SIGTERM/SIGINT: in-flight requests finished), 1 a port cannot be
listened on, 2 bad options or configuration, 3 loading the entry script or its init()
failed.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from mlbuild.runtime.config import DISPATCH_MODES, RuntimeConfig, ServerOptions

EXIT_USAGE = 2


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (0..65535)")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: give 1 or more")
    return value


def _workers(text: str) -> int:
    """A number of workers, or ``auto``: the CPUs this process may use (its affinity and
    cgroup CPU quota, see :func:`mlbuild.runtime.config.available_cpus`)."""
    if text.strip().lower() == "auto":
        from mlbuild.runtime.config import available_cpus

        return available_cpus()
    return _positive_int(text)


def build_parser(prog: str = "python -m mlbuild.runtime") -> argparse.ArgumentParser:
    """The runtime's argument parser; every default is None so the environment fills in."""
    p = argparse.ArgumentParser(prog=prog,
                                description="Serve an entry script's init()/run() over HTTP.")
    p.add_argument("--entry-script", "--entry_script", dest="entry_script",
                   help="script defining init() and run(); relative paths are looked up in "
                        "AML_APP_ROOT, then the current folder "
                        "[MLBUILD_ENTRY_SCRIPT, AZUREML_ENTRY_SCRIPT]")
    p.add_argument("--model-dir", "--model_dir", dest="model_dir",
                   help="model folder, given to the script as MLBUILD_MODEL_DIR and "
                        "AZUREML_MODEL_DIR exactly as written")
    p.add_argument("--host", help="address to listen on [MLBUILD_HOST, default 0.0.0.0]")
    p.add_argument("--port", type=_port,
                   help="scoring port [MLBUILD_PORT, AZUREML_SERVER_PORT, default 5001]")
    p.add_argument("--health-port", "--health_port", dest="health_port", type=_port,
                   help="also serve GET /, /healthz/live and /healthz/ready on this port "
                        "[MLBUILD_HEALTH_PORT; SEPERATE_HEALTH_ENDPOINT=true: HEALTH_PORT, "
                        "default 5000]")
    p.add_argument("--workers", "--worker_count", dest="workers", type=_workers,
                   help="worker processes, or auto: the CPUs this process may use (its "
                        "affinity and cgroup CPU quota) [MLBUILD_WORKERS, WORKER_COUNT, "
                        "default 1]")
    p.add_argument("--max-body-bytes", dest="max_body_bytes", type=int,
                   help="larger bodies get 413 [MLBUILD_MAX_BODY_BYTES, default 10 MB]")
    p.add_argument("--cors-origins", "--access_control_allow_origins", dest="cors_origins",
                   help="comma-separated allowed origins [MLBUILD_CORS_ORIGINS, "
                        "AML_CORS_ORIGINS]")
    p.add_argument("--config-file", "--config_file", dest="config_file",
                   help="azmlinfsrv's JSON configuration file (keys are its environment "
                        "variables; the environment wins) [AZUREML_CONFIG_FILE, else "
                        "config.json in AML_APP_ROOT or beside the entry script]")
    p.add_argument("--appinsights-instrumentation-key", "--appinsights_instrumentation_key",
                   dest="appinsights_instrumentation_key",
                   help="accepted for azmlinfsrv's command lines: exported to the script as "
                        "AML_APP_INSIGHTS_KEY; mlbuild sends no telemetry")
    p.add_argument("--rest", action="store_true",
                   help="accepted for azmlinfsrv's command lines; HTTP is the only transport")
    p.add_argument("--no-code-model", dest="no_code_model",
                   help="serve this model file without a script [MLBUILD_NO_CODE_MODEL]")
    p.add_argument("--no-code-framework", dest="no_code_framework")
    p.add_argument("--dispatch", choices=DISPATCH_MODES,
                   help="where a sync run() executes [MLBUILD_RUN_DISPATCH, default inline]")
    p.add_argument("--request-timeout", dest="request_timeout", type=float,
                   help="seconds a request may wait for run(); then 500 'Scoring timeout' "
                        "[MLBUILD_REQUEST_TIMEOUT, SCORING_TIMEOUT_MS (ms), default none]")
    p.add_argument("--reuse-port", dest="reuse_port", action="store_true", default=None,
                   help="replace a running release without downtime: SO_REUSEPORT, and "
                        "listen only once init() returned [MLBUILD_REUSE_PORT=1]")
    p.add_argument("--ready-file", dest="ready_file",
                   help="write {pid, port, health_port} as JSON here once ready "
                        "[MLBUILD_READY_FILE]")
    p.add_argument("--graceful-timeout", dest="graceful_timeout", type=float,
                   help="seconds in-flight requests get after SIGTERM "
                        "[MLBUILD_GRACEFUL_TIMEOUT, default 30]")
    p.add_argument("--header-timeout", dest="header_timeout", type=float,
                   help="seconds a request's line and headers may take (its body: as "
                        "long plus 1 s per KiB); then 408 and the connection closes "
                        "[MLBUILD_HEADER_TIMEOUT, default 10]")
    p.add_argument("--max-header-bytes", dest="max_header_bytes", type=int,
                   help="larger request lines get 414, larger headers 431 "
                        "[MLBUILD_MAX_HEADER_BYTES, default 32768]")
    p.add_argument("--keepalive-timeout", dest="keepalive_timeout", type=float,
                   help="seconds an idle keep-alive connection stays open "
                        "[MLBUILD_KEEPALIVE_TIMEOUT, default 5]")
    p.add_argument("--log-level", dest="log_level",
                   choices=["debug", "info", "warning", "error"],
                   help="[MLBUILD_LOG_LEVEL, default info]")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), serve, and return the exit code."""
    import os

    from mlbuild import __version__
    from mlbuild.runtime import azml, logformat

    args = build_parser().parse_args(argv)
    try:
        notes = azml.export_before_load(args, os.environ)
        config = RuntimeConfig.from_env()
        options = ServerOptions.from_env()
    except ValueError as exc:
        print(f"mlbuild runtime: {exc}", file=sys.stderr)
        return EXIT_USAGE
    options = options.with_overrides(
        host=args.host, port=args.port, health_port=args.health_port, workers=args.workers,
        reuse_port=args.reuse_port, ready_file=args.ready_file,
        graceful_timeout=args.graceful_timeout, log_level=args.log_level,
        header_timeout=args.header_timeout, max_header_bytes=args.max_header_bytes,
        keepalive_timeout=args.keepalive_timeout)
    cors = tuple(o.strip() for o in args.cors_origins.split(",") if o.strip()) \
        if args.cors_origins is not None else None
    config = config.with_overrides(entry_script=args.entry_script, model_dir=args.model_dir,
                                   max_body_bytes=args.max_body_bytes, cors_origins=cors,
                                   no_code_model=args.no_code_model,
                                   no_code_framework=args.no_code_framework,
                                   dispatch=args.dispatch)
    if args.request_timeout is not None:  # 0 switches a timeout from the environment off
        config = replace(config, request_timeout=args.request_timeout
                         if args.request_timeout > 0 else None)
    if options.health_port == options.port:  # health is on the main port anyway
        options = replace(options, health_port=None)
    problems = options.problems()
    if not config.entry_script and not config.no_code_model:
        problems.append("nothing to serve: give --entry-script (or MLBUILD_ENTRY_SCRIPT, "
                        "AZUREML_ENTRY_SCRIPT) or --no-code-model")
    if problems:
        for problem in problems:
            print(f"mlbuild runtime: {problem}", file=sys.stderr)
        return EXIT_USAGE
    azml.export_after_options(os.environ, port=options.port,
                              health_port=options.health_port, workers=options.workers)
    if options.log_level in ("debug", "info"):  # --log-level warning: quiet
        azml.write(azml.banner(os.environ, version=__version__, host=options.host,
                               port=options.port, health_port=options.health_port,
                               cors=config.cors_origins, timeout=config.request_timeout))
        if notes:
            azml.write("\n".join(notes) + "\n\n")
    try:
        logformat.setup(options.log_level, config.app_root, config.entry_script)
    except ValueError as exc:
        print(f"mlbuild runtime: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from mlbuild.runtime.server import run_server  # uvicorn only now that there is work

    return run_server(config, options)


if __name__ == "__main__":
    _code = main()
    from mlbuild.runtime.server import exit_fast  # no interpreter teardown (~0.3 s a stop)

    exit_fast(_code)
