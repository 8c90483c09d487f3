"""``mlbuild status`` of a kubernetes service shows the last minute of its pods together:
each ready pod's /metrics read through the API server's pod proxy (mlbuild/kube/ops.py
``traffic``), added up (mlbuild/traffic.py ``combine``).

The cluster is tests/kubefake's (real HTTP on 127.0.0.1, lightkube unchanged); the
service's objects are rendered and applied by mlbuild's own code and recorded as the
deploy step records them (only the image build and push are left out: no Docker here);
each of the two pods is backed by a REAL runtime process on 127.0.0.1 (``pod_backend``),
so what the proxy returns is the runtime's own window.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from clitools import CLI, free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for kubefake
from kubefake import Controller, KubeFake  # noqa: E402

from mlbuild import traffic  # noqa: E402

NS = "ml"
PROJECT, SERVICE, TARGET = "kt", "echo", "staging"
NAME = f"{PROJECT}-{SERVICE}"
IMAGE = f"127.0.0.1:5000/ml/{NAME}@sha256:{'0' * 64}"
FINGERPRINT = "sha256:" + "ab" * 32
START_TIMEOUT = 30.0  # a runtime's start on a slow CI box

MANIFEST = f"""\
name: {PROJECT}
registry: 127.0.0.1:5000/ml
environments:
  py:
    requirements: requirements.txt
services:
  {SERVICE}:
    entry_script: score.py
    environment: py
targets:
  {TARGET}: {{type: kubernetes, namespace: {NS}, replicas: 2}}
default_target: {TARGET}
"""

SCORE = """\
import json


def init():
    pass


def run(data):
    body = json.loads(data)
    if body.get("fail"):
        raise ValueError("asked to fail")  # the runtime answers 500
    return body
"""


class Runtime:
    """A runtime process on 127.0.0.1 serving the project's score.py."""

    def __init__(self, root: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("MLBUILD_", "AZUREML_", "AML_"))}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlbuild.runtime", "--entry-script", "score.py",
                 "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=root, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.log = log
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"runtime exited:\n{log.read_text()}"
            try:
                with urllib.request.urlopen(f"{self.url}/healthz/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"runtime not ready within {START_TIMEOUT} s:\n{log.read_text()}")

    def send(self, body: dict | None = None, method: str = "POST") -> int:
        req = urllib.request.Request(f"{self.url}/score", method=method,
                                     data=json.dumps(body or {}).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


@pytest.fixture
def kube():
    with KubeFake() as fake:
        fake.add_namespace(NS)
        yield fake


@pytest.fixture
def deployed(tmp_path, kube):
    """The project, its service applied to the fake with 2 ready pods and recorded as a
    deploy records it; the CLI with KUBECONFIG pointing at the fake."""
    from mlbuild.api import session
    from mlbuild.kube import render
    from mlbuild.kube.client import KubeClient

    root = tmp_path / PROJECT
    root.mkdir()
    (root / "mlproject.yaml").write_text(MANIFEST)
    (root / "score.py").write_text(SCORE)
    (root / "requirements.txt").write_text("")
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    with session(root, lock=True) as s:
        objects = render.render_service(PROJECT, SERVICE, IMAGE, FINGERPRINT,
                                        s.project.targets[TARGET].kube)
        client = KubeClient(None, NS, kubeconfig=str(kubeconfig))
        for obj in objects:
            client.apply(obj)
        Controller(kube).settle(NS, NAME)
        s.db.put_deployment(TARGET, SERVICE, {
            "kube": {"context": client.context, "namespace": NS, "deployment": NAME},
            "url": "", "image": IMAGE, "fingerprint": FINGERPRINT, "started_at": time.time(),
            "applied_deployment": next(o for o in objects if o["kind"] == "Deployment")})
    pods = sorted(p["metadata"]["name"] for p in kube.list("Pod", NS))
    assert len(pods) == 2
    cli = CLI(root)
    env = {"KUBECONFIG": str(kubeconfig)}
    return root, cli, env, pods


def status(cli: CLI, env: dict) -> tuple[dict, str]:
    """(the service's --json row, its LAST MINUTE cell in the table)."""
    [row] = cli.json("status", TARGET, env=env)  # exit 0, or CLI raises
    assert row["service"] == SERVICE and row["state"] == "Healthy", row
    header, *lines = cli("status", TARGET, env=env).stdout.splitlines()
    [line] = [ln for ln in lines if ln.startswith(TARGET)]
    start = header.index("LAST MINUTE (/score)")
    end = header.index("DETAIL")
    return row, line[start:end].strip()


def test_status_adds_up_the_last_minute_of_every_pod(deployed, kube, tmp_path):
    root, cli, env, (pod_a, pod_b) = deployed
    a = Runtime(root, tmp_path / "a.log")
    try:
        b = Runtime(root, tmp_path / "b.log")
    except BaseException:
        a.stop()
        raise
    try:
        kube.pod_backend(NS, pod_a, 5001, a.url)
        kube.pod_backend(NS, pod_b, 5001, b.url)
        sent = [a.send({"x": 1}), a.send({"x": 2}), a.send({"fail": True})]
        assert sent == [200, 200, 500]
        sent = [b.send({"x": i}) for i in range(4)] + [b.send(method="PUT")]
        assert sent == [200, 200, 200, 200, 405]

        row, cell = status(cli, env)
        seen = row["traffic"]
        assert {k: seen[k] for k in ("window_seconds", "requests", "errors", "client_errors")} \
            == {"window_seconds": 60, "requests": 8, "errors": 1, "client_errors": 1}, row
        # The p99 is the larger of the pods' own (read here straight from each runtime).
        own = [traffic.read(r.url) for r in (a, b)]
        assert seen["p99_ms"] == round(max(t.p99_seconds for t in own) * 1000.0, 3), (row, own)
        assert 0 < seen["p99_ms"] < 5000
        assert cell.startswith("8 req, 1 err, p99 ") and cell.endswith(" ms / 60 s"), cell
        # Each pod was read on its runtime's port, through the API server.
        for pod in (pod_a, pod_b):
            assert kube.requests_to("GET", f"/api/v1/namespaces/{NS}/pods/{pod}:5001/proxy/metrics")

        # One pod's runtime gone: the other's minute, and the status still answers.
        b.stop()
        row, cell = status(cli, env)
        assert row["traffic"]["requests"] == 3 and row["traffic"]["errors"] == 1, row
        assert row["traffic"]["client_errors"] == 0
        assert cell.startswith("3 req, 1 err, p99 "), cell

        # No pod answers: no numbers ("-" / null), and exit 0 all the same.
        a.stop()
        row, cell = status(cli, env)
        assert row["traffic"] is None, row
        assert cell == "-", cell
    finally:
        a.stop()
        b.stop()


def test_status_without_any_backend_and_with_the_proxy_forbidden(deployed, kube):
    _, cli, env, _ = deployed
    row, cell = status(cli, env)  # pods whose ports nobody listens on: 503 from the proxy
    assert row["traffic"] is None and cell == "-", row
    assert row["detail"].startswith("2/2 ready"), row
    kube.forbid("pods/proxy", verbs=["get"])  # RBAC without pods/proxy: no numbers either
    row, cell = status(cli, env)
    assert row["traffic"] is None and cell == "-", row
