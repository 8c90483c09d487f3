"""The kubernetes target's objects (mlbuild/kube/render.py, templates/kubernetes/).

Golden files: each case's files (as ``render_target`` returns them, the out folder of a
deploy) concatenated into ``tests/unit/golden/kubernetes/<case>.yaml``, compared like the
Dockerfiles in test_golden.py:

    MLBUILD_UPDATE_GOLDEN=1 pytest tests/unit/test_kube_render.py   # rewrite them

Every rendered object, and the Secret of ``secret_object``, passes kubernetes-validate
--strict for the oldest and the newest supported Kubernetes (``SUPPORTED_KUBERNETES``);
the schemas ship inside the package, so this runs offline.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
import yaml

from test_golden import assert_golden
from unittools import EXAMPLES, REPO
from mlbuild.kube.render import (FINGERPRINT_ANNOTATION, KEYS_FILE, RUN_AS_UID,
                                 SUPPORTED_KUBERNETES, TEMPLATES, ServiceInput, cpu_quantity,
                                 labels, memory_quantity, render_service, render_target,
                                 secret_name, secret_object)
from mlbuild.kube.settings import (CONTAINER_PORT, GRACEFUL_STOP_S, HEALTH_PORT, Autoscale,
                                   Ingress, KubeSettings, Liveness)
from mlbuild.manifest.model import Model, Resources, resources_hint

kv = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[test]'")

REGISTRY = "127.0.0.1:5000/ml"
# The target the examples get here (not in their manifests): the root manifest's commented `staging`.
STAGING = KubeSettings(namespace="ml", replicas=2, cpu=1, memory_gb=1)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def image(project: str, service: str) -> str:
    return f"{REGISTRY}/{project}-{service}@sha256:{digest(project + '/' + service)}"


def service_input(project: str, name: str, **kw) -> ServiceInput:
    return ServiceInput(name=name, image=image(project, name),
                        fingerprint=digest(f"deploy:{project}/{name}"), **kw)


def example(name: str) -> tuple[str, list[ServiceInput]]:
    """An example's project name and services, read from its mlproject.yaml."""
    data = yaml.safe_load((EXAMPLES / name / "mlproject.yaml").read_text())
    models = {n: Model(name=n, path=m["path"],
                       resources=Resources(**m["resources"]) if m.get("resources") else None)
              for n, m in data["models"].items()}
    services = [service_input(data["name"], s, auth=spec.get("auth", "none"),
                              cors=tuple(spec.get("cors", ())),
                              resources=resources_hint(models[m.split("@")[0]]
                                                       for m in spec.get("models", ())))
                for s, spec in data["services"].items()]
    return data["name"], services


FULL = KubeSettings(
    namespace="scoring", port=8080, replicas=None,
    autoscale=Autoscale(min=2, max=6, target_cpu_percent=60),
    cpu=0.5, memory_gb=1, cpu_limit=2, memory_gb_limit=4, gpu=1,
    scoring_timeout_ms=30000, max_concurrent_requests=8, max_request_wait_ms=250,
    liveness=Liveness(period_s=15, initial_delay_s=0, timeout_s=3, failure_threshold=4),
    progress_deadline_s=900, service_type="LoadBalancer",
    ingress=Ingress(host="ml.example.com", class_name="nginx", tls_secret="ml-example-tls"),
    image_pull_secret="registry-credentials",
)


def case_full():
    # Everything at once: autoscale, ingress, GPU, pull secret, auth key, CORS, a hint.
    return "fraud", [service_input("fraud", "score", auth="key",
                                   cors=("https://app.example.com", "http://localhost:3000"),
                                   resources=Resources(cpu=1.5, memory_gb=2),
                                   max_body_bytes=50 * 1024 * 1024)], FULL


def case_plain():
    return "demo", [service_input("demo", "svc")], KubeSettings()


def case_replicas3():
    return "demo", [service_input("demo", "svc", auth="key")], \
        KubeSettings(namespace="ml", replicas=3)


CASES = {
    "example-diabetes": lambda: (*example("diabetes"), STAGING),
    "example-multi-model": lambda: (*example("multi-model"), STAGING),
    "example-onnx-nocode": lambda: (*example("onnx-nocode"), STAGING),
    "full": case_full,
    "plain": case_plain,
    "replicas3": case_replicas3,
}


def joined(files: dict[str, str]) -> str:
    return "".join(f"# ==> {name} <==\n{text}" for name, text in files.items())


def objects_of(project, services, settings) -> list[dict]:
    out = []
    for s in services:
        out += render_service(project, s.name, s.image, s.fingerprint, settings, auth=s.auth,
                              auth_secret=s.auth_secret, cors=s.cors, resources=s.resources,
                              max_body_bytes=s.max_body_bytes)
    return out


def by_kind(objs: list[dict]) -> dict[str, dict]:
    return {o["kind"]: o for o in objs}


def container(objs: list[dict]) -> dict:
    return by_kind(objs)["Deployment"]["spec"]["template"]["spec"]["containers"][0]


def env_of(objs: list[dict]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(objs)["env"]}


# -- golden files and validation ------------------------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
def test_kubernetes_golden(case):
    project, services, settings = CASES[case]()
    assert_golden(f"kubernetes/{case}.yaml", joined(render_target(project, services, settings)))


@pytest.mark.parametrize("version", SUPPORTED_KUBERNETES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_object_validates_strictly(case, version):
    project, services, settings = CASES[case]()
    objs = objects_of(project, services, settings)
    objs += [secret_object(project, s.name, settings.namespace, "p" * 43, "s" * 43)
             for s in services if s.auth == "key"]
    for obj in objs:
        # Raises ValidationError (a field unknown or misspelt: --strict) or
        # SchemaNotFoundError (a kind or apiVersion this Kubernetes does not have).
        assert kv.validate(obj, version, strict=True) == version, obj["kind"]


def test_supported_versions_are_shipped_by_kubernetes_validate():
    shipped = {".".join(v.split(".")[:2]) for v in kv.utils.all_versions()}
    assert set(SUPPORTED_KUBERNETES) <= shipped, (SUPPORTED_KUBERNETES, sorted(shipped))


def test_strict_validation_is_not_vacuous():
    project, services, settings = case_full()
    deployment = by_kind(objects_of(project, services, settings))["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kv.ValidationError, match="livenesProbe"):
        kv.validate(deployment, SUPPORTED_KUBERNETES[-1], strict=True)


def test_cli_validates_the_written_files(tmp_path):
    """`kubernetes-validate --strict` over the out folder, as a GitOps check would run it."""
    project, services, settings = case_full()
    files = render_target(project, services, settings)
    paths = []
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        if name != "kustomization.yaml":  # not a Kubernetes object
            paths.append(str(tmp_path / name))
    args = [a for v in SUPPORTED_KUBERNETES for a in ("-k", v)]
    r = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", *args, *paths],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARN" not in r.stdout and "ERROR" not in r.stdout, r.stdout
    assert r.stdout.count(" passed ") == len(paths) * len(SUPPORTED_KUBERNETES)


# -- the files --------------------------------------------------------------------------

def test_target_files_are_the_service_objects_with_a_kustomization():
    project, services, settings = case_full()
    files = render_target(project, services, settings)
    kustomization = yaml.safe_load(files.pop("kustomization.yaml"))
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["resources"] == list(files)  # every object file, in apply order
    parsed = [yaml.safe_load(text) for text in files.values()]
    assert parsed == objects_of(project, services, settings)
    assert [o["kind"] for o in parsed] == ["PodDisruptionBudget", "Service", "Deployment",
                                           "HorizontalPodAutoscaler", "Ingress"]
    assert list(files) == [f"score-{k}.yaml" for k in
                           ("pdb", "service", "deployment", "hpa", "ingress")]


def test_services_come_in_name_order_whatever_the_input_order():
    a, b = service_input("p", "alpha"), service_input("p", "beta")
    assert render_target("p", [b, a], KubeSettings()) == render_target("p", [a, b],
                                                                       KubeSettings())
    with pytest.raises(ValueError, match="twice"):
        render_target("p", [a, a], KubeSettings())


def test_rendered_files_never_hold_a_key():
    primary, secondary = "PRIMARYkey-" + "a" * 32, "SECONDARYkey-" + "b" * 30
    project, services, settings = case_full()
    files = render_target(project, services, settings)
    secret = secret_object(project, "score", settings.namespace, primary, secondary)
    forbidden = [primary, secondary, *secret["data"].values(),
                 base64.b64encode(primary.encode()).decode()[:20]]
    for name, text in files.items():
        for bad in forbidden:
            assert bad not in text, f"{name} holds key material"
        for obj in yaml.safe_load_all(text):
            assert obj["kind"] != "Secret"
    # The Deployment only names the Secret, and mounts its `keys` item.
    pod = by_kind(objects_of(project, services, settings))["Deployment"]["spec"]["template"]
    volume = next(v for v in pod["spec"]["volumes"] if "secret" in v)
    assert volume["secret"]["secretName"] == secret["metadata"]["name"] == \
        secret_name(project, "score")
    assert volume["secret"]["items"] == [{"key": "keys", "path": "keys"}]


def test_secret_holds_the_keys_file_the_runtime_reads(tmp_path):
    from mlbuild.runtime.config import read_keys_file

    secret = secret_object("demo", "svc", "ml", "k1", "k2")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data["primary"] == "k1" and data["secondary"] == "k2"
    (tmp_path / "keys").write_text(data["keys"])
    assert read_keys_file(str(tmp_path / "keys")) == ["k1", "k2"]
    assert secret["metadata"]["labels"] == labels("demo", "svc")
    assert Path(KEYS_FILE).name == "keys"


# -- what the objects say ---------------------------------------------------------------

def test_deployment_rollout_identity_and_image():
    project, services, settings = case_replicas3()
    objs = objects_of(project, services, settings)
    fingerprint = services[0].fingerprint
    for obj in objs:
        assert obj["metadata"]["name"] == "demo-svc"
        assert obj["metadata"]["namespace"] == "ml"
        assert obj["metadata"]["labels"] == {
            "app.kubernetes.io/name": "svc", "app.kubernetes.io/instance": "demo-svc",
            "app.kubernetes.io/part-of": "demo", "app.kubernetes.io/managed-by": "mlbuild"}
        assert obj["metadata"]["annotations"] == {FINGERPRINT_ANNOTATION: fingerprint}
    d = by_kind(objs)["Deployment"]
    assert d["spec"]["replicas"] == 3
    assert d["spec"]["strategy"] == {"type": "RollingUpdate",
                                     "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    selector = d["spec"]["selector"]["matchLabels"]
    assert selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
    assert by_kind(objs)["Service"]["spec"]["selector"] == selector
    assert by_kind(objs)["PodDisruptionBudget"]["spec"] == {
        "minAvailable": 1, "selector": {"matchLabels": selector}}
    # A changed fingerprint alone (say, another HPA maximum) restarts no pod.
    assert "annotations" not in d["spec"]["template"]["metadata"]
    assert container(objs)["image"] == services[0].image


def test_pod_runs_as_the_images_user_on_a_read_only_root():
    dockerfile = (REPO / "templates/Dockerfile.j2").read_text()
    assert f"--uid {RUN_AS_UID} " in dockerfile and f"--gid {RUN_AS_UID} " in dockerfile
    project, services, settings = case_plain()
    objs = objects_of(project, services, settings)
    pod = by_kind(objs)["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == RUN_AS_UID
    c = container(objs)
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]
    assert pod["terminationGracePeriodSeconds"] == GRACEFUL_STOP_S + 5


def test_probes_cover_init_then_watch_the_health_port():
    project, services, settings = case_full()
    c = container(objects_of(project, services, settings))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": CONTAINER_PORT, "health": HEALTH_PORT}
    startup, ready, live = c["startupProbe"], c["readinessProbe"], c["livenessProbe"]
    assert startup["httpGet"] == ready["httpGet"] == {"path": "/healthz/ready", "port": "health"}
    assert live["httpGet"] == {"path": "/healthz/live", "port": "health"}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= settings.progress_deadline_s
    lv = settings.liveness
    assert (live["initialDelaySeconds"], live["periodSeconds"], live["timeoutSeconds"],
            live["failureThreshold"], live["successThreshold"]) == \
        (lv.initial_delay_s, lv.period_s, lv.timeout_s, lv.failure_threshold,
         lv.success_threshold)


def test_the_runtime_reads_the_environment_the_deployment_sets(tmp_path):
    from mlbuild.runtime.config import RuntimeConfig, ServerOptions

    project, services, settings = case_full()
    env = env_of(objects_of(project, services, settings))
    assert env["MLBUILD_AUTH"] == "key" and env["MLBUILD_AUTH_KEYS_FILE"] == KEYS_FILE
    assert env["MLBUILD_MAX_CONCURRENT_REQUESTS"] == "8"
    assert env["MLBUILD_MAX_REQUEST_WAIT_MS"] == "250"
    (tmp_path / "keys").write_text("k1\nk2\n")  # where the Secret's `keys` item is mounted
    env["MLBUILD_AUTH_KEYS_FILE"] = str(tmp_path / "keys")
    config, options = RuntimeConfig.from_env(env), ServerOptions.from_env(env)
    assert (options.port, options.health_port) == (CONTAINER_PORT, HEALTH_PORT)
    assert options.graceful_timeout == GRACEFUL_STOP_S
    assert config.auth_keys == ("k1", "k2")
    assert config.cors_origins == services[0].cors
    assert config.max_body_bytes == services[0].max_body_bytes
    assert config.request_timeout == settings.scoring_timeout_ms / 1000
    assert config.service_name == "score"


def test_without_a_secret_the_deployment_leaves_auth_to_the_image():
    # Never MLBUILD_AUTH=none: an image built with auth: key then fails closed.
    project, services, settings = case_plain()
    objs = objects_of(project, services, settings)
    assert not {"MLBUILD_AUTH", "MLBUILD_AUTH_KEYS_FILE", "MLBUILD_CORS_ORIGINS",
                "MLBUILD_MAX_CONCURRENT_REQUESTS", "MLBUILD_MAX_BODY_BYTES"} & set(env_of(objs))
    assert [v["name"] for v in by_kind(objs)["Deployment"]["spec"]["template"]["spec"]
            ["volumes"]] == ["tmp"]


def test_autoscale_leaves_replicas_to_the_hpa():
    project, services, settings = case_full()
    kinds = by_kind(objects_of(project, services, settings))
    assert "replicas" not in kinds["Deployment"]["spec"]
    hpa = kinds["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": "fraud-score"}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 6)
    assert hpa["metrics"][0]["resource"]["target"] == {"type": "Utilization",
                                                       "averageUtilization": 60}


@pytest.mark.parametrize("settings, kinds", [
    (KubeSettings(), ["Service", "Deployment"]),
    (KubeSettings(replicas=2), ["PodDisruptionBudget", "Service", "Deployment"]),
    (KubeSettings(replicas=None, autoscale=Autoscale(min=1)),
     ["Service", "Deployment", "HorizontalPodAutoscaler"]),
    (KubeSettings(replicas=None, autoscale=Autoscale(min=2)),
     ["PodDisruptionBudget", "Service", "Deployment", "HorizontalPodAutoscaler"]),
    (KubeSettings(ingress=Ingress(host="h.example.com")), ["Service", "Deployment", "Ingress"]),
])
def test_which_objects(settings, kinds):
    objs = render_service("p", "s", image("p", "s"), "f" * 64, settings)
    assert [o["kind"] for o in objs] == kinds


def test_ingress_routes_the_service_path_to_its_service():
    project, services, settings = case_full()
    spec = by_kind(objects_of(project, services, settings))["Ingress"]["spec"]
    assert spec["ingressClassName"] == "nginx"
    assert spec["tls"] == [{"hosts": ["ml.example.com"], "secretName": "ml-example-tls"}]
    path = spec["rules"][0]["http"]["paths"][0]
    assert (spec["rules"][0]["host"], path["path"], path["pathType"]) == \
        ("ml.example.com", "/score", "Prefix")
    assert path["backend"]["service"] == {"name": "fraud-score", "port": {"name": "http"}}
    bare = render_service("p", "s", image("p", "s"), "f" * 64,
                          KubeSettings(ingress=Ingress(host="h.example.com")))[-1]["spec"]
    assert "tls" not in bare and "ingressClassName" not in bare


def test_resources_requests_limits_and_hint():
    project, services, settings = case_full()
    objs = objects_of(project, services, settings)
    c = container(objs)
    # The hint (1.5 CPU, 2 GB) is above the target's requests (0.5, 1): it wins.
    assert c["resources"] == {"requests": {"cpu": "1500m", "memory": "2048Mi"},
                              "limits": {"memory": "4096Mi", "cpu": "2",
                                         "nvidia.com/gpu": "1"}}
    assert by_kind(objs)["Deployment"]["spec"]["template"]["spec"]["imagePullSecrets"] == \
        [{"name": "registry-credentials"}]
    assert by_kind(objs)["Service"]["spec"]["type"] == "LoadBalancer"
    assert by_kind(objs)["Service"]["spec"]["ports"] == [
        {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}]
    # Defaults: memory limited to its request, CPU not limited, no GPU.
    plain = container(objects_of(*case_plain()))
    assert plain["resources"] == {"requests": {"cpu": "100m", "memory": "512Mi"},
                                  "limits": {"memory": "512Mi"}}
    # A hint above a limit lifts the limit too (a limit below its request is invalid).
    lifted = container(render_service("p", "s", image("p", "s"), "f" * 64,
                                      KubeSettings(memory_gb_limit=1, cpu_limit=0.5),
                                      resources=Resources(cpu=1, memory_gb=3)))
    assert lifted["resources"]["limits"] == {"memory": "3072Mi", "cpu": "1"}


def test_quantities_and_hint_sum():
    assert [cpu_quantity(c) for c in (0.1, 0.25, 1, 2.0, 1.5, 0.0001)] == \
        ["100m", "250m", "1", "2", "1500m", "1m"]
    assert [memory_quantity(g) for g in (0.5, 1, 1.5, 0.0001)] == \
        ["512Mi", "1024Mi", "1536Mi", "1Mi"]
    models = [Model("a", "a", resources=Resources(cpu=1, memory_gb=0.5)),
              Model("b", "b", resources=Resources(memory_gb=1)), Model("c", "c")]
    assert resources_hint(models) == Resources(cpu=1, memory_gb=1.5)
    assert resources_hint([Model("c", "c")]) is None


@pytest.mark.parametrize("project, service, img, auth, secret, match", [
    ("p", "s", f"{REGISTRY}/p-s:0123456789abcdef", "none", None, "pinned by digest"),
    ("p", "s", f"{REGISTRY}/p-s@sha256:abc", "none", None, "pinned by digest"),
    ("P", "s", None, "none", None, "DNS label"),
    ("p", "s_1", None, "none", None, "DNS label"),
    ("p", "s" * 62, None, "none", None, "DNS label"),
    ("p", "s", None, "token", None, "auth 'token'"),
    ("p", "s", None, "none", "p-s-keys", "auth: none"),
])
def test_bad_input_is_refused(project, service, img, auth, secret, match):
    with pytest.raises(ValueError, match=match):
        render_service(project, service, img or image("p", "s"), "f" * 64, KubeSettings(),
                       auth=auth, auth_secret=secret)


def test_values_cannot_break_the_yaml():
    odd = ("https://x.example.com", "http://a:1/#not-a-comment", "'quoted' \"twice\": {x}")
    objs = render_service("p", "s", image("p", "s"), "f" * 64, KubeSettings(), cors=odd)
    assert env_of(objs)["MLBUILD_CORS_ORIGINS"] == ",".join(odd)


# -- the templates ---------------------------------------------------------------------

def test_templates_render_strictly_through_mlbuild_render():
    from mlbuild.render import render, template_digest

    values = dict(project="p", service="s", name="p-s", namespace="ns", labels={},
                  selector={}, fingerprint="f", service_type="ClusterIP", service_port=80)
    yaml.safe_load(render("kubernetes/service.yaml.j2", **values))
    for missing in values:  # each one is needed, and its absence is an error, never ""
        with pytest.raises((jinja2.UndefinedError, TypeError)):
            render("kubernetes/service.yaml.j2",
                   **{k: v for k, v in values.items() if k != missing})
    # StrictUndefined: even a name printed only in a comment must be given.
    with pytest.raises(jinja2.UndefinedError, match="project"):
        render("kubernetes/service.yaml.j2", **{k: v for k, v in values.items()
                                                if k != "project"})
    for name in TEMPLATES:
        assert re.fullmatch(r"(sha256:)?[0-9a-f]{64}", template_digest(name)), name


def test_startup_probe_threshold_rounds_up():
    settings = KubeSettings(progress_deadline_s=12)
    c = container(render_service("p", "s", image("p", "s"), "f" * 64, settings))
    probe = c["startupProbe"]
    assert probe["failureThreshold"] == math.ceil(12 / probe["periodSeconds"])
