"""A package target never deletes a file mlbuild did not write (issue 16, point 7).

A deploy replaces ``<out>/<service>/`` as a whole; it removes only the files listed
in that folder's ``mlbuild-package.json`` (the record of what mlbuild wrote there).
A folder holding anything else makes the deploy stop, naming the file, with nothing
deleted; the manifest check refuses an ``out`` holding any path the project reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from clitools import CLI


def set_out(project: Path, out: str) -> None:
    m = project / "mlproject.yaml"
    m.write_text(m.read_text().replace("out: dist/package", f"out: {out}"))


def edit_score(project: Path) -> None:
    score = project / "src/score.py"
    score.write_text(score.read_text() + "\n# a change\n")


def test_samples_below_out_are_refused_and_kept(cli: CLI, diabetes: Path):
    # The case: `out: pkg` with the schema samples under pkg/<service>/.
    samples = diabetes / "pkg/diabetes"
    samples.mkdir(parents=True)
    for name in ("input.json", "output.json"):
        (diabetes / "samples" / name).rename(samples / name)
    m = diabetes / "mlproject.yaml"
    m.write_text(m.read_text().replace("samples/input.json", "pkg/diabetes/input.json")
                 .replace("samples/output.json", "pkg/diabetes/output.json"))
    set_out(diabetes, "pkg")
    r = cli("validate", check=3)
    assert "targets.bundle.out: 'pkg' overlaps 'pkg/diabetes/input.json' " \
           "(services.diabetes.schema.input)" in r.stderr, r.stderr
    cli("deploy", "bundle", check=3)
    assert sorted(p.name for p in samples.iterdir()) == ["input.json", "output.json"]


def test_a_file_of_the_user_in_the_package_folder_stops_the_deploy(cli: CLI, diabetes: Path):
    cli("deploy", "bundle")
    pkg = diabetes / "dist/package/diabetes"
    notes = pkg / "notes.txt"
    notes.write_text("mine")
    before = (pkg / "app/score.py").read_text()
    edit_score(diabetes)
    r = cli("deploy", "bundle", check=1)
    assert "dist/package/diabetes/notes.txt was not written by mlbuild" in r.stderr, r.stderr
    assert "hint:" in r.stderr and "Traceback" not in r.stderr
    assert notes.read_text() == "mine"
    assert (pkg / "app/score.py").read_text() == before  # nothing replaced either
    assert [p.name for p in pkg.parent.iterdir()] == ["diabetes"]  # no staging left
    notes.unlink()
    assert cli.ran("deploy", "bundle") == ["package:bundle/diabetes"]
    assert (pkg / "app/score.py").read_text().endswith("# a change\n")


def test_a_folder_mlbuild_never_wrote_is_not_replaced(cli: CLI, diabetes: Path):
    pkg = diabetes / "dist/package/diabetes"
    (pkg / "data").mkdir(parents=True)
    (pkg / "data/mine.csv").write_text("a,b\n")
    r = cli("deploy", "bundle", check=1)
    assert "dist/package/diabetes/data/mine.csv was not written by mlbuild" in r.stderr
    assert "Traceback" not in r.stderr
    assert (pkg / "data/mine.csv").read_text() == "a,b\n"
    # An empty folder (made ahead, say by `mkdir -p`) holds nothing to lose.
    (pkg / "data/mine.csv").unlink()
    cli("deploy", "bundle")
    assert (pkg / "mlbuild-package.json").is_file() and not (pkg / "data").exists()


def test_a_symlink_in_place_of_the_package_folder_is_left(cli: CLI, diabetes: Path):
    mine = diabetes / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    (diabetes / "dist/package").mkdir(parents=True)
    (diabetes / "dist/package/diabetes").symlink_to(mine)
    r = cli("deploy", "bundle", check=1)
    assert "dist/package/diabetes is a symbolic link" in r.stderr, r.stderr
    assert (diabetes / "dist/package/diabetes").is_symlink()
    assert (mine / "keep.txt").read_text() == "mine"


def test_files_beside_the_package_folders_are_kept(cli: CLI, diabetes: Path):
    # `out` may hold the user's files beside mlbuild's <service>/ folders, even ones
    # named like mlbuild's staging folders.
    out = diabetes / "dist/package"
    out.mkdir(parents=True)
    keep = {".diabetes.tmp-notes": "a file", ".diabetes.old-1/x.txt": "in a folder",
            ".env.tmp-backup": "other", "readme.txt": "mine"}
    for rel, text in keep.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    cli("deploy", "bundle")
    edit_score(diabetes)
    cli("deploy", "bundle")
    for rel, text in keep.items():
        assert (out / rel).read_text() == text, rel


def test_a_record_naming_files_outside_the_folder_deletes_nothing(cli: CLI, diabetes: Path):
    cli("deploy", "bundle")
    pkg = diabetes / "dist/package/diabetes"
    record = pkg / "mlbuild-package.json"
    data = json.loads(record.read_text())
    data["files"]["../../../src/score.py"] = data["files"]["app/score.py"]
    record.write_text(json.dumps(data))
    r = cli("deploy", "bundle", check=1)
    assert "mlbuild-package.json" in r.stderr and "Traceback" not in r.stderr
    assert (diabetes / "src/score.py").is_file()
    assert (pkg / "Dockerfile").is_file()  # nothing removed


def test_a_killed_deploy_leaves_nothing_behind_and_deletes_nothing_of_the_user(
        cli: CLI, diabetes: Path):
    """Staging folders of a killed run are removed by the next one; only mlbuild's."""
    from mlbuild.graph.steps.package import PACKAGE_MANIFEST, STAGING_MARK

    cli("deploy", "bundle")
    out = diabetes / "dist/package"
    # A stage killed while being filled (it carries the mark) ...
    killed = out / ".diabetes.tmp-abcd1234"
    (killed / "app").mkdir(parents=True)
    (killed / STAGING_MARK).write_text("")
    (killed / "app/score.py").write_text("x")
    # ... and an old package killed while being removed, holding a file of the user
    # that appeared in the last moment: the recorded files go, the user's stays.
    old = out / ".diabetes.old-99999"
    (old / "models").mkdir(parents=True)
    (old / "models/m.pkl").write_text("x")
    (old / "late.txt").write_text("mine")
    (old / PACKAGE_MANIFEST).write_text(json.dumps({"files": {"models/m.pkl": "sha256:0"}}))
    edit_score(diabetes)
    cli("deploy", "bundle")
    assert not killed.exists()
    assert sorted(str(p.relative_to(old)) for p in old.rglob("*")) == ["late.txt"]


def test_a_dir_in_place_of_a_recorded_file_is_the_users(cli: CLI, diabetes: Path):
    cli("deploy", "bundle")
    pkg = diabetes / "dist/package/diabetes"
    (pkg / "README.md").unlink()
    (pkg / "README.md").mkdir()
    (pkg / "README.md/mine.txt").write_text("mine")
    r = cli("deploy", "bundle", check=1)
    assert "dist/package/diabetes/README.md/mine.txt was not written by mlbuild" in r.stderr
    assert (pkg / "README.md/mine.txt").read_text() == "mine"


def test_recorded_files_are_rewritten_even_when_edited(cli: CLI, diabetes: Path):
    # NOTE: the paths listed in the record are mlbuild's: an edited Dockerfile is
    # written again (the package is an output; tests/func/test_package_target.py
    # restores a tampered one the same way).
    cli("deploy", "bundle")
    f = diabetes / "dist/package/diabetes/Dockerfile"
    os.chmod(f, 0o644)
    f.unlink()
    f.write_text("FROM scratch\n")
    assert cli.ran("deploy", "bundle") == ["package:bundle/diabetes"]
    assert "FROM scratch" not in f.read_text()
