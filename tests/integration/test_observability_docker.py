"""services.NAME.workers, collect_model_data and tracing on the real Docker engine.

- ``workers: auto`` counts the CPUs a container may use: the runtime's own
  ``available_cpus`` run in containers started with ``--cpus`` (the cgroup quota,
  rounded up) and ``--cpuset-cpus`` (the affinity), on this machine's cgroup version;
- the docker target: the image declares the variables (its ENV), two worker processes
  run, the named volume ``mlbuild-<project>-<service>-model-data`` is mounted at
  /var/mlbuild/model-data and writable by the image's user (uid 10001), the image has
  the OpenTelemetry extra, the ``OTEL_*`` variables of mlbuild's shell reach the
  container, and ``mlbuild status`` says where the records go.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[2]
MODEL_DATA = "/var/mlbuild/model-data"

PROBE = ("from mlbuild.runtime.config import ServerOptions, available_cpus; "
         "print(available_cpus(), ServerOptions.from_env({'MLBUILD_WORKERS': 'auto'}).workers)")


@pytest.mark.parametrize("limits, cpus", [
    (["--cpus", "1.5"], lambda n: min(n, 2)),  # rounded up
    (["--cpus", "0.5"], lambda n: 1),  # at least one
    (["--cpus", "1"], lambda n: 1),
    (["--cpuset-cpus", "0"], lambda n: 1),  # the affinity
    ([], lambda n: n),  # no limit: every CPU
])
def test_workers_auto_counts_the_containers_cpus(docker_client, base_image, run_id, limits,
                                                 cpus):
    host_cpus = int(subprocess.run(["docker", "run", "--rm", base_image, "nproc"],
                                   capture_output=True, text=True, check=True).stdout)
    r = subprocess.run(["docker", "run", "--rm", *limits, "--label", f"dev.mlbuild.test={run_id}",
                        "-v", f"{REPO / 'mlbuild'}:/opt/mlbuild/mlbuild:ro",
                        "-e", "PYTHONPATH=/opt/mlbuild", "-e", "PYTHONDONTWRITEBYTECODE=1",
                        base_image, "python", "-c", PROBE],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    want = cpus(host_cpus)
    assert r.stdout.split() == [str(want), str(want)], (limits, r.stdout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlbuild(root: Path, *args, check: int | None = 0, timeout: float = 900, env=None):
    import os

    r = subprocess.run([sys.executable, "-m", "mlbuild", *args], cwd=root,
                       capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    if check is not None:
        assert r.returncode == check, f"mlbuild {' '.join(args)} -> {r.returncode}\n" \
                                      f"{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture
def proj(tmp_path, docker_client, base_image, run_id):
    root = tmp_path / "diabetes"
    shutil.copytree(REPO / "examples/diabetes", root,
                    ignore=shutil.ignore_patterns("*.pkl", "dist", ".mlbuild", "__pycache__"))
    (root / "models").mkdir(exist_ok=True)
    subprocess.run([sys.executable, str(root / "train.py")], check=True, capture_output=True,
                   timeout=300)
    port = free_port()
    project = f"obs{run_id}"
    m = root / "mlproject.yaml"
    text = m.read_text().replace("name: diabetes", f"name: {project}")
    text = re.sub(r"local:\s*\{type: docker, port: \d+\}",
                  f"local: {{type: docker, port: {port}}}", text)
    m.write_text(text.replace("    auth: key\n", "    auth: key\n    workers: 2\n"
                              "    collect_model_data: true\n    tracing: true\n", 1))
    volume = f"mlbuild-{project}-diabetes-model-data"
    yield root, project, volume
    mlbuild(root, "down", "local", check=None)
    mlbuild(root, "clean", "--images", "--keep", "0", check=None)
    try:
        docker_client.volumes.get(volume).remove(force=True)
    except Exception:  # noqa: BLE001 - never created, or already gone
        pass


def test_docker_target_workers_model_data_volume_and_tracing(proj, docker_client):
    root, project, volume = proj
    mlbuild(root, "deploy", "local", env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
                                          "OTEL_SERVICE_NAME": "obs-test"})
    (row,) = json.loads(mlbuild(root, "--json", "status", "local").stdout)
    assert row["state"] == "Healthy"
    assert row["model_data"] == f"volume {volume}: diabetes/"

    c = docker_client.containers.get(f"{project}-diabetes-local")
    env = c.attrs["Config"]["Env"]
    for var in ("MLBUILD_WORKERS=2", "MLBUILD_COLLECT_MODEL_DATA=1",
                f"MLBUILD_MODEL_DATA_DIR={MODEL_DATA}", "MLBUILD_TRACING=1"):  # the image's ENV
        assert var in env, env
    image_env = docker_client.images.get(c.attrs["Config"]["Image"]).attrs["Config"]["Env"]
    assert "MLBUILD_WORKERS=2" in image_env and "MLBUILD_TRACING=1" in image_env
    # The exporter's variables of the deploying shell.
    assert "OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318" in env
    assert "OTEL_SERVICE_NAME=obs-test" in env

    (mount,) = [m for m in c.attrs["Mounts"] if m["Destination"] == MODEL_DATA]
    assert mount["Type"] == "volume" and mount["Name"] == volume and mount["RW"]
    # Writable by the container's user (uid 10001): the new volume copied the image's
    # folder, owner included.
    code, out = c.exec_run(["sh", "-c", f"id -u && stat -c %u {MODEL_DATA} && "
                                        f"touch {MODEL_DATA}/probe && echo ok"])
    assert code == 0 and out.decode().split() == ["10001", "10001", "ok"], out
    # The OpenTelemetry extra is installed in the image.
    code, out = c.exec_run(["python", "-c", "import opentelemetry.sdk.trace, "
                                            "opentelemetry.exporter.otlp.proto.http"])
    assert code == 0, out
    # Two worker processes (multiprocessing's spawned children) serve. (The probe's
    # own command line must not hold the word it looks for.)
    code, out = c.exec_run(["python", "-c", "import os; word = b'spawn' + b'_main'; print(sum("
                            "word in open(f'/proc/{p}/cmdline', 'rb').read() "
                            "for p in os.listdir('/proc') if p.isdigit()))"])
    assert code == 0 and out.decode().strip() == "2", out


def test_docker_target_model_data_in_a_folder_of_ones_own(proj, docker_client):
    root, project, _ = proj
    m = root / "mlproject.yaml"
    m.write_text(m.read_text().replace("    collect_model_data: true\n",
                                       "    collect_model_data: {path: records}\n"))
    mlbuild(root, "deploy", "local")
    (row,) = json.loads(mlbuild(root, "--json", "status", "local").stdout)
    assert row["state"] == "Healthy"
    assert row["model_data"] == f"{root / 'records'}/diabetes/"
    c = docker_client.containers.get(f"{project}-diabetes-local")
    (mount,) = [m for m in c.attrs["Mounts"] if m["Destination"] == MODEL_DATA]
    assert mount["Type"] == "bind" and mount["Source"] == str(root / "records") and mount["RW"]
    # mlbuild made the folder, writable by the container's user.
    code, out = c.exec_run(["sh", "-c", f"touch {MODEL_DATA}/probe && echo ok"])
    assert code == 0 and out.decode().strip() == "ok", out
    assert (root / "records/probe").exists()
