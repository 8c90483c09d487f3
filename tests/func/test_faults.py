"""Bad input, kills, a second process, a corrupt state: the state stays consistent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from clitools import CLI

ALL = ["lock:sklearn", "model:ridge", "context:diabetes", "package:bundle/diabetes"]


def add_big_model(project: Path, files: int, size: int) -> None:
    """Add a folder model ``big`` of many files to the service."""
    big = project / "models" / "big"
    big.mkdir()
    for i in range(files):
        (big / f"part-{i:03}.bin").write_bytes(os.urandom(size))
    m = project / "mlproject.yaml"
    m.write_text(m.read_text().replace(
        "models:\n", "models:\n  big: {path: models/big}\n", 1).replace(
        "models: [ridge]", "models: [ridge, big]"))


def test_bad_manifest_exit_3_no_traceback_no_state(cli: CLI, diabetes: Path):
    m = diabetes / "mlproject.yaml"
    m.write_text(m.read_text().replace("environment: sklearn", "environment: skl"))
    r = cli("deploy", "bundle", check=3)
    assert "services.diabetes.environment" in r.stderr
    assert "did you mean 'sklearn'" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (diabetes / ".mlbuild").exists()
    r = cli("--verbose", "validate", check=3)
    assert "Traceback" in r.stderr
    # --json: stdout is JSON even then, naming the field and its line.
    r = cli("--json", "validate", check=3)
    (problem,) = json.loads(r.stdout)["error"]["problems"]
    assert problem["path"] == "services.diabetes.environment" and problem["line"] > 0
    assert "did you mean 'sklearn'" in problem["message"]
    r = cli("--json", "deploy", "--no-such-flag", check=3)
    assert "--no-such-flag" in json.loads(r.stdout)["error"]["message"]


def test_kill_after_step_output_before_record(cli: CLI, diabetes: Path):
    """SIGKILL after the context step wrote its output but before it was recorded."""
    cli("deploy", "bundle", check=-signal.SIGKILL,
            env={"MLBUILD_DEBUG_KILL_AFTER": "context:diabetes"})
    plan = {s["id"]: s for s in cli.json("plan", "bundle")["steps"]}
    assert plan["model:ridge"]["status"] == "up-to-date"
    assert plan["context:diabetes"]["status"] == "would-run"
    assert plan["package:bundle/diabetes"]["status"] == "would-run"
    assert cli.ran("deploy", "bundle") == ["context:diabetes", "package:bundle/diabetes"]
    assert cli.ran("deploy", "bundle") == []
    leftovers = [p.name for p in (diabetes / ".mlbuild/contexts").iterdir()]
    assert leftovers == ["diabetes"]


def test_kill_at_random_moments_converges(cli: CLI, diabetes: Path):
    """Kill deploys at several moments; the next run finishes and the result is sound."""
    add_big_model(diabetes, files=200, size=64 * 1024)
    for delay in (0.15, 0.3, 0.45, 0.6, 0.8):
        p = subprocess.Popen([sys.executable, "-m", "mlbuild", "deploy", "bundle", "--force"],
                             cwd=diabetes, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        cli("deploy", "bundle")
        assert cli.ran("deploy", "bundle") == []
    out = diabetes / "dist/package/diabetes"
    assert len(list((out / "models/big").rglob("*.bin"))) == 200
    assert [x.name for x in out.parent.iterdir()] == ["diabetes"]


def test_ctrl_c_exits_130(cli: CLI, diabetes: Path):
    """SIGINT while a step runs: exit 130, no traceback, the next run finishes."""
    add_big_model(diabetes, files=400, size=256 * 1024)  # keeps the model step busy
    p = subprocess.Popen([sys.executable, "-m", "mlbuild", "deploy", "bundle"], cwd=diabetes,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stderr:  # wait until a step is running, then interrupt it
            if line.split()[:2] == ["run", "model:big"]:
                p.send_signal(signal.SIGINT)
                break
        out, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    cli("deploy", "bundle")
    assert cli.ran("deploy", "bundle") == []


def test_second_process_waits_then_times_out(cli: CLI, diabetes: Path):
    from mlbuild.state.lock import ProjectLock

    cli("deploy", "bundle")
    lock = ProjectLock(diabetes / ".mlbuild", timeout=5)
    lock.acquire()
    try:
        r = cli("deploy", "bundle", check=2, env={"MLBUILD_LOCK_TIMEOUT": "0.5"})
        assert "waiting for another mlbuild process" in r.stderr
        assert "has held" in r.stderr and "MLBUILD_LOCK_TIMEOUT" in r.stderr
    finally:
        lock.release()
    # held for a while, then released: the second process waits and succeeds
    lock.acquire()
    threading.Timer(0.7, lock.release).start()
    r = cli("deploy", "bundle", env={"MLBUILD_LOCK_TIMEOUT": "20"})
    assert "waiting for another mlbuild process" in r.stderr


def test_corrupt_state_db_names_the_file(cli: CLI, diabetes: Path):
    cli("deploy", "bundle")
    db = diabetes / ".mlbuild/state.db"
    for extra in ("state.db-wal", "state.db-shm"):
        (diabetes / ".mlbuild" / extra).unlink(missing_ok=True)
    db.write_bytes(b"this is not a database" * 100)
    r = cli("deploy", "bundle", check=2)
    assert str(db) in r.stderr and "Traceback" not in r.stderr
    assert "mv " in r.stderr  # the hint says what to do


def test_missing_model_file_says_what_to_do(cli: CLI, diabetes: Path):
    (diabetes / "models/sklearn_regression_model.pkl").unlink()
    r = cli("deploy", "bundle", check=3)
    assert "models.ridge.path" in r.stderr
    assert "Traceback" not in r.stderr
