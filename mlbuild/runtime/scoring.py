"""Loading what serves requests: an entry script (``init``/``run``) or a no-code model.

How ``run`` is called, by what the script declares (as the Azure ML server does):

    @rawhttp run(request)          mode "raw":  an AMLRequest (method, headers, body bytes)
    inference_schema decorators    mode "json": run(**parsed_body), body must be an object
    plain run(raw_data)            mode "text": the body as a str, undecoded JSON
    no-code model                  mode "json": run(parsed_body)

``@batched`` (batching.py) on a raw or text run() makes it take a list of what it gets
one of above, and return a list: :attr:`Scorer.batch`. No-code models can always be
batched; the app does so when the service's batching settings ask for it.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import os
import sys

from mlbuild.runtime import batching, compat
from mlbuild.runtime.config import RuntimeConfig

log = logging.getLogger("azmlinfsrv.user_script")


class LoadError(Exception):
    """The entry script or model cannot be loaded; the message says which and why."""


class Scorer:
    """What the app calls per request. ``init()`` once, then ``run`` per request."""

    def __init__(self, run, init=None, mode="text", name="service", spread_json=False):
        self.run = run
        self._init = init
        self.mode = mode
        self.name = name
        self.spread_json = spread_json  # json mode: run(**body) instead of run(body)
        self.is_async = inspect.iscoroutinefunction(inspect.unwrap(run)) or \
            inspect.iscoroutinefunction(run)
        self.input_schema: dict | None = None
        self.output_schema: dict | None = None
        # run(data, request_headers) gets the request's headers as a dict (azmlinfsrv).
        self.wants_headers = _takes_request_headers(run)
        # How to call it in batches (batching.py); None: one request per call only.
        self.batch: batching.BatchSpec | None = None

    def init(self) -> None:
        if self._init is not None:
            self._init()


def _takes_request_headers(run) -> bool:
    try:
        return "request_headers" in inspect.signature(run).parameters
    except (TypeError, ValueError):
        return False


def resolve_entry_script(path: str, app_root: str | None) -> str:
    """The script's path: a relative one is looked up in ``app_root`` (as azmlinfsrv does
    for ``AZUREML_ENTRY_SCRIPT``), then in the current folder (as it does for
    ``--entry_script``).

    Raises:
        LoadError: The file does not exist.
    """
    if os.path.isabs(path) or not app_root:
        candidates = [path]
    else:
        candidates = [os.path.join(app_root, path), path]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    where = f" (looked in AML_APP_ROOT={app_root!r} and {os.getcwd()!r})" \
        if len(candidates) > 1 else ""
    raise LoadError(f"entry script {path!r} does not exist{where}")


def _import_script(path: str):
    folder = os.path.dirname(os.path.abspath(path))
    if folder not in sys.path:
        sys.path.insert(0, folder)
    stem = os.path.splitext(os.path.basename(path))[0]
    # NOTE: registered under its own name, as `import score` would, unless that name is
    # taken (a stdlib module, say), so pickles and `from score import X` behave as locally.
    name = stem if stem.isidentifier() and stem not in sys.modules else "mlbuild_entry_script"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _schema_decorated(run) -> tuple[bool, dict | None, dict | None]:
    schema_util = sys.modules.get("inference_schema.schema_util")
    if schema_util is None:  # the decorators cannot be present without the package
        return False, None, None
    if not schema_util.is_schema_decorated(run):
        return False, None, None
    return True, schema_util.get_input_schema(run), schema_util.get_output_schema(run)


# What inference_schema and numpy raise for a value they cannot convert. Not TimeoutError:
# the request timeout may land inside the conversion, and that is no fault of the input.
CONVERSION_ERRORS = (ValueError, TypeError, OverflowError, KeyError, IndexError)


def _raised_by_inference_schema_conversion(exc: BaseException) -> bool:
    if not isinstance(exc, CONVERSION_ERRORS):
        return False
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "_deserialize_input_argument" and \
                frame.f_globals.get("__name__", "").startswith("inference_schema"):
            return True
        tb = tb.tb_next
    return False


def _input_errors_as_400(run):
    """A schema-decorated ``run`` whose request errors raise ``BadInput`` (a 400).

    Two errors are the request's, not the script's: keys that do not bind to run()'s
    parameters (one missing, one unknown), and a value inference_schema cannot convert to
    the declared type. The conversion runs inside the decorator, before run()'s own code;
    an exception raised under its ``_deserialize_input_argument`` is such a value. Every
    other exception stays run()'s own (a 500).
    """
    from mlbuild.runtime.nocode import BadInput

    try:
        signature = inspect.signature(run)  # the script's run(), through the decorators
    except (TypeError, ValueError):
        signature = None

    wants_headers = signature is not None and "request_headers" in signature.parameters

    def check(payload: dict) -> None:
        if signature is None:
            return
        try:
            if wants_headers and "request_headers" not in payload:
                signature.bind(request_headers=None, **payload)
            else:
                signature.bind(**payload)
        except TypeError as exc:
            names = ", ".join(signature.parameters)
            raise BadInput(f"the request's keys do not match run({names}): {exc}") from None

    def as_bad_input(exc: Exception) -> BadInput:
        return BadInput(f"input does not match run()'s schema: {type(exc).__name__}: {exc}")

    if inspect.iscoroutinefunction(inspect.unwrap(run)):
        @functools.wraps(run)
        async def checked(**payload):
            check(payload)
            try:
                return await run(**payload)
            except Exception as exc:
                if _raised_by_inference_schema_conversion(exc):
                    raise as_bad_input(exc) from exc
                raise
    else:
        @functools.wraps(run)
        def checked(**payload):
            check(payload)
            try:
                return run(**payload)
            except Exception as exc:
                if _raised_by_inference_schema_conversion(exc):
                    raise as_bad_input(exc) from exc
                raise
    return checked


def load_entry_script(path: str, app_root: str | None = None,
                      source_dir: str | None = None) -> Scorer:
    """Import the script (its folder on ``sys.path``) and work out how to call ``run``.

    Exceptions raised by the script's own top-level code propagate unchanged, so their
    traceback names the script's line.

    Raises:
        LoadError: Missing file, or no callable ``run``.
    """
    resolved = resolve_entry_script(path, app_root)
    if app_root and os.path.abspath(app_root) not in sys.path:
        sys.path.insert(0, os.path.abspath(app_root))
    if source_dir:  # azmlinfsrv's AZUREML_SOURCE_DIRECTORY, relative to AML_APP_ROOT
        folder = os.path.abspath(os.path.join(app_root or os.getcwd(), source_dir))
        if folder not in sys.path:
            sys.path.insert(0, folder)
    compat.install()
    module = _import_script(resolved)
    log.info("Found user script at %s", os.path.abspath(resolved))
    run = getattr(module, "run", None)
    if not callable(run):
        raise LoadError(f"entry script {resolved!r} defines no run() function")
    init = getattr(module, "init", None)
    if init is not None and not callable(init):
        raise LoadError(f"entry script {resolved!r}: init is not a function")
    if init is None:
        log.warning("entry script %s defines no init(); continuing without it", resolved)
    name = os.path.splitext(os.path.basename(resolved))[0]
    batched = batching.is_batched(run)
    if batched and _takes_request_headers(run):
        raise LoadError(f"entry script {resolved!r}: a @batched run() cannot take "
                        "request_headers (it gets a list of inputs, not one request)")
    if compat.rawhttp_requested(run):
        log.info("run() is decorated with @rawhttp. Server will invoke it with the "
                 "request object%s.", "s, in a list (@batched)" if batched else "")
        scorer = Scorer(run, init, mode="raw", name=name)
        if batched:
            scorer.batch = batching.script_spec(run)
        return scorer
    decorated, in_schema, out_schema = _schema_decorated(run)
    if decorated and batched:
        raise LoadError(f"entry script {resolved!r}: run() is @batched and decorated with "
                        "inference_schema's @input_schema; a @batched run() takes a list of "
                        "request bodies: drop one of the two")
    if decorated:
        scorer = Scorer(_input_errors_as_400(run), init, mode="json", name=name,
                        spread_json=True)
        scorer.input_schema, scorer.output_schema = in_schema, out_schema
        log.info("run() is decorated with @input_schema. Server will invoke it with the "
                 "body's keys as arguments.")
        return scorer
    if batched:
        log.info("run() is @batched. Server will invoke it with a list of inputs, each in "
                 "JSON string.")
        scorer = Scorer(run, init, mode="text", name=name)
        scorer.batch = batching.script_spec(run)
        return scorer
    log.info("run() is not decorated. Server will invoke it with the input in JSON string.")
    return Scorer(run, init, mode="text", name=name)


def load(config: RuntimeConfig) -> Scorer:
    """The scorer the configuration asks for (entry script or no-code model).

    Raises:
        LoadError: Nothing to serve, or it cannot be loaded.
    """
    config.export_model_dir()
    if config.entry_script:
        return load_entry_script(config.entry_script, config.app_root, config.source_dir)
    if config.no_code_model:
        from mlbuild.runtime import nocode

        try:
            model = nocode.load(config.no_code_model, config.no_code_framework)
        except ValueError as exc:
            raise LoadError(str(exc)) from exc
        name = os.path.splitext(os.path.basename(os.path.normpath(config.no_code_model)))[0]
        scorer = Scorer(model.run, model.init, mode="json", name=name)
        scorer.batch = batching.BatchSpec(model.run_batch, prepare=model.prepare)
        return scorer
    raise LoadError(
        "nothing to serve: give an entry script (--entry-script or MLBUILD_ENTRY_SCRIPT)"
        " or a no-code model (MLBUILD_NO_CODE_MODEL)"
    )
