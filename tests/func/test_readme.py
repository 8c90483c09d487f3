"""The README's main command works on a fresh copy of the repository."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def readme_block(heading: str, n: int = 0) -> str:
    """The n-th fenced block after a README heading."""
    text = (REPO / "README.md").read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```\w*\n(.*?)\n```", section, re.S)[n]


def readme_command(marker: str) -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(rf"<!-- {marker} -->\s*```sh\n(.+?)\n```", text, re.S)
    assert m, f"README has no {marker}"
    return m.group(1).strip()


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci/run").read_text()
    assert readme_command("test-command") in ci


@pytest.mark.slow
def test_readme_main_command_on_a_fresh_copy(tmp_path):
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    dest = tmp_path / "repo"
    for f in files:
        src = REPO / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    cmd = readme_command("main-command")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    try:
        r = subprocess.run(cmd, shell=True, cwd=dest, capture_output=True, text=True, env=env,
                           timeout=900)
        assert r.returncode == 0, \
            f"{cmd}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"
        # The service answered the README's invoke with two predictions.
        preds = json.loads(r.stdout.strip().splitlines()[-1])
        assert len(preds) == 2 and all(isinstance(p, float) for p in preds), r.stdout
        # and the same deploy again is a no-op; the service is Healthy
        r = subprocess.run(".venv/bin/mlbuild deploy", shell=True, cwd=dest, capture_output=True,
                           text=True, env=env, timeout=300)
        assert r.returncode == 0 and "up to date" in r.stdout, r.stdout + r.stderr
        r = subprocess.run(".venv/bin/mlbuild status", shell=True, cwd=dest,
                           capture_output=True, text=True, env=env, timeout=60)
        assert "Healthy" in r.stdout, r.stdout + r.stderr
    finally:
        if (dest / ".venv/bin/mlbuild").exists():
            subprocess.run(".venv/bin/mlbuild down", shell=True, cwd=dest, env=env, timeout=120,
                           capture_output=True)


def test_readme_azmlinfsrv_swap_command_serves(tmp_path):
    """The "Coming from azmlinfsrv" command, run as written (plus a free port)."""
    import socket
    import sys
    import time
    import urllib.request

    cmd = readme_command("azmlinfsrv-swap")
    assert cmd.startswith("mlbuild serve ")
    (tmp_path / "score.py").write_text(
        "import os\n\ndef init():\n    global d\n    d = os.environ['AZUREML_MODEL_DIR']\n\n"
        "def run(raw):\n    return {'model_dir': d, 'body': raw}\n")
    (tmp_path / "models").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = cmd.split()[1:] + ["--port", str(port)]
    p = subprocess.Popen([sys.executable, "-m", "mlbuild", *args], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/score", data=b"hi")
                with urllib.request.urlopen(req, timeout=2) as r:
                    answer = json.loads(r.read())
                break
            except OSError:
                assert time.monotonic() < deadline and p.poll() is None, p.stdout.read()
                time.sleep(0.1)
        assert answer == {"model_dir": "./models", "body": "hi"}
    finally:
        p.terminate()
        p.communicate(timeout=30)


@pytest.mark.slow
def test_readme_quickstart_runs_as_written(tmp_path):
    """Every Quickstart command, in order, in a new folder named my-proj; and the plan
    the README shows after an edit of src/score.py is the one mlbuild prints."""
    import signal
    import sys
    import time
    import urllib.request

    proj = tmp_path / "my-proj"
    proj.mkdir()
    lines = [ln.split("#", 1)[0].strip() for ln in readme_block("Quickstart").splitlines()]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    try:
        for line in filter(None, lines):
            assert line.startswith("mlbuild "), line
            if "--reload" in line:
                p = subprocess.Popen(line, shell=True, cwd=proj, env=env, start_new_session=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                try:
                    deadline = time.monotonic() + 60
                    while True:
                        try:
                            req = urllib.request.Request(
                                "http://127.0.0.1:5001/score",
                                data=(proj / "samples/input.json").read_bytes())
                            with urllib.request.urlopen(req, timeout=2) as r:
                                assert r.status == 200
                            break
                        except OSError:
                            assert time.monotonic() < deadline and p.poll() is None, p.stdout.read()
                            time.sleep(0.2)
                finally:
                    os.killpg(p.pid, signal.SIGINT)
                    p.communicate(timeout=30)
                continue
            r = subprocess.run(line, shell=True, cwd=proj, env=env, capture_output=True,
                               text=True, timeout=600)
            assert r.returncode == 0, f"{line}\n{r.stdout}\n{r.stderr}"
        subprocess.run("mlbuild deploy", shell=True, cwd=proj, env=env, check=True,
                       capture_output=True, timeout=600)
        score = proj / "src/score.py"
        score.write_text(score.read_text() + "\n# an edit\n")
        r = subprocess.run("mlbuild plan", shell=True, cwd=proj, env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.stdout.strip() == readme_block("Quickstart", 1).strip()
    finally:
        subprocess.run("mlbuild down", shell=True, cwd=proj, env=env, capture_output=True,
                       timeout=120)


def test_readme_benchmark_scripts_start():
    """Every benchmark the README lists exists and parses its arguments (`--help`);
    the measurements themselves are run by hand."""
    import sys

    lines = readme_block("Benchmarks").splitlines()
    scripts = [line.split()[1] for line in lines if line.startswith("python bench/")]
    assert len(scripts) == len(lines) and len(scripts) >= 7
    for script in scripts:
        r = subprocess.run([sys.executable, str(REPO / script), "--help"], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0 and "usage:" in r.stdout, f"{script}: {r.stderr}"
