"""The examples' READMEs' Docker half: "as dist/package/SERVICE/README.md says, docker
build and docker run the package" (onnx-nocode, multi-model), run as that README
writes it, and the service answers its "Call it" command with samples/output.json.

The rest of the examples' READMEs runs without Docker in
tests/func/test_example_readmes.py. The adaptations here: a free port for the fixed
one, and a label on what docker makes, so that the session's clean-up (conftest.py)
removes it. (The diabetes package, with key auth: tests/integration/test_package_readme.py.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[2]
TEST_LABEL = "dev.mlbuild.test"  # conftest.py's: what it removes after the session


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def block(readme: str, heading: str) -> list[str]:
    """The commands of the ```sh block under ``## heading``, continuation lines joined."""
    section = readme.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    text = re.search(r"```sh\n(.*?)\n```", section, re.S).group(1)
    return [ln.strip() for ln in text.replace("\\\n", " ").splitlines() if ln.strip()]


def close(a, b) -> bool:
    """``a == b``, floats within 1e-6 relative."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b, rel=1e-6, abs=1e-12)
    return a == b


@pytest.mark.parametrize("example, service", [("onnx-nocode", "iris"),
                                              ("multi-model", "compare")])
def test_package_builds_and_serves_as_its_readme_says(example, service, tmp_path,
                                                      docker_client, base_image, run_id):
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "--",
                             f"examples/{example}"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.split()
    for f in listed:  # what a clone holds: no trained model, no dist/
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, tmp_path / f)
    proj = tmp_path / "examples" / example
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for cmd in ("python train.py", "mlbuild deploy"):  # the README's, before "Then"
        r = subprocess.run(cmd, shell=True, cwd=proj, env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, f"{cmd}\n{r.stdout}\n{r.stderr}"
    pkg = proj / "dist" / "package" / service
    readme = (pkg / "README.md").read_text()
    port = free_port()
    label = f"--label {TEST_LABEL}={run_id}"
    server = None
    try:
        for cmd in block(readme, "Build and run"):
            cmd = re.sub(r"^docker (build|run) ", rf"docker \1 {label} ", cmd)
            if cmd.startswith("docker run "):
                cmd, n = re.subn(r" -p \d+:", f" -p {port}:", cmd)
                assert n == 1, cmd
                server = subprocess.Popen(cmd, shell=True, cwd=pkg, start_new_session=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True)
                continue
            r = subprocess.run(cmd, shell=True, cwd=pkg, capture_output=True, text=True,
                               timeout=900)
            assert r.returncode == 0, f"{cmd}\n{r.stdout}\n{r.stderr}"
        assert server is not None, "the package README runs nothing"
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    if r.read() == b"Healthy":
                        break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, \
                server.stdout.read() if server.poll() is not None else "not Healthy in 120 s"
            time.sleep(0.5)
        (call,) = block(readme, "Call it")
        r = subprocess.run(re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{port}", call), shell=True,
                           cwd=pkg, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert close(json.loads(r.stdout), json.loads((proj / "samples/output.json").read_text()))
        # The samples feed the generated /swagger.json.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/swagger.json", timeout=10) as r:
            definitions = json.loads(r.read())["definitions"]
        assert definitions["ServiceInput"]["example"] == \
            json.loads((proj / "samples/input.json").read_text())
    finally:
        if server is not None:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)  # docker run passes it on; --rm
            server.communicate(timeout=60)
        tag = re.search(r"docker build .*-t (\S+)", " ".join(block(readme, "Build and run")))
        for c in docker_client.containers.list(all=True, filters={
                "label": f"{TEST_LABEL}={run_id}", "ancestor": tag.group(1)}):
            c.remove(force=True)  # had SIGTERM not stopped it
