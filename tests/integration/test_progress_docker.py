"""Progress of pushes and pulls on the real engine and registry (issue 16, point 18):
with stderr not a terminal (CI logs), ``mlbuild push`` and a build that pulls print
plain progress lines with byte counts, a bounded number of them, never ``\\r``; with
--json, stdout stays one JSON document and no progress is printed.

The project is examples/diabetes with a unique name and registry path, and a file of
random bytes in its source folder, so its last layer is new to the registry and the
push moves bytes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[2]


def mlbuild(root: Path, *args, check: int = 0, timeout: float = 900):
    env = {k: v for k, v in os.environ.items() if k != "TERM"}
    r = subprocess.run([sys.executable, "-m", "mlbuild", *args], cwd=root, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == check, f"mlbuild {' '.join(args)} -> {r.returncode}\n" \
                                  f"{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def proj(tmp_path_factory, docker_client, registry, base_image, run_id):
    root = tmp_path_factory.mktemp("progress") / "diabetes"
    shutil.copytree(REPO / "examples/diabetes", root,
                    ignore=shutil.ignore_patterns("*.pkl", "dist", ".mlbuild", "__pycache__"))
    (root / "models").mkdir(exist_ok=True)
    subprocess.run([sys.executable, str(root / "train.py")], check=True, capture_output=True,
                   timeout=300)
    (root / "src/noise.bin").write_bytes(os.urandom(3_000_000))
    m = root / "mlproject.yaml"
    m.write_text(m.read_text().replace(
        "name: diabetes", f"name: pg{run_id}\nregistry: {registry}/pg-{run_id}"))
    yield root
    subprocess.run([sys.executable, "-m", "mlbuild", "clean", "--images", "--keep", "0"],
                   cwd=root, capture_output=True, timeout=300)


def progress_lines(stderr: str, verb: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"  {verb} ")]


def test_push_prints_plain_progress_lines(proj: Path, run_id):
    r = mlbuild(proj, "push", "local")
    assert "\r" not in r.stderr
    (done,) = progress_lines(r.stderr, "pushed")
    m = re.fullmatch(rf"  pushed +pg{run_id}-diabetes:[0-9a-f]{{16}}  (\d+\.\d) MB, "
                     r"\d+ layers(?: \(\d+ already there\))? in (\d+\.\d) s", done)
    assert m, done
    assert float(m.group(1)) >= 3.0  # at least the new layer's bytes
    # while it lasted, a line every 5 s at most
    assert len(progress_lines(r.stderr, "pushing")) <= 1 + float(m.group(2)) / 5


def image_tag(docker_client, registry: str, run_id: str) -> str:
    repo = f"{registry}/pg-{run_id}/pg{run_id}-diabetes"
    (image,) = docker_client.images.list(name=repo)
    return next(t for t in image.tags if t.startswith(repo + ":"))


def test_pull_prints_plain_progress_lines(proj: Path, docker_client, registry, run_id):
    docker_client.images.remove(image_tag(docker_client, registry, run_id), force=True)
    r = mlbuild(proj, "build", "local")
    assert "\r" not in r.stderr
    (done,) = progress_lines(r.stderr, "pulled")
    assert re.fullmatch(rf"  pulled +pg{run_id}-diabetes:[0-9a-f]{{16}}  \d+\.\d MB, \d+ "
                        r"layers?(?: \(\d+ already there\))? in \d+\.\d s", done), done


def test_json_keeps_progress_off(proj: Path):
    r = mlbuild(proj, "push", "local", "--force", "--json")
    json.loads(r.stdout)
    assert not progress_lines(r.stderr, "pushed") and not progress_lines(r.stderr, "pushing")
