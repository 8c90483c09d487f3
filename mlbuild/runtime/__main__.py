"""``python -m mlbuild.runtime``: serve one entry script (or no-code model).

Accepts the Azure ML inference server's spellings (``--entry_script``, ``--model_dir``,
``--worker_count``, ``--access_control_allow_origins``) beside mlbuild's.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from mlbuild.runtime.config import DEFAULT_PORT, DISPATCH_MODES, RuntimeConfig


def _env_int(*names: str, default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value:
            return int(value)
    return default


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlbuild.runtime",
                                description="Serve an entry script's init()/run() over HTTP.")
    p.add_argument("--entry-script", "--entry_script", dest="entry_script",
                   help="script defining init() and run() [MLBUILD_ENTRY_SCRIPT]")
    p.add_argument("--model-dir", "--model_dir", dest="model_dir",
                   help="model folder, given to the script as MLBUILD_MODEL_DIR and "
                        "AZUREML_MODEL_DIR exactly as written")
    p.add_argument("--host", default=os.environ.get("MLBUILD_HOST", "0.0.0.0"))
    p.add_argument("--port", type=int,
                   default=_env_int("MLBUILD_PORT", "AZUREML_SERVER_PORT", default=DEFAULT_PORT))
    p.add_argument("--workers", "--worker_count", dest="workers", type=int,
                   default=_env_int("MLBUILD_WORKERS", "WORKER_COUNT", default=1))
    p.add_argument("--max-body-bytes", dest="max_body_bytes", type=int,
                   help="larger bodies get 413 [MLBUILD_MAX_BODY_BYTES, default 10 MB]")
    p.add_argument("--cors-origins", "--access_control_allow_origins", dest="cors_origins",
                   help="comma-separated allowed origins [MLBUILD_CORS_ORIGINS]")
    p.add_argument("--no-code-model", dest="no_code_model",
                   help="serve this model file without a script [MLBUILD_NO_CODE_MODEL]")
    p.add_argument("--no-code-framework", dest="no_code_framework")
    p.add_argument("--dispatch", choices=DISPATCH_MODES,
                   help="where a sync run() executes [MLBUILD_RUN_DISPATCH, default inline]")
    p.add_argument("--log-level", default=os.environ.get("MLBUILD_LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = RuntimeConfig.from_env()
    except ValueError as exc:
        print(f"mlbuild runtime: {exc}", file=sys.stderr)
        return 2
    cors = tuple(o.strip() for o in args.cors_origins.split(",") if o.strip()) \
        if args.cors_origins is not None else None
    config = config.with_overrides(entry_script=args.entry_script, model_dir=args.model_dir,
                                   max_body_bytes=args.max_body_bytes, cors_origins=cors,
                                   no_code_model=args.no_code_model,
                                   no_code_framework=args.no_code_framework,
                                   dispatch=args.dispatch)
    if not config.entry_script and not config.no_code_model:
        print("mlbuild runtime: nothing to serve: give --entry-script (or MLBUILD_ENTRY_SCRIPT)"
              " or --no-code-model", file=sys.stderr)
        return 2
    from mlbuild.runtime.server import run_server  # uvicorn only now that there is work

    logging.getLogger("mlbuild.runtime").info(
        "serving %s on http://%s:%d (workers=%d, dispatch=%s, auth=%s)",
        config.entry_script or config.no_code_model, args.host, args.port, args.workers,
        config.dispatch, "key" if config.auth_keys else "none")
    return run_server(config, host=args.host, port=args.port, workers=args.workers,
                      log_level=args.log_level)


if __name__ == "__main__":
    sys.exit(main())
