"""mlbuild/runtime/datacollect.py in-process: converting what scripts collect, the record
path, the writer (real files), the switch variables, model versions, Azure's
add_correlations shapes; and that azureml.monitoring is served lazily."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mlbuild.runtime import compat, datacollect
from mlbuild.runtime.datacollect import (CORRELATION_HEADERS, Counters, ModelDataCollector,
                                         Sink, Unsupported, dumps, record_path, to_rows)

try:
    import pandas as pd
except ImportError:  # not a dependency of mlbuild; scripts that use it bring it
    pd = None
needs_pandas = pytest.mark.skipif(pd is None, reason="pandas is not installed in this venv")


# -- conversion ----------------------------------------------------------------------------
def test_lists_one_row_or_rows_as_azure_and_more():
    assert to_rows([1, 2.5, "a"]) == [[1, 2.5, "a"]]  # a flat list is one row (Azure)
    assert to_rows([[1, 2], (3, 4)]) == [[1, 2], [3, 4]]
    assert to_rows([{"a": 1}, {"a": 2}]) == [{"a": 1}, {"a": 2}]
    assert to_rows({"a": 1}) == [{"a": 1}]
    assert to_rows([[1, 2], [3, 4]], ["x", "y"]) == [{"x": 1, "y": 2}, {"x": 3, "y": 4}]
    # A row whose length differs from the names stays a list (nothing is guessed).
    assert to_rows([[1, 2, 3]], ["x", "y"]) == [[1, 2, 3]]


def test_rows_are_copies():
    row = [1, 2]
    rows = to_rows([row])
    row.append(3)
    assert rows == [[1, 2]]


def test_numpy_arrays_become_plain_lists():
    rows = to_rows(np.array([[1, 2], [3, 4]], dtype=np.int64), ["a", "b"])
    assert rows == [{"a": 1, "b": 2}, {"a": 3, "b": 4}]
    assert type(rows[0]["a"]) is int
    assert to_rows(np.array([1.5, 2.5])) == [[1.5, 2.5]]  # 1-D: one row, as Azure
    assert to_rows(np.float32(2.0)) == [[2.0]]
    assert to_rows([np.array([1, 2]), np.array([3, 4])]) == [[1, 2], [3, 4]]
    array = np.zeros((2, 2))
    rows = to_rows(array)
    array[0, 0] = 9  # a script reusing its buffer after collect() changes no record
    assert rows == [[0.0, 0.0], [0.0, 0.0]]


@needs_pandas
def test_dataframes_become_dicts_by_column():
    frame = pd.DataFrame({"a": [1, 2], "b": ["x", "y"]})
    assert to_rows(frame, ["ignored", "names"]) == [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]


@pytest.mark.parametrize("value", ["text", 3, None, object()])
def test_other_values_are_refused(value):
    with pytest.raises(Unsupported):
        to_rows(value)


def test_lines_are_strict_json():
    line = dumps({"data": [[float("nan"), float("inf"), np.int64(7), np.float32(0.5)]],
                  "when": b"raw"})
    assert line.endswith("\n") and "NaN" not in line
    assert json.loads(line) == {"data": [[None, None, 7, 0.5]], "when": "raw"}


def test_record_path_layout_and_unsafe_names():
    record = {"service": "svc", "model": "ridge", "model_version": "3",
              "designation": "inputs", "timestamp": "2026-01-02T03:04:05.000006Z"}
    assert record_path(record) == "svc/ridge/3/inputs/2026/01/02/data.jsonl"
    record.update(service="..", model="../../etc")
    path = record_path(record)
    assert path.split("/")[:2] == ["_", ".._.._etc"]
    assert ".." not in path.split("/")


# -- the writer -----------------------------------------------------------------------------
def _record(i, day="2026-01-02"):
    return {"mlbuild_model_data": 1, "timestamp": f"{day}T00:00:00.000000Z",
            "correlation_id": str(i), "request_id": None, "service": "s", "model": "m",
            "model_version": "1", "designation": "inputs", "data": [[i]]}


def test_sink_writes_batches_by_day_and_closes(tmp_path):
    counters = Counters()
    sink = Sink(str(tmp_path), interval=0.05, counters=counters)
    for i in range(5):
        assert sink.put(_record(i))
    assert sink.put(_record(5, day="2026-01-03"))
    assert sink.close(5.0)
    day1 = tmp_path / "s/m/1/inputs/2026/01/02/data.jsonl"
    day2 = tmp_path / "s/m/1/inputs/2026/01/03/data.jsonl"
    assert [json.loads(x)["data"] for x in day1.read_text().splitlines()] == \
        [[[i]] for i in range(5)]
    assert [json.loads(x)["data"] for x in day2.read_text().splitlines()] == [[[5]]]
    assert (counters.written, counters.dropped) == (6, 0)
    assert not sink.put(_record(6))  # closed: counted, not queued
    assert counters.dropped == 1


def test_sink_makes_a_removed_folder_again(tmp_path):
    import shutil

    counters = Counters()
    sink = Sink(str(tmp_path), interval=0.01, counters=counters)
    sink.put(_record(0))
    assert _until(lambda: counters.written == 1)
    shutil.rmtree(tmp_path / "s")
    sink.put(_record(1))
    assert sink.close(5.0)
    assert (counters.written, counters.dropped) == (2, 0)
    assert (tmp_path / "s/m/1/inputs/2026/01/02/data.jsonl").read_text().count("\n") == 1


def _until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


def test_sink_counts_what_it_cannot_write(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    counters = Counters()
    sink = Sink(str(blocker), interval=0.01, counters=counters)
    for i in range(30):
        sink.put(_record(i))
        time.sleep(0.002)
    assert sink.close(5.0)
    assert (counters.written, counters.dropped) == (0, 30)
    lines = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]


def test_sink_drops_when_the_queue_is_full(tmp_path):
    counters = Counters()
    sink = Sink(str(tmp_path), queue_size=3, interval=0.05, counters=counters)
    sink._stop.set()  # hold the writer: it would otherwise take records as they come
    sink._thread.join(5)
    results = [sink.put(_record(i)) for i in range(5)]
    assert results == [True, True, True, False, False]
    assert counters.dropped == 2


def test_stats_reads_the_module_counters():
    before = datacollect.stats()
    datacollect.COUNTERS.add(written=2, dropped=1)
    assert datacollect.stats() == {"written": before["written"] + 2,
                                   "dropped": before["dropped"] + 1}


# -- switches, versions ------------------------------------------------------------------
@pytest.mark.parametrize("env, on", [
    ({}, False),
    ({"MLBUILD_COLLECT_MODEL_DATA": "1"}, True),
    ({"MLBUILD_COLLECT_MODEL_DATA": "true"}, True),
    ({"MLBUILD_COLLECT_MODEL_DATA": "0"}, False),
    ({"AML_MODEL_DC_STORAGE_ENABLED": "true"}, True),  # Azure's switch
    ({"AML_MODEL_DC_DEBUG": "True"}, True),
    ({"AML_MODEL_DC_STORAGE_ENABLED": "true", "MLBUILD_COLLECT_MODEL_DATA": "0"}, False),
])
def test_enabled_by(env, on):
    assert datacollect.enabled(env) is on


def test_destination_default_is_stdout():
    assert datacollect.destination({}) == "-"
    assert datacollect.destination({"MLBUILD_MODEL_DATA_DIR": "/data"}) == "/data"


def test_model_version_from_the_model_dir(tmp_path, monkeypatch):
    for version in ("2", "10", "9"):
        (tmp_path / "ridge" / version).mkdir(parents=True)
    monkeypatch.delenv("AZUREML_MODEL_DIR", raising=False)
    monkeypatch.setenv("MLBUILD_MODEL_DIR", str(tmp_path))
    assert datacollect.find_model_version("ridge") == "10"  # numeric order
    assert datacollect.find_model_version("other") == "unknown"
    monkeypatch.setenv("MLBUILD_MODEL_DIR", str(tmp_path / "ridge" / "9"))  # one model
    assert datacollect.find_model_version("ridge") == "9"
    assert datacollect.find_model_version("other") == "unknown"
    monkeypatch.delenv("MLBUILD_MODEL_DIR")
    assert datacollect.find_model_version("ridge") == "unknown"


# -- the Azure class ------------------------------------------------------------------
@pytest.fixture
def collecting(tmp_path, monkeypatch):
    """Collection on, into a sink of the test's own (the module's is left alone)."""
    monkeypatch.setenv("MLBUILD_COLLECT_MODEL_DATA", "1")
    monkeypatch.setenv("MLBUILD_SERVICE_NAME", "svc")
    sink = Sink(str(tmp_path / "out"), interval=0.01, counters=Counters())
    monkeypatch.setattr(datacollect, "_SINK", sink)
    yield sink
    sink.close(5.0)


def _written(sink):
    sink.close(5.0)
    out = {}
    for path in sorted(p for p in Path(sink.target).rglob("*") if p.is_file()):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            out.setdefault(record["designation"], []).append(record)
    return out


def test_collector_off_is_a_no_op(monkeypatch):
    monkeypatch.delenv("MLBUILD_COLLECT_MODEL_DATA", raising=False)
    for var in ("AML_MODEL_DC_STORAGE_ENABLED", "AML_MODEL_DC_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(datacollect, "_SINK", None)
    dc = ModelDataCollector("m", designation="inputs", unknown_future_kwarg=1)
    assert dc.collect([1, 2]) is None  # as Azure's with collection off
    assert datacollect._SINK is None  # nothing started


def test_correlations_tie_predictions_to_inputs(collecting):
    inputs = ModelDataCollector("m", designation="inputs", feature_names=["a", "b"])
    preds = ModelDataCollector("m", "predictions", ["y"])
    token = compat.CURRENT_REQUEST_ID.set(b"req-1")
    try:
        corr = inputs.collect(np.array([[1, 2], [3, 4]]), user_correlation_id="u")
        assert preds.collect(preds.add_correlations(np.array([[5.0], [6.0]]), corr)) is None
        assert preds.collect(preds.add_correlations([7.0], corr)) is None
    finally:
        compat.CURRENT_REQUEST_ID.reset(token)
    assert set(corr) == set(CORRELATION_HEADERS)
    assert corr["$aml_dc_correlation_id"].startswith("u-")
    assert corr["$aml_request_id"] == "req-1"
    got = _written(collecting)
    (rec_in,) = got["inputs"]
    assert rec_in["data"] == [{"a": 1, "b": 2}, {"a": 3, "b": 4}]
    assert rec_in["correlation_id"] == corr["$aml_dc_correlation_id"]
    assert rec_in["request_id"] == "req-1"
    assert [r["data"] for r in got["predictions"]] == [[{"y": 5.0}, {"y": 6.0}], [{"y": 7.0}]]
    assert {r["correlation_id"] for r in got["predictions"]} == {rec_in["correlation_id"]}


def test_add_correlations_returns_azure_shapes(collecting):
    dc = ModelDataCollector("m", "predictions")
    corr = ModelDataCollector("m", "inputs").collect([1])
    assert dc.add_correlations([1, 2], None) == [1, 2]
    assert dc.add_correlations([1, 2], corr)[2:] == [corr[h] for h in CORRELATION_HEADERS]
    assert dc.add_correlations(np.array([1.0, 2.0]), corr).shape == (1, 10)
    assert dc.add_correlations(np.ones((3, 2)), corr).shape == (3, 10)


@needs_pandas
def test_add_correlations_on_a_dataframe(collecting):
    dc = ModelDataCollector("m", "predictions")
    corr = ModelDataCollector("m", "inputs").collect([1])
    frame = dc.add_correlations(pd.DataFrame({"y": [1.0, 2.0]}), corr)
    assert list(frame.columns) == ["y", *CORRELATION_HEADERS]
    dc.collect(frame)
    (record,) = _written(collecting)["predictions"]
    assert record["data"] == [{"y": 1.0}, {"y": 2.0}]
    assert record["correlation_id"] == corr["$aml_dc_correlation_id"]


def test_unsupported_designation_collects_nothing(collecting):
    assert ModelDataCollector("m", designation="outputs").collect([1]) is None
    assert ModelDataCollector("m").designation == "general"  # "default", as Azure
    assert _written(collecting) == {}


def test_the_module_is_lazy_and_importable_both_ways():
    code = (
        "import sys\n"
        "from mlbuild.runtime import compat, app\n"
        "compat.install()\n"
        "assert 'mlbuild.runtime.datacollect' not in sys.modules\n"
        "from azureml.monitoring import ModelDataCollector\n"
        "from azureml.monitoring.modeldatacollector import ModelDataCollector as M\n"
        "assert M is ModelDataCollector\n"
        "assert ModelDataCollector.__module__ == 'mlbuild.runtime.datacollect'\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLBUILD_")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
