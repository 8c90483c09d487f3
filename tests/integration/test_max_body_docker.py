"""The docker target on the real engine: services.NAME.max_body_mb reaches the container
(the image's environment) so that a body over it gets 413 and one under it 200, a change
of it replaces the container; and the container's json-file log is rotated by size."""

from __future__ import annotations

import json
import re
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlbuild(root: Path, *args, check: int | None = 0, timeout: float = 900):
    r = subprocess.run([sys.executable, "-m", "mlbuild", *args], cwd=root,
                       capture_output=True, text=True, timeout=timeout)
    if check is not None:
        assert r.returncode == check, f"mlbuild {' '.join(args)} -> {r.returncode}\n" \
                                      f"{r.stdout}\n{r.stderr}"
    return r


def set_limit(root: Path, mb: float) -> None:
    m = root / "mlproject.yaml"
    text = re.sub(r"\n    max_body_mb: .*", "", m.read_text())
    m.write_text(text.replace("    auth: key\n", f"    auth: key\n    max_body_mb: {mb}\n", 1))


def post(url: str, body: bytes, key: str) -> int:
    req = urllib.request.Request(url + "/score", data=body, method="POST", headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def body_of(root: Path, size: int) -> bytes:
    body = (root / "samples/input.json").read_bytes().rstrip()
    return body + b" " * (size - len(body))


@pytest.fixture
def proj(tmp_path, docker_client, base_image, run_id):
    root = tmp_path / "diabetes"
    shutil.copytree(REPO / "examples/diabetes", root,
                    ignore=shutil.ignore_patterns("*.pkl", "dist", ".mlbuild", "__pycache__"))
    (root / "models").mkdir(exist_ok=True)
    subprocess.run([sys.executable, str(root / "train.py")], check=True, capture_output=True,
                   timeout=300)
    port = free_port()
    m = root / "mlproject.yaml"
    m.write_text(re.sub(r"local:\s*\{type: docker, port: \d+\}",
                        f"local: {{type: docker, port: {port}}}",
                        m.read_text().replace("name: diabetes", f"name: mb{run_id}")))
    yield root, f"http://127.0.0.1:{port}"
    mlbuild(root, "down", "local", check=None)
    mlbuild(root, "clean", "--images", "--keep", "0", check=None)


def test_docker_target_body_limit_and_bounded_log(proj, docker_client):
    root, url = proj
    set_limit(root, 0.01)  # 10486 bytes
    mlbuild(root, "deploy", "local")
    key = json.loads(mlbuild(root, "--json", "keys", "diabetes", "-t", "local").stdout)["primary"]
    assert post(url, body_of(root, 10_000), key) == 200
    assert post(url, body_of(root, 11_000), key) == 413

    assert json.loads(mlbuild(root, "--json", "status", "local").stdout)[0]["state"] == "Healthy"
    attrs = docker_client.containers.get(_container(root)).attrs
    assert "MLBUILD_MAX_BODY_BYTES=10486" in attrs["Config"]["Env"]  # the image's ENV
    if docker_client.info().get("LoggingDriver") == "json-file":  # the engine's default
        assert attrs["HostConfig"]["LogConfig"] == {
            "Type": "json-file", "Config": {"max-size": "10m", "max-file": "3"}}

    set_limit(root, 0.02)
    out = json.loads(mlbuild(root, "--json", "deploy", "local").stdout)
    ran = [s["id"] for s in out["steps"] if s["status"] == "ran"]
    assert "image:diabetes" in ran and "container:local/diabetes" in ran
    env = docker_client.containers.get(_container(root)).attrs["Config"]["Env"]
    assert "MLBUILD_MAX_BODY_BYTES=20972" in env  # the new image's ENV
    # The retired release gets SIGTERM as the deploy returns and closes its listener a
    # moment later (its event loop's next turn): until then SO_REUSEPORT may still hand it
    # a new connection. Within a few seconds only the new release answers.
    deadline = time.monotonic() + 5
    while post(url, body_of(root, 11_000), key) != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    for _ in range(5):
        assert post(url, body_of(root, 11_000), key) == 200
    assert post(url, body_of(root, 21_000), key) == 413


def _container(root: Path) -> str:
    text = (root / "mlproject.yaml").read_text()
    project = re.search(r"^name: (\S+)", text, re.M).group(1)
    return f"{project}-diabetes-local"
