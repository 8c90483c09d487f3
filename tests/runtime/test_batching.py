"""Adaptive micro-batching (mlbuild/runtime/batching.py): the batcher on its own, in one
event loop, then the runtime as a real server -- no-code models and @batched scripts.

What must hold (issue 18, section 1): requests that arrive within the window are scored in
one call and each gets exactly its own answer, in order, with its own status; one bad
request fails alone; a @batched run() answering with the wrong number of results is a
500 for its batch and a log line, not a hang; a lone request waits at most the window;
a shutdown answers every queued request (200 or 503); /metrics shows the batches.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import write_script
from mlbuild.runtime import batching
from mlbuild.runtime.app import RunThread, RunTimedOut
from mlbuild.runtime.batching import BatchError, Batcher, BatchSpec, ItemFailed, Stopped

JSON = {"Content-Type": "application/json"}


# -- the batcher alone -------------------------------------------------------------------
class Recorder:
    """A batch call that records the batches it got and answers ``f(item)`` for each."""

    def __init__(self, f=lambda x: x * 10, delay=0.0):
        self.f = f
        self.delay = delay
        self.batches: list[list] = []

    def __call__(self, items):
        self.batches.append(list(items))
        if self.delay:
            time.sleep(self.delay)
        return [self.f(i) for i in items]


def _batcher(call, size, latency, **kw) -> tuple[Batcher, RunThread]:
    runner = RunThread()
    return Batcher(BatchSpec(call), size, latency, runner=runner,
                   timeout_error=RunTimedOut, **kw), runner


def test_requests_within_the_window_share_one_call_and_each_gets_its_own_answer():
    rec = Recorder()

    async def main():
        b, runner = _batcher(rec, 64, 0.05)
        try:
            return await asyncio.gather(*(b.submit(i) for i in range(40)))
        finally:
            runner.stop()

    assert asyncio.run(main()) == [i * 10 for i in range(40)]
    assert rec.batches == [list(range(40))]  # one call, in arrival order


def test_a_full_batch_starts_at_once_and_the_rest_follow_in_order():
    rec = Recorder(delay=0.02)

    async def main():
        b, runner = _batcher(rec, 8, 5.0)  # a window far longer than the test
        try:
            started = time.monotonic()
            out = await asyncio.gather(*(b.submit(i) for i in range(16)))
            return out, time.monotonic() - started
        finally:
            runner.stop()

    out, took = asyncio.run(main())
    assert out == [i * 10 for i in range(16)]
    assert rec.batches == [list(range(8)), list(range(8, 16))]
    assert took < 1.0  # full batches never wait for the 5 s window


def test_a_lone_request_waits_at_most_the_window():
    rec = Recorder()

    async def main():
        b, runner = _batcher(rec, 32, 0.2)
        try:
            started = time.monotonic()
            out = await b.submit(7)
            return out, time.monotonic() - started
        finally:
            runner.stop()

    out, took = asyncio.run(main())
    assert out == 70 and rec.batches == [[7]]
    assert 0.19 <= took < 0.2 + 0.1, took  # the window, then at once


def test_a_window_that_gathered_nobody_stops_the_windows_until_company_comes():
    rec = Recorder(delay=0.05)

    async def main():
        b, runner = _batcher(rec, 32, 0.2)
        try:
            took = []
            for i in range(3):  # one client, one request at a time
                started = time.monotonic()
                await b.submit(i)
                took.append(time.monotonic() - started)
            burst = await asyncio.gather(*(b.submit(i) for i in range(10, 16)))
            return took, burst
        finally:
            runner.stop()

    took, burst = asyncio.run(main())
    assert took[0] >= 0.2 and all(t < 0.15 for t in took[1:]), took
    assert burst == [i * 10 for i in range(10, 16)]
    # The burst's first is scored at once; the others find it running: the window is
    # back, and they share the next call.
    assert rec.batches == [[0], [1], [2], [10], [11, 12, 13, 14, 15]]


def test_requests_queued_while_a_batch_runs_form_the_next_one():
    rec = Recorder(delay=0.1)

    async def main():
        b, runner = _batcher(rec, 32, 0.0)  # no window: only what queued meanwhile
        try:
            first = asyncio.ensure_future(b.submit(0))
            await asyncio.sleep(0.02)  # the first batch runs now
            rest = await asyncio.gather(*(b.submit(i) for i in range(1, 6)))
            return [await first] + rest
        finally:
            runner.stop()

    assert asyncio.run(main()) == [0, 10, 20, 30, 40, 50]
    assert rec.batches == [[0], [1, 2, 3, 4, 5]]


def test_an_item_that_failed_fails_alone():
    def call(items):
        return [ItemFailed(ValueError(f"bad {i}")) if i == 3 else i for i in items]

    async def main():
        b, runner = _batcher(call, 8, 0.01)
        try:
            return await asyncio.gather(*(b.submit(i) for i in range(6)),
                                        return_exceptions=True)
        finally:
            runner.stop()

    out = asyncio.run(main())
    assert [o for i, o in enumerate(out) if i != 3] == [0, 1, 2, 4, 5]
    assert isinstance(out[3], ValueError) and str(out[3]) == "bad 3"


def test_a_script_that_raises_is_called_once_per_input_so_only_the_bad_one_fails():
    calls = []

    def run(inputs):
        calls.append(list(inputs))
        if "bad" in inputs:
            raise RuntimeError("cannot score 'bad'")
        return [s.upper() for s in inputs]

    spec = batching.script_spec(run)
    out = spec.call(["a", "bad", "c"])
    assert out[0] == "A" and out[2] == "C"
    assert isinstance(out[1], ItemFailed) and isinstance(out[1].exc, RuntimeError)
    assert calls == [["a", "bad", "c"], ["a"], ["bad"], ["c"]]


@pytest.mark.parametrize("answer, says", [
    (lambda xs: xs[:-1], "returned 2 results for 3 inputs"),
    (lambda xs: xs + xs, "returned 6 results for 3 inputs"),
    (lambda xs: {"a": 1}, "returned a dict, not a list of 3 results"),
    (lambda xs: "abc", "returned a str, not a list of 3 results"),
    (lambda xs: None, "returned a NoneType, not a list of 3 results"),
])
def test_a_wrong_length_answer_fails_the_batch_with_a_message_that_says_so(answer, says):
    spec = batching.script_spec(answer)

    async def main():
        b, runner = _batcher(spec.call, 8, 0.01)
        try:
            return await asyncio.gather(*(b.submit(x) for x in ("x", "y", "z")),
                                        return_exceptions=True)
        finally:
            runner.stop()

    out = asyncio.run(main())
    assert all(isinstance(o, BatchError) for o in out), out
    assert all(says in str(o) for o in out), out
    assert len({id(o) for o in out}) == 3  # one exception each: raised in three tasks


def test_an_async_batched_run_is_awaited_in_the_loop():
    @batching.batched
    async def run(inputs):
        await asyncio.sleep(0)
        return [i + 1 for i in inputs]

    spec = batching.script_spec(run)
    assert spec.is_async

    async def main():
        b = Batcher(spec, 4, 0.01)
        return await asyncio.gather(*(b.submit(i) for i in range(6)))

    assert asyncio.run(main()) == [1, 2, 3, 4, 5, 6]


def test_close_answers_every_queued_request_with_stopped():
    rec = Recorder(delay=0.2)

    async def main():
        b, runner = _batcher(rec, 1, 0.0)
        try:
            tasks = [asyncio.ensure_future(b.submit(i)) for i in range(4)]
            await asyncio.sleep(0.05)  # the first is running, three are queued
            b.close()
            out = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
            late = await asyncio.gather(b.submit(9), return_exceptions=True)
            return out, late
        finally:
            runner.stop()

    out, late = asyncio.run(main())
    assert out[0] == 0  # the running batch answers its own
    assert all(isinstance(o, Stopped) for o in out[1:]), out
    assert isinstance(late[0], Stopped)
    assert rec.batches == [[0]]


def test_a_request_past_its_deadline_while_queued_is_answered_and_never_scored():
    rec = Recorder(delay=0.3)

    async def main():
        b, runner = _batcher(rec, 1, 0.0, timeout=0.15)
        try:
            return await asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True)
        finally:
            runner.stop()

    out = asyncio.run(main())
    assert all(isinstance(o, RunTimedOut) for o in out), out
    assert rec.batches == [[1]]  # the second was dropped from the queue, never started


def test_a_prepare_error_is_the_requests_own_and_it_never_joins():
    rec = Recorder()

    def prepare(x):
        if x < 0:
            raise ValueError("negative")
        return x

    async def main():
        runner = RunThread()
        b = Batcher(BatchSpec(rec, prepare=prepare), 8, 0.02, runner=runner)
        try:
            return await asyncio.gather(*(b.submit(x) for x in (1, -1, 2)),
                                        return_exceptions=True)
        finally:
            runner.stop()

    out = asyncio.run(main())
    assert out[0] == 10 and out[2] == 20 and isinstance(out[1], ValueError)
    assert rec.batches == [[1, 2]]


# -- the no-code models' batch call ------------------------------------------------------
def test_sklearn_batch_joins_requests_by_method_and_answers_each_as_alone(tmp_path):
    np = pytest.importorskip("numpy")
    joblib = pytest.importorskip("joblib")
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    from mlbuild.runtime.nocode import BadInput, SklearnModel

    X, y = load_iris(return_X_y=True)
    joblib.dump(LogisticRegression(max_iter=500).fit(X, y), tmp_path / "m.pkl")
    model = SklearnModel(str(tmp_path / "m.pkl"))
    model.init()
    calls = []
    real = model.model

    class Counting:  # the estimator, counting its calls and their rows
        def __getattr__(self, name):
            attr = getattr(real, name)
            if name.startswith("predict"):
                def counted(a):
                    calls.append((name, len(a)))
                    return attr(a)
                return counted
            return attr

    model.model = Counting()
    payloads = [{"data": X[0:2].tolist()}, {"data": X[5].tolist()},  # a single row
                {"data": X[7:10].tolist(), "method": "predict"},
                {"data": X[3:4].tolist()}, {"data": [[1.0, 2.0]]},  # 2 features, not 4
                {"data": X[11:12].tolist(), "method": "predict"}]
    out = model.run_batch([model.prepare(p) for p in payloads])
    assert sorted(calls[:3]) == [("predict", 4), ("predict_proba", 1),
                                 ("predict_proba", 4)]
    model.model = real
    for payload, got in zip(payloads, out):
        if payload["data"] == [[1.0, 2.0]]:
            assert isinstance(got.exc, BadInput) and "2 features" in str(got.exc)
        else:  # (BLAS may round a row of a bigger matrix product in its last bit)
            np.testing.assert_allclose(got, model.run(payload), rtol=1e-12, atol=1e-15)


def test_onnx_with_a_fixed_first_dimension_is_never_joined(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from mlbuild.runtime.nocode import OnnxModel

    def build(first):
        graph = helper.make_graph(
            [helper.make_node("Mul", ["x", "two"], ["y"])], "double",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [first, 3])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [first, 3])],
            [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])])
        path = tmp_path / f"m{first}.onnx"
        path.write_bytes(helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
        m = OnnxModel(str(path))
        m.init()
        return m

    rows = [[[1, 2, 3]], [[4, 5, 6]], [[7, 8, 9]]]
    for first, joined in ((1, False), ("N", True)):
        m = build(first)
        runs = []
        real = m.session.run
        m.session.run = lambda names, feed, real=real: runs.append(
            len(next(iter(feed.values())))) or real(names, feed)
        out = m.run_batch([m.prepare({"data": r}) for r in rows])
        assert out == [[[2 * v for v in r[0]]] for r in rows]
        assert runs == ([3] if joined else [1, 1, 1]), (first, runs)


# -- the server: no-code models ----------------------------------------------------------
def _concurrently(fn, args, workers=100):
    barrier = threading.Barrier(min(workers, len(args)))

    def go(a):
        try:
            barrier.wait(timeout=10)
        except threading.BrokenBarrierError:
            pass
        return fn(a)

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(go, args))


def _metric(server, name: str) -> float:
    text = server.get("/metrics").text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert m, f"{name} not in /metrics:\n{text}"
    return float(m.group(1))


def _batch_env(size, latency_ms, **extra):
    return {"MLBUILD_BATCH_MAX_SIZE": str(size), "MLBUILD_BATCH_MAX_LATENCY_MS": str(latency_ms),
            **extra}


@pytest.fixture(scope="module")
def forest(tmp_path_factory):
    pytest.importorskip("sklearn")
    joblib = pytest.importorskip("joblib")
    import numpy as np
    from sklearn.ensemble import RandomForestRegressor

    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 16))
    y = X @ rng.normal(size=16)
    model = RandomForestRegressor(n_estimators=20, random_state=0).fit(X, y)
    path = tmp_path_factory.mktemp("forest") / "forest.pkl"
    joblib.dump(model, path)
    return X, model, path


def test_a_hundred_concurrent_clients_each_get_their_own_rows_back(start_server, forest):
    X, model, path = forest
    server = start_server([], env={"MLBUILD_NO_CODE_MODEL": str(path),
                                   **_batch_env(32, 50, MLBUILD_ACCESS_LOG="0")})
    # Client i sends rows i .. i + i % 3 (1 to 3 rows): answers cut at the wrong place,
    # or handed to the wrong client, differ from the model's own.
    bodies = [X[i:i + 1 + i % 3] for i in range(100)]

    def post(rows):
        resp = server.post(body=json.dumps({"data": rows.tolist()}), headers=JSON, timeout=30)
        return resp.status, resp.json()

    out = _concurrently(post, bodies)
    for rows, (status, got) in zip(bodies, out):
        assert status == 200, got
        assert got == model.predict(rows).tolist()  # exact: trees score each row alone
    batches = _metric(server, "mlbuild_batch_size_count")
    assert _metric(server, "mlbuild_batch_size_sum") == 100
    assert batches < 100 / 2, f"{batches:.0f} batches for 100 requests: hardly batched"


def test_a_bad_request_in_a_batch_fails_alone_with_its_own_400(start_server, tmp_path):
    pytest.importorskip("sklearn")
    joblib = pytest.importorskip("joblib")
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import Ridge

    X, y = load_diabetes(return_X_y=True)
    model = Ridge().fit(X, y)
    joblib.dump(model, tmp_path / "ridge.pkl")
    server = start_server([], env={"MLBUILD_NO_CODE_MODEL": str(tmp_path / "ridge.pkl"),
                                   **_batch_env(64, 300)})
    bad = {3: {"data": [[1, 2, 3]]},                    # 3 features, not 10
           7: {"data": [["a"] * 10]},                   # text
           11: {"data": [[float("nan")] * 10]},         # NaN: Ridge refuses it
           15: {"data": [[1] * 10], "method": "nope"},  # refused before it joins
           19: {"rows": [[1] * 10]}}                    # no data
    bodies = [bad.get(i, {"data": X[i:i + 2].tolist()}) for i in range(24)]

    def post(body):
        resp = server.post(body=json.dumps(body), headers=JSON, timeout=30)  # NaN written as NaN
        return resp.status, resp.json()

    out = _concurrently(post, bodies)
    for i, (status, got) in enumerate(out):
        if i in bad:
            assert status == 400, (i, got)
            assert got["status_code"] == 400 and got["message"], got
        else:
            assert status == 200, (i, got)
            assert got == pytest.approx(model.predict(X[i:i + 2]).tolist())
    assert "X has 3 features" in out[3][1]["message"]
    # They did share batches: far fewer batches than requests.
    assert _metric(server, "mlbuild_batch_size_count") <= 6


PICKY = """
    import numpy as np

    class Picky:
        \"\"\"Doubles the row sums; refuses a row starting with 13 (input), fails on 666.\"\"\"

        n_features_in_ = 3

        def predict(self, X):
            X = np.asarray(X, dtype=float)
            if (X[:, 0] == 13).any():
                raise ValueError("13 is not a valid first feature")
            if (X[:, 0] == 666).any():
                raise RuntimeError("the model broke")
            return X.sum(axis=1) * 2
"""


def test_a_request_the_model_refuses_inside_a_joined_call_fails_alone(start_server, tmp_path):
    # Same shape and type as its neighbours, so it joins their call; that call raises,
    # and each request of it is scored alone: only the culprits fail, each with the
    # status it gets unbatched (400 for the model's ValueError, 500 for anything else).
    pytest.importorskip("numpy")
    write_script(tmp_path, PICKY, name="picky.py")
    import pickle
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        import picky

        (tmp_path / "picky.pkl").write_bytes(pickle.dumps(picky.Picky()))
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("picky", None)
    server = start_server([], env={"MLBUILD_NO_CODE_MODEL": str(tmp_path / "picky.pkl"),
                                   **_batch_env(64, 300)},
                          pythonpath=os.pathsep.join(filter(None, (
                              str(tmp_path), os.environ.get("PYTHONPATH")))))
    firsts = [13 if i == 2 else 666 if i == 5 else i for i in range(10)]

    def post(first):
        resp = server.post(body=json.dumps({"data": [[first, 1.5, 2.5]]}), headers=JSON,
                           timeout=30)
        return resp.status, resp.json()

    out = _concurrently(post, firsts)
    for first, (status, got) in zip(firsts, out):
        if first == 13:
            assert status == 400 and "13 is not a valid" in got["message"], got
        elif first == 666:
            assert status == 500, got
        else:
            assert (status, got) == (200, [(first + 4.0) * 2]), (first, got)
    assert _metric(server, "mlbuild_batch_size_count") <= 2  # they did share a call


def test_onnx_outputs_are_split_per_request(start_server, tmp_path):
    np = pytest.importorskip("numpy")
    pytest.importorskip("onnxruntime")
    skl2onnx = pytest.importorskip("skl2onnx")
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    X, y = load_iris(return_X_y=True)
    model = LogisticRegression(max_iter=500).fit(X, y)
    onx = skl2onnx.to_onnx(model, X[:1].astype(np.float32), target_opset=17)  # ZipMap
    (tmp_path / "clf.onnx").write_bytes(onx.SerializeToString())
    server = start_server(["--no-code-model", str(tmp_path / "clf.onnx")],
                          env=_batch_env(64, 200, MLBUILD_NO_CODE_FRAMEWORK="onnx"))
    picks = [X[i * 3:i * 3 + 1 + i % 2] for i in range(40)]

    def post(rows):
        resp = server.post(body=json.dumps({"data": rows.tolist()}), headers=JSON, timeout=30)
        return resp.status, resp.json()

    for rows, (status, got) in zip(picks, _concurrently(post, picks)):
        assert status == 200, got
        assert got["output_label"] == model.predict(rows).tolist()
        assert len(got["output_probability"]) == len(rows)
        for got_row, want in zip(got["output_probability"], model.predict_proba(rows)):
            assert [got_row[str(c)] for c in range(3)] == pytest.approx(want.tolist(), abs=1e-5)
    assert _metric(server, "mlbuild_batch_size_count") < 40 / 2


# -- the server: @batched scripts --------------------------------------------------------
ECHO = """
    import json
    import os
    import time

    from mlbuild.runtime import batched

    def init():
        pass

    @batched
    def run(inputs):
        with open(os.environ["BATCH_LOG"], "a") as fh:
            fh.write(json.dumps(len(inputs)) + "\\n")
        time.sleep(float(os.environ.get("BATCH_SLEEP", "0")))
        out = []
        for text in inputs:
            data = json.loads(text)
            if data.get("fail"):
                raise ValueError("this input is bad: " + str(data["id"]))
            out.append({"id": data["id"], "double": data["id"] * 2})
        if os.environ.get("BATCH_SHORT") and len(inputs) > 1:
            return out[:-1]
        return out
"""


def _script_server(start_server, tmp_path, size, latency_ms, **env):
    script = write_script(tmp_path, ECHO)
    log = tmp_path / "batches.log"
    server = start_server(["--entry-script", str(script)],
                          env={"BATCH_LOG": str(log), **_batch_env(size, latency_ms), **env})
    return server, log


def _sizes(log) -> list[int]:
    return [int(x) for x in log.read_text().split()] if log.exists() else []


def test_a_hundred_concurrent_clients_of_a_batched_script(start_server, tmp_path):
    server, log = _script_server(start_server, tmp_path, 16, 50, MLBUILD_ACCESS_LOG="0")

    def post(i):
        resp = server.post(body=json.dumps({"id": i}), headers=JSON, timeout=30)
        return resp.status, resp.json()

    out = _concurrently(post, list(range(100)))
    assert out == [(200, {"id": i, "double": 2 * i}) for i in range(100)]
    sizes = _sizes(log)
    assert sum(sizes) == 100 and max(sizes) <= 16
    assert len(sizes) < 50, sizes  # batched, not one by one


def test_a_lone_request_waits_at_most_max_latency(start_server, tmp_path):
    server, log = _script_server(start_server, tmp_path, 64, 300, BATCH_SLEEP="0.05")
    took = []
    for _ in range(3):
        started = time.monotonic()
        resp = server.post(body=json.dumps({"id": 5}), headers=JSON)
        took.append(time.monotonic() - started)
        assert resp.status == 200 and resp.json() == {"id": 5, "double": 10}
    # The first waits out the window; it gathered nobody, so the next lone ones are
    # scored at once (a lone client pays the window once). None waits more than it.
    assert 0.3 <= took[0] < 0.3 + 0.05 + 0.25, took  # window, the call, HTTP on 127.0.0.1
    assert all(t < 0.05 + 0.2 for t in took[1:]), took
    assert _sizes(log) == [1, 1, 1]
    waited = _metric(server, "mlbuild_batch_wait_seconds_sum")
    assert 0.29 <= waited <= 0.3 + 0.03, waited
    # A burst finds company (a batch running): the window is back and gathers it.
    out = _concurrently(lambda i: server.post(body=json.dumps({"id": i}), headers=JSON,
                                              timeout=10).json(), list(range(10)))
    assert out == [{"id": i, "double": 2 * i} for i in range(10)]
    sizes = _sizes(log)[3:]
    assert sum(sizes) == 10 and len(sizes) <= 3, sizes


def test_a_failing_input_in_a_batched_script_fails_alone(start_server, tmp_path):
    server, log = _script_server(start_server, tmp_path, 32, 300)
    bodies = [{"id": i, "fail": i == 4} for i in range(10)]

    def post(body):
        resp = server.post(body=json.dumps(body), headers=JSON, timeout=30)
        return resp.status, resp.json(), resp.headers

    out = _concurrently(post, bodies)
    for i, (status, got, headers) in enumerate(out):
        if i == 4:
            assert status == 500 and headers.get("x-ms-run-function-failed") == "True"
        else:
            assert (status, got) == (200, {"id": i, "double": 2 * i})
    sizes = _sizes(log)
    assert sizes[0] == 10 and sizes[1:] == [1] * 10, sizes  # one batch, then each alone
    text = server.output()
    assert "this input is bad: 4" in text  # the failing input's own traceback
    assert text.count("ValueError: this input is bad") == 1


def test_a_wrong_length_answer_is_a_500_for_its_batch_and_a_log_line(start_server, tmp_path):
    server, log = _script_server(start_server, tmp_path, 32, 300, BATCH_SHORT="1")

    def post(i):
        resp = server.post(body=json.dumps({"id": i}), headers=JSON, timeout=10)
        return resp.status, resp.json()

    out = _concurrently(post, list(range(5)))
    assert all(status == 500 for status, _ in out), out
    assert all("returned 4 results for 5 inputs" in got["message"] for _, got in out), out
    lines = [ln for ln in server.output().splitlines() if "returned 4 results" in ln]
    assert len(lines) == 1, lines  # once for the batch, not once per request
    # The service goes on: a lone request (a batch of one) is answered.
    resp = server.post(body=json.dumps({"id": 9}), headers=JSON, timeout=10)
    assert (resp.status, resp.json()) == (200, {"id": 9, "double": 18})


def test_a_batched_script_without_batching_settings_gets_lists_of_one(start_server, tmp_path):
    script = write_script(tmp_path, ECHO)
    log = tmp_path / "batches.log"
    server = start_server(["--entry-script", str(script)], env={"BATCH_LOG": str(log)})
    out = _concurrently(lambda i: server.post(body=json.dumps({"id": i}), headers=JSON).json(),
                        list(range(8)))
    assert out == [{"id": i, "double": 2 * i} for i in range(8)]
    assert _sizes(log) == [1] * 8
    assert "batching is not set" in server.output()


def test_a_script_that_is_not_batched_behaves_as_without_batching(start_server, tmp_path):
    script = write_script(tmp_path, """
        import json
        def init():
            pass
        def run(raw):
            return {"got": json.loads(raw)}
    """)
    server = start_server(["--entry-script", str(script)], env=_batch_env(8, 5))
    resp = server.post(body='{"a": 1}', headers=JSON)
    assert (resp.status, resp.json()) == (200, {"got": {"a": 1}})
    assert "but run() is not @batched" in server.output()
    assert "mlbuild_batch_size" not in server.get("/metrics").text


def test_a_batched_rawhttp_run_gets_requests_and_answers_each_with_its_own_response(
        start_server, tmp_path):
    script = write_script(tmp_path, """
        from azureml.contrib.services.aml_request import rawhttp
        from azureml.contrib.services.aml_response import AMLResponse
        from mlbuild.runtime import batched

        def init():
            pass

        @batched
        @rawhttp
        def run(requests):
            out = []
            for request in requests:
                name = request.headers.get("X-Name", "?")
                status = 201 if name.startswith("new") else 200
                out.append(AMLResponse({"hello": name, "n": len(requests) > 0}, status,
                                       {"X-Echo": name}, json_str=True))
            return out
    """)
    server = start_server(["--entry-script", str(script)], env=_batch_env(32, 100))

    def post(name):
        resp = server.post(body=b"{}", headers={**JSON, "X-Name": name}, timeout=10)
        return resp.status, resp.json(), resp.headers.get("x-echo")

    names = [f"new{i}" if i % 3 == 0 else f"old{i}" for i in range(12)]
    for name, (status, got, echo) in zip(names, _concurrently(post, names)):
        assert status == (201 if name.startswith("new") else 200)
        assert got == {"hello": name, "n": True} and echo == name
    assert _metric(server, "mlbuild_batch_size_count") < 12 / 2


def test_shutdown_with_requests_queued_answers_each_one(start_server, tmp_path):
    # One input a call, 0.4 s each: of 8 concurrent requests most are still queued when
    # SIGTERM comes; the 1 s drain answers some, the rest get 503. None hangs.
    server, log = _script_server(start_server, tmp_path, 1, 0, BATCH_SLEEP="0.4",
                                 MLBUILD_GRACEFUL_TIMEOUT="1")
    results: list = [None] * 8

    def post(i):
        try:
            resp = server.post(body=json.dumps({"id": i}), headers=JSON, timeout=15)
            results[i] = (resp.status, resp.body)
        except OSError as exc:  # a connection closed without an answer: a failure
            results[i] = ("error", repr(exc))

    threads = [threading.Thread(target=post, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while not _sizes(log) and time.monotonic() < deadline:
        time.sleep(0.02)
    server.proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    for t in threads:
        t.join(timeout=20)
    assert not any(t.is_alive() for t in threads), "a request hangs"
    assert server.wait_exit(timeout=10) == 0
    assert time.monotonic() - started < 8
    statuses = [r[0] for r in results]
    assert set(statuses) <= {200, 503}, results
    assert 200 in statuses and 503 in statuses, results
    for status, body in results:
        if status == 503:
            assert b"the server is stopping" in body
