"""The runtime as a drop-in for Azure's ``azmlinfsrv`` (azureml-inference-server-http):
its options and environment, fail-fast start, streaming, the separate health port, its
response headers, /swagger.json versions and the scoring timeout -- over real HTTP.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import re
import socket
import time

import pytest
from conftest import START_TIMEOUT, free_port, write_script

from mlbuild.runtime.__main__ import build_parser
from mlbuild.runtime.config import RuntimeConfig, ServerOptions

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")

ECHO_SCRIPT = """
    import os

    def init():
        pass

    def run(raw_data):
        return {"echo": raw_data, "pid": os.getpid()}
"""

SLOW_INIT_SCRIPT = """
    import time

    def init():
        time.sleep(2.0)

    def run(raw_data):
        return "scored"
"""


# -- options and environment -------------------------------------------------------------
def test_defaults_and_azure_environment_variables():
    options = ServerOptions.from_env({})
    assert (options.port, options.health_port, options.workers) == (5001, None, 1)
    azure = ServerOptions.from_env({"WORKER_COUNT": "3", "SEPERATE_HEALTH_ENDPOINT": "true"})
    assert (azure.workers, azure.health_port) == (3, 5000)
    moved = ServerOptions.from_env({"SEPERATE_HEALTH_ENDPOINT": "true", "HEALTH_PORT": "8346"})
    assert moved.health_port == 8346
    # HEALTH_PORT alone means nothing to azmlinfsrv (it sets it itself); ours is explicit.
    assert ServerOptions.from_env({"HEALTH_PORT": "8346"}).health_port is None
    assert ServerOptions.from_env({"MLBUILD_HEALTH_PORT": "7000"}).health_port == 7000
    config = RuntimeConfig.from_env({"AZUREML_ENTRY_SCRIPT": "score.py",
                                     "AZUREML_MODEL_DIR": "./my/dir", "AML_APP_ROOT": "/app",
                                     "SERVICE_NAME": "diabetes"})
    assert (config.entry_script, config.model_dir, config.app_root, config.service_name) == (
        "score.py", "./my/dir", "/app", "diabetes")
    assert RuntimeConfig.from_env({"SCORING_TIMEOUT_MS": "1500"}).request_timeout == 1.5
    assert RuntimeConfig.from_env({"MLBUILD_REQUEST_TIMEOUT": "2",
                                   "SCORING_TIMEOUT_MS": "1500"}).request_timeout == 2.0
    assert RuntimeConfig.from_env({}).request_timeout is None
    with pytest.raises(ValueError, match="SCORING_TIMEOUT_MS"):
        RuntimeConfig.from_env({"SCORING_TIMEOUT_MS": "soon"})


def test_parser_accepts_both_spellings():
    parser = build_parser()
    for spelling in (["--entry-script", "s.py", "--model-dir", "m", "--health-port", "7",
                      "--workers", "2", "--cors-origins", "a"],
                     ["--entry_script", "s.py", "--model_dir", "m", "--health_port", "7",
                      "--worker_count", "2", "--access_control_allow_origins", "a"]):
        args = parser.parse_args(spelling)
        assert (args.entry_script, args.model_dir, args.health_port, args.workers,
                args.cors_origins) == ("s.py", "m", 7, 2, "a")
    # Nothing is defaulted by the parser: the environment fills in what is not given.
    assert build_parser().parse_args([]).port is None


def test_configured_by_azure_environment_only(start_server, tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    (tmp_path / "my" / "dir").mkdir(parents=True)
    write_script(app, """
        import os

        def init():
            pass

        def run(raw_data):
            return [os.environ["AZUREML_MODEL_DIR"], os.environ["MLBUILD_MODEL_DIR"]]
    """)
    server = start_server([], cwd=tmp_path, env={
        "AZUREML_ENTRY_SCRIPT": "score.py", "AML_APP_ROOT": str(app),
        "AZUREML_MODEL_DIR": "./my/dir", "WORKER_COUNT": "1"})
    assert server.post(body="{}").json() == ["./my/dir", "./my/dir"]


def test_relative_entry_script_falls_back_to_the_current_folder(start_server, tmp_path):
    write_script(tmp_path, ECHO_SCRIPT)
    elsewhere = tmp_path / "app_root"
    elsewhere.mkdir()
    server = start_server(["--entry_script", "score.py"], cwd=tmp_path,
                          env={"AML_APP_ROOT": str(elsewhere)})
    assert server.post(body="hi").json()["echo"] == "hi"


# -- fail fast ---------------------------------------------------------------------------
@pytest.mark.parametrize("source, needle", [
    (None, "does not exist"),
    ("def init(:\n    pass\n\ndef run(d):\n    return d\n", "SyntaxError"),
    ("def init():\n  pass\n   x = 1\n\ndef run(d):\n    return d\n", "IndentationError"),
    ("def init():\n    raise OSError('model file is gone')\n\ndef run(d):\n    return d\n",
     "model file is gone"),
])
def test_broken_start_exits_nonzero_fast_with_traceback(start_server, tmp_path, source, needle):
    if source is not None:
        (tmp_path / "score.py").write_text(source)
    started = time.monotonic()
    server = start_server(["--entry-script", str(tmp_path / "score.py")], wait=None)
    code = server.wait_exit(timeout=START_TIMEOUT)
    assert code == 3
    assert time.monotonic() - started < 10
    out = server.output()
    assert needle in out
    # The script's own errors come with their traceback; a missing file is our message
    # alone (a traceback of the runtime's internals would say nothing more).
    assert ("Traceback" in out) == (source is not None)


def test_no_entry_script_is_a_usage_error(start_server):
    server = start_server([], wait=None)
    assert server.wait_exit() == 2
    assert "nothing to serve" in server.output()


def test_busy_health_port_exits_1_and_leaves_its_holder_alone(start_server, tmp_path):
    script = write_script(tmp_path, ECHO_SCRIPT)
    health_port = free_port()
    first = start_server(["--entry-script", str(script), "--health-port", str(health_port)])
    second = start_server(["--entry-script", str(script), "--health-port", str(health_port)],
                          wait=None)
    assert second.wait_exit() == 1
    assert "port in use" in second.output()
    assert first.post(body="x").status == 200
    assert _get(health_port, "/").status == 200
    # The main port the failed server had bound is free again.
    with socket.socket() as s:
        s.bind(("127.0.0.1", second.port))


# -- streaming ---------------------------------------------------------------------------
STREAM_SCRIPT = """
    import os
    import time

    def init():
        pass

    def run(raw_data):
        marker = os.environ["LAST_ITEM_MARKER"]
        for i in range(4):
            if i == 3:
                open(marker, "w").close()  # the last item is being produced now
            yield {{"item": i}}
            time.sleep(0.4)
"""


@pytest.mark.parametrize("args", [[], ["--dispatch", "thread"], ["--request-timeout", "30"]],
                         ids=["inline", "thread", "timeout"])
def test_generator_items_are_streamed_one_chunk_each(start_server, tmp_path, args):
    marker = tmp_path / "last-item"
    script = write_script(tmp_path, STREAM_SCRIPT.format())
    server = start_server(["--entry-script", str(script), *args],
                          env={"LAST_ITEM_MARKER": str(marker)})
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("POST", "/score", body=b"go")
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.getheader("transfer-encoding") == "chunked"
    assert resp.getheader("x-request-id")
    chunks = [resp.read1()]
    assert not marker.exists(), "the first chunk came only after the last item was produced"
    while True:
        chunk = resp.read1()
        if not chunk:
            break
        chunks.append(chunk)
    conn.close()
    items = [json.loads(line) for line in b"".join(chunks).splitlines()]
    assert items == [{"item": i} for i in range(4)]
    assert json.loads(chunks[0]) == {"item": 0}


# -- separate health port ----------------------------------------------------------------
def _get(port: int, path: str, method: str = "GET", body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        resp.body = resp.read()
        return resp
    finally:
        conn.close()


def _wait_status(port: int, path: str, status: int, timeout: float = START_TIMEOUT):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = _get(port, path).status
            if last == status:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"GET :{port}{path} never answered {status} (last: {last})")


@pytest.mark.parametrize("how", ["option", "azure-env"])
def test_separate_health_port(start_server, tmp_path, how):
    health_port = free_port()
    script = write_script(tmp_path, SLOW_INIT_SCRIPT)
    if how == "option":
        args, env = ["--entry-script", str(script), "--health-port", str(health_port)], {}
    else:
        args = ["--entry-script", str(script)]
        env = {"SEPERATE_HEALTH_ENDPOINT": "true", "HEALTH_PORT": str(health_port)}
    server = start_server(args, env=env, wait=None)
    # Up from the start: live at once, not ready while init() sleeps.
    _wait_status(health_port, "/healthz/live", 200, timeout=10)
    assert _get(health_port, "/healthz/ready").status == 503
    root = _get(health_port, "/")
    assert (root.status, root.body) == (200, b"Healthy")
    assert UUID4.match(root.getheader("x-request-id"))
    _wait_status(health_port, "/healthz/ready", 200)
    # Scoring stays on the main port only.
    assert server.post(body="x").json() == "scored"
    assert _get(health_port, "/score", "POST", body=b"x").status == 405
    assert _get(health_port, "/score").status == 404
    assert _get(health_port, "/", headers={"x-request-id": "probe-1"}).getheader(
        "x-request-id") == "probe-1"


def test_health_port_holds_a_ready_probe_with_wait(start_server, tmp_path):
    """``/healthz/ready?wait=S``: one request answers 200 as soon as init() returned (how
    a deploy waits for a container), or 503 once S passed; a bad value answers at once."""
    health_port = free_port()
    script = write_script(tmp_path, SLOW_INIT_SCRIPT)
    start_server(["--entry-script", str(script), "--health-port", str(health_port)],
                 wait=None)
    _wait_status(health_port, "/healthz/live", 200, timeout=10)
    t = time.monotonic()
    assert _get(health_port, "/healthz/ready?wait=0.3").status == 503
    assert 0.25 <= time.monotonic() - t < 1.5
    t = time.monotonic()
    assert _get(health_port, "/healthz/ready?wait=bad").status == 503
    assert time.monotonic() - t < 0.5
    held = _get(health_port, "/healthz/ready?wait=20")  # init() sleeps 2 s in all
    assert (held.status, held.body) == (200, b"Ready")
    t = time.monotonic()
    assert _get(health_port, "/healthz/ready?wait=20").status == 200
    assert time.monotonic() - t < 0.5  # ready already: no wait


# -- compatibility modules ---------------------------------------------------------------
def test_shims_under_both_names_and_a_real_package_wins(start_server, tmp_path):
    script = write_script(tmp_path, """
        import azureml.contrib.services.aml_request as a_req
        import azureml.contrib.services.aml_response as a_resp
        import azureml_inference_server_http.api.aml_request as s_req
        import azureml_inference_server_http.api.aml_response as s_resp

        def init():
            pass

        def run(raw_data):
            return {"same": [a_req.AMLRequest is s_req.AMLRequest,
                             a_resp.AMLResponse is s_resp.AMLResponse,
                             a_req.rawhttp is s_req.rawhttp],
                    "shim": [getattr(m, "__mlbuild_compat__", False)
                             for m in (a_req, a_resp, s_req, s_resp)]}
    """)
    server = start_server(["--entry-script", str(script)])
    assert server.post(body="{}").json() == {"same": [True, True, True],
                                             "shim": [True, True, True, True]}

    real = tmp_path / "site" / "azureml_inference_server_http" / "api"
    real.mkdir(parents=True)
    (real.parent / "__init__.py").write_text("")
    (real / "__init__.py").write_text("")
    (real / "aml_response.py").write_text("class AMLResponse:\n    REAL = True\n")
    probe = write_script(tmp_path, """
        from azureml_inference_server_http.api.aml_response import AMLResponse

        def init():
            pass

        def run(raw_data):
            return getattr(AMLResponse, "REAL", False)
    """, name="probe.py")
    with_real = start_server(["--entry-script", str(probe)], pythonpath=str(tmp_path / "site"))
    assert with_real.post(body="{}").json() is True


# -- /swagger.json -----------------------------------------------------------------------
def test_swagger_versions_without_decorators(start_server, tmp_path):
    server = start_server(["--entry-script", str(write_script(tmp_path, ECHO_SCRIPT))],
                          env={"SERVICE_NAME": "diabetes-svc", "SERVICE_VERSION": "7"})
    v2 = server.get("/swagger.json")
    assert v2.status == 200 and v2.headers["content-type"] == "application/json"
    doc = v2.json()
    assert doc["swagger"] == "2.0"
    assert (doc["info"]["title"], doc["info"]["version"]) == ("diabetes-svc", "7")
    assert doc["definitions"]["ServiceInput"]["type"] == "object"
    assert {"/", "/score", "/swagger.json"} <= set(doc["paths"])
    assert server.get("/swagger.json?version=2.0").json() == doc
    for asked, expected in (("3", "3.0."), ("3.0", "3.0."), ("3.1", "3.1.")):
        v3 = server.get(f"/swagger.json?version={asked}").json()
        assert v3["openapi"].startswith(expected) and v3["info"]["title"] == "diabetes-svc"
    unknown = server.get("/swagger.json?version=9")
    assert unknown.status == 404 and "not valid" in unknown.json()["message"]


def test_swagger_file_shipped_with_the_script_is_served_as_is(start_server, tmp_path):
    (tmp_path / "swagger.json").write_text(json.dumps({"swagger": "2.0", "info": {
        "title": "hand-written", "version": "9"}, "paths": {}}))
    server = start_server(["--entry-script", str(write_script(tmp_path, ECHO_SCRIPT))])
    assert server.get("/swagger.json").json()["info"]["title"] == "hand-written"
    assert server.get("/swagger.json?version=3").json()["openapi"].startswith("3.0.")


@pytest.mark.skipif(importlib.util.find_spec("inference_schema") is None,
                    reason="inference-schema not installed")
def test_swagger_with_decorators_all_versions(start_server, tmp_path):
    script = write_script(tmp_path, """
        from inference_schema.schema_decorators import input_schema, output_schema
        from inference_schema.parameter_types.standard_py_parameter_type import (
            StandardPythonParameterType)

        def init():
            pass

        @input_schema("data", StandardPythonParameterType([[1.0, 2.0]]))
        @output_schema(StandardPythonParameterType([3.0]))
        def run(data):
            return [sum(row) for row in data]
    """)
    server = start_server(["--entry-script", str(script)],
                          env={"MLBUILD_SERVICE_NAME": "decorated"})
    v2 = server.get("/swagger.json").json()
    assert v2["info"]["title"] == "decorated"
    assert v2["definitions"]["ServiceInput"]["properties"]["data"]["type"] == "array"
    v3 = server.get("/swagger.json?version=3").json()
    assert v3["components"]["schemas"]["ServiceOutput"]["example"] == [3.0]
    assert server.post(body=json.dumps({"data": [[1, 2]]})).json() == [3]


# -- headers and the access log ----------------------------------------------------------
def test_request_id_headers_as_azmlinfsrv(start_server, tmp_path):
    server = start_server(["--entry-script", str(write_script(tmp_path, ECHO_SCRIPT))])
    fresh = server.post(body="x")
    rid = fresh.headers["x-request-id"]
    assert UUID4.match(rid)
    assert fresh.headers["x-ms-request-id"] == rid
    assert "x-ms-client-request-id" not in fresh.headers
    assert "x-ms-run-function-failed" not in fresh.headers
    assert len({server.post(body="x").headers["x-request-id"] for _ in range(20)}) == 20

    given = server.post(body="x", headers={"x-request-id": "r-1",
                                           "x-ms-client-request-id": "c-1"})
    assert (given.headers["x-request-id"], given.headers["x-ms-request-id"],
            given.headers["x-ms-client-request-id"]) == ("r-1", "c-1", "c-1")
    legacy = server.get("/", headers={"x-ms-request-id": "legacy-1"})
    assert (legacy.headers["x-ms-request-id"], legacy.headers["x-ms-client-request-id"]) == (
        "legacy-1", "legacy-1")
    assert UUID4.match(legacy.headers["x-request-id"])

    too_long = server.post(body="x", headers={"x-request-id": "r" * 101})
    assert too_long.status == 431 and too_long.json()["status_code"] == 431
    assert UUID4.match(too_long.headers["x-request-id"])
    assert server.get("/", headers={"x-ms-client-request-id": "c" * 101}).status == 431
    assert server.post(body="x", headers={"x-request-id": "r" * 100}).status == 200


def test_run_failure_headers(start_server, tmp_path):
    script = write_script(tmp_path, """
        from azureml.contrib.services.aml_request import rawhttp
        from azureml.contrib.services.aml_response import AMLResponse

        def init():
            pass

        @rawhttp
        def run(request):
            what = request.get_data(as_text=True)
            if what == "raise":
                raise KeyError("missing column")
            if what == "503":
                return AMLResponse("overloaded", 503)
            return AMLResponse("fine", 200)
    """)
    server = start_server(["--entry-script", str(script)])
    raised = server.post(body="raise")
    assert raised.status == 500 and raised.headers["x-ms-run-function-failed"] == "True"
    # azmlinfsrv's fixed message: the exception's text (internals) stays in the log.
    assert raised.json() == {"status_code": 500, "message": "An unexpected error occurred "
                             "in scoring script. Check the logs for more info."}
    assert "missing column" not in raised.text
    assert "KeyError: 'missing column'" in server.output()
    returned = server.post(body="503")
    assert (returned.status, returned.body) == (503, b"overloaded")
    assert returned.headers["x-ms-run-function-failed"] == "True"
    fine = server.post(body="ok")
    assert fine.status == 200 and "x-ms-run-function-failed" not in fine.headers


def test_access_log_has_method_path_status_and_duration(start_server, tmp_path):
    server = start_server(["--entry-script", str(write_script(tmp_path, ECHO_SCRIPT))])
    server.post(body="x", headers={"x-request-id": "acc-1"})
    server.get("/swagger.json?version=3")
    server.stop()
    lines = server.output().splitlines()
    # azmlinfsrv's line (milliseconds to 3 places, response bytes) in its log format (UTC).
    stamp = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} I \[\d+\] azmlinfsrv\.access - "
    assert any(re.search(stamp + r"POST /score 200 \d+\.\d{3}ms \d+ rid=acc-1$", ln)
               for ln in lines), lines
    assert any(re.search(stamp + r"GET /swagger\.json\?version=3 200 \d+\.\d{3}ms \d+ ", ln)
               for ln in lines), lines


# -- request timeout ---------------------------------------------------------------------
TIMEOUT_SCRIPT = """
    import time

    calls = []

    def init():
        pass

    def run(raw_data):
        if raw_data == "sleep":
            time.sleep(3)
            return "woke"
        if raw_data == "spin":  # pure Python: interruptible at the deadline
            calls.append("spin")
            end = time.monotonic() + 30
            while time.monotonic() < end:
                pass
            return "spun"
        if raw_data == "own-timeout":
            raise TimeoutError("the feature store did not answer")
        return {"calls": calls}
"""


@pytest.mark.parametrize("env, args", [
    ({}, ["--request-timeout", "0.5"]),
    ({"MLBUILD_REQUEST_TIMEOUT": "0.5"}, []),
    ({"SCORING_TIMEOUT_MS": "500"}, []),
], ids=["option", "mlbuild-env", "azure-env"])
def test_request_timeout_answers_like_azmlinfsrv(start_server, tmp_path, env, args):
    server = start_server(["--entry-script", str(write_script(tmp_path, TIMEOUT_SCRIPT)),
                           *args], env=env)
    started = time.monotonic()
    resp = server.post(body="sleep")
    elapsed = time.monotonic() - started
    assert resp.status == 500
    assert resp.json() == {"status_code": 500, "message": "Scoring timeout after 500 ms"}
    assert resp.headers["x-ms-run-function-failed"] == "True"
    assert resp.headers["x-request-id"]
    assert 0.4 < elapsed < 2.5  # answered at the deadline, not when run() returned
    # The event loop was never blocked: health answers while the run thread sleeps on.
    assert server.get("/healthz/ready").status == 200


def test_timed_out_python_run_is_abandoned_and_the_next_request_served(start_server, tmp_path):
    server = start_server(["--entry-script", str(write_script(tmp_path, TIMEOUT_SCRIPT)),
                           "--request-timeout", "0.5"])
    assert server.post(body="spin").status == 500
    started = time.monotonic()
    after = server.post(body="calls")
    assert after.status == 200 and after.json() == {"calls": ["spin"]}
    assert time.monotonic() - started < 2  # not queued behind a 30 s loop
    # A TimeoutError of the script itself is an ordinary run() failure.
    own = server.post(body="own-timeout")
    assert own.status == 500
    assert own.json()["message"].startswith("An unexpected error occurred in scoring script")
    assert "TimeoutError: the feature store did not answer" in server.output()


def test_async_run_is_cancelled_at_the_deadline(start_server, tmp_path):
    script = write_script(tmp_path, """
        import asyncio

        def init():
            pass

        async def run(raw_data):
            await asyncio.sleep(float(raw_data))
            return "done"
    """)
    server = start_server(["--entry-script", str(script)],
                          env={"SCORING_TIMEOUT_MS": "300"})
    assert server.post(body="0").json() == "done"
    late = server.post(body="5")
    assert late.status == 500 and late.json()["message"] == "Scoring timeout after 300 ms"


def test_no_timeout_by_default_keeps_inline_dispatch(start_server, tmp_path):
    server = start_server(["--entry-script", str(write_script(tmp_path, ECHO_SCRIPT))])
    assert "dispatch=inline, timeout=none" in server.output()
    assert server.post(body="x").status == 200


# -- max_concurrent_requests / max_request_wait_ms (AKS v1's replica settings) ------------
SLOW_RUN_SCRIPT = """
    import time

    def init():
        pass

    def run(raw_data):
        time.sleep(float(raw_data))
        return "done"
"""


def test_requests_past_the_cap_wait_for_a_slot_then_get_503(start_server, tmp_path):
    import concurrent.futures

    server = start_server(["--entry-script", str(write_script(tmp_path, SLOW_RUN_SCRIPT))],
                          env={"MLBUILD_MAX_CONCURRENT_REQUESTS": "1",
                               "MLBUILD_MAX_REQUEST_WAIT_MS": "300"})
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = pool.submit(server.post, body="1.5")
        time.sleep(0.3)  # the slow one holds the only slot
        started = time.monotonic()
        turned_away = server.post(body="0")
        waited = time.monotonic() - started
        assert turned_away.status == 503, turned_away.body
        assert "max_concurrent_requests" in turned_away.json()["message"]
        assert 0.25 < waited < 1.2  # it waited max_request_wait_ms, not for the slow one
        # Health checks still answer while the slot is taken (run() is off the loop).
        assert server.get("/healthz/live").status == 200
        assert slow.result().json() == "done"
    # A request that finds a slot within the wait is served.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(server.post, body="0.1")
        time.sleep(0.02)
        second = server.post(body="0")
        assert (first.result().status, second.status) == (200, 200)


def test_path_prefix_answers_below_it_for_an_ingress_route(start_server, tmp_path):
    server = start_server(["--entry-script", str(write_script(tmp_path, ECHO_SCRIPT))],
                          env={"MLBUILD_PATH_PREFIX": "/diabetes/"})
    assert server.post("/diabetes/score", body="hi").json()["echo"] == "hi"
    assert server.get("/diabetes/healthz/ready").status == 200
    assert server.get("/diabetes").status == 200  # the prefix alone is "/"
    assert server.post("/score", body="hi").json()["echo"] == "hi"  # and the root still
    assert server.get("/other/score").status == 404
