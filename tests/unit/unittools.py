"""Helpers for unit tests of the graph, the state and the rendered files: small
projects written into ``tmp_path`` and run in-process through the real steps."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"

# A small project: one model, a requirements environment, a service with code.
BASIC_MANIFEST = """\
name: demo
models:
  ridge:
    path: models/ridge.pkl
    framework: scikit-learn
    description: a ridge
    tags: {area: test}
environments:
  env:
    requirements: envs/requirements.txt
services:
  svc:
    entry_script: src/score.py
    source_dir: src
    environment: env
    models: [ridge]
    auth: key
targets:
  bundle: {type: package, out: dist/package}
  dev: {type: process, port: 8890}
  local: {type: docker, port: 6789}
  k8s: {type: kubernetes, namespace: ml}
default_target: bundle
"""

BASIC_FILES = {
    "models/ridge.pkl": b"fake ridge model bytes",
    "envs/requirements.txt": "scikit-learn>=1.5\n",
    "src/score.py": "def init():\n    pass\n\ndef run(data):\n    return data\n",
    "src/util.py": "X = 1\n",
}


def write_tree(root: Path, files: dict) -> None:
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)


def make_project(root: Path, manifest: str = BASIC_MANIFEST, files: dict | None = None) -> Path:
    """Write a manifest and its files into ``root``; returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    write_tree(root, BASIC_FILES if files is None else files)
    (root / "mlproject.yaml").write_text(textwrap.dedent(manifest))
    return root


class Opened:
    """A project opened in-process: Project, StateDB, DigestCache, Registry."""

    def __init__(self, root: Path):
        from mlbuild.manifest import load_project
        from mlbuild.state.db import STATE_DIR, StateDB
        from mlbuild.state.digest import DigestCache
        from mlbuild.state.registry import Registry

        self.root = root
        self.project = load_project(root / "mlproject.yaml")
        self.db = StateDB(root / STATE_DIR)
        self.digests = DigestCache(self.db)
        self.registry = Registry(self.db, self.digests)

    def ctx(self, target: str | None = None):
        from mlbuild.graph.step import BuildContext

        return BuildContext(self.project, self.project.target(target), self.db,
                            self.digests, self.registry)

    def specs(self, target: str | None = None):
        from mlbuild.graph.planner import plan_steps

        return plan_steps(self.project, self.project.target(target), self.db)

    def execute(self, target: str | None = None, **kw):
        from mlbuild.graph.executor import execute

        return execute(self.ctx(target), self.specs(target), **kw)

    def close(self) -> None:
        self.digests.flush()
        self.db.close()


def run(root: Path, target: str | None = None, **kw):
    """One in-process ``deploy``: open, execute, close (a fresh state each time)."""
    o = Opened(root)
    try:
        return o.execute(target, **kw)
    finally:
        o.close()


def statuses(outcomes) -> dict[str, str]:
    return {o.id: o.status for o in outcomes}


@pytest.fixture
def basic(tmp_path) -> Path:
    return make_project(tmp_path / "proj")
