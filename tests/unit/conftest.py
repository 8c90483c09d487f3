"""Fixtures of the unit tests (helpers live in unittools.py: two conftest modules
of the same name would shadow each other when imported by name)."""

from unittools import basic  # noqa: F401  (a fixture)

import hashlib
import re

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


@pytest.fixture(autouse=True)
def _offline_locks(monkeypatch):
    from mlbuild.graph.steps import lock

    monkeypatch.setattr(lock, "resolve", fake_resolve)
