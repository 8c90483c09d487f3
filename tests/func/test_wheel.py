"""The wheel carries templates/ and schemas/ and works outside the checkout."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_installs_and_deploys(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels),
                    str(REPO)], check=True, capture_output=True, timeout=600)
    wheel = next(wheels.glob("mlbuild-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for f in ("mlbuild/_templates/Dockerfile.j2", "mlbuild/_templates/package-README.md.j2",
              "mlbuild/_schemas/mlproject.schema.json", "mlbuild/runtime/requirements.txt"):
        assert f in names, f
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin/pip"), "install", "-q", str(wheel)],
                   check=True, capture_output=True, timeout=600)
    proj = tmp_path / "proj"
    proj.mkdir()

    def run(*args):
        r = subprocess.run([str(venv / "bin/mlbuild"), *args], cwd=proj, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return r

    run("init")
    run("validate")
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    m = proj / "mlproject.yaml"
    m.write_text(m.read_text().replace("port: 8890", f"port: {port}"))
    try:
        run("deploy")  # the default target: the runtime from the wheel, as a process
        out = run("invoke", "proj", "--data", "@samples/input.json").stdout
        assert out.strip() and "error" not in out.lower(), out
    finally:
        subprocess.run([str(venv / "bin/mlbuild"), "down"], cwd=proj, capture_output=True,
                       timeout=120)
    run("deploy", "bundle")
    pkg = proj / "dist/package/proj"
    assert (pkg / "Dockerfile").is_file()
    assert (pkg / "runtime/mlbuild/runtime/server.py").is_file()
    r = subprocess.run([str(venv / "bin/python"), "-c",
                        "import mlbuild.resources as r; print(r.templates_dir())"],
                       capture_output=True, text=True, check=True, cwd=tmp_path)
    assert str(REPO) not in r.stdout  # found inside the installed wheel, not the checkout
