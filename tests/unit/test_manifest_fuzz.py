"""Property tests: whatever the bytes, ``load_project`` returns a Project or raises
ManifestError, never anything else."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlbuild.errors import ManifestError
from mlbuild.manifest import load_project
from mlbuild.manifest.model import Project

VALID = {
    "name": "diabetes",
    "registry": "127.0.0.1:5000/ml",
    "models": {
        "ridge": {
            "path": "models/m.pkl",
            "framework": "scikit-learn",
            "framework_version": "1.5",
            "tags": {"area": "diabetes"},
            "resources": {"cpu": 1, "memory_gb": 0.5},
        }
    },
    "environments": {"sklearn": {"conda": "envs/sklearn.yml"},
                     "pip": {"python": "3.11", "packages": ["numpy"]}},
    "services": {
        "diabetes": {
            "entry_script": "src/score.py",
            "source_dir": "src",
            "environment": "sklearn",
            "models": ["ridge", "ridge@2"],
            "schema": {"input": "samples/in.json"},
            "auth": "key",
            "cors": ["*"],
        }
    },
    "targets": {
        "dev": {"type": "process", "port": 8890},
        "local": {"type": "docker", "port": 6789},
        "staging": {"type": "kubernetes", "namespace": "ml", "replicas": 2},
        "bundle": {"type": "package", "out": "dist/package", "offline": True,
                   "services": ["diabetes"]},
    },
    "default_target": "dev",
}

# One project folder for every example: hypothesis and function-scoped fixtures
# do not mix, and the files never change.
_ROOT = Path(tempfile.mkdtemp(prefix="mlbuild-fuzz-"))
for _rel in ("models/m.pkl", "envs/sklearn.yml", "src/score.py", "samples/in.json"):
    (_ROOT / _rel).parent.mkdir(parents=True, exist_ok=True)
    (_ROOT / _rel).write_text("x")
_MANIFEST = _ROOT / "mlproject.yaml"

# MLBUILD_FUZZ_EXAMPLES=5000 for a longer hunt; 200 keeps the suite under ~10 s.
FAST = settings(max_examples=int(os.environ.get("MLBUILD_FUZZ_EXAMPLES", "200")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def load(content: bytes | str):
    if isinstance(content, str):
        content = content.encode("utf-8", "surrogatepass")
    _MANIFEST.write_bytes(content)
    try:
        project = load_project(_MANIFEST)
    except ManifestError as e:
        assert e.problems, "a ManifestError must carry at least one problem"
        for p in e.problems:
            str(p)
        return None
    assert isinstance(project, Project)
    return project


def test_valid_fixture_loads():
    assert load(yaml.safe_dump(VALID)) is not None


def _paths(data, prefix=()):
    """Every path into nested dicts/lists."""
    yield prefix
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _paths(v, prefix + (i,))


ALL_PATHS = [p for p in _paths(VALID) if p]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**20, 10**20), st.just(10**400),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["..", "/etc/passwd", "../x", "a\\b", "dev", "ridge@0", "ridge@3",
                     "", "yes", "3.10", "process", "package", "*", "x" * 100]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6)


@st.composite
def mutations(draw):
    data = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(ALL_PATHS))
        parent = data
        try:
            for part in path[:-1]:
                parent = parent[part]
            last = path[-1]
            parent[last]  # noqa: B018 - the path may be gone after an earlier mutation
        except (KeyError, IndexError, TypeError):
            continue
        if not isinstance(parent, (dict, list)):
            continue  # an earlier mutation made a string of it: "abc"[0] still indexes
        action = draw(st.sampled_from(["delete", "retype", "rename", "garbage"]))
        if action == "delete":
            del parent[last]
        elif action == "retype":
            parent[last] = draw(values)
        elif action == "rename" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=12))] = parent.pop(last)
        elif action == "garbage" and isinstance(parent, dict):
            parent[draw(st.text(max_size=12))] = draw(values)
    return data


@FAST
@given(mutations())
def test_mutated_manifest_raises_only_manifest_error(data):
    load(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))


@FAST
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_manifest_error(content):
    load(content)


yaml_chars = st.sampled_from(list("abn: -[]{},&*!|>'\"#%@`?\n\t 019.~<=") + ["\ufeff", "\x00"])


@FAST
@given(st.lists(yaml_chars, max_size=120).map("".join))
def test_random_yaml_text_raises_only_manifest_error(text):
    load(text)


@FAST
@given(mutations(), st.integers(0, 2000), st.text(max_size=10))
def test_inserted_garbage_text_raises_only_manifest_error(data, at, garbage):
    text = yaml.safe_dump(data, sort_keys=False)
    at = at % (len(text) + 1)
    load(text[:at] + garbage + text[at:])
