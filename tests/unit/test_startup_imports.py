"""mlbuild/startup_imports.py: the modules a service imports at start, read statically
from its sources and its pickled models (real pickles and joblib files made here)."""

from __future__ import annotations

import pickle
from pathlib import Path

import joblib
import numpy as np
import pytest
from sklearn.linear_model import Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mlbuild.startup_imports import (cached_pickle_modules, pickle_modules, service_imports,
                                     source_imports)


def test_source_imports_anywhere_and_only_absolute():
    src = b"""
import os, json as j
import numpy.linalg
from sklearn.linear_model import Ridge, _ridge
from . import sibling
from .pkg import thing
from __future__ import annotations

def init():
    import joblib
    from inference_schema.schema_decorators import input_schema
"""
    assert source_imports(src) == {
        "os", "json", "numpy.linalg", "sklearn.linear_model", "sklearn.linear_model.Ridge",
        "sklearn.linear_model._ridge", "__future__", "__future__.annotations", "joblib",
        "inference_schema.schema_decorators",
        "inference_schema.schema_decorators.input_schema"}
    assert source_imports(b"def broken(:\n") == set()


@pytest.fixture(scope="module")
def pipeline():
    X = np.random.default_rng(0).random((40, 3))
    return make_pipeline(StandardScaler(), Ridge()).fit(X, X[:, 0])


EXPECTED = {"sklearn.pipeline", "sklearn.preprocessing._data", "sklearn.linear_model._ridge"}


@pytest.mark.parametrize("compress", [0, 3, ("gzip", 3), ("bz2", 3), ("xz", 3), ("lzma", 3)])
def test_joblib_files_name_their_classes(tmp_path, pipeline, compress):
    path = tmp_path / "model.joblib"
    joblib.dump(pipeline, path, compress=compress)
    found = pickle_modules(path)
    assert EXPECTED <= found, found
    assert "numpy" in found


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_plain_pickles_of_every_protocol(tmp_path, pipeline, protocol):
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(pipeline, protocol=protocol))
    assert EXPECTED <= pickle_modules(path)


def test_other_files_name_nothing(tmp_path):
    for name, data in (("model.onnx", b"\x08\x07\x12\x07skl2onnx" + bytes(range(256))),
                       ("weights.bin", bytes(1000)), ("README.md", b"# hello\n"),
                       ("empty", b"")):
        (tmp_path / name).write_bytes(data)
        assert pickle_modules(tmp_path / name) == set(), name
    assert pickle_modules(tmp_path / "missing.pkl") == set()


def test_service_imports_leave_out_the_app_and_add_frameworks(tmp_path, pipeline):
    (tmp_path / "score.py").write_text(
        "import json\nimport helpers\nfrom utils.io import load\nimport joblib\n")
    (tmp_path / "helpers.py").write_text("import numpy\n")
    (tmp_path / "utils").mkdir()
    (tmp_path / "utils/io.py").write_text("import os\n")
    model = tmp_path / "model.pkl"
    joblib.dump(pipeline, model)
    app = [("score.py", tmp_path / "score.py"), ("helpers.py", tmp_path / "helpers.py"),
           ("utils/io.py", tmp_path / "utils/io.py")]
    found = pickle_modules(model)
    names = service_imports(app, found, ["onnx"])
    assert names == sorted(names)
    assert {"json", "joblib", "numpy", "os", "onnxruntime"} | EXPECTED <= set(names)
    assert not [n for n in names if n.split(".")[0] in ("helpers", "utils", "score")]
    # Only the files' bytes count: the same inputs, the same list.
    assert service_imports(list(reversed(app)), found, ["onnx"]) == names


def test_model_scan_is_remembered_by_digest(tmp_path, pipeline):
    model = tmp_path / "model.pkl"
    joblib.dump(pipeline, model)
    cache = tmp_path / "cache"
    first = cached_pickle_modules(model, "sha256:abc", cache)
    assert first == pickle_modules(model) and (cache / "sha256-abc.txt").is_file()
    model.write_bytes(b"not a pickle any more")  # same digest: the memo answers
    assert cached_pickle_modules(model, "sha256:abc", cache) == first
    assert cached_pickle_modules(model, "sha256:def", cache) == set()
