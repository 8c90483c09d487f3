"""Contract tests of the Kubernetes API as mlbuild uses it, through lightkube.

Every test taking ``cluster`` runs against the fake (tests/kubefake/server.py) and, when
MLBUILD_TEST_KUBECONFIG names a kubeconfig, against that real cluster too (in a fresh
namespace, deleted afterwards), so the fake cannot drift from the real apiserver.
Tests taking ``fake`` check what only the fake can be made to do (a wrong token, a
forbidden verb, the request log, the controller stand-in's outcomes).
"""

from __future__ import annotations

import base64
import copy
import json
import os
import shlex
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
from lightkube import ApiError, Client
from lightkube.codecs import from_dict
from lightkube.config.kubeconfig import KubeConfig
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.apps_v1 import Deployment, ReplicaSet
from lightkube.resources.core_v1 import Event, Namespace, Pod, Secret, Service
from lightkube.types import PatchType

from .controller import Controller, pod_template_hash
from .server import KubeFake

KUBECONFIG_ENV = "MLBUILD_TEST_KUBECONFIG"
MANAGED = "app.kubernetes.io/managed-by"


@dataclass
class Cluster:
    """One side of the contract: a lightkube client in a namespace of its own."""

    name: str  # "fake" or "real"
    client: Client
    namespace: str
    kube: KubeFake | None = None
    controller: Controller | None = None
    kubeconfig: str | None = None
    _closers: list = field(default_factory=list)

    def kube_client(self):
        """mlbuild's own client (mlbuild/kube/client.py) on this cluster and namespace."""
        from mlbuild.kube.client import KubeClient

        return KubeClient(None, self.namespace, kubeconfig=self.kubeconfig)

    def start_pod_serving(self, name: str, port: int, files: dict[str, str]) -> None:
        """A running pod whose ``port`` serves ``files`` (name -> text) over HTTP; a
        real cluster's is busybox httpd, the fake's a server on 127.0.0.1 that the
        pod proxy forwards to (``pod_backend``)."""
        script = "mkdir -p /tmp/www && cd /tmp/www && " + " && ".join(
            f"printf %s {shlex.quote(text)} > {shlex.quote(f)}" for f, text in files.items()) \
            + f" && exec httpd -f -p {port} -h /tmp/www"
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {MANAGED: "mlbuild"}},
               "spec": {"containers": [{"name": "main", "image": "busybox:1.36", "command": ["sh", "-c", script],
                                        "ports": [{"containerPort": port, "name": "http"}]}],
                        "terminationGracePeriodSeconds": 0}}
        apply_retrying(self.client, pod)
        if self.controller is not None:
            self.controller.run_pod(self.namespace, name)
            server = serve_files(files)
            self._closers.append(server.shutdown)
            self._closers.append(server.server_close)
            self.kube.pod_backend(self.namespace, name, port, f"http://127.0.0.1:{server.server_address[1]}")
            return
        deadline = time.monotonic() + 120
        first = next(iter(files))
        while time.monotonic() < deadline:  # running, and httpd listening
            got = self.client.get(Pod, name)
            if got.status and got.status.phase == "Running" and \
                    self.kube_client().proxy_get(name, port, first)[0] == 200:
                return
            time.sleep(0.5)
        pytest.fail(f"pod {name} did not serve on port {port} within 120 s")

    def close(self) -> None:
        for close in self._closers:
            close()

    def start_pod_with_logs(self, name: str, lines: list[str], late_line: str) -> None:
        """A running pod whose container printed ``lines`` and prints ``late_line`` a
        little later."""
        script = "; ".join(f"echo '{line}'" for line in lines) + f"; sleep 8; echo '{late_line}'; sleep 3600"
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {MANAGED: "mlbuild"}},
               "spec": {"containers": [{"name": "main", "image": "busybox:1.36", "command": ["sh", "-c", script]}],
                        "terminationGracePeriodSeconds": 0}}
        apply_retrying(self.client, pod)
        if self.controller is not None:
            self.controller.run_pod(self.namespace, name, logs=lines)
            return
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            got = self.client.get(Pod, name)
            if got.status and got.status.phase == "Running":
                return
            time.sleep(0.5)
        pytest.fail(f"pod {name} did not start within 120 s")

    def emit_late_line(self, pod: str, line: str) -> None:
        if self.controller is not None:
            self.controller.log(pod, "main", line, namespace=self.namespace)
        # a real pod prints it by itself


def serve_files(files: dict[str, str], delay: float = 0.0) -> ThreadingHTTPServer:
    """An HTTP server on 127.0.0.1 (in a thread) answering ``GET /NAME`` with
    ``files[NAME]`` (after ``delay`` seconds), else 404 with a text body."""
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            time.sleep(delay)
            text = files.get(self.path.lstrip("/"))
            data = (text if text is not None else "404 Not Found\n").encode()
            self.send_response(200 if text is not None else 404)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


def apply_retrying(client: Client, obj: dict, **kw):
    """Apply; in a namespace created a moment ago a real cluster may refuse pods until
    its default ServiceAccount exists."""
    for _ in range(50):
        try:
            return client.apply(from_dict(obj), **kw)
        except ApiError as e:
            if e.status.code == 403 and "serviceaccount" in (e.status.message or ""):
                time.sleep(0.2)
                continue
            raise
    raise AssertionError("the namespace's default ServiceAccount never appeared")


@pytest.fixture(params=["fake", "real"])
def cluster(request, tmp_path) -> Iterator[Cluster]:
    kube = None
    if request.param == "fake":
        kube = KubeFake().start()
        path = kube.write_kubeconfig(tmp_path / "kubeconfig")
    else:
        path = os.environ.get(KUBECONFIG_ENV)
        if not path:
            pytest.skip(f"{KUBECONFIG_ENV} not set")
    config = KubeConfig.from_file(path)
    namespace = f"mlbuild-contract-{uuid.uuid4().hex[:8]}"
    admin = Client(config, field_manager="mlbuild")
    admin.create(Namespace(metadata=ObjectMeta(name=namespace)))
    client = Client(config, namespace=namespace, field_manager="mlbuild")
    c = Cluster(request.param, client, namespace, kube, Controller(kube) if kube else None, str(path))
    try:
        yield c
    finally:
        c.close()
        admin.delete(Namespace, namespace)
        client.close()
        admin.close()
        if kube:
            kube.stop()


@pytest.fixture
def fake(tmp_path) -> Iterator[Cluster]:
    with KubeFake() as kube:
        kube.add_namespace("ml")
        path = kube.write_kubeconfig(tmp_path / "kubeconfig", namespace="ml")
        client = Client(KubeConfig.from_file(path), field_manager="mlbuild")
        c = Cluster("fake", client, "ml", kube, Controller(kube), str(path))
        yield c
        c.close()
        client.close()


def deployment(name: str = "web", *, replicas: int | None = 2, image: str = "registry.k8s.io/pause:3.10",
               labels: dict | None = None, env: list | None = None) -> dict:
    selector = {"app.kubernetes.io/name": name}
    container = {"name": "main", "image": image, "ports": [{"containerPort": 8080, "name": "http"}]}
    if env:
        container["env"] = env
    spec: dict = {
        "selector": {"matchLabels": selector},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        "template": {"metadata": {"labels": dict(selector)}, "spec": {"containers": [container]}},
    }
    if replicas is not None:
        spec["replicas"] = replicas
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "labels": {**selector, MANAGED: "mlbuild", **(labels or {})}},
            "spec": spec}


def managers(obj) -> dict[str, dict]:
    return {m.manager: m.fieldsV1 for m in obj.metadata.managedFields or []}


# --------------------------------------------------------------------------- apply, get, list, delete


def test_apply_creates_then_updates(cluster: Cluster):
    c = cluster.client
    created = c.apply(from_dict(deployment()))
    assert created.metadata.uid and created.metadata.resourceVersion and created.metadata.creationTimestamp
    assert created.metadata.generation == 1
    assert created.spec.replicas == 2
    entry = next(m for m in created.metadata.managedFields if m.manager == "mlbuild")
    assert entry.operation == "Apply" and entry.fieldsType == "FieldsV1" and entry.apiVersion == "apps/v1"
    assert "f:replicas" in entry.fieldsV1["f:spec"]
    assert 'k:{"name":"main"}' in entry.fieldsV1["f:spec"]["f:template"]["f:spec"]["f:containers"]
    # defaults the apiserver fills in and a rollout reads
    assert created.spec.progressDeadlineSeconds == 600
    assert created.spec.template.spec.containers[0].ports[0].protocol == "TCP"

    again = c.apply(from_dict(deployment()))
    assert again.metadata.generation == 1, "an unchanged apply is no new generation"
    assert again.metadata.uid == created.metadata.uid

    changed = c.apply(from_dict(deployment(image="registry.k8s.io/pause:3.9")))
    assert changed.metadata.generation == 2
    assert int(changed.metadata.resourceVersion) > int(created.metadata.resourceVersion)
    assert c.get(Deployment, "web").spec.template.spec.containers[0].image == "registry.k8s.io/pause:3.9"


def test_apply_conflict_names_the_other_manager_and_force_takes_over(cluster: Cluster):
    c = cluster.client
    c.apply(from_dict(deployment(replicas=2)))
    c.patch(Deployment, "web", {"spec": {"replicas": 5}}, patch_type=PatchType.MERGE, field_manager="kubectl-edit")

    with pytest.raises(ApiError) as info:
        c.apply(from_dict(deployment(replicas=2)))
    status = info.value.status
    assert (status.code, status.reason, status.status) == (409, "Conflict", "Failure")
    assert status.message == 'Apply failed with 1 conflict: conflict with "kubectl-edit" using apps/v1: .spec.replicas'
    [cause] = status.details.causes
    assert (cause.reason, cause.field) == ("FieldManagerConflict", ".spec.replicas")
    assert cause.message == 'conflict with "kubectl-edit" using apps/v1'
    assert c.get(Deployment, "web").spec.replicas == 5

    same = c.apply(from_dict(deployment(replicas=5)))  # the same value: shared, no conflict
    assert same.spec.replicas == 5

    forced = c.apply(from_dict(deployment(replicas=2)), force=True)
    assert forced.spec.replicas == 2
    assert "f:replicas" not in managers(forced).get("kubectl-edit", {}).get("f:spec", {})


def test_apply_removes_what_it_no_longer_sets_but_not_what_others_set(cluster: Cluster):
    c = cluster.client
    env = [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]
    c.apply(from_dict(deployment(labels={"tier": "web"}, env=env)))
    c.patch(Deployment, "web", {"metadata": {"labels": {"owner": "ops"}}}, patch_type=PatchType.MERGE,
            field_manager="kubectl-label")

    after = c.apply(from_dict(deployment(env=env[:1])))
    assert "tier" not in after.metadata.labels
    assert after.metadata.labels["owner"] == "ops"
    assert [e.name for e in after.spec.template.spec.containers[0].env] == ["A"]


def test_get_list_by_label_and_delete(cluster: Cluster):
    c = cluster.client
    c.apply(from_dict(deployment("web")))
    c.apply(from_dict(deployment("api")))
    c.apply(from_dict({"apiVersion": "v1", "kind": "Service",
                       "metadata": {"name": "web", "labels": {MANAGED: "mlbuild"}},
                       "spec": {"selector": {"app.kubernetes.io/name": "web"},
                                "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}))
    c.apply(from_dict({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "web-keys"},
                       "stringData": {"primary": "k1"}}))

    assert sorted(d.metadata.name for d in c.list(Deployment, labels={MANAGED: "mlbuild"})) == ["api", "web"]
    assert [d.metadata.name for d in c.list(Deployment, labels={"app.kubernetes.io/name": "web"})] == ["web"]
    assert sorted(d.metadata.name for d in c.list(Deployment, labels={"app.kubernetes.io/name": None})) == ["api", "web"]
    assert [s.metadata.name for s in c.list(Service, labels={MANAGED: "mlbuild"})] == ["web"]
    listing = c.list(Deployment)
    assert len(list(listing)) == 2 and listing.resourceVersion

    assert c.get(Service, "web").spec.ports[0].protocol == "TCP"
    secret = c.get(Secret, "web-keys")
    assert base64.b64decode(secret.data["primary"]) == b"k1" and secret.type == "Opaque"

    c.delete(Deployment, "api")
    with pytest.raises(ApiError) as info:
        c.get(Deployment, "api")
    status = info.value.status
    assert (status.code, status.reason) == (404, "NotFound")
    assert status.message == 'deployments.apps "api" not found'
    assert (status.details.name, status.details.kind, status.details.group) == ("api", "deployments", "apps")
    with pytest.raises(ApiError) as info:
        c.delete(Deployment, "api")
    assert info.value.status.code == 404


def test_missing_namespace_is_404(cluster: Cluster):
    with pytest.raises(ApiError) as info:
        cluster.client.apply(from_dict(deployment()), namespace="no-such-namespace-x1")
    assert info.value.status.code == 404
    assert info.value.status.message == 'namespaces "no-such-namespace-x1" not found'
    with pytest.raises(ApiError) as info:
        cluster.client.get(Namespace, "no-such-namespace-x1")
    assert (info.value.status.code, info.value.status.details.kind) == (404, "namespaces")
    ns = cluster.client.get(Namespace, cluster.namespace)
    assert ns.status.phase == "Active"
    assert ns.metadata.labels["kubernetes.io/metadata.name"] == cluster.namespace


def test_deleting_a_namespace_takes_its_objects(fake: Cluster):
    fake.client.apply(from_dict(deployment()))
    fake.client.delete(Namespace, "ml")
    assert fake.kube.list("Deployment") == [] and fake.kube.get("Namespace", None, "ml") is None


def test_invalid_object_is_422_naming_the_field(cluster: Cluster):
    bad = deployment()
    bad["spec"]["template"]["metadata"]["labels"] = {"app.kubernetes.io/name": "other"}
    with pytest.raises(ApiError) as info:
        cluster.client.apply(from_dict(bad))
    status = info.value.status
    assert (status.code, status.reason) == (422, "Invalid")
    assert status.message.startswith('Deployment.apps "web" is invalid: ')
    assert "spec.template.metadata.labels" in status.message
    assert "`selector` does not match template `labels`" in status.message
    assert status.details.kind == "Deployment" and status.details.name == "web"


# --------------------------------------------------------------------------- watch


def test_watch_streams_changes_after_a_resource_version(cluster: Cluster):
    c = cluster.client
    start = c.list(Secret)
    list(start)
    events: list[tuple[str, str]] = []
    done = threading.Event()

    def watch() -> None:
        for kind, obj in c.watch(Secret, fields={"metadata.name": "w"}, resource_version=start.resourceVersion,
                                 server_timeout=5):
            events.append((kind, obj.metadata.name))
            if kind == "DELETED":
                break
        done.set()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    time.sleep(0.2)
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "w"}, "stringData": {"k": "1"}}
    c.apply(from_dict(secret))
    c.apply(from_dict({**secret, "stringData": {"k": "2"}}))
    c.delete(Secret, "w")
    assert done.wait(10), f"watch saw only {events}"
    assert events == [("ADDED", "w"), ("MODIFIED", "w"), ("DELETED", "w")]


def test_watch_without_a_version_starts_with_what_exists(cluster: Cluster):
    c = cluster.client
    c.apply(from_dict({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "old", "labels": {"w": "1"}}}))
    seen = []
    for kind, obj in c.watch(Secret, labels={"w": "1"}, server_timeout=1):
        seen.append((kind, obj.metadata.name))
        break
    assert seen == [("ADDED", "old")]


def test_watch_from_a_compacted_version_is_410(fake: Cluster):
    c = fake.client
    c.apply(from_dict({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}}))
    fake.kube.compact()
    with pytest.raises(ApiError) as info:
        next(iter(c.watch(Secret, resource_version="1", server_timeout=1)))
    assert (info.value.status.code, info.value.status.reason) == (410, "Expired")


# --------------------------------------------------------------------------- logs


def test_pod_logs_tail_and_follow(cluster: Cluster):
    c = cluster.client
    cluster.start_pod_with_logs("logger", ["one", "two", "three"], late_line="late")
    deadline = time.monotonic() + 5
    while list(c.log("logger")) != ["one\n", "two\n", "three\n"] and time.monotonic() < deadline:
        time.sleep(0.2)  # a real container may not have printed yet (it prints "late" after 8 s)
    assert list(c.log("logger", tail_lines=2)) == ["two\n", "three\n"]
    assert list(c.log("logger", container="main", tail_lines=1, newlines=False)) == ["three"]

    got: list[str] = []
    reader_done = threading.Event()

    def follow() -> None:
        for line in c.log("logger", follow=True, newlines=False):
            got.append(line)
            if line == "late":
                break
        reader_done.set()

    threading.Thread(target=follow, daemon=True).start()
    time.sleep(0.3)
    cluster.emit_late_line("logger", "late")
    assert reader_done.wait(15), f"follow saw only {got}"
    assert got[-1] == "late" and got[:3] == ["one", "two", "three"]

    with pytest.raises(ApiError) as info:
        list(c.log("no-such-pod"))
    assert info.value.status.code == 404
    assert info.value.status.message == 'pods "no-such-pod" not found'


def test_log_errors_say_what_the_kubelet_says(fake: Cluster):
    c, ctl = fake.client, fake.controller
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "two"},
           "spec": {"containers": [{"name": "a", "image": "busybox"}, {"name": "b", "image": "busybox"}]}}
    c.apply(from_dict(pod))
    with pytest.raises(ApiError) as info:
        list(c.log("two"))
    assert (info.value.status.code, info.value.status.message) == (
        400, "a container name must be specified for pod two, choose one of: [a b]")
    ctl.run_pod("ml", "two", steps=1)  # scheduled, containers being created
    with pytest.raises(ApiError) as info:
        list(c.log("two", container="a"))
    assert info.value.status.message == 'container "a" in pod "two" is waiting to start: ContainerCreating'
    with pytest.raises(ApiError) as info:
        list(c.log("two", container="c"))
    assert info.value.status.message == "container c is not valid for pod two"


# --------------------------------------------------------------------------- pod proxy


def _status_of(body: str) -> dict | None:
    """The API server's Status in a proxied answer, or None (the program's own)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) and doc.get("kind") == "Status" else None


def test_pod_proxy_reaches_a_port_of_a_pod(cluster: Cluster):
    cluster.start_pod_serving("web-0", 8080, {"metrics": "mlbuild_up 1\n"})
    k = cluster.kube_client()
    assert k.proxy_get("web-0", 8080, "metrics") == (200, "mlbuild_up 1\n")
    assert k.proxy_get("web-0", 8080, "/metrics") == (200, "mlbuild_up 1\n")
    code, body = k.proxy_get("web-0", 8080, "nothing")  # the program's own 404 comes through
    assert code == 404 and _status_of(body) is None

    code, body = k.proxy_get("web-0", 8081, "metrics")  # nothing listens there
    status = _status_of(body)
    assert (code, status["code"], status["reason"]) == (503, 503, "ServiceUnavailable"), body
    assert status["message"].startswith("error trying to reach service: dial tcp "), status
    assert status["message"].endswith(":8081: connect: connection refused"), status

    code, body = k.proxy_get("no-such-pod", 8080, "metrics")
    status = _status_of(body)
    assert (code, status["reason"], status["message"]) == (404, "NotFound", 'pods "no-such-pod" not found')


def test_pod_proxy_to_a_pod_without_an_address_is_400(cluster: Cluster):
    # Never scheduled (a node selector no node matches): no IP, nothing to dial.
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "nowhere", "labels": {MANAGED: "mlbuild"}},
           "spec": {"containers": [{"name": "main", "image": "busybox:1.36"}],
                    "nodeSelector": {"mlbuild.dev/no-such-node": "true"}}}
    apply_retrying(cluster.client, pod)
    code, body = cluster.kube_client().proxy_get("nowhere", 8080, "metrics")
    status = _status_of(body)
    assert (code, status["reason"], status["message"]) == (400, "BadRequest", "address not allowed"), body


def test_pod_proxy_backends_of_the_fake(fake: Cluster):
    from mlbuild.kube.client import Unreachable

    k, kube = fake.kube_client(), fake.kube
    fake.client.apply(from_dict({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                                 "spec": {"containers": [{"name": "c", "image": "busybox",
                                                          "ports": [{"containerPort": 5001}]}]}}))
    fake.controller.run_pod("ml", "p")
    ip = kube.get("Pod", "ml", "p")["status"]["podIP"]
    # Registered, but its process is gone: as a port nobody listens on.
    with socket.socket() as gone:
        gone.bind(("127.0.0.1", 0))  # a free port, not listening
        kube.pod_backend("ml", "p", 5001, f"http://127.0.0.1:{gone.getsockname()[1]}")
        code, body = k.proxy_get("p", 5001, "metrics")
    assert (code, _status_of(body)["message"]) == (
        503, f"error trying to reach service: dial tcp {ip}:5001: connect: connection refused")
    # Each port is its own backend; the query string goes along.
    slow = serve_files({"metrics": "x 1\n"}, delay=0.5)
    try:
        kube.pod_backend("ml", "p", 5001, f"http://127.0.0.1:{slow.server_address[1]}")
        assert k.proxy_get("p", 5001, "metrics", timeout=5) == (200, "x 1\n")
        assert k.proxy_get("p", 5002, "metrics")[0] == 503
        req = urllib.request.Request(kube.url + "/api/v1/namespaces/ml/pods/p/proxy/metrics",
                                     headers={"Authorization": f"Bearer {kube.token}"})
        with urllib.request.urlopen(req, timeout=5) as resp:  # no port: the pod's first
            assert resp.read() == b"x 1\n"
        # Too slow for the caller: Unreachable, saying which pod.
        with pytest.raises(Unreachable, match="pod p did not answer on port 5001 within 0.1 s"):
            k.proxy_get("p", 5001, "metrics", timeout=0.1)
    finally:
        slow.shutdown()
        slow.server_close()
    assert kube.requests_to("GET", "/api/v1/namespaces/ml/pods/p:5001/proxy/metrics")
    # RBAC: get on pods/proxy.
    kube.forbid("pods/proxy", verbs=["get"])
    with pytest.raises(Unreachable, match=r'not allowed \(403\).*cannot get resource "pods/proxy"'):
        k.proxy_get("p", 5001, "metrics")
    kube.allow_all()
    code, status = _raw(fake, "GET", "/api/v1/namespaces/ml/pods/a:b:c:d/proxy/metrics")
    assert (code, status["message"]) == (400, 'invalid pod request "a:b:c:d"')
    code, status = _raw(fake, "POST", "/api/v1/namespaces/ml/pods/p:5001/proxy/score", b"{}")
    assert code == 405  # the fake proxies GET only


# --------------------------------------------------------------------------- auth, errors, request log


def test_wrong_token_is_401(fake: Cluster, tmp_path: Path):
    path = fake.kube.write_kubeconfig(tmp_path / "bad", namespace="ml", token="not-the-token")
    with Client(KubeConfig.from_file(path), field_manager="mlbuild") as bad:
        with pytest.raises(ApiError) as info:
            bad.get(Deployment, "web")
    status = info.value.status
    assert (status.code, status.reason, status.message) == (401, "Unauthorized", "Unauthorized")


def test_forbidden_verb_is_403_with_rbacs_message(fake: Cluster):
    fake.kube.forbid("deployments", verbs=["patch"], namespace="ml")
    with pytest.raises(ApiError) as info:
        fake.client.apply(from_dict(deployment()))
    status = info.value.status
    assert (status.code, status.reason) == (403, "Forbidden")
    assert status.message == ('deployments.apps "web" is forbidden: User "system:serviceaccount:default:mlbuild" '
                              'cannot patch resource "deployments" in API group "apps" in the namespace "ml"')
    fake.kube.allow_all()
    fake.kube.forbid("pods/log", verbs=["get"])
    fake.client.apply(from_dict({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                                 "spec": {"containers": [{"name": "c", "image": "busybox"}]}}))
    with pytest.raises(ApiError) as info:
        list(fake.client.log("p"))
    assert 'cannot get resource "pods/log" in API group ""' in info.value.status.message


def test_clients_cannot_write_what_controllers_own(fake: Cluster):
    rs = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "x"},
          "spec": {"selector": {"matchLabels": {"a": "b"}},
                   "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}}
    with pytest.raises(ApiError) as info:
        fake.client.apply(from_dict(rs))
    assert info.value.status.code == 403


def test_request_log_shows_what_apply_sent(fake: Cluster):
    fake.client.apply(from_dict(deployment()))
    [req] = fake.kube.requests_to("PATCH", "/apis/apps/v1/namespaces/ml/deployments/web")
    assert req.content_type == "application/apply-patch+yaml"
    assert req.query["fieldManager"] == "mlbuild" and "force" not in req.query
    assert req.json()["spec"]["replicas"] == 2
    assert req.headers["authorization"] == "Bearer kubefake-token"


def _raw(fake: Cluster, method: str, path: str, body: bytes | None = None,
         content_type: str = "application/json") -> tuple[int, dict]:
    req = urllib.request.Request(fake.kube.url + path, data=body, method=method,
                                 headers={"Authorization": f"Bearer {fake.kube.token}", "Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_apply_needs_a_field_manager_and_creates_with_201(fake: Cluster):
    path = "/apis/apps/v1/namespaces/ml/deployments/web"
    body = json.dumps(deployment()).encode()
    code, status = _raw(fake, "PATCH", path, body, "application/apply-patch+yaml")
    assert code == 422 and status["reason"] == "Invalid"
    assert status["message"] == ('PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required value: '
                                 "is required for apply patch")
    code, obj = _raw(fake, "PATCH", path + "?fieldManager=mlbuild", body, "application/apply-patch+yaml")
    assert code == 201 and obj["metadata"]["generation"] == 1
    code, obj = _raw(fake, "PATCH", path + "?fieldManager=mlbuild", body, "application/apply-patch+yaml")
    assert code == 200
    code, status = _raw(fake, "PATCH", path + "?force=true", b"{}", "application/merge-patch+json")
    assert code == 422 and "may not be specified for non-apply patch" in status["message"]
    code, status = _raw(fake, "PATCH", path, b"{}", "text/plain")
    assert code == 415 and status["reason"] == "UnsupportedMediaType"


def test_discovery_documents(fake: Cluster):
    assert _raw(fake, "GET", "/version")[1]["major"] == "1"
    assert _raw(fake, "GET", "/api")[1]["versions"] == ["v1"]
    groups = {g["name"] for g in _raw(fake, "GET", "/apis")[1]["groups"]}
    assert {"apps", "autoscaling", "policy", "networking.k8s.io"} <= groups
    names = {r["name"] for r in _raw(fake, "GET", "/apis/apps/v1")[1]["resources"]}
    assert {"deployments", "deployments/status", "replicasets"} <= names


def test_every_kind_mlbuild_renders_round_trips(fake: Cluster):
    c = fake.client
    objs = [
        {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "web"},
         "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                  "minReplicas": 2, "maxReplicas": 5,
                  "metrics": [{"type": "Resource", "resource": {"name": "cpu",
                                                                "target": {"type": "Utilization", "averageUtilization": 70}}}]}},
        {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "web"},
         "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app.kubernetes.io/name": "web"}}}},
        {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "web"},
         "spec": {"rules": [{"host": "ml.example", "http": {"paths": [
             {"path": "/web", "pathType": "Prefix",
              "backend": {"service": {"name": "web", "port": {"name": "http"}}}}]}}]}},
    ]
    for obj in objs:
        got = c.apply(from_dict(obj))
        assert got.metadata.generation == 1
        again = c.get(type(got), obj["metadata"]["name"])
        assert again.to_dict()["spec"] == got.to_dict()["spec"]
        c.delete(type(got), obj["metadata"]["name"])


# --------------------------------------------------------------------------- the controller stand-in


def _pods(c: Client, name: str = "web") -> list:
    return list(c.list(Pod, labels={"app.kubernetes.io/name": name}))


def test_first_rollout_becomes_available(fake: Cluster):
    c, ctl = fake.client, fake.controller
    c.apply(from_dict(deployment(replicas=3)))
    first = ctl.reconcile("ml", "web")
    assert first["status"]["updatedReplicas"] == 3 and "availableReplicas" not in first["status"]
    done = ctl.settle("ml", "web")
    status = done["status"]
    assert status["observedGeneration"] == 1
    assert (status["replicas"], status["updatedReplicas"], status["readyReplicas"], status["availableReplicas"]) == (3, 3, 3, 3)
    assert "unavailableReplicas" not in status
    conds = {x["type"]: x for x in status["conditions"]}
    assert conds["Available"]["reason"] == "MinimumReplicasAvailable"
    assert conds["Progressing"]["reason"] == "NewReplicaSetAvailable"
    assert done["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "1"

    [rs] = c.list(ReplicaSet)
    h = pod_template_hash(fake.kube.get("Deployment", "ml", "web")["spec"]["template"])  # as stored, defaulted
    assert rs.metadata.name == f"web-{h}" and rs.metadata.labels["pod-template-hash"] == h
    assert rs.metadata.ownerReferences[0].kind == "Deployment" and rs.metadata.ownerReferences[0].controller
    pods = _pods(c)
    assert len(pods) == 3
    for p in pods:
        assert p.metadata.name.startswith(f"web-{h}-") and len(p.metadata.name) == len(f"web-{h}-") + 5
        assert p.metadata.labels["pod-template-hash"] == h and p.metadata.ownerReferences[0].name == rs.metadata.name
        assert p.status.phase == "Running" and p.status.containerStatuses[0].ready
    assert list(c.list(Event, fields={"involvedObject.kind": "Deployment", "involvedObject.name": "web"}))


def test_rolling_update_surges_before_it_removes(fake: Cluster):
    c, ctl = fake.client, fake.controller
    c.apply(from_dict(deployment(replicas=3)))
    ctl.settle("ml", "web")
    c.apply(from_dict(deployment(replicas=3, image="registry.k8s.io/pause:3.9")))
    for _ in range(20):
        dep = ctl.reconcile("ml", "web")
        ready = [p for p in _pods(c) if p.metadata.deletionTimestamp is None and p.status.containerStatuses
                 and p.status.containerStatuses[0].ready]
        assert len(ready) >= 3, "maxUnavailable 0: never fewer than 3 ready pods"
        assert len([p for p in _pods(c) if p.metadata.deletionTimestamp is None]) <= 4, "maxSurge 1"
        if dep["status"]["conditions"][1]["reason"] == "NewReplicaSetAvailable":
            break
    dep = ctl.settle("ml", "web")
    assert dep["metadata"]["generation"] == 2 and dep["status"]["observedGeneration"] == 2
    assert dep["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "2"
    rss = {rs.metadata.annotations["deployment.kubernetes.io/revision"]: rs for rs in c.list(ReplicaSet)}
    assert rss["1"].spec.replicas == 0 and rss["2"].spec.replicas == 3
    assert {p.spec.containers[0].image for p in _pods(c)} == {"registry.k8s.io/pause:3.9"}
    scaled = [e.message for e in c.list(Event, fields={"involvedObject.name": "web", "reason": "ScalingReplicaSet"})]
    assert f"Scaled down replica set {rss['1'].metadata.name} from 1 to 0" in scaled


def _container_state(c: Client):
    [pod] = [p for p in _pods(c) if p.metadata.labels["pod-template-hash"] != "x"][:1]
    return pod, pod.status.containerStatuses[0] if pod.status.containerStatuses else None


def test_crashloop_has_the_kubelets_shape_and_its_logs(fake: Cluster):
    c, ctl = fake.client, fake.controller
    c.apply(from_dict(deployment(replicas=1)))
    trace = ["Traceback (most recent call last):", "ValueError: no model"]
    ctl.reconcile("ml", "web", outcome="crashloop", steps=3, logs=trace)
    pod, cs = _container_state(c)
    assert cs.state.terminated.exitCode == 1 and cs.state.terminated.reason == "Error"
    ctl.reconcile("ml", "web", outcome="crashloop", steps=2)
    pod, cs = _container_state(c)
    assert cs.state.waiting.reason == "CrashLoopBackOff"
    assert cs.state.waiting.message.startswith("back-off 20s restarting failed container=main pod=")
    assert cs.lastState.terminated.exitCode == 1 and cs.restartCount == 2
    assert pod.status.phase == "Running"
    assert [x.status for x in pod.status.conditions if x.type == "Ready"] == ["False"]
    assert list(c.log(pod.metadata.name, newlines=False)) == trace
    assert list(c.log(pod.metadata.name, newlines=False)) == list(c.log(pod.metadata.name, newlines=False))
    warnings = list(c.list(Event, fields={"involvedObject.name": pod.metadata.name, "type": "Warning"}))
    assert [e.reason for e in warnings] == ["BackOff"] and warnings[0].count == 2


@pytest.mark.parametrize("outcome,reason,message", [
    ("imagepull", "ImagePullBackOff", 'Back-off pulling image "registry.k8s.io/pause:3.10"'),
    ("createcontainerconfig", "CreateContainerConfigError", 'secret "web-keys" not found'),
    ("runcontainer", "RunContainerError", "failed to create containerd task"),
])
def test_waiting_failures(fake: Cluster, outcome: str, reason: str, message: str):
    c, ctl = fake.client, fake.controller
    env = [{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "web-keys", "key": "primary"}}}]
    c.apply(from_dict(deployment(replicas=1, env=env)))
    ctl.reconcile("ml", "web", outcome=outcome, steps=3)
    pod, cs = _container_state(c)
    assert cs.state.waiting.reason == reason and message in cs.state.waiting.message
    assert pod.status.phase == "Pending" and cs.restartCount == 0
    with pytest.raises(ApiError) as info:
        list(c.log(pod.metadata.name))
    assert info.value.status.code == 400 and "is waiting to start" in info.value.status.message


def test_err_image_pull_comes_first(fake: Cluster):
    c, ctl = fake.client, fake.controller
    c.apply(from_dict(deployment(replicas=1)))
    ctl.reconcile("ml", "web", outcome="imagepull", steps=2)
    _, cs = _container_state(c)
    assert cs.state.waiting.reason == "ErrImagePull"
    assert "failed to resolve reference" in cs.state.waiting.message


def test_exit1_stays_terminated(fake: Cluster):
    c, ctl = fake.client, fake.controller
    c.apply(from_dict(deployment(replicas=1)))
    ctl.reconcile("ml", "web", outcome="exit1", steps=5, exit_code=3)
    _, cs = _container_state(c)
    assert (cs.state.terminated.exitCode, cs.state.terminated.reason, cs.restartCount) == (3, "Error", 0)


def test_unschedulable_pod_and_scheduler_event(fake: Cluster):
    c, ctl = fake.client, fake.controller
    c.apply(from_dict(deployment(replicas=1)))
    ctl.reconcile("ml", "web", outcome="unschedulable", steps=2)
    pod, cs = _container_state(c)
    assert cs is None and pod.status.phase == "Pending" and pod.spec.nodeName is None
    [cond] = pod.status.conditions
    assert (cond.type, cond.status, cond.reason) == ("PodScheduled", "False", "Unschedulable")
    assert cond.message.startswith("0/3 nodes are available: 3 Insufficient cpu. preemption: ")
    [event] = c.list(Event, fields={"involvedObject.name": pod.metadata.name, "reason": "FailedScheduling"})
    assert event.type == "Warning" and event.reportingComponent == "default-scheduler"


def test_failed_create_event_and_replica_failure(fake: Cluster):
    c, ctl = fake.client, fake.controller
    c.apply(from_dict(deployment(replicas=1)))
    dep = ctl.reconcile("ml", "web", outcome="failedcreate", steps=2)
    [rs] = c.list(ReplicaSet)
    assert _pods(c) == []
    [event] = c.list(Event, fields={"involvedObject.kind": "ReplicaSet", "involvedObject.name": rs.metadata.name})
    assert (event.type, event.reason, event.count) == ("Warning", "FailedCreate", 2)
    assert event.message.startswith(f'Error creating: pods "{rs.metadata.name}-" is forbidden: exceeded quota: ')
    conds = {x["type"]: x for x in dep["status"]["conditions"]}
    assert conds["ReplicaFailure"]["reason"] == "FailedCreate"
    assert rs.status.conditions[0].type == "ReplicaFailure"


def test_progress_deadline(fake: Cluster):
    c, ctl = fake.client, fake.controller
    c.apply(from_dict(deployment(replicas=1)))
    dep = ctl.reconcile("ml", "web", outcome="deadline", steps=3)
    progressing = dep["status"]["conditions"][1]
    assert (progressing["status"], progressing["reason"]) == ("False", "ProgressDeadlineExceeded")
    assert progressing["message"] == f'ReplicaSet "{c.list(ReplicaSet).__iter__().__next__().metadata.name}" has timed out progressing.'
    pod, cs = _container_state(c)
    assert cs.state.running is not None and not cs.ready


def test_expire_deadline_any_time_and_recovery_by_a_new_template(fake: Cluster):
    c, ctl = fake.client, fake.controller
    c.apply(from_dict(deployment(replicas=2)))
    ctl.reconcile("ml", "web", outcome="imagepull", steps=3)
    dep = ctl.expire_deadline("ml", "web")
    assert dep["status"]["conditions"][1]["reason"] == "ProgressDeadlineExceeded"
    c.apply(from_dict(deployment(replicas=2, image="registry.k8s.io/pause:3.9")))
    dep = ctl.settle("ml", "web")
    assert dep["status"]["conditions"][1]["reason"] == "NewReplicaSetAvailable"
    assert {p.spec.containers[0].image for p in _pods(c)} == {"registry.k8s.io/pause:3.9"}


def test_delete_deployment_takes_its_replicasets_and_pods(fake: Cluster):
    c, ctl = fake.client, fake.controller
    c.apply(from_dict(deployment(replicas=2)))
    ctl.settle("ml", "web")
    c.delete(Deployment, "web")
    assert list(c.list(ReplicaSet)) == [] and _pods(c) == []


def test_background_controller_and_a_watching_client(fake: Cluster):
    c, ctl = fake.client, fake.controller
    ctl.run(interval=0.01)
    try:
        created = c.apply(from_dict(deployment(replicas=2)))
        for kind, dep in c.watch(Deployment, fields={"metadata.name": "web"},
                                 resource_version=created.metadata.resourceVersion, server_timeout=5):
            conds = {x.type: x.reason for x in (dep.status.conditions or [])} if dep.status else {}
            if conds.get("Progressing") == "NewReplicaSetAvailable":
                break
        assert dep.status.availableReplicas == 2
    finally:
        ctl.stop()


def test_merge_and_strategic_patches_record_their_manager(fake: Cluster):
    c = fake.client
    c.apply(from_dict(deployment(env=[{"name": "A", "value": "1"}])))
    patched = c.patch(Deployment, "web", {"spec": {"template": {"spec": {"containers": [
        {"name": "main", "env": [{"name": "B", "value": "2"}]}]}}}}, field_manager="kubectl-set")
    assert [e.name for e in patched.spec.template.spec.containers[0].env] == ["A", "B"]
    assert patched.metadata.generation == 2
    entry = managers(patched)["kubectl-set"]
    env = entry["f:spec"]["f:template"]["f:spec"]["f:containers"]['k:{"name":"main"}']["f:env"]
    assert 'k:{"name":"B"}' in env and 'k:{"name":"A"}' not in env
    op = next(m for m in patched.metadata.managedFields if m.manager == "kubectl-set").operation
    assert op == "Update"


def test_status_subresource_is_separate(fake: Cluster):
    c = fake.client
    c.apply(from_dict(deployment()))
    fake.kube.set_status("Deployment", "ml", "web", {"observedGeneration": 1, "replicas": 2})
    with_status = copy.deepcopy(deployment(replicas=3))
    with_status["status"] = {"replicas": 99}
    got = c.apply(from_dict(with_status))
    assert got.status.replicas == 2 and got.spec.replicas == 3
    status_entry = next(m for m in got.metadata.managedFields if m.manager == "kube-controller-manager")
    assert status_entry.subresource == "status"
