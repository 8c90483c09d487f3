"""Fixtures of the unit tests (helpers live in unittools.py: two conftest modules
of the same name would shadow each other when imported by name)."""

from unittools import basic  # noqa: F401  (a fixture)

import hashlib
import re
from pathlib import Path

import pytest


def fake_resolve(lines, python, platform, cwd, previous, upgrade):
    """The unit tests' resolver: each named requirement pinned to 1.0 with a made-up
    hash, offline and instant. (The real one, uv against PyPI, is tested in
    tests/func/test_lock.py through the same LockStep.)"""
    out = []
    for line in lines:
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line.split("#", 1)[0])
        if m:
            name = m.group(1).lower()
            digest = hashlib.sha256(name.encode()).hexdigest()
            out.append(f"{name}==1.0 \\\n    --hash=sha256:{digest}\n")
    return "".join(sorted(out))


def fake_conda_lock(spec_path, out_path=None, *, platforms=("linux-64",), header="", **_):
    """The unit tests' conda-lock: every conda dependency at 1.0 (python at 3.11.0) and
    every pip requirement at 1.0, with made-up URLs and hashes, in conda-lock's format.
    (The real conda-lock, against a local channel, is tested in tests/func.)"""
    import yaml

    from mlbuild.backends import conda

    spec = yaml.safe_load(Path(spec_path).read_text())
    entries = []
    for platform in platforms:
        for dep in spec.get("dependencies") or []:
            items = [(d, "pip") for d in dep["pip"]] if isinstance(dep, dict) else [(dep, "conda")]
            for item, manager in items:
                name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", str(item)).group(0).lower()
                if manager == "pip" and name in conda.AZUREML_REPLACED:
                    continue
                version = "3.11.0" if name == "python" else "1.0"
                digest = hashlib.sha256(f"{manager}:{name}".encode()).hexdigest()
                url = (f"https://files.example/{name}-{version}-py3-none-any.whl"
                       if manager == "pip" else
                       f"https://conda.example/{platform}/{name}-{version}-0.conda")
                entries.append({"name": name, "version": version, "manager": manager,
                                "platform": platform, "dependencies": {}, "url": url,
                                "hash": {"sha256": digest}, "category": "main",
                                "optional": False})
    lock = {"version": 1, "metadata": {"channels": [{"url": "conda-forge", "used_env_vars": []}],
                                       "platforms": list(platforms), "sources": [Path(spec_path).name],
                                       "content_hash": {p: "x" for p in platforms}},
            "package": entries}
    out = Path(out_path) if out_path else Path(spec_path).with_name("conda-lock.yml")
    out.write_text(header + yaml.safe_dump(lock, sort_keys=False))
    return conda.LockResult(out, tuple(platforms), (), len(entries))


@pytest.fixture(autouse=True)
def _offline_locks(monkeypatch):
    from mlbuild.backends import conda
    from mlbuild.graph.steps import lock

    monkeypatch.setattr(lock, "resolve", fake_resolve)
    monkeypatch.setattr(conda, "lock", fake_conda_lock)
