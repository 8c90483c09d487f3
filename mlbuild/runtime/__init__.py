"""The serving runtime: the scoring server inside every image and behind `mlbuild serve`.

This package is copied into every image on its own (with ``mlbuild/__init__.py``) and
run as ``python -m mlbuild.runtime``, so it imports nothing from the rest of mlbuild and
needs only the packages in ``requirements.txt`` beside this file:

- ``uvicorn`` -- the HTTP server. The app itself is a hand-written ASGI callable (no
  framework), which is what keeps it within a few percent of a bare ASGI app.
- ``httptools`` -- uvicorn's C HTTP parser; several times faster than the pure-Python h11.
- ``uvloop`` (CPython on Linux/macOS) -- the faster event loop; used when importable.
- ``prometheus_client`` -- ``/metrics`` of all workers at once: each process writes its
  numbers to files in prometheus_client's multiprocess format and a scrape merges them
  with its collector (metrics.py says why the writes are our own).

Optional, used when the environment of the service has them: ``numpy`` (arrays and
scalars in run()'s return value are JSON-encoded), ``inference-schema`` (decorated
``run`` functions get parsed input, and their samples feed ``/swagger.json``),
``scikit-learn``/``joblib`` (no-code models).

Importing this package (as opposed to ``mlbuild.runtime.server``) loads only the
standard library, so entry scripts may use :func:`get_model_path` cheaply, and
``from mlbuild.runtime import batched`` to mark a batched ``run`` (batching.py).
"""

from mlbuild.runtime.models import ModelNotFoundError, get_model_path

__all__ = ["ModelNotFoundError", "batched", "get_model_path"]


def __getattr__(name: str):
    # NOTE: loaded on first use (PEP 562): batching.py imports asyncio, which a script
    # that only wants get_model_path need not pay for.
    if name == "batched":
        from mlbuild.runtime.batching import batched

        return batched
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
