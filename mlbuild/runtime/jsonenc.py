"""JSON encoding of run()'s return values, numpy-aware without importing numpy."""

from __future__ import annotations

import json
import sys
from json.encoder import encode_basestring

try:
    from json.encoder import c_make_encoder
except ImportError:  # pragma: no cover - CPython always has _json
    c_make_encoder = None


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


# NOTE: json.dumps and JSONEncoder.encode build a new C encoder on every call, through
# two Python methods: ~1 us of the ~2.5 us that encoding a 2-float list costs. The C
# encoder is built once here instead. It is made without circular-reference checks
# (markers=None): a shared markers dict keeps stale entries after an encoding fails, and
# a cyclic value still fails, with RecursionError instead of ValueError.
if c_make_encoder is not None:
    _iterencode = c_make_encoder(None, _default, encode_basestring, None, ": ", ", ",
                                 False, False, True)

    def dumps(value) -> bytes:
        """Encode ``value`` as UTF-8 JSON bytes (numpy arrays become lists)."""
        return "".join(_iterencode(value, 0)).encode("utf-8")
else:  # pragma: no cover
    _encoder = json.JSONEncoder(default=_default, ensure_ascii=False, allow_nan=True)

    def dumps(value) -> bytes:
        """Encode ``value`` as UTF-8 JSON bytes (numpy arrays become lists)."""
        return _encoder.encode(value).encode("utf-8")
