"""services.NAME.workers, collect_model_data and tracing through the CLI on the process
target: the release really runs N worker processes, its runtime gets the collection
variables (the folder under .mlbuild/model-data/TARGET, made) and the tracing flag, its
venv has the OpenTelemetry extra, and `mlbuild status` says where the records go while
everything else it says stays as it was. (Schema errors, the image, kubernetes:
tests/unit/test_observability_manifest.py; the docker target:
tests/integration/test_observability_docker.py.)"""

from __future__ import annotations

import os
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from clitools import CLI, free_port


def configure(proj: Path, settings: str, port: int) -> None:
    """The diabetes service with ``settings`` (YAML lines), the dev target on ``port``."""
    m = proj / "mlproject.yaml"
    lines = "".join(f"    {line}\n" for line in settings.strip().splitlines())
    text = m.read_text().replace("    auth: key\n", f"    auth: key\n{lines}", 1)
    m.write_text(re.sub(r"dev:\s*\{type: process, port: \d+\}",
                        f"dev: {{type: process, port: {port}}}", text))


def workers_of(pid: int) -> list[int]:
    """The worker processes (multiprocessing's spawned children) of ``pid``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"spawn_main" in cmdline:
            out.append(int(entry))
    return out


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def score(url: str, proj: Path, key: str) -> int:
    req = urllib.request.Request(url + "/score", data=(proj / "samples/input.json").read_bytes(),
                                 method="POST", headers={"Content-Type": "application/json",
                                                         "Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status


def concurrent_scores(url: str, proj: Path, key: str, n: int, clients: int) -> int:
    """``n`` POST /score from ``clients`` threads at once (so that both workers answer
    some); every answer must be 200. The number sent."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(clients) as pool:
        statuses = list(pool.map(lambda _: score(url, proj, key), range(n)))
    assert statuses == [200] * n
    return n


def worker_score_count(pid: int) -> float:
    """The POST /score requests one worker counted: its own histogram file alone
    (metrics.py writes histogram_PID.db in the folder of MLBUILD_METRICS_DIR), read by
    prometheus_client's multiprocess collector from a folder of its own."""
    import shutil
    import tempfile

    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    folder = environ_of(pid)["MLBUILD_METRICS_DIR"]
    with tempfile.TemporaryDirectory() as alone:
        for name in os.listdir(folder):
            if name.startswith(f"histogram_{pid}") and name.endswith(".db"):
                shutil.copy(os.path.join(folder, name), alone)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, alone)
        return sum(smp.value for fam in registry.collect()
                   if fam.name == "http_server_request_duration_seconds"
                   for smp in fam.samples if smp.name.endswith("_count")
                   and smp.labels.get("http_route") == "/score"
                   and smp.labels.get("http_request_method") == "POST")


@pytest.fixture
def dev(diabetes):
    cli = CLI(diabetes)
    yield cli
    cli("down", "dev", check=None)


def test_process_target_runs_two_workers_with_collection_and_tracing(dev):
    proj, port = dev.cwd, free_port()
    configure(proj, "workers: 2\ncollect_model_data: true\ntracing: true", port)
    dev("deploy", timeout=900)

    (row,) = dev.json("status", "dev")
    assert row["state"] == "Healthy" and row["url"] == f"http://127.0.0.1:{port}"
    assert row["model_data"] == ".mlbuild/model-data/dev/diabetes/"
    pid = row["pid"]
    deadline = time.monotonic() + 10
    while len(workers_of(pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(workers_of(pid)) == 2, workers_of(pid)
    log = (proj / ".mlbuild/logs/dev/diabetes.log").read_text()
    assert "workers=2" in log

    env = environ_of(pid)
    assert env["MLBUILD_WORKERS"] == "2"
    assert env["MLBUILD_COLLECT_MODEL_DATA"] == "1"
    assert env["MLBUILD_MODEL_DATA_DIR"] == str(proj / ".mlbuild/model-data/dev")
    assert (proj / ".mlbuild/model-data/dev").is_dir()
    assert env["MLBUILD_TRACING"] == "1"
    # The release's venv carries the OpenTelemetry extra.
    exe = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()  # venv's
    assert "/.mlbuild/venvs/" in exe
    subprocess.run([exe, "-c", "import opentelemetry.sdk.trace, "
                               "opentelemetry.exporter.otlp.proto.http"], check=True)

    key = dev.json("keys", "diabetes")["primary"]
    for _ in range(4):
        assert score(row["url"], proj, key) == 200

    # One scrape of /metrics counts every request, whichever worker answered it.
    sent = 4 + concurrent_scores(row["url"], proj, key, n=60, clients=8)
    with urllib.request.urlopen(row["url"] + "/metrics", timeout=30) as r:
        families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    counted = sum(smp.value for smp in families["http_server_request_duration_seconds"].samples
                  if smp.name.endswith("_count") and smp.labels.get("http_route") == "/score"
                  and smp.labels.get("http_request_method") == "POST")
    assert counted == sent == 64
    # ... and both workers answered some of them (each writes files of its own).
    per_worker = [worker_score_count(w) for w in workers_of(pid)]
    assert sum(per_worker) == sent and min(per_worker) > 0, per_worker

    # The status table says where the records go; nothing else of it changed.
    table = dev("status", "dev").stdout
    assert "model data: .mlbuild/model-data/dev/diabetes/" in table
    assert "Healthy" in table

    # Left out again: one worker, no collection, and the status has no model data.
    text = (proj / "mlproject.yaml").read_text()
    (proj / "mlproject.yaml").write_text(re.sub(
        r"    (workers|collect_model_data|tracing): .*\n", "", text))
    dev("deploy", timeout=900)
    (row,) = dev.json("status", "dev")
    assert row["state"] == "Healthy" and row["model_data"] is None
    assert workers_of(row["pid"]) == []
    env = environ_of(row["pid"])
    assert not {"MLBUILD_WORKERS", "MLBUILD_COLLECT_MODEL_DATA", "MLBUILD_TRACING"} & set(env)
    assert "model data" not in dev("status", "dev").stdout


def test_collection_to_a_folder_of_ones_own_and_to_stdout(dev):
    proj, port = dev.cwd, free_port()
    configure(proj, "collect_model_data: {path: records}", port)
    dev("deploy", timeout=900)
    (row,) = dev.json("status", "dev")
    assert row["model_data"] == "records/diabetes/"
    assert environ_of(row["pid"])["MLBUILD_MODEL_DATA_DIR"] == str(proj / "records")
    assert (proj / "records").is_dir()

    text = (proj / "mlproject.yaml").read_text()
    (proj / "mlproject.yaml").write_text(text.replace("collect_model_data: {path: records}",
                                                      "collect_model_data: {to: stdout}"))
    assert "process:dev/diabetes" in dev.ran("deploy", timeout=900)
    (row,) = dev.json("status", "dev")
    assert row["model_data"] == "stdout (in .mlbuild/logs/dev/diabetes.log)"
    assert environ_of(row["pid"])["MLBUILD_MODEL_DATA_DIR"] == "-"


def test_a_bad_value_is_refused_naming_the_field(diabetes):
    cli = CLI(diabetes)
    m = diabetes / "mlproject.yaml"
    original = m.read_text()
    for setting, says in (("workers: 0", "services.diabetes.workers: must be at least 1, got 0"),
                          ("workers: many", "services.diabetes.workers: 'many' must be a number "
                                            "of worker processes (1 to 64) or auto"),
                          ("collect_model_data: sometimes",
                           "services.diabetes.collect_model_data: expected true or false or a "
                           "mapping")):
        m.write_text(original.replace("    auth: key\n", f"    auth: key\n    {setting}\n", 1))
        r = cli("validate", check=None)
        assert r.returncode != 0
        line = m.read_text().splitlines().index(f"    {setting}") + 1
        assert f"mlproject.yaml:{line}: {says}" in r.stdout + r.stderr, r.stdout + r.stderr


def test_offline_package_carries_the_otel_wheels_of_a_tracing_service_only(diabetes):
    """An offline package builds with --network none: a tracing service's context holds
    the wheels of the OpenTelemetry extra too, another service's on the same environment
    stays as it was. (tests/integration: the image built from it imports them.)"""
    m = diabetes / "mlproject.yaml"
    text = m.read_text().replace("    auth: key\n", "    auth: key\n    tracing: true\n", 1)
    text = text.replace("targets:\n", "  plain:\n    entry_script: src/score.py\n"
                        "    source_dir: src\n    environment: sklearn\n    models: [ridge]\n\n"
                        "targets:\n", 1)
    m.write_text(text.replace("bundle: {type: package, out: dist/package}",
                              "bundle: {type: package, out: dist/package, offline: true}"))
    cli = CLI(diabetes)
    cli("deploy", "bundle", timeout=900)
    traced, plain = diabetes / "dist/package/diabetes", diabetes / "dist/package/plain"
    assert any(w.name.startswith("opentelemetry_sdk-") for w in (traced / "wheels").iterdir())
    assert "opentelemetry-sdk" in (traced / "env/runtime-requirements.txt").read_text()
    assert not any(w.name.startswith("opentelemetry") for w in (plain / "wheels").iterdir())
    assert "opentelemetry" not in (plain / "env/runtime-requirements.txt").read_text()
    assert "MLBUILD_TRACING" not in (plain / "Dockerfile").read_text()
