"""services.NAME.workers, collect_model_data and tracing (issue 19, the manifest side):
validated (errors name file, line and field), turned into the runtime's variables
(MLBUILD_WORKERS, MLBUILD_COLLECT_MODEL_DATA + MLBUILD_MODEL_DATA_DIR, MLBUILD_TRACING)
and carried to every target: the image's last ENV (docker, package), the process
target's environment, the Deployment's; ``workers: auto`` counted from the cgroup CPU
quota (fake cgroup trees here; tests/integration/test_observability_docker.py runs a
real container with --cpus); tracing's OpenTelemetry extra in the image's runtime
requirements, the process target's venv and an offline target's wheels."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from unittools import BASIC_MANIFEST, Opened, make_project, run, statuses
from mlbuild.errors import ManifestError
from mlbuild.graph.executor import RAN, UP_TO_DATE
from mlbuild.graph.step import StepSpec
from mlbuild.kube.render import ServiceInput, render_target
from mlbuild.kube.settings import KubeSettings
from mlbuild.manifest import load_project
from mlbuild.manifest.model import MODEL_DATA_IN_IMAGE, ModelDataCollection, Service
from mlbuild.runtime.config import ServerOptions, available_cpus


def with_settings(text: str | None, manifest: str = BASIC_MANIFEST) -> str:
    """BASIC_MANIFEST with ``text`` (YAML lines at the service's indent) under svc."""
    base = textwrap.dedent(manifest)
    if text is None:
        return base
    lines = "".join(f"    {line}\n" for line in textwrap.dedent(text).strip().splitlines())
    return base.replace("    auth: key\n", f"    auth: key\n{lines}", 1)


def problems(tmp_path, text: str) -> list[str]:
    root = make_project(tmp_path / "p", text)
    with pytest.raises(ManifestError) as e:
        load_project(root / "mlproject.yaml")
    return [str(p) for p in e.value.problems]


def service(tmp_path, text: str | None, manifest: str = BASIC_MANIFEST) -> Service:
    root = make_project(tmp_path / "p", with_settings(text, manifest))
    return load_project(root / "mlproject.yaml").services["svc"]


# -- the schema and the model ----------------------------------------------------------

@pytest.mark.parametrize("setting, field, says", [
    ("workers: 0", "workers", "must be at least 1, got 0"),
    ("workers: -1", "workers", "must be at least 1, got -1"),
    ("workers: 65", "workers", "must be at most 64, got 65"),
    ("workers: many", "workers", "'many' must be a number of worker processes (1 to 64) or auto"),
    ("workers: 1.5", "workers", "expected a whole number or text, got 1.5"),
    ("workers: true", "workers", "expected a whole number or text, got true"),
    ("collect_model_data: yes please", "collect_model_data",
     "expected true or false or a mapping"),
    ("collect_model_data: {to: disk}", "collect_model_data.to",
     "'disk' is not one of folder, stdout"),
    ("collect_model_data: {to: folder, where: x}", "collect_model_data", "unknown key 'where'"),
    ("collect_model_data: {to: stdout, path: data}", "collect_model_data.path",
     "a path goes with to: folder, not to: stdout"),
    ("collect_model_data: {path: .mlbuild/data}", "collect_model_data.path",
     "inside .mlbuild/"),
    ("collect_model_data: {path: src/data}", "collect_model_data.path",
     "overlaps 'src' (source_dir)"),
    ("collect_model_data: {path: .}", "collect_model_data.path", "is the project folder"),
    ("tracing: 1", "tracing", "expected true or false, got 1"),
    ("tracing: on", "tracing", None),  # YAML 1.1's boolean: accepted
])
def test_a_bad_setting_is_refused_naming_file_line_and_field(tmp_path, setting, field, says):
    text = with_settings(setting)
    if says is None:
        root = make_project(tmp_path / "p", text)
        load_project(root / "mlproject.yaml")
        return
    found = problems(tmp_path, text)
    line = text.splitlines().index(f"    {setting}") + 1
    assert any(p.startswith(f"mlproject.yaml:{line}: services.svc.{field}: ") and says in p
               for p in found), found


def test_unset_changes_nothing_and_leaves_old_fingerprints_alone(tmp_path):
    svc = service(tmp_path, None)
    assert (svc.workers, svc.collect_model_data, svc.tracing) == (None, None, False)
    assert svc.runtime_env() == {} and svc.observability_env() == {}
    assert not {"workers", "collect_model_data", "tracing"} & set(svc.config())
    # Written as their defaults (false), they are left out of the config too.
    svc = service(tmp_path / "q", "collect_model_data: false\ntracing: false")
    assert not {"collect_model_data", "tracing"} & set(svc.config())


@pytest.mark.parametrize("setting, env, config", [
    ("workers: 3", {"MLBUILD_WORKERS": "3"}, {"workers": 3}),
    ("workers: auto", {"MLBUILD_WORKERS": "auto"}, {"workers": "auto"}),
    ("tracing: true", {"MLBUILD_TRACING": "1"}, {"tracing": True}),
    ("collect_model_data: true",
     {"MLBUILD_COLLECT_MODEL_DATA": "1", "MLBUILD_MODEL_DATA_DIR": MODEL_DATA_IN_IMAGE},
     {"collect_model_data": {"to": None, "path": None}}),
    ("collect_model_data: {to: stdout}",
     {"MLBUILD_COLLECT_MODEL_DATA": "1", "MLBUILD_MODEL_DATA_DIR": "-"},
     {"collect_model_data": {"to": "stdout", "path": None}}),
    ("collect_model_data: {path: ./data/../records/}",
     {"MLBUILD_COLLECT_MODEL_DATA": "1", "MLBUILD_MODEL_DATA_DIR": MODEL_DATA_IN_IMAGE},
     {"collect_model_data": {"to": "folder", "path": "records"}}),
    ("collect_model_data: {to: folder, path: /srv/records}",
     {"MLBUILD_COLLECT_MODEL_DATA": "1", "MLBUILD_MODEL_DATA_DIR": MODEL_DATA_IN_IMAGE},
     {"collect_model_data": {"to": "folder", "path": "/srv/records"}}),
])
def test_the_settings_become_the_runtimes_variables(tmp_path, setting, env, config):
    svc = service(tmp_path, setting)
    assert svc.runtime_env() == env
    for key, value in config.items():
        assert svc.config()[key] == value


def test_where_model_data_goes_on_each_target():
    on = ModelDataCollection()
    assert [on.destination(t) for t in ("process", "docker", "package", "kubernetes")] == \
        ["folder", "folder", "folder", "stdout"]
    assert on.runtime_env("kubernetes")["MLBUILD_MODEL_DATA_DIR"] == "-"
    assert on.runtime_env()["MLBUILD_MODEL_DATA_DIR"] == MODEL_DATA_IN_IMAGE  # the image's
    folder = ModelDataCollection(to="folder")
    assert folder.destination("kubernetes") == "folder"
    assert ModelDataCollection(to="stdout").destination("docker") == "stdout"


def test_workers_times_the_models_memory_must_fit_each_targets_limit(tmp_path):
    manifest = BASIC_MANIFEST.replace(
        "    tags: {area: test}\n", "    tags: {area: test}\n    resources: {memory_gb: 1}\n"
    ).replace("local: {type: docker, port: 6789}",
              "local: {type: docker, port: 6789, memory_gb: 2}").replace(
        "k8s: {type: kubernetes, namespace: ml}",
        "k8s: {type: kubernetes, namespace: ml, memory_gb_limit: 3}")
    found = problems(tmp_path, with_settings("workers: 4", manifest))
    assert any("services.svc.workers: 4 workers each load the models (1 GB by their "
               "resources): 4 GB, over the memory limit of target 'local' (2 GB): lower "
               "workers, or raise targets.local.memory_gb" in p for p in found), found
    assert any("over the memory limit of target 'k8s' (3 GB)" in p
               and "targets.k8s.memory_gb_limit" in p for p in found), found
    # Two fit the docker target's 2 GB but not... they do fit both: no problem.
    root = make_project(tmp_path / "q", with_settings("workers: 2", manifest))
    assert load_project(root / "mlproject.yaml").services["svc"].workers == 2


# -- workers: auto, from the cgroup CPU quota -----------------------------------------

def fake_tree(root: Path, cgroup: str, files: dict[str, str]) -> Path:
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(cgroup)
    for rel, text in files.items():
        p = root / "sys/fs/cgroup" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


@pytest.mark.parametrize("cgroup, files, affinity, cpus", [
    # cgroup v2, inside a container (its own cgroup is the mount's root)
    ("0::/\n", {"cpu.max": "150000 100000\n"}, 8, 2),  # 1.5 CPUs: rounded up
    ("0::/\n", {"cpu.max": "50000 100000\n"}, 8, 1),  # half a CPU: at least 1
    ("0::/\n", {"cpu.max": "400000 100000\n"}, 8, 4),
    ("0::/\n", {"cpu.max": "max 100000\n"}, 8, 8),  # no quota: the affinity
    ("0::/\n", {"cpu.max": "400000 100000\n"}, 2, 2),  # the affinity is smaller
    # cgroup v2 on the host: the tightest of the cgroup and its ancestors
    ("0::/a.slice/b.scope\n", {"cpu.max": "max 100000\n",
                               "a.slice/cpu.max": "300000 100000\n",
                               "a.slice/b.scope/cpu.max": "max 100000\n"}, 16, 3),
    # cgroup v1, as docker sets it up (its path is the host's: the mount is its own)
    ("12:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n",
     {"cpu,cpuacct/cpu.cfs_quota_us": "150000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
     8, 2),
    ("4:cpu:/docker/abc\n", {"cpu/cpu.cfs_quota_us": "-1\n",
                             "cpu/cpu.cfs_period_us": "100000\n"}, 8, 8),
    ("4:cpu:/k/pod/c\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n",
                          "cpu/k/pod/c/cpu.cfs_quota_us": "250000\n",
                          "cpu/k/pod/c/cpu.cfs_period_us": "100000\n"}, 8, 3),
    # nothing readable: the affinity
    ("", {}, 6, 6),
    ("0::/\n", {"cpu.max": "garbage\n"}, 6, 6),
])
def test_available_cpus_from_fake_cgroup_files(tmp_path, cgroup, files, affinity, cpus):
    root = fake_tree(tmp_path, cgroup, files)
    assert available_cpus(str(root), affinity=affinity) == cpus


def test_available_cpus_without_proc(tmp_path):
    assert available_cpus(str(tmp_path), affinity=3) == 3
    assert available_cpus() >= 1  # this machine


def test_mlbuild_workers_auto(monkeypatch):
    import mlbuild.runtime.config as config

    monkeypatch.setattr(config, "available_cpus", lambda: 5)
    assert ServerOptions.from_env({"MLBUILD_WORKERS": "auto"}).workers == 5
    assert ServerOptions.from_env({"MLBUILD_WORKERS": "AUTO"}).workers == 5
    assert ServerOptions.from_env({"WORKER_COUNT": "auto"}).workers == 5
    assert ServerOptions.from_env({"MLBUILD_WORKERS": "2"}).workers == 2
    assert ServerOptions.from_env({}).workers == 1
    with pytest.raises(ValueError, match="expected a number"):
        ServerOptions.from_env({"MLBUILD_WORKERS": "many"})
    # The runtime's (and mlbuild serve's) --workers takes auto too.
    from mlbuild.runtime.__main__ import build_parser

    assert build_parser().parse_args(["--workers", "auto"]).workers == 5
    assert build_parser().parse_args(["--worker_count", "3"]).workers == 3
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--workers", "0"])


# -- the image, the process target and the package -------------------------------------

ALL = """\
workers: 2
collect_model_data: true
tracing: true
"""


def test_the_image_declares_them_last_and_installs_the_otel_extra(tmp_path):
    root = make_project(tmp_path / "p", with_settings(ALL))
    out = {o.id: o for o in run(root, "bundle")}
    pkg = root / "dist/package/svc"
    dockerfile = (pkg / "Dockerfile").read_text()
    # The last instruction: a change of them copies no model and no source again.
    assert dockerfile.rstrip().endswith("\n".join([
        "ENV MLBUILD_WORKERS=2 \\",
        "    MLBUILD_COLLECT_MODEL_DATA=1 \\",
        f"    MLBUILD_MODEL_DATA_DIR={MODEL_DATA_IN_IMAGE} \\",
        "    MLBUILD_TRACING=1"]))
    # The folder the records go to, the image user's (after the source: no model or
    # source layer is built again when the setting changes).
    assert f"RUN mkdir -p {MODEL_DATA_IN_IMAGE}" in dockerfile
    assert dockerfile.index("COPY app/") < dockerfile.index(f"RUN mkdir -p {MODEL_DATA_IN_IMAGE}")
    reqs = (pkg / "env/runtime-requirements.txt").read_text()
    assert "uvicorn" in reqs and "opentelemetry-sdk" in reqs
    # The process target starts with the same variables (paths mapped by its step).
    env = out["context:svc"].outputs["env"]
    assert env["MLBUILD_WORKERS"] == "2" and env["MLBUILD_TRACING"] == "1"
    assert env["MLBUILD_MODEL_DATA_DIR"] == MODEL_DATA_IN_IMAGE
    # The package's README mounts a volume for the records and passes the endpoint on.
    readme = (pkg / "README.md").read_text()
    assert f"-v mlbuild-demo-svc-model-data:{MODEL_DATA_IN_IMAGE}" in readme
    assert "-e OTEL_EXPORTER_OTLP_ENDPOINT" in readme and "2 worker processes" in readme


def test_without_them_the_image_is_as_before_and_a_change_reruns_the_context(tmp_path):
    root = make_project(tmp_path / "p", with_settings(None))
    run(root, "bundle")
    pkg = root / "dist/package/svc"
    before = (pkg / "Dockerfile").read_text()
    assert "MLBUILD_WORKERS" not in before and "model-data" not in before
    assert "opentelemetry" not in (pkg / "env/runtime-requirements.txt").read_text()
    assert "model data" not in (pkg / "README.md").read_text()

    (root / "mlproject.yaml").write_text(with_settings("workers: auto"))
    out = statuses(run(root, "bundle"))
    assert out["context:svc"] == RAN
    assert (pkg / "Dockerfile").read_text().rstrip().endswith("ENV MLBUILD_WORKERS=auto")
    assert set(statuses(run(root, "bundle")).values()) == {UP_TO_DATE}

    (root / "mlproject.yaml").write_text(with_settings(None))
    run(root, "bundle")
    assert (pkg / "Dockerfile").read_text() == before


def test_to_stdout_makes_no_folder(tmp_path):
    root = make_project(tmp_path / "p", with_settings("collect_model_data: {to: stdout}"))
    run(root, "bundle")
    pkg = root / "dist/package/svc"
    dockerfile = (pkg / "Dockerfile").read_text()
    assert "RUN mkdir" not in dockerfile and "MLBUILD_MODEL_DATA_DIR=-" in dockerfile
    readme = (pkg / "README.md").read_text()
    assert "-v mlbuild-" not in readme and "docker logs" in readme


def test_where_the_process_and_docker_targets_put_the_records(tmp_path):
    from mlbuild.graph.steps.container import model_data_volume
    from mlbuild.graph.steps.process import model_data_dir

    root = make_project(tmp_path / "p", with_settings("collect_model_data: true"))
    p = load_project(root / "mlproject.yaml")
    svc, state = p.services["svc"], root / ".mlbuild"
    assert model_data_dir(p, state, "dev", svc) == state / "model-data" / "dev"
    assert model_data_volume(p, svc) == "mlbuild-demo-svc-model-data"
    root = make_project(tmp_path / "q", with_settings("collect_model_data: {path: records}"))
    p = load_project(root / "mlproject.yaml")
    assert model_data_dir(p, root / ".mlbuild", "dev", p.services["svc"]) == root / "records"
    assert model_data_volume(p, p.services["svc"]) == str(root / "records")
    root = make_project(tmp_path / "r", with_settings("collect_model_data: {to: stdout}"))
    p = load_project(root / "mlproject.yaml")
    assert model_data_dir(p, root / ".mlbuild", "dev", p.services["svc"]) is None
    assert model_data_volume(p, p.services["svc"]) is None


def test_running_steps_name_collection_only_when_set(tmp_path):
    """A path is no part of the image: the process and container steps restart for it."""
    from mlbuild.graph.steps.container import ContainerStep
    from mlbuild.graph.steps.process import ProcessStep

    for text, present in ((None, False), ("collect_model_data: {path: a}", True)):
        root = make_project(tmp_path / str(present), with_settings(text))
        o = Opened(root)
        try:
            for cls, target in ((ProcessStep, "dev"), (ContainerStep, "local")):
                step = cls(StepSpec(f"x:{target}/svc", cls.kind,
                                    {"service": "svc", "target": target}, []))
                cfg = step.config(o.ctx(target))
                assert ("services.svc.collect_model_data" in cfg) is present
        finally:
            o.close()


def test_tracing_reaches_the_venv_and_wheels_only_for_a_target_that_runs_it(tmp_path):
    from mlbuild.graph.steps.venv import VenvStep
    from mlbuild.graph.steps.wheels import WheelsStep

    text = with_settings("tracing: true").replace(
        "bundle: {type: package, out: dist/package}",
        "bundle: {type: package, out: dist/package, services: []}")
    root = make_project(tmp_path / "p", text)
    o = Opened(root)
    try:
        venv = VenvStep(StepSpec("venv:env", "venv", {"environment": "env"}, []))
        wheels = WheelsStep(StepSpec("wheels:env", "wheels", {"environment": "env"}, []))
        assert venv.config(o.ctx("dev"))["tracing"] is True
        assert "-r" in venv._requirements(o.ctx("dev"))
        assert any(a.endswith("requirements-otel.txt") for a in venv._requirements(o.ctx("dev")))
        assert "<mlbuild>/runtime/requirements-otel.txt" in venv.inputs(o.ctx("dev"))
        assert wheels.config(o.ctx("local"))["tracing"] is True
        # A target without the tracing service: as before.
        assert "tracing" not in wheels.config(o.ctx("bundle"))
        assert "tracing" not in venv.config(o.ctx("bundle"))
    finally:
        o.close()


# -- kubernetes -------------------------------------------------------------------------

def deployment(settings: KubeSettings | None = None, **kw) -> dict:
    svc = ServiceInput(name="svc", image="r/demo-svc@sha256:" + "a" * 64, fingerprint="f", **kw)
    files = render_target("demo", [svc], settings or KubeSettings())
    return yaml.safe_load(files["svc-deployment.yaml"])


def env_of(dep: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom"))
            for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_kubernetes_deployment_env():
    env = env_of(deployment(workers=3, tracing=True, model_data="stdout"))
    assert env["MLBUILD_WORKERS"] == "3" and env["MLBUILD_TRACING"] == "1"
    assert env["MLBUILD_COLLECT_MODEL_DATA"] == "1" and env["MLBUILD_MODEL_DATA_DIR"] == "-"
    plain = env_of(deployment())
    assert not {"MLBUILD_WORKERS", "MLBUILD_TRACING", "MLBUILD_COLLECT_MODEL_DATA"} & set(plain)


def test_kubernetes_workers_auto_counts_the_cpu_limit_else_the_request():
    dep = deployment(KubeSettings(cpu=0.5, cpu_limit=2), workers="auto")
    assert dep["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] == "2"
    assert env_of(dep)["MLBUILD_WORKERS"] == "auto"  # the runtime reads the quota: 2
    dep = deployment(KubeSettings(cpu=1.5), workers="auto")
    resources = dep["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert "cpu" not in resources["limits"] and resources["requests"]["cpu"] == "1500m"
    assert env_of(dep)["MLBUILD_WORKERS"] == {"resourceFieldRef": {
        "containerName": "svc", "resource": "requests.cpu", "divisor": "1"}}


def test_kubernetes_model_data_to_a_folder_gets_an_emptydir():
    spec = deployment(model_data="folder")["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    assert mounts["model-data"] == MODEL_DATA_IN_IMAGE
    assert {"name": "model-data", "emptyDir": {}} in spec["volumes"]
    assert env_of(deployment(model_data="folder"))["MLBUILD_MODEL_DATA_DIR"] == \
        MODEL_DATA_IN_IMAGE
    assert "model-data" not in str(deployment(model_data="stdout")["spec"]["template"]
                                   ["spec"]["volumes"])


def test_kubernetes_objects_with_them_validate_strictly():
    kv = pytest.importorskip("kubernetes_validate")
    from mlbuild.kube.render import SUPPORTED_KUBERNETES

    for kw in ({"workers": "auto", "model_data": "folder", "tracing": True},
               {"workers": 4, "model_data": "stdout"}):
        for version in SUPPORTED_KUBERNETES:
            assert kv.validate(deployment(**kw), version, strict=True) == version


@pytest.mark.parametrize("kw", [{"workers": 0}, {"workers": "many"}, {"model_data": "disk"}])
def test_kubernetes_render_refuses_bad_values(kw):
    with pytest.raises(ValueError):
        deployment(**kw)


def test_kube_step_names_them_only_when_set_and_scales_the_memory_hint(tmp_path):
    from mlbuild.graph.steps.kube import KubeStep

    manifest = BASIC_MANIFEST.replace("name: demo", "name: demo\nregistry: 127.0.0.1:5000/ml")
    manifest = manifest.replace("    tags: {area: test}\n",
                                "    tags: {area: test}\n    resources: {memory_gb: 0.5}\n")
    for text, keys in ((None, set()),
                       (ALL, {"services.svc.workers", "services.svc.collect_model_data",
                              "services.svc.tracing"})):
        root = make_project(tmp_path / str(bool(text)), with_settings(text, manifest))
        o = Opened(root)
        try:
            step = KubeStep(StepSpec("k8s:k8s/svc", "k8s", {"service": "svc", "target": "k8s"}, []))
            cfg = step.config(o.ctx("k8s"))
            found = {k for k in cfg if k.split(".")[-1] in
                     ("workers", "collect_model_data", "tracing")}
            assert found == keys
            # Two workers load the models twice: the memory request follows.
            assert step._resources(o.ctx("k8s")).memory_gb == (1.0 if text else 0.5)
        finally:
            o.close()
