"""What a v1 scoring script and its clients see, over real HTTP against a runtime
subprocess, as azmlinfsrv 1.5.1 shows it: werkzeug-like requests and responses, the
environment exported before init(), GET /score, streamed AMLResponses, every azmlinfsrv
option and its configuration file, the fixed 500 message, the version header, the
start-up banner and the log on stdout.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import time
import uuid

import pytest
from conftest import START_TIMEOUT, free_port, runtime_env, write_script

ENV_SCRIPT = """
    import json
    import os

    from azureml_inference_server_http.api.aml_request import rawhttp
    from azureml_inference_server_http.api.aml_response import AMLResponse

    NAMES = ("AML_APP_ROOT", "AZUREML_ENTRY_SCRIPT", "AZUREML_MODEL_DIR", "SERVER_PORT",
             "HEALTH_PORT", "WORKER_COUNT", "AML_APP_INSIGHTS_ENABLED", "AML_APP_INSIGHTS_KEY",
             "SCORING_TIMEOUT_MS", "SERVICE_NAME", "AML_CORS_ORIGINS")
    seen = {}

    def init():
        # Read here, before the first request: azmlinfsrv exports them before init().
        seen.update({name: os.environ.get(name) for name in NAMES})

    @rawhttp
    def run(request):
        return AMLResponse(seen, 200, json_str=True)
"""


def _run(args, tmp_path, env=None, cwd=None):
    """Start ``python -m mlbuild.runtime ARGS`` with stdout and stderr kept apart."""
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen([sys.executable, "-m", "mlbuild.runtime", "--host", "127.0.0.1",
                                 *args], stdout=fo, stderr=fe, cwd=cwd or tmp_path,
                                env=runtime_env(env))
    return proc, out, err


def _request(port, method, path, body=None, headers=None, timeout=10.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        headers: dict = {}
        for k, v in resp.getheaders():  # a repeated header joined, as a client folds it
            headers[k.lower()] = f"{headers[k.lower()]}, {v}" if k.lower() in headers else v
        return resp.status, headers, resp.read()
    finally:
        conn.close()


def _wait_ready(proc, port, timeout=START_TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the runtime exited {proc.returncode}")
        try:
            if _request(port, "GET", "/healthz/ready", timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError("the runtime never got ready")


@pytest.fixture
def served(tmp_path):
    """``served(script_source, args=[], env={}) -> (port, stdout_path)``; stopped after."""
    procs = []

    def start(source, args=(), env=None, name="score.py", cwd=None):
        script = write_script(tmp_path, source, name=name)
        port = free_port()
        proc, out, _err = _run(["--entry_script", str(script), "--port", str(port), *args],
                               tmp_path, env, cwd)
        procs.append(proc)
        _wait_ready(proc, port)
        return port, out

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=15)


# -- 1. the request and response a @rawhttp script gets ----------------------------------
def test_request_headers_iterate_as_pairs_and_look_up_case_insensitively(served):
    port, _ = served("""
        from azureml.contrib.services.aml_request import rawhttp
        from azureml.contrib.services.aml_response import AMLResponse

        def init():
            pass

        @rawhttp
        def run(request):
            pairs = {}
            for k, v in request.headers:          # werkzeug: (name, value) pairs
                pairs[k] = v
            return AMLResponse({
                "pairs": pairs,
                "get": request.headers.get("x-custom-thing"),
                "getitem": request.headers["X-CUSTOM-THING"],
                "typed": request.headers.get("X-Count", type=int),
                "missing": request.headers.get("nope", "default"),
                "has": "x-custom-thing" in request.headers,
                "as_dict": dict(request.headers)["X-Custom-Thing"],
                "keys": "X-Custom-Thing" in request.headers.keys(),
                "method": request.method, "path": request.path,
                "full_path": request.full_path, "args": request.args.getlist("k"),
                "arg": request.args.get("n", type=int),
                "body": request.get_data(as_text=True),
            }, 200, json_str=True)
    """)
    status, _, body = _request(port, "POST", "/score?k=1&k=2&n=7", body=b"hello",
                               headers={"X-Custom-Thing": "v1", "X-Count": "3"})
    assert status == 200, body
    got = json.loads(body)
    assert got["pairs"]["X-Custom-Thing"] == "v1" and got["pairs"]["X-Count"] == "3"
    assert (got["get"], got["getitem"], got["typed"], got["missing"]) == ("v1", "v1", 3, "default")
    assert got["has"] and got["keys"] and got["as_dict"] == "v1"
    assert (got["method"], got["path"], got["full_path"]) == ("POST", "/score", "/score?k=1&k=2&n=7")
    assert (got["args"], got["arg"], got["body"]) == (["1", "2"], 7, "hello")


def test_multipart_form_and_files(served):
    port, _ = served("""
        from azureml.contrib.services.aml_request import rawhttp

        def init():
            pass

        @rawhttp
        def run(request):
            image = request.files["image"]
            data = image.read()
            return {"form": request.form.get("label"), "filename": image.filename,
                    "mimetype": image.mimetype, "size": len(data), "bytes": list(data[:4])}
    """)
    payload = bytes(range(256)) + b"\r\n--not-a-boundary\r\n" + b"\x00\xff"
    boundary = "XyZ" + uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"label\"\r\n\r\ncat\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
            f"filename=\"cat.png\"\r\nContent-Type: image/png\r\n\r\n").encode() + payload + \
        f"\r\n--{boundary}--\r\n".encode()
    status, _, out = _request(port, "POST", "/score", body=body, headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200, out
    assert json.loads(out) == {"form": "cat", "filename": "cat.png", "mimetype": "image/png",
                               "size": len(payload), "bytes": [0, 1, 2, 3]}


def test_aml_response_status_headers_and_json_str(served):
    port, _ = served("""
        from azureml.contrib.services.aml_request import rawhttp
        from azureml.contrib.services.aml_response import AMLResponse

        def init():
            pass

        @rawhttp
        def run(request):
            which = request.get_data(as_text=True)
            if which == "json":
                return AMLResponse({"a": 1}, 201, {"X-Tags": "red, green"}, json_str=True)
            if which == "none":
                return AMLResponse(None, 202)
            return AMLResponse("<b>hi</b>", 200)
    """)
    status, headers, body = _request(port, "POST", "/score", body=b"json")
    assert (status, json.loads(body), headers["content-type"]) == (201, {"a": 1}, "application/json")
    assert headers["x-tags"] == "red, green"  # one header per comma-separated part, as Azure's
    status, headers, body = _request(port, "POST", "/score", body=b"none")
    assert (status, body) == (202, b"{}")
    status, headers, body = _request(port, "POST", "/score", body=b"html")
    assert (status, body, headers["content-type"]) == (200, b"<b>hi</b>", "text/html; charset=utf-8")


def test_run_with_request_headers_parameter_gets_them(served):
    port, _ = served("""
        def init():
            pass

        def run(data, request_headers):
            return {"data": data, "trace": request_headers.get("Traceparent")}
    """)
    status, _, body = _request(port, "POST", "/score", body=b'{"x": 1}',
                               headers={"traceparent": "00-abc-def-01"})
    assert status == 200, body
    assert json.loads(body) == {"data": '{"x": 1}', "trace": "00-abc-def-01"}


# -- 2. the environment the script sees before init() ------------------------------------
def test_script_sees_azmlinfsrv_environment_before_init(served, tmp_path):
    key = str(uuid.uuid4())
    port, _ = served(ENV_SCRIPT, args=["--model_dir", "./my/dir", "--worker_count", "1",
                                       "--appinsights_instrumentation_key", key])
    got = json.loads(_request(port, "POST", "/score", body=b"{}")[2])
    assert got["AML_APP_ROOT"] == str(tmp_path)  # the current folder, by default
    assert got["AZUREML_ENTRY_SCRIPT"] == os.path.realpath(tmp_path / "score.py")
    assert got["AZUREML_MODEL_DIR"] == "./my/dir"  # as given, not resolved
    assert (got["SERVER_PORT"], got["HEALTH_PORT"], got["WORKER_COUNT"]) == (str(port), str(port), "1")
    assert (got["AML_APP_INSIGHTS_ENABLED"], got["AML_APP_INSIGHTS_KEY"]) == ("true", key)


@pytest.mark.parametrize("env, enabled", [
    ({}, "false"),
    ({"AML_APP_INSIGHTS_ENABLED": "true", "AML_APP_INSIGHTS_KEY": "not-a-uuid"}, "false"),
    ({"AML_APP_INSIGHTS_ENABLED": "yes", "AML_APP_INSIGHTS_KEY": str(uuid.uuid4())}, "false"),
    ({"AML_APP_INSIGHTS_ENABLED": "true", "AML_APP_INSIGHTS_KEY": str(uuid.uuid4())}, "true"),
], ids=["unset", "bad-key", "not-true", "valid"])
def test_app_insights_enabled_is_normalised(served, env, enabled):
    port, _ = served(ENV_SCRIPT, env=env)
    got = json.loads(_request(port, "POST", "/score", body=b"{}")[2])
    assert got["AML_APP_INSIGHTS_ENABLED"] == enabled
    assert got["AZUREML_MODEL_DIR"] is None  # not given: not set


# -- 4. GET /score ----------------------------------------------------------------------
def test_get_score_calls_run_with_the_query(served):
    port, _ = served("""
        import json

        def init():
            pass

        def run(raw):
            return {"got": json.loads(raw)}
    """)
    status, _, body = _request(port, "GET", "/score?a=1&b=[1,2]&c=text&c=more")
    assert status == 200, body
    assert json.loads(body) == {"got": {"a": 1, "b": [1, 2], "c": ["text", "more"]}}


def test_get_score_reaches_a_rawhttp_run(served):
    port, _ = served("""
        from azureml.contrib.services.aml_request import rawhttp

        def init():
            pass

        @rawhttp
        def run(request):
            return {"method": request.method, "q": request.args.get("q")}
    """)
    status, _, body = _request(port, "GET", "/score?q=cats")
    assert (status, json.loads(body)) == (200, {"method": "GET", "q": "cats"})


# -- 5. streaming ----------------------------------------------------------------------
def test_aml_response_of_a_generator_streams_a_chunk_per_item(served):
    port, out = served("""
        import time
        from azureml.contrib.services.aml_request import rawhttp
        from azureml.contrib.services.aml_response import AMLResponse

        def init():
            pass

        def words():
            for word in ("one", "two", "three"):
                yield "item: " + word + "\\n"
                time.sleep(0.3)

        @rawhttp
        def run(request):
            return AMLResponse(words(), 200)
    """)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/score", body=b"go")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("transfer-encoding") == "chunked"
    chunks = []
    while True:
        chunk = resp.read1()
        if not chunk:
            break
        chunks.append(chunk)
    conn.close()
    assert chunks == [b"item: one\n", b"item: two\n", b"item: three\n"]
    # azmlinfsrv's access line for a stream: N/A bytes.
    assert re.search(r"POST /score 200 \d+\.\d{3}ms N/A", out.read_text())


# -- 6. every azmlinfsrv option and its configuration file -------------------------------
def test_every_azmlinfsrv_option_is_accepted(served, tmp_path):
    config = tmp_path / "settings.json"
    config.write_text(json.dumps({"SERVICE_NAME": "from-file", "SCORING_TIMEOUT_MS": 6000,
                                  "AML_CORS_ORIGINS": "https://a.example", "EXTRA_KEY": 1}))
    port, out = served(ENV_SCRIPT, env={"SERVICE_NAME": "from-env"}, args=[
        "--model_dir", "m", "--appinsights_instrumentation_key", "k", "--health_port",
        str(free_port()), "--worker_count", "1", "--access_control_allow_origins",
        "https://b.example", "--config_file", str(config), "--rest"])
    got = json.loads(_request(port, "POST", "/score", body=b"{}")[2])
    assert got["SERVICE_NAME"] == "from-env"  # the environment wins over the file
    assert got["SCORING_TIMEOUT_MS"] == "6000"  # the file fills in what is unset
    assert got["AML_CORS_ORIGINS"] == "https://b.example"  # the command line wins
    assert got["AML_APP_INSIGHTS_ENABLED"] == "false"  # "k" is not a valid key
    text = out.read_text()
    assert "Extra keys = ['EXTRA_KEY']" in text
    assert "Scoring timeout: 6000 ms" in text
    assert "--rest: accepted, not used" in text


def test_a_config_json_beside_the_script_is_read(served, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"SERVICE_NAME": "beside"}))
    port, _ = served(ENV_SCRIPT)
    assert json.loads(_request(port, "POST", "/score", body=b"{}")[2])["SERVICE_NAME"] == "beside"
    doc = json.loads(_request(port, "GET", "/swagger.json")[2])
    assert doc["info"]["title"] == "beside"


def test_a_broken_config_file_is_a_usage_error_naming_it(tmp_path):
    config = tmp_path / "settings.json"
    config.write_text("{not json")
    script = write_script(tmp_path, ENV_SCRIPT)
    proc, out, err = _run(["--entry_script", str(script), "--port", str(free_port()),
                           "--config_file", str(config)], tmp_path)
    assert proc.wait(timeout=START_TIMEOUT) == 2
    assert "settings.json" in err.read_text() and "not valid JSON" in err.read_text()


# -- 7. a failing run() -----------------------------------------------------------------
FAILING = """
    def init():
        pass

    def run(raw):
        raise ValueError("secret table users_2024 is locked")
"""


def test_a_failing_run_answers_a_fixed_message_and_logs_the_traceback(served):
    port, out = served(FAILING)
    status, headers, body = _request(port, "POST", "/score", body=b"{}")
    assert status == 500 and headers["x-ms-run-function-failed"] == "True"
    assert json.loads(body)["message"] == ("An unexpected error occurred in scoring script. "
                                           "Check the logs for more info.")
    assert b"users_2024" not in body
    assert "ValueError: secret table users_2024 is locked" in out.read_text()


def test_the_development_server_shows_the_error_text_marked(served):
    port, _ = served(FAILING, env={"MLBUILD_SHOW_ERRORS": "1"})
    body = json.loads(_request(port, "POST", "/score", body=b"{}")[2])
    assert body["message"].startswith("An unexpected error occurred")
    assert body["development_server_error"] == "ValueError: secret table users_2024 is locked"


# -- 8. what the suite checks besides ----------------------------------------------------
@pytest.mark.parametrize("env, header", [
    ({}, "azmlinfsrv/1.5.1"),
    ({"SERVER_VERSION_LOG_RESPONSE_ENABLED": "true"}, "azmlinfsrv/1.5.1"),
    ({"SERVER_VERSION_LOG_RESPONSE_ENABLED": "false"}, None),
    ({"SERVER_VERSION_LOG_RESPONSE_ENABLED": "notgood"}, None),
], ids=["default", "true", "false", "bad-value"])
def test_server_version_header(served, env, header):
    port, _ = served(ENV_SCRIPT, env=env)
    _, headers, _ = _request(port, "POST", "/score", body=b"{}")
    assert headers.get("x-ms-server-version") == header


def test_swagger_title_is_ml_service_and_the_document_is_complete(served):
    port, _ = served(ENV_SCRIPT)
    doc = json.loads(_request(port, "GET", "/swagger.json")[2])
    assert doc["swagger"] == "2.0" and doc["info"]["title"] == "ML service"
    assert {"/", "/score"} <= set(doc["paths"]) and "ServiceInput" in doc["definitions"]


def test_banner_print_and_log_lines_on_stdout(served, tmp_path):
    port, out = served("""
        def init():
            print("Initializing")

        def run(raw):
            print("A new request received")
            return "ok"
    """, args=["--model_dir", "models", "--access_control_allow_origins", "*"])
    _request(port, "POST", "/score", body=b"{}")
    time.sleep(0.5)  # the access line is written within 0.2 s
    text = out.read_text()
    for line in (f"Entry Script Name: {os.path.realpath(tmp_path / 'score.py')}",
                 "Model Directory: models", f"Server Port: {port}", f"Health Port: {port}",
                 "Worker Count: 1", "CORS for the specified origins: Enabling CORS for *",
                 f"Score:          POST  127.0.0.1:{port}/score"):
        assert line in text, line
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} I \[\d+\] "
    assert re.search(stamp + r"azmlinfsrv\.print - Initializing$", text, re.M)
    assert len(re.findall(stamp + r"azmlinfsrv\.print - A new request received$", text, re.M)) == 1
    assert re.search(stamp + r"azmlinfsrv\.user_script - Users's init has completed", text)
    assert re.search(stamp + r"azmlinfsrv\.access - POST /score 200 \d+\.\d{3}ms 4 rid=", text)


def test_a_script_that_fails_to_load_logs_its_traceback_on_stdout(tmp_path):
    script = write_script(tmp_path, "def init():\n     pass\n    x = 1\n")
    proc, out, _err = _run(["--entry_script", str(script), "--port", str(free_port())], tmp_path)
    assert proc.wait(timeout=START_TIMEOUT) == 3
    assert "IndentationError: unindent does not match any outer indentation level" in out.read_text()


def test_logging_json_in_the_app_root_is_applied(served, tmp_path):
    (tmp_path / "logging.json").write_text(json.dumps({
        "version": 1,
        "formatters": {"f": {
            "class": "azureml_inference_server_http.log_config.AMLLogFormatter",
            "format": "CUSTOM|%(name)s|%(message)s"}},
        "handlers": {"h": {"class": "logging.StreamHandler", "stream": "ext://sys.stdout",
                           "formatter": "f"}},
        "loggers": {"azmlinfsrv": {"level": "INFO", "handlers": ["h"], "propagate": False}},
    }))
    port, out = served("""
        def init():
            print("hello from init")

        def run(raw):
            return "ok"
    """, env={"AML_APP_ROOT": str(tmp_path)})
    text = out.read_text()
    assert "CUSTOM|azmlinfsrv|Loaded logging config from" in text
    assert "CUSTOM|azmlinfsrv.print|hello from init" in text
