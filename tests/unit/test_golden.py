"""Golden files: the Dockerfile and README that the package target writes.

Each case deploys a package target through the real steps into ``tmp_path`` and
compares ``dist/package/<service>/Dockerfile``, ``Dockerfile.buildkit`` and ``README.md``
with ``tests/unit/golden/<case>.Dockerfile`` / ``<case>.buildkit.Dockerfile`` /
``<case>.README.md``, after normalising
what legitimately changes between mlbuild versions (the version string and the
fingerprint in the image tag).

    MLBUILD_UPDATE_GOLDEN=1 pytest tests/unit/test_golden.py   # rewrite the golden files
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
from pathlib import Path

import pytest

import mlbuild
from unittools import EXAMPLES, make_project, run, statuses
from mlbuild.graph.executor import RAN

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("MLBUILD_UPDATE_GOLDEN") == "1"
TAG = re.compile(r"(?<=:)[0-9a-f]{16}\b")


def normalise(text: str) -> str:
    text = text.replace(f"mlbuild {mlbuild.__version__}", "mlbuild <VERSION>")
    return TAG.sub("<FINGERPRINT>", text)


def assert_golden(name: str, actual: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(actual)
        return
    if not path.exists():
        pytest.fail(f"no golden file {path}; run with MLBUILD_UPDATE_GOLDEN=1 to create it")
    expected = path.read_text()
    if actual != expected:
        diff = "".join(difflib.unified_diff(
            expected.splitlines(keepends=True), actual.splitlines(keepends=True),
            fromfile=f"golden/{name}", tofile="rendered"))
        pytest.fail(f"{name} differs from its golden file "
                    f"(MLBUILD_UPDATE_GOLDEN=1 to accept):\n{diff}", pytrace=False)


def copy_example(name: str, dest: Path, models: dict[str, bytes]) -> Path:
    root = dest / name
    shutil.copytree(EXAMPLES / name, root,
                    ignore=shutil.ignore_patterns("*.pkl", "dist", ".mlbuild", "__pycache__"))
    for rel, data in models.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)  # not in a fresh clone
        (root / rel).write_bytes(data)
    return root


NOCODE = """\
name: iris
models:
  clf:
    path: models/clf.pkl
    framework: scikit-learn
environments:
  sk:
    requirements: envs/requirements.txt
services:
  classify:
    environment: sk
    models: [clf]
targets:
  bundle: {type: package, out: dist/package}
"""

CONDA = """\
name: condaproj
models:
  net:
    path: models/net
environments:
  conda:
    conda: envs/environment.yml
services:
  scorer:
    entry_script: src/score.py
    source_dir: src
    environment: conda
    models: [net]
    cors: ["https://www.example.com", "http://localhost:3000"]
targets:
  bundle: {type: package, out: dist/package}
"""

PACKAGES = """\
name: pkgs
models:
  ridge:
    path: models/ridge.pkl
environments:
  py310:
    python: "3.10"
    packages: [scikit-learn==1.5.2, "joblib>=1.3"]
services:
  api:
    entry_script: score.py
    environment: py310
    models: [ridge]
    auth: key
targets:
  bundle: {type: package, out: dist/package}
"""

SCORE = "def init():\n    pass\n\n\ndef run(data):\n    return data\n"


def case_diabetes(tmp: Path) -> Path:
    return copy_example("diabetes", tmp, {"models/sklearn_regression_model.pkl": b"ridge" * 10})


def case_multi_model(tmp: Path) -> Path:
    return copy_example("multi-model", tmp, {"models/ridge.pkl": b"ridge" * 10,
                                             "models/lasso.pkl": b"lasso" * 20})


def case_onnx_nocode(tmp: Path) -> Path:
    return copy_example("onnx-nocode", tmp, {"models/iris.onnx": b"onnx" * 10})


def case_nocode(tmp: Path) -> Path:
    return make_project(tmp / "nocode", NOCODE, {
        "models/clf.pkl": b"fake classifier",
        "envs/requirements.txt": "scikit-learn>=1.5\n",
    })


def case_conda(tmp: Path) -> Path:
    return make_project(tmp / "conda", CONDA, {
        "models/net/weights.bin": b"w" * 64,
        "models/net/config.json": '{"layers": 2}\n',
        "envs/environment.yml": "name: x\ndependencies:\n  - python=3.11\n  - numpy\n"
                                "  - pip\n  - pip:\n      - azureml-defaults\n"
                                "      - inference-schema\n",
        "src/score.py": SCORE,
    })


def case_packages(tmp: Path) -> Path:
    return make_project(tmp / "packages", PACKAGES, {
        "models/ridge.pkl": b"fake ridge",
        "score.py": SCORE,
    })


CASES = {
    # case: (make project, service)
    "diabetes": (case_diabetes, "diabetes"),
    "multi-model": (case_multi_model, "compare"),
    "nocode-sklearn": (case_nocode, "classify"),
    "onnx-nocode": (case_onnx_nocode, "iris"),
    "conda": (case_conda, "scorer"),
    "packages-py310": (case_packages, "api"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_package_golden(case, tmp_path):
    make, service = CASES[case]
    root = make(tmp_path)
    out = run(root, "bundle")
    assert set(statuses(out).values()) == {RAN}
    pkg = root / "dist" / "package" / service
    dockerfile = (pkg / "Dockerfile").read_text()
    readme = (pkg / "README.md").read_text()
    # The build context and the package hold the same Dockerfile.
    assert (root / ".mlbuild/contexts" / service / "Dockerfile").read_text() == dockerfile
    # The README's tag is named after the context's content digest: what is normalised.
    digest = next(o.outputs["digest"] for o in out if o.kind == "context")
    assert f":{digest.split(':')[1][:16]}" in readme
    assert_golden(f"{case}.Dockerfile", normalise(dockerfile))
    assert_golden(f"{case}.README.md", normalise(readme))
    # Its rendering for BuildKit (cache mounts), which mlbuild builds where it can.
    buildkit = (pkg / "Dockerfile.buildkit").read_text()
    assert (root / ".mlbuild/contexts" / service / "Dockerfile.buildkit").read_text() == buildkit
    assert_golden(f"{case}.buildkit.Dockerfile", normalise(buildkit))


def test_normalise_only_touches_volatile_parts():
    text = (f"mlbuild {mlbuild.__version__} image demo-svc:0123456789abcdef and "
            "sha256:0123456789abcdef0123 port 5001:5001")
    assert normalise(text) == ("mlbuild <VERSION> image demo-svc:<FINGERPRINT> and "
                               "sha256:0123456789abcdef0123 port 5001:5001")


def test_mismatch_fails_with_unified_diff(tmp_path, monkeypatch):
    monkeypatch.setitem(globals(), "GOLDEN", tmp_path)
    monkeypatch.setitem(globals(), "UPDATE", False)
    (tmp_path / "x.txt").write_text("one\ntwo\n")
    with pytest.raises(pytest.fail.Exception) as ei:
        assert_golden("x.txt", "one\nTWO\n")
    msg = str(ei.value)
    assert "--- golden/x.txt" in msg and "+++ rendered" in msg
    assert "-two" in msg and "+TWO" in msg
    assert_golden("x.txt", "one\ntwo\n")  # equal: passes
    with pytest.raises(pytest.fail.Exception, match="no golden file"):
        assert_golden("missing.txt", "x")


def test_conda_image_healthcheck_finds_python(tmp_path):
    root = case_conda(tmp_path)
    run(root, "bundle")
    dockerfile = (root / "dist/package/scorer/Dockerfile").read_text()
    health = next(l for l in dockerfile.splitlines() if l.lstrip().startswith("CMD [\"")
                  and "healthz" in l)
    assert re.search(r"^ENV PATH=/opt/conda/bin[:\"]", dockerfile, re.M) \
        or '"/opt/conda/bin/python"' in health or "_entrypoint.sh" in health


def test_image_paths_map_on_folder_boundaries(tmp_path):
    from mlbuild.graph.steps.context import MODEL_ROOT, map_image_path

    roots = {MODEL_ROOT: tmp_path / "models"}
    assert map_image_path(MODEL_ROOT, roots) == str(tmp_path / "models")
    assert map_image_path(f"{MODEL_ROOT}/ridge/1/m.pkl", roots) == \
        str(tmp_path / "models/ridge/1/m.pkl")
    assert map_image_path(f"{MODEL_ROOT}2/x", roots) == f"{MODEL_ROOT}2/x"  # another folder
    assert map_image_path("key", roots) == "key"
