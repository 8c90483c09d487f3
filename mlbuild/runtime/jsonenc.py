"""JSON encoding of run()'s return values, numpy-aware without importing numpy."""

from __future__ import annotations

import json
import sys


def _default(obj):
    # NOTE: numpy is looked up in sys.modules, never imported here: a script that returns
    # numpy values has imported it already, and the runtime must not pay for it otherwise.
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        if isinstance(obj, np.generic):
            return obj.item()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, (bytes, bytearray)):
        return obj.decode("utf-8", "replace")
    tolist = getattr(obj, "tolist", None)  # pandas/torch/... without importing them
    if callable(tolist):
        return tolist()
    raise TypeError(f"run() returned a value of type {type(obj).__name__}, not JSON-serializable")


_encoder = json.JSONEncoder(default=_default, ensure_ascii=False, allow_nan=True)


def dumps(value) -> bytes:
    """Encode ``value`` as UTF-8 JSON bytes (numpy arrays become lists)."""
    return _encoder.encode(value).encode("utf-8")
