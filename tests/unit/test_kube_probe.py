"""kube/probe.py: the no-op check's GET of a Deployment without lightkube, against the
fake API server over real HTTP; kubeconfigs it leaves to lightkube raise Unsupported."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for kubefake
from kubefake import KubeFake  # noqa: E402

from mlbuild.kube import probe  # noqa: E402

DEPLOYMENT = {
    "apiVersion": "apps/v1", "kind": "Deployment",
    "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
    "spec": {"selector": {"matchLabels": {"app": "web"}},
             "template": {"metadata": {"labels": {"app": "web"}},
                          "spec": {"containers": [{"name": "web", "image": "nginx"}]}}},
}


@pytest.fixture
def kube():
    with KubeFake() as fake:
        fake.create(DEPLOYMENT)
        yield fake


def test_reads_a_deployment_with_a_token_and_says_404(kube, tmp_path):
    cfg = kube.write_kubeconfig(tmp_path / "config")
    got = probe.get_deployment(None, "default", "web", str(cfg))
    assert got["metadata"]["name"] == "web" and got["spec"]["selector"]
    assert probe.get_deployment(None, "default", "nope", str(cfg)) is None
    sent = kube.requests_to("GET", "/apis/apps/v1/namespaces/default/deployments/web")
    assert sent and sent[-1].headers["authorization"] == f"Bearer {kube.token}"


def test_token_file_and_named_context(kube, tmp_path):
    cfg = yaml.safe_load(kube.write_kubeconfig(tmp_path / "config").read_text())
    (tmp_path / "token").write_text(kube.token + "\n")
    cfg["users"][0]["user"] = {"tokenFile": "token"}
    cfg["contexts"].append({"name": "other", "context": {"cluster": "x", "user": "y"}})
    cfg["current-context"] = "other"
    (tmp_path / "config").write_text(yaml.safe_dump(cfg))
    got = probe.get_deployment("kubefake", "default", "web", str(tmp_path / "config"))
    assert got["metadata"]["name"] == "web"


@pytest.mark.parametrize("change", ["exec", "basic", "proxy", "unknown-context", "401"])
def test_what_it_leaves_to_lightkube(kube, tmp_path, change):
    cfg = yaml.safe_load(kube.write_kubeconfig(tmp_path / "config").read_text())
    user, cluster = cfg["users"][0]["user"], cfg["clusters"][0]["cluster"]
    if change == "exec":
        user["exec"] = {"command": "kubelogin", "apiVersion": "client.authentication.k8s.io/v1"}
    elif change == "basic":
        user["username"] = "admin"
    elif change == "proxy":
        cluster["proxy-url"] = "http://127.0.0.1:3128"
    elif change == "unknown-context":
        cfg["current-context"] = "gone"
    else:
        user["token"] = "wrong"
    (tmp_path / "config").write_text(yaml.safe_dump(cfg))
    with pytest.raises(probe.Unsupported):
        probe.get_deployment(None, "default", "web", str(tmp_path / "config"))


def test_several_kubeconfig_files_are_lightkubes(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path}/a:{tmp_path}/b")
    with pytest.raises(probe.Unsupported):
        probe.get_deployment(None, "default", "web")
