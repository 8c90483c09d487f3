"""A no-code scikit-learn service without ``environment``, for real: its default
environment is locked against PyPI (uv) into ``locks/``, made once into one venv for
both services that share it, and the services answer on the process target."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import sklearn

from clitools import CLI, EXAMPLES

# The series of the scikit-learn that trained the model (train.py runs on this Python):
# what framework_version is for.
SERIES = ".".join(sklearn.__version__.split(".")[:2])
ENV = f"_nocode-scikit-learn-{SERIES}"

MANIFEST = """\
name: nocode
models:
  ridge:
    path: models/ridge.pkl
    framework: scikit-learn
    framework_version: "{series}"
services:
  ridge: {{models: [ridge]}}
  ridge-key: {{models: [ridge], auth: key}}
targets:
  dev: {{type: process, port: {port}}}
"""


def free_port() -> int:
    """The first of two consecutive free ports (the target's two services listen on port
    and port + 1), below the ephemeral range: a port the kernel hands out for it, as
    before, left port + 1 to any client connection's source port meanwhile (CI once saw
    "port 36580 ... is in use by another program")."""
    import random

    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            low = int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        first = random.randrange(max(1024, low - 12000), low - 2)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", first))
                b.bind(("127.0.0.1", first + 1))
            return first
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports below the ephemeral range")


def test_no_code_service_without_environment_deploys_and_answers(tmp_path, trained_models):
    proj = tmp_path / "nocode"
    (proj / "models").mkdir(parents=True)
    shutil.copy2(trained_models["diabetes"] / "sklearn_regression_model.pkl",
                 proj / "models/ridge.pkl")
    (proj / "mlproject.yaml").write_text(MANIFEST.format(series=SERIES, port=free_port()))
    cli = CLI(proj)
    assert f"no-code defaults: {ENV}" in cli("validate").stdout
    try:
        out = cli.json("deploy", timeout=600)
        ran = [s["id"] for s in out["steps"] if s["status"] == "ran"]
        # One lock and one venv for both services.
        assert [i for i in ran if i.startswith(("lock:", "venv:"))] == \
            [f"lock:{ENV}", f"venv:{ENV}"]
        assert {"process:dev/ridge", "process:dev/ridge-key"} <= set(ran)
        lock = (proj / f"locks/{ENV}.lock.txt").read_text()
        assert f"scikit-learn=={SERIES}." in lock and "--hash=sha256:" in lock

        sample = EXAMPLES / "diabetes/samples/input.json"
        for service in ("ridge", "ridge-key"):  # invoke sends the key
            preds = json.loads(cli("invoke", service, "--data", f"@{sample}").stdout)
            assert len(preds) == 2 and all(isinstance(p, float) for p in preds)
        assert cli.ran("deploy") == []
    finally:
        cli("down", "dev", check=None)
