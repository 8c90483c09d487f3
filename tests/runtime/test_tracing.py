"""OpenTelemetry traces of the runtime (mlbuild/runtime/tracing.py), end to end: the real
runtime in a subprocess exports over OTLP/HTTP to a receiver in this process (a stdlib
HTTP server on 127.0.0.1 decoding the protobuf with opentelemetry-proto's classes)."""

from __future__ import annotations

import gzip
import json
import os
import signal
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import free_port, write_script

SERVER, INTERNAL = 2, 1  # opentelemetry.proto.trace.v1.Span.SpanKind
STATUS_ERROR = 2  # Status.StatusCode.STATUS_CODE_ERROR

SCRIPT = """
import json
import sys


def init():
    pass


def run(raw):
    data = json.loads(raw)
    if data.get("fail"):
        raise ValueError("asked to fail")
    return {"n": data.get("n"), "otel": "opentelemetry" in sys.modules}
"""

ASYNC_SCRIPT = """
import json
import sys


def init():
    pass


async def run(raw):
    data = json.loads(raw)
    if data.get("fail"):
        raise ValueError("asked to fail")
    return {"n": data.get("n"), "otel": "opentelemetry" in sys.modules}
"""

BATCHED_SCRIPT = """
import json

from mlbuild.runtime import batched


def init():
    pass


@batched
def run(inputs):
    return [json.loads(i)["n"] * 10 for i in inputs]
"""


# -- the receiver ------------------------------------------------------------------------
def _value(any_value):
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


def _attributes(kvs) -> dict:
    return {kv.key: _value(kv.value) for kv in kvs}


class Receiver:
    """OTLP/HTTP traces receiver: POST /v1/traces, protobuf, as a collector takes them."""

    def __init__(self):
        trace_service_pb2 = pytest.importorskip(  # opentelemetry-proto (the test extra)
            "opentelemetry.proto.collector.trace.v1.trace_service_pb2")
        self.spans: list[dict] = []
        self.posts = 0
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                encoding = (self.headers.get("content-encoding") or "").lower()
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                if self.path != "/v1/traces" or \
                        self.headers.get("content-type") != "application/x-protobuf":
                    self.send_response(404)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                request = trace_service_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver._add(request)
                out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _add(self, request) -> None:
        found = []
        for rs in request.resource_spans:
            resource = _attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    found.append({
                        "name": s.name, "kind": s.kind, "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(), "parent": s.parent_span_id.hex(),
                        "attributes": _attributes(s.attributes), "status": s.status.code,
                        "events": [e.name for e in s.events],
                        "links": [(lk.trace_id.hex(), lk.span_id.hex()) for lk in s.links],
                        "resource": resource, "scope": ss.scope.name,
                        "start": s.start_time_unix_nano, "end": s.end_time_unix_nano})
        with self._cond:
            self.posts += 1
            self.spans += found
            self._cond.notify_all()

    def wait(self, predicate, timeout: float = 15.0) -> list[dict]:
        """The spans received once ``predicate(spans)`` holds; fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.spans):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"spans not received in {timeout}s; got "
                                         f"{json.dumps(self.spans, indent=1, default=str)}")
                self._cond.wait(left)
            return list(self.spans)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(autouse=True)
def _no_inherited_otel(monkeypatch):
    """The servers see only the OTEL_ variables a test gives them."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


def otel_env(endpoint: str, **extra) -> dict:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50",
            "OTEL_SERVICE_NAME": "tracing-test", **extra}


def model_dir(tmp_path):
    """A model folder laid out as mlbuild deploys one model: .../NAME/VERSION."""
    folder = tmp_path / "models" / "ridge" / "3"
    folder.mkdir(parents=True)
    (folder / "model.txt").write_text("weights")
    return str(folder)


def servers(spans):
    return [s for s in spans if s["kind"] == SERVER]


def runs(spans):
    return [s for s in spans if s["kind"] == INTERNAL and s["name"] == "run"]


# -- tests -------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["inline", "thread", "async"])
def test_request_spans_with_run_child_and_propagated_trace(tmp_path, start_server, receiver,
                                                           variant):
    script = write_script(tmp_path, ASYNC_SCRIPT if variant == "async" else SCRIPT)
    env = otel_env(receiver.endpoint)
    if variant == "thread":  # run() in the run thread: the context must be carried there
        env["MLBUILD_RUN_DISPATCH"] = "thread"
    server = start_server(["--entry-script", str(script), "--model-dir", model_dir(tmp_path)],
                          env=env)
    trace_id, parent_id = os.urandom(16).hex(), os.urandom(8).hex()

    r1 = server.post(body=json.dumps({"n": 1}), headers={
        "traceparent": f"00-{trace_id}-{parent_id}-01", "x-request-id": "req-traced-1",
        "user-agent": "tracing-test/1"})
    assert r1.status == 200 and r1.json() == {"n": 1, "otel": True}
    r2 = server.post(body=json.dumps({"n": 2}))
    assert r2.status == 200
    r3 = server.post(body=json.dumps({"fail": True}))
    assert r3.status == 500
    r4 = server.get("/no/such/route")
    assert r4.status == 404

    spans = receiver.wait(lambda s: len(servers(s)) >= 4 and len(runs(s)) >= 3)
    # One server span per request (the readiness polls before are requests too).
    by_rid = {s["attributes"].get("mlbuild.request_id"): s for s in servers(spans)}
    first, second = by_rid["req-traced-1"], by_rid[r2.headers["x-request-id"]]
    failed, missing = by_rid[r3.headers["x-request-id"]], by_rid[r4.headers["x-request-id"]]
    assert len(servers(spans)) == len({s["span_id"] for s in servers(spans)})

    # The incoming traceparent: same trace, its span is the parent.
    assert first["trace_id"] == trace_id and first["parent"] == parent_id
    assert second["trace_id"] != trace_id and second["parent"] == ""
    assert first["name"] == "POST /score"
    attrs = first["attributes"]
    assert attrs["http.request.method"] == "POST"
    assert attrs["http.route"] == "/score"
    assert attrs["url.path"] == "/score"
    assert attrs["url.scheme"] == "http"
    assert attrs["http.response.status_code"] == 200
    assert attrs["user_agent.original"] == "tracing-test/1"
    assert attrs["client.address"] == "127.0.0.1"
    assert attrs["mlbuild.models"] == ["ridge:3"]
    assert first["status"] != STATUS_ERROR and first["resource"]["service.name"] == "tracing-test"

    # run() is a child of its request's span, in the same trace, within its time.
    children = {s["parent"]: s for s in runs(spans)}
    for request in (first, second, failed):
        run = children[request["span_id"]]
        assert run["trace_id"] == request["trace_id"]
        assert request["start"] <= run["start"] <= run["end"] <= request["end"]
        assert run["attributes"]["mlbuild.scorer"] == "score"

    # Errors: a 500 sets the server span's status; run()'s exception is recorded on its span.
    assert failed["status"] == STATUS_ERROR
    assert failed["attributes"]["http.response.status_code"] == 500
    assert failed["attributes"]["error.type"] == "500"
    assert children[failed["span_id"]]["status"] == STATUS_ERROR
    assert "exception" in children[failed["span_id"]]["events"]
    assert children[first["span_id"]]["status"] != STATUS_ERROR

    # A path that is no route: no http.route, the span is named by the method alone.
    assert missing["name"] == "GET" and "http.route" not in missing["attributes"]
    assert missing["attributes"]["http.response.status_code"] == 404
    assert missing["status"] != STATUS_ERROR  # a 4xx is the client's, not the server's


def test_batched_requests_share_a_batch_span_linked_to_each(tmp_path, start_server, receiver):
    script = write_script(tmp_path, BATCHED_SCRIPT)
    server = start_server(["--entry-script", str(script)], env=otel_env(
        receiver.endpoint, MLBUILD_BATCH_MAX_SIZE="8", MLBUILD_BATCH_MAX_LATENCY_MS="300"))
    ids = [(os.urandom(16).hex(), os.urandom(8).hex()) for _ in range(4)]

    def post(i):
        tid, pid = ids[i]
        return server.post(body=json.dumps({"n": i}), headers={
            "traceparent": f"00-{tid}-{pid}-01", "x-request-id": f"batched-{i}"})

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(post, range(4)))
    assert [a.json() for a in answers] == [0, 10, 20, 30]

    def batches(spans):
        return [s for s in spans if s["name"] == "run batch"]

    spans = receiver.wait(lambda s: sum(b["attributes"]["mlbuild.batch.size"]
                                        for b in batches(s)) >= 4
                          and len([x for x in servers(s) if x["attributes"].get(
                              "mlbuild.request_id", "").startswith("batched-")]) == 4)
    requests = {s["attributes"]["mlbuild.request_id"]: s for s in servers(spans)
                if s["attributes"].get("mlbuild.request_id", "").startswith("batched-")}
    links = {link for b in batches(spans) for link in b["links"]}
    for i, (tid, pid) in enumerate(ids):
        request = requests[f"batched-{i}"]
        assert request["trace_id"] == tid and request["parent"] == pid
        assert (tid, request["span_id"]) in links
    assert any(len(b["links"]) > 1 for b in batches(spans))  # they did share a batch
    for b in batches(spans):
        # The batch runs under its first request's span, linked to every request's.
        assert (b["trace_id"], b["parent"]) == b["links"][0]
        assert b["attributes"]["mlbuild.batch.size"] == len(b["links"])
        assert b["status"] != STATUS_ERROR


@pytest.mark.parametrize("asked", [False, True], ids=["plain", "MLBUILD_TRACING=1"])
def test_without_the_variable_nothing_of_opentelemetry_is_imported(tmp_path, start_server,
                                                                   receiver, asked):
    script = write_script(tmp_path, SCRIPT)
    # MLBUILD_TRACING=1 is what `tracing: true` puts in an image: without an endpoint it
    # only says so.
    server = start_server(["--entry-script", str(script)],
                          env={"MLBUILD_TRACING": "1"} if asked else None)
    for n in range(5):
        assert server.get("/").status == 200
        assert server.post(body=json.dumps({"n": n})).json() == {"n": n, "otel": False}
    assert server.get("/metrics").status == 200
    assert server.post(body=json.dumps({"n": 9})).json()["otel"] is False
    hints = [line for line in server.output().splitlines() if "tracing" in line]
    if asked:
        assert len(hints) == 1 and "set OTEL_EXPORTER_OTLP_ENDPOINT" in hints[0]
    else:
        assert hints == []
    # The same script with the variable set sees it imported: the check above can fail.
    traced = start_server(["--entry-script", str(script)], env=otel_env(receiver.endpoint))
    assert traced.post(body=json.dumps({"n": 1})).json() == {"n": 1, "otel": True}
    receiver.wait(lambda s: len(runs(s)) >= 1)


def test_collector_down_requests_stay_fast_and_stop_is_bounded(tmp_path, start_server):
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    script = write_script(tmp_path, SCRIPT)
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    server = start_server(["--entry-script", str(script)], env=otel_env(down))
    slowest = 0.0
    for n in range(200):
        started = time.monotonic()
        r = server.post(body=json.dumps({"n": n}))
        slowest = max(slowest, time.monotonic() - started)
        assert r.status == 200 and r.json()["otel"] is True
    assert slowest < 1.0, f"a request took {slowest:.3f} s with the collector down"
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait_exit(timeout=20) == 0
    stopped = time.monotonic() - started
    assert stopped < 8.0, f"stop took {stopped:.1f} s with the collector down"
    # The exporter said so (a retry, a failed export, or the flush given up at the stop).
    assert any(text in server.output() for text in (
        "did not reach", "Failed to export", "Transient error"))


def test_spans_still_queued_are_flushed_on_sigterm(tmp_path, start_server, receiver):
    script = write_script(tmp_path, SCRIPT)
    # A schedule delay far beyond the test: only the shutdown flush can deliver them.
    server = start_server(["--entry-script", str(script)], env=otel_env(
        receiver.endpoint, OTEL_BSP_SCHEDULE_DELAY="600000"))
    rids = [server.post(body=json.dumps({"n": n})).headers["x-request-id"] for n in range(3)]
    time.sleep(0.3)
    assert not [s for s in receiver.spans
                if s["attributes"].get("mlbuild.request_id") in rids]
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait_exit(timeout=20) == 0
    spans = receiver.wait(lambda s: {x["attributes"].get("mlbuild.request_id")
                                     for x in servers(s)} >= set(rids), timeout=2)
    assert len(runs(spans)) >= 3


def test_missing_packages_one_log_line_and_serving_goes_on(tmp_path, start_server):
    script = write_script(tmp_path, SCRIPT)
    fake = tmp_path / "fake-site"
    (fake / "opentelemetry").mkdir(parents=True)
    (fake / "opentelemetry" / "__init__.py").write_text(
        'raise ImportError("No module named opentelemetry (test stand-in)")\n')
    server = start_server(["--entry-script", str(script)], pythonpath=str(fake),
                          env=otel_env(f"http://127.0.0.1:{free_port()}"))
    for n in range(3):
        r = server.post(body=json.dumps({"n": n}))
        assert r.status == 200 and r.json() == {"n": n, "otel": False}
    lines = [line for line in server.output().splitlines() if "tracing is off" in line]
    assert len(lines) == 1, server.output()
    assert "mlbuild[otel]" in lines[0]


def test_each_worker_traces_and_flushes_on_stop(tmp_path, start_server, receiver):
    script = write_script(tmp_path, SCRIPT)
    server = start_server(["--entry-script", str(script), "--workers", "2"], env=otel_env(
        receiver.endpoint, OTEL_BSP_SCHEDULE_DELAY="600000"))
    rids = {server.post(body=json.dumps({"n": n})).headers["x-request-id"] for n in range(20)}
    server.proc.send_signal(signal.SIGTERM)  # the supervisor stops the workers: each flushes
    assert server.wait_exit(timeout=30) == 0
    spans = receiver.wait(lambda s: {x["attributes"].get("mlbuild.request_id")
                                     for x in servers(s)} >= rids, timeout=2)
    ours = [s for s in servers(spans) if s["attributes"].get("mlbuild.request_id") in rids]
    assert len(ours) == 20  # one span per request, none twice
    assert {s["parent"] for s in runs(spans)} >= {s["span_id"] for s in ours}
    # Spans come from the worker processes only, each its own service instance.
    instances = {s["resource"].get("service.instance.id") for s in ours}
    assert None not in instances and 1 <= len(instances) <= 2
    assert server.output().count("tracing: OpenTelemetry spans to") == 2


@pytest.mark.parametrize("batching", [False, True], ids=["one-by-one", "batched"])
def test_no_code_model_predict_is_a_child_span(tmp_path, start_server, receiver, batching):
    pytest.importorskip("sklearn")
    joblib = pytest.importorskip("joblib")
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import Ridge

    X, y = load_diabetes(return_X_y=True)
    folder = tmp_path / "models" / "ridge" / "7"
    folder.mkdir(parents=True)
    joblib.dump(Ridge().fit(X, y), folder / "model.pkl")
    # No model dir: the model's own folder names it (as `--no-code-model FILE` gives it).
    env = otel_env(receiver.endpoint, MLBUILD_NO_CODE_MODEL=str(folder / "model.pkl"))
    if batching:
        env.update(MLBUILD_BATCH_MAX_SIZE="4", MLBUILD_BATCH_MAX_LATENCY_MS="5")
    server = start_server([], env=env)
    rid = server.post(body=json.dumps({"data": X[:2].tolist()})).headers["x-request-id"]
    bad = server.post(body=json.dumps({"data": "not rows"}))
    assert bad.status == 400

    def mine(spans):
        return [s for s in servers(spans) if s["attributes"].get("mlbuild.request_id") == rid]

    name = "run batch" if batching else "run"
    spans = receiver.wait(lambda s: mine(s) and any(x["name"] == name for x in s))
    request = mine(spans)[0]
    assert request["attributes"]["mlbuild.models"] == ["ridge:7"]
    assert request["attributes"]["http.response.status_code"] == 200
    child = [s for s in spans if s["name"] == name and s["parent"] == request["span_id"]]
    assert len(child) == 1 and child[0]["trace_id"] == request["trace_id"]
    assert child[0]["attributes"]["mlbuild.scorer"] == "model"
    if batching:
        assert child[0]["links"] == [(request["trace_id"], request["span_id"])]
    # The bad input: a 400 (the client's): the server span keeps status unset.
    refused = receiver.wait(lambda s: any(x["attributes"].get("mlbuild.request_id")
                                          == bad.headers["x-request-id"] for x in servers(s)))
    refused = [s for s in servers(refused)
               if s["attributes"]["mlbuild.request_id"] == bad.headers["x-request-id"]][0]
    assert refused["attributes"]["http.response.status_code"] == 400
    assert refused["status"] != STATUS_ERROR


def test_unsampled_and_malformed_traceparents(tmp_path, start_server, receiver):
    script = write_script(tmp_path, SCRIPT)
    server = start_server(["--entry-script", str(script)], env=otel_env(receiver.endpoint))
    tid, pid = os.urandom(16).hex(), os.urandom(8).hex()
    dropped = server.post(body=json.dumps({"n": 1}), headers={
        "traceparent": f"00-{tid}-{pid}-00"})  # flags 00: the caller did not sample it
    garbled = server.post(body=json.dumps({"n": 2}), headers={
        "traceparent": "00-zz-not-a-trace\x85", "tracestate": "=,=,"})
    assert dropped.status == 200 and garbled.status == 200
    server.proc.send_signal(signal.SIGTERM)  # flush everything there is
    assert server.wait_exit(timeout=20) == 0
    kept = garbled.headers["x-request-id"]
    spans = receiver.wait(lambda s: any(x["attributes"].get("mlbuild.request_id") == kept
                                        for x in servers(s)))
    assert not [s for s in spans if s["trace_id"] == tid]
    assert dropped.headers["x-request-id"] not in {s["attributes"].get("mlbuild.request_id")
                                                   for s in spans}
    # A traceparent that does not parse starts a new trace (the request is served).
    fresh = [s for s in servers(spans) if s["attributes"]["mlbuild.request_id"] == kept][0]
    assert fresh["parent"] == "" and len(fresh["trace_id"]) == 32


def test_service_models_reads_mlbuilds_layouts(tmp_path):
    from mlbuild.runtime.tracing import service_models

    several = tmp_path / "several"
    for name, version in (("b", "10"), ("a", "2"), ("a", "1"), ("b", "9")):
        (several / name / version).mkdir(parents=True)
        (several / name / version / "m.pkl").write_text("x")
    assert service_models(str(several)) == ("a:1", "a:2", "b:9", "b:10")
    assert service_models(str(several / "b" / "10")) == ("b:10",)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "model.pkl").write_text("x")
    assert service_models(str(tmp_path / "flat")) == ()
    assert service_models(None) == () and service_models(str(tmp_path / "missing")) == ()
