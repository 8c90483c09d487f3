"""Environment layers with BuildKit on the real engine (issue 18): uv installs the lock
from a cache mount, so adding a package downloads that package alone; the image holds
what a from-scratch build of the same lock holds (and nothing of the cache); a tampered
hash still stops the build; offline packages build with ``--network none`` with either
Dockerfile; the classic builder stays the fallback.

One small project (three small packages, a model file and schema samples, so that its
final stage has ten steps and BuildKit pads their numbers: ``[stage-1  3/10]``), built
through the module in the order of the tests. Its base image is python:3.11-slim under
a tag of this run's own: the uv cache mount is one per base image (its id names the
base), so this module's starts empty and is its alone; the tag, that cache mount and the
build cache of the steps made on top of it are removed at the end.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.docker

TEST_LABEL = "dev.mlbuild.test"
SPEC = "idna\ncertifi\npyparsing\n"
SCORE = "def init():\n    pass\n\n\ndef run(data):\n    return {'echo': data}\n"
MANIFEST = """\
name: bk{run_id}
models:
  m:
    path: models/m.txt
environments:
  tiny:
    requirements: envs/requirements.txt
    base_image: {base}
services:
  echo:
    entry_script: score.py
    environment: tiny
    models: [m]
    schema: {{input: samples/input.json, output: samples/output.json}}
targets:
  local: {{type: docker, port: {port}}}
  bundle: {{type: package, out: dist/package, offline: true}}
"""
# The distributions, and every file of site-packages and of the scripts folder but
# bytecode (the warm-up layer compiles what a start imports, the same in both images).
CONTENT = r"""
import importlib.metadata as md, json, os, sysconfig
dists = sorted((d.metadata["Name"].lower(), d.version) for d in md.distributions())
files = []
for key in ("purelib", "scripts"):
    top = sysconfig.get_path(key)
    for root, dirs, names in os.walk(top):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for n in names:
            p = os.path.join(root, n)
            files.append([os.path.relpath(p, top), key, os.lstat(p).st_size])
print(json.dumps({"dists": dists, "files": sorted(files)}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Project:
    def __init__(self, root: Path, name: str):
        self.root = root
        self.name = name
        self.tag = ""  # of the last image built

    def mlbuild(self, *args, check: int | None = 0, env: dict | None = None):
        import os

        r = subprocess.run([sys.executable, "-m", "mlbuild", *args], cwd=self.root,
                           capture_output=True, text=True, timeout=600,
                           env={**os.environ, **(env or {})})
        if check is not None:
            assert r.returncode == check, f"mlbuild {' '.join(args)} -> {r.returncode}\n" \
                                          f"{r.stdout}\n{r.stderr}"
        return r

    def build(self, env: dict | None = None) -> tuple[dict, str]:
        """``mlbuild --json build local``: the image step's outcome and the progress."""
        r = self.mlbuild("--json", "build", "local", env=env)
        out = json.loads(r.stdout)
        image = next(s for s in out["steps"] if s["id"] == "image:echo")
        if image["status"] == "ran":
            self.tag = tag_of(image["summary"])
        return image, r.stderr

    @property
    def context(self) -> Path:
        return self.root / ".mlbuild/contexts/echo"

    def build_log(self) -> str:
        return (self.root / ".mlbuild/logs/build-echo.log").read_text()


def counts(summary: str) -> tuple[int, int, str]:
    m = re.search(r"\((\d+) steps run, (\d+) cached; \d+ MB; (BuildKit|classic builder)\)", summary)
    assert m, summary
    return int(m.group(1)), int(m.group(2)), m.group(3)


def prepared(log: str) -> list[int]:
    """What uv said it downloaded and unpacked, per install ("Prepared N packages")."""
    return [int(n) for n in re.findall(r"Prepared (\d+) packages? in", log)]


def tag_of(summary: str) -> str:
    return summary.split()[1]


def run(tag: str, *cmd: str, network: str | None = None) -> subprocess.CompletedProcess:
    net = ["--network", network] if network else []
    return subprocess.run(["docker", "run", "--rm", *net, "--entrypoint", cmd[0], tag, *cmd[1:]],
                          capture_output=True, text=True, timeout=120)


def sized(files: list, unsized: str) -> list:
    """``files`` with the size of those named ``unsized`` left out."""
    return [[p, k, None if p.endswith("/" + unsized) else s] for p, k, s in files]


def content(tag: str) -> dict:
    r = run(tag, "python", "-c", CONTENT)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def project(tmp_path_factory, docker_client, base_image, run_id, engine):
    if not engine.buildkit_available():
        pytest.skip("this engine does not build with BuildKit through its API")
    base = f"mlbuild-it-bk{run_id}-base:1"
    docker_client.images.get(base_image).tag(base.split(":")[0], "1")
    root = tmp_path_factory.mktemp("buildkit") / "bk"
    files = {
        "mlproject.yaml": MANIFEST.format(run_id=run_id, base=base, port=free_port()),
        "envs/requirements.txt": SPEC,
        "score.py": SCORE,
        "models/m.txt": "a model\n",
        "samples/input.json": '{"data": 1}\n',
        "samples/output.json": '{"echo": {"data": 1}}\n',
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    p = Project(root, f"bk{run_id}")
    yield p
    p.mlbuild("clean", "--images", "--keep", "0", check=None)
    try:
        docker_client.images.remove(base)
    except Exception:  # noqa: BLE001  a tag still in use by a leftover: the session clean-up
        pass
    prune_build_cache(docker_client, base)


def prune_build_cache(client, name: str) -> None:
    """Remove from the engine's build cache the records whose step names ``name`` (the
    environment's step echoes its uv cache id, which names this module's base tag; the
    uv cache mount itself) and every record made on top of them, children first. (The
    steps below them, made on python:3.11-slim's layers, are other builds' cache too.)"""
    recs = {r["ID"]: r for r in client.df().get("BuildCache") or []}
    doomed = {i for i, r in recs.items() if name in (r.get("Description") or "")}
    grew = True
    while grew:
        more = {i for i, r in recs.items() if i not in doomed and r.get("Parent") in doomed}
        doomed |= more
        grew = bool(more)
    while doomed:
        parents = {recs[i].get("Parent") for i in doomed}
        leaves = [i for i in doomed if i not in parents]
        if not leaves:
            break
        for i in leaves:
            client.api.prune_builds(filters={"id": [i]})
            doomed.discard(i)


def test_build_counts_every_step_and_fills_the_cache(project, docker_client):
    image, progress = project.build()
    assert image["status"] == "ran"
    built, cached, builder = counts(image["summary"])
    assert builder == "BuildKit"
    # Every step but the FROMs, counted: 1 in the uv stage, 9 in the final one, whose
    # numbers BuildKit pads ("[stage-1  3/10]"). The uv stage and the user's step may
    # be cache hits (BuildKit keys them by the base's layers, which other builds share).
    assert built + cached == 10 and built >= 8, image["summary"]
    shown = re.findall(r"^    echo \[(\d+)/(\d+)\] (.*)$", progress, re.M)
    assert max(int(total) for _, total, _ in shown) == 12, progress
    assert any(i.startswith("RUN rm -rf /opt/mlbuild-build") for *_, i in shown)  # warm-up
    # A fresh cache: uv downloaded the lock's packages and the runtime's requirements.
    assert sum(prepared(project.build_log())) >= 3 + 3
    # The context, uploaded for this build alone, does not stay in the build cache.
    # (Another build running meanwhile holds its own upload "in use".)
    assert [r["Description"] for r in docker_client.df().get("BuildCache") or []
            if not r.get("InUse")
            and (r.get("Description") or "").startswith("http url http://build-context-")] == []


def env_steps(progress: str) -> list[str]:
    """The environment steps that ran: ``base`` (the lock's layer with the runtime's
    requirements) and ``delta`` (the lock's changes since, mlbuild/envlayers.py)."""
    shown = re.findall(r"^    echo \[\d+/\d+\] (.*)$", progress, re.M)
    return ["delta" if i.startswith("RUN --mount=type=bind,source=env,target=/srv") else "base"
            for i in shown if "--mount=type=cache" in i or "target=/srv" in i]


def test_adding_a_package_downloads_and_installs_that_package_alone(project):
    spec = project.root / "envs/requirements.txt"
    spec.write_text(spec.read_text() + "six\n")
    image, progress = project.build()
    assert image["status"] == "ran"
    built, cached, builder = counts(image["summary"])
    # The uv stage, the user, the environment's base layer: cached (the runtime and the
    # warm-up too, unless mlbuild's runtime changed between the builds). The delta layer
    # runs, and the layers above it (models, samples, app).
    assert builder == "BuildKit" and cached >= 3, image["summary"] + progress
    assert env_steps(progress) == ["delta"], progress
    log = project.build_log()
    assert prepared(log) == [1], log  # six alone fetched from the index ...
    assert re.search(r"^#\d+ Installed 1 package in", log, re.M), log  # ... and installed
    assert " + six==" in log
    assert (project.context / "env/delta.lock.txt").read_text().startswith("six==")
    r = run(tag_of(image["summary"]), "python", "-c", "import six, idna, certifi, pyparsing, uvicorn")
    assert r.returncode == 0, r.stderr
    # six comes with its bytecode (the delta compiles what it installs).
    r = run(tag_of(image["summary"]), "python", "-c",
            "import six, importlib.util as u, os; print(os.path.exists(u.cache_from_source(six.__file__)))")
    assert r.stdout.strip() == "True", r.stdout + r.stderr


def test_image_equals_a_from_scratch_build_and_holds_nothing_of_the_cache(project, engine, run_id):
    tag = project.tag
    scratch = f"mlbuild-it/bk-scratch:{run_id}"
    # From scratch: the context's other Dockerfile, the classic builder, no cache at all.
    res = engine.build(project.context, scratch, labels={TEST_LABEL: run_id}, builder="classic",
                       dockerfile="Dockerfile", nocache=True)
    assert res.cached == 0
    a, b = content(tag), content(scratch)
    assert a["dists"] == b["dists"]
    assert {n for n, _ in a["dists"]} >= {"idna", "certifi", "pyparsing", "six", "uvicorn"}
    assert a["files"] == b["files"]
    r = run(tag, "sh", "-c", "ls -d /opt/mlbuild-build /opt/mlbuild-root /opt/mlbuild-uv "
                             "/root/.cache/uv /opt/mlbuild-env 2>/dev/null; true")
    assert r.stdout == ""  # no mount point, staging tree, installer or cache left
    size_a, size_b = engine.image_info(tag).size, engine.image_info(scratch).size
    assert abs(size_a - size_b) < 0.02 * size_b, (size_a, size_b)


def test_removing_and_downgrading_in_the_delta_equals_a_from_scratch_build(project, engine,
                                                                          run_id):
    """The delta uninstalls what the base has that the lock no longer wants: a package
    removed, and one at another version (the base's copy is hidden, the lock's shown)."""
    spec = project.root / "envs/requirements.txt"
    spec.write_text("idna==3.6\ncertifi\nsix\n")  # pyparsing gone, idna older
    image, progress = project.build()
    assert env_steps(progress) == ["delta"], progress
    ctx = project.context
    assert (ctx / "env/delta.remove.txt").read_text().split() == ["idna", "pyparsing"]
    assert re.findall(r"^(\S+)==", (ctx / "env/delta.lock.txt").read_text(), re.M) == \
        ["idna", "six"]
    scratch = f"mlbuild-it/bk-scratch2:{run_id}"
    engine.build(ctx, scratch, labels={TEST_LABEL: run_id}, builder="classic",
                 dockerfile="Dockerfile", nocache=True)
    a, b = content(project.tag), content(scratch)
    assert a["dists"] == b["dists"]
    assert ["idna", "3.6"] in a["dists"] and "pyparsing" not in {n for n, _ in a["dists"]}
    assert a["files"] == b["files"]
    r = run(project.tag, "python", "-c", "import idna; print(idna.__version__)")
    assert r.stdout.strip() == "3.6", r.stdout + r.stderr
    assert run(project.tag, "python", "-c", "import pyparsing").returncode != 0


def test_putting_the_lock_back_uses_the_base_layer_alone(project):
    spec = project.root / "envs/requirements.txt"
    # The lock the base layer was made from (idna pinned: the lock step keeps 3.6,
    # the version the lock has, for an unpinned idna).
    base = (project.context / "env/base.lock.txt").read_text()
    idna = re.search(r"^idna==(\S+)", base, re.M).group(1)
    spec.write_text(SPEC.replace("idna\n", f"idna=={idna}\n"))
    image, progress = project.build()
    assert env_steps(progress) == [], progress  # every environment step cached
    assert not (project.context / "env/delta.lock.txt").exists()
    spec.write_text(SPEC + "six\n")  # as the next tests expect it
    image, progress = project.build()
    # The base layer is not made again; the delta layer is a cache hit, or (when its
    # lock differs from the first test's: the lock step may keep a version it chose
    # since) fetches no more than its own entries.
    assert "base" not in env_steps(progress), progress
    delta = (project.context / "env/delta.lock.txt").read_text()
    assert sum(prepared(project.build_log())) <= len(re.findall(r"^\S+==", delta, re.M))
    assert run(project.tag, "python", "-c", "import six").returncode == 0


def test_tampered_hash_stops_the_build_even_with_the_package_cached(project, engine, run_id,
                                                                    tmp_path):
    from mlbuild.errors import StepFailed

    ctx = tmp_path / "ctx"
    shutil.copytree(project.context, ctx)
    # six is in the full lock and in the delta layer's (the one BuildKit installs it from).
    tampered = 0
    for name in ("requirements.lock.txt", "base.lock.txt", "delta.lock.txt"):
        lock = ctx / "env" / name
        text = lock.read_text()
        entry = re.search(r"^six==\S+ \\\n(?:    --hash=sha256:[0-9a-f]{64}(?: \\)?\n)+", text,
                          re.M)
        if entry is None:
            continue
        bad = re.sub(r"sha256:([0-9a-f]{63})[0-9a-f]",
                     lambda m: f"sha256:{m.group(1)}{'0' if m.group(0)[-1] != '0' else '1'}",
                     entry.group(0))
        lock.write_text(text.replace(entry.group(0), bad))
        tampered += 1
    assert tampered == 2
    with pytest.raises(StepFailed) as ei:
        engine.build(ctx, f"mlbuild-it/bk-tampered:{run_id}", labels={TEST_LABEL: run_id},
                     builder="buildkit", dockerfile="Dockerfile.buildkit")
    assert "Hash mismatch" in str(ei.value) and "six" in str(ei.value)
    assert not engine.image_exists(f"mlbuild-it/bk-tampered:{run_id}")


def test_offline_package_builds_with_network_none(project, engine, offline, run_id):
    out = json.loads(project.mlbuild("--json", "deploy", "bundle").stdout)
    assert next(s for s in out["steps"] if s["id"] == "wheels:tiny")["status"] == "ran"
    pkg = project.root / "dist/package/echo"
    wheels = sorted(p.name for p in (pkg / "wheels").iterdir())
    assert any(n.startswith("uv-") for n in wheels), wheels  # the installer too
    # `docker build --network none` of the directory (its Dockerfile: any builder) ...
    r = offline.build(pkg, f"bk{run_id}-offline:classic")
    assert r.returncode == 0, r.stdout + r.stderr
    # ... and its Dockerfile.buildkit with BuildKit, also without a network.
    engine.build(pkg, f"bk{run_id}-offline:buildkit", labels={TEST_LABEL: run_id},
                 builder="buildkit", dockerfile="Dockerfile.buildkit", network_mode="none")
    for tag in (f"bk{run_id}-offline:classic", f"bk{run_id}-offline:buildkit"):
        r = run(tag, "sh", "-c", "test ! -e /opt/mlbuild-build && test ! -e /opt/mlbuild-env "
                                 "&& python -c 'import six, idna, uvicorn'", network="none")
        assert r.returncode == 0, tag + r.stdout + r.stderr
    a, b = content(f"bk{run_id}-offline:classic"), content(f"bk{run_id}-offline:buildkit")
    assert a["dists"] == b["dists"]
    # NOTE: uv records the time of a wheel it took from a folder (--find-links) in the
    # distribution's uv_cache.json (listed in its RECORD): its length may differ.
    assert sized(a["files"], "uv_cache.json") == sized(b["files"], "uv_cache.json")


def test_classic_builder_when_asked_or_when_buildkit_is_refused(project, engine, monkeypatch,
                                                               docker_client, capsys):
    from mlbuild import api
    from mlbuild.backends import docker as docker_backend

    tag = project.tag
    docker_client.images.remove(tag, force=True)
    image, progress = project.build(env={"MLBUILD_BUILDER": "classic"})
    assert counts(image["summary"])[2] == "classic builder"
    assert tag_of(image["summary"]) == tag  # the same tag whichever builder made it
    assert run(tag, "python", "-c", "import six").returncode == 0

    # An engine that refuses BuildKit (as one without it behind its API does): the
    # image step says so and builds with the classic builder.
    docker_client.images.remove(tag, force=True)
    real = docker_backend.DockerEngine.build
    asked = []

    def refusing(self, *args, builder="classic", **kw):
        asked.append(builder)
        if builder == "buildkit":
            raise docker_backend.BuildkitUnavailable(
                f"the engine at {self.address} does not build with BuildKit: invalid version 2")
        return real(self, *args, builder=builder, **kw)

    monkeypatch.setattr(docker_backend.DockerEngine, "build", refusing)
    monkeypatch.delenv("MLBUILD_BUILDER", raising=False)
    result = api.build(project.root, target="local")
    assert asked == ["buildkit", "classic"]
    image = next(o for o in result.outcomes if o.id == "image:echo")
    assert image.outputs["tag"] == tag and image.outputs["builder"] == "classic"
    assert "does not build with BuildKit: invalid version 2; building with the classic " \
           "builder" in capsys.readouterr().err
    assert engine.image_exists(tag)


def test_buildkit_where_the_engine_has_it():
    """The decision alone, on answers of GET /version (no engine needed)."""
    from mlbuild.backends.docker import _NO_BUILDKIT, DockerEngine

    class Api:
        def __init__(self, answer):
            self.answer = answer

        def version(self):
            return self.answer

    class Client:
        def __init__(self, answer):
            self.api = Api(answer)

    def has(answer) -> bool:
        return DockerEngine(Client(answer)).buildkit_available()

    docker = {"ApiVersion": "1.41", "Os": "linux", "Components": [{"Name": "Engine"}]}
    assert has(docker) and has({**docker, "ApiVersion": "1.52"})
    assert not has({**docker, "ApiVersion": "1.40"})  # Docker 19.03: no RUN --mount built in
    assert not has({**docker, "Os": "windows"})
    assert not has({**docker, "Components": [{"Name": "Podman Engine"}]})
    assert not has({})
    # What engines say when they refuse it.
    assert _NO_BUILDKIT.search("buildkit not supported by daemon")
    assert _NO_BUILDKIT.search("Dockerfile parse error line 12: Unknown flag: mount")
    assert not _NO_BUILDKIT.search('process "/bin/sh -c exit 3" did not complete successfully')
