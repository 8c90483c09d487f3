"""Invalid manifests: every class of problem, with its message and line, all at once."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from mlbuild.errors import ManifestError
from mlbuild.manifest import load_project

FILES = ["models/model.pkl", "envs/sklearn.yml", "envs/req.txt", "src/score.py",
         "samples/input.json"]

# Line numbers below refer to this text.
BASE = """\
name: diabetes
models:
  ridge:
    path: models/model.pkl
    framework: scikit-learn
environments:
  sklearn: {conda: envs/sklearn.yml}
services:
  diabetes:
    environment: sklearn
    entry_script: src/score.py
    models: [ridge]
targets:
  dev: {type: process, port: 8890}
"""


@pytest.fixture
def proj(tmp_path: Path, monkeypatch) -> Path:
    for rel in FILES:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    monkeypatch.chdir(tmp_path)  # problems then name the file "mlproject.yaml"
    return tmp_path


def problems(root: Path, text: str) -> list[str]:
    (root / "mlproject.yaml").write_text(textwrap.dedent(text))
    with pytest.raises(ManifestError) as e:
        load_project(root / "mlproject.yaml")
    assert all(type(p).__name__ == "Problem" for p in e.value.problems)
    return [str(p) for p in e.value.problems]


def test_base_is_valid(proj: Path):
    (proj / "mlproject.yaml").write_text(BASE)
    assert load_project(proj / "mlproject.yaml").name == "diabetes"


# -- exact messages -------------------------------------------------------------------


def test_unknown_environment_with_suggestion(proj: Path):
    assert problems(proj, BASE.replace("environment: sklearn", "environment: skl")) == [
        "mlproject.yaml:10: services.diabetes.environment: "
        "no environment 'skl' (did you mean 'sklearn'?)"
    ]


def test_unknown_key_at_its_own_line(proj: Path):
    assert problems(proj, BASE.replace("    environment: sklearn",
                                       "    enviroment: sklearn\n    environment: sklearn")) == [
        "mlproject.yaml:10: services.diabetes: unknown key 'enviroment' "
        "(did you mean 'environment'?)"
    ]


def test_missing_required_key(proj: Path):
    assert problems(proj, BASE.replace("    path: models/model.pkl\n", "")) == [
        "mlproject.yaml:3: models.ridge: missing required key 'path'"
    ]


def test_missing_name(proj: Path):
    assert problems(proj, BASE.replace("name: diabetes\n", "")) == [
        "mlproject.yaml:1: missing required key 'name'"
    ]


def test_wrong_type(proj: Path):
    text = BASE.replace("    framework: scikit-learn\n",
                        "    framework: scikit-learn\n    resources: {cpu: abc}\n")
    assert problems(proj, text) == [
        "mlproject.yaml:6: models.ridge.resources.cpu: expected a number, got 'abc'"
    ]


def test_enum_with_suggestion(proj: Path):
    assert problems(proj, BASE.replace("type: process", "type: dockr")) == [
        "mlproject.yaml:14: targets.dev.type: 'dockr' is not one of "
        "process, docker, kubernetes, package (did you mean 'docker'?)"
    ]


def test_yaml11_boolean_hint(proj: Path):
    text = BASE.replace("    models: [ridge]\n", "    models: [ridge]\n    auth: no\n")
    (msg,) = problems(proj, text)
    assert msg.startswith("mlproject.yaml:13: services.diabetes.auth: no is not one of none, key")
    assert "YAML reads no as a boolean" in msg


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ("name: diabetes", "name: Diabetes_1",
         "mlproject.yaml:1: name: 'Diabetes_1' must be a DNS label: lowercase letters a-z, "
         "digits and '-', starting and ending with a letter or digit"),
        ("name: diabetes", "name: " + "a" * 41,
         f"mlproject.yaml:1: name: '{'a' * 41}' is longer than 40 characters"),
        ("  diabetes:\n    environment", "  Diabetes:\n    environment",
         "mlproject.yaml:9: services: service name 'Diabetes' must be a DNS label: lowercase "
         "letters a-z, digits and '-', starting and ending with a letter or digit"),
        ("  ridge:", "  'ri dge':",
         "mlproject.yaml:3: models: model name 'ri dge' must be letters, digits, '.', '_' and "
         "'-', starting with a letter or digit"),
        ("port: 8890", "port: 70000",
         "mlproject.yaml:14: targets.dev.port: must be at most 65535, got 70000"),
        ("port: 8890", "port: 0",
         "mlproject.yaml:14: targets.dev.port: must be at least 1, got 0"),
        ("models: [ridge]", "models: [ridge@0]",
         "mlproject.yaml:12: services.diabetes.models[0]: 'ridge@0' must be a model name, "
         "optionally with @VERSION (e.g. ridge or ridge@3)"),
        ("models: [ridge]", "models: [ridge, ridge]",
         "mlproject.yaml:12: services.diabetes.models: lists 'ridge' more than once"),
        ("{conda: envs/sklearn.yml}", "{conda: envs/sklearn.yml, requirements: envs/req.txt}",
         "mlproject.yaml:7: environments.sklearn: takes only one of conda, requirements, "
         "packages; found conda and requirements"),
        ("{conda: envs/sklearn.yml}", "{python: '3.11'}",
         "mlproject.yaml:7: environments.sklearn: needs one of conda, requirements, packages"),
        ("{conda: envs/sklearn.yml}", "{requirements: envs/req.txt, platforms: [linux-64]}",
         "mlproject.yaml:7: environments.sklearn.platforms: platforms applies to conda "
         "environments only: remove it, or use a conda spec (conda: FILE)"),
        ("{conda: envs/sklearn.yml}", "{conda: envs/sklearn.yml, platforms: [osx-arm64]}",
         "mlproject.yaml:7: environments.sklearn.platforms: images and the process target "
         "need linux-64, which is not among the platforms: add it"),
        ("{conda: envs/sklearn.yml}", "{conda: envs/sklearn.yml, platforms: [linux64]}",
         "mlproject.yaml:7: environments.sklearn.platforms[0]: 'linux64' must be a conda "
         "platform such as linux-64, linux-aarch64 or osx-arm64"),
        ("{type: process, port: 8890}", "{type: process, port: 8890, replicas: 2}",
         "mlproject.yaml:14: targets.dev: key 'replicas' does not apply to a target of type "
         "'process' (only to kubernetes)"),
        ("{type: process, port: 8890}", "{type: package, port: 8890}",
         "mlproject.yaml:14: targets.dev: key 'port' does not apply to a target of type "
         "'package' (only to process, docker, kubernetes)"),
        ("{type: process, port: 8890}", "{port: 8890}",
         "mlproject.yaml:14: targets.dev: missing required key 'type'"),
        ("targets:", "targets: []\nx:",
         "mlproject.yaml:13: targets: expected a mapping (key: value), got a list"),
    ],
)
def test_schema_messages(proj: Path, old: str, new: str, expected: str):
    assert old in BASE
    assert expected in problems(proj, BASE.replace(old, new, 1))


def test_cors_origin_pattern(proj: Path):
    text = BASE.replace("    models: [ridge]\n",
                        "    models: [ridge]\n    cors: ['*', 'https://a.b:8080', 'ftp/x']\n")
    assert problems(proj, text) == [
        "mlproject.yaml:13: services.diabetes.cors[2]: 'ftp/x' must be an origin such as "
        "https://www.example.com (scheme://host[:port], no path) or '*'"
    ]


# -- semantic checks ------------------------------------------------------------------


def test_unknown_model_and_pinned_registry_model(proj: Path):
    text = BASE.replace("models: [ridge]", "models: [rdge, elsewhere@2, nothere]")
    assert problems(proj, text) == [
        "mlproject.yaml:12: services.diabetes.models[0]: no model 'rdge' (did you mean 'ridge'?)",
        "mlproject.yaml:12: services.diabetes.models[2]: no model 'nothere'; declare it under "
        "models: or pin a registered version (nothere@N)",
    ]


def test_missing_files(proj: Path):
    os.remove(proj / "models/model.pkl")
    os.remove(proj / "src/score.py")
    text = BASE.replace("    models: [ridge]\n",
                        "    models: [ridge]\n    source_dir: lib\n"
                        "    schema: {input: samples/input.json, output: samples/out.json}\n")
    assert problems(proj, text) == [
        "mlproject.yaml:4: models.ridge.path: 'models/model.pkl' does not exist "
        "(does it need to be created first, e.g. by a train script?)",
        "mlproject.yaml:11: services.diabetes.entry_script: 'src/score.py' does not exist",
        "mlproject.yaml:13: services.diabetes.source_dir: 'lib' does not exist",
        "mlproject.yaml:14: services.diabetes.schema.output: 'samples/out.json' does not exist",
    ]


def test_wrong_kind_of_path(proj: Path):
    text = BASE.replace("entry_script: src/score.py", "entry_script: src\n    source_dir: src/score.py")
    assert problems(proj, text) == [
        "mlproject.yaml:11: services.diabetes.entry_script: 'src' is not a file",
        "mlproject.yaml:12: services.diabetes.source_dir: 'src/score.py' is not a folder",
    ]


def test_paths_must_stay_inside_the_project(proj: Path, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.pkl").write_text("x")
    (proj / "models" / "link.pkl").symlink_to(outside / "secret.pkl")
    (proj / "models" / "inside.pkl").symlink_to(proj / "models" / "model.pkl")
    text = BASE.replace("path: models/model.pkl", "path: models/link.pkl") \
        .replace("entry_script: src/score.py", "entry_script: ../score.py") \
        .replace("{conda: envs/sklearn.yml}", "{conda: /etc/passwd}")
    text += "  pkg: {type: package, out: dist/../../x}\n"
    text += "  inside: {type: docker, port: 1}\n"
    got = problems(proj, text)
    real = os.path.realpath(outside / "secret.pkl")
    assert got == [
        f"mlproject.yaml:4: models.ridge.path: 'models/link.pkl' resolves to {real!r}, "
        "outside the project folder (a symlink?)",
        "mlproject.yaml:7: environments.sklearn.conda: '/etc/passwd' is an absolute path; "
        "paths must be relative to the project folder",
        "mlproject.yaml:11: services.diabetes.entry_script: '../score.py' points outside the "
        "project folder",
        "mlproject.yaml:15: targets.pkg.out: 'dist/../../x' points outside the project folder",
    ]
    # a symlink that stays inside is fine
    (proj / "mlproject.yaml").write_text(BASE.replace("models/model.pkl", "models/inside.pkl"))
    assert load_project(proj / "mlproject.yaml").models["ridge"].path == "models/inside.pkl"


def test_no_code_service_rules(proj: Path):
    no_entry = BASE.replace("    entry_script: src/score.py\n", "")
    (proj / "mlproject.yaml").write_text(no_entry)
    assert load_project(proj / "mlproject.yaml").services["diabetes"].no_code
    msg = ("services.diabetes: needs an entry_script, or exactly one model with framework "
           "scikit-learn or onnx to be served without code")
    assert problems(proj, no_entry.replace("framework: scikit-learn", "framework: pytorch")) == [
        f"mlproject.yaml:9: {msg}"]
    assert problems(proj, no_entry.replace("models: [ridge]", "models: [ridge@1, ridge]")) == [
        f"mlproject.yaml:9: {msg}"]
    assert problems(proj, no_entry.replace("models: [ridge]", "models: []")) == [
        f"mlproject.yaml:9: {msg}"]


def test_ports_and_outs_must_not_collide(proj: Path):
    text = BASE + """\
  other: {type: process}
  docker: {type: docker, port: 8890}
  k8s: {type: kubernetes, port: 8890}
  p1: {type: package, out: dist/p}
  p2: {type: package, out: ./dist/p/}
  p3: {type: package, out: .}
"""
    assert problems(proj, text) == [
        "mlproject.yaml:15: targets.other.port: port 8890 is already used by target 'dev'",
        "mlproject.yaml:16: targets.docker.port: port 8890 is already used by target 'dev'",
        "mlproject.yaml:19: targets.p2.out: 'dist/p' is already the out folder of target 'p1'",
        "mlproject.yaml:20: targets.p3.out: must be a folder below the project folder, "
        "not the project folder itself",
    ]


def test_each_service_of_a_target_takes_a_port(proj: Path):
    two = BASE.replace("targets:\n", """  second:
    environment: sklearn
    entry_script: src/score.py
    models: [ridge]
targets:
""")
    assert problems(proj, two + "  local: {type: docker, port: 8891}\n") == [
        "mlproject.yaml:19: targets.local.port: port 8891 is already used by target 'dev' "
        "(its services use 8890-8891) (this target's services need 8891-8892)"]
    assert problems(proj, two + "  local: {type: docker, port: 8889}\n") == [
        "mlproject.yaml:19: targets.local.port: port 8890 is already used by target 'dev' "
        "(its services use 8890-8891) (this target's services need 8889-8890)"]
    assert problems(proj, two.replace("port: 8890", "port: 65535")) == [
        "mlproject.yaml:18: targets.dev.port: 2 services need ports 65535-65536, past 65535"]


def test_target_references(proj: Path):
    text = BASE.replace("{type: process, port: 8890}",
                        "{type: process, port: 8890, services: [diabetis]}")
    text += "default_target: deb\n"
    assert problems(proj, text) == [
        "mlproject.yaml:14: targets.dev.services[0]: no service 'diabetis' "
        "(did you mean 'diabetes'?)",
        "mlproject.yaml:15: default_target: no target 'deb' (did you mean 'dev'?)",
    ]


def test_default_target_refers_to_embedded_dev(proj: Path):
    text = BASE.split("targets:")[0] + "default_target: dve\n"
    assert problems(proj, text) == [
        "mlproject.yaml:13: default_target: no target 'dve' (did you mean 'dev'?)"]
    (proj / "mlproject.yaml").write_text(BASE.split("targets:")[0] + "default_target: dev\n")
    assert load_project(proj / "mlproject.yaml").default_target == "dev"


def test_object_names_fit_63_characters(proj: Path):
    name = "p" * 40
    text = BASE.replace("name: diabetes", f"name: {name}") \
        .replace("  dev: {type", "  a-long-target-name: {type")
    (msg,) = problems(proj, text)
    assert msg.startswith("mlproject.yaml:9: services.diabetes: "
                          f"'{name}-diabetes-a-long-target-name' (project-service-target) is 68 "
                          "characters")


def test_python_version_checked(proj: Path):
    text = BASE.replace("{conda: envs/sklearn.yml}", "{conda: envs/sklearn.yml, python: three}")
    assert problems(proj, text) == [
        "mlproject.yaml:7: environments.sklearn.python: 'three' is not a Python version like "
        "\"3.11\""]


def test_non_finite_numbers(proj: Path):
    text = BASE.replace("{type: process, port: 8890}", "{type: docker, port: 1, cpu: .nan}")
    assert problems(proj, text) == [
        "mlproject.yaml:14: targets.dev.cpu: must be a finite number, got .nan"]


# -- all at once ----------------------------------------------------------------------


def test_many_problems_at_once_sorted_by_line(proj: Path):
    text = """\
    name: Bad_Name
    modles: {}
    models:
      ridge: {path: models/missing.pkl, framework: sklearn}
    environments:
      sklearn: {conda: envs/sklearn.yml}
      sklearn: {conda: envs/sklearn.yml}
    services:
      diabetes:
        environment: skl
        entry_script: src/score.py
        models: [rdge]
    targets:
      local: {type: dockr, port: 6789}
    default_target: stagin
    """
    got = problems(proj, text)
    assert got == [
        "mlproject.yaml:1: name: 'Bad_Name' must be a DNS label: lowercase letters a-z, digits "
        "and '-', starting and ending with a letter or digit",
        "mlproject.yaml:2: unknown key 'modles' (did you mean 'models'?)",
        "mlproject.yaml:4: models.ridge.framework: 'sklearn' is not one of scikit-learn, onnx, "
        "pytorch, tensorflow, keras, xgboost, lightgbm, custom (did you mean 'scikit-learn'?)",
        "mlproject.yaml:4: models.ridge.path: 'models/missing.pkl' does not exist (does it need "
        "to be created first, e.g. by a train script?)",
        "mlproject.yaml:7: environments: duplicate key 'sklearn' (first at line 6)",
        "mlproject.yaml:10: services.diabetes.environment: no environment 'skl' "
        "(did you mean 'sklearn'?)",
        "mlproject.yaml:12: services.diabetes.models[0]: no model 'rdge' (did you mean 'ridge'?)",
        "mlproject.yaml:14: targets.local.type: 'dockr' is not one of process, docker, "
        "kubernetes, package (did you mean 'docker'?)",
        "mlproject.yaml:15: default_target: no target 'stagin' (targets: local)",
    ]


def test_bad_yaml_reports_its_line(proj: Path):
    got = problems(proj, "name: x\nmodels:\n  a: {path: m\n  b: 2\n")
    assert len(got) == 1 and got[0].startswith("mlproject.yaml:")
    assert "invalid YAML" in got[0]
    assert int(got[0].split(":")[1]) >= 3


def test_error_message_lists_problems(proj: Path):
    (proj / "mlproject.yaml").write_text("name: x\nbogus: 1\nother: 2\n")
    with pytest.raises(ManifestError) as e:
        load_project(proj / "mlproject.yaml")
    assert str(e.value) == (
        "2 problems in the manifest:\n"
        "  mlproject.yaml:2: unknown key 'bogus'\n"
        "  mlproject.yaml:3: unknown key 'other'"
    )
    assert e.value.exit_code == 3


def test_unreadable_manifest(proj: Path):
    with pytest.raises(ManifestError):
        load_project(proj / "nope.yaml")


# -- no-code services without an environment ------------------------------------------

NO_ENV = BASE.replace("    environment: sklearn\n    entry_script: src/score.py\n", "")


def test_no_code_service_without_environment_gets_the_default_one(proj: Path):
    (proj / "mlproject.yaml").write_text(NO_ENV)
    p = load_project(proj / "mlproject.yaml")
    env = p.environments["_nocode-scikit-learn-1.5"]
    assert p.services["diabetes"].environment == env.name
    # An inline pip environment, locked like any other; the default Python (3.11).
    assert env.kind == "packages" and env.packages == ("scikit-learn==1.5.*", "joblib")
    assert env.python is None and env.base_image is None
    assert env.default_for == "scikit-learn"
    assert list(p.environments) == ["sklearn", env.name]  # declared ones are kept
    from mlbuild.graph.steps.lock import lock_path
    assert lock_path(env) == "locks/_nocode-scikit-learn-1.5.lock.txt"


def test_no_code_default_environment_honours_framework_version(proj: Path):
    (proj / "mlproject.yaml").write_text(
        NO_ENV.replace("framework: scikit-learn", 'framework: scikit-learn\n'
                                                  '    framework_version: "1.4"'))
    p = load_project(proj / "mlproject.yaml")
    env = p.environments[p.services["diabetes"].environment]
    assert env.name == "_nocode-scikit-learn-1.4"
    assert env.packages == ("scikit-learn==1.4.*", "joblib")
    # Unquoted, YAML reads 1.10 as a number: the text as written counts.
    (proj / "mlproject.yaml").write_text(
        NO_ENV.replace("framework: scikit-learn", "framework: scikit-learn\n"
                                                  "    framework_version: 1.10"))
    p = load_project(proj / "mlproject.yaml")
    assert p.environments[p.services["diabetes"].environment].packages[0] == \
        "scikit-learn==1.10.*"


def test_no_code_services_share_one_default_environment(proj: Path):
    (proj / "models/iris.onnx").write_text("x")
    text = NO_ENV.replace("models: [ridge]\n", """models: [ridge]
  other:
    models: [twin]
  iris:
    models: [iris]
  iris2:
    models: [iris]
    auth: key
""").replace("    framework: scikit-learn\n", """    framework: scikit-learn
    framework_version: "1.5"
  twin: {path: models/model.pkl, framework: scikit-learn}
  iris: {path: models/iris.onnx, framework: onnx, framework_version: "1.16"}
""").replace("name: diabetes\n", "name: diabetes\nbase_image: python:3.11-bookworm\n")
    (proj / "mlproject.yaml").write_text(text)
    p = load_project(proj / "mlproject.yaml")
    # framework_version "1.5" and none (the default, 1.5) are the same environment.
    assert {s: p.services[s].environment for s in p.services} == {
        "diabetes": "_nocode-scikit-learn-1.5", "other": "_nocode-scikit-learn-1.5",
        "iris": "_nocode-onnx", "iris2": "_nocode-onnx"}
    assert list(p.environments) == ["sklearn", "_nocode-scikit-learn-1.5", "_nocode-onnx"]
    onnx = p.environments["_nocode-onnx"]
    # An ONNX model's framework_version is its ONNX version, which onnxruntime reads
    # whatever its own: it pins nothing.
    assert onnx.packages == ("onnxruntime", "numpy") and onnx.default_for == "onnx"
    # The project's base image serves the default environments too.
    assert onnx.base_image == "python:3.11-bookworm"


def test_service_without_environment_that_is_not_no_code_is_refused(proj: Path):
    msg = ("needs an environment: declare one under environments and name it "
           "(environment: NAME); only a no-code service (no entry_script, one scikit-learn "
           "or onnx model) gets a default one")
    with_script = BASE.replace("    environment: sklearn\n", "")
    assert problems(proj, with_script) == [f"mlproject.yaml:9: services.diabetes: {msg}"]
    not_servable = NO_ENV.replace("framework: scikit-learn", "framework: pytorch")
    assert problems(proj, not_servable) == [
        "mlproject.yaml:9: services.diabetes: needs an entry_script, or exactly one model "
        "with framework scikit-learn or onnx to be served without code",
        f"mlproject.yaml:9: services.diabetes: {msg}"]


def test_default_environment_needs_a_version_and_cannot_be_named(proj: Path):
    bad = NO_ENV.replace("framework: scikit-learn",
                         "framework: scikit-learn\n    framework_version: latest")
    assert problems(proj, bad) == [
        "mlproject.yaml:6: models.ridge.framework_version: 'latest' is not a version like "
        "\"1.5\": the default environment of a no-code service pins scikit-learn to it "
        "(write the version the model was saved with, or give the service an environment)"]
    # ... only when a service uses it.
    (proj / "mlproject.yaml").write_text(bad.replace(
        "  diabetes:\n", "  diabetes:\n    environment: sklearn\n"))
    assert load_project(proj / "mlproject.yaml").services["diabetes"].environment == "sklearn"
    named = NO_ENV.replace("  diabetes:\n", "  diabetes:\n    environment: _nocode-onnx\n")
    assert problems(proj, named) == [
        "mlproject.yaml:10: services.diabetes.environment: no environment '_nocode-onnx': a "
        "default environment is not named; leave environment out of a no-code service to "
        "get one"]


# -- kubernetes targets ----------------------------------------------------------------
def test_kubernetes_target_rules_all_at_once(proj: Path):
    text = BASE + """\
  k8s:
    type: kubernetes
    replicas: 2
    autoscale: {min: 5, max: 3}
    cpu: 2
    cpu_limit: 1
    memory_gb: 4
    memory_gb_limit: 2
"""
    assert problems(proj, text) == [
        "mlproject.yaml:18: targets.k8s.autoscale: replicas and autoscale exclude each "
        "other: keep replicas for a fixed count, autoscale for an HPA",
        "mlproject.yaml:18: targets.k8s.autoscale.min: min 5 is above max 3",
        "mlproject.yaml:20: targets.k8s.cpu_limit: 1 is below the request cpu 2: a limit "
        "must be at least its request",
        "mlproject.yaml:22: targets.k8s.memory_gb_limit: 2 is below the request memory_gb 4: "
        "a limit must be at least its request",
    ]


def test_kubernetes_keys_are_checked_by_the_schema(proj: Path):
    msgs = problems(proj, BASE + """\
  k8s: {type: kubernetes, service_type: Loadbalancer, liveness: {success_threshold: 2}}
""")
    assert any("targets.k8s.service_type" in m and "LoadBalancer" in m for m in msgs), msgs
    assert any("targets.k8s.liveness.success_threshold" in m for m in msgs), msgs
    # Keys of other types are refused on a process target; the runtime limits are not.
    msgs = problems(proj, BASE.replace("dev: {type: process, port: 8890}",
                                       "dev: {type: process, port: 8890, replicas: 2}"))
    assert any("targets.dev" in m and "replicas" in m for m in msgs), msgs


def test_kubernetes_settings_defaults_and_values(proj: Path):
    from mlbuild.kube.settings import Autoscale, Ingress, KubeSettings, Liveness

    (proj / "mlproject.yaml").write_text(BASE + """\
  k8s: {type: kubernetes}
  prod:
    type: kubernetes
    context: aks-prod
    namespace: ml
    port: 8080
    autoscale: {max: 4}
    cpu: 1
    cpu_limit: 2
    memory_gb: 2
    gpu: 1
    scoring_timeout_ms: 5000
    max_concurrent_requests: 4
    max_request_wait_ms: 100
    liveness: {initial_delay_s: 30}
    progress_deadline_s: 120
    service_type: LoadBalancer
    ingress: {host: ml.example.com, class: nginx, tls_secret: ml-tls}
    apply: false
    out: deploy/prod
    image_pull_secret: regcred
""")
    p = load_project(proj / "mlproject.yaml")
    assert p.targets["k8s"].kube == KubeSettings(out="dist/k8s")
    prod = p.targets["prod"].kube
    assert prod == KubeSettings(
        namespace="ml", context="aks-prod", port=8080, replicas=None,
        autoscale=Autoscale(min=1, max=4, target_cpu_percent=70), cpu=1.0, memory_gb=2.0,
        cpu_limit=2.0, gpu=1, scoring_timeout_ms=5000, max_concurrent_requests=4,
        max_request_wait_ms=100, liveness=Liveness(initial_delay_s=30), progress_deadline_s=120,
        service_type="LoadBalancer", ingress=Ingress("ml.example.com", "nginx", "ml-tls"),
        apply=False, out="deploy/prod", image_pull_secret="regcred")
    assert p.targets["prod"].runtime_env() == {
        "SCORING_TIMEOUT_MS": "5000", "MLBUILD_MAX_CONCURRENT_REQUESTS": "4",
        "MLBUILD_MAX_REQUEST_WAIT_MS": "100"}
    assert p.targets["k8s"].runtime_env() == {"SCORING_TIMEOUT_MS": "60000",
                                              "MLBUILD_MAX_REQUEST_WAIT_MS": "500"}


def test_runtime_limits_on_process_and_docker_targets(proj: Path):
    (proj / "mlproject.yaml").write_text(BASE.replace(
        "dev: {type: process, port: 8890}",
        "dev: {type: process, port: 8890, scoring_timeout_ms: 2000}\n"
        "  local: {type: docker, port: 6789, max_concurrent_requests: 2}"))
    p = load_project(proj / "mlproject.yaml")
    assert p.targets["dev"].runtime_env() == {"SCORING_TIMEOUT_MS": "2000"}
    assert p.targets["local"].runtime_env() == {"MLBUILD_MAX_CONCURRENT_REQUESTS": "2"}
    # Unset, nothing enters the config: existing targets keep their fingerprints.
    assert "scoring_timeout_ms" not in p.targets["local"].config()


def test_paths_inside_the_state_folder_are_refused(proj: Path):
    (proj / ".mlbuild").mkdir()
    (proj / ".mlbuild/state.db").write_text("keys")
    msgs = problems(proj, BASE.replace("path: models/model.pkl", "path: .mlbuild/state.db")
                    .replace("entry_script: src/score.py",
                             "entry_script: src/score.py\n    source_dir: ./.mlbuild"))
    assert "mlproject.yaml:4: models.ridge.path: '.mlbuild/state.db' is inside .mlbuild/, " \
           "mlbuild's state folder (it holds the keys): point at a file or folder of your " \
           "own" in msgs, msgs
    assert any("services.diabetes.source_dir: './.mlbuild' is inside .mlbuild/" in m
               for m in msgs), msgs


def test_unknown_default_target_lists_the_targets(proj: Path):
    msgs = problems(proj, BASE + "  bundle: {type: package}\ndefault_target: prod\n")
    assert msgs == ["mlproject.yaml:16: default_target: no target 'prod' (targets: bundle, dev)"]


# -- out folders clear of every path the project reads (issue 16, point 7) --------------

OUT_TAIL = ("mlbuild replaces what is in out, so it must be a folder of its own, "
            "e.g. dist/NAME")


def _with_paths() -> str:
    """BASE with a service reading every kind of path, and one environment of each kind."""
    text = BASE.replace(
        "    entry_script: src/score.py\n",
        "    entry_script: src/score.py\n    source_dir: src\n"
        "    schema: {input: samples/input.json, output: samples/output.json}\n")
    return text.replace(
        "  sklearn: {conda: envs/sklearn.yml}\n",
        "  sklearn: {conda: envs/sklearn.yml}\n  pip: {requirements: envs/req.txt}\n"
        "  inline: {packages: [numpy]}\n")


@pytest.mark.parametrize("out, path, what", [
    ("models", "models/model.pkl", "models.ridge.path"),
    ("envs", "envs/sklearn.yml", "environments.sklearn.conda"),
    ("envs/req.txt", "envs/req.txt", "environments.pip.requirements"),
    # The lock files beside the specs (committed, the source of truth of the builds).
    ("envs/req.lock.txt", "envs/req.lock.txt", "the lock file of environments.pip"),
    ("envs/sklearn.conda-lock.yml", "envs/sklearn.conda-lock.yml",
     "the lock file of environments.sklearn"),
    ("locks", "locks/inline.lock.txt", "the lock file of environments.inline"),
    ("src/pkg", "src", "services.diabetes.source_dir"),
    ("samples", "samples/input.json", "services.diabetes.schema.input"),
    ("mlproject.yaml", "mlproject.yaml", "the manifest"),
])
def test_out_may_not_overlap_any_path_the_project_reads(proj: Path, out, path, what):
    (proj / "samples/output.json").write_text("x")
    text = _with_paths()
    (proj / "mlproject.yaml").write_text(text)
    load_project(proj / "mlproject.yaml")  # valid as it is
    msgs = problems(proj, text + f"  bundle: {{type: package, out: {out}}}\n")
    assert msgs == [f"mlproject.yaml:19: targets.bundle.out: {out!r} overlaps {path!r} "
                    f"({what}): {OUT_TAIL}"]


def test_out_holding_the_schema_samples_of_its_service(proj: Path):
    # The case: samples under pkg/<service>/, which a deploy replaced.
    (proj / "pkg/diabetes").mkdir(parents=True)
    (proj / "pkg/diabetes/in.json").write_text("{}")
    (proj / "pkg/diabetes/out.json").write_text("{}")
    text = BASE.replace("    entry_script: src/score.py\n",
                        "    entry_script: src/score.py\n"
                        "    schema: {input: pkg/diabetes/in.json,"
                        " output: pkg/diabetes/out.json}\n")
    assert problems(proj, text + "  bundle: {type: package, out: pkg}\n") == [
        f"mlproject.yaml:16: targets.bundle.out: 'pkg' overlaps 'pkg/diabetes/in.json' "
        f"(services.diabetes.schema.input): {OUT_TAIL}"]
    # a kubernetes target's out is checked the same way
    assert problems(proj, text + "  k8s: {type: kubernetes, out: pkg/diabetes}\n") == [
        f"mlproject.yaml:16: targets.k8s.out: 'pkg/diabetes' overlaps 'pkg/diabetes/in.json' "
        f"(services.diabetes.schema.input): {OUT_TAIL}"]


def test_out_through_a_symlink_onto_an_input(proj: Path):
    (proj / "build").symlink_to(proj / "src")
    (proj / "dist").mkdir()
    (proj / "dist/link").symlink_to(proj / "samples")
    text = _with_paths()
    (proj / "samples/output.json").write_text("x")
    msgs = problems(proj, text + "  a: {type: package, out: build/pkg}\n"
                                 "  b: {type: package, out: dist/link}\n")
    assert msgs == [
        f"mlproject.yaml:19: targets.a.out: 'build/pkg' (really 'src/pkg') overlaps 'src' "
        f"(services.diabetes.source_dir): {OUT_TAIL}",
        f"mlproject.yaml:20: targets.b.out: 'dist/link' (really 'samples') overlaps "
        f"'samples/input.json' (services.diabetes.schema.input): {OUT_TAIL}",
    ]


def test_out_folders_of_targets_do_not_nest_into_each_other(proj: Path):
    # Package `out: dist` writes dist/diabetes/: no other target may write in there.
    ok = BASE + "  p: {type: package, out: dist}\n  k8s: {type: kubernetes, out: dist/k8s}\n"
    (proj / "mlproject.yaml").write_text(ok)
    load_project(proj / "mlproject.yaml")
    assert problems(proj, BASE + "  p: {type: package, out: dist}\n"
                                 "  k8s: {type: kubernetes, out: dist/diabetes/k8s}\n") == [
        "mlproject.yaml:16: targets.k8s.out: 'dist/diabetes/k8s' overlaps 'dist/diabetes' "
        "(where target 'p' writes service diabetes): each target needs a folder of its own"]
    assert problems(proj, BASE + "  k8s: {type: kubernetes, out: dist/diabetes}\n"
                                 "  p: {type: package, out: dist}\n") == [
        "mlproject.yaml:16: targets.p.out: 'dist' writes service diabetes to 'dist/diabetes', "
        "which overlaps 'dist/diabetes' (the out folder of target 'k8s'): each target needs "
        "a folder of its own"]
    # a package target only writes the services it lists
    (proj / "mlproject.yaml").write_text(
        BASE + "  p: {type: package, out: dist, services: []}\n"
               "  k8s: {type: kubernetes, out: dist/diabetes}\n")
    load_project(proj / "mlproject.yaml")


def test_out_clear_of_a_no_code_default_lock_and_of_mlbuild_itself(proj: Path, monkeypatch):
    from mlbuild import resources

    no_code = BASE.replace("    environment: sklearn\n    entry_script: src/score.py\n", "")
    msgs = problems(proj, no_code + "  bundle: {type: package, out: locks}\n")
    assert len(msgs) == 1 and "targets.bundle.out: 'locks' overlaps 'locks/_nocode-" in msgs[0] \
        and "(the lock file of environments._nocode-scikit-learn-" in msgs[0], msgs
    # A checkout of mlbuild holding the project: its templates are read by every build.
    (proj / "tpl").mkdir()
    monkeypatch.setattr(resources, "templates_dir", lambda: proj / "tpl")
    assert problems(proj, BASE + "  bundle: {type: package, out: tpl/x}\n") == [
        f"mlproject.yaml:15: targets.bundle.out: 'tpl/x' overlaps 'tpl' (mlbuild's templates): "
        f"{OUT_TAIL}"]
