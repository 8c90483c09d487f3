"""Schemathesis against the live runtime's own OpenAPI 3 document (``/swagger.json?version=3``).

Requests generated from the document, valid ones (positive mode) and ones that break it
(negative mode), go over real HTTP to a runtime subprocess. The contract checked:

- input the service can score gets a 200;
- anything else gets a 4xx (400 for malformed input), never a 5xx -- except that a plain
  ``run(raw_data)`` receives the body undecoded, so its own exceptions are 500s by the
  Azure ML contract; those must then be reported as run() failures
  (``x-ms-run-function-failed: True`` and the JSON error body).

Bounded and repeatable: a fixed seed, ``MAX_EXAMPLES`` per operation and mode, no example
database, a timeout per request and a time budget per service.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import pytest

from conftest import REPO, write_script

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")
np = pytest.importorskip("numpy")
joblib = pytest.importorskip("joblib")
pytest.importorskip("sklearn")
if int(schemathesis.__version__.split(".")[0]) < 4:
    pytest.skip("needs schemathesis 4 (openapi.from_url, APIOperation.as_strategy)",
                allow_module_level=True)

MAX_EXAMPLES = 60  # per operation and generation mode
SEED = 20240611
REQUEST_TIMEOUT = 5.0  # seconds
BUDGET = 20.0  # seconds of generated requests per service, a backstop for a slow box

DIABETES_FEATURES = 10
IRIS_FEATURES = 4

# examples/diabetes/src/score.py with inference_schema decorators, as Azure ML v1 samples
# write it: run(data) gets a numpy array; the decorators make /swagger.json.
DECORATED_DIABETES_SCRIPT = """
    import os

    import joblib
    import numpy as np
    from inference_schema.parameter_types.numpy_parameter_type import NumpyParameterType
    from inference_schema.schema_decorators import input_schema, output_schema

    model = None


    def init():
        global model
        model_dir = os.getenv("MLBUILD_MODEL_DIR") or os.getenv("AZUREML_MODEL_DIR")
        model = joblib.load(os.path.join(model_dir, "sklearn_regression_model.pkl"))


    @input_schema("data", NumpyParameterType(np.array([[0.03808, 0.05068, 0.0617, 0.02187,
                                                        -0.04422, -0.03482, -0.0434,
                                                        -0.00259, 0.01991, -0.01765]])))
    @output_schema(NumpyParameterType(np.array([199.84779774423546])))
    def run(data):
        return model.predict(data).tolist()
"""


@dataclass
class Probe:
    """One generated request and what the server answered."""

    operation: str
    mode: str
    body: object
    status: int
    headers: dict
    text: str
    curl: str

    def error_message(self) -> str:
        try:
            return json.loads(self.text).get("message", "")
        except (ValueError, AttributeError):
            return self.text[:200]

    def describe(self) -> str:
        return (f"{self.operation} [{self.mode}] -> {self.status} {self.error_message()!r}\n"
                f"    {self.curl[:400]}")


def fuzz(base_url: str) -> list[Probe]:
    """Every operation of the service's OpenAPI 3 document, both generation modes."""
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{base_url}/swagger.json?version=3",
                                           timeout=REQUEST_TIMEOUT)
    probes: list[Probe] = []
    stop_at = time.monotonic() + BUDGET
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                probes += _probe(base_url, operation, mode, stop_at)
            except Unsatisfiable:  # nothing to break: GET / takes no input at all
                continue
    assert probes, "schemathesis generated no request"
    return probes


def _probe(base_url: str, operation, mode, stop_at: float) -> list[Probe]:
    """Up to ``MAX_EXAMPLES`` generated requests for one operation in one mode."""
    from hypothesis import HealthCheck, Phase, given, seed, settings

    probes: list[Probe] = []

    @seed(SEED)
    @settings(max_examples=MAX_EXAMPLES, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate],  # no shrinking: nothing raises
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def probe(case):
        if time.monotonic() > stop_at:
            return
        response = case.call(base_url=base_url, timeout=REQUEST_TIMEOUT)
        headers = {k.lower(): ", ".join(v) if isinstance(v, list) else v
                   for k, v in response.headers.items()}
        probes.append(Probe(operation.label, mode.value, case.body, response.status_code,
                            headers, response.text, case.as_curl_command()))

    probe()
    return probes


def is_scorable(body, n_features: int) -> bool:
    """``{"data": rows}``, at least one row of ``n_features`` finite numbers."""
    if not (isinstance(body, dict) and set(body) == {"data"}):
        return False
    rows = body["data"]
    return (isinstance(rows, list) and len(rows) > 0 and all(
        isinstance(row, list) and len(row) == n_features and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
            and abs(x) < 1e30  # the model's output stays finite
            for x in row)
        for row in rows))


def score_probes(probes: list[Probe]) -> list[Probe]:
    return [p for p in probes if p.operation == "POST /score"]


def assert_scorable_input_scores(probes: list[Probe], n_features: int) -> None:
    scorable = [p for p in score_probes(probes) if is_scorable(p.body, n_features)]
    assert scorable, "no valid input among the generated requests"  # the schema's example
    bad = [p for p in scorable if p.status != 200]
    assert not bad, "valid input not scored:\n" + "\n".join(p.describe() for p in bad[:5])


def server_errors(probes: list[Probe]) -> list[Probe]:
    return [p for p in probes if p.status >= 500]


@pytest.fixture(scope="module")
def diabetes_model_dir(tmp_path_factory):
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import Ridge

    X, y = load_diabetes(return_X_y=True)
    folder = tmp_path_factory.mktemp("diabetes-model")
    joblib.dump(Ridge(alpha=0.1).fit(X, y), folder / "sklearn_regression_model.pkl")
    return folder


@pytest.mark.slow
def test_inference_schema_decorated_script_never_5xx(start_server, tmp_path, diabetes_model_dir):
    pytest.importorskip("inference_schema")
    script = write_script(tmp_path, DECORATED_DIABETES_SCRIPT)
    server = start_server(["--entry-script", str(script),
                           "--model-dir", str(diabetes_model_dir)])
    probes = fuzz(f"http://127.0.0.1:{server.port}")

    assert_scorable_input_scores(probes, DIABETES_FEATURES)
    errors = server_errors(probes)
    unexplained = [p for p in errors if is_scorable(p.body, DIABETES_FEATURES)
                   or p.operation != "POST /score"]
    assert not unexplained, "5xx for valid input:\n" + "\n".join(
        p.describe() for p in unexplained[:5])
    # Input that run()'s parameters or its schema reject is the request's fault: a 400.
    assert not errors, f"{len(errors)} 5xx answers, e.g.\n" + errors[0].describe()


@pytest.mark.slow
def test_undecorated_script_with_manifest_samples_5xx_only_from_run(start_server,
                                                                     diabetes_model_dir):
    example = REPO / "examples" / "diabetes"
    server = start_server(
        ["--entry-script", str(example / "src" / "score.py"),
         "--model-dir", str(diabetes_model_dir)],
        env={"MLBUILD_SCHEMA_INPUT": str(example / "samples" / "input.json"),
             "MLBUILD_SCHEMA_OUTPUT": str(example / "samples" / "output.json"),
             "MLBUILD_SERVICE_NAME": "diabetes"})
    probes = fuzz(f"http://127.0.0.1:{server.port}")

    assert_scorable_input_scores(probes, DIABETES_FEATURES)
    # run(raw_data) parses the body itself: a KeyError or ValueError of the script is a
    # 500 by contract, but it must be reported as a run() failure, nothing else.
    wrong = [p for p in server_errors(probes)
             if not (p.status == 500 and p.headers.get("x-ms-run-function-failed") == "True"
                     and json.loads(p.text).get("status_code") == 500)]
    assert not wrong, "5xx not from run():\n" + "\n".join(p.describe() for p in wrong[:5])


@pytest.mark.slow
def test_onnx_no_code_service_never_5xx(start_server, tmp_path):
    pytest.importorskip("onnxruntime")
    skl2onnx = pytest.importorskip("skl2onnx")
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    X, y = load_iris(return_X_y=True)
    model = LogisticRegression(max_iter=500).fit(X, y)
    onx = skl2onnx.to_onnx(model, X[:1].astype(np.float32), target_opset=17,
                           options={id(model): {"zipmap": False}})
    path = tmp_path / "iris.onnx"
    path.write_bytes(onx.SerializeToString())
    samples = REPO / "examples" / "onnx-nocode" / "samples"
    server = start_server(["--no-code-model", str(path), "--no-code-framework", "onnx"],
                          env={"MLBUILD_SCHEMA_INPUT": str(samples / "input.json"),
                               "MLBUILD_SCHEMA_OUTPUT": str(samples / "output.json")})
    probes = fuzz(f"http://127.0.0.1:{server.port}")

    assert_scorable_input_scores(probes, IRIS_FEATURES)
    errors = server_errors(probes)
    assert not errors, "5xx:\n" + "\n".join(p.describe() for p in errors[:5])
    statuses = {p.status for p in score_probes(probes)}
    assert statuses <= {200, 400}, statuses


def test_scorable_classifier():
    assert is_scorable({"data": [[1, 2.5]]}, 2)
    assert not is_scorable({"data": [[1, 2.5]], "x": 1}, 2)
    assert not is_scorable({"data": [[True, 2.5]]}, 2)
    assert not is_scorable({"data": []}, 2)
    assert not is_scorable({"data": [[1.0]]}, 2)
    assert not is_scorable([[1.0, 2.0]], 2)
