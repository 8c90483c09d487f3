"""The package README's commands, run as written on the real engine (issue 16, point 12).

``mlbuild deploy bundle`` of examples/diabetes (auth: key), then the README's "Build
and run" block in a shell, in the package folder, with ``SCORING_KEY`` set and a
private ``HOME``; then its "Call it" block. The only changes to the commands: the
container is detached, named and labelled (so the test can stop and remove it), its
port is a free one on 127.0.0.1, and the image is labelled for the clean-up.

Proves: the key, mounted as a file, is what the service accepts (200 with it, 401
without), and it is nowhere in what ``docker inspect`` shows.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[2]
TEST_LABEL = "dev.mlbuild.test"  # as in conftest.py: the session removes what carries it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def blocks(readme: str) -> dict[str, str]:
    """The first ``sh`` block after each ``##`` heading, by heading."""
    found = {}
    for head, body in re.findall(r"^## (.+?)\n(.*?)(?=^## |\Z)", readme, re.S | re.M):
        m = re.search(r"```sh\n(.*?)```", body, re.S)
        if m:
            found[head.strip()] = m.group(1)
    return found


def substitute(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"the README no longer says {old!r}:\n{text}"
    return text.replace(old, new)


def get(url: str, key: str | None = None, data: bytes | None = None) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers),
                                    timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:  # not listening yet (docker-proxy accepts, then resets)
        return 0, b""


@pytest.fixture
def package(tmp_path, base_image, run_id) -> Path:
    root = tmp_path / "diabetes"
    shutil.copytree(REPO / "examples/diabetes", root,
                    ignore=shutil.ignore_patterns("*.pkl", "dist", ".mlbuild", "__pycache__"))
    (root / "models").mkdir(exist_ok=True)
    subprocess.run([sys.executable, str(root / "train.py")], check=True, capture_output=True,
                   timeout=300)
    m = root / "mlproject.yaml"
    m.write_text(m.read_text().replace("name: diabetes", f"name: rd{run_id}"))
    r = subprocess.run([sys.executable, "-m", "mlbuild", "deploy", "bundle"], cwd=root,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return root / "dist/package/diabetes"


def test_readme_commands_serve_with_the_mounted_key(package, docker_client, run_id, tmp_path):
    readme = (package / "README.md").read_text()
    found = blocks(readme)
    build_and_run, call = found["Build and run"], found["Call it"]
    port, name = free_port(), f"mlbuild-test-readme-{run_id}"
    script = substitute(build_and_run, "docker build -t",
                        f"docker build -q --label {TEST_LABEL}={run_id} -t")
    script = substitute(script, "docker run --rm -p 5001:5001",
                        f"docker run -d --rm --name {name} --label {TEST_LABEL}={run_id} "
                        f"-p 127.0.0.1:{port}:5001")
    home = tmp_path / "home"
    home.mkdir()
    key = secrets.token_urlsafe(24)
    env = {**os.environ, "HOME": str(home), "SCORING_KEY": key}
    try:
        # umask 077: the strictest a user may have; the README's chmod must cope with it.
        r = subprocess.run(["bash", "-c", f"set -euo pipefail; umask 077\n{script}"],
                           cwd=package, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout + r.stderr
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while get(url + "/")[0] != 200:
            state = docker_client.containers.get(name).status
            assert state == "running" and time.monotonic() < deadline, \
                docker_client.containers.get(name).logs(tail=30).decode()
            time.sleep(0.5)
        # The README's call, as written (on the test's port): two predictions.
        r = subprocess.run(["bash", "-c", substitute(call, "127.0.0.1:5001", f"127.0.0.1:{port}")],
                           cwd=package, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert len(json.loads(r.stdout)) == 2, r.stdout
        body = (package / "samples/input.json").read_bytes()
        assert get(url + "/score", key, body)[0] == 200
        assert get(url + "/score", None, body)[0] == 401
        assert get(url + "/score", "not-the-key", body)[0] == 401
        # Nowhere in what `docker inspect` shows: the key came as a read-only file.
        attrs = docker_client.containers.get(name).attrs
        leaked = key in json.dumps(attrs)
        assert not leaked, "the key shows in docker inspect"
        (mount,) = [mt for mt in attrs["Mounts"]
                    if mt["Destination"] == "/run/secrets/mlbuild-keys"]
        assert mount["Type"] == "bind" and mount["RW"] is False
        assert oct((home / ".mlbuild-keys").stat().st_mode & 0o777) == "0o700"
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)
