"""Loading valid manifests: the YAML reader, defaults, equality, the schema cache."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mlbuild.errors import InvalidInput, ManifestError
from mlbuild.kube.settings import KubeSettings
from mlbuild.manifest import (
    MANIFEST_NAMES,
    find_manifest,
    load_project,
    read_manifest_data,
)
from mlbuild.manifest import yamlload
from mlbuild.manifest.model import EMBEDDED_DEFAULT_TARGET, ModelRef, Target

DESIGN_EXAMPLE = """\
name: diabetes                      # project name: prefixes images, containers, k8s objects
registry: 127.0.0.1:5000/ml         # optional: where images are pushed (and looked up as a cache)

models:
  ridge:
    path: models/sklearn_regression_model.pkl   # a file or a folder
    framework: scikit-learn                      # optional; enables no-code serving
    framework_version: "1.5"
    description: Ridge regression, diabetes progression
    tags: {area: diabetes, type: regression}
    resources: {cpu: 1, memory_gb: 0.5}          # optional hint, e.g. written by `profile`

environments:
  sklearn:
    conda: envs/sklearn.yml          # conda spec with optional `- pip:` section
    # requirements: envs/requirements.txt   # or a pip-only environment
    # base_image: python:3.11-slim           # override of the default base image

services:
  diabetes:
    entry_script: src/score.py       # defines init() and run(data)
    source_dir: src                  # optional: copied beside the entry script
    environment: sklearn
    models: [ridge]                  # `ridge@3` pins a registered version; default: latest
    schema: {input: samples/input.json, output: samples/output.json}   # optional samples
    auth: key                        # none | key
    cors: ["https://www.example.com"]

targets:
  dev:     {type: process, port: 8890}                       # embedded default, no Docker
  local:   {type: docker, port: 6789}                        # container on this machine
  staging: {type: kubernetes, namespace: ml, replicas: 2, cpu: 1, memory_gb: 1}
  bundle:  {type: package, out: dist/package, offline: true}  # downloadable, builds offline
default_target: dev
"""

FILES = [
    "models/sklearn_regression_model.pkl",
    "envs/sklearn.yml",
    "envs/requirements.txt",
    "src/score.py",
    "samples/input.json",
    "samples/output.json",
]


@pytest.fixture
def proj(tmp_path: Path) -> Path:
    """A project folder holding every file the example manifest below refers to."""
    for rel in FILES:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    return tmp_path


def write(root: Path, text: str, name: str = "mlproject.yaml") -> Path:
    path = root / name
    path.write_text(textwrap.dedent(text))
    return path


def same(a, b) -> bool:
    """Equality of projects ignoring the manifest digest (bytes differ)."""
    return dataclasses.replace(a, manifest_digest="") == dataclasses.replace(b, manifest_digest="")


def configs(p) -> dict:
    return {
        "name": p.name,
        "registry": p.registry,
        "models": {k: v.config() for k, v in p.models.items()},
        "environments": {k: v.config() for k, v in p.environments.items()},
        "services": {k: v.config() for k, v in p.services.items()},
        "targets": {k: v.config() for k, v in p.targets.items()},
        "default_target": p.default_target,
    }


# -- the YAML reader ------------------------------------------------------------------


def test_yaml_lines_for_keys_and_items():
    doc = yamlload.parse(b"a:\n  b: 1\n  c:\n    - x\n    - y\n", "m.yaml")
    assert doc.problems == []
    assert doc.data == {"a": {"b": 1, "c": ["x", "y"]}}
    assert doc.lines[("a",)] == 1
    assert doc.lines[("a", "b")] == 2
    assert doc.lines[("a", "c", 1)] == 5
    assert doc.raw[("a", "b")] == "1"


def test_yaml_duplicate_key_reported_at_second_line():
    doc = yamlload.parse(b"a:\n  b: 1\n  b: 2\n", "m.yaml")
    assert [str(p) for p in doc.problems] == [
        "m.yaml:3: a: duplicate key 'b' (first at line 2)"
    ]


def test_yaml_syntax_error_has_line():
    doc = yamlload.parse(b"a: 1\nb: [1, 2\nc: 3\n", "m.yaml")
    assert doc.data is None
    (p,) = doc.problems
    assert p.line is not None and p.line >= 2
    assert "invalid YAML" in p.message


@pytest.mark.parametrize(
    "text, message",
    [
        (b"", "the manifest is empty"),
        (b"# only a comment\n", "the manifest is empty"),
        (b"- a\n- b\n", "not a list"),
        (b"just text\n", "not a single value"),
        (b"\xff\xfe\x00", "not UTF-8"),
        (b"a: 1\n---\nb: 2\n", "invalid YAML"),
    ],
)
def test_yaml_unusable_documents(text, message):
    doc = yamlload.parse(text, "m.yaml")
    assert doc.data is None
    assert message in doc.problems[0].message


def test_yaml_non_text_keys():
    doc = yamlload.parse(b"on: 1\n1: 2\nnull: 3\nok: 4\n", "m.yaml")
    assert doc.data == {"ok": 4}
    msgs = [p.message for p in doc.problems]
    assert msgs[0] == "key 'on' is not text (YAML reads 'on' as a boolean); quote it"
    assert len(msgs) == 3


def test_yaml_keeps_text_of_versions_and_dates():
    doc = yamlload.parse(b"v: 3.10\nd: 2024-01-01\nbad_date: 2024-13-45\n", "m.yaml")
    assert doc.data == {"v": 3.1, "d": "2024-01-01", "bad_date": "2024-13-45"}
    assert doc.raw[("v",)] == "3.10"


def test_yaml_anchors_and_merge_keys():
    text = b"base: &b {x: 1, y: 2}\nuse:\n  <<: *b\n  y: 3\n"
    doc = yamlload.parse(text, "m.yaml")
    assert doc.problems == []
    assert doc.data["use"] == {"x": 1, "y": 3}
    assert doc.lines[("use", "y")] == 4
    assert doc.lines[("use", "x")] == 1


def test_yaml_recursive_alias_and_alias_bomb_are_problems():
    doc = yamlload.parse(b"a: &a [*a]\n", "m.yaml")
    assert any("alias refers to" in p.message for p in doc.problems)
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, 8):
        bomb += f"a{i}: &a{i} [*a{i - 1 if i > 1 else ''}" + f", *a{i - 1 if i > 1 else ''}" * 9 + "]\n"
    doc = yamlload.parse(bomb.replace("*a0", "*a"), "m.yaml")
    assert any("expands to more than" in p.message for p in doc.problems)


def test_yaml_unsupported_tags():
    doc = yamlload.parse(b"a: !!python/object:os.system x\nb: !!binary aGk=\n", "m.yaml")
    assert len(doc.problems) == 2
    assert all("unsupported YAML tag" in p.message for p in doc.problems)


# -- find_manifest --------------------------------------------------------------------


def test_find_manifest(tmp_path: Path):
    with pytest.raises(InvalidInput) as e:
        find_manifest(tmp_path)
    assert "mlbuild init" in e.value.hint
    (tmp_path / "mlproject.yml").write_text("name: a\n")
    assert find_manifest(tmp_path) == tmp_path / "mlproject.yml"
    (tmp_path / "mlproject.yaml").write_text("name: a\n")
    with pytest.raises(InvalidInput):
        find_manifest(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "other.yaml").write_text("name: a\n")
    assert find_manifest(tmp_path, "sub/other.yaml") == tmp_path / "sub" / "other.yaml"
    with pytest.raises(InvalidInput):
        find_manifest(tmp_path, "missing.yaml")
    assert MANIFEST_NAMES == ("mlproject.yaml", "mlproject.yml")


# -- valid manifests ------------------------------------------------------------------


def test_design_example_loads(proj: Path):
    path = write(proj, DESIGN_EXAMPLE)
    p = load_project(path)
    assert p.name == "diabetes"
    assert p.root == proj and p.root.is_absolute()
    assert p.manifest_path == path
    assert len(p.manifest_digest) == 64
    assert p.registry == "127.0.0.1:5000/ml"
    ridge = p.models["ridge"]
    assert ridge.path == "models/sklearn_regression_model.pkl"
    assert ridge.framework == "scikit-learn" and ridge.framework_version == "1.5"
    assert dict(ridge.tags) == {"area": "diabetes", "type": "regression"}
    assert ridge.resources.cpu == 1.0 and ridge.resources.memory_gb == 0.5
    assert ridge.line == 5
    env = p.environments["sklearn"]
    assert env.kind == "conda" and env.spec_file == "envs/sklearn.yml"
    svc = p.services["diabetes"]
    assert svc.models == (ModelRef("ridge"),)
    assert svc.entry_script == "src/score.py" and svc.source_dir == "src"
    assert (svc.schema_input, svc.schema_output) == ("samples/input.json", "samples/output.json")
    assert svc.auth == "key" and svc.cors == ("https://www.example.com",)
    assert svc.line == 20
    assert p.targets["dev"] == Target("dev", "process", port=8890)
    assert p.targets["local"] == Target("local", "docker", port=6789)
    assert p.targets["staging"] == Target(
        "staging", "kubernetes", namespace="ml", replicas=2, cpu=1.0, memory_gb=1.0,
        out="dist/staging", kube=KubeSettings(namespace="ml", replicas=2, cpu=1.0,
                                              memory_gb=1.0, out="dist/staging"))
    assert p.targets["bundle"] == Target("bundle", "package", out="dist/package", offline=True)
    assert list(p.targets) == ["dev", "local", "staging", "bundle"]
    assert p.default_target == "dev"
    assert p.target(None).name == "dev"
    json.dumps(configs(p))  # config() is JSON-able


def test_project_is_frozen(proj: Path):
    p = load_project(write(proj, DESIGN_EXAMPLE))
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.name = "x"
    with pytest.raises(TypeError):
        p.models["new"] = None
    assert isinstance(p.services["diabetes"].cors, tuple)


MINIMAL = """\
name: mini
models:
  m: {path: models/sklearn_regression_model.pkl, framework: scikit-learn}
environments:
  e: {requirements: envs/requirements.txt}
services:
  s: {environment: e, models: [m]}
"""


def test_defaults(proj: Path):
    p = load_project(write(proj, MINIMAL))
    assert dict(p.targets) == {"dev": EMBEDDED_DEFAULT_TARGET}
    assert p.default_target == "dev"
    s = p.services["s"]
    assert s.no_code and s.auth == "none" and s.cors == () and s.entry_script is None
    assert p.registry is None
    assert p.models["m"].resources is None


def test_explicit_defaults_equal_omitted(proj: Path):
    omitted = load_project(write(proj, MINIMAL + """\
targets:
  dev: {type: process}
  k8s: {type: kubernetes}
  pkg: {type: package}
"""))
    explicit = load_project(write(proj, MINIMAL.replace("models: [m]}", "models: [m], auth: none, cors: []}") + """\
targets:
  dev: {type: process, port: 8890}
  k8s: {type: kubernetes, replicas: 1}
  pkg: {type: package, out: ./dist/pkg, offline: false}
default_target: dev
""", name="other.yaml"))
    assert same(omitted, dataclasses.replace(explicit, manifest_path=omitted.manifest_path))
    assert configs(omitted) == configs(explicit)
    assert omitted.targets["pkg"].out == "dist/pkg"


def test_default_target_rules(proj: Path):
    base = MINIMAL + "targets:\n"
    one = load_project(write(proj, base + "  only: {type: docker, port: 1234}\n"))
    assert one.default_target == "only"
    two = load_project(write(proj, base + "  a: {type: docker, port: 1}\n  b: {type: docker, port: 2}\n"))
    assert two.default_target is None
    with_dev = load_project(write(proj, base + "  a: {type: docker, port: 1}\n  dev: {type: process}\n"))
    assert with_dev.default_target == "dev"


def test_comments_and_key_order_do_not_change_the_project(proj: Path):
    a = load_project(write(proj, DESIGN_EXAMPLE))
    reordered = """\
default_target: dev
targets:
  bundle:  {offline: true, out: dist/package, type: package}
  staging: {memory_gb: 1, cpu: 1, replicas: 2, namespace: ml, type: kubernetes}
  local:   {port: 6789, type: docker}
  dev:     {port: 8890, type: process}
services:
  diabetes:
    cors: ["https://www.example.com"]
    auth: key
    schema: {output: ./samples/output.json, input: samples/input.json}
    models: [ridge]
    environment: sklearn
    source_dir: src/
    entry_script: ./src/score.py
environments:
  sklearn: {conda: envs/sklearn.yml}
models:
  ridge:
    resources: {memory_gb: 0.5, cpu: 1.0}
    tags: {type: regression, area: diabetes}
    description: Ridge regression, diabetes progression
    framework_version: "1.5"
    framework: scikit-learn
    path: models/sklearn_regression_model.pkl
registry: 127.0.0.1:5000/ml
name: diabetes
"""
    b = load_project(write(proj, reordered))
    assert a.manifest_digest != b.manifest_digest
    assert same(a, b)
    assert json.dumps(configs(a), sort_keys=True) == json.dumps(configs(b), sort_keys=True)


def test_versions_keep_their_text(proj: Path):
    text = MINIMAL.replace("framework: scikit-learn}", "framework: scikit-learn, "
                           "framework_version: 1.10, tags: {n: 1.50, flag: yes}}")
    text = text.replace("{requirements: envs/requirements.txt}",
                        "{python: 3.10, packages: [scikit-learn==1.5.2]}")
    p = load_project(write(proj, text))
    m = p.models["m"]
    assert m.framework_version == "1.10"
    assert dict(m.tags) == {"n": "1.50", "flag": "yes"}
    env = p.environments["e"]
    assert env.python == "3.10" and env.packages == ("scikit-learn==1.5.2",)
    assert env.kind == "packages"


def test_pinned_registry_only_model_is_allowed(proj: Path):
    text = MINIMAL.replace("models: [m]}", "models: [m, other@3], entry_script: src/score.py}")
    p = load_project(write(proj, text))
    assert p.services["s"].models == (ModelRef("m"), ModelRef("other", 3))


def test_model_folder_and_merge_keys(proj: Path):
    text = """\
name: mini
models:
  m: {path: models/}
environments:
  e: {requirements: envs/requirements.txt}
services:
  a: &svc {environment: e, models: [m], entry_script: src/score.py}
  b:
    <<: *svc
    auth: key
"""
    p = load_project(write(proj, text))
    assert p.models["m"].path == "models"
    assert p.services["b"].auth == "key" and p.services["b"].entry_script == "src/score.py"


def test_relative_display_name(proj: Path, monkeypatch):
    monkeypatch.chdir(proj)
    write(proj, "name: x\nbogus: 1\n")
    with pytest.raises(ManifestError) as e:
        load_project(Path("mlproject.yaml"))
    assert str(e.value.problems[0]) == "mlproject.yaml:2: unknown key 'bogus'"


def test_read_manifest_data(proj: Path):
    data, lines = read_manifest_data(write(proj, DESIGN_EXAMPLE))
    assert data["services"]["diabetes"]["environment"] == "sklearn"
    assert lines[("services", "diabetes", "environment")] == 23
    with pytest.raises(ManifestError):
        read_manifest_data(write(proj, "a: [\n"))


# -- the schema cache -----------------------------------------------------------------


class FakeCache:
    def __init__(self, seen=False):
        self.keys: set[str] = set()
        self.always = seen

    def seen(self, key: str) -> bool:
        return self.always or key in self.keys

    def add(self, key: str) -> None:
        self.keys.add(key)


def test_schema_cache_is_filled_after_a_valid_load(proj: Path):
    cache = FakeCache()
    load_project(write(proj, DESIGN_EXAMPLE), cache)
    assert len(cache.keys) == 1 and len(next(iter(cache.keys))) == 64
    load_project(write(proj, DESIGN_EXAMPLE), cache)
    assert len(cache.keys) == 1


def test_schema_cache_not_filled_for_an_invalid_manifest(proj: Path):
    cache = FakeCache()
    with pytest.raises(ManifestError):
        load_project(write(proj, "name: x\nbogus: 1\n"), cache)
    assert cache.keys == set()


def test_cached_load_skips_schema_but_not_semantics(proj: Path):
    text = DESIGN_EXAMPLE.replace("environment: sklearn", "environment: skl")
    with pytest.raises(ManifestError) as e:
        load_project(write(proj, text), FakeCache(seen=True))
    assert [p.message for p in e.value.problems] == [
        "no environment 'skl' (did you mean 'sklearn'?)"]


def test_cached_no_op_load_does_not_import_jsonschema(proj: Path):
    path = write(proj, DESIGN_EXAMPLE)
    code = textwrap.dedent(f"""
        import sys
        from mlbuild.manifest import load_project
        class C:
            def seen(self, key): return True
            def add(self, key): raise AssertionError
        load_project({str(path)!r}, C())
        heavy = [m for m in ("jsonschema", "networkx", "jinja2", "docker") if m in sys.modules]
        assert not heavy, heavy
    """)
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})


def test_project_base_image_for_environments_without_their_own(proj: Path):
    text = DESIGN_EXAMPLE.replace(
        "environments:\n  sklearn:\n",
        "base_image: registry.example/python:3.11-slim\nenvironments:\n"
        "  own: {requirements: envs/requirements.txt, base_image: python:3.12-slim}\n"
        "  py312: {requirements: envs/requirements.txt, python: '3.12'}\n"
        "  sklearn:\n")
    p = load_project(write(proj, text))
    assert p.environments["sklearn"].base_image == "registry.example/python:3.11-slim"
    assert p.environments["own"].base_image == "python:3.12-slim"
    # A pip environment's python picks its own slim image: the project's base is for 3.11.
    assert p.environments["py312"].base_image is None
