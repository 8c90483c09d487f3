"""Serving a model without an entry script (``MLBUILD_NO_CODE_MODEL``).

Input: ``{"data": [[...], ...], "method": "predict"}`` -- ``method`` is optional; the
default is ``predict_proba`` where the model has it, else ``predict``.
"""

from __future__ import annotations

import os
import pickle

FRAMEWORKS = ("scikit-learn", "sklearn")
ALLOWED_METHODS = ("predict", "predict_proba", "predict_log_proba", "decision_function",
                   "transform")


class BadInput(ValueError):
    """The request body does not have the no-code input shape (a 400)."""


def _model_file(path: str) -> str:
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path)
                       if f.endswith((".pkl", ".pickle", ".joblib", ".sav")))
        if len(files) != 1:
            raise FileNotFoundError(
                f"no-code model folder {path!r} must hold exactly one .pkl/.joblib file,"
                f" found {files or 'none'}")
        return os.path.join(path, files[0])
    return path


class SklearnModel:
    """A scikit-learn estimator loaded with joblib (or pickle when joblib is absent)."""

    def __init__(self, path: str):
        self.path = path
        self.model = None

    def init(self) -> None:
        path = _model_file(self.path)
        try:
            import joblib
        except ImportError:
            with open(path, "rb") as fh:
                self.model = pickle.load(fh)  # noqa: S301 - the service's own model
        else:
            self.model = joblib.load(path)

    def run(self, payload):
        if isinstance(payload, dict):
            data = payload.get("data", payload.get("input_data"))
            method = payload.get("method")
        else:
            data, method = payload, None
        if data is None:
            raise BadInput('expected a JSON object {"data": [[...], ...]}')
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
        return getattr(self.model, method)(array)


def load(path: str, framework: str):
    """The no-code model object for ``framework`` (``init()`` not yet called)."""
    if framework.lower() in FRAMEWORKS:
        return SklearnModel(path)
    raise ValueError(f"no-code framework {framework!r} is not supported (supported: scikit-learn)")
