"""mlbuild.state.guard: what keeps the state (state.db, the keys) out of a project's
inputs, whatever name leads to it; and the smaller fixes of the same review (a
read-only open of the state on a full disk, a conda spec that is not UTF-8)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from mlbuild.errors import DiskFull, InvalidInput
from mlbuild.state.db import StateDB
from mlbuild.state.digest import DigestCache
from mlbuild.state.guard import StateGuard


@pytest.fixture
def proj(tmp_path: Path) -> Path:
    """A project with a state: its database, a -wal, state.id, a key file, a database
    moved aside by a reset; and a file of the user's own."""
    sd = tmp_path / ".mlbuild"
    (sd / "secrets/dev").mkdir(parents=True)
    for name in ("state.db", "state.db-wal", "state.id", "state.db.lost-20250101"):
        (sd / name).write_bytes(b"state " + name.encode())
    (sd / "secrets/dev/svc.keys").write_text("k1\nk2\n")
    (sd / "blobs").mkdir()
    (tmp_path / "model.pkl").write_bytes(b"weights")
    return tmp_path


def test_holds_the_state_folder_and_what_is_inside_only(proj: Path):
    g = StateGuard(proj / ".mlbuild")
    real = os.path.realpath
    assert g.holds(real(proj / ".mlbuild"))
    assert g.holds(real(proj / ".mlbuild/state.db"))
    assert g.holds(real(proj / ".mlbuild/blobs/x"))
    (proj / ".mlbuild-old").mkdir()
    assert not g.holds(real(proj / ".mlbuild-old/state.db"))  # a prefix is not a folder
    assert not g.holds(real(proj / "model.pkl"))
    assert not g.holds("/etc/passwd")
    (proj / "src").mkdir()
    (proj / "src/leak").symlink_to("../.mlbuild/state.db")
    (proj / "STATE").symlink_to(".mlbuild")
    assert g.holds(real(proj / "src/leak")) and g.holds(real(proj / "STATE/secrets"))


def test_a_state_folder_under_another_spelling_is_the_state_folder(proj: Path):
    # What a case-insensitive file system does with '.MLBUILD' (realpath keeps the case
    # as written): another name, not a link, for the same folder. A bind mount makes
    # one on Linux.
    other = proj / ".MLBUILD"
    other.mkdir()
    r = subprocess.run(["mount", "--bind", str(proj / ".mlbuild"), str(other)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"SKIPPED LOUDLY: needs a bind mount ({r.stderr.strip()}); run as root")
    try:
        g = StateGuard(proj / ".mlbuild")
        assert os.path.realpath(other / "state.db") == str(other / "state.db")
        assert g.holds(str(other / "state.db")) and g.holds(str(other))
        assert g.why(other / "state.db") == "resolves to '.mlbuild/state.db', inside " \
                                             ".mlbuild/, the folder of mlbuild's state, " \
                                             "which holds the services' keys"
        from mlbuild.manifest import load_project
        from mlbuild.errors import ManifestError

        (proj / "score.py").write_text("def run(x): return x\n")
        (proj / "mlproject.yaml").write_text(
            "name: p\nmodels: {m: {path: model.pkl}}\nservices:\n  s:\n"
            "    entry_script: score.py\n    source_dir: .MLBUILD\n    models: [m]\n"
            "    environment: e\nenvironments: {e: {packages: [numpy]}}\n")
        with pytest.raises(ManifestError) as e:
            load_project(proj / "mlproject.yaml")
        assert "services.s.source_dir: '.MLBUILD' resolves to .mlbuild/, the folder of " \
               "mlbuild's state" in str(e.value.problems[0]), e.value.problems
    finally:
        subprocess.run(["umount", str(other)], capture_output=True)


def test_private_files_are_known_by_inode_under_any_name(proj: Path):
    sd = proj / ".mlbuild"
    g = StateGuard(sd)
    links = {}
    for name in ("state.db", "state.db-wal", "state.id", "state.db.lost-20250101",
                 "secrets/dev/svc.keys"):
        links[name] = proj / f"link-{name.replace('/', '-')}"
        os.link(sd / name, links[name])
    for name, link in links.items():
        assert g.private_file(os.stat(link)) == f".mlbuild/{name}"
        assert g.why(link) == f"is a hard link to .mlbuild/{name}, mlbuild's state, which " \
                              "holds the services' keys"
    # Not private: a blob, a copy of state.db, a hard link to a file of the user's own.
    os.link(proj / "model.pkl", proj / "model-twin.pkl")
    (proj / "copy.db").write_bytes((sd / "state.db").read_bytes())
    (sd / "blobs/b").write_bytes(b"blob")
    os.link(sd / "blobs/b", proj / "blob-link")
    for p in ("model-twin.pkl", "copy.db", "blob-link", "model.pkl"):
        assert g.private_file(os.stat(proj / p)) is None and g.why(proj / p) is None


def test_the_private_files_are_listed_once_per_guard(proj: Path, monkeypatch):
    g = StateGuard(proj / ".mlbuild")
    calls = []
    listing = g._private_files
    monkeypatch.setattr(g, "_private_files", lambda: calls.append(1) or listing())
    st = os.stat(proj / "model.pkl")
    for _ in range(1000):
        assert g.private_file(st) is None
    assert calls == [1]


def test_the_digest_cache_refuses_a_state_file_under_another_name(tmp_path: Path):
    proj = tmp_path
    db = StateDB(proj / ".mlbuild")  # a real database, and its guard
    try:
        d = DigestCache(db)
        os.link(db.path, proj / "hard.db")
        (proj / "soft.db").symlink_to(".mlbuild/state.db")
        (proj / "model.pkl").write_bytes(b"weights")
        with pytest.raises(InvalidInput) as e:
            d.file(proj / "hard.db")
        assert e.value.message == "hard.db is a hard link to .mlbuild/state.db, mlbuild's " \
                                  "state, which holds the services' keys: mlbuild does not read it"
        assert e.value.hint == "remove the link (rm hard.db); the file it names stays"
        with pytest.raises(InvalidInput) as e:
            d.file(proj / "soft.db")
        assert "soft.db resolves to '.mlbuild/state.db', inside .mlbuild/" in e.value.message
        assert d.file(proj / "model.pkl").startswith("sha256:")
    finally:
        db.close()


# -- status on a full disk: the database read as it is on disk ------------------------

def _full_disk(monkeypatch):
    """sqlite3.connect as on a full disk: the ordinary open has no room (for its -shm
    index: SQLITE_FULL here); an immutable open (a URI) needs none."""
    real = sqlite3.connect

    def connect(database, *a, uri=False, **kw):
        if not uri:
            e = sqlite3.OperationalError("database or disk is full")
            e.sqlite_errorcode, e.sqlite_errorname = 13, "SQLITE_FULL"
            raise e
        return real(database, *a, uri=uri, **kw)

    monkeypatch.setattr(sqlite3, "connect", connect)


def test_a_read_only_open_reads_the_state_on_a_full_disk(tmp_path: Path, monkeypatch):
    sd = tmp_path / ".mlbuild"
    db = StateDB(sd)
    db.put_deployment("dev", "svc", {"pid": 1})
    db.close()
    assert not Path(f"{db.path}-wal").exists()
    _full_disk(monkeypatch)
    with pytest.raises(DiskFull):
        StateDB(sd)  # a verb that writes: refused, as before
    ro = StateDB(sd, read_only=True)
    try:
        assert ro.read_only and ro.deployments() == {("dev", "svc"): {"pid": 1}}
        from mlbuild.state.db import SchemaCache

        SchemaCache(ro).add("k")  # a cache: skipped, not an error
    finally:
        ro.close()


def test_a_read_only_open_refuses_when_changes_wait_in_the_wal(tmp_path: Path, monkeypatch):
    sd = tmp_path / ".mlbuild"
    StateDB(sd).close()
    Path(sd / "state.db-wal").write_bytes(b"x" * 100)  # (the file alone would be stale)
    _full_disk(monkeypatch)
    with pytest.raises(DiskFull):
        StateDB(sd, read_only=True)


# -- a conda spec that is not UTF-8 ------------------------------------------------------

def test_a_conda_spec_that_is_not_utf8_is_an_input_error(tmp_path: Path, monkeypatch):
    from mlbuild.backends import conda

    monkeypatch.undo()  # the real conda.lock: the spec is read before any solver runs

    spec = tmp_path / "environment.yml"
    spec.write_bytes("name: caf\xe9\ndependencies: [numpy]\n".encode("latin-1"))
    with pytest.raises(InvalidInput) as e:
        conda.lock(spec, tmp_path / "conda-lock.yml")
    assert f"the conda spec {spec} is not UTF-8 text" in e.value.message
