"""A scikit-learn model served without an entry script."""

from __future__ import annotations

import json

import pytest

sklearn = pytest.importorskip("sklearn")
joblib = pytest.importorskip("joblib")


def test_nocode_ridge_diabetes(start_server, tmp_path):
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import Ridge

    X, y = load_diabetes(return_X_y=True)
    model = Ridge().fit(X, y)
    joblib.dump(model, tmp_path / "ridge.pkl")
    server = start_server([], env={"MLBUILD_NO_CODE_MODEL": str(tmp_path / "ridge.pkl"),
                                   "MLBUILD_NO_CODE_FRAMEWORK": "scikit-learn"})
    rows = X[:2].tolist()
    resp = server.post(body=json.dumps({"data": rows}),
                       headers={"Content-Type": "application/json"})
    assert resp.status == 200, resp.body
    assert resp.json() == pytest.approx(model.predict(X[:2]).tolist())
    assert server.post(body="{oops").status == 400
    assert server.post(body=json.dumps({"rows": rows})).status == 400
    assert server.post(body=json.dumps({"data": rows, "method": "predict_proba"})).status == 400


def test_nocode_classifier_predict_proba_unless_method_given(start_server, tmp_path):
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    X, y = load_iris(return_X_y=True)
    model = LogisticRegression(max_iter=500).fit(X, y)
    (tmp_path / "clf").mkdir()
    joblib.dump(model, tmp_path / "clf" / "model.joblib")
    server = start_server(["--no-code-model", str(tmp_path / "clf")])
    rows = X[:3].tolist()
    proba = server.post(body=json.dumps({"data": rows})).json()
    assert len(proba) == 3 and len(proba[0]) == 3
    expected = model.predict_proba(X[:3]).tolist()
    for got_row, want_row in zip(proba, expected):
        assert got_row == pytest.approx(want_row)
    labels = server.post(body=json.dumps({"data": rows, "method": "predict"})).json()
    assert labels == model.predict(X[:3]).tolist()
