"""The kubernetes target end to end: the real image build and registry push, then
deploy/status/logs/down against the fake API server of tests/kubefake (no Kubernetes
API server can run here), whose controller stand-in moves each rollout along in the
background with the outcome a test chose.

One project (examples/diabetes, trained once, two services) is deployed through the
module, in the order of the tests: each test starts from the state the one before left.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for kubefake
from kubefake import Controller, KubeFake  # noqa: E402

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[2]
NS = "ml"


class Project:
    def __init__(self, root: Path, kube: KubeFake, kubeconfig: Path, name: str):
        self.root = root
        self.kube = kube
        self.kubeconfig = kubeconfig
        self.name = name

    def env(self, **extra) -> dict:
        import os

        env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG",)}
        env.update(KUBECONFIG=str(self.kubeconfig), MLBUILD_K8S_POLL="0.05")
        env.update(extra)
        return env

    def mlbuild(self, *args, check: int | None = 0, timeout: float = 900, **env):
        r = subprocess.run([sys.executable, "-m", "mlbuild", *args], cwd=self.root,
                           capture_output=True, text=True, timeout=timeout, env=self.env(**env))
        if check is not None:
            assert r.returncode == check, f"mlbuild {' '.join(args)} -> {r.returncode}\n" \
                                          f"{r.stdout}\n{r.stderr}"
        return r

    def deployment(self, service: str = "diabetes") -> dict | None:
        return self.kube.get("Deployment", NS, f"{self.name}-{service}")

    def set_manifest(self, pattern: str, repl: str) -> None:
        m = self.root / "mlproject.yaml"
        text = m.read_text()
        new = re.sub(pattern, repl, text, flags=re.M)
        assert new != text, pattern
        m.write_text(new)


def ran(out: dict) -> list[str]:
    return [s["id"] for s in out["steps"] if s["status"] == "ran"]


@pytest.fixture(scope="module")
def kube():
    with KubeFake() as fake:
        fake.add_namespace(NS)
        yield fake


@pytest.fixture(scope="module")
def ctl(kube):
    c = Controller(kube)
    c.run(interval=0.05)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def proj(tmp_path_factory, kube, ctl, docker_client, registry, base_image, run_id):
    root = tmp_path_factory.mktemp("k8s") / "diabetes"
    shutil.copytree(REPO / "examples/diabetes", root,
                    ignore=shutil.ignore_patterns("*.pkl", "dist", ".mlbuild", "__pycache__"))
    (root / "models").mkdir(exist_ok=True)
    subprocess.run([sys.executable, str(root / "train.py")], check=True, capture_output=True,
                   timeout=300)
    name = f"k{run_id}"
    m = root / "mlproject.yaml"
    text = m.read_text().replace("name: diabetes", f"name: {name}\nregistry: {registry}/k-{run_id}")
    # A second service with the same code: removed from the manifest by a later test.
    text = text.replace("\ntargets:", """
  second:
    entry_script: src/score.py
    source_dir: src
    environment: sklearn
    models: [ridge]
    auth: none

targets:""")
    text = text.replace("default_target: dev", f"""  staging: {{type: kubernetes, namespace: {NS}, replicas: 2, progress_deadline_s: 120}}
  gitops: {{type: kubernetes, namespace: {NS}, apply: false, services: [diabetes]}}
default_target: dev""")
    m.write_text(text)
    kubeconfig = kube.write_kubeconfig(root.parent / "kubeconfig")
    p = Project(root, kube, kubeconfig, name)
    yield p
    p.mlbuild("down", "staging", check=None)
    p.mlbuild("clean", "--images", "--keep", "0", check=None)


def test_deploy_applies_watches_and_records(proj, kube, ctl):
    ctl.set_outcome(NS, f"{proj.name}-diabetes", "ready")
    out = json.loads(proj.mlbuild("--json", "deploy", "staging").stdout)
    assert {"k8s:staging/diabetes", "k8s:staging/second", "push:diabetes"} <= set(ran(out))
    dep = proj.deployment()
    assert dep["status"]["availableReplicas"] == 2
    image = dep["spec"]["template"]["spec"]["containers"][0]["image"]
    assert re.fullmatch(rf".*/k-\w+/{proj.name}-diabetes@sha256:[0-9a-f]{{64}}", image)
    # Server-side apply, as field manager mlbuild, every object.
    applies = [r for r in kube.requests_to("PATCH")
               if r.content_type == "application/apply-patch+yaml"]
    assert applies and all(r.query.get("fieldManager") == "mlbuild" for r in applies)
    kinds = {r.path.split("/")[-2] for r in applies}
    assert {"deployments", "services", "secrets", "poddisruptionbudgets"} <= kinds
    # The files, with a kustomization, and never a key.
    out_dir = proj.root / "dist/staging"
    files = sorted(p.name for p in out_dir.iterdir())
    assert "kustomization.yaml" in files and "diabetes-deployment.yaml" in files
    keys = json.loads(proj.mlbuild("--json", "keys", "diabetes", "-t", "staging").stdout)
    for f in out_dir.iterdir():
        text = f.read_text()
        assert keys["primary"] not in text and keys["secondary"] not in text
    secret = kube.get("Secret", NS, f"{proj.name}-diabetes-keys")
    assert secret is not None and "keys" in secret["data"]


def test_noop_deploy_checks_the_live_deployment(proj, kube):
    before = len(kube.requests_to("PATCH"))
    r = proj.mlbuild("deploy", "staging")
    assert "up to date" in r.stdout, r.stdout
    assert len(kube.requests_to("PATCH")) == before  # nothing applied
    assert kube.requests_to("GET", f"/apis/apps/v1/namespaces/{NS}/deployments/"
                                   f"{proj.name}-diabetes")  # reality was asked


def test_status_and_logs(proj, kube, ctl):
    st = {s["service"]: s for s in json.loads(proj.mlbuild("--json", "status", "staging").stdout)}
    assert st["diabetes"]["state"] == "Healthy", st
    assert st["diabetes"]["detail"].startswith("2/2 ready")
    pods = kube.list("Pod", NS, labels=f"app.kubernetes.io/instance={proj.name}-diabetes")
    for pod in pods:
        ctl.log(pod["metadata"]["name"], "diabetes", f"hello from {pod['metadata']['name']}",
                namespace=NS)
    r = proj.mlbuild("logs", "diabetes", "-t", "staging")
    for pod in pods:
        name = pod["metadata"]["name"]
        assert f"[{name}] hello from {name}" in r.stdout, r.stdout
    # An unreachable cluster: status still answers, for every target, and says why.
    cfg = proj.root.parent / "unreachable-kubeconfig"
    cfg.write_text(proj.kubeconfig.read_text().replace(kube.url, "http://127.0.0.1:9"))
    st = json.loads(proj.mlbuild("--json", "status", KUBECONFIG=str(cfg)).stdout)
    k8s = [x for x in st if x["target"] == "staging" and x["service"] == "diabetes"]
    assert k8s and k8s[0]["state"] == "Unknown", st
    assert "cannot ask the cluster" in k8s[0]["detail"]
    # A ClusterIP service has no address from here: invoke says how to get one.
    r = proj.mlbuild("invoke", "diabetes", "-t", "staging", "--data", "{}", check=3)
    assert f"kubectl port-forward svc/{proj.name}-diabetes 8080:80 -n {NS}" in r.stderr
    assert "--url http://127.0.0.1:8080" in r.stderr


def test_crash_looping_release_fails_fast_and_rolls_back(proj, ctl):
    serving = proj.deployment()["spec"]["template"]["spec"]["containers"][0]["image"]
    score = proj.root / "src/score.py"
    score.write_text(score.read_text() + "\n# a new release\n")
    ctl.set_outcome(NS, f"{proj.name}-diabetes", "crashloop",
                    logs=["Traceback (most recent call last):", "ValueError: model file is gone"])
    started = time.monotonic()
    r = proj.mlbuild("deploy", "staging", check=1)
    assert time.monotonic() - started < 100  # fast, not the 120 s deadline
    # The first sign is enough: its first exit (status 1), before any back-off.
    assert re.search(r"Failed: pod \S+: container diabetes (exited with code 1|is crash-looping)",
                     r.stderr), r.stderr
    assert "ValueError: model file is gone" in r.stderr
    assert "rolled back" in r.stderr and "Traceback" in r.stderr
    ctl.set_outcome(NS, f"{proj.name}-diabetes", "ready")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the rollback rolls out
        dep = proj.deployment()
        if dep["spec"]["template"]["spec"]["containers"][0]["image"] == serving:
            break
        time.sleep(0.1)
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == serving


def test_next_deploy_after_a_fix_succeeds(proj, ctl):
    ctl.set_outcome(NS, f"{proj.name}-diabetes", "ready")
    out = json.loads(proj.mlbuild("--json", "deploy", "staging").stdout)
    # Nothing is built again: the failed step applies its objects once more (and the
    # second service, whose push the failure stopped, catches up).
    assert "k8s:staging/diabetes" in ran(out)
    assert set(ran(out)) <= {"k8s:staging/diabetes", "push:second", "k8s:staging/second"}


def test_unschedulable_says_the_schedulers_message(proj, ctl):
    score = proj.root / "src/score.py"
    score.write_text(score.read_text() + "\n# another release\n")
    name = f"{proj.name}-diabetes"
    ctl.set_outcome(NS, name, "unschedulable")
    p = subprocess.Popen([sys.executable, "-m", "mlbuild", "deploy", "staging"], cwd=proj.root,
                         env=proj.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        for line in p.stderr:  # mlbuild's own progress lines: it says so, and waits
            seen.append(line)
            if "rollout" in line and "Unschedulable:" in line:
                break
        assert any("Insufficient cpu" in ln for ln in seen), "".join(seen)
        time.sleep(0.5)
        assert p.poll() is None, "a deploy must wait while pods are unschedulable"
        # The world stands still, and the progress deadline passes (as the Deployment
        # controller writes it).
        ctl.stop()
        status = proj.deployment()["status"]
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        status["conditions"] = [c for c in status["conditions"] if c["type"] != "Progressing"]
        status["conditions"].append({
            "type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
            "message": f'ReplicaSet "{name}" has timed out progressing.',
            "lastUpdateTime": now, "lastTransitionTime": now})
        proj.kube.set_status("Deployment", NS, name, status)
        try:
            _, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
            raise AssertionError(f"deploy went on past the deadline:\n{err}\n"
                                 f"{json.dumps(proj.deployment()['status'], indent=1)}")
        err = "".join(seen) + err
    finally:
        if p.poll() is None:
            p.kill()
        ctl.run(interval=0.05)
    assert p.returncode == 1, err
    assert "Unschedulable" in err and "Insufficient cpu" in err, err
    assert "rolled back" in err
    ctl.set_outcome(NS, name, "ready")
    proj.mlbuild("deploy", "staging")


def test_ctrl_c_leaves_the_rollout_and_the_next_deploy_picks_it_up(proj, ctl):
    name = f"{proj.name}-diabetes"
    ctl.set_outcome(NS, name, "deadline")  # pods run, never ready: the rollout waits
    proj.set_manifest(r"replicas: 2", "replicas: 3")
    p = subprocess.Popen([sys.executable, "-m", "mlbuild", "deploy", "staging"], cwd=proj.root,
                         env=proj.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stderr:
            if "watching" in line or "rollout" in line:
                break
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "Traceback" not in err
    assert proj.deployment()["spec"]["replicas"] == 3  # applied, left as it was
    ctl.set_outcome(NS, name, "ready")
    out = json.loads(proj.mlbuild("--json", "deploy", "staging").stdout)
    assert "k8s:staging/diabetes" in ran(out)  # not recorded: picked up again
    assert all(sid.startswith("k8s:") for sid in ran(out)), ran(out)
    assert proj.deployment()["status"]["availableReplicas"] == 3


def test_conflict_with_another_field_manager_names_it(proj, kube):
    name = f"{proj.name}-diabetes"

    def edit(obj):
        obj["spec"]["replicas"] = 5
    kube.update("Deployment", NS, name, edit, manager="kubectl-edit")
    proj.set_manifest(r"replicas: 3", "replicas: 2")
    r = proj.mlbuild("deploy", "staging", check=1)
    assert "kubectl-edit" in r.stderr and ".spec.replicas" in r.stderr, r.stderr
    assert "--force-conflicts" in r.stderr
    proj.mlbuild("deploy", "staging", "--force-conflicts")
    assert proj.deployment()["spec"]["replicas"] == 2


def test_service_removed_from_the_manifest_is_deleted(proj, kube):
    foreign = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "not-ours", "namespace": NS,
                            "labels": {"app.kubernetes.io/instance": f"{proj.name}-second"}},
               "spec": {"ports": [{"port": 80}]}}
    kube.create(foreign, manager="kubectl")
    assert proj.deployment("second") is not None
    proj.set_manifest(r"^  second:\n(    .*\n)+", "")
    r = proj.mlbuild("deploy", "staging")
    assert "second" in r.stdout + r.stderr
    assert proj.deployment("second") is None
    assert kube.get("Service", NS, f"{proj.name}-second") is None
    assert kube.get("Service", NS, "not-ours") is not None  # not mlbuild's: left alone


def test_files_of_a_removed_service_leave_out(proj):
    # Recorded in out/mlbuild-written.json, so removed (the user's files are not).
    out = proj.root / "dist/staging"
    assert not list(out.glob("second-*")), sorted(p.name for p in out.iterdir())
    assert "second" not in (out / "kustomization.yaml").read_text()
    assert "second" not in (out / "mlbuild-written.json").read_text()
    assert "up to date" in proj.mlbuild("deploy", "staging").stdout


def test_gitops_mode_writes_files_only_and_prints_the_secret(proj, kube):
    before = len(kube.requests)
    out = json.loads(proj.mlbuild("--json", "deploy", "gitops").stdout)
    assert "k8s:gitops/diabetes" in ran(out)
    assert len(kube.requests) == before  # never talked to the cluster
    files = sorted(p.name for p in (proj.root / "dist/gitops").iterdir())
    assert files == ["diabetes-deployment.yaml", "diabetes-pdb.yaml", "diabetes-service.yaml",
                     "kustomization.yaml"] or "diabetes-deployment.yaml" in files
    secret = proj.mlbuild("keys", "diabetes", "-t", "gitops", "--secret").stdout
    assert "kind: Secret" in secret and f"name: {proj.name}-diabetes-keys" in secret
    assert "up to date" in proj.mlbuild("deploy", "gitops").stdout
    # A model's resources hint (what profile writes) sizes the requests.
    proj.set_manifest(r"^    framework_version: \"1.5\"\n",
                      '    framework_version: "1.5"\n    resources: {cpu: 1.5, memory_gb: 2}\n')
    out = json.loads(proj.mlbuild("--json", "deploy", "gitops").stdout)
    assert "k8s:gitops/diabetes" in ran(out)
    deployment = (proj.root / "dist/gitops/diabetes-deployment.yaml").read_text()
    assert re.search(r'cpu: "1500m"\s+memory: "2048Mi"', deployment), deployment


def test_gitops_out_keeps_the_users_files(proj, kube):
    # A fresh checkout of a GitOps folder that holds the user's own kustomization.
    out = proj.root / "dist/gitops"
    shutil.rmtree(out)
    out.mkdir()
    (out / "kustomization.yaml").write_text("resources: [mine.yaml]\n")
    (out / "mine.yaml").write_text("kind: ConfigMap\n")
    r = proj.mlbuild("deploy", "gitops", check=1)
    assert "dist/gitops/kustomization.yaml was not written by mlbuild" in r.stderr, r.stderr
    assert "hint: move it elsewhere" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["kustomization.yaml", "mine.yaml"]
    assert (out / "kustomization.yaml").read_text() == "resources: [mine.yaml]\n"
    # Moved away, the deploy writes its files beside the user's other one.
    (out / "kustomization.yaml").unlink()
    proj.mlbuild("deploy", "gitops")
    assert (out / "mine.yaml").read_text() == "kind: ConfigMap\n"
    assert "mine.yaml" not in (out / "kustomization.yaml").read_text()
    assert "up to date" in proj.mlbuild("deploy", "gitops").stdout


def test_down_deletes_exactly_what_mlbuild_applied(proj, kube):
    proj.mlbuild("down", "staging")
    assert proj.deployment() is None
    assert kube.get("Secret", NS, f"{proj.name}-diabetes-keys") is None
    assert kube.get("Service", NS, "not-ours") is not None
    st = json.loads(proj.mlbuild("--json", "status", "staging").stdout)
    assert all(s["state"] == "-" for s in st), st


@pytest.mark.parametrize("case", ["no-kubeconfig", "unknown-context", "unreachable",
                                  "unauthorized", "forbidden", "no-namespace"])
def test_cluster_problems_are_one_line_errors(proj, kube, tmp_path, case):
    env, expect = {}, None
    if case == "no-kubeconfig":
        env["KUBECONFIG"] = str(tmp_path / "missing")
        code, expect = 3, "no kubeconfig"
    elif case == "unknown-context":
        proj.set_manifest(r"staging: \{type: kubernetes,", "staging: {type: kubernetes, context: nope,")
        code, expect = 3, "no context 'nope'"
    elif case == "unreachable":
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cfg = tmp_path / "kubeconfig"
        cfg.write_text(proj.kubeconfig.read_text().replace(kube.url, f"http://127.0.0.1:{port}"))
        env["KUBECONFIG"] = str(cfg)
        code, expect = 2, "cannot reach the Kubernetes API"
    elif case == "unauthorized":
        env["KUBECONFIG"] = str(kube.write_kubeconfig(tmp_path / "kubeconfig", token="wrong"))
        code, expect = 2, "refused our credentials (401)"
    elif case == "forbidden":
        kube.forbid("deployments", verbs=["patch"], namespace=NS)
        code, expect = 2, "not allowed (403)"
    else:
        proj.set_manifest(r"staging: \{type: kubernetes, namespace: ml,",
                          "staging: {type: kubernetes, namespace: missing,")
        code, expect = 3, "namespace 'missing' does not exist"
    try:
        r = proj.mlbuild("deploy", "staging", "--force", check=code, **env)
    finally:
        kube.allow_all()
        text = (proj.root / "mlproject.yaml").read_text()
        text = text.replace("context: nope, ", "").replace("namespace: missing,", "namespace: ml,")
        (proj.root / "mlproject.yaml").write_text(text)
    assert expect in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("error:")]) == 1
