"""Serving a model without an entry script (``MLBUILD_NO_CODE_MODEL``).

The framework comes from ``MLBUILD_NO_CODE_FRAMEWORK`` (``--no-code-framework``; the
manifest's ``framework:``): ``scikit-learn`` (also ``sklearn``) or ``onnx``. A ``.onnx``
file is served with onnxruntime whatever the framework says, since it cannot be a pickle.
The model path is a file, or a folder holding exactly one model file.

Request body, both frameworks: ``{"data": [[...], ...]}`` (``input_data`` is accepted as
an alias of ``data``), or the bare array ``[[...], ...]``. A single row ``[...]`` is one
sample: it is given the batch dimension the model expects.

scikit-learn
    ``{"data": ..., "method": "predict"}`` -- ``method`` is optional; the default is
    ``predict_proba`` where the model has it, else ``predict``. The response is the
    method's result as a JSON array.

ONNX (onnxruntime, imported only when an ONNX model is served)
    ``data`` is converted to a numpy array of the element type the model's first input
    declares (``tensor(float)`` -> float32, ...) and fed to that input. A model with
    several inputs takes ``{"data": {"input_name": [...], ...}}`` instead. Numbers of the
    wrong kind (strings or fractions for an integer input, ...), ragged rows and a shape
    that does not fit the declared one are a 400 naming the input, its shape and its type.

    Response: a model with **one output** answers with that output as a plain JSON
    array, as the scikit-learn path does (a regressor converted by skl2onnx gives
    ``[[199.8], [73.4]]``: the output's declared shape ``[N, 1]`` is kept, never
    squeezed). A model with **several outputs** answers with an object keyed by output
    name, e.g. a classifier: ``{"output_label": [0, 2], "output_probability": [...]}``.
    Outputs are returned exactly as the model declares them; a ZipMap probability output
    (a list of ``{class: probability}`` maps) keeps its class labels as JSON object keys.

ONNX tensor JSON (the ONNX Runtime server's ``PredictRequest``, as Azure ML's ONNX samples send)
    A body with ``inputs`` and no ``data`` is the protobuf JSON mapping of
    onnxruntime server's ``predict.proto``, so clients written for that server (or for
    Azure ML's ONNX examples) work unchanged::

        {"inputs": {"Input3": {"dims": [1, 1, 28, 28], "dataType": 1,
                               "rawData": "<base64 of little-endian float32>"}},
         "outputFilter": ["Plus214_Output_0"]}

    ``inputs`` maps every model input to a ``TensorProto``: ``dims`` (numbers or, as
    proto3 JSON writes int64, decimal strings; absent means a scalar), ``dataType`` (the
    ``TensorProto.DataType`` number, which must be the input's declared element type) and
    the values either as ``rawData`` (base64, standard or URL-safe, little-endian) or in
    the typed field the ONNX spec assigns to that type: ``floatData`` (FLOAT),
    ``doubleData`` (DOUBLE), ``int64Data`` (INT64), ``uint64Data`` (UINT32, UINT64),
    ``int32Data`` (INT32, INT16, INT8, UINT16, UINT8, BOOL, and FLOAT16 as its 16-bit
    pattern) or ``stringData`` (STRING, each string base64 as protobuf JSON writes
    bytes). Integers may be strings; floats may be ``"NaN"``, ``"Infinity"``,
    ``"-Infinity"``. snake_case field names (``raw_data``...) are accepted as protobuf's
    JSON parser does. ``outputFilter`` lists the outputs wanted (absent or empty: all).
    Unlike that server, which ignored unknown fields, an unknown field is a 400 (a
    misspelt ``outputFilter`` would otherwise silently answer every output), as is any
    mismatch: an input the model lacks or misses, dims that do not fit the value count
    or the declared shape, a ``dataType`` or field of another type, bad base64.

    Response, as the onnxruntime server answered (``server/converter.cc``)::

        {"outputs": {"Plus214_Output_0": {"dims": ["1", "10"], "dataType": 1,
                                          "rawData": "...", "dataLocation": "DEFAULT"}}}

    ``dims`` are strings (proto3 JSON of int64) and always present, even ``[]``. The
    values are in ``rawData`` when every input came as ``rawData``, else in the typed
    fields (int64 and uint64 values as strings, non-finite floats as ``"NaN"``...);
    strings are always ``stringData``. An output that is not a tensor (a ZipMap's list
    of maps) has no ``TensorProto`` form: asking for it is a 400 that says to leave it
    out with ``outputFilter`` or to send ``data``.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import math
import os
import pickle
import re

from mlbuild.runtime.batching import ItemFailed

SKLEARN_FRAMEWORKS = ("scikit-learn", "sklearn")
ONNX_FRAMEWORKS = ("onnx",)
FRAMEWORKS = SKLEARN_FRAMEWORKS + ONNX_FRAMEWORKS
ALLOWED_METHODS = ("predict", "predict_proba", "predict_log_proba", "decision_function",
                   "transform")
SKLEARN_SUFFIXES = (".pkl", ".pickle", ".joblib", ".sav")
ONNX_SUFFIXES = (".onnx",)

# ONNX element type -> numpy dtype name, and which numpy kinds of JSON-decoded data may
# be converted to it without losing meaning ("i" data into a float input is fine; "f"
# data into an integer input only when every value is whole, checked separately).
_ONNX_DTYPES = {
    "tensor(float)": ("float32", "iuf"),
    "tensor(double)": ("float64", "iuf"),
    "tensor(float16)": ("float16", "iuf"),
    "tensor(int64)": ("int64", "iuf"),
    "tensor(int32)": ("int32", "iuf"),
    "tensor(int16)": ("int16", "iuf"),
    "tensor(int8)": ("int8", "iuf"),
    "tensor(uint64)": ("uint64", "iuf"),
    "tensor(uint32)": ("uint32", "iuf"),
    "tensor(uint16)": ("uint16", "iuf"),
    "tensor(uint8)": ("uint8", "iuf"),
    "tensor(bool)": ("bool", "b"),
    "tensor(string)": ("str", "U"),
}
_ONNX_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")

# TensorProto.DataType number -> (name, ONNX type, little-endian numpy dtype of rawData, the
# typed field that carries its values). The ONNX spec, not convenience, picks the field:
# small integers, bool and float16 (as bit patterns) travel in int32_data, uint32 in
# uint64_data. Other numbers (complex, bfloat16, float8, int4...) are types the no-code
# path cannot feed anyway (see _ONNX_DTYPES).
_TENSOR_TYPES = {
    1: ("FLOAT", "tensor(float)", "<f4", "floatData"),
    2: ("UINT8", "tensor(uint8)", "<u1", "int32Data"),
    3: ("INT8", "tensor(int8)", "<i1", "int32Data"),
    4: ("UINT16", "tensor(uint16)", "<u2", "int32Data"),
    5: ("INT16", "tensor(int16)", "<i2", "int32Data"),
    6: ("INT32", "tensor(int32)", "<i4", "int32Data"),
    7: ("INT64", "tensor(int64)", "<i8", "int64Data"),
    8: ("STRING", "tensor(string)", None, "stringData"),
    9: ("BOOL", "tensor(bool)", "|b1", "int32Data"),
    10: ("FLOAT16", "tensor(float16)", "<f2", "int32Data"),
    11: ("DOUBLE", "tensor(double)", "<f8", "doubleData"),
    12: ("UINT32", "tensor(uint32)", "<u4", "uint64Data"),
    13: ("UINT64", "tensor(uint64)", "<u8", "uint64Data"),
}
_TENSOR_TYPE_OF_ONNX = {spec[1]: number for number, spec in _TENSOR_TYPES.items()}
_OTHER_TENSOR_TYPES = {0: "UNDEFINED", 14: "COMPLEX64", 15: "COMPLEX128", 16: "BFLOAT16",
                       17: "FLOAT8E4M3FN", 18: "FLOAT8E4M3FNUZ", 19: "FLOAT8E5M2",
                       20: "FLOAT8E5M2FNUZ", 21: "UINT4", 22: "INT4", 23: "FLOAT4E2M1"}
_TYPED_FIELDS = ("floatData", "int32Data", "stringData", "int64Data", "doubleData",
                 "uint64Data")
_TENSOR_FIELDS = ("dims", "dataType", "rawData", *_TYPED_FIELDS, "name", "docString",
                  "dataLocation", "segment", "externalData")
_REQUEST_FIELDS = ("inputs", "outputFilter")
_INTEGER = re.compile(r"[+-]?[0-9]+")


class BadInput(ValueError):
    """The request body does not have the no-code input shape (a 400)."""


def _model_file(path: str, suffixes: tuple[str, ...]) -> str:
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.lower().endswith(suffixes))
        if len(files) != 1:
            raise FileNotFoundError(
                f"no-code model folder {path!r} must hold exactly one"
                f" {'/'.join(suffixes)} file, found {files or 'none'}")
        return os.path.join(path, files[0])
    return path


def _split_payload(payload) -> tuple[object, dict]:
    """``(data, options)`` of a request: ``{"data": ..., **options}`` or a bare array."""
    if isinstance(payload, dict):
        data = payload.get("data", payload.get("input_data"))
        options = {k: v for k, v in payload.items() if k not in ("data", "input_data")}
    else:
        data, options = payload, {}
    if data is None:
        raise BadInput('expected a JSON object {"data": [[...], ...]} or a JSON array')
    return data, options


def _plain_numbers(array) -> bool:
    """Whether ``array`` holds only booleans, integers or finite floats: what any numeric
    model takes the same way whatever rows it is joined with."""
    import numpy as np

    kind = array.dtype.kind
    return kind in "biu" or (kind == "f" and bool(np.isfinite(array).all()))


def _split_rows(value, bounds: list[int]):
    """``value`` (an array, or a list of arrays as a multi-output model answers) cut at
    ``bounds`` along its first axis; None when its first axis is not the rows'."""
    total = bounds[-1]
    if isinstance(value, list):
        if not value or not all(hasattr(v, "shape") and len(v) == total for v in value):
            return None
        return [[v[a:b] for v in value] for a, b in zip(bounds, bounds[1:])]
    if not hasattr(value, "shape") or not value.shape or value.shape[0] != total:
        return None
    return [value[a:b] for a, b in zip(bounds, bounds[1:])]


def _run_groups(items: list, key, rows, joined, alone, split=None) -> list:
    """Answers to a batch of prepared requests, in order, one model call per group.

    Requests with the same ``key(item)`` (None: no group) are joined and scored by one
    ``joined(group)`` call, whose answer ``split`` (default :func:`_split_rows`) cuts
    back into each request's ``rows(item)`` rows (None: it cannot). When that call
    raises, or its answer cannot be cut so, each request of the group is scored
    ``alone(item)``: one bad request fails alone, with the error it would have got
    unbatched, never its neighbours.

    Returns:
        One answer per item; a :class:`~mlbuild.runtime.batching.ItemFailed` for a
        request that failed.
    """
    split = split or _split_rows

    def attempt(item):
        try:
            return alone(item)
        except Exception as exc:  # noqa: BLE001 - this request's own failure
            return ItemFailed(exc)

    groups: dict = {}
    for i, item in enumerate(items):
        k = key(item)
        groups.setdefault(("alone", i) if k is None else k, []).append(i)
    out: list = [None] * len(items)
    for members in groups.values():
        parts = None
        if len(members) > 1:
            bounds = [0]
            for i in members:
                bounds.append(bounds[-1] + rows(items[i]))
            try:
                parts = split(joined([items[i] for i in members]), bounds)
            except Exception:  # noqa: BLE001 - scored alone below: the culprit fails alone
                parts = None
        if parts is None:
            for i in members:
                out[i] = attempt(items[i])
        else:
            for i, part in zip(members, parts):
                out[i] = part
    return out


class SklearnModel:
    """A scikit-learn estimator loaded with joblib (or pickle when joblib is absent)."""

    def __init__(self, path: str):
        self.path = path
        self.model = None

    def init(self) -> None:
        path = _model_file(self.path, SKLEARN_SUFFIXES)
        try:
            import joblib
        except ImportError:
            with open(path, "rb") as fh:
                self.model = pickle.load(fh)  # noqa: S301 - the service's own model
        else:
            self.model = joblib.load(path)

    def run(self, payload):
        return self._predict(self.prepare(payload))

    def prepare(self, payload) -> tuple[str, object]:
        """``(method, array)`` of a request, checked as far as it can be without the model.

        Raises:
            BadInput: No data, an unknown method, or data that is not an array.
        """
        data, options = _split_payload(payload)
        method = options.get("method")
        if method is None:
            method = "predict_proba" if hasattr(self.model, "predict_proba") else "predict"
        if method not in ALLOWED_METHODS or not hasattr(self.model, method):
            raise BadInput(f"method {method!r} is not available on this model")
        import numpy as np

        try:
            array = np.asarray(data)
        except (ValueError, TypeError) as exc:
            raise BadInput(f"data is not a rectangular array: {exc}") from exc
        if array.ndim == 1:
            array = array.reshape(1, -1)
        return method, array

    def _predict(self, prepared: tuple[str, object]):
        method, array = prepared
        try:
            return getattr(self.model, method)(array)
        except (ValueError, TypeError) as exc:
            # NOTE: scikit-learn's input validation (check_array: feature count, non-numeric
            # or NaN values, wrong rank) raises ValueError, and TypeError for cells it
            # cannot make a number of (objects: float() of a dict): with no code of the
            # user's in between, that is the request's fault, not the service's.
            n = getattr(self.model, "n_features_in_", None)
            hint = f"; expected rows of {n} features" if n is not None else ""
            raise BadInput(f"the model rejected the input: {exc}{hint}") from None

    def run_batch(self, items: list) -> list:
        """The answers to ``prepare``'s items, one model call per group that can share one
        (see :func:`_run_groups`)."""
        import numpy as np

        def key(item):
            method, array = item
            if array.ndim != 2 or not _plain_numbers(array):
                return None  # object, text or non-finite cells: scored alone
            return method, array.shape[1], array.dtype.str

        def joined(group):
            return self._predict((group[0][0], np.concatenate([a for _, a in group])))

        return _run_groups(items, key, lambda item: len(item[1]), joined, self._predict)


class _OnnxInput:
    """One declared input of an ONNX model and how to turn JSON into it."""

    def __init__(self, name: str, onnx_type: str, shape):
        if onnx_type not in _ONNX_DTYPES:
            raise ValueError(f"ONNX input {name!r} has type {onnx_type}; the no-code path"
                             f" feeds only tensors of {', '.join(sorted(_ONNX_DTYPES))}"
                             " (write an entry script for this model)")
        self.name = name
        self.onnx_type = onnx_type
        self.dtype, self.accepted_kinds = _ONNX_DTYPES[onnx_type]
        # None for an unknown rank; each dimension an int, a symbolic name (any size, the
        # same for every input naming it) or None (any size).
        self.shape = None if shape is None else [d if isinstance(d, (int, str)) else None
                                                 for d in shape]

    def describe(self) -> str:
        shape = "of any shape" if self.shape is None else \
            "of shape [" + ", ".join("N" if d is None else str(d) for d in self.shape) + "]"
        return f"input {self.name!r} {shape} and type {self.dtype} ({self.onnx_type})"

    def fits(self, shape) -> bool:
        """Whether an array of ``shape`` fits the declared rank and fixed dimensions."""
        return self.shape is None or (len(shape) == len(self.shape) and all(
            not isinstance(want, int) or want == got for want, got in zip(self.shape, shape)))

    def convert(self, data):
        """``data`` (decoded JSON) as a numpy array for this input.

        Raises:
            BadInput: Ragged rows, values of the wrong kind, or a shape that does not fit.
        """
        import numpy as np

        def bad(why: str) -> BadInput:
            return BadInput(f"{why}; expected {self.describe()}")

        try:
            raw = np.asarray(data)
        except (ValueError, TypeError):
            raise bad("data is not a rectangular array (rows of different lengths?)") from None
        if raw.dtype.kind not in self.accepted_kinds:
            got = {"U": "strings", "b": "booleans", "O": "nulls, mixed or nested values"}.get(
                raw.dtype.kind, "numbers")
            raise bad(f"data holds {got}")
        if np.dtype(self.dtype).kind in "iu" and raw.size:
            if raw.dtype.kind == "f" and not (np.all(np.isfinite(raw))
                                              and np.all(raw == np.round(raw))):
                raise bad("data holds fractions or non-finite numbers")
            limits = np.iinfo(self.dtype)
            # int(): exact, where comparing a float64 with 2**63 - 1 rounds it up to 2**63.
            if int(raw.min()) < limits.min or int(raw.max()) > limits.max:
                raise bad(f"data holds numbers outside {limits.min}..{limits.max}")
        if self.shape is not None:
            if raw.ndim == len(self.shape) - 1:  # one sample: add the batch dimension
                raw = raw.reshape((1,) + raw.shape)
            if not self.fits(raw.shape):
                raise bad(f"data has shape {list(raw.shape)}")
        try:
            with np.errstate(over="raise", invalid="raise"):
                return raw.astype(self.dtype, casting="unsafe")
        except (ValueError, TypeError, OverflowError, FloatingPointError) as exc:
            raise bad(f"data does not fit type {self.dtype}: {exc}") from None


# --- ONNX tensor JSON (onnxruntime server's PredictRequest / PredictResponse) -------------


def _camel(field: str) -> str:
    """``raw_data`` -> ``rawData``: protobuf's JSON parser takes either spelling."""
    head, *rest = field.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _fields(obj: dict, allowed: tuple[str, ...], where: str) -> dict:
    """``obj`` with its keys in lowerCamelCase, each one of ``allowed``.

    Raises:
        BadInput: An unknown key (with a "did you mean"), or one given in both spellings.
    """
    out = {}
    for key, value in obj.items():
        name = _camel(key) if isinstance(key, str) else key
        if name not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise BadInput(f"{where}: unknown field {key!r}{hint}; the fields are"
                           f" {', '.join(allowed)}")
        if name in out:
            raise BadInput(f"{where}: field {name!r} given twice (as {key!r} too)")
        out[name] = value
    return out


def _b64decode(text, where: str) -> bytes:
    """Base64 as protobuf's JSON parser reads it: standard or URL-safe, padding optional."""
    if not isinstance(text, str):
        raise BadInput(f"{where}: expected a base64 string, got {type(text).__name__}")
    padded = text.replace("-", "+").replace("_", "/")
    padded += "=" * (-len(padded) % 4)
    try:
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadInput(f"{where}: not valid base64 ({exc})") from None


def _json_int(value, where: str) -> int:
    """A JSON integer: a number, a whole float, or a decimal string (proto3's int64)."""
    if isinstance(value, bool):
        pass
    elif isinstance(value, int):
        return value
    elif isinstance(value, float) and value.is_integer():
        return int(value)
    elif isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        return int(value)
    raise BadInput(f"{where}: {value!r} is not an integer")


def _json_float(value, where: str) -> float:
    """A JSON float: a number, or a string such as "NaN", "Infinity", "-Infinity", "1.5"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise BadInput(f"{where}: {value!r} is not a number")


def _typed_values(number: int, values, count: int, where: str):
    """The values of a typed field (``floatData``...) as a flat numpy array of ``number``'s type.

    Raises:
        BadInput: Not a list, ``count`` values expected, or a value that is not of the type
            or does not fit it.
    """
    import numpy as np

    name, _, dtype, _ = _TENSOR_TYPES[number]
    native = None if dtype is None else np.dtype(dtype).newbyteorder("=")
    if not isinstance(values, list):
        raise BadInput(f"{where}: expected a JSON array of values, got {type(values).__name__}")
    if len(values) != count:
        raise BadInput(f"{where}: {len(values)} values, but dims hold {count}")
    if number == 8:  # STRING: protobuf JSON writes bytes (string_data) as base64
        out = []
        for i, value in enumerate(values):
            try:
                out.append(_b64decode(value, f"{where}[{i}]").decode("utf-8"))
            except UnicodeDecodeError:
                raise BadInput(f"{where}[{i}]: the decoded bytes are not UTF-8") from None
        return np.array(out, dtype=object)
    # NOTE: a set of the value types decides, in one cheap pass, whether numpy can take the
    # list as it is (the common case, all numbers) or each value needs a look of its own
    # (proto3 JSON strings such as "NaN" or "9007199254740993").
    kinds = {type(v) for v in values}
    if native.kind == "f" and number != 10:
        if kinds <= {int, float}:
            try:
                array = np.array(values, dtype=np.float64)
            except OverflowError:  # an int beyond float64
                raise BadInput(f"{where}: a value is beyond the range of {name}") from None
        else:
            array = np.array([_json_float(v, f"{where}[{i}]") for i, v in enumerate(values)],
                             dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            cast = array.astype(native)
        if np.any(np.isfinite(array) & ~np.isfinite(cast)):
            raise BadInput(f"{where}: a value is beyond the range of {name}")
        return cast
    ints = values if kinds <= {int} else [_json_int(v, f"{where}[{i}]")
                                          for i, v in enumerate(values)]
    # float16 travels as its bit pattern, bool as 0/1 (the ONNX spec of int32_data).
    storage = {10: "<u2", 9: "|u1"}.get(number, dtype)
    limits = np.iinfo(storage)
    low, high = (0, 1) if number == 9 else (limits.min, limits.max)
    if ints and (min(ints) < low or max(ints) > high):
        what = "a bit pattern" if number == 10 else "a value"
        raise BadInput(f"{where}: {what} is outside {low}..{high} ({name})")
    return np.array(ints, dtype=storage).view(dtype).astype(native)


def _tensor_from_json(tensor, spec: "_OnnxInput", where: str) -> tuple[object, bool]:
    """``(array, used rawData)`` of one ``TensorProto`` JSON object fed to input ``spec``.

    Raises:
        BadInput: Anything in the object that does not fit the input; the message starts
            with the field's path (``inputs.Input3.rawData: ...``).
    """
    import numpy as np

    if not isinstance(tensor, dict):
        raise BadInput(f"{where}: expected a tensor object {{\"dims\": [...], \"dataType\": N,"
                       f" \"rawData\": \"...\"}}, got {type(tensor).__name__}")
    tensor = _fields(tensor, _TENSOR_FIELDS, where)
    for field in ("segment", "externalData"):
        if tensor.get(field):
            raise BadInput(f"{where}.{field}: not supported; send the whole tensor in rawData")
    if tensor.get("dataLocation", "DEFAULT") not in ("DEFAULT", 0):
        raise BadInput(f"{where}.dataLocation: only DEFAULT is supported, got"
                       f" {tensor['dataLocation']!r}")

    expected = _TENSOR_TYPE_OF_ONNX[spec.onnx_type]
    takes = f"{spec.describe()} takes dataType {expected} ({_TENSOR_TYPES[expected][0]})"
    if "dataType" not in tensor:
        raise BadInput(f"{where}.dataType: missing; {takes}")
    number = _json_int(tensor["dataType"], f"{where}.dataType")
    if number not in _TENSOR_TYPES:
        what = (f"{number} ({_OTHER_TENSOR_TYPES[number]}) is not supported"
                if number in _OTHER_TENSOR_TYPES else f"unknown dataType {number}")
        supported = ", ".join(f"{n} {t[0]}" for n, t in _TENSOR_TYPES.items())
        raise BadInput(f"{where}.dataType: {what} (supported: {supported}); {takes}")
    name, _, dtype, typed_field = _TENSOR_TYPES[number]
    if number != expected:
        raise BadInput(f"{where}.dataType: {number} ({name}), but {takes}")

    dims = tensor.get("dims", [])
    if not isinstance(dims, list):
        raise BadInput(f"{where}.dims: expected a JSON array of integers, got {dims!r}")
    dims = [_json_int(d, f"{where}.dims[{i}]") for i, d in enumerate(dims)]
    if any(d < 0 for d in dims):
        raise BadInput(f"{where}.dims: {dims} has a negative dimension")
    if not spec.fits(dims):
        raise BadInput(f"{where}.dims: {dims} does not fit {spec.describe()}")
    count = math.prod(dims)

    given = [f for f in _TYPED_FIELDS if f in tensor]
    wrong = [f for f in given if f != typed_field]
    if wrong:
        raise BadInput(f"{where}.{wrong[0]}: dataType {number} ({name}) takes its values in"
                       f" {'rawData or ' if dtype else ''}{typed_field}, not {wrong[0]}")
    if "rawData" in tensor and given:
        raise BadInput(f"{where}: both rawData and {given[0]}; send the values in one of them")
    if "rawData" in tensor:
        if dtype is None:
            raise BadInput(f"{where}.rawData: a STRING tensor cannot be raw data; send its"
                           " values base64-encoded in stringData")
        raw = _b64decode(tensor["rawData"], f"{where}.rawData")
        size = np.dtype(dtype).itemsize
        if len(raw) != count * size:
            raise BadInput(f"{where}.rawData: {len(raw)} bytes, but dims {dims} of {name}"
                           f" ({size} byte{'s' if size > 1 else ''} each) need {count * size}")
        if number == 9 and raw and max(raw) > 1:
            raise BadInput(f"{where}.rawData: a BOOL byte is neither 0 nor 1")
        array = np.frombuffer(raw, dtype=dtype).astype(np.dtype(dtype).newbyteorder("="))
        return array.reshape(dims), True
    if not given and count:
        raise BadInput(f"{where}: no values; dims {dims} hold {count}: send them in"
                       f" {'rawData or ' if dtype else ''}{typed_field}")
    values = tensor.get(typed_field, [])
    return _typed_values(number, values, count, f"{where}.{typed_field}").reshape(dims), False


def _tensor_to_json(value, number: int, raw: bool) -> dict:
    """An output array of dataType ``number`` as onnxruntime server's JSON ``TensorProto``.

    ``raw``: the values in ``rawData`` (with ``"dataLocation": "DEFAULT"``, as that server
    wrote it), else in the type's typed field; strings are ``stringData`` either way.
    """
    import numpy as np

    array = np.asarray(value)
    dims = [str(d) for d in array.shape]
    _, _, dtype, typed_field = _TENSOR_TYPES[number]
    if dtype is None:  # onnxruntime gives string tensors as object arrays of str
        return {"dims": dims, "dataType": number, "stringData": [
            base64.b64encode(str(v).encode("utf-8")).decode("ascii")
            for v in array.ravel().tolist()]}
    if raw:
        data = base64.b64encode(array.astype(dtype, copy=False).tobytes()).decode("ascii")
        return {"dims": dims, "dataType": number, "rawData": data, "dataLocation": "DEFAULT"}
    flat = array.ravel()
    if number == 10:
        values = flat.view("<u2").tolist()
    elif typed_field in ("int64Data", "uint64Data"):
        values = [str(v) for v in flat.tolist()]  # proto3 JSON writes 64-bit integers as strings
    elif typed_field in ("floatData", "doubleData") and not np.all(np.isfinite(flat)):
        values = [v if math.isfinite(v) else "NaN" if v != v else "Infinity" if v > 0
                  else "-Infinity" for v in flat.tolist()]
    else:
        values = flat.astype(int).tolist() if number == 9 else flat.tolist()
    return {"dims": dims, "dataType": number, typed_field: values}


class OnnxModel:
    """An ONNX model run with onnxruntime; see the module docstring for the JSON shapes."""

    def __init__(self, path: str):
        self.path = path
        self.session = None
        self.inputs: list[_OnnxInput] = []
        self.output_names: list[str] = []
        self.output_types: dict[str, str] = {}
        self._invalid_argument: tuple[type, ...] = ()
        self._batchable = False

    def init(self) -> None:
        try:
            import onnxruntime
        except ImportError as exc:
            raise ImportError(
                "serving an ONNX model without code needs onnxruntime in the service's"
                " environment: add onnxruntime to its requirements") from exc
        path = _model_file(self.path, ONNX_SUFFIXES)
        available = onnxruntime.get_available_providers()
        providers = [p for p in _ONNX_PROVIDERS if p in available] or available
        self.session = onnxruntime.InferenceSession(path, providers=providers)
        self.inputs = [_OnnxInput(i.name, i.type, i.shape) for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.output_types = {o.name: o.type for o in self.session.get_outputs()}
        # Requests can share a session run when every input's first dimension is free.
        self._batchable = bool(self.inputs) and all(
            i.shape and not isinstance(i.shape[0], int) for i in self.inputs)
        try:
            from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument
        except ImportError:  # a build without the usual module layout: all errors are 500s
            pass
        else:
            self._invalid_argument = (InvalidArgument,)

    def _feed(self, data) -> dict:
        if isinstance(data, dict):
            names = [i.name for i in self.inputs]
            unknown = sorted(set(data) - set(names))
            missing = [n for n in names if n not in data]
            if unknown or missing:
                raise BadInput(f"data names inputs {sorted(data)}; the model's inputs are"
                               f" {names}: {'; '.join(i.describe() for i in self.inputs)}")
            feed = {i.name: i.convert(data[i.name]) for i in self.inputs}
            self._check_shared_dims(feed)
            return feed
        if not self.inputs:  # a model of constants: nothing to feed
            return {}
        if len(self.inputs) > 1:
            raise BadInput("this model has several inputs: send"
                           ' {"data": {"<input name>": [...], ...}} with '
                           + "; ".join(i.describe() for i in self.inputs))
        first = self.inputs[0]
        return {first.name: first.convert(data)}

    def _check_shared_dims(self, feed: dict) -> None:
        """Inputs naming the same symbolic dimension ("N") must agree on its size."""
        seen: dict[str, tuple[int, str]] = {}
        for i in self.inputs:
            for dim, size in zip(i.shape or (), feed[i.name].shape):
                if not isinstance(dim, str):
                    continue
                first = seen.setdefault(dim, (size, i.name))
                if first[0] != size:
                    raise BadInput(f"dimension {dim!r} is {first[0]} in input {first[1]!r}"
                                   f" but {size} in input {i.name!r}: "
                                   + "; ".join(j.describe() for j in self.inputs))

    def _run_session(self, output_names, feed: dict) -> list:
        """``session.run``, with onnxruntime's own rejection of the feed as a 400."""
        try:
            return self.session.run(output_names, feed)
        except self._invalid_argument as exc:
            # NOTE: INVALID_ARGUMENT is onnxruntime's own check of the feed against the
            # declared inputs, a backstop for _OnnxInput.convert: the request's fault. A
            # kernel failing while it runs (FAIL) stays a 500: it can as well be the model.
            expected = "; ".join(i.describe() for i in self.inputs)
            raise BadInput(f"the model rejected the input: {exc}; expected {expected}") from None

    def run(self, payload):
        return self._run_prepared(self.prepare(payload))

    def _answer(self, outputs: list):
        values = [o.tolist() if hasattr(o, "tolist") else o for o in outputs]
        if len(values) == 1:
            return values[0]
        return dict(zip(self.output_names, values))

    def prepare(self, payload) -> tuple[str, object]:
        """``("feed", {input: array})`` of a ``data`` request, checked and converted;
        ``("tensors", payload)`` of a tensor-JSON one (checked when it runs, alone).

        Raises:
            BadInput: As :meth:`run` answers it.
        """
        # NOTE: "inputs" without "data" is the tensor form: a body that answered 400
        # before it was accepted, so no body of the nested-list forms changes meaning.
        if isinstance(payload, dict) and "inputs" in payload and not (
                "data" in payload or "input_data" in payload):
            return "tensors", payload
        data, options = _split_payload(payload)
        if "method" in options:
            raise BadInput('"method" applies to scikit-learn models only; an ONNX model'
                           " answers with all of its outputs")
        return "feed", self._feed(data)

    def _run_prepared(self, item: tuple[str, object]):
        kind, value = item
        if kind == "tensors":
            return self._run_tensors(value)
        return self._answer(self._run_session(None, value))

    def run_batch(self, items: list) -> list:
        """The answers to ``prepare``'s items: the feeds of a group of requests joined
        along the first axis of every input, one session run (see :func:`_run_groups`).
        Only when every input's first dimension is free (the batch); else each alone."""
        import numpy as np

        def key(item):
            kind, feed = item
            if kind != "feed" or not self._batchable or not feed:
                return None
            arrays = [feed[i.name] for i in self.inputs]
            # NOTE: the feed has the declared element types already (convert), so any rows
            # of the same shape join; NaN is data to onnxruntime, not an error.
            if not arrays[0].ndim or len({a.shape[0] if a.ndim else -1 for a in arrays}) != 1:
                return None
            return tuple((a.shape[1:], a.dtype.str) for a in arrays)

        def joined(group):
            feed = {i.name: np.concatenate([f[i.name] for _, f in group]) for i in self.inputs}
            return self._run_session(None, feed)

        def rows(item):
            return len(item[1][self.inputs[0].name])

        def split(outputs, bounds):
            parts = [_split_rows(o, bounds) if hasattr(o, "shape") else
                     ([o[a:b] for a, b in zip(bounds, bounds[1:])]
                      if isinstance(o, list) and len(o) == bounds[-1] else None)
                     for o in outputs]
            if any(p is None for p in parts):
                return None
            return [self._answer(list(cut)) for cut in zip(*parts)]

        return _run_groups(items, key, rows, joined, self._run_prepared, split)

    def _run_tensors(self, payload: dict) -> dict:
        """A ``PredictRequest`` in protobuf JSON -> a ``PredictResponse`` (module docstring)."""
        request = _fields(payload, _REQUEST_FIELDS, "request")
        tensors = request["inputs"]
        expected = "; ".join(i.describe() for i in self.inputs) or "none"
        if not isinstance(tensors, dict):
            raise BadInput("inputs: expected an object mapping input names to tensors"
                           ' {"dims": [...], "dataType": N, "rawData": "..."} (the KServe v2'
                           f" list form is not supported); the model's inputs: {expected}")
        specs = {i.name: i for i in self.inputs}
        unknown = [n for n in tensors if n not in specs]
        if unknown:
            raise BadInput(f"inputs.{unknown[0]}: the model has no input {unknown[0]!r};"
                           f" its inputs: {expected}")
        missing = [n for n in specs if n not in tensors]
        if missing:
            raise BadInput(f"inputs: input {missing[0]!r} is missing; the model's inputs:"
                           f" {expected}")
        feed, all_raw = {}, True
        for name, spec in specs.items():
            feed[name], raw = _tensor_from_json(tensors[name], spec, f"inputs.{name}")
            all_raw = all_raw and raw
        self._check_shared_dims(feed)
        names = self._output_filter(request.get("outputFilter"))
        outputs = self._run_session(names, feed)
        # NOTE: rawData in, rawData out; typed fields otherwise: what onnxruntime server did
        # (executor.cc, using_raw_data_), so its clients find the values where they look.
        return {"outputs": {
            name: _tensor_to_json(value, _TENSOR_TYPE_OF_ONNX[self.output_types[name]], all_raw)
            for name, value in zip(names, outputs)}}

    def _output_filter(self, wanted) -> list[str]:
        """The outputs to compute: ``outputFilter`` checked, or all of them when it is empty.

        Raises:
            BadInput: Not a list of names, a name the model lacks, or an output that is not
                a tensor of a type the JSON form carries.
        """
        if wanted is None or wanted == []:
            names = list(self.output_names)
        elif not isinstance(wanted, list) or not all(isinstance(n, str) for n in wanted):
            raise BadInput(f"outputFilter: expected a JSON array of output names, got"
                           f" {wanted!r}; the model's outputs: {self.output_names}")
        else:
            names = list(dict.fromkeys(wanted))  # a repeated name is one output
            unknown = [n for n in names if n not in self.output_types]
            if unknown:
                raise BadInput(f"outputFilter: the model has no output {unknown[0]!r}; its"
                               f" outputs: {self.output_names}")
        for name in names:
            if self.output_types[name] not in _TENSOR_TYPE_OF_ONNX:
                raise BadInput(
                    f"outputFilter: output {name!r} is a {self.output_types[name]}, which"
                    " the tensor JSON form cannot carry: list the outputs wanted in"
                    ' outputFilter without it, or send {"data": ...} for plain JSON')
        return names


def load(path: str, framework: str):
    """The no-code model object for ``framework`` (``init()`` not yet called).

    Raises:
        ValueError: The framework is not one served without code.
    """
    fw = framework.lower()
    # NOTE: the runtime's default framework is scikit-learn, so `--no-code-model m.onnx`
    # alone arrives here as scikit-learn; an .onnx file is never a pickle.
    if fw in ONNX_FRAMEWORKS or path.lower().endswith(ONNX_SUFFIXES):
        return OnnxModel(path)
    if fw in SKLEARN_FRAMEWORKS:
        return SklearnModel(path)
    raise ValueError(f"no-code framework {framework!r} is not supported"
                     f" (supported: scikit-learn, onnx)")
