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
"""

from __future__ import annotations

import os
import pickle

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
        try:
            return getattr(self.model, method)(array)
        except ValueError as exc:
            # NOTE: scikit-learn's input validation (check_array: feature count, non-numeric
            # or NaN values, wrong rank) raises ValueError: with no code of the user's in
            # between, that is the request's fault, not the service's.
            n = getattr(self.model, "n_features_in_", None)
            hint = f"; expected rows of {n} features" if n is not None else ""
            raise BadInput(f"the model rejected the input: {exc}{hint}") from None


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
            fits = raw.ndim == len(self.shape) and all(
                not isinstance(want, int) or want == got
                for want, got in zip(self.shape, raw.shape))
            if not fits:
                raise bad(f"data has shape {list(raw.shape)}")
        try:
            with np.errstate(over="raise", invalid="raise"):
                return raw.astype(self.dtype, casting="unsafe")
        except (ValueError, TypeError, OverflowError, FloatingPointError) as exc:
            raise bad(f"data does not fit type {self.dtype}: {exc}") from None


class OnnxModel:
    """An ONNX model run with onnxruntime; see the module docstring for the JSON shapes."""

    def __init__(self, path: str):
        self.path = path
        self.session = None
        self.inputs: list[_OnnxInput] = []
        self.output_names: list[str] = []
        self._invalid_argument: tuple[type, ...] = ()

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

    def run(self, payload):
        data, options = _split_payload(payload)
        if "method" in options:
            raise BadInput('"method" applies to scikit-learn models only; an ONNX model'
                           " answers with all of its outputs")
        feed = self._feed(data)
        try:
            outputs = self.session.run(None, feed)
        except self._invalid_argument as exc:
            # NOTE: INVALID_ARGUMENT is onnxruntime's own check of the feed against the
            # declared inputs, a backstop for _OnnxInput.convert: the request's fault. A
            # kernel failing while it runs (FAIL) stays a 500: it can as well be the model.
            expected = "; ".join(i.describe() for i in self.inputs)
            raise BadInput(f"the model rejected the input: {exc}; expected {expected}") from None
        values = [o.tolist() if hasattr(o, "tolist") else o for o in outputs]
        if len(values) == 1:
            return values[0]
        return dict(zip(self.output_names, values))


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
