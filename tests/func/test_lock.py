"""Locked pip environments, for real against PyPI (through uv): the lock beside its
spec, re-locked only when the spec changed, a spec edit that resolves the same adds no
rebuild, Azure ML v1 packages dropped with a notice, errors that name the package,
--frozen for CI, and `mlbuild lock [--upgrade]`."""

from __future__ import annotations

import json
import re
from pathlib import Path

from clitools import CLI

LOCK = Path("envs/requirements.lock.txt")


def ran(cli: CLI, *args) -> list[str]:
    return cli.ran(*args, timeout=300)


def test_lock_lifecycle(cli: CLI, diabetes: Path):
    assert "lock:sklearn" in ran(cli, "deploy", "bundle")
    lock = diabetes / LOCK
    text = lock.read_text()
    assert text.startswith("# mlbuild lock: spec ") and "; python 3.11; platform linux" in text
    assert "scikit-learn==" in text and "--hash=sha256:" in text
    dockerfile = (diabetes / "dist/package/diabetes/Dockerfile").read_text()
    assert "--require-hashes --no-deps" in dockerfile
    # The package holds what is installed, without the spec digest of the header.
    assert (diabetes / "dist/package/diabetes/env/requirements.lock.txt").read_text() == \
        text.split("\n", 1)[1]
    assert ran(cli, "deploy", "bundle") == []

    # A spec edit that resolves to the same packages: re-locked, nothing downstream.
    spec = diabetes / "envs/requirements.txt"
    spec.write_text("# the demo's packages\n" + spec.read_text())
    out = cli.json("deploy", "bundle", timeout=300)
    steps = {s["id"]: s for s in out["steps"]}
    assert steps["lock:sklearn"]["status"] == "ran"
    assert steps["context:diabetes"]["status"] == "up-to-date"
    assert lock.read_text().split("\n", 1)[1] == text.split("\n", 1)[1]
    # ... and when the context is rebuilt for another reason, its environment file (the
    # image's environment layer) is still the same bytes.
    env_file = diabetes / "dist/package/diabetes/env/requirements.lock.txt"
    before = env_file.read_bytes()
    (diabetes / "src/score.py").write_text((diabetes / "src/score.py").read_text() + "\n#\n")
    assert "context:diabetes" in ran(cli, "deploy", "bundle")
    assert env_file.read_bytes() == before

    # By hand: nothing changed, nothing moves; --upgrade re-resolves.
    r = cli("lock")
    assert "lock:sklearn: envs/requirements.lock.txt" in r.stdout and "up to date" in r.stdout
    assert "upgraded" in cli("lock", "sklearn", "--upgrade", timeout=300).stdout


def test_azureml_packages_are_dropped_with_a_notice(cli: CLI, diabetes: Path):
    spec = diabetes / "envs/requirements.txt"
    spec.write_text(spec.read_text() + "azureml-defaults>=1.40\nazureml_core\n"
                    "inference-schema>=1.8\nazureml-monitoring\n")
    r = cli("deploy", "bundle", timeout=300)
    assert "azureml-defaults dropped from environment sklearn" in r.stderr
    assert "azureml_core dropped" in r.stderr
    assert "azureml-monitoring dropped" in r.stderr  # mlbuild.runtime.datacollect instead
    text = (diabetes / LOCK).read_text()
    assert "inference-schema==" in text and "azureml" not in text


def test_unresolvable_spec_names_the_package(cli: CLI, diabetes: Path):
    spec = diabetes / "envs/requirements.txt"
    spec.write_text(spec.read_text() + "surely-no-such-package-mlbuild-zz==1.0\n")
    before = (diabetes / LOCK).read_bytes()  # the example's committed lock
    r = cli("deploy", "bundle", check=1, timeout=300)
    assert "environment sklearn does not resolve" in r.stderr
    assert "surely-no-such-package-mlbuild-zz" in r.stderr
    assert "Traceback" not in r.stderr
    assert (diabetes / LOCK).read_bytes() == before  # left as it was


def test_frozen_refuses_a_stale_lock(cli: CLI, diabetes: Path):
    cli("deploy", "bundle", timeout=300)
    spec = diabetes / "envs/requirements.txt"
    spec.write_text(spec.read_text() + "six\n")
    before = (diabetes / LOCK).read_text()
    r = cli("deploy", "bundle", "--frozen", check=1)
    assert "envs/requirements.lock.txt does not match its spec" in r.stderr
    assert "run mlbuild lock sklearn" in r.stderr
    assert (diabetes / LOCK).read_text() == before
    cli("lock", timeout=300)
    assert "six==" in (diabetes / LOCK).read_text()
    cli("deploy", "bundle", "--frozen")


def test_inline_packages_lock_under_locks(tmp_path: Path):
    proj = tmp_path / "inline"
    proj.mkdir()
    (proj / "score.py").write_text("def init():\n    pass\n\ndef run(d):\n    return d\n")
    (proj / "m.bin").write_bytes(b"x")
    (proj / "mlproject.yaml").write_text(
        "name: inline\nmodels:\n  m: {path: m.bin}\nenvironments:\n"
        "  tiny: {python: \"3.11\", packages: [six]}\nservices:\n"
        "  s: {entry_script: score.py, environment: tiny, models: [m]}\n"
        "targets:\n  bundle: {type: package, out: dist}\n")
    cli = CLI(proj)
    cli("deploy", timeout=300)
    assert "six==" in (proj / "locks/tiny.lock.txt").read_text()
    data = json.loads(cli("--json", "lock").stdout)
    assert data[0]["id"] == "lock:tiny"


def test_a_hash_mismatch_stops_the_build_and_names_the_file(cli: CLI, diabetes: Path):
    lock = diabetes / LOCK
    text = lock.read_text()
    # joblib's hashes replaced: the files on PyPI are no longer the ones locked.
    block = text[text.index("joblib=="):].split("\n", 3)
    block = "\n".join(block[:3])
    assert block.count("--hash=sha256:") == 2
    lock.write_text(text.replace(block, re.sub(r"sha256:[0-9a-f]{64}", "sha256:" + "f" * 64, block)))
    r = cli("deploy", "bundle", "--offline", check=1, timeout=300)
    assert "FAILED      wheels:sklearn" in r.stderr
    assert "THESE PACKAGES DO NOT MATCH THE HASHES" in r.stderr and "joblib" in r.stderr
    assert "Traceback" not in r.stderr and not (diabetes / "dist/package").exists()


def test_offline_runtime_requirements_must_fit_the_lock(cli: CLI, diabetes: Path):
    """The serving runtime needs uvicorn>=0.54: a lock pinning an older one cannot make
    an offline image (it would hold both versions); said at once, naming both."""
    spec = diabetes / "envs/requirements.txt"
    spec.write_text(spec.read_text() + "uvicorn==0.29.0\n")
    r = cli("deploy", "bundle", "--offline", check=1, timeout=300)
    assert "the serving runtime's requirements conflict with the lock of environment " \
           "sklearn" in r.stderr
    assert "The user requested uvicorn<0.56 and >=0.54" in r.stderr
    assert "The user requested (constraint) uvicorn==0.29.0" in r.stderr
    assert "Traceback" not in r.stderr and not (diabetes / "dist/package").exists()
