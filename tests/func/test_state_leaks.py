"""No manifest, source folder or registered model carries mlbuild's state into a build
context or a package (issue 16: "no manifest or registered folder can carry the state
or a file from outside the project into a package"), whatever name leads to it: a
symlink into ``.mlbuild`` (also one spelt ``.MLBUILD``), a symlinked folder, a hard
link to state.db or a key file. Plus the smaller findings of the same review: a
state.db that is a directory, ``status`` on a full disk, a requirements file that is
not UTF-8.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from clitools import CLI
from test_state_safety import leave_free, small_disk  # noqa: F401 (a fixture)

SQLITE_MAGIC = b"SQLite format 3\x00"
KEYS = "PRIMARY-KEY-abc\nSECONDARY-KEY-def\n"
NO_CRASH = ("Traceback", "mlbuild broke")


def leaked(proj: Path) -> list[str]:
    """Files of the state found where a package's content is made or kept: the build
    contexts, the blob store, the package folders and downloaded models."""
    secrets = {p.read_bytes() for p in (proj / ".mlbuild/secrets").rglob("*") if p.is_file()}
    found = []
    for where in (proj / ".mlbuild/contexts", proj / ".mlbuild/blobs", proj / "dist",
                  proj / "downloaded"):
        for p in where.rglob("*"):
            if p.is_file() and not p.is_symlink():
                data = p.read_bytes()
                if data.startswith(SQLITE_MAGIC) or data in secrets:
                    found.append(str(p.relative_to(proj)))
    return found


def edit(proj: Path, old: str, new: str) -> int:
    """Replace ``old`` in the manifest; returns the line ``new`` is on."""
    m = proj / "mlproject.yaml"
    text = m.read_text()
    assert old in text
    text = text.replace(old, new, 1)
    m.write_text(text)
    return next(i for i, line in enumerate(text.splitlines(), 1) if new in line)


def with_keys(proj: Path) -> Path:
    """A key file like the ones a process or docker deploy writes."""
    keys = proj / ".mlbuild/secrets/dev/diabetes.keys"
    keys.parent.mkdir(parents=True)
    keys.write_text(KEYS)
    return keys


def refused(r: subprocess.CompletedProcess) -> str:
    for wrong in NO_CRASH:
        assert wrong not in r.stderr, r.stderr
    assert "error: " in r.stderr, r.stderr
    return r.stderr


# -- manifest paths --------------------------------------------------------------------

# (field, what the manifest says, what it is changed to, the link made: path -> target)
MANIFEST_LINKS = {
    "source_dir": ("services.diabetes.source_dir", "source_dir: src", "source_dir: app",
                   ("app", ".mlbuild")),
    "source_dir (case)": ("services.diabetes.source_dir", "source_dir: src",
                          "source_dir: .MLBUILD", (".MLBUILD", ".mlbuild")),
    "entry_script": ("services.diabetes.entry_script", "entry_script: src/score.py",
                     "entry_script: src/entry.py", ("src/entry.py", "../.mlbuild/state.db")),
    "schema.input": ("services.diabetes.schema.input", "input: samples/input.json",
                     "input: samples/in.json", ("samples/in.json", "../.mlbuild/state.db")),
    "model file": ("models.ridge.path", "path: models/sklearn_regression_model.pkl",
                   "path: models/leak.pkl", ("models/leak.pkl", "../.mlbuild/state.db")),
    "model folder": ("models.ridge.path", "path: models/sklearn_regression_model.pkl",
                     "path: models/all", ("models/all", "../.mlbuild")),
    "requirements": ("environments.sklearn.requirements",
                     "requirements: envs/requirements.txt", "requirements: envs/req.txt",
                     ("envs/req.txt", "../.mlbuild/state.db")),
}


@pytest.mark.parametrize("case", MANIFEST_LINKS)
def test_a_manifest_path_linked_into_the_state_is_refused(cli: CLI, diabetes: Path, case):
    field, old, new, (link, target) = MANIFEST_LINKS[case]
    cli("deploy", "bundle")
    os.symlink(target, diabetes / link)
    line = edit(diabetes, old, new)
    value = new.split(": ", 1)[1]
    r = cli("validate", check=3)
    err = refused(r)
    assert f"mlproject.yaml:{line}: {field}: {value!r} resolves to " in err, err
    assert ".mlbuild/, the folder of mlbuild's state, which holds the services' keys: " \
           "point at a file or folder of your own" in err, err
    cli("deploy", "bundle", check=3)
    assert leaked(diabetes) == []


def test_a_manifest_file_hard_linked_to_the_state_is_refused(cli: CLI, diabetes: Path):
    cli("deploy", "bundle")
    os.link(diabetes / ".mlbuild/state.db", diabetes / "samples/in.json")
    line = edit(diabetes, "input: samples/input.json", "input: samples/in.json")
    err = refused(cli("validate", check=3))
    assert f"mlproject.yaml:{line}: services.diabetes.schema.input: 'samples/in.json' is a " \
           "hard link to .mlbuild/state.db, mlbuild's state, which holds the services' keys" \
           in err, err
    cli("deploy", "bundle", check=3)
    assert leaked(diabetes) == []


# -- files of a source or model folder (checked when the step reads them) --------------

def test_a_symlink_in_the_source_folder_into_the_state_is_refused(cli: CLI, diabetes: Path):
    cli("deploy", "bundle")
    (diabetes / "src/leak.db").symlink_to("../.mlbuild/state.db")
    cli("validate")  # the manifest itself is fine
    err = refused(cli("deploy", "bundle", check=3))
    assert "services.diabetes.source_dir: src/leak.db resolves to '.mlbuild/state.db', " \
           "inside .mlbuild/" in err, err
    assert "hint: remove the link" in err, err
    assert leaked(diabetes) == []
    (diabetes / "src/leak.db").unlink()
    cli("deploy", "bundle")


@pytest.mark.parametrize("folder", ["models/ridge", "."])
def test_a_link_in_a_model_folder_into_the_state_is_refused(cli: CLI, diabetes: Path, folder):
    # In models/ridge the link also leaves the folder, which the registry refused
    # before (with another message). A model folder holding the state folder (the
    # project's own: allowed without a package target) registered state.db.
    cli("deploy", "bundle")
    (diabetes / folder).mkdir(exist_ok=True)
    (diabetes / "models/sklearn_regression_model.pkl").rename(diabetes / folder / "model.pkl")
    up = "../" * len(Path(folder).parts) if folder != "." else ""
    (diabetes / folder / "keys.db").symlink_to(f"{up}.mlbuild/state.db")
    edit(diabetes, "path: models/sklearn_regression_model.pkl", f"path: {folder}")
    edit(diabetes, "bundle: {type: package, out: dist/package}", "")
    err = refused(cli("build", "local", check=3))  # the model step fails first
    assert f"models.ridge.path: {folder}/keys.db resolves to '.mlbuild/state.db', " \
           "inside .mlbuild/" in err, err
    assert leaked(diabetes) == []
    assert [v["version"] for v in cli.json("models", "list")] == [1]


@pytest.mark.parametrize("what", ["state.db", "a key file"])
def test_a_hard_link_to_the_state_in_the_source_folder_is_refused(cli: CLI, diabetes: Path,
                                                                   what):
    cli("deploy", "bundle")
    keys = with_keys(diabetes)
    private = diabetes / ".mlbuild/state.db" if what == "state.db" else keys
    os.link(private, diabetes / "src/hard.db")
    err = refused(cli("deploy", "bundle", check=3))
    shown = private.relative_to(diabetes).as_posix()
    assert f"src/hard.db is a hard link to {shown}, mlbuild's state, which holds the " \
           "services' keys: mlbuild does not read it" in err, err
    assert "hint: remove the link (rm src/hard.db)" in err, err
    assert leaked(diabetes) == []


def test_hard_links_to_files_of_ones_own_are_kept(cli: CLI, diabetes: Path, tmp_path: Path):
    # A hard link to a file outside the project is a copy the user could make; one
    # between two files of the project is nothing to refuse either.
    outside = tmp_path / "helpers.py"
    outside.write_text("X = 1\n")
    os.link(outside, diabetes / "src/helpers.py")
    os.link(diabetes / "src/score.py", diabetes / "src/score_twin.py")
    cli("deploy", "bundle")
    with_keys(diabetes)
    (diabetes / "src/score.py").write_text((diabetes / "src/score.py").read_text() + "#\n")
    assert cli.ran("deploy", "bundle") == ["context:diabetes", "package:bundle/diabetes"]
    app = diabetes / "dist/package/diabetes/app"
    assert (app / "helpers.py").read_text() == "X = 1\n"
    assert (app / "score_twin.py").read_text() == (app / "score.py").read_text()


# -- models register -------------------------------------------------------------------

REGISTERED = {
    "the state folder": (".mlbuild", "it is .mlbuild/, the folder of mlbuild's state"),
    "state.db": (".mlbuild/state.db", "it is inside .mlbuild/, the folder of mlbuild's state"),
    "a link to the folder": ("state-link", "it resolves to .mlbuild/, the folder of"),
    "a link to state.db": ("db-link", "it resolves to '.mlbuild/state.db', inside .mlbuild/"),
    "a hard link to state.db": ("hard.db", "it is a hard link to .mlbuild/state.db, "
                                           "mlbuild's state"),
    "a hard link to a key file": ("hard.keys", "it is a hard link to "
                                               ".mlbuild/secrets/dev/diabetes.keys"),
    "the folder holding it": (".", "db-link resolves to '.mlbuild/state.db', inside "),
}


@pytest.mark.parametrize("case", REGISTERED)
def test_models_register_refuses_the_state(tmp_path: Path, case):
    path, says = REGISTERED[case]
    cli = CLI(tmp_path)  # the registry of a folder without a manifest
    cli("models", "list")  # makes the state
    with_keys(tmp_path)
    (tmp_path / "state-link").symlink_to(".mlbuild")
    (tmp_path / "db-link").symlink_to(".mlbuild/state.db")
    os.link(tmp_path / ".mlbuild/state.db", tmp_path / "hard.db")
    os.link(tmp_path / ".mlbuild/secrets/dev/diabetes.keys", tmp_path / "hard.keys")
    err = refused(cli("models", "register", path, "--name", "ridge", check=3))
    assert f"cannot register {path}: " in err and says in err, err
    assert cli.json("models", "list") == []
    cli("models", "download", "ridge", "-o", "downloaded", check=3)  # nothing to download
    assert leaked(tmp_path) == []


# -- smaller findings ------------------------------------------------------------------

def test_a_state_db_that_is_a_directory_is_said_so(tmp_path: Path):
    (tmp_path / ".mlbuild/state.db").mkdir(parents=True)
    err = refused(CLI(tmp_path)("models", "list", check=2))
    assert ".mlbuild/state.db is a directory, not the database file" in err, err
    assert "yours to read and write" not in err and "SQLITE_CANTOPEN" not in err, err
    assert "hint: look at what it holds and move it aside (mv " in err, err


def test_a_state_db_replaced_by_a_directory_where_a_state_was(cli: CLI, diabetes: Path):
    cli("deploy", "bundle")
    db = diabetes / ".mlbuild/state.db"
    db.unlink()
    db.mkdir()
    err = refused(cli("status", check=2))
    assert "state.db is a directory, not the database file" in err, err
    assert "yours to read and write" not in err and "mlbuild state reset" in err, err
    cli("state", "reset")  # moves the directory aside
    assert db.is_file()


def test_status_only_reads_so_it_answers_on_a_full_disk(small_disk, trained_models):  # noqa: F811
    from clitools import copy_example

    proj = copy_example("diabetes", small_disk, trained_models)
    cli = CLI(proj)
    cli("deploy", "bundle")
    leave_free(small_disk, 0)
    r = cli("status")
    assert "dev     diabetes" in r.stdout and "not deployed" in r.stdout, r.stdout + r.stderr
    assert cli.json("status")  # --json too
    # A verb that writes still says the disk is full.
    r = cli("keys", "diabetes", "-t", "local", check=2)
    assert "no space left" in r.stderr, r.stderr
    (small_disk / "filler").unlink()
    cli("status")


def test_requirements_that_are_not_utf8_are_an_input_error(cli: CLI, diabetes: Path):
    req = diabetes / "envs/requirements.txt"
    req.write_bytes(req.read_bytes() + "# café\n".encode("latin-1"))
    err = refused(cli("deploy", "bundle", check=3))
    assert "environments.sklearn.requirements: envs/requirements.txt is not UTF-8 text " \
           "(byte 0xe9 on line 4)" in err, err
    assert "hint: save envs/requirements.txt as UTF-8" in err, err
