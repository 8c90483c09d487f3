"""Stand-ins for the Azure ML modules that v1 entry scripts import.

Provided only when the real packages are absent: :func:`install` appends a finder to the
*end* of ``sys.meta_path``, so it is asked only after the normal import machinery failed
to find a module. With ``azureml-core`` installed, ``azureml.core.model`` is the real one.

    azureml.core.model                          Model.get_model_path
    azureml.contrib.services.aml_request        AMLRequest, rawhttp
    azureml.contrib.services.aml_response       AMLResponse
    azureml_inference_server_http.api.aml_request / aml_response   (same classes)
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import sys
from collections.abc import Mapping
from urllib.parse import parse_qsl

from mlbuild.runtime.models import get_model_path

RAWHTTP_ATTR = "_mlbuild_rawhttp"
_rawHttpRequested = False  # the flag the Azure module keeps; mirrored for scripts reading it


def rawhttp(func):
    """Mark ``run(request)`` as wanting the raw HTTP request (an :class:`AMLRequest`)."""
    global _rawHttpRequested
    _rawHttpRequested = True
    setattr(func, RAWHTTP_ATTR, True)
    return func


class Headers(Mapping):
    """Case-insensitive, read-only view of request headers (werkzeug-like ``get``)."""

    def __init__(self, raw: list[tuple[bytes, bytes]]):
        self._items = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw]
        self._map: dict[str, str] = {}
        for k, v in self._items:
            key = k.lower()
            self._map[key] = f"{self._map[key]}, {v}" if key in self._map else v

    def __getitem__(self, key: str) -> str:
        return self._map[key.lower()]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._map

    def __iter__(self):
        return iter(k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def items(self):  # the original spelling of each header, like werkzeug
        return list(self._items)

    def get(self, key, default=None, type=None):  # noqa: A002 - werkzeug's signature
        value = self._map.get(key.lower(), default)
        if type is not None and value is not None:
            try:
                return type(value)
            except ValueError:
                return default
        return value


class Args(dict):
    """Query arguments: ``args["k"]``/``args.get("k")`` give the first value, ``getlist`` all."""

    def __init__(self, query: bytes | str):
        if isinstance(query, bytes):
            query = query.decode("latin-1")
        self._lists: dict[str, list[str]] = {}
        for k, v in parse_qsl(query, keep_blank_values=True):
            self._lists.setdefault(k, []).append(v)
        super().__init__((k, vs[0]) for k, vs in self._lists.items())

    def getlist(self, key: str) -> list[str]:
        return list(self._lists.get(key, []))


class AMLRequest:
    """The request a ``@rawhttp`` ``run(request)`` receives.

    The subset of the Flask/werkzeug ``Request`` that Azure ML scripts use: ``method``,
    ``path``, ``full_path``, ``args``, ``headers``, ``content_type``, ``get_data()``,
    ``data``, ``get_json()``, ``json``, ``query_string``, ``remote_addr``.
    """

    def __init__(self, method, path, query_string, headers, body, remote_addr=None):
        self.method = method
        self.path = path
        self.query_string = query_string if isinstance(query_string, bytes) else query_string.encode()
        self.args = Args(self.query_string)
        self.headers = headers if isinstance(headers, Headers) else Headers(headers)
        self._body = body
        self.remote_addr = remote_addr

    @property
    def full_path(self) -> str:
        return f"{self.path}?{self.query_string.decode('latin-1')}"

    @property
    def content_type(self) -> str | None:
        return self.headers.get("content-type")

    @property
    def mimetype(self) -> str:
        return (self.content_type or "").split(";")[0].strip().lower()

    @property
    def content_length(self) -> int:
        return len(self._body)

    def get_data(self, cache: bool = True, as_text: bool = False, parse_form_data: bool = False):
        return self._body.decode("utf-8", "replace") if as_text else self._body

    @property
    def data(self) -> bytes:
        return self._body

    def get_json(self, force: bool = False, silent: bool = False, cache: bool = True):
        if not force and "json" not in self.mimetype:
            return None
        try:
            return json.loads(self._body)
        except ValueError:
            if silent:
                return None
            raise

    @property
    def json(self):
        return self.get_json()


class AMLResponse:
    """A response returned as-is from ``run()``: ``AMLResponse(message, status_code, headers)``.

    As in Azure ML: ``json_str=True`` JSON-encodes ``message``; ``None`` becomes ``{}``;
    otherwise ``message`` (str or bytes) is the body.
    """

    def __init__(self, message, status_code=200, response_headers=None, json_str=False,
                 run_function_failed=False):
        headers = dict(response_headers or {})
        if message is None:
            body, ctype = b"{}", "application/json"
        elif json_str:
            body, ctype = json.dumps(message).encode(), "application/json"
        else:
            body = message if isinstance(message, (bytes, bytearray)) else str(message).encode()
            ctype = "text/html; charset=utf-8"  # Flask's default, which Azure scripts get
        if not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = ctype
        self.status_code = int(status_code)
        self.headers = headers
        self.run_function_failed = run_function_failed
        self._body = bytes(body)

    def get_data(self, as_text: bool = False):
        return self._body.decode() if as_text else self._body

    @property
    def data(self) -> bytes:
        return self._body

    @property
    def status(self) -> str:
        return str(self.status_code)


class Model:
    """``azureml.core.model.Model`` inside a service: only ``get_model_path`` works."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError(
            "azureml.core.model.Model is only a compatibility stand-in here "
            "(mlbuild runtime): use Model.get_model_path(model_name=..., version=...)"
        )

    @staticmethod
    def get_model_path(model_name, version=None, _workspace=None):
        return get_model_path(model_name, version)


# Module name -> names it exports from this module (None: an empty package).
_MODULES: dict[str, tuple[str, ...] | None] = {
    "azureml": None,
    "azureml.core": None,
    "azureml.core.model": ("Model",),
    "azureml.contrib": None,
    "azureml.contrib.services": None,
    "azureml.contrib.services.aml_request": ("AMLRequest", "rawhttp", "_rawHttpRequested"),
    "azureml.contrib.services.aml_response": ("AMLResponse",),
    "azureml_inference_server_http": None,
    "azureml_inference_server_http.api": None,
    "azureml_inference_server_http.api.aml_request": ("AMLRequest", "rawhttp", "_rawHttpRequested"),
    "azureml_inference_server_http.api.aml_response": ("AMLResponse",),
}


class _CompatFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves :data:`_MODULES`; sits last on ``sys.meta_path`` so real packages win."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _MODULES:
            return None
        is_pkg = _MODULES[fullname] is None
        spec = importlib.machinery.ModuleSpec(fullname, self, origin="mlbuild-compat",
                                              is_package=is_pkg)
        return spec

    def create_module(self, spec):
        return None  # default module creation

    def exec_module(self, module):
        names = _MODULES[module.__name__]
        module.__mlbuild_compat__ = True
        for name in names or ():
            setattr(module, name, globals()[name])


_FINDER = _CompatFinder()


def install() -> None:
    """Make the stand-in modules importable (idempotent)."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.append(_FINDER)


def rawhttp_requested(run) -> bool:
    """Whether ``run`` was decorated with ``@rawhttp`` (ours or Azure's real one)."""
    if getattr(run, RAWHTTP_ATTR, False):
        return True
    for mod in ("azureml.contrib.services.aml_request",
                "azureml_inference_server_http.api.aml_request"):
        real = sys.modules.get(mod)
        if real is not None and not getattr(real, "__mlbuild_compat__", False):
            if getattr(real, "_rawHttpRequested", False):
                return True
    return False
