"""What the state says when SQLite or the disk refuses (full, read-only, locked, an
I/O error, damage), and how it tells a lost database from a new project."""

from __future__ import annotations

import errno
import json
import sqlite3

import pytest

from mlbuild.errors import DiskFull, LockTimeout, StateCorrupt, StateError, StateLost
from mlbuild.state import space
from mlbuild.state.db import StateDB
from mlbuild.state.registry import Registry


@pytest.fixture
def db(tmp_path):
    d = StateDB(tmp_path / ".mlbuild")
    yield d
    d.close()


def fill_up(db: StateDB) -> None:
    """No page more for this connection: SQLite answers SQLITE_FULL, as on a full disk."""
    pages = db.conn.execute("PRAGMA page_count").fetchone()[0]
    db.conn.execute(f"PRAGMA max_page_count = {pages}")


def test_sqlite_full_is_a_full_disk_not_a_corruption_and_changes_nothing(db, tmp_path):
    db.put_keys("dev", "a", "p", "s")
    fill_up(db)
    with pytest.raises(DiskFull) as ei:
        for i in range(200):
            db.put_keys("dev", f"svc{i}", "p" * 500, "s" * 500)
    e = ei.value
    assert str(db.path) in e.message and "no space left on the file system" in e.message
    assert "free of" in e.message and "free a few MB on " in e.hint
    assert "move it aside" not in e.hint and "mv " not in e.hint
    assert e.exit_code == 2
    # The transaction was rolled back and the connection is usable; what was there stays.
    assert not db.conn.in_transaction
    assert db.get_keys("dev", "a") == ("p", "s")
    db.conn.execute("PRAGMA max_page_count = 1073741823")
    db.put_keys("dev", "b", "p", "s")
    assert db.get_keys("dev", "b") == ("p", "s")


def test_sqlite_full_inside_a_registry_transaction_is_a_clean_error(db, tmp_path):
    model = tmp_path / "m.pkl"
    model.write_bytes(b"weights" * 1000)
    reg = Registry(db)
    reg.register(model, "m")
    model.write_bytes(b"other weights" * 1000)
    fill_up(db)
    with pytest.raises(DiskFull):  # the row needs pages of its own: they do not fit
        # (raised sqlite3.OperationalError, "mlbuild broke", before)
        reg.register(model, "m", description="d" * 20000)
    assert [v.version for v in reg.versions("m")] == [1]


def test_busy_database_is_a_lock_timeout(db):
    other = sqlite3.connect(str(db.path), isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        db.conn.execute("PRAGMA busy_timeout = 50")
        with pytest.raises(LockTimeout) as ei:
            db.put_keys("dev", "a", "p", "s")
        assert "locked by another process" in ei.value.message
        assert "SQLITE_BUSY" in ei.value.message and "nothing was changed" in ei.value.hint
    finally:
        other.execute("ROLLBACK")
        other.close()
    db.put_keys("dev", "a", "p", "s")


def test_read_only_database_says_cannot_write(db):
    ro = sqlite3.connect(f"file:{db.path}?mode=ro", uri=True)
    try:
        with pytest.raises(sqlite3.OperationalError) as ei:
            ro.execute("INSERT INTO validated VALUES ('x')")
    finally:
        ro.close()
    err = db._error(ei.value)
    assert type(err) is StateError and f"cannot write {db.path}" in err.message
    assert "SQLITE_READONLY" in err.message


def _ioerr() -> sqlite3.OperationalError:
    e = sqlite3.OperationalError("disk I/O error")
    e.sqlite_errorcode = 10 | (21 << 8)
    e.sqlite_errorname = "SQLITE_IOERR_SHMSIZE"
    return e


def test_io_error_is_ambiguous_unless_the_disk_is_full(db, monkeypatch):
    err = db._error(_ioerr())
    assert type(err) is StateError and "I/O error" in err.message
    assert "the file system is full" in err.message and "Do not move the file aside" in err.hint
    monkeypatch.setattr(space, "free_space", lambda path: (4096, 16 << 20))
    err = db._error(_ioerr())
    assert isinstance(err, DiskFull) and "4.0 KB free of 16.0 MB" in err.message


def test_damage_is_still_a_corruption(tmp_path):
    sd = tmp_path / ".mlbuild"
    sd.mkdir()
    (sd / "state.db").write_bytes(b"not a database\x00" * 300)
    with pytest.raises(StateCorrupt) as ei:
        StateDB(sd)
    assert "mlbuild state reset" in ei.value.hint


def test_blob_that_does_not_fit_says_how_much_and_leaves_no_partial_copy(db, tmp_path,
                                                                       monkeypatch):
    from mlbuild.state import registry as registry_mod

    def half_copy(src, dst):
        with open(dst, "wb") as f:
            f.write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(registry_mod, "clone_or_copy", half_copy)
    model = tmp_path / "m.pkl"
    model.write_bytes(b"w" * 5000)
    with pytest.raises(DiskFull) as ei:
        Registry(db).register(model, "m")
    assert f"cannot write the model file {model}" in ei.value.message
    assert "it needs 4.9 KB" in ei.value.message and "free at least" in ei.value.hint
    assert not [p for p in (db.state_dir / "blobs").rglob("*") if p.is_file()]
    assert Registry(db).versions() == []


def test_os_error_mapping():
    full = space.from_os_error(OSError(errno.ENOSPC, "No space left", "/tmp/x", None, "/tmp/y"))
    assert isinstance(full, DiskFull) and "holding /tmp/y" in full.message
    assert space.from_os_error(OSError(errno.EDQUOT, "Quota")) is not None
    assert space.from_os_error(OSError(errno.ENOENT, "gone")) is None
    assert space.human(0) == "0 B" and space.human(1536) == "1.5 KB"


# -- a lost database ---------------------------------------------------------------------

def test_new_state_folder_gets_a_state_id(tmp_path):
    sd = tmp_path / ".mlbuild"
    StateDB(sd).close()
    data = json.loads((sd / "state.id").read_text())
    assert data["id"] and data["created"]
    StateDB(sd).close()
    assert json.loads((sd / "state.id").read_text()) == data  # written once


@pytest.mark.parametrize("how", ["missing", "empty", "no-tables"])
def test_lost_database_is_refused_and_nothing_changed(tmp_path, how):
    sd = tmp_path / ".mlbuild"
    StateDB(sd).close()
    db = sd / "state.db"
    if how == "missing":
        db.unlink()
    elif how == "empty":
        db.write_bytes(b"")
    else:
        db.unlink()
        c = sqlite3.connect(db)
        c.execute("PRAGMA user_version = 7")
        c.close()
    before = sorted(p.name for p in sd.iterdir())
    with pytest.raises(StateLost) as ei:
        StateDB(sd)
    assert "state.id (made " in ei.value.message and "mlbuild state reset" in ei.value.hint
    assert sorted(p.name for p in sd.iterdir()) == before


def test_traces_without_state_id_are_enough(tmp_path):
    sd = tmp_path / ".mlbuild"
    (sd / "secrets" / "dev").mkdir(parents=True)
    (sd / "secrets" / "dev" / "api.keys").write_text("p\ns\n")
    with pytest.raises(StateLost) as ei:
        StateDB(sd)
    assert "secrets/ (keys of dev/api)" in ei.value.message
    assert not (sd / "state.db").exists()


def test_a_folder_that_never_had_a_state_opens(tmp_path):
    sd = tmp_path / ".mlbuild"
    sd.mkdir()
    (sd / "lock").touch()
    (sd / "state.db").touch()  # what a run killed before its first transaction leaves
    StateDB(sd).close()
    assert (sd / "state.id").exists()


def test_new_makes_a_database_despite_traces(tmp_path):
    sd = tmp_path / ".mlbuild"
    StateDB(sd).close()
    old_id = json.loads((sd / "state.id").read_text())["id"]
    (sd / "state.db").unlink()
    d = StateDB(sd, new=True)
    d.close()
    assert json.loads((sd / "state.id").read_text())["id"] != old_id


def test_reset_recovers_keys_and_model_versions(tmp_path):
    from mlbuild.state.recover import reset

    sd = tmp_path / ".mlbuild"
    d = StateDB(sd)
    reg = Registry(d)
    f = tmp_path / "m.pkl"
    for content in (b"one", b"two", b"three"):
        f.write_bytes(content)
        mv, _ = reg.register(f, "m")
    reg.materialize(reg.find("m", 2), sd / "contexts" / "svc" / "models" / "m" / "2")
    reg.materialize(mv, sd / "run" / "dev" / "svc" / "abc-1" / "models" / "m" / "3")
    (sd / "secrets" / "dev").mkdir(parents=True)
    (sd / "secrets" / "dev" / "svc.keys").write_text("pk\nsk\n")
    digests = {v.version: v.digest for v in reg.versions("m")}
    d.close()

    from mlbuild.errors import InvalidInput

    with pytest.raises(InvalidInput):
        reset(tmp_path / "nowhere")
    with pytest.raises(InvalidInput):
        reset(sd)  # sound: nothing to reset
    (sd / "state.db").write_bytes(b"")
    r = reset(sd)
    assert (r.reason, r.models, r.keys, r.deployments, r.blobs) == \
        ("lost", ["m@2", "m@3"], ["dev/svc"], [], 3)
    d = StateDB(sd)
    try:
        reg = Registry(d)
        assert {v.version: v.digest for v in reg.versions("m")} == \
            {2: digests[2], 3: digests[3]}
        assert d.get_keys("dev", "svc") == ("pk", "sk")
        f.write_bytes(b"four")
        assert reg.register(f, "m")[0].version == 4  # versions are never reused
        f.write_bytes(b"three")
        assert reg.register(f, "m")[0].version == 5
    finally:
        d.close()
