"""ONNX models served without an entry script, through onnxruntime.

Every model is made here: two by skl2onnx from scikit-learn models fitted on its bundled
data sets, two written node by node with ``onnx.helper``. Nothing is downloaded.
"""

from __future__ import annotations

import json

import pytest

np = pytest.importorskip("numpy")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
skl2onnx = pytest.importorskip("skl2onnx")
pytest.importorskip("sklearn")

JSON = {"Content-Type": "application/json"}
OPSET = 17  # old enough for any onnxruntime the pyproject allows


def _save(model_proto, path):
    path.write_bytes(model_proto.SerializeToString())
    return path


def _post(server, payload):
    return server.post(body=json.dumps(payload), headers=JSON)


@pytest.fixture(scope="module")
def diabetes_ridge():
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import Ridge

    X, y = load_diabetes(return_X_y=True)
    return X, Ridge(alpha=0.1).fit(X, y)


@pytest.fixture(scope="module")
def iris_classifier():
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    X, y = load_iris(return_X_y=True)
    return X, LogisticRegression(max_iter=500).fit(X, y)


def _int_model():
    """x: int64 [N, 3] -> doubled = 2x (int64 [N, 3]), total = row sums (int64 [N])."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["doubled"]),
         helper.make_node("ReduceSum", ["x", "axis"], ["total"], keepdims=0)],
        "int_model",
        [helper.make_tensor_value_info("x", TensorProto.INT64, ["N", 3])],
        [helper.make_tensor_value_info("doubled", TensorProto.INT64, ["N", 3]),
         helper.make_tensor_value_info("total", TensorProto.INT64, ["N"])],
        initializer=[helper.make_tensor("two", TensorProto.INT64, [], [2]),
                     helper.make_tensor("axis", TensorProto.INT64, [1], [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return model


def _two_input_model():
    """a, b: float [N, 2] -> sum = a + b. Several inputs: the request names them."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["sum"])],
        "two_inputs",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 2]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["N", 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return model


def test_regressor_single_output_is_a_plain_array(start_server, tmp_path, diabetes_ridge):
    X, model = diabetes_ridge
    onx = skl2onnx.to_onnx(model, X[:1].astype(np.float32), target_opset=OPSET)
    path = _save(onx, tmp_path / "ridge.onnx")
    server = start_server(["--no-code-model", str(path), "--no-code-framework", "onnx"])

    resp = _post(server, {"data": X[:5].tolist()})
    assert resp.status == 200, resp.body
    got = np.asarray(resp.json())
    assert got.shape == (5, 1)  # the output's declared shape [N, 1], not squeezed
    # float32 inside the ONNX graph: close to scikit-learn's float64, not equal.
    np.testing.assert_allclose(got[:, 0], model.predict(X[:5]), rtol=1e-4, atol=1e-3)

    bare = _post(server, X[:2].tolist())  # a bare array, as the scikit-learn path takes
    np.testing.assert_allclose(np.asarray(bare.json())[:, 0], model.predict(X[:2]),
                               rtol=1e-4, atol=1e-3)
    one_row = _post(server, {"data": X[0].tolist()})  # one sample gets its batch dimension
    assert np.asarray(one_row.json()).shape == (1, 1)

    doc = server.get("/swagger.json")
    assert doc.status == 200 and doc.json()["swagger"] == "2.0"
    v3 = server.get("/swagger.json?version=3")
    assert v3.status == 200 and v3.json()["openapi"].startswith("3.")


@pytest.mark.parametrize("payload, needle", [
    ({"data": [[1.0, 2.0]]}, "shape [1, 2]"),
    ({"data": [[1.0] * 10, [2.0] * 9]}, "rectangular"),
    ({"data": [["a"] * 10]}, "strings"),
    ({"data": [[None] * 10]}, "nulls"),
    ({"data": [[True] * 10]}, "booleans"),
    ({"data": [[[0.1] * 10]]}, "shape [1, 1, 10]"),
    ({"data": 3.0}, "shape []"),
    ({"rows": [[0.1] * 10]}, '"data"'),
    ({"data": [[0.1] * 10], "method": "predict"}, "scikit-learn models only"),
    ({"data": {"x": [[0.1] * 10]}}, "model's inputs are ['X']"),
])
def test_bad_input_is_400_naming_the_expected_input(start_server, tmp_path, diabetes_ridge,
                                                   payload, needle):
    X, model = diabetes_ridge
    path = _save(skl2onnx.to_onnx(model, X[:1].astype(np.float32), target_opset=OPSET),
                 tmp_path / "ridge.onnx")
    server = start_server(["--no-code-model", str(path), "--no-code-framework", "onnx"])
    resp = _post(server, payload)
    assert resp.status == 400, resp.body
    body = resp.json()
    assert body["status_code"] == 400
    assert needle in body["message"]
    if "data" in payload and "method" not in payload and not isinstance(payload["data"], dict):
        assert "input 'X' of shape [N, 10] and type float32 (tensor(float))" in body["message"]
    assert server.post(body="{oops", headers=JSON).status == 400


def test_classifier_outputs_keyed_by_name(start_server, tmp_path, iris_classifier):
    X, model = iris_classifier
    # zipmap=False: probabilities as an [N, classes] tensor rather than a list of maps.
    onx = skl2onnx.to_onnx(model, X[:1].astype(np.float32), target_opset=OPSET,
                           options={id(model): {"zipmap": False}})
    (tmp_path / "clf").mkdir()
    _save(onx, tmp_path / "clf" / "model.onnx")
    server = start_server(["--no-code-model", str(tmp_path / "clf")],
                          env={"MLBUILD_NO_CODE_FRAMEWORK": "onnx"})
    resp = _post(server, {"data": X[:4].tolist()})
    assert resp.status == 200, resp.body
    out = resp.json()
    assert set(out) == {"label", "probabilities"}
    assert out["label"] == model.predict(X[:4]).tolist()
    np.testing.assert_allclose(out["probabilities"], model.predict_proba(X[:4]),
                               rtol=1e-4, atol=1e-5)


def test_zipmap_output_and_onnx_file_found_by_suffix(start_server, tmp_path, iris_classifier):
    X, model = iris_classifier
    onx = skl2onnx.to_onnx(model, X[:1].astype(np.float32), target_opset=OPSET)  # ZipMap
    path = _save(onx, tmp_path / "clf.onnx")
    # No framework given: the runtime's default is scikit-learn, and an .onnx file is
    # still served with onnxruntime.
    server = start_server(["--no-code-model", str(path)])
    out = _post(server, {"data": X[:2].tolist()}).json()
    assert out["output_label"] == model.predict(X[:2]).tolist()
    expected = model.predict_proba(X[:2])
    for got_row, want_row in zip(out["output_probability"], expected):
        assert sorted(got_row) == ["0", "1", "2"]  # class labels as JSON object keys
        assert [got_row[str(c)] for c in range(3)] == pytest.approx(want_row.tolist(), abs=1e-5)


def test_helper_built_int64_model_two_outputs(start_server, tmp_path):
    path = _save(_int_model(), tmp_path / "ints.onnx")
    server = start_server(["--no-code-model", str(path), "--no-code-framework", "onnx"])
    resp = _post(server, {"data": [[1, 2, 3], [4, 5, 6]]})
    assert resp.status == 200, resp.body
    assert resp.json() == {"doubled": [[2, 4, 6], [8, 10, 12]], "total": [6, 15]}
    # Whole numbers written as floats are fine for an integer input; fractions are not.
    assert _post(server, {"data": [[1.0, 2.0, 3.0]]}).json()["total"] == [6]
    for payload, needle in [({"data": [[1.5, 2, 3]]}, "fractions"),
                            ({"data": [[2 ** 63, 0, 0]]}, "outside"),
                            ({"data": [[1, 2]]}, "shape [1, 2]")]:
        resp = _post(server, payload)
        assert resp.status == 400, (payload, resp.body)
        message = resp.json()["message"]
        assert needle in message
        assert "input 'x' of shape [N, 3] and type int64 (tensor(int64))" in message


def test_several_inputs_are_named_in_data(start_server, tmp_path):
    path = _save(_two_input_model(), tmp_path / "add.onnx")
    server = start_server(["--no-code-model", str(path), "--no-code-framework", "ONNX"])
    resp = _post(server, {"data": {"a": [[1, 2]], "b": [[10, 20]]}})
    assert resp.status == 200, resp.body
    assert resp.json() == [[11.0, 22.0]]
    unnamed = _post(server, {"data": [[1, 2]]})
    assert unnamed.status == 400 and "several inputs" in unnamed.json()["message"]
    missing = _post(server, {"data": {"a": [[1, 2]]}})
    assert missing.status == 400 and "['a', 'b']" in missing.json()["message"]
    # Both declared [N, 2]: the same N. (onnxruntime would broadcast 1 row to 2.)
    mismatch = _post(server, {"data": {"a": [[1, 2]], "b": [[1, 2], [3, 4]]}})
    assert mismatch.status == 400, mismatch.body
    assert "dimension 'N' is 1 in input 'a' but 2 in input 'b'" in mismatch.json()["message"]


def test_sklearn_no_code_still_rejects_bad_rows_with_400(start_server, tmp_path, diabetes_ridge):
    joblib = pytest.importorskip("joblib")
    X, model = diabetes_ridge
    joblib.dump(model, tmp_path / "ridge.pkl")
    server = start_server(["--no-code-model", str(tmp_path / "ridge.pkl")])
    assert _post(server, {"data": X[:2].tolist()}).json() == pytest.approx(
        model.predict(X[:2]).tolist())
    resp = _post(server, {"data": [[1.0, 2.0]]})
    assert resp.status == 400 and "10 features" in resp.json()["message"]


def test_unknown_framework_fails_at_start(start_server, tmp_path):
    path = _save(_int_model(), tmp_path / "model.bin")
    server = start_server(["--no-code-model", str(path), "--no-code-framework", "tensorflow"],
                          wait=None)
    assert server.wait_exit() != 0
    assert "supported: scikit-learn, onnx" in server.output()
