"""``mlbuild profile`` on the real engine: the demo's image in containers with --cpus and
--memory (the container pinned away from the load generator), a script that sleeps 50 ms
(the latency is measured right), and one whose memory passes a 256 MB limit (the OOM
kill is reported and the recommendation stays above it)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[2]


def project(tmp_path: Path, score: str | None = None) -> Path:
    root = tmp_path / "diabetes"
    shutil.copytree(REPO / "examples/diabetes", root,
                    ignore=shutil.ignore_patterns("dist", ".mlbuild", "__pycache__"))
    if not (root / "models/sklearn_regression_model.pkl").exists():
        subprocess.run([sys.executable, "train.py"], cwd=root, check=True,
                       capture_output=True, timeout=300)
    if score is not None:
        (root / "src/score.py").write_text(score)
    return root


def profile(root: Path, *args: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "mlbuild", "--json", "profile", "diabetes",
                        "-t", "local", *args], cwd=root, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    return json.loads(r.stdout)


def no_profile_containers(docker_client) -> bool:
    return not docker_client.containers.list(all=True,
                                              filters={"label": "dev.mlbuild.profile=1"})


def readme_profile_command() -> list[str]:
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- profile-command -->\s*```sh\n(.+?)\n```", text, re.S)
    assert m, "README has no profile-command"
    return shlex.split(m.group(1).strip())


def test_readme_command_on_the_demo(tmp_path, docker_client, base_image):
    argv = readme_profile_command()
    assert argv[:3] == ["mlbuild", "profile", "diabetes"]
    root = project(tmp_path)
    r = subprocess.run([sys.executable, "-m", "mlbuild", "--json", *argv[1:]], cwd=root,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    doc = json.loads(r.stdout)
    assert doc["limited"] and doc["note"] is None
    assert [(p["cpu"], p["memory_gb"]) for p in doc["grid"]] == [(0.5, 0.5), (1, 0.5)]
    if (os.cpu_count() or 1) == 2:
        assert all(p["pinned_cpus"] == "1" and p["generator_cpus"] == [0]
                   for p in doc["grid"])
    assert doc["recommendedCpu"] in (0.5, 1) and doc["requestedCpu"] == doc["recommendedCpu"]
    assert doc["successQueries"] <= doc["totalQueries"]
    lat = [doc[f"latencyPercentile{q}InMs"] for q in (50, 90, 95, 99)]
    assert lat == sorted(lat)
    for point in doc["grid"]:
        assert point["memory_timeline"] and point["steps"]
        for s in point["steps"]:
            # the limit holds (a little over: the counter is read between samples)
            assert s["cpu_used"] is not None and 0 < s["cpu_used"] <= point["cpu"] * 1.25
            assert 0 < s["memory_peak_gb"] < 0.5
    assert 0 < doc["maxUtilizedMemoryInGB"] < doc["recommendedMemoryInGB"]
    page = (root / ".mlbuild/profile/diabetes/profile.html").read_text()
    assert page.count("<svg") >= 5  # throughput, CPU, latency per point, memory
    text = (root / "mlproject.yaml").read_text()
    assert "# The diabetes demo" in text
    assert f"resources: {{cpu: {doc['recommendedCpu']:g}, memory_gb:" in text
    assert no_profile_containers(docker_client)


SLEEPY = '''
import time

def init():
    pass

def run(raw_data):
    time.sleep(0.05)
    return [1]
'''


def test_sleeping_script_latency(tmp_path, docker_client, base_image):
    root = project(tmp_path, SLEEPY)
    doc = profile(root, "--window", "2", "--warmup", "0.3", "--cpus", "1",
                  "--memory-gb", "0.5", "--concurrency", "1")
    step = doc["grid"][0]["steps"][0]
    assert step["concurrency"] == 1
    assert abs(step["latency_ms"]["p50"] - 50) <= 10, step["latency_ms"]


HUNGRY = '''
blob = None

def init():
    global blob
    blob = b"x" * (320 * 1024 * 1024)   # a model of 320 MB, in memory

def run(raw_data):
    return [len(blob)]
'''


def test_oom_kill_is_reported(tmp_path, docker_client, base_image):
    root = project(tmp_path, HUNGRY)
    doc = profile(root, "--window", "0.5", "--warmup", "0.2", "--cpus", "1",
                  "--memory-gb", "0.25,1", "--concurrency", "1")
    by_mem = {p["memory_gb"]: p for p in doc["grid"]}
    assert by_mem[0.25]["oom_kills"] >= 1 and "out of memory" in by_mem[0.25]["died"]
    assert by_mem[1]["oom_kills"] == 0 and by_mem[1]["steps"]
    assert doc["requestedMemoryInGB"] == 1
    assert doc["recommendedMemoryInGB"] > 0.32
    assert "256" not in doc["reasons"]["memory"] or "raised" in doc["reasons"]["memory"]
    assert no_profile_containers(docker_client)
