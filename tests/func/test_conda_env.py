"""conda environments through the product: a project whose service runs in a conda
environment, locked by the real conda-lock (against the local fixture channel, through
the micromamba stand-in; tests/condafixture) as a graph step, installed from the lock
(py-rattler) for the process target, and answering on 127.0.0.1.

The fixture's ``python`` links to this machine's interpreter in a venv-style prefix
(condachannel.with_interpreter), so the environment really runs: its tinypkg comes
from the conda lock and its six from the lock's pip section.

Covers: the lock beside the spec with mlbuild's header, a second deploy doing nothing,
a spec edit that locks the same packages (re-locked; no environment nor service
rebuilt), --frozen refusing a stale lock ("run mlbuild lock"), `mlbuild lock` by hand,
the Azure ML v1 rule on a v1-style spec, a missing solver and a spec without pip
saying what to do, and an offline package whose conda archives and wheels come from
the content-addressed cache (fetched once).
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "condafixture"))

from condachannel import V1_SPEC, make_channel, with_interpreter
from fakemicromamba import write_solver

from clitools import CLI, free_port

from mlbuild.backends import conda

TIMEOUT = 300


@pytest.fixture(scope="module")
def channel(tmp_path_factory):
    python = os.path.realpath(sys.executable)
    return make_channel(tmp_path_factory.mktemp("conda-channel"), with_interpreter(python))


@pytest.fixture(scope="module")
def solver(tmp_path_factory) -> Path:
    return write_solver(tmp_path_factory.mktemp("conda-solver"))


SPEC = V1_SPEC

MANIFEST = """\
name: condademo
environments:
  tiny:
    conda: envs/myenv.yml
services:
  echo:
    entry_script: score.py
    environment: tiny
targets:
  dev: {{type: process, port: {port}}}
  bundle: {{type: package, out: dist/bundle, offline: true}}
default_target: dev
"""

SCORE = """\
import json

import six
import tinypkg


def init():
    pass


def run(data):
    return {"tinypkg": tinypkg.__version__, "six": six.__version__, "echo": json.loads(data)}
"""


@pytest.fixture
def project(tmp_path, channel, solver):
    root = tmp_path / "condademo"
    (root / "envs").mkdir(parents=True)
    (root / "envs/myenv.yml").write_text(SPEC.format(channel=channel.url))
    (root / "score.py").write_text(SCORE)
    port = free_port()
    (root / "mlproject.yaml").write_text(MANIFEST.format(port=port))
    cli = CLI(root)
    env = {"MLBUILD_CONDA_EXE": str(solver),
           "MLBUILD_PYPI_TO_CONDA_MAPPING": str(channel.mapping)}
    os.environ.update(env)  # the CLI child processes inherit it
    try:
        yield root, cli, port
    finally:
        cli("down", "dev", check=None)
        for k in env:
            os.environ.pop(k, None)


def score(port: int, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/score",
                                 data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def test_a_conda_service_locks_installs_and_serves(project):
    root, cli, port = project
    r = cli("deploy", timeout=TIMEOUT)
    assert "azureml-defaults dropped from environment tiny" in r.stderr
    lock = root / "envs/myenv.conda-lock.yml"
    text = lock.read_text()
    assert text.startswith("# mlbuild lock: spec ") and "; platforms linux-64\n" in text
    assert "tinypkg" in text and "six" in text and "azureml" not in text
    # six as the lock's pip section pinned it (the installed one, not any six).
    (six,) = conda.locked_packages(lock, manager="pip")
    assert score(port, {"x": 1}) == {"tinypkg": "1.1", "six": six.version, "echo": {"x": 1}}

    assert cli.ran("deploy", timeout=TIMEOUT) == []
    # The same spec checked out with CRLF line endings is the same spec.
    spec = root / "envs/myenv.yml"
    spec.write_bytes(spec.read_bytes().replace(b"\n", b"\r\n"))
    assert cli.ran("deploy", "--frozen", timeout=TIMEOUT) == ["lock:tiny"]
    assert lock.read_text() == text

    # A spec edit that locks the same packages: re-locked, nothing else.
    spec = root / "envs/myenv.yml"
    spec.write_text("# the service's environment\n" + spec.read_text())
    out = cli.json("deploy", timeout=TIMEOUT)
    ran = [s["id"] for s in out["steps"] if s["status"] == "ran"]
    assert ran == ["lock:tiny"]
    assert lock.read_text().split("\n", 1)[0] != text.split("\n", 1)[0]  # the new spec's digest
    assert score(port, {"y": 2})["echo"] == {"y": 2}

    # CI: a spec edit without its lock is refused, the lock left alone.
    spec.write_text(spec.read_text().replace("tinypkg>=1.0", "tinypkg>=1.0,<1.1"))
    before = lock.read_bytes()
    r = cli("deploy", "--frozen", check=1, timeout=TIMEOUT)
    assert "envs/myenv.conda-lock.yml does not match its spec" in r.stderr
    assert "run mlbuild lock tiny" in r.stderr and "Traceback" not in r.stderr
    assert lock.read_bytes() == before

    # By hand, then deployed: the environment moves to tinypkg 1.0.
    r = cli("lock", "tiny", timeout=TIMEOUT)
    assert "lock:tiny: envs/myenv.conda-lock.yml" in r.stdout
    ran = cli.ran("deploy", timeout=TIMEOUT)
    assert "venv:tiny" in ran and "process:dev/echo" in ran and "lock:tiny" not in ran
    assert score(port, {})["tinypkg"] == "1.0"


def test_conda_errors_say_what_to_do(project, channel):
    root, cli, _ = project
    r = cli("deploy", check=3, env={"MLBUILD_CONDA_EXE": "", "PATH": "/usr/bin:/bin"},
            timeout=TIMEOUT)
    assert "need a conda solver" in r.stderr and "install micromamba" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (root / "envs/myenv.conda-lock.yml").exists()

    spec = root / "envs/myenv.yml"
    spec.write_text(spec.read_text().replace("tinypkg>=1.0", "tinypkg>=7"))
    r = cli("deploy", check=1, timeout=TIMEOUT)
    assert "environment tiny does not resolve (envs/myenv.yml)" in r.stderr
    assert "tinypkg >=7" in r.stderr and "Traceback" not in r.stderr

    spec.write_text(f"channels:\n  - {channel.url}\ndependencies:\n  - python=3.11\n"
                    "  - tinypkg\n")
    r = cli("deploy", check=3, timeout=TIMEOUT)
    assert "envs/myenv.conda-lock.yml has no pip for linux-64" in r.stderr
    assert "add pip to the dependencies of envs/myenv.yml" in r.stderr


def test_offline_package_fetches_every_file_once(project):
    root, cli, _ = project
    out = cli.json("deploy", "bundle", timeout=TIMEOUT)
    wheels = next(s for s in out["steps"] if s["id"] == "wheels:tiny")
    assert wheels["status"] == "ran"
    pkg = root / "dist/bundle/echo"
    conda_pkgs = sorted(p.name for p in (pkg / "conda-pkgs").iterdir())
    assert conda_pkgs == ["pip-24.0-pyhd8ed1ab_0.tar.bz2", "python-3.11.0-0.tar.bz2",
                          "tinydep-0.2-pyhd8ed1ab_0.tar.bz2", "tinypkg-1.1-pyhd8ed1ab_0.tar.bz2"]
    names = {p.name.split("-")[0].lower() for p in (pkg / "wheels").iterdir()}
    assert {"six", "py_rattler", "pyyaml"} <= names
    dockerfile = (pkg / "Dockerfile").read_text()
    assert "--packages /opt/mlbuild-env/conda-pkgs" in dockerfile
    assert "--no-index" in dockerfile and "AS conda-env" in dockerfile

    # Again from a clean state: the cache holds every file, nothing is downloaded.
    first = wheels["summary"].split(" (")[0]
    files = sorted(p.relative_to(pkg) for p in pkg.rglob("*") if p.is_file())
    cli("clean")
    out = cli.json("deploy", "bundle", timeout=TIMEOUT)
    wheels = next(s for s in out["steps"] if s["id"] == "wheels:tiny")
    assert wheels["summary"] == f"{first} (0 downloaded)"
    assert sorted(p.relative_to(pkg) for p in pkg.rglob("*") if p.is_file()) == files


def test_a_hash_mismatch_stops_the_build_and_names_the_file(project):
    import yaml

    root, cli, _ = project
    cli("lock", timeout=TIMEOUT)
    lock = root / "envs/myenv.conda-lock.yml"
    text = lock.read_text()
    (tinydep,) = [p for p in yaml.safe_load(text)["package"] if p["name"] == "tinydep"]
    # The channel's archive is no longer the one locked (as if replaced upstream).
    lock.write_text(text.replace(tinydep["hash"]["sha256"], "f" * 64))
    r = cli("deploy", "bundle", check=1, timeout=TIMEOUT)
    assert "FAILED      wheels:tiny" in r.stderr
    assert "tinydep-0.2-pyhd8ed1ab_0.tar.bz2: sha256 " in r.stderr
    assert f"is not the locked {'f' * 64} (tinydep 0.2)" in r.stderr
    assert "Traceback" not in r.stderr and not (root / "dist/bundle").exists()
