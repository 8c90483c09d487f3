"""/metrics reports the whole service, whatever the number of workers (metrics.py).

Real runtime subprocesses with ``--workers 2`` on 127.0.0.1: a known number of requests
(both workers served some: each answer names its pid), one scrape, every count exact;
the exposition parsed with prometheus_client's own parser; names and label sets checked
against a list; a worker killed with a request in flight and replaced: nothing lost,
nothing counted twice, its in-flight gauge gone.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time

from conftest import write_script
from prometheus_client.parser import text_string_to_metric_families

from mlbuild.runtime import metrics

SCRIPT = """\
    import json
    import os
    import time

    def init():
        pass

    def run(raw):
        data = json.loads(raw)
        if data.get("hang"):
            with open(data["hang"], "w") as fh:   # tell the test which worker hangs
                fh.write(str(os.getpid()))
            time.sleep(60)
        if data.get("fail"):
            raise ValueError("asked to fail")
        return {"pid": os.getpid()}
    """

HTTP = {"http_request_method", "http_route", "http_response_status_code"}
# Every family /metrics shows without batching: its type and the label names of its
# samples (a histogram's buckets have ``le`` besides).
EXPECTED = {
    "http_server_request_duration_seconds": ("histogram", HTTP),
    "http_server_request_body_size_bytes": ("histogram", HTTP),
    "http_server_response_body_size_bytes": ("histogram", HTTP),
    "http_server_active_requests": ("gauge", {"http_request_method"}),
    "mlbuild_model_inference_duration_seconds": ("histogram", {"model", "version"}),
    "mlbuild_init_duration_seconds": ("gauge", set()),
    "mlbuild_build_info": ("gauge", {"version", "python", "service"}),
    "mlbuild_requests": ("counter", {"method", "path", "status"}),  # old name, alias
    "mlbuild_score_duration_seconds": ("histogram", set()),  # old name, alias
    "mlbuild_recent_requests": ("gauge", {"status_class"}),
    "mlbuild_recent_request_duration_seconds": ("gauge", {"quantile"}),
    "mlbuild_recent_window_seconds": ("gauge", set()),
}


def _families(server) -> dict:
    resp = server.get("/metrics")
    assert resp.status == 200
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {f.name: f for f in text_string_to_metric_families(resp.text)}


def _value(families, name, sample, **labels) -> float:
    """The sum of ``sample``'s values whose labels include ``labels``."""
    return sum(s.value for s in families[name].samples if s.name == sample
               and all(s.labels.get(k) == v for k, v in labels.items()))


def _score(server, body: dict):
    resp = server.post("/score", json.dumps(body), {"Content-Type": "application/json"})
    return resp.status, (resp.json().get("pid") if resp.status == 200 else None)


def _start(start_server, tmp_path, **kw):
    script = write_script(tmp_path, SCRIPT)
    model = tmp_path / "models" / "ridge" / "3"  # mlbuild's layout for one model
    model.mkdir(parents=True)
    (model / "model.pkl").write_bytes(b"x")
    return start_server(["--entry-script", str(script), "--model-dir", str(model),
                         "--workers", "2"], env={"MLBUILD_SERVICE_NAME": "diabetes"}, **kw)


def _both_workers(server, at_least=40) -> tuple[int, set]:
    """POST /score until both workers answered (at least ``at_least`` times in all)."""
    pids: set = set()
    sent = 0
    while sent < at_least or len(pids) < 2:
        status, pid = _score(server, {"data": [1]})
        assert status == 200
        pids.add(pid)
        sent += 1
        assert sent < 2000, f"only {pids} answered {sent} requests"
    return sent, pids


def test_two_workers_one_scrape_counts_every_request(start_server, tmp_path):
    server = _start(start_server, tmp_path)
    ok, pids = _both_workers(server)
    assert len(pids) == 2 and server.proc.pid not in pids
    failed = 7
    for _ in range(failed):
        assert _score(server, {"fail": True})[0] == 500
    for i in range(3):  # unknown paths: one label value, whatever the path
        assert server.get(f"/no/such/{i}").status == 404

    fams = _families(server)
    d = "http_server_request_duration_seconds"
    assert _value(fams, d, f"{d}_count", http_route="/score",
                  http_response_status_code="200", http_request_method="POST") == ok
    assert _value(fams, d, f"{d}_count", http_route="/score",
                  http_response_status_code="500") == failed
    assert _value(fams, d, f"{d}_count", http_route="other",
                  http_response_status_code="404", http_request_method="GET") == 3
    assert {s.labels["http_route"] for s in fams[d].samples} <= metrics.KNOWN_PATHS | {"other"}
    assert _value(fams, d, f"{d}_bucket", http_route="/score", le="+Inf") == ok + failed
    # the old names, as aliases, count the same
    assert _value(fams, "mlbuild_requests", "mlbuild_requests_total", path="/score",
                  status="200") == ok
    assert _value(fams, "mlbuild_requests", "mlbuild_requests_total", path="other",
                  status="404") == 3
    assert _value(fams, "mlbuild_score_duration_seconds",
                  "mlbuild_score_duration_seconds_count") == ok + failed
    # run() was called once per /score request, in either worker
    inf = "mlbuild_model_inference_duration_seconds"
    assert _value(fams, inf, f"{inf}_count", model="ridge", version="3") == ok + failed
    # bodies: {"data": [1]} is 13 bytes, {"fail": true} 14; answers {"pid": N}
    size = "http_server_request_body_size_bytes"
    assert _value(fams, size, f"{size}_sum", http_route="/score") == ok * 13 + failed * 14
    resp = "http_server_response_body_size_bytes"
    assert _value(fams, resp, f"{resp}_count", http_route="/score",
                  http_response_status_code="200") == ok
    # in flight right now: this scrape, nothing else
    assert _value(fams, "http_server_active_requests", "http_server_active_requests",
                  http_request_method="GET") == 1
    assert _value(fams, "http_server_active_requests", "http_server_active_requests",
                  http_request_method="POST") == 0
    # the last minute, summed over both workers
    assert _value(fams, "mlbuild_recent_requests", "mlbuild_recent_requests",
                  status_class="2xx") == ok
    assert _value(fams, "mlbuild_recent_requests", "mlbuild_recent_requests",
                  status_class="5xx") == failed
    p99 = _value(fams, "mlbuild_recent_request_duration_seconds",
                 "mlbuild_recent_request_duration_seconds", quantile="0.99")
    assert 0 < p99 < 5
    info = fams["mlbuild_build_info"].samples
    assert [(s.labels["service"], s.labels["version"], s.value) for s in info] == [
        ("diabetes", __import__("mlbuild").__version__, 1.0)]
    assert 0 <= fams["mlbuild_init_duration_seconds"].samples[0].value < 30


def test_names_and_label_sets_are_the_listed_ones(start_server, tmp_path):
    server = _start(start_server, tmp_path)
    _both_workers(server, at_least=4)
    _score(server, {"fail": True})
    fams = _families(server)
    assert set(fams) == set(EXPECTED), (set(fams) ^ set(EXPECTED))
    for name, (kind, labels) in EXPECTED.items():
        family = fams[name]
        assert family.type == kind, name
        assert family.samples, name
        for s in family.samples:
            own = {"le"} if kind == "histogram" and s.name.endswith("_bucket") else set()
            assert set(s.labels) == labels | own, (name, s)
    for s in fams["mlbuild_recent_request_duration_seconds"].samples:
        assert not math.isnan(s.value)


def test_a_killed_worker_loses_nothing_and_counts_nothing_twice(start_server, tmp_path):
    server = _start(start_server, tmp_path)
    ok, pids = _both_workers(server)
    d = "http_server_request_duration_seconds"
    before = _value(_families(server), d, f"{d}_count", http_route="/score")
    assert before == ok

    # One worker takes a request that never ends, and is killed while it is in flight.
    marker = tmp_path / "hanging.pid"
    hang = threading.Thread(target=lambda: _try_score(server, {"hang": str(marker)}),
                            daemon=True)
    hang.start()
    deadline = time.monotonic() + 10
    while not marker.exists() or not marker.read_text():
        assert time.monotonic() < deadline, "the hanging request never reached run()"
        time.sleep(0.02)
    victim = int(marker.read_text())
    assert victim in pids
    active = "http_server_active_requests"
    assert _value(_families(server), active, active, http_request_method="POST") == 1
    os.kill(victim, signal.SIGKILL)

    # The supervisor starts another; serve until the new one answered too.
    deadline = time.monotonic() + 30
    new: set = set()
    more = 0
    while not new - pids:
        assert time.monotonic() < deadline, f"no new worker answered:\n{server.output()}"
        status, pid = _score(server, {"data": [1]})
        assert status == 200
        new.add(pid)
        more += 1
    assert victim not in new
    fams = _families(server)
    # the victim's answered requests still count, the new worker's count once, and the
    # request that died with the victim was never answered: not counted
    assert _value(fams, d, f"{d}_count", http_route="/score") == before + more
    assert _value(fams, "mlbuild_requests", "mlbuild_requests_total",
                  path="/score") == before + more
    assert _value(fams, active, active, http_request_method="POST") == 0  # the dead pid's


def _try_score(server, body) -> None:
    try:
        server.post("/score", json.dumps(body), timeout=90)
    except OSError:  # the worker died under it: expected
        pass


def test_a_run_keeps_its_own_folder_and_removes_it(start_server, tmp_path):
    """MLBUILD_METRICS_DIR given: a previous run's files are not counted, the folder
    stays; none given: a temporary folder of the run's own, removed when it stops."""
    script = write_script(tmp_path, SCRIPT)
    folder = tmp_path / "metrics"
    folder.mkdir()
    stale = metrics._File(str(folder), "histogram", 999999)  # a previous run's
    v, (i,) = stale.slots([metrics._key(
        metrics.DURATION, f"{metrics.DURATION}_bucket",
        {"http_request_method": "POST", "http_route": "/score",
         "http_response_status_code": "200", "le": "+Inf"}, metrics.HELP[metrics.DURATION])])
    v[i] = 1234.0
    server = start_server(["--entry-script", str(script), "--workers", "2"],
                          env={"MLBUILD_METRICS_DIR": str(folder)})
    ok, _ = _both_workers(server, at_least=4)
    d = "http_server_request_duration_seconds"
    assert _value(_families(server), d, f"{d}_count", http_route="/score") == ok
    assert not (folder / "histogram_999999.db").exists()
    assert len(list(folder.glob("histogram_*.db"))) == 2  # one per worker
    server.stop()
    assert folder.is_dir()

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    server = start_server(["--entry-script", str(script), "--workers", "2"],
                          env={"TMPDIR": str(tmp)})
    _both_workers(server, at_least=4)
    made = list(tmp.glob("mlbuild-metrics-*"))
    assert len(made) == 1 and len(list(made[0].glob("histogram_*.db"))) == 2
    server.stop()
    assert server.proc.returncode == 0
    assert not made[0].exists()


BATCHED = """\
    import os

    from mlbuild.runtime import batched

    def init():
        pass

    @batched
    def run(inputs):
        return [{"pid": os.getpid()} for _ in inputs]
    """


def test_batch_histograms_count_every_workers_batches(start_server, tmp_path):
    script = write_script(tmp_path, BATCHED)
    server = start_server(["--entry-script", str(script), "--workers", "2"],
                          env={"MLBUILD_BATCH_MAX_SIZE": "8",
                               "MLBUILD_BATCH_MAX_LATENCY_MS": "2"})
    sent, pids = _both_workers(server, at_least=30)
    fams = _families(server)
    # every request went into exactly one batch, in one worker or the other
    assert _value(fams, "mlbuild_batch_size", "mlbuild_batch_size_sum") == sent
    assert _value(fams, "mlbuild_batch_wait_seconds", "mlbuild_batch_wait_seconds_count") \
        == sent
    batches = _value(fams, "mlbuild_batch_size", "mlbuild_batch_size_count")
    assert 1 <= batches <= sent
