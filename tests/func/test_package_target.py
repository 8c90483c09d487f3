"""deploy to a package target: incremental behaviour seen from the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

from clitools import CLI

ALL = ["lock:sklearn", "model:ridge", "context:diabetes", "package:bundle/diabetes"]


def edit(path: Path, text: str) -> None:
    """Change a file's content (and make sure its mtime moves)."""
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def test_deploy_then_noop(cli: CLI, diabetes: Path):
    assert cli.ran("deploy", "bundle") == ALL
    out = diabetes / "dist/package/diabetes"
    for f in ("Dockerfile", "README.md", "mlbuild-package.json", "app/score.py",
              "env/requirements.lock.txt", "models/ridge/1/sklearn_regression_model.pkl",
              "samples/input.json", "runtime/mlbuild/runtime/__init__.py"):
        assert (out / f).is_file(), f
    listed = json.loads((out / "mlbuild-package.json").read_text())["files"]
    on_disk = sorted(str(p.relative_to(out)) for p in out.rglob("*")
                     if p.is_file() and p.name != "mlbuild-package.json")
    assert sorted(listed) == on_disk
    assert cli.ran("deploy", "bundle") == []
    r = cli("deploy", "bundle")
    assert "up to date" in r.stdout


def test_edit_entry_script_runs_exactly_downstream(cli: CLI, diabetes: Path):
    cli("deploy", "bundle")
    out = diabetes / "dist/package/diabetes"
    model_file = out / "models/ridge/1/sklearn_regression_model.pkl"
    before = model_file.stat()
    score = diabetes / "src/score.py"
    edit(score, score.read_text() + "\n# a change\n")

    plan = cli.json("plan", "bundle")["steps"]
    by_id = {s["id"]: s for s in plan}
    assert by_id["model:ridge"]["status"] == "up-to-date"
    assert by_id["context:diabetes"]["reasons"] == ["input src/score.py changed"]
    assert by_id["package:bundle/diabetes"]["reasons"] == ["upstream context:diabetes will run"]

    assert cli.ran("deploy", "bundle") == ["context:diabetes", "package:bundle/diabetes"]
    assert (out / "app/score.py").read_text().endswith("# a change\n")
    after = model_file.stat()
    # unchanged files are untouched: the very same file (inode) and mtime
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)


def test_deleted_package_dir_reruns_only_package(cli: CLI, diabetes: Path):
    import shutil

    cli("deploy", "bundle")
    shutil.rmtree(diabetes / "dist/package/diabetes")
    plan = {s["id"]: s for s in cli.json("plan", "bundle")["steps"]}
    assert plan["package:bundle/diabetes"]["reasons"] == ["output dist/package/diabetes missing"]
    assert cli.ran("deploy", "bundle") == ["package:bundle/diabetes"]


def test_tampered_package_file_is_restored(cli: CLI, diabetes: Path):
    cli("deploy", "bundle")
    f = diabetes / "dist/package/diabetes/Dockerfile"
    f.unlink()
    f.write_text("FROM scratch\n")
    assert cli.ran("deploy", "bundle") == ["package:bundle/diabetes"]
    assert "mlbuild.runtime" in f.read_text()
    # a stray file in the package is noticed, and kept: mlbuild did not write it, so
    # the deploy stops naming it (tests/func/test_package_safety.py)
    stray = diabetes / "dist/package/diabetes/stray.txt"
    stray.write_text("x")
    r = cli("deploy", "bundle", check=1)
    assert "dist/package/diabetes/stray.txt was not written by mlbuild" in r.stderr
    assert stray.read_text() == "x"
    stray.unlink()
    assert cli.ran("deploy", "bundle") == []  # the package is as it was written


def test_changed_model_registers_new_version(cli: CLI, diabetes: Path):
    cli("deploy", "bundle")
    pkl = diabetes / "models/sklearn_regression_model.pkl"
    data = pkl.read_bytes()
    pkl.write_bytes(data + b"\0")  # another model content (pickle ignores trailing bytes)
    plan = {s["id"]: s for s in cli.json("plan", "bundle")["steps"]}
    assert plan["model:ridge"]["reasons"] == ["input models/sklearn_regression_model.pkl changed"]
    assert cli.ran("deploy", "bundle") == ALL[1:]  # the environment's lock stays
    versions = cli.json("models", "list", "ridge")
    assert [v["version"] for v in versions] == [1, 2]
    out = diabetes / "dist/package/diabetes"
    assert (out / "models/ridge/2/sklearn_regression_model.pkl").read_bytes() == data + b"\0"
    assert not (out / "models/ridge/1").exists()  # stale files are removed


def test_model_metadata_change_rebuilds_nothing(cli: CLI, diabetes: Path):
    cli("deploy", "bundle")
    m = diabetes / "mlproject.yaml"
    edit(m, m.read_text().replace("type: regression", "type: linear-regression"))
    assert cli.ran("deploy", "bundle") == ["model:ridge"]
    assert cli.json("models", "show", "ridge")["tags"]["type"] == "linear-regression"
    assert [v["version"] for v in cli.json("models", "list")] == [1]


def test_comments_and_key_order_change_nothing(cli: CLI, diabetes: Path):
    cli("deploy", "bundle")
    m = diabetes / "mlproject.yaml"
    text = m.read_text()
    edit(m, "# a new comment\n" + text.replace("\n", "\n", 1) + "\n# trailing comment\n")
    assert cli.ran("deploy", "bundle") == []


def test_same_fingerprints_in_two_checkouts(tmp_path, trained_models):
    from clitools import copy_example

    a = copy_example("diabetes", tmp_path / "a", trained_models)
    b = copy_example("diabetes", tmp_path / "b" / "deeper", trained_models)
    fa = {s["id"]: s["fingerprint"] for s in CLI(a).json("plan", "bundle")["steps"]}
    fb = {s["id"]: s["fingerprint"] for s in CLI(b).json("plan", "bundle")["steps"]}
    assert fa == fb
    # and after deploying both, every step's fingerprint still agrees
    CLI(a)("deploy", "bundle")
    CLI(b)("deploy", "bundle")
    fa = {s["id"]: s["fingerprint"] for s in CLI(a).json("plan", "bundle")["steps"]}
    fb = {s["id"]: s["fingerprint"] for s in CLI(b).json("plan", "bundle")["steps"]}
    assert fa == fb


def test_multi_model_service(multi: Path):
    cli = CLI(multi)
    ran = cli.ran("deploy")  # multi-model's default target is its package target
    assert "model:ridge" in ran and "model:lasso" in ran
    out = multi / "dist/package"
    svc = next(p for p in out.iterdir() if p.is_dir())
    assert (svc / "models/ridge/1").is_dir() and (svc / "models/lasso/1").is_dir()
    dockerfile = (svc / "Dockerfile").read_text()
    assert "MLBUILD_MODEL_DIR=/var/mlbuild/models \\" in dockerfile
    assert cli.ran("deploy") == []


def test_graph_formats(cli: CLI):
    text = cli("graph", "bundle").stdout
    assert "context:diabetes  <- model:ridge" in text
    dot = cli("graph", "bundle", "--format", "dot").stdout
    assert '"model:ridge" -> "context:diabetes";' in dot
    mm = cli("graph", "bundle", "--format", "mermaid").stdout
    assert mm.startswith("graph LR")


def test_kubernetes_target_without_registry_says_so(cli: CLI, diabetes: Path):
    m = diabetes / "mlproject.yaml"
    m.write_text(m.read_text().replace(
        "targets:\n", "targets:\n  staging: {type: kubernetes, namespace: ml}\n"))
    r = cli("deploy", "staging", check=3)
    assert "targets.staging: a kubernetes target needs the project's registry" in r.stderr
    assert "hint: add registry:" in r.stderr and "Traceback" not in r.stderr
    cli("deploy", "bundle")  # the other targets are not held up by it


def test_unknown_target(cli: CLI):
    r = cli("deploy", "bundel", check=3)
    assert "no target 'bundel'" in r.stderr and "did you mean 'bundle'" in r.stderr


def test_clean(cli: CLI, diabetes: Path):
    cli("deploy", "bundle")
    r = cli("clean", "--packages")
    assert "dist/package" in r.stdout
    assert not (diabetes / "dist/package").exists()
    assert not (diabetes / ".mlbuild/contexts").exists()
    # the registry survives clean: the model step finds its content registered
    data = cli.json("deploy", "bundle")
    assert [s["id"] for s in data["steps"] if s["status"] == "ran"] == ALL
    assert [v["version"] for v in cli.json("models", "list")] == [1]
