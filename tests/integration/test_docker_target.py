"""The docker target on the real engine and registry: deploy the demo and score through
the published port; no-op; an edit of score.py rebuilds one layer and replaces the
container; a new model reuses the environment layers; push, remove, deploy → pulled;
a broken release, or Ctrl-C while a release starts, leaves the old container serving;
a killed container shows Failed.

One project (examples/diabetes, trained once) is deployed through the module, in the
order of the tests: each test starts from the state the one before left.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Project:
    def __init__(self, root: Path, port: int):
        self.root = root
        self.url = f"http://127.0.0.1:{port}"

    def mlbuild(self, *args, check: int | None = 0, timeout: float = 900):
        r = subprocess.run([sys.executable, "-m", "mlbuild", *args], cwd=self.root,
                           capture_output=True, text=True, timeout=timeout)
        if check is not None:
            assert r.returncode == check, f"mlbuild {' '.join(args)} -> {r.returncode}\n" \
                                          f"{r.stdout}\n{r.stderr}"
        return r

    def deploy(self, check: int = 0) -> dict:
        r = self.mlbuild("--json", "deploy", "local", check=check)
        return json.loads(r.stdout) if check == 0 else {"stderr": r.stderr}

    def status(self) -> dict:
        return json.loads(self.mlbuild("--json", "status", "local").stdout)[0]

    def key(self) -> str:
        return json.loads(self.mlbuild("--json", "keys", "diabetes", "-t", "local").stdout)["primary"]

    def score(self) -> tuple[int, bytes]:
        body = (self.root / "samples/input.json").read_bytes()
        req = urllib.request.Request(self.url + "/score", data=body, headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {self.key()}"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()


def step(out: dict, sid: str) -> dict:
    return next(s for s in out["steps"] if s["id"] == sid)


def ran(out: dict) -> list[str]:
    return [s["id"] for s in out["steps"] if s["status"] == "ran"]


@pytest.fixture(scope="module")
def proj(tmp_path_factory, docker_client, registry, base_image, run_id):
    root = tmp_path_factory.mktemp("docker") / "diabetes"
    shutil.copytree(REPO / "examples/diabetes", root,
                    ignore=shutil.ignore_patterns("*.pkl", "dist", ".mlbuild", "__pycache__"))
    (root / "models").mkdir(exist_ok=True)
    subprocess.run([sys.executable, str(root / "train.py")], check=True, capture_output=True,
                   timeout=300)
    port = free_port()
    m = root / "mlproject.yaml"
    text = m.read_text().replace("name: diabetes", f"name: it{run_id}\nregistry: {registry}/it-{run_id}")
    m.write_text(re.sub(r"local:\s*\{type: docker, port: \d+\}",
                        f"local: {{type: docker, port: {port}, memory_gb: 1, cpu: 1}}", text))
    p = Project(root, port)
    yield p
    p.mlbuild("down", "local", check=None)
    p.mlbuild("clean", "--images", "--keep", "0", check=None)


def layers(client, tag: str) -> list[str]:
    return client.images.get(tag).attrs["RootFS"]["Layers"]


def test_deploy_and_score(proj, docker_client):
    out = proj.deploy()
    assert step(out, "image:diabetes")["status"] == "ran"
    assert step(out, "push:diabetes")["status"] == "ran"
    st = proj.status()
    assert st["state"] == "Healthy" and st["url"] == proj.url
    assert st["traffic"]["requests"] == 0  # read from the container's /metrics
    code, body = proj.score()
    assert code == 200 and len(json.loads(body)) == 2
    seen = proj.status()["traffic"]
    assert (seen["requests"], seen["errors"]) == (1, 0) and seen["p99_ms"] > 0
    attrs = docker_client.containers.get(_name(proj)).attrs
    assert attrs["Config"]["User"] == "mlbuild"
    assert attrs["HostConfig"]["Memory"] == 1024 * 1024 * 1024
    assert attrs["HostConfig"]["NanoCpus"] == 10**9
    # The key reaches the container as a mounted file, never through its environment.
    assert not any(proj.key() in e for e in attrs["Config"]["Env"])
    assert not any(proj.key() in v for v in attrs["Config"]["Labels"].values())


START_CHECK = """
import importlib.util, json, os, sys
sys.dont_write_bytecode = True
from mlbuild.runtime import server, scoring
from mlbuild.runtime.config import RuntimeConfig
scoring.load(RuntimeConfig.from_env()).init()
print(json.dumps(sorted(m.__file__ for m in list(sys.modules.values())
      if (getattr(m, "__file__", None) or "").endswith(".py")
      and not m.__file__.startswith(("/var/mlbuild/app/", "<"))
      and not os.path.exists(importlib.util.cache_from_source(m.__file__)))))
"""


def test_image_is_slim_yet_starts_without_compiling(proj, tmp_path):
    """The environment came without debug sections, tests, stubs or bytecode; the warm-up
    layer compiled exactly what a start imports (the runtime, the script, the model)."""
    tag = proj.status()["image"]
    site = "/usr/local/lib/python3.11/dist-packages"

    def run(*cmd, **kw):
        return subprocess.run(["docker", "run", "--rm", "-e", "MLBUILD_AUTH=none", tag, *cmd],
                              capture_output=True, timeout=120, **kw)

    r = run("python", "-c", START_CHECK, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []  # nothing compiled at start
    r = run("sh", "-c", f"cd {site} && find . -name tests -type d; find . -name '*.pyi' "
                        "-o -name '*.pxd' -o -name '*.h' | head -3; "
                        "test -d sklearn/linear_model/__pycache__ && echo hot-compiled; "
                        "test -d sklearn/ensemble/__pycache__ || echo cold-not-compiled",
            text=True)
    assert r.stdout.split() == ["hot-compiled", "cold-not-compiled"], r.stdout + r.stderr
    so = tmp_path / "multiarray.so"
    so.write_bytes(run("sh", "-c", f"cat {site}/numpy/_core/_multiarray_umath*.so").stdout)
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) is not installed: cannot read the sections")
    sections = subprocess.run([readelf, "-S", "-W", str(so)], capture_output=True, text=True)
    assert ".dynsym" in sections.stdout and ".text" in sections.stdout
    assert ".symtab" not in sections.stdout and ".debug" not in sections.stdout


def _name(proj) -> str:
    text = (proj.root / "mlproject.yaml").read_text()
    project = re.search(r"^name: (\S+)", text, re.M).group(1)
    return f"{project}-diabetes-local"


def test_noop_deploy_builds_and_restarts_nothing(proj, docker_client):
    before = docker_client.containers.get(_name(proj)).attrs
    out = proj.deploy()
    assert ran(out) == []
    after = docker_client.containers.get(_name(proj)).attrs
    assert after["Id"] == before["Id"] and after["State"]["StartedAt"] == before["State"]["StartedAt"]
    assert after["RestartCount"] == 0


def test_edit_score_rebuilds_one_layer_and_replaces_the_container(proj, docker_client):
    old_id = docker_client.containers.get(_name(proj)).id
    old_tag = proj.status()["image"]
    score = proj.root / "src/score.py"
    score.write_text(score.read_text() + "\n# an edit\n")
    # Requests keep being answered while the new container starts beside the old one.
    import threading

    stop, results, key = threading.Event(), [], proj.key()
    body = (proj.root / "samples/input.json").read_bytes()

    def hammer():
        while not stop.is_set():
            req = urllib.request.Request(proj.url + "/score", data=body, headers={
                "Content-Type": "application/json", "Authorization": f"Bearer {key}"})
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    results.append(r.status)
            except urllib.error.HTTPError as e:
                results.append(e.code)
            except OSError as e:
                results.append(repr(e))

    t = threading.Thread(target=hammer)
    t.start()
    try:
        out = proj.deploy()
    finally:
        stop.set()
        t.join()
    assert ran(out) == ["context:diabetes", "image:diabetes", "push:diabetes",
                        "container:local/diabetes"]
    statuses = [r for r in results if isinstance(r, int) and r != 200]
    errors = [r for r in results if not isinstance(r, int)]
    assert len(results) > 10 and statuses == [], statuses[:5]
    assert all("reset" in e.lower() for e in errors) and len(errors) <= 2, errors
    new_tag = proj.status()["image"]
    a, b = layers(docker_client, old_tag), layers(docker_client, new_tag)
    assert len(a) == len(b) and a[:-1] == b[:-1] and a[-1] != b[-1]  # the app layer only
    assert docker_client.containers.get(_name(proj)).id != old_id
    assert proj.score()[0] == 200
    # The old release was not waited for: retired as NAME-old, it finishes and exits by
    # itself, is never restarted, and `clean --images` removes it once stopped.
    import time

    retired = docker_client.containers.get(f"{_name(proj)}-old")
    assert retired.id == old_id
    assert retired.attrs["HostConfig"]["RestartPolicy"]["Name"] == "no"
    deadline = time.monotonic() + 60
    while retired.status != "exited" and time.monotonic() < deadline:
        time.sleep(0.2)
        retired.reload()
    assert retired.status == "exited" and retired.attrs["State"]["ExitCode"] == 0
    proj.mlbuild("clean", "--images", "--keep", "5")
    names = [c.name for c in docker_client.containers.list(all=True)]
    assert f"{_name(proj)}-old" not in names and _name(proj) in names


def test_new_model_reuses_the_environment_layers(proj, docker_client):
    old_tag = proj.status()["image"]
    model = proj.root / "models/sklearn_regression_model.pkl"
    with open(model, "ab") as fh:
        fh.write(b"\0")  # new bytes: a new version; still loads
    out = proj.deploy()
    assert "model:ridge" in ran(out)
    image = step(out, "image:diabetes")
    assert image["status"] == "ran"
    a, b = layers(docker_client, old_tag), layers(docker_client, proj.status()["image"])
    n_env = 6  # base, user, environment (from its builder stage), runtime, imports, warm-up
    assert a[:n_env] == b[:n_env]
    assert a[-3:] != b[-3:]
    assert proj.score()[0] == 200


def test_pushed_image_is_pulled_not_built(proj, docker_client):
    tag = proj.status()["image"]
    proj.mlbuild("down", "local")
    docker_client.images.remove(tag, force=True)
    out = proj.deploy()
    image = step(out, "image:diabetes")
    assert image["status"] == "ran" and image["summary"].startswith("pulled ")
    assert proj.score()[0] == 200


def test_failing_init_keeps_the_old_container_serving(proj, docker_client):
    old_id = docker_client.containers.get(_name(proj)).id
    score = proj.root / "src/score.py"
    good = score.read_text()
    score.write_text(good.replace("def init():\n", "def init():\n    raise RuntimeError('boom')\n"))
    try:
        r = proj.mlbuild("deploy", "local", check=1)
        assert "Failed" in r.stderr and "RuntimeError: boom" in r.stderr
        assert "the previous container keeps serving" in r.stderr
        assert "Traceback" not in r.stderr.split("Last lines")[0]
        assert docker_client.containers.get(_name(proj)).id == old_id
        assert proj.score()[0] == 200
        assert proj.status()["state"] == "Healthy"
        names = [c.name for c in docker_client.containers.list(all=True)]
        assert not any(n.endswith("-next") for n in names)
    finally:
        score.write_text(good)


def test_ctrl_c_while_the_new_release_starts_keeps_the_old_one(proj, docker_client):
    import signal

    old_id = docker_client.containers.get(_name(proj)).id
    score = proj.root / "src/score.py"
    score.write_text(score.read_text() + "\n# interrupted release\n")
    p = subprocess.Popen([sys.executable, "-m", "mlbuild", "deploy", "local"], cwd=proj.root,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stderr:  # the new container is being started: interrupt the wait
            if line.split()[:1] == ["starting"] and "-next" in line:
                p.send_signal(signal.SIGINT)
                break
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    names = [c.name for c in docker_client.containers.list(all=True)]
    assert not any(n.endswith("-next") for n in names), names
    assert docker_client.containers.get(_name(proj)).id == old_id
    assert proj.score()[0] == 200
    out = proj.deploy()  # the finished steps were recorded: only the release is left
    assert ran(out) == ["container:local/diabetes"], ran(out)
    assert docker_client.containers.get(_name(proj)).id != old_id
    assert proj.score()[0] == 200


def test_killed_container_shows_failed_and_deploy_restarts_it(proj, docker_client):
    proj.deploy()
    docker_client.containers.get(_name(proj)).kill()
    st = proj.status()
    assert st["state"] == "Failed" and "137" in st["detail"], st
    logged = [ln for ln in proj.mlbuild("logs", "diabetes", "-t", "local", "-n", "20")
              .stdout.splitlines() if ln.strip()]
    assert st["last_lines"] and st["last_lines"] == logged[-len(st["last_lines"]):]
    out = proj.deploy()
    assert "not running" in step(out, "container:local/diabetes")["reasons"][0]
    assert proj.status()["state"] == "Healthy"
    assert proj.mlbuild("logs", "diabetes", "-t", "local", "-n", "5").stdout.strip()


def test_package_with_image_tar(proj):
    import tarfile

    r = proj.mlbuild("deploy", "bundle", "--image-tar")
    tar = proj.root / "dist/package/diabetes.image.tar"
    assert "docker load -i dist/package/diabetes.image.tar" in r.stdout
    with tarfile.open(tar) as tf:
        assert "manifest.json" in tf.getnames()
    assert proj.mlbuild("--json", "deploy", "bundle", "--image-tar").stdout.count('"ran"') == 0
    proj.mlbuild("clean", "--packages")
    assert not tar.exists()



def test_offline_package_builds_without_network(proj, offline, run_id):
    out = json.loads(proj.mlbuild("--json", "deploy", "bundle", "--offline").stdout)
    wheels = step(out, "wheels:sklearn")
    assert wheels["status"] == "ran"
    pkg = proj.root / "dist/package/diabetes"
    assert "--no-index" in (pkg / "Dockerfile").read_text()
    tag = f"it{run_id}-offline:1"
    r = offline.build(pkg, tag)
    assert r.returncode == 0, r.stdout + r.stderr
    # Installed in a builder stage: the packages are in the image, the wheels are not.
    r = offline.run(tag, "sh", "-c",
                    "test ! -e /opt/mlbuild-env && python -c 'import sklearn, uvicorn'")
    assert r.returncode == 0, r.stdout + r.stderr
    # Fetched once: after clean, the same wheels come from the cache.
    first = wheels["summary"].split(" wheels")[0]
    names = sorted(p.name for p in (pkg / "wheels").iterdir())
    proj.mlbuild("clean")
    out = json.loads(proj.mlbuild("--json", "deploy", "bundle", "--offline").stdout)
    assert step(out, "wheels:sklearn")["summary"] == f"{first} wheels (0 downloaded)"
    assert sorted(p.name for p in (pkg / "wheels").iterdir()) == names


def test_models_resources_size_a_target_without_limits(proj, docker_client):
    # What `mlbuild profile --write` records: the models' resources are the limits of a
    # docker target that sets no cpu/memory_gb of its own (and only then).
    m = proj.root / "mlproject.yaml"
    before = m.read_text()
    try:
        text = re.sub(r"local: \{type: docker, port: (\d+), memory_gb: 1, cpu: 1\}",
                      r"local: {type: docker, port: \1}", before)
        m.write_text(text.replace("    tags: {area: diabetes, type: regression}\n",
                                  "    tags: {area: diabetes, type: regression}\n"
                                  "    resources: {cpu: 0.5, memory_gb: 0.75}\n"))
        out = proj.deploy()
        assert step(out, "container:local/diabetes")["status"] == "ran"
        host = docker_client.containers.get(_name(proj)).attrs["HostConfig"]
        assert (host["NanoCpus"], host["Memory"]) == (5 * 10**8, 768 * 1024 * 1024)
        assert proj.score()[0] == 200
        # The target's own limits win over the models'.
        m.write_text(before.replace("    tags: {area: diabetes, type: regression}\n",
                                    "    tags: {area: diabetes, type: regression}\n"
                                    "    resources: {cpu: 0.5, memory_gb: 0.75}\n"))
        proj.deploy()
        host = docker_client.containers.get(_name(proj)).attrs["HostConfig"]
        assert (host["NanoCpus"], host["Memory"]) == (10**9, 1024**3)
    finally:
        m.write_text(before)
