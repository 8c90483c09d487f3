"""Defects found by a new-user review: data safety, escapes, auth, names, exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from clitools import CLI


def test_out_overlapping_inputs_is_invalid(cli: CLI, diabetes: Path):
    m = diabetes / "mlproject.yaml"
    text = m.read_text()
    for out in ("src", ".mlbuild/pkg", "models", ".git/x"):
        m.write_text(text.replace("out: dist/package", f"out: {out}"))
        r = cli("validate", check=3)
        assert "targets.bundle.out" in r.stderr, (out, r.stderr)
    assert (diabetes / "src/score.py").exists()


def test_clean_packages_removes_only_what_mlbuild_wrote(cli: CLI, diabetes: Path):
    cli("deploy", "bundle")
    mine = diabetes / "dist/package/notes.txt"
    mine.write_text("keep me")
    cli("clean", "--packages")
    assert mine.read_text() == "keep me"
    assert not (diabetes / "dist/package/diabetes").exists()


def test_editing_the_package_does_not_touch_the_source(cli: CLI, diabetes: Path):
    cli("deploy", "bundle")
    src = diabetes / "src/score.py"
    before = src.read_text()
    with open(diabetes / "dist/package/diabetes/app/score.py", "a") as f:
        f.write("# edited in the package\n")
    assert src.read_text() == before
    assert cli.ran("deploy", "bundle") == ["package:bundle/diabetes"] or \
        cli.ran("deploy", "bundle") == []


def test_symlink_out_of_project_in_model_folder(cli: CLI, diabetes: Path, tmp_path: Path):
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    folder = diabetes / "models/folder"
    folder.mkdir()
    (folder / "ok.bin").write_bytes(b"ok")
    os.symlink(secret, folder / "leak.txt")
    m = diabetes / "mlproject.yaml"
    m.write_text(m.read_text().replace("models:\n", "models:\n  f: {path: models/folder}\n", 1)
                 .replace("models: [ridge]", "models: [ridge, f]"))
    r = cli("deploy", "bundle", check=3)
    assert "outside the project" in r.stderr and "Traceback" not in r.stderr
    assert not (diabetes / "dist").exists()


def test_model_names_checked_and_versions_never_reused(tmp_path: Path):
    cli = CLI(tmp_path)
    (tmp_path / "m.bin").write_bytes(b"one")
    for bad in ("../../evil", "Bad Name", "x@1"):
        r = cli("models", "register", "m.bin", "--name", bad, check=3)
        assert "not valid" in r.stderr or "not a model reference" in r.stderr
    cli("models", "register", "m.bin", "--name", "foo")
    cli("models", "delete", "foo", "--yes")
    (tmp_path / "m.bin").write_bytes(b"two")
    assert cli.json("models", "register", "m.bin", "--name", "foo")["version"] == 2


def test_bad_lock_timeout_and_no_terminal(cli: CLI):
    r = cli("deploy", "bundle", check=3, env={"MLBUILD_LOCK_TIMEOUT": "abc"})
    assert "MLBUILD_LOCK_TIMEOUT" in r.stderr
    r = cli("clean", "--all", check=3)
    assert "--yes" in r.stderr


def test_runtime_refuses_auth_key_without_keys(tmp_path: Path):
    script = tmp_path / "score.py"
    script.write_text("def init():\n    pass\n\ndef run(d):\n    return d\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLBUILD_")}
    env["MLBUILD_AUTH"] = "key"
    r = subprocess.run([sys.executable, "-m", "mlbuild.runtime", "--entry-script", str(script),
                        "--host", "127.0.0.1", "--port", "0"], env=env, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode != 0
    assert "MLBUILD_AUTH_KEYS" in r.stderr + r.stdout
