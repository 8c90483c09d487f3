"""ONNX models served without an entry script, through onnxruntime.

Every model is made here: two by skl2onnx from scikit-learn models fitted on its bundled
data sets, three written node by node with ``onnx.helper``. Nothing is downloaded.
"""

from __future__ import annotations

import base64
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


# --- ONNX tensor JSON: onnxruntime server's PredictRequest, as Azure ML's ONNX samples send ---


def _mnist_like_model():
    """Input3: float [N, 1, 2, 2] -> Plus214_Output_0 = flat @ W + B (float [N, 3]) and
    total = row sums (float [N]). Named after Azure ML's MNIST sample; two outputs so that
    outputFilter has something to leave out."""
    from onnx import TensorProto, helper, numpy_helper

    weights = (np.arange(12, dtype=np.float32).reshape(4, 3) - 5) / 10
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["Input3"], ["flat"]),
         helper.make_node("MatMul", ["flat", "W"], ["times"]),
         helper.make_node("Add", ["times", "B"], ["Plus214_Output_0"]),
         helper.make_node("ReduceSum", ["flat", "axis"], ["total"], keepdims=0)],
        "mnist_like",
        [helper.make_tensor_value_info("Input3", TensorProto.FLOAT, ["N", 1, 2, 2])],
        [helper.make_tensor_value_info("Plus214_Output_0", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("total", TensorProto.FLOAT, ["N"])],
        initializer=[numpy_helper.from_array(weights, "W"),
                     numpy_helper.from_array(np.array([1, -1, 0.5], np.float32), "B"),
                     numpy_helper.from_array(np.array([1], np.int64), "axis")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return model


def _raw(array, dtype="<f4", data_type=1):
    """A TensorProto in JSON as the spec example writes it by hand: int dims, rawData."""
    array = np.asarray(array)
    return {"dims": list(array.shape), "dataType": data_type,
            "rawData": base64.b64encode(array.astype(dtype).tobytes()).decode("ascii")}


def _to_array(tensor_json):
    """An answered tensor read the way a protobuf client reads it (also proves it parses)."""
    from google.protobuf import json_format
    from onnx import TensorProto, numpy_helper

    return numpy_helper.to_array(json_format.ParseDict(tensor_json, TensorProto()))


@pytest.fixture
def mnist_like_server(start_server, tmp_path):
    path = _save(_mnist_like_model(), tmp_path / "mnist_like.onnx")
    return start_server(["--no-code-model", str(path), "--no-code-framework", "onnx"])


def test_tensor_json_raw_data_round_trip_matches_nested_lists(mnist_like_server):
    from google.protobuf import json_format
    from onnx import numpy_helper

    server = mnist_like_server
    x = np.random.default_rng(0).random((3, 1, 2, 2), dtype=np.float32)
    nested = _post(server, {"data": x.tolist()})
    assert nested.status == 200, nested.body

    resp = _post(server, {"inputs": {"Input3": _raw(x)}})
    assert resp.status == 200, resp.body
    outputs = resp.json()["outputs"]
    assert set(outputs) == {"Plus214_Output_0", "total"}
    # As onnxruntime server answered: int64 dims as strings, rawData in -> rawData out.
    assert outputs["Plus214_Output_0"]["dims"] == ["3", "3"]
    assert outputs["total"]["dims"] == ["3"]
    for name, tensor in outputs.items():
        assert tensor["dataType"] == 1 and tensor["dataLocation"] == "DEFAULT"
        assert set(tensor) == {"dims", "dataType", "rawData", "dataLocation"}
        by_hand = np.frombuffer(base64.b64decode(tensor["rawData"]), "<f4")
        np.testing.assert_array_equal(by_hand, np.ravel(nested.json()[name]))
        np.testing.assert_array_equal(_to_array(tensor), nested.json()[name])

    # The request a protobuf client writes (dims as strings, a "name" field) is the same.
    generated = json_format.MessageToDict(numpy_helper.from_array(x, "Input3"))
    assert generated["dims"] == ["3", "1", "2", "2"]
    again = _post(server, {"inputs": {"Input3": generated}})
    assert again.status == 200, again.body
    assert again.json() == resp.json()


def test_tensor_json_typed_fields_answer_in_typed_fields(mnist_like_server, start_server,
                                                         tmp_path):
    server = mnist_like_server
    x = np.random.default_rng(1).random((2, 1, 2, 2), dtype=np.float32)
    nested = _post(server, {"data": x.tolist()}).json()
    typed = {"dims": ["2", "1", "2", "2"], "dataType": 1, "floatData": x.ravel().tolist()}
    resp = _post(server, {"inputs": {"Input3": typed}})
    assert resp.status == 200, resp.body
    tensor = resp.json()["outputs"]["Plus214_Output_0"]
    # Typed fields in -> typed fields out, as onnxruntime server answered.
    assert set(tensor) == {"dims", "dataType", "floatData"}
    assert tensor["dims"] == ["2", "3"] and tensor["dataType"] == 1
    np.testing.assert_array_equal(np.asarray(tensor["floatData"], np.float32),
                                  np.ravel(nested["Plus214_Output_0"]))
    np.testing.assert_array_equal(_to_array(tensor), nested["Plus214_Output_0"])
    # snake_case, as protobuf's JSON parser also takes it.
    snake = {"dims": [2, 1, 2, 2], "data_type": 1, "float_data": x.ravel().tolist()}
    assert _post(server, {"inputs": {"Input3": snake}}).json() == resp.json()

    # int64: int64Data may hold strings (proto3 JSON's int64) and answers with strings.
    ints = start_server(["--no-code-model", str(_save(_int_model(), tmp_path / "ints.onnx"))])
    resp = _post(ints, {"inputs": {"x": {"dims": [2, 3], "dataType": 7,
                                         "int64Data": ["1", 2, "3", 4, "5", 6]}}})
    assert resp.status == 200, resp.body
    assert resp.json() == {"outputs": {
        "doubled": {"dims": ["2", "3"], "dataType": 7,
                    "int64Data": ["2", "4", "6", "8", "10", "12"]},
        "total": {"dims": ["2"], "dataType": 7, "int64Data": ["6", "15"]}}}
    raw = _post(ints, {"inputs": {"x": _raw([[1, 2, 3]], "<i8", 7)}}).json()["outputs"]
    assert _to_array(raw["total"]).tolist() == [6]
    assert _to_array(raw["doubled"]).dtype == np.int64


def test_tensor_json_output_filter(mnist_like_server):
    server = mnist_like_server
    x = np.ones((1, 1, 2, 2), np.float32)
    resp = _post(server, {"inputs": {"Input3": _raw(x)}, "outputFilter": ["total"]})
    assert resp.status == 200, resp.body
    assert list(resp.json()["outputs"]) == ["total"]
    assert _to_array(resp.json()["outputs"]["total"]).tolist() == [4.0]
    # Empty, as proto3 JSON may send a repeated field: every output.
    every = _post(server, {"inputs": {"Input3": _raw(x)}, "output_filter": []}).json()
    assert set(every["outputs"]) == {"Plus214_Output_0", "total"}


def test_tensor_json_bad_input_is_400_naming_the_field(mnist_like_server):
    server = mnist_like_server
    good = _raw(np.zeros((1, 1, 2, 2), np.float32))
    as_double = _raw(np.zeros((1, 1, 2, 2)), "<f8", 11)
    flat = _raw(np.zeros((1, 4), np.float32))

    def typed(field, values):
        return {"inputs": {"Input3": {"dims": [1, 1, 2, 2], "dataType": 1, field: values}}}

    cases = [
        ("unknown input name", {"inputs": {"Input4": good}},
         ["inputs.Input4", "no input 'Input4'", "input 'Input3' of shape [N, 1, 2, 2]"]),
        ("missing input", {"inputs": {}}, ["inputs", "'Input3' is missing"]),
        ("dims do not match the byte count",
         {"inputs": {"Input3": {**good, "dims": [2, 1, 2, 2]}}},
         ["inputs.Input3.rawData", "16 bytes", "dims [2, 1, 2, 2]", "need 32"]),
        ("unknown dataType", {"inputs": {"Input3": {**good, "dataType": 99}}},
         ["inputs.Input3.dataType", "unknown dataType 99", "takes dataType 1 (FLOAT)"]),
        ("unsupported dataType", {"inputs": {"Input3": {**good, "dataType": 16}}},
         ["inputs.Input3.dataType", "16 (BFLOAT16) is not supported"]),
        ("bad base64", {"inputs": {"Input3": {**good, "rawData": "not base64!"}}},
         ["inputs.Input3.rawData", "not valid base64"]),
        ("dataType of another type", {"inputs": {"Input3": as_double}},
         ["inputs.Input3.dataType", "11 (DOUBLE)", "tensor(float)", "takes dataType 1 (FLOAT)"]),
        ("unknown outputFilter name", {"inputs": {"Input3": good}, "outputFilter": ["Plus"]},
         ["outputFilter", "no output 'Plus'", "'Plus214_Output_0'"]),
        ("outputFilter not a list", {"inputs": {"Input3": good}, "outputFilter": "total"},
         ["outputFilter", "JSON array of output names"]),
        ("misspelt outputFilter", {"inputs": {"Input3": good}, "outputfilter": ["total"]},
         ["unknown field 'outputfilter'", "did you mean 'outputFilter'"]),
        ("dims that do not fit the model", {"inputs": {"Input3": flat}},
         ["inputs.Input3.dims", "[1, 4] does not fit input 'Input3' of shape [N, 1, 2, 2]"]),
        ("dims not integers", {"inputs": {"Input3": {**good, "dims": [1, 1, 2, "two"]}}},
         ["inputs.Input3.dims[3]", "'two' is not an integer"]),
        ("floatData count", typed("floatData", [1, 2, 3]),
         ["inputs.Input3.floatData", "3 values, but dims hold 4"]),
        ("floatData not numbers", typed("floatData", [1, 2, 3, "x"]),
         ["inputs.Input3.floatData[3]", "not a number"]),
        ("typed field of another type", typed("int64Data", [1, 2, 3, 4]),
         ["inputs.Input3.int64Data", "takes its values in rawData or floatData"]),
        ("both rawData and floatData", {"inputs": {"Input3": {**good, "floatData": [0] * 4}}},
         ["inputs.Input3", "both rawData and floatData"]),
        ("no values", {"inputs": {"Input3": {"dims": [1, 1, 2, 2], "dataType": 1}}},
         ["inputs.Input3", "no values"]),
        ("missing dataType",
         {"inputs": {"Input3": {"dims": [1, 1, 2, 2], "rawData": good["rawData"]}}},
         ["inputs.Input3.dataType", "missing"]),
        ("unknown tensor field", {"inputs": {"Input3": {**good, "rawdata": "AAAA"}}},
         ["inputs.Input3", "unknown field 'rawdata'", "did you mean 'rawData'"]),
        ("tensor not an object", {"inputs": {"Input3": [[0.0] * 4]}},
         ["inputs.Input3", "expected a tensor object"]),
        ("KServe v2 list", {"inputs": [{"name": "Input3", "shape": [1, 1, 2, 2]}]},
         ["inputs", "expected an object mapping input names to tensors"]),
    ]
    for case, payload, needles in cases:
        resp = _post(server, payload)
        assert resp.status == 400, (case, resp.status, resp.body)
        body = resp.json()
        assert body["status_code"] == 400, case
        for needle in needles:
            assert needle in body["message"], (case, needle, body["message"])
    # Nothing of that broke the service.
    assert _post(server, {"inputs": {"Input3": good}}).status == 200


def test_tensor_json_zipmap_output_must_be_filtered_out(start_server, tmp_path, iris_classifier):
    X, model = iris_classifier
    onx = skl2onnx.to_onnx(model, X[:1].astype(np.float32), target_opset=OPSET)  # ZipMap
    server = start_server(["--no-code-model", str(_save(onx, tmp_path / "clf.onnx"))])
    request = {"inputs": {"X": _raw(X[:3])}}
    resp = _post(server, request)
    assert resp.status == 400, resp.body
    message = resp.json()["message"]
    assert "output 'output_probability'" in message and "outputFilter" in message
    resp = _post(server, {**request, "outputFilter": ["output_label"]})
    assert resp.status == 200, resp.body
    label = resp.json()["outputs"]["output_label"]
    assert label["dataType"] == 7 and label["dims"] == ["3"]
    assert _to_array(label).tolist() == model.predict(X[:3]).tolist()
