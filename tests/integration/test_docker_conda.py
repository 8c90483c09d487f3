"""A conda environment in an image, on the real engine: the lock made by the real
conda-lock (local fixture channel, tests/condafixture) is installed in the Dockerfile's
builder stage by mlbuild's py-rattler installer, the pip section and the runtime's
requirements by the environment's pip, and only /opt/conda reaches the image.

The fixture channel is a folder on this machine (file:// URLs a build cannot reach), so
the docker target is ``offline: true``: every conda archive and wheel comes from the
build context. The same package directory then builds with ``docker build --network
none``. The fixture's ``python`` links to the base image's /usr/bin/python3.11 in a
venv-style prefix (condachannel.with_interpreter), whose pip is Debian's.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "condafixture"))

from condachannel import V1_SPEC, make_channel, with_interpreter
from fakemicromamba import write_solver

pytestmark = pytest.mark.docker

SPEC = V1_SPEC

MANIFEST = """\
name: it{run_id}c
environments:
  tiny:
    conda: envs/environment.yml
services:
  echo:
    entry_script: score.py
    environment: tiny
targets:
  local: {{type: docker, port: {port}, offline: true}}
  bundle: {{type: package, out: dist/bundle, offline: true}}
"""

SCORE = """\
import json
import sys

import six
import tinypkg


def init():
    pass


def run(data):
    return {"tinypkg": tinypkg.__version__, "six": six.__version__,
            "prefix": sys.prefix, "echo": json.loads(data)}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory, docker_client, base_image, run_id):
    tmp = tmp_path_factory.mktemp("docker-conda")
    channel = make_channel(tmp / "fixture", with_interpreter("/usr/bin/python3.11",
                                                             system_site=True))
    solver = write_solver(tmp / "solver")
    root = tmp / "proj"
    (root / "envs").mkdir(parents=True)
    (root / "envs/environment.yml").write_text(SPEC.format(channel=channel.url))
    (root / "score.py").write_text(SCORE)
    port = free_port()
    (root / "mlproject.yaml").write_text(MANIFEST.format(run_id=run_id, port=port))
    env = {"MLBUILD_CONDA_EXE": str(solver), "MLBUILD_PYPI_TO_CONDA_MAPPING": str(channel.mapping)}

    def mlbuild(*args, check: int | None = 0):
        import os

        r = subprocess.run([sys.executable, "-m", "mlbuild", *args], cwd=root,
                           capture_output=True, text=True, timeout=900,
                           env={**os.environ, **env})
        if check is not None:
            assert r.returncode == check, f"mlbuild {' '.join(args)} -> {r.returncode}\n" \
                                          f"{r.stdout}\n{r.stderr}"
        return r

    yield root, mlbuild, port
    mlbuild("down", "local", check=None)
    mlbuild("clean", "--images", "--keep", "0", check=None)


def test_conda_service_in_a_container(project, docker_client):
    root, mlbuild, port = project
    out = json.loads(mlbuild("--json", "deploy", "local").stdout)
    ran = [s["id"] for s in out["steps"] if s["status"] == "ran"]
    assert {"lock:tiny", "wheels:tiny", "context:echo+offline", "image:echo",
            "container:local/echo"} <= set(ran)
    req = urllib.request.Request(f"http://127.0.0.1:{port}/score", data=b'{"x": 1}',
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        body = json.loads(r.read())
    assert body["tinypkg"] == "1.1" and body["prefix"] == "/opt/conda"
    assert body["echo"] == {"x": 1} and body["six"]

    again = json.loads(mlbuild("--json", "deploy", "local").stdout)
    assert [s["id"] for s in again["steps"] if s["status"] == "ran"] == []


def test_offline_conda_package_builds_without_network(project, offline, run_id):
    root, mlbuild, _ = project
    mlbuild("deploy", "bundle")
    pkg = root / "dist/bundle/echo"
    tag = f"it{run_id}-conda-offline:1"
    r = offline.build(pkg, tag)
    assert r.returncode == 0, r.stdout + r.stderr
    r = offline.run(tag, "python", "-c",
                    "import sys, tinypkg, six; print(sys.prefix, tinypkg.__version__); "
                    "import importlib.util as u; print(u.find_spec('rattler'))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["/opt/conda", "1.1", "None"]  # no py-rattler in the image
    listing = offline.run(tag, "sh", "-c", "ls /opt/mlbuild-env /opt/mlbuild-installer 2>&1; true",
                          timeout=60).stdout
    assert "conda-pkgs" not in listing and "No such file" in listing
