"""Model data collection under the real runtime: a v1 script using
``azureml.monitoring.ModelDataCollector`` served unchanged, records written to real files
(or stdout), broken and stuck destinations, SIGTERM."""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import statistics
import time
from pathlib import Path

import pytest

from conftest import write_script

# A scoring script as Azure's data-collection tutorial wrote them (one collector per
# designation, numpy data, add_correlations to tie predictions to inputs), plus a
# "signals" collector fed a plain list. Returning the correlations lets the test tie the
# answer to the records; Azure's collect() returned None with collection off.
V1_SCRIPT = """
    import json
    import numpy
    from azureml.core.model import Model
    from azureml.monitoring import ModelDataCollector

    def init():
        global weights, inputs_dc, prediction_dc, signals_dc
        with open(Model.get_model_path("ridge")) as fh:
            weights = numpy.array(json.load(fh))
        inputs_dc = ModelDataCollector("ridge", designation="inputs",
                                       feature_names=["age", "bmi", "bp"])
        prediction_dc = ModelDataCollector("ridge", designation="predictions",
                                           feature_names=["y"])
        signals_dc = ModelDataCollector("ridge", designation="signals",
                                        collection_name="rowcount")

    def run(raw_data):
        data = numpy.array(json.loads(raw_data)["data"])
        result = data @ weights
        correlations = inputs_dc.collect(data)
        prediction_dc.collect(prediction_dc.add_correlations(result.reshape(-1, 1),
                                                             correlations))
        signals_dc.collect([len(data), "rows"], user_correlation_id="sig")
        return {"result": result.tolist(), "correlations": correlations}
"""
WEIGHTS = [1.0, 10.0, 100.0]
COLLECTORS = 3  # records per request
PREFIX = '{"mlbuild_model_data"'


@pytest.fixture
def app(tmp_path):
    """The script and a two-version model dir (``ridge/1``, ``ridge/3``)."""
    models = tmp_path / "models"
    for version, weights in (("1", [0.0, 0.0, 0.0]), ("3", WEIGHTS)):
        (models / "ridge" / version).mkdir(parents=True)
        (models / "ridge" / version / "weights.json").write_text(json.dumps(weights))
    script = write_script(tmp_path, V1_SCRIPT)
    return ["--entry-script", str(script), "--model-dir", str(models)]


def _score(server, rows, rid=None):
    headers = {"Content-Type": "application/json"}
    if rid:
        headers["x-request-id"] = rid
    resp = server.post(body=json.dumps({"data": rows}), headers=headers)
    assert resp.status == 200, resp.body
    return resp


def _records(folder: Path) -> dict[str, list[dict]]:
    """Every data.jsonl under ``folder``, by path relative to it, parsed."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            lines = path.read_text().splitlines()
            out[path.relative_to(folder).as_posix()] = [json.loads(x) for x in lines]
    return out


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return predicate()


def _sigterm(server) -> int:
    server.proc.send_signal(signal.SIGTERM)
    return server.wait_exit(timeout=30)


def _summary(output: str) -> tuple[int, int]:
    found = re.findall(r"model data: (\d+) record\(s\) written, (\d+) dropped", output)
    assert len(found) == 1, output
    return int(found[0][0]), int(found[0][1])


def test_collection_off_serves_unchanged_and_writes_nothing(start_server, app, tmp_path):
    out = tmp_path / "modeldata"
    server = start_server(app, env={"MLBUILD_MODEL_DATA_DIR": str(out)})
    resp = _score(server, [[1, 2, 3], [4, 5, 6]])
    assert resp.json() == {"result": [321.0, 654.0], "correlations": None}
    assert _sigterm(server) == 0
    assert not out.exists()
    assert PREFIX not in server.output()
    assert "model data" not in server.output()


def _day_path(record) -> str:
    ts = datetime.datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00"))
    return ts.strftime("%Y/%m/%d")


@pytest.mark.parametrize("dispatch", ["inline", "thread"])
def test_collection_on_writes_the_records(start_server, app, tmp_path, dispatch):
    out = tmp_path / "modeldata"
    server = start_server(app, env={"MLBUILD_COLLECT_MODEL_DATA": "1",
                                    "MLBUILD_MODEL_DATA_DIR": str(out),
                                    "MLBUILD_SERVICE_NAME": "diabetes",
                                    "MLBUILD_RUN_DISPATCH": dispatch})
    before = datetime.datetime.now(datetime.timezone.utc)
    sent = [([[1, 2, 3], [4, 5, 6]], "rid-one"), ([[0, 0, 1]], "rid-two"),
            ([[2, 0, 0]], None)]
    answers = []
    for rows, rid in sent:
        resp = _score(server, rows, rid)
        answers.append((resp.json(), resp.headers["x-request-id"]))
    # Written off the request path, within about a second, without a stop.
    got = _wait_for(lambda: (r := _records(out)) and sum(map(len, r.values())) == 9 and r)
    after = datetime.datetime.now(datetime.timezone.utc)
    assert sum(map(len, got.values())) == 9, got

    by_designation = {}
    for rel, records in got.items():
        for record in records:
            assert rel == (f"diabetes/ridge/3/{record['designation']}/"
                           f"{_day_path(record)}/data.jsonl")
            assert record["timestamp"].endswith("Z")
            ts = datetime.datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00"))
            assert before - datetime.timedelta(seconds=1) <= ts <= after
            assert (record["mlbuild_model_data"], record["service"], record["model"],
                    record["model_version"]) == (1, "diabetes", "ridge", "3")
            by_designation.setdefault(record["designation"], []).append(record)
    assert sorted(by_designation) == ["inputs", "predictions", "signals"]

    inputs = sorted(by_designation["inputs"], key=lambda r: r["timestamp"])
    preds = {r["correlation_id"]: r for r in by_designation["predictions"]}
    signals = sorted(by_designation["signals"], key=lambda r: r["timestamp"])
    for (rows, _), (answer, rid), record, signal_record in zip(sent, answers, inputs,
                                                               signals):
        corr = answer["correlations"]
        # The script got Azure's correlation dict; the record carries the same id.
        assert set(corr) == {"$aml_dc_correlation_id", "$aml_dc_scoring_timestamp",
                             "$aml_dc_boundary", "$aml_workspace", "$aml_service_name",
                             "$aml_model_name", "$aml_model_version", "$aml_request_id"}
        assert corr["$aml_request_id"] == rid
        assert (corr["$aml_service_name"], corr["$aml_model_name"],
                corr["$aml_model_version"]) == ("diabetes", "ridge", "3")
        assert record["correlation_id"] == corr["$aml_dc_correlation_id"]
        assert record["request_id"] == rid
        assert record["data"] == [dict(zip(["age", "bmi", "bp"], map(float, r))) for r in rows]
        # Predictions: tied to the inputs by add_correlations, named, without the $aml_ values.
        pred = preds[corr["$aml_dc_correlation_id"]]
        assert pred["request_id"] == rid
        assert pred["data"] == [{"y": y} for y in answer["result"]]
        # Signals: a plain list is one row; the user's id prefixes a fresh correlation id.
        assert signal_record["data"] == [[len(rows), "rows"]]
        assert signal_record["collection"] == "rowcount"
        assert signal_record["request_id"] == rid
        assert signal_record["correlation_id"].startswith("sig-")
    assert answers[0][1] == "rid-one" and answers[2][1] not in ("rid-one", "rid-two")
    assert len({r["correlation_id"] for r in inputs + signals}) == 6
    assert _sigterm(server) == 0
    assert _summary(server.output()) == (9, 0)


@pytest.mark.parametrize("env", [
    {"MLBUILD_COLLECT_MODEL_DATA": "1", "MLBUILD_MODEL_DATA_DIR": "-"},
    {"AML_MODEL_DC_STORAGE_ENABLED": "true"},  # Azure's switch; no folder: stdout
], ids=["mlbuild", "azure-variable"])
def test_stdout_mode(start_server, app, tmp_path, env):
    server = start_server(app, env={**env, "MLBUILD_SERVICE_NAME": "diabetes"})
    for i in range(5):
        _score(server, [[i, 0, 0]], f"rid-{i}")
    assert _sigterm(server) == 0
    lines = [json.loads(x) for x in server.output().splitlines() if x.startswith(PREFIX)]
    assert len(lines) == 5 * COLLECTORS
    inputs = sorted((r for r in lines if r["designation"] == "inputs"),
                    key=lambda r: r["request_id"])
    assert [r["data"] for r in inputs] == [[{"age": float(i), "bmi": 0.0, "bp": 0.0}]
                                           for i in range(5)]
    assert [r["request_id"] for r in inputs] == [f"rid-{i}" for i in range(5)]
    assert not [p for p in tmp_path.rglob("data.jsonl")]
    assert _summary(server.output()) == (15, 0)


def test_sigterm_writes_what_is_buffered(start_server, app, tmp_path):
    out = tmp_path / "modeldata"
    server = start_server(app, env={"MLBUILD_COLLECT_MODEL_DATA": "1",
                                    "MLBUILD_MODEL_DATA_DIR": str(out),
                                    "MLBUILD_MODEL_DATA_INTERVAL": "60"})
    for i in range(20):
        _score(server, [[i, i, i]])
    time.sleep(0.5)
    assert _records(out) == {}  # still buffered: the writer waits up to 60 s
    assert _sigterm(server) == 0
    got = _records(out)
    assert sorted(len(v) for v in got.values()) == [20, 20, 20], got
    assert sorted(r["data"][0]["age"] for r in got[next(k for k in got if "/inputs/" in k)]) \
        == [float(i) for i in range(20)]
    assert _summary(server.output()) == (60, 0)


def test_two_workers_share_the_files(start_server, app, tmp_path):
    out = tmp_path / "modeldata"
    ready = tmp_path / "ready.json"  # written once *both* workers ran init()
    server = start_server([*app, "--workers", "2", "--ready-file", str(ready)],
                          env={"MLBUILD_COLLECT_MODEL_DATA": "1",
                               "MLBUILD_MODEL_DATA_DIR": str(out)})
    assert _wait_for(ready.exists, timeout=30), server.output()
    for i in range(60):
        _score(server, [[i, 0, 0]], f"r{i}")
    assert _sigterm(server) == 0
    got = _records(out)  # every line parses: appends of two processes never interleave
    inputs = got[next(k for k in got if "/inputs/" in k)]
    assert sorted(r["request_id"] for r in inputs) == sorted(f"r{i}" for i in range(60))
    assert sum(map(len, got.values())) == 60 * COLLECTORS
    summaries = re.findall(r"\[(\d+)\] azmlinfsrv.model_data - model data: (\d+) record",
                           server.output())
    pids = {pid for pid, _ in summaries}
    assert len(pids) == 2 and sum(int(n) for _, n in summaries) == 60 * COLLECTORS


def _full_disk(tmp_path: Path) -> str:
    """A destination whose every data.jsonl (today and tomorrow, UTC) is /dev/full:
    each write fails with ENOSPC, as root too."""
    out = tmp_path / "full"
    now = datetime.datetime.now(datetime.timezone.utc)
    for day in (now, now + datetime.timedelta(days=1)):
        for designation in ("inputs", "predictions", "signals"):
            folder = out / "default" / "ridge" / "3" / designation / day.strftime("%Y/%m/%d")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "data.jsonl").symlink_to("/dev/full")
    return str(out)


def _a_file(tmp_path: Path) -> str:
    """A destination that is a regular file: no folder can be made in it, as root too."""
    path = tmp_path / "not-a-folder"
    path.write_text("x")
    return str(path)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("make", [_a_file, _full_disk], ids=["file-as-folder", "disk-full"])
def test_unwritable_destination_costs_no_request(start_server, app, tmp_path, make):
    target = make(tmp_path)
    server = start_server(app, env={"MLBUILD_COLLECT_MODEL_DATA": "1",
                                    "MLBUILD_MODEL_DATA_DIR": target,
                                    "MLBUILD_MODEL_DATA_INTERVAL": "0.05"})
    latencies = []
    for i in range(150):
        started = time.perf_counter()
        resp = _score(server, [[i, 1, 2]])
        latencies.append(time.perf_counter() - started)
        assert resp.json()["result"] == [i + 210.0]
        if i == 50:
            time.sleep(0.3)  # several failed batches, not one
    assert statistics.median(latencies) < 0.05, statistics.median(latencies)
    assert max(latencies) < 1.0, max(latencies)
    assert _sigterm(server) == 0
    output = server.output()
    assert _summary(output) == (0, 150 * COLLECTORS)
    # One line about it, not one per record or per batch.
    assert len(re.findall(r"model data: dropped \d+ record", output)) == 1, output
    if make is _full_disk:
        assert "No space left on device" in output


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a FIFO")
def test_a_stuck_destination_drops_when_the_queue_is_full(start_server, app, tmp_path):
    """A write that never returns (a FIFO nobody reads stands for a hung network disk):
    requests go on at full speed, the queue fills and drops, and the process still stops
    at SIGTERM, counting what it could not write."""
    out = tmp_path / "stuck"
    now = datetime.datetime.now(datetime.timezone.utc)
    for day in (now, now + datetime.timedelta(days=1)):
        for designation in ("inputs", "predictions", "signals"):
            folder = out / "default" / "ridge" / "3" / designation / day.strftime("%Y/%m/%d")
            folder.mkdir(parents=True, exist_ok=True)
            os.mkfifo(folder / "data.jsonl")
    server = start_server(app, env={"MLBUILD_COLLECT_MODEL_DATA": "1",
                                    "MLBUILD_MODEL_DATA_DIR": str(out),
                                    "MLBUILD_MODEL_DATA_INTERVAL": "0.05",
                                    "MLBUILD_MODEL_DATA_QUEUE": "5",
                                    "MLBUILD_MODEL_DATA_FLUSH_S": "1"})
    _score(server, [[0, 0, 0]])
    time.sleep(0.3)  # the writer now hangs opening the FIFO
    latencies = []
    for i in range(100):
        started = time.perf_counter()
        _score(server, [[i, 0, 0]])
        latencies.append(time.perf_counter() - started)
    assert statistics.median(latencies) < 0.05, statistics.median(latencies)
    started = time.monotonic()
    assert _sigterm(server) == 0
    assert time.monotonic() - started < 15
    output = server.output()
    assert "the queue is full" in output
    assert _summary(output) == (0, 101 * COLLECTORS)


STREAMING_SCRIPT = """
    from azureml.monitoring import ModelDataCollector

    def init():
        global dc
        dc = ModelDataCollector("echo", designation="inputs", feature_names=["token"])

    {kind}def run(raw_data):
        for token in raw_data.split():
            dc.collect([[token]])
            yield token + " "
"""


@pytest.mark.parametrize("kind", ["", "async "])
def test_a_streamed_answers_records_carry_its_request_id(start_server, tmp_path, kind):
    """run() returning a generator: its code runs as the answer streams, after run()
    returned, and what it collects still names the request."""
    out = tmp_path / "modeldata"
    script = write_script(tmp_path, STREAMING_SCRIPT.replace("{kind}", kind))
    server = start_server(["--entry-script", str(script)],
                          env={"MLBUILD_COLLECT_MODEL_DATA": "1",
                               "MLBUILD_MODEL_DATA_DIR": str(out)})
    for rid, text in (("rid-a", "one two"), ("rid-b", "three")):
        resp = server.post(body=text, headers={"x-request-id": rid,
                                               "Content-Type": "text/plain"})
        assert resp.status == 200 and resp.text == "".join(t + " " for t in text.split())
    got = _wait_for(lambda: (r := _records(out)) and sum(map(len, r.values())) == 3 and r)
    records = [rec for recs in got.values() for rec in recs]
    assert sorted((r["data"][0]["token"], r["request_id"]) for r in records) == \
        [("one", "rid-a"), ("three", "rid-b"), ("two", "rid-a")], records
