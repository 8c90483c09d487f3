"""Endpoints, errors, auth, CORS and limits over real HTTP on 127.0.0.1."""

from __future__ import annotations

import http.client
import json

from conftest import write_script

JSON_SCRIPT = """
    import json
    import numpy as np

    def init():
        global factor
        factor = np.float64(2.0)

    def run(raw_data):
        data = json.loads(raw_data)["data"]
        return {"result": np.asarray(data) * factor, "n": np.int64(len(data))}
"""

RAW_STRING_SCRIPT = """
    def init():
        pass

    def run(raw_data):
        return {"type": type(raw_data).__name__, "echo": raw_data}
"""

RAISING_SCRIPT = """
    def init():
        pass

    def run(raw_data):
        raise ValueError("model exploded on purpose")
"""


def test_json_script_scores_and_encodes_numpy(start_server, tmp_path):
    script = write_script(tmp_path, JSON_SCRIPT)
    server = start_server(["--entry-script", str(script)])
    resp = server.post(body=json.dumps({"data": [[1, 2], [3, 4]]}),
                       headers={"Content-Type": "application/json"})
    assert resp.status == 200, resp.body
    assert resp.headers["content-type"] == "application/json"
    assert resp.json() == {"result": [[2.0, 4.0], [6.0, 8.0]], "n": 2}


def test_health_endpoints_and_request_id(start_server, tmp_path):
    server = start_server(["--entry-script", str(write_script(tmp_path, RAW_STRING_SCRIPT))])
    root = server.get("/")
    assert (root.status, root.text) == (200, "Healthy")
    assert len(root.headers["x-request-id"]) >= 16
    assert server.get("/healthz/live").status == 200
    assert server.get("/healthz/ready").status == 200
    echoed = server.get("/", headers={"x-request-id": "abc-123"})
    assert echoed.headers["x-request-id"] == "abc-123"
    scored = server.post(body="x", headers={"X-Request-Id": "req-7"})
    assert scored.headers["x-request-id"] == "req-7"


def test_undecorated_run_gets_the_raw_body_as_str(start_server, tmp_path):
    server = start_server(["--entry-script", str(write_script(tmp_path, RAW_STRING_SCRIPT))])
    body = '{"data": [1, 2],   "note": "kept as sent, not re-encoded \u00e9"}'
    resp = server.post(body=body.encode(), headers={"Content-Type": "application/json"})
    assert resp.status == 200
    assert resp.json() == {"type": "str", "echo": body}
    # No JSON parsing happens for a raw-string script, so invalid JSON reaches run().
    assert server.post(body="not json").json() == {"type": "str", "echo": "not json"}


def test_run_raising_gives_500_with_message_and_traceback_only_in_log(start_server, tmp_path):
    server = start_server(["--entry-script", str(write_script(tmp_path, RAISING_SCRIPT))])
    resp = server.post(body="{}", headers={"x-request-id": "boom-1"})
    assert resp.status == 500
    assert resp.json() == {"status_code": 500, "message": "An unexpected error occurred in "
                           "scoring script. Check the logs for more info."}
    assert "Traceback" not in resp.text and "exploded" not in resp.text
    assert resp.headers["x-ms-run-function-failed"] == "True"
    server.stop()
    out = server.output()
    assert "Traceback" in out and "model exploded on purpose" in out and "boom-1" in out


def test_access_log_line_per_request(start_server, tmp_path):
    server = start_server(["--entry-script", str(write_script(tmp_path, RAW_STRING_SCRIPT))])
    server.post(body="x", headers={"x-request-id": "log-me"})
    server.get("/nowhere")
    server.stop()
    lines = server.output().splitlines()
    score = [ln for ln in lines if "POST /score 200" in ln]
    assert score and "rid=log-me" in score[0] and "ms" in score[0]
    assert any("GET /nowhere 404" in ln for ln in lines)


def test_not_found_and_method_not_allowed(start_server, tmp_path):
    server = start_server(["--entry-script", str(write_script(tmp_path, RAW_STRING_SCRIPT))])
    missing = server.get("/nope")
    assert missing.status == 404 and missing.json()["status_code"] == 404
    wrong = server.request("PUT", "/score", body=b"{}")
    assert wrong.status == 405 and "POST" in wrong.headers["allow"]
    assert server.request("DELETE", "/").status == 405


def test_auth_keys(start_server, tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# secondary key\nsecond-key-456\n")
    server = start_server(
        ["--entry-script", str(write_script(tmp_path, RAW_STRING_SCRIPT))],
        env={"MLBUILD_AUTH_KEYS": "primary-key-123", "MLBUILD_AUTH_KEYS_FILE": str(keys_file)})
    missing = server.post(body="x")
    assert missing.status == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["status_code"] == 401
    wrong = server.post(body="x", headers={"Authorization": "Bearer primary-key-12"})
    assert wrong.status == 401
    assert server.post(body="x", headers={"Authorization": "Basic primary-key-123"}).status == 401
    for key in ("primary-key-123", "second-key-456"):
        ok = server.post(body="x", headers={"Authorization": f"Bearer {key}"})
        assert ok.status == 200, ok.body
    # Health stays open for probes; the document announces the Bearer scheme.
    assert server.get("/").status == 200
    doc = server.get("/swagger.json").json()
    assert doc["securityDefinitions"]["Bearer"]["in"] == "header"
    assert server.output().count("primary-key-123") == 0  # never logged


def test_cors_preflight_and_simple_request(start_server, tmp_path):
    server = start_server(
        ["--entry-script", str(write_script(tmp_path, RAW_STRING_SCRIPT)),
         "--cors-origins", "https://app.example.com, https://other.example.com"])
    pre = server.request("OPTIONS", "/score", headers={
        "Origin": "https://app.example.com",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, authorization"})
    assert pre.status == 204
    assert pre.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert pre.headers["access-control-allow-headers"] == "content-type, authorization"
    denied = server.request("OPTIONS", "/score", headers={
        "Origin": "https://evil.example.com", "Access-Control-Request-Method": "POST"})
    assert denied.status == 403
    assert "access-control-allow-origin" not in denied.headers
    simple = server.post(body="x", headers={"Origin": "https://other.example.com"})
    assert simple.status == 200
    assert simple.headers["access-control-allow-origin"] == "https://other.example.com"
    foreign = server.post(body="x", headers={"Origin": "https://evil.example.com"})
    assert "access-control-allow-origin" not in foreign.headers


def test_body_over_limit_is_413(start_server, tmp_path):
    server = start_server(["--entry-script", str(write_script(tmp_path, RAW_STRING_SCRIPT)),
                           "--max-body-bytes", "1000"])
    assert server.post(body="a" * 1000).status == 200
    big = server.post(body="a" * 1001)
    assert big.status == 413 and big.json()["status_code"] == 413
    # Chunked upload without Content-Length is cut off too.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("POST", "/score", body=iter([b"a" * 600, b"a" * 600]),
                 encode_chunked=True, headers={"Transfer-Encoding": "chunked"})
    assert conn.getresponse().status == 413
    conn.close()


def test_body_limit_default_from_env(start_server, tmp_path):
    server = start_server(["--entry-script", str(write_script(tmp_path, RAW_STRING_SCRIPT))],
                          env={"MLBUILD_MAX_BODY_BYTES": "10"})
    assert server.post(body="12345678901").status == 413


def test_swagger_from_sample_files_and_openapi3(start_server, tmp_path):
    (tmp_path / "in.json").write_text(json.dumps({"data": [[1.0, 2.0]]}))
    (tmp_path / "out.json").write_text(json.dumps([3.5]))
    server = start_server(["--entry-script", str(write_script(tmp_path, RAW_STRING_SCRIPT))],
                          env={"MLBUILD_SCHEMA_INPUT": str(tmp_path / "in.json"),
                               "MLBUILD_SCHEMA_OUTPUT": str(tmp_path / "out.json"),
                               "MLBUILD_SERVICE_NAME": "diabetes"})
    doc = server.get("/swagger.json").json()
    assert doc["swagger"] == "2.0" and doc["info"]["title"] == "diabetes"
    defs = doc["definitions"]
    assert defs["ServiceInput"]["example"] == {"data": [[1.0, 2.0]]}
    assert defs["ServiceInput"]["properties"]["data"]["type"] == "array"
    assert defs["ServiceOutput"]["example"] == [3.5]
    assert set(defs["ErrorResponse"]["properties"]) == {"status_code", "message"}
    assert "securityDefinitions" not in doc
    v3 = server.get("/swagger.json?version=3").json()
    assert v3["openapi"].startswith("3.")
    assert "ServiceInput" in v3["components"]["schemas"]
    assert "requestBody" in v3["paths"]["/score"]["post"]


def test_metrics_prometheus_text(start_server, tmp_path):
    server = start_server(["--entry-script", str(write_script(tmp_path, RAISING_SCRIPT))])
    server.post(body="x")
    server.post(body="x")
    text = server.get("/metrics").text
    assert 'mlbuild_requests_total{method="POST",path="/score",status="500"} 2' in text
    assert 'mlbuild_score_duration_seconds_bucket{le="+Inf"} 2' in text
    assert "mlbuild_score_duration_seconds_count 2" in text


def test_generator_result_is_streamed_chunk_by_chunk(start_server, tmp_path):
    script = write_script(tmp_path, """
        import time

        def init():
            pass

        def run(raw_data):
            for i in range(3):
                yield f"tok{i} "
                time.sleep(0.3)
    """)
    server = start_server(["--entry-script", str(script)])
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("POST", "/score", body=b"go")
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.getheader("transfer-encoding") == "chunked"
    first = resp.read1()
    assert first == b"tok0 "  # the first token arrives before the generator finished
    assert first + resp.read() == b"tok0 tok1 tok2 "
    conn.close()


def test_deeply_nested_json_is_a_400_and_the_server_keeps_serving(start_server, tmp_path):
    script = write_script(tmp_path, """
        from inference_schema.schema_decorators import input_schema
        from inference_schema.parameter_types.standard_py_parameter_type import (
            StandardPythonParameterType)

        def init():
            pass

        @input_schema("data", StandardPythonParameterType([1]))
        def run(data):
            return data
    """)
    server = start_server(["--entry-script", str(script)])
    deep = b'{"data": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    resp = server.post(body=deep, headers={"Content-Type": "application/json",
                                           "x-request-id": "deep-1"})
    assert resp.status == 400, resp.body
    assert resp.json()["status_code"] == 400 and resp.headers["x-request-id"] == "deep-1"
    assert server.post(body=b'{"data": [1]}',
                       headers={"Content-Type": "application/json"}).json() == [1]
    assert 'status="400"' in server.get("/metrics").text or "400" in server.get("/metrics").text


def test_access_log_escapes_control_characters_in_the_path(start_server, tmp_path):
    server = start_server(["--entry-script", str(write_script(tmp_path, RAW_STRING_SCRIPT))])
    server.get("/x%0a2026-01-01%2000:00:00,000%20I%20[1]%20azmlinfsrv.access%20-%20POST"
               "%20/score%20200%1b[31m")
    server.stop()
    lines = server.output().splitlines()
    forged = [ln for ln in lines if ln.startswith("2026-01-01 00:00:00,000")]
    assert not forged, forged
    assert any("GET /x\\n2026-01-01" in ln and "\\x1b[31m" in ln and " 404 " in ln
               for ln in lines), lines
    assert not any("\x1b" in ln for ln in lines)
