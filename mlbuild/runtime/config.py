"""Runtime configuration: one frozen object, read from the environment and the CLI."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

DEFAULT_PORT = 5001
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
DISPATCH_MODES = ("inline", "thread")


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in (value or "").split(",") if p.strip())


def _bool(value: str | None, default: bool) -> bool:
    if value is None or value == "":
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


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
        dispatch: ``inline`` calls a sync ``run`` in the event-loop thread,
            ``thread`` in a one-thread pool (see app.py for the measured trade-off).
        access_log: One line per request on stderr.
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
    dispatch: str = "inline"
    access_log: bool = True
    extra: dict = field(default_factory=dict, compare=False)

    @classmethod
    def from_env(cls, environ: os._Environ | dict | None = None) -> "RuntimeConfig":
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
            service_name=env.get("MLBUILD_SERVICE_NAME") or None,
            dispatch=dispatch,
            access_log=_bool(env.get("MLBUILD_ACCESS_LOG"), True),
        )

    def with_overrides(self, **changes) -> "RuntimeConfig":
        """A copy with the non-None values of ``changes`` applied."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def export_model_dir(self, environ=None) -> None:
        """Set both model-dir variables to ``model_dir`` exactly as given (if given)."""
        env = os.environ if environ is None else environ
        if self.model_dir:
            env["MLBUILD_MODEL_DIR"] = self.model_dir
            env["AZUREML_MODEL_DIR"] = self.model_dir


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
