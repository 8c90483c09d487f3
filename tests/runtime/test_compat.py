"""Azure ML v1 scripts unchanged: rawhttp, Model.get_model_path, inference_schema."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from conftest import write_script

RAW_BINARY_SCRIPT = """
    from {module}.aml_request import AMLRequest, rawhttp
    from {module}.aml_response import AMLResponse

    def init():
        pass

    @rawhttp
    def run(request):
        data = request.get_data()
        assert isinstance(data, bytes)
        return AMLResponse(data[::-1], 200, {{"Content-Type": "image/png", "X-Len": str(len(data))}})
"""


@pytest.mark.parametrize("module", ["azureml.contrib.services",
                                    "azureml_inference_server_http.api"])
def test_rawhttp_binary_round_trip(start_server, tmp_path, module):
    script = write_script(tmp_path, RAW_BINARY_SCRIPT.format(module=module))
    server = start_server(["--entry-script", str(script)])
    payload = bytes(range(256)) * 40 + b"\x00\xff\r\n"
    resp = server.post(body=payload, headers={"Content-Type": "application/octet-stream"})
    assert resp.status == 200, resp.body
    assert resp.body == payload[::-1]
    assert resp.headers["content-type"] == "image/png"
    assert resp.headers["x-len"] == str(len(payload))
    assert server.post(body=b"").body == b""


def test_rawhttp_request_fields(start_server, tmp_path):
    script = write_script(tmp_path, """
        from azureml.contrib.services.aml_request import rawhttp

        def init():
            pass

        @rawhttp
        def run(request):
            return {"method": request.method, "path": request.path,
                    "args": dict(request.args), "many": request.args.getlist("k"),
                    "hdr": request.headers.get("x-custom"), "HDR": request.headers["X-CUSTOM"],
                    "json": request.get_json(), "text": request.get_data(as_text=True)}
    """)
    server = start_server(["--entry-script", str(script)])
    resp = server.post("/score?k=1&k=2&x=y", body=b'{"a": 1}',
                       headers={"X-Custom": "v", "Content-Type": "application/json"})
    assert resp.status == 200, resp.body
    assert resp.json() == {"method": "POST", "path": "/score", "args": {"k": "1", "x": "y"},
                           "many": ["1", "2"], "hdr": "v", "HDR": "v", "json": {"a": 1},
                           "text": '{"a": 1}'}


def test_two_models_through_model_get_model_path(start_server, tmp_path):
    models = tmp_path / "models"
    (models / "ridge" / "1").mkdir(parents=True)
    (models / "ridge" / "1" / "ridge.pkl").write_text("ridge v1")
    (models / "ridge" / "2").mkdir()
    (models / "ridge" / "2" / "ridge.pkl").write_text("ridge v2")
    (models / "vocab" / "3" / "vocab").mkdir(parents=True)
    (models / "vocab" / "3" / "vocab" / "words.txt").write_text("a b c")
    script = write_script(tmp_path, """
        import os
        from azureml.core.model import Model

        def init():
            global paths
            paths = {
                "ridge_latest": Model.get_model_path("ridge"),
                "ridge_1": Model.get_model_path(model_name="ridge", version=1),
                "vocab": Model.get_model_path(model_name="vocab"),
                "env": os.environ["AZUREML_MODEL_DIR"],
                "env2": os.environ["MLBUILD_MODEL_DIR"],
            }

        def run(raw_data):
            out = dict(paths)
            out["ridge_text"] = open(paths["ridge_latest"]).read()
            out["vocab_files"] = sorted(os.listdir(paths["vocab"]))
            try:
                Model.get_model_path("missing")
            except FileNotFoundError as exc:
                out["missing"] = str(exc)
            return out
    """)
    # The model dir is given relative, and must reach the script exactly as given.
    server = start_server(["--entry-script", str(script), "--model_dir", "./models"],
                          cwd=tmp_path)
    out = server.post(body="{}").json()
    assert out["env"] == out["env2"] == "./models"
    assert out["ridge_latest"] == os.path.join("./models", "ridge", "2", "ridge.pkl")
    assert out["ridge_1"] == os.path.join("./models", "ridge", "1", "ridge.pkl")
    assert out["ridge_text"] == "ridge v2"
    assert out["vocab"] == os.path.join("./models", "vocab", "3", "vocab")
    assert out["vocab_files"] == ["words.txt"]
    assert "missing" in out


def test_single_model_dir_and_runtime_helper(start_server, tmp_path):
    mdir = tmp_path / "ridge" / "4"
    mdir.mkdir(parents=True)
    (mdir / "model.pkl").write_text("only")
    script = write_script(tmp_path, """
        from azureml.core.model import Model
        from mlbuild.runtime import get_model_path

        def init():
            pass

        def run(raw_data):
            return [Model.get_model_path("ridge"), get_model_path("ridge", 4)]
    """)
    server = start_server(["--entry-script", str(script)],
                          env={"AZUREML_MODEL_DIR": str(mdir)})
    expected = str(mdir / "model.pkl")
    assert server.post(body="{}").json() == [expected, expected]


def test_entry_script_resolved_against_aml_app_root_and_its_folder_on_sys_path(
        start_server, tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    (app / "helper.py").write_text("VALUE = 41\n")
    write_script(app, """
        import helper

        def init():
            pass

        def run(raw_data):
            return helper.VALUE + 1
    """)
    server = start_server(["--entry_script", "score.py"], env={"AML_APP_ROOT": str(app)})
    assert server.post(body="{}").json() == 42


needs_inference_schema = pytest.mark.skipif(
    importlib.util.find_spec("inference_schema") is None, reason="inference-schema not installed")

DECORATED_SCRIPT = """
    import numpy as np
    from inference_schema.schema_decorators import input_schema, output_schema
    from inference_schema.parameter_types.numpy_parameter_type import NumpyParameterType
    from inference_schema.parameter_types.standard_py_parameter_type import (
        StandardPythonParameterType)

    def init():
        pass

    @input_schema("data", NumpyParameterType(np.array([[1.0, 2.0]])))
    @input_schema("scale", StandardPythonParameterType(1.0))
    @output_schema(StandardPythonParameterType([3.0]))
    def run(data, scale):
        assert isinstance(data, np.ndarray), type(data)
        return (data.sum(axis=1) * scale).tolist()
"""


@needs_inference_schema
def test_inference_schema_decorated_run(start_server, tmp_path):
    server = start_server(["--entry-script", str(write_script(tmp_path, DECORATED_SCRIPT))])
    resp = server.post(body=json.dumps({"data": [[1.0, 2.0], [3.0, 4.0]], "scale": 2.0}),
                       headers={"Content-Type": "application/json"})
    assert resp.status == 200, resp.body
    assert resp.json() == [6.0, 14.0]
    bad = server.post(body="{not json", headers={"Content-Type": "application/json"})
    assert bad.status == 400 and bad.json()["status_code"] == 400
    not_object = server.post(body="[1, 2]")
    assert not_object.status == 400
    media = server.post(body=b"\x89PNG", headers={"Content-Type": "image/png"})
    assert media.status == 415
    doc = server.get("/swagger.json").json()
    service_input = doc["definitions"]["ServiceInput"]
    assert set(service_input["properties"]) == {"data", "scale"}
    assert service_input["example"]["scale"] == 1.0
    assert doc["definitions"]["ServiceOutput"]["example"] == [3.0]
