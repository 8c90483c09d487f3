"""Stand-ins for the Azure ML modules that v1 entry scripts import.

Provided only when the real packages are absent: :func:`install` appends a finder to the
*end* of ``sys.meta_path``, so it is asked only after the normal import machinery failed
to find a module. With ``azureml-core`` installed, ``azureml.core.model`` is the real one.

    azureml.core.model                          Model.get_model_path
    azureml.contrib.services.aml_request        AMLRequest, rawhttp
    azureml.contrib.services.aml_response       AMLResponse
    azureml_inference_server_http.api.aml_request / aml_response   (same classes)
    azureml_inference_server_http.log_config    AMLLogFormatter, RootAccessFilter (for a
                                                logging.json written for azmlinfsrv)
    azureml.monitoring[.modeldatacollector]     ModelDataCollector (datacollect.py)

The request a ``@rawhttp`` ``run(request)`` gets is always :class:`AMLRequest` (with or
without the real package: the real one is a Flask request, and there is no Flask here).
It behaves as werkzeug's request for what scoring scripts use -- see its docstring. A
script may return either package's ``AMLResponse`` (the real one is a Flask response):
the app reads ``status_code``, ``headers``, ``get_data()`` and, when ``is_streamed``,
the iterable ``response``.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import importlib.abc
import importlib.machinery
import io
import json
import sys
from http import HTTPStatus
from urllib.parse import parse_qsl

from mlbuild.runtime.logformat import AMLLogFormatter, RootAccessFilter  # noqa: F401 - _MODULES
from mlbuild.runtime.models import get_model_path

RAWHTTP_ATTR = "_mlbuild_rawhttp"
_rawHttpRequested = False  # the flag the Azure module keeps; mirrored for scripts reading it

# The x-request-id of the request whose run() is running (bytes, as the app has it), for
# ModelDataCollector (Azure's read it from Flask's request). Set only once a collector
# is on (datacollect.py switches it on): a service without one pays a call and a test a
# request (~0.05 us), one with one a partial and a ContextVar.set (~0.6 us).
CURRENT_REQUEST_ID: contextvars.ContextVar = contextvars.ContextVar(
    "mlbuild_request_id", default=None)
_tag_requests = False


def set_request_tagging(on: bool) -> None:
    global _tag_requests
    _tag_requests = on


def _run_tagged(run, request_id, *args, **kwargs):
    CURRENT_REQUEST_ID.set(request_id)
    return run(*args, **kwargs)


def tag_this_task(request_id) -> None:
    """Set :data:`CURRENT_REQUEST_ID` in the running task's context (when tagging is on)."""
    if _tag_requests:
        CURRENT_REQUEST_ID.set(request_id)


def with_request_id(run, request_id):
    """``run``, setting :data:`CURRENT_REQUEST_ID` when called (in whichever thread runs
    it; an ``async def run`` gets it when its coroutine is made, in the request's task)."""
    if not _tag_requests:
        return run
    return functools.partial(_run_tagged, run, request_id)


def rawhttp(func):
    """Mark ``run(request)`` as wanting the raw HTTP request (an :class:`AMLRequest`)."""
    global _rawHttpRequested
    _rawHttpRequested = True
    setattr(func, RAWHTTP_ATTR, True)
    return func


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, bool):  # werkzeug writes True as "True"
        return str(value)
    return str(value)


_FAILED = object()


def _converted(value, type, default):  # noqa: A002 - werkzeug's name
    """``type(value)``, or ``default`` when it does not convert (werkzeug's ``get``)."""
    if type is None:
        return value
    try:
        return type(value)
    except (ValueError, TypeError):
        return default


def _all_converted(values, type) -> list:  # noqa: A002
    """The values that convert, converted (werkzeug's ``getlist``)."""
    out = [_converted(v, type, _FAILED) for v in values]
    return [v for v in out if v is not _FAILED]


class Headers:
    """werkzeug's ``Headers``, for what scripts do with request and response headers.

    An ordered list of ``(name, value)`` pairs; lookups ignore case. Iterating yields the
    pairs (``for k, v in request.headers``), ``keys()``/``values()``/``items()`` their
    parts, ``headers["X"]`` and ``get("x", default, type=int)`` the first value (a
    missing name is a ``KeyError``), ``getlist`` every value; ``dict(headers)`` works.
    """

    __slots__ = ("_list",)

    def __init__(self, items=None):
        self._list: list[tuple[str, str]] = []
        if items is not None:
            self.extend(items)

    @classmethod
    def from_asgi(cls, raw) -> Headers:
        """Request headers as a WSGI server hands them to werkzeug: names in title case
        (``X-Request-Id``), a repeated header joined into one value with ``", "``."""
        out = cls()
        seen: dict[str, int] = {}
        pairs = out._list
        for name, value in raw:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            at = seen.get(key)
            if at is None:
                seen[key] = len(pairs)
                pairs.append((key.title(), text))
            else:
                pairs[at] = (pairs[at][0], f"{pairs[at][1]}, {text}")
        return out

    # -- reading ---------------------------------------------------------------------
    def __getitem__(self, key):
        if isinstance(key, int):
            return self._list[key]
        lower = key.lower()
        for name, value in self._list:
            if name.lower() == lower:
                return value
        raise KeyError(key)

    def get(self, key, default=None, type=None):  # noqa: A002 - werkzeug's signature
        try:
            value = self[key]
        except KeyError:
            return default
        return _converted(value, type, default)

    def getlist(self, key, type=None):  # noqa: A002
        lower = key.lower()
        return _all_converted([v for k, v in self._list if k.lower() == lower], type)

    get_all = getlist

    def __contains__(self, key) -> bool:
        if not isinstance(key, str):
            return False
        lower = key.lower()
        return any(name.lower() == lower for name, _ in self._list)

    has_key = __contains__

    def __iter__(self):
        return iter(list(self._list))

    def __len__(self) -> int:
        return len(self._list)

    def __bool__(self) -> bool:
        return bool(self._list)

    def keys(self, lower: bool = False):
        return [name.lower() if lower else name for name, _ in self._list]

    def values(self):
        return [value for _, value in self._list]

    def items(self, lower: bool = False):
        return [(name.lower() if lower else name, value) for name, value in self._list]

    def to_wsgi_list(self):
        return list(self._list)

    def copy(self) -> Headers:
        return Headers(self._list)

    __copy__ = copy

    def __eq__(self, other) -> bool:
        if isinstance(other, Headers):
            return self._list == other._list
        return NotImplemented

    def __repr__(self) -> str:
        return f"Headers({self._list!r})"

    def __str__(self) -> str:
        return "".join(f"{k}: {v}\r\n" for k, v in self._list) + "\r\n"

    # -- writing (response headers; werkzeug's request headers are read-only) ---------
    def add(self, key, value, **params) -> None:
        text = _text(value)
        for pname, pvalue in params.items():
            if pvalue is None:
                continue
            text += f"; {pname.replace('_', '-')}={pvalue}"
        self._list.append((str(key), text))

    add_header = add

    def set(self, key, value, **params) -> None:
        """Replace every ``key`` by one value (in the first one's place)."""
        probe = Headers()
        probe.add(key, value, **params)
        new = probe._list[0]
        lower = key.lower()
        out, placed = [], False
        for pair in self._list:
            if pair[0].lower() == lower:
                if not placed:
                    out.append(new)
                    placed = True
            else:
                out.append(pair)
        if not placed:
            out.append(new)
        self._list = out

    def __setitem__(self, key, value) -> None:
        if isinstance(key, int):
            self._list[key] = (str(value[0]), _text(value[1]))
        else:
            self.set(key, value)

    def setdefault(self, key, default):
        if key in self:
            return self[key]
        self.set(key, default)
        return _text(default)

    def remove(self, key) -> None:
        lower = key.lower()
        self._list = [p for p in self._list if p[0].lower() != lower]

    def __delitem__(self, key) -> None:
        if isinstance(key, int):
            del self._list[key]
        else:
            self.remove(key)

    def pop(self, key=None, default=KeyError):
        if key is None:
            return self._list.pop()
        if isinstance(key, int):
            return self._list.pop(key)
        try:
            value = self[key]
        except KeyError:
            if default is KeyError:
                raise
            return default
        self.remove(key)
        return value

    def extend(self, items=None, **kwargs) -> None:
        if items is not None:
            if hasattr(items, "items") and not isinstance(items, Headers):
                items = items.items()
            for key, value in items:
                self._list.append((str(key), _text(value)))
        for key, value in kwargs.items():
            self._list.append((key, _text(value)))

    def update(self, items=None, **kwargs) -> None:
        if items is not None:
            if hasattr(items, "items") and not isinstance(items, Headers):
                items = items.items()
            for key, value in items:
                self.set(key, value)
        for key, value in kwargs.items():
            self.set(key, value)

    def clear(self) -> None:
        self._list = []


class MultiDict(dict):
    """werkzeug's ``MultiDict``: ``d[k]``/``d.get(k, default, type)`` give the first
    value, ``getlist`` all of them; ``dict(d)`` and ``to_dict()`` the first of each."""

    def __init__(self, pairs=()):
        super().__init__()
        self._lists: dict[str, list] = {}
        for key, value in pairs:
            self.add(key, value)

    def add(self, key, value) -> None:
        values = self._lists.setdefault(key, [])
        values.append(value)
        if len(values) == 1:
            dict.__setitem__(self, key, value)

    def get(self, key, default=None, type=None):  # noqa: A002 - werkzeug's signature
        if key not in self:
            return default
        return _converted(self[key], type, default)

    def getlist(self, key, type=None):  # noqa: A002
        return _all_converted(self._lists.get(key, []), type)

    def lists(self):
        return [(k, list(v)) for k, v in self._lists.items()]

    def items(self, multi: bool = False):
        if multi:
            return [(k, v) for k, vs in self._lists.items() for v in vs]
        return list(dict.items(self))

    def to_dict(self, flat: bool = True) -> dict:
        return dict(dict.items(self)) if flat else {k: list(v) for k, v in self._lists.items()}


class Args(MultiDict):
    """Query arguments (``request.args``)."""

    def __init__(self, query: bytes | str):
        if isinstance(query, bytes):
            query = query.decode("latin-1")
        super().__init__(parse_qsl(query, keep_blank_values=True))


class FileStorage:
    """An uploaded file of a multipart form (``request.files["image"]``), as werkzeug's."""

    def __init__(self, data: bytes, filename: str | None, name: str | None,
                 content_type: str | None, headers: Headers | None = None):
        self.stream = io.BytesIO(data)
        self.filename = filename
        self.name = name
        self.content_type = content_type
        self.headers = headers or Headers()
        self.content_length = len(data)

    @property
    def mimetype(self) -> str:
        return (self.content_type or "").split(";")[0].strip().lower()

    def read(self, size: int = -1) -> bytes:
        return self.stream.read(size)

    def save(self, dst, buffer_size: int = 16384) -> None:
        """Write the file to ``dst``, a path or a writable binary file."""
        data = self.stream.getvalue()
        if hasattr(dst, "write"):
            dst.write(data)
        else:
            with open(dst, "wb") as fh:
                fh.write(data)

    def __bool__(self) -> bool:
        return bool(self.filename)

    def __repr__(self) -> str:
        return f"<FileStorage: {self.filename!r} ({self.content_type!r})>"


def _parse_form(content_type: str, body: bytes) -> tuple[MultiDict, MultiDict]:
    """``(form, files)`` of a urlencoded or multipart/form-data body; empty for others."""
    mimetype = content_type.split(";")[0].strip().lower()
    form, files = MultiDict(), MultiDict()
    if mimetype == "application/x-www-form-urlencoded":
        for key, value in parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True):
            form.add(key, value)
    elif mimetype == "multipart/form-data":
        from email import policy
        from email.parser import BytesParser

        message = BytesParser(policy=policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
        if message.is_multipart():
            for part in message.iter_parts():
                name = part.get_param("name", header="content-disposition")
                payload = part.get_payload(decode=True) or b""
                filename = part.get_filename()
                if filename is None:
                    charset = part.get_content_charset() or "utf-8"
                    form.add(name, payload.decode(charset, "replace"))
                else:
                    headers = Headers((k, str(v)) for k, v in part.items())
                    files.add(name, FileStorage(payload, filename, name,
                                                part.get("content-type"), headers))
    return form, files


class AMLRequest:
    """The request a ``@rawhttp`` ``run(request)`` receives: werkzeug's ``Request`` for
    everything scoring scripts use.

    ``method``, ``path``, ``full_path``, ``url``, ``base_url``, ``host``, ``host_url``,
    ``url_root``, ``scheme``, ``query_string`` (bytes), ``args`` (a MultiDict),
    ``headers`` (:class:`Headers`: ``for name, value in request.headers``), ``cookies``,
    ``content_type``, ``mimetype``, ``mimetype_params``, ``content_length``,
    ``content_encoding``, ``user_agent``, ``is_json``, ``get_data(as_text=)``, ``data``,
    ``stream``, ``get_json(force=, silent=)``, ``json``, ``form``, ``files`` (multipart
    and urlencoded bodies), ``values``, ``remote_addr``, ``environ`` (a minimal WSGI
    view).
    """

    def __init__(self, method, path, query_string, headers, body, remote_addr=None,
                 scheme: str = "http", server: tuple | None = None):
        self.method = method
        self.path = path
        self.query_string = query_string if isinstance(query_string, bytes) else query_string.encode()
        self.headers = headers if isinstance(headers, Headers) else Headers.from_asgi(headers)
        self._body = body
        self.remote_addr = remote_addr
        self.scheme = scheme
        self._server = server
        self._args: Args | None = None
        self._form: tuple[MultiDict, MultiDict] | None = None

    # -- where -----------------------------------------------------------------------
    @property
    def args(self) -> Args:
        if self._args is None:
            self._args = Args(self.query_string)
        return self._args

    @property
    def full_path(self) -> str:
        return f"{self.path}?{self.query_string.decode('latin-1')}"

    @property
    def host(self) -> str:
        host = self.headers.get("host")
        if host:
            return host
        if self._server:
            return f"{self._server[0]}:{self._server[1]}"
        return "localhost"

    @property
    def host_url(self) -> str:
        return f"{self.scheme}://{self.host}/"

    url_root = root_url = host_url

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}{self.path}"

    @property
    def url(self) -> str:
        query = self.query_string.decode("latin-1")
        return self.base_url + (f"?{query}" if query else "")

    @property
    def environ(self) -> dict:
        env = {"REQUEST_METHOD": self.method, "PATH_INFO": self.path,
               "QUERY_STRING": self.query_string.decode("latin-1"),
               "REMOTE_ADDR": self.remote_addr, "wsgi.url_scheme": self.scheme,
               "CONTENT_LENGTH": str(len(self._body))}
        for name, value in self.headers:
            key = name.upper().replace("-", "_")
            env[key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{key}"] = value
        return env

    # -- what ------------------------------------------------------------------------
    @property
    def content_type(self) -> str | None:
        return self.headers.get("content-type")

    @property
    def mimetype(self) -> str:
        return (self.content_type or "").split(";")[0].strip().lower()

    @property
    def mimetype_params(self) -> dict:
        out = {}
        for item in (self.content_type or "").split(";")[1:]:
            key, _, value = item.partition("=")
            if key.strip():
                out[key.strip().lower()] = value.strip().strip('"')
        return out

    @property
    def content_length(self) -> int:
        return len(self._body)

    @property
    def content_encoding(self) -> str | None:
        return self.headers.get("content-encoding")

    @property
    def user_agent(self) -> str:
        return self.headers.get("user-agent", "")

    @property
    def cookies(self) -> dict:
        from http.cookies import SimpleCookie

        jar = SimpleCookie()
        try:
            jar.load(self.headers.get("cookie", ""))
        except Exception:  # noqa: BLE001 - a malformed cookie header is no cookie
            return {}
        return {k: m.value for k, m in jar.items()}

    @property
    def is_json(self) -> bool:
        mt = self.mimetype
        return mt == "application/json" or (mt.startswith("application/") and mt.endswith("+json"))

    def get_data(self, cache: bool = True, as_text: bool = False, parse_form_data: bool = False):
        return self._body.decode("utf-8", "replace") if as_text else self._body

    @property
    def data(self) -> bytes:
        return self._body

    @property
    def stream(self) -> io.BytesIO:
        return io.BytesIO(self._body)

    input_stream = stream

    def get_json(self, force: bool = False, silent: bool = False, cache: bool = True):
        if not force and not self.is_json:
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

    def _forms(self) -> tuple[MultiDict, MultiDict]:
        if self._form is None:
            self._form = _parse_form(self.content_type or "", self._body)
        return self._form

    @property
    def form(self) -> MultiDict:
        return self._forms()[0]

    @property
    def files(self) -> MultiDict:
        return self._forms()[1]

    @property
    def values(self) -> MultiDict:
        out = MultiDict(self.args.items(multi=True))
        for key, value in self.form.items(multi=True):
            out.add(key, value)
        return out

    def __repr__(self) -> str:
        return f"<AMLRequest '{self.url}' [{self.method}]>"


def _is_stream(message) -> bool:
    """Whether a response body is an iterator to send item by item (a generator)."""
    return hasattr(message, "__next__") or hasattr(message, "__anext__")


class AMLResponse:
    """A response returned as-is from ``run()``, as Azure's (a Flask response):
    ``AMLResponse(message, status_code, response_headers, json_str, run_function_failed)``.

    ``json_str=True`` JSON-encodes ``message``; ``None`` becomes ``{}``; a str or bytes is
    the body (``text/html; charset=utf-8`` unless the headers say otherwise, Flask's
    default); a generator or other iterator is streamed, one chunk per item. As in
    Azure's class, a header value holding commas becomes one header per part.
    """

    def __init__(self, message, status_code=200, response_headers=None, json_str=False,
                 run_function_failed=False):
        given = dict(response_headers or {})
        self.headers = Headers()
        self.response = None
        self._body = b""
        if message is None:
            self._body, ctype = b"{}", "application/json"
        elif json_str:
            self._body, ctype = json.dumps(message).encode(), "application/json"
        else:
            ctype = "text/html; charset=utf-8"
            if _is_stream(message):
                self.response = message
            elif isinstance(message, (bytes, bytearray, memoryview)):
                self._body = bytes(message)
            elif isinstance(message, str):
                self._body = message.encode()
            elif isinstance(message, (list, tuple)):  # Flask joins a list of chunks
                self._body = b"".join(c if isinstance(c, bytes) else str(c).encode()
                                      for c in message)
            else:
                self._body = str(message).encode()
            if any(k.lower() == "content-type" for k in given):
                ctype = None
        if ctype is not None:
            self.headers["Content-Type"] = ctype
        self.status_code = int(status_code)
        self.run_function_failed = bool(run_function_failed)
        for name, value in given.items():
            for part in str(value).split(","):
                self.headers.add(name, part.strip())

    @property
    def is_streamed(self) -> bool:
        return self.response is not None

    def get_data(self, as_text: bool = False):
        if self.response is not None:  # as Flask: reading the body consumes the stream
            self._body = b"".join(c if isinstance(c, bytes) else str(c).encode()
                                  for c in self.response)
            self.response = None
        return self._body.decode() if as_text else self._body

    def set_data(self, value) -> None:
        self._body = value.encode() if isinstance(value, str) else bytes(value)
        self.response = None

    @property
    def data(self) -> bytes:
        return self.get_data()

    @property
    def content_type(self) -> str | None:
        return self.headers.get("content-type")

    @property
    def mimetype(self) -> str:
        return (self.content_type or "").split(";")[0].strip().lower()

    @property
    def status(self) -> str:
        try:
            phrase = HTTPStatus(self.status_code).phrase.upper()
        except ValueError:
            phrase = "UNKNOWN"
        return f"{self.status_code} {phrase}"

    def __repr__(self) -> str:
        return f"<AMLResponse [{self.status_code}]>"


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
    "azureml_inference_server_http.log_config": ("AMLLogFormatter", "RootAccessFilter"),
    # "module:name": taken from that module when a script first imports the stand-in, so
    # datacollect.py is loaded by the scripts that use it only.
    "azureml.monitoring": ("mlbuild.runtime.datacollect:ModelDataCollector",),
    "azureml.monitoring.modeldatacollector": ("mlbuild.runtime.datacollect:ModelDataCollector",),
}
# Stand-ins that are packages and export names too (azureml.monitoring has a submodule).
_PACKAGES = frozenset({"azureml.monitoring"})


class _CompatFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves :data:`_MODULES`; sits last on ``sys.meta_path`` so real packages win."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _MODULES:
            return None
        is_pkg = _MODULES[fullname] is None or fullname in _PACKAGES
        spec = importlib.machinery.ModuleSpec(fullname, self, origin="mlbuild-compat",
                                              is_package=is_pkg)
        return spec

    def create_module(self, spec):
        return None  # default module creation

    def exec_module(self, module):
        names = _MODULES[module.__name__]
        module.__mlbuild_compat__ = True
        for name in names or ():
            if ":" in name:
                source, name = name.split(":")
                setattr(module, name, getattr(importlib.import_module(source), name))
            else:
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
