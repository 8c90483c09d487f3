"""services.NAME.max_body_mb: validated (the field named), turned into the runtime's
MLBUILD_MAX_BODY_BYTES, and carried to every target: the image (the last instruction of
its Dockerfile, so the package's too) and the process target's environment through the
context step, the Deployment's environment and the Ingress's nginx body size."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from unittools import BASIC_MANIFEST, Opened, make_project, run, statuses
from mlbuild.errors import ManifestError
from mlbuild.graph.executor import RAN, UP_TO_DATE
from mlbuild.kube.render import ServiceInput, body_size, render_target
from mlbuild.kube.settings import Ingress, KubeSettings
from mlbuild.manifest import load_project
from mlbuild.manifest.model import Service
from mlbuild.runtime.config import DEFAULT_MAX_BODY_BYTES, RuntimeConfig

MIB = 1024 * 1024


def with_limit(value: str | None) -> str:
    text = textwrap.dedent(BASIC_MANIFEST)
    return text if value is None else text.replace(
        "    auth: key\n", f"    auth: key\n    max_body_mb: {value}\n", 1)


@pytest.mark.parametrize("value, says", [
    ("0", "must be greater than 0, got 0"),
    ("-1", "must be greater than 0, got -1"),
    ("4096", "must be at most 1024, got 4096"),
    (".inf", "must be at most 1024, got .inf"),
    ("ten", "expected a number, got 'ten'"),
    ("true", "expected a number, got true"),
    ("[1]", "expected a number, got a list"),
])
def test_a_bad_limit_is_refused_naming_the_field(tmp_path, value, says):
    root = make_project(tmp_path / "p", with_limit(value))
    with pytest.raises(ManifestError) as e:
        load_project(root / "mlproject.yaml")
    found = [str(p) for p in e.value.problems]
    line = with_limit(value).splitlines().index(f"    max_body_mb: {value}") + 1
    assert f"mlproject.yaml:{line}: services.svc.max_body_mb: {says}" in found, found


@pytest.mark.parametrize("value, expected", [("1", MIB), ("0.5", MIB // 2), ("1024", 1024 * MIB),
                                             ("0.000001", 2)])
def test_the_limit_in_bytes(tmp_path, value, expected):
    root = make_project(tmp_path / "p", with_limit(value))
    svc = load_project(root / "mlproject.yaml").services["svc"]
    assert svc.max_body_bytes == expected  # MiB, rounded up
    assert svc.runtime_env() == {"MLBUILD_MAX_BODY_BYTES": str(expected)}
    assert svc.config()["max_body_mb"] == float(value)


def test_unset_leaves_the_runtime_default_and_old_fingerprints_alone(tmp_path):
    root = make_project(tmp_path / "p", with_limit(None))
    svc = load_project(root / "mlproject.yaml").services["svc"]
    assert svc.max_body_bytes is None and svc.runtime_env() == {}
    assert "max_body_mb" not in svc.config()


def test_the_image_and_the_process_get_it_and_a_change_reruns_the_context(tmp_path):
    root = make_project(tmp_path / "p", with_limit("2"))
    out = statuses(run(root, "bundle"))
    assert out["context:svc"] == RAN
    dockerfile = (root / "dist/package/svc/Dockerfile").read_text()
    lines = dockerfile.rstrip().splitlines()
    # The last instruction: a change of the limit copies no model and no source again.
    assert lines[-1] == f"ENV MLBUILD_MAX_BODY_BYTES={2 * MIB}"

    (root / "mlproject.yaml").write_text(with_limit("3"))
    out = statuses(run(root, "bundle"))
    assert out["context:svc"] == RAN and out["package:bundle/svc"] == RAN
    assert (root / "dist/package/svc/Dockerfile").read_text().rstrip().endswith(
        f"ENV MLBUILD_MAX_BODY_BYTES={3 * MIB}")

    (root / "mlproject.yaml").write_text(with_limit(None))
    run(root, "bundle")
    assert "MLBUILD_MAX_BODY_BYTES" not in (root / "dist/package/svc/Dockerfile").read_text()
    assert set(statuses(run(root, "bundle")).values()) == {UP_TO_DATE}


def test_the_context_env_is_what_the_process_target_starts_with(tmp_path):
    # The process step starts the runtime with the context step's "env" (paths mapped).
    root = make_project(tmp_path / "p", with_limit("0.25"))
    ctx = next(x for x in run(root, "bundle") if x.id == "context:svc")
    env = ctx.outputs["env"]
    assert env["MLBUILD_MAX_BODY_BYTES"] == str(MIB // 4)
    assert RuntimeConfig.from_env({**env, "MLBUILD_AUTH_KEYS": "k"}).max_body_bytes == MIB // 4


def test_kube_step_config_names_it_only_when_set(tmp_path):
    from mlbuild.graph.steps.kube import KubeStep
    from mlbuild.graph.step import StepSpec

    manifest = with_limit("5").replace("name: demo", "name: demo\nregistry: 127.0.0.1:5000/ml")
    root = make_project(tmp_path / "p", manifest)
    o = Opened(root)
    try:
        step = KubeStep(StepSpec("k8s:k8s/svc", "k8s", {"service": "svc", "target": "k8s"}, []))
        assert step.config(o.ctx("k8s"))["services.svc.max_body_mb"] == 5.0
    finally:
        o.close()
    root2 = make_project(tmp_path / "q", BASIC_MANIFEST.replace(
        "name: demo", "name: demo\nregistry: 127.0.0.1:5000/ml"))
    o = Opened(root2)
    try:
        step = KubeStep(StepSpec("k8s:k8s/svc", "k8s", {"service": "svc", "target": "k8s"}, []))
        assert not any("max_body" in k for k in step.config(o.ctx("k8s")))
    finally:
        o.close()


def _objects(max_body_bytes, ingress=True):
    svc = ServiceInput(name="svc", image="r/demo-svc@sha256:" + "a" * 64, fingerprint="f",
                       max_body_bytes=max_body_bytes)
    settings = KubeSettings(ingress=Ingress(host="h.example.com") if ingress else None)
    files = render_target("demo", [svc], settings)
    return {d["kind"]: d for name, text in files.items() if name != "kustomization.yaml"
            for d in [yaml.safe_load(text)]}


def test_kubernetes_deployment_env_and_ingress_body_size():
    objs = _objects(3 * MIB)
    env = {e["name"]: e.get("value") for e in
           objs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLBUILD_MAX_BODY_BYTES"] == str(3 * MIB)
    assert RuntimeConfig.from_env(env).max_body_bytes == 3 * MIB
    notes = objs["Ingress"]["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/proxy-body-size"] == "3m"
    assert "mlbuild.dev/fingerprint" in notes


def test_kubernetes_default_admits_what_the_runtime_admits():
    # ingress-nginx refuses bodies over 1m unless told: the runtime's default goes there.
    objs = _objects(None)
    env = {e["name"] for e in objs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "MLBUILD_MAX_BODY_BYTES" not in env  # the image's (or the runtime's default)
    assert objs["Ingress"]["metadata"]["annotations"][
        "nginx.ingress.kubernetes.io/proxy-body-size"] == "10m"
    assert DEFAULT_MAX_BODY_BYTES == 10 * MIB


@pytest.mark.parametrize("n, size", [(MIB, "1m"), (MIB // 2, "512k"), (1000, "1000"),
                                     (None, "10m"), (1024 * MIB, "1024m")])
def test_body_size_in_nginx_units(n, size):
    assert body_size(n) == size


def test_service_defaults():
    s = Service(name="s", environment="e")
    assert s.max_body_mb is None and s.runtime_env() == {}
