"""The state: StateDB, DigestCache, ProjectLock, Registry, and the fsutil helpers."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlbuild import fsutil
from mlbuild.errors import InvalidInput, LockTimeout, StateError
from mlbuild.state.db import SCHEMA_VERSION, StateDB, StepRecord
from mlbuild.state.digest import DigestCache, hash_file, walk_files
from mlbuild.state.lock import ProjectLock
from mlbuild.state.registry import Registry, parse_ref


@pytest.fixture
def db(tmp_path):
    d = StateDB(tmp_path / ".mlbuild")
    yield d
    d.close()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def age(path: Path, seconds: float = 10) -> None:
    """Move a file's mtime into the past (out of the racy window)."""
    t = time.time() - seconds
    os.utime(path, (t, t))


# -- StateDB ----------------------------------------------------------------------------

def test_db_creates_schema(tmp_path):
    d = StateDB(tmp_path / "state")
    try:
        assert d.path == tmp_path / "state" / "state.db" and d.path.is_file()
        tables = {r[0] for r in d.query("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"meta", "steps", "file_digests", "models", "plans", "deployments",
                "validated"} <= tables
        assert d.query("SELECT value FROM meta WHERE key='schema_version'") == \
            [(str(SCHEMA_VERSION),)]
    finally:
        d.close()
    StateDB(tmp_path / "state").close()  # reopening an existing database works


def test_db_step_record_roundtrip(db):
    rec = StepRecord("context:x", "context", "sha256:f", "sha256:k", {"a": [1]}, {"dir": "d"},
                     1.5, 0.25)
    db.record_step(rec)
    got = db.get_step("context:x")
    assert (got.fingerprint, got.output_key, got.detail, got.outputs) == \
        ("sha256:f", "sha256:k", {"a": [1]}, {"dir": "d"})
    assert set(db.all_steps()) == {"context:x"}
    assert db.get_step("nope") is None
    assert db.forget_steps("context:") == 1
    assert db.all_steps() == {}


def test_transaction_rolls_back_on_exception(db):
    rec = StepRecord("model:x", "model", "f", "k", {}, {}, 0.0, 0.0)
    with pytest.raises(RuntimeError):
        with db.transaction() as c:
            c.execute("INSERT INTO validated VALUES ('a')")
            db.record_step(rec)  # nested: joins the outer transaction
            raise RuntimeError("boom")
    assert db.query("SELECT * FROM validated") == []
    assert db.get_step("model:x") is None
    # The connection is usable afterwards, and a clean transaction commits.
    with db.transaction() as c:
        c.execute("INSERT INTO validated VALUES ('b')")
    assert db.validated_seen("b") and not db.validated_seen("a")


def test_transaction_rollback_seen_by_another_connection(db):
    with pytest.raises(KeyError):
        with db.transaction() as c:
            c.execute("INSERT INTO validated VALUES ('x')")
            raise KeyError("x")
    other = sqlite3.connect(str(db.path))
    try:
        assert other.execute("SELECT * FROM validated").fetchall() == []
    finally:
        other.close()


def test_corrupt_db_names_path_and_says_move_aside(tmp_path):
    state = tmp_path / ".mlbuild"
    state.mkdir()
    (state / "state.db").write_bytes(b"this is not a database at all\x00" * 200)
    with pytest.raises(StateError) as ei:
        StateDB(state)
    assert str(state / "state.db") in ei.value.message
    assert "move it aside" in ei.value.hint
    assert f"mv {state / 'state.db'} " in ei.value.hint
    assert ei.value.exit_code == 2


def test_newer_schema_version_refused(tmp_path):
    state = tmp_path / ".mlbuild"
    StateDB(state).close()
    c = sqlite3.connect(str(state / "state.db"))
    c.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),))
    c.commit()
    c.close()
    with pytest.raises(StateError) as ei:
        StateDB(state)
    assert "newer mlbuild" in ei.value.message
    assert str(state / "state.db") in ei.value.message
    assert "upgrade" in ei.value.hint


def test_format_1_database_is_migrated(tmp_path):
    state = tmp_path / ".mlbuild"
    d = StateDB(state)
    d.put_deployment("dev", "a", {"pid": 1})
    d.close()
    c = sqlite3.connect(str(state / "state.db"))
    c.execute("DROP TABLE keys")
    c.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    c.commit()
    c.close()
    d = StateDB(state)
    assert d.query("SELECT value FROM meta WHERE key='schema_version'") == [(str(SCHEMA_VERSION),)]
    assert d.get_deployment("dev", "a") == {"pid": 1}  # kept
    d.put_keys("dev", "a", "p", "s")
    assert d.get_keys("dev", "a") == ("p", "s")
    d.close()


def test_plan_cache_keeps_32(db):
    for i in range(40):
        db.put_plan(f"k{i}", [i])
    assert db.get_plan("k39") == [39]
    assert len(db.query("SELECT key FROM plans")) == 32


# -- DigestCache ------------------------------------------------------------------------

def test_digest_is_sha256_of_content(tmp_path, db):
    data = os.urandom(3 * (1 << 20) + 17)  # more than one read chunk
    p = tmp_path / "m.bin"
    p.write_bytes(data)
    dc = DigestCache(db)
    assert dc.file(p) == sha(data) == hash_file(p)
    assert dc.file(p).startswith("sha256:")
    assert dc.hashed_bytes == len(data)


def test_unchanged_file_not_reread(tmp_path, db):
    p = tmp_path / "m.bin"
    p.write_bytes(b"x" * 1000)
    dc = DigestCache(db)
    d = dc.file(p)
    assert dc.hashed_bytes == 1000
    assert dc.file(p) == d
    assert dc.hashed_bytes == 1000


def test_changed_size_is_reread(tmp_path, db):
    p = tmp_path / "m.bin"
    p.write_bytes(b"x" * 1000)
    dc = DigestCache(db)
    dc.file(p)
    p.write_bytes(b"y" * 1001)
    assert dc.file(p) == sha(b"y" * 1001)
    assert dc.hashed_bytes == 2001


def test_same_size_new_mtime_is_reread(tmp_path, db):
    p = tmp_path / "m.bin"
    p.write_bytes(b"a" * 100)
    age(p, 100)
    dc = DigestCache(db)
    dc.file(p)
    ino = p.stat().st_ino
    with open(p, "r+b") as f:  # same inode, same size, new content
        f.write(b"b" * 100)
    age(p, 50)
    assert p.stat().st_ino == ino
    assert dc.file(p) == sha(b"b" * 100)
    assert dc.hashed_bytes == 200


def test_racy_file_not_persisted_old_file_is(tmp_path, db):
    fresh, old = tmp_path / "fresh.bin", tmp_path / "old.bin"
    fresh.write_bytes(b"fresh")
    old.write_bytes(b"old")
    age(old, 5)
    dc = DigestCache(db)
    dc.file(fresh)
    dc.file(old)
    dc.flush()
    rows = {Path(r[0]).name for r in db.query("SELECT path FROM file_digests")}
    assert rows == {"old.bin"}


def test_flush_persists_across_instances(tmp_path, db):
    p = tmp_path / "m.bin"
    p.write_bytes(b"z" * 500)
    age(p)
    first = DigestCache(db)
    d = first.file(p)
    second = DigestCache(db)
    second.file(p)
    assert second.hashed_bytes == 500  # not flushed yet: read again
    first.flush()
    third = DigestCache(db)
    assert third.file(p) == d
    assert third.hashed_bytes == 0
    # ... and in a newly opened database too.
    db2 = StateDB(db.state_dir)
    try:
        fourth = DigestCache(db2)
        assert fourth.file(p) == d and fourth.hashed_bytes == 0
    finally:
        db2.close()


def test_remember_saves_a_read(tmp_path, db):
    p = tmp_path / "m.bin"
    p.write_bytes(b"q" * 10)
    dc = DigestCache(db)
    dc.remember(p, sha(b"q" * 10))
    assert dc.file(p) == sha(b"q" * 10)
    assert dc.hashed_bytes == 0


def test_digest_errors(tmp_path):
    dc = DigestCache()
    with pytest.raises(InvalidInput, match="cannot read .*missing"):
        dc.file(tmp_path / "missing")
    with pytest.raises(InvalidInput, match="is not a regular file"):
        dc.file(tmp_path)


def _tree(root: Path, extra: bool) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("A")
    (root / "sub" / "b.py").write_text("B")
    if extra:
        (root / "__pycache__").mkdir()
        (root / "__pycache__" / "b.cpython-311.pyc").write_bytes(b"\x00")
        (root / "sub" / "c.pyc").write_bytes(b"\x01")
        (root / "sub" / "__pycache__").mkdir()
        (root / "sub" / "__pycache__" / "x").write_bytes(b"\x02")
    return root


def test_tree_digest_location_independent_and_ignores_caches(tmp_path):
    dc = DigestCache()
    d1, l1 = dc.tree(_tree(tmp_path / "one", extra=False))
    d2, l2 = dc.tree(_tree(tmp_path / "x" / "y" / "two", extra=True))
    assert l1 == l2 == {"a.txt": sha(b"A"), "sub/b.py": sha(b"B")}
    assert d1 == d2
    (tmp_path / "one" / "sub" / "b.py").write_text("C")
    assert dc.tree(tmp_path / "one")[0] != d2
    assert [rel for rel, _ in walk_files(tmp_path / "x")] == ["y/two/a.txt", "y/two/sub/b.py"]


# -- ProjectLock ------------------------------------------------------------------------

HOLDER = """\
import sys
from mlbuild.state.lock import ProjectLock
lk = ProjectLock(sys.argv[1])
lk.acquire()
print("locked", flush=True)
sys.stdin.readline()
lk.release()
print("released", flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock on tmp_path/.mlbuild until told to release."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / ".mlbuild")],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    yield p
    if p.poll() is None:
        p.kill()
    p.wait(timeout=10)


def test_lock_held_by_other_process_times_out(tmp_path, holder):
    waits = []
    lk = ProjectLock(tmp_path / ".mlbuild", timeout=0.4, on_wait=waits.append)
    t0 = time.monotonic()
    with pytest.raises(LockTimeout) as ei:
        lk.acquire()
    assert time.monotonic() - t0 >= 0.4
    assert f"pid {holder.pid}" in ei.value.message
    assert "MLBUILD_LOCK_TIMEOUT" in ei.value.hint
    assert len(waits) == 1 and f"pid {holder.pid}" in waits[0]
    assert lk.fd is None


def test_released_lock_is_acquirable(tmp_path, holder):
    holder.stdin.write("\n")
    holder.stdin.flush()
    assert holder.stdout.readline().strip() == "released"
    waits = []
    with ProjectLock(tmp_path / ".mlbuild", timeout=2, on_wait=waits.append) as lk:
        assert lk.fd is not None
        assert (tmp_path / ".mlbuild" / "lock").read_text() == f"pid {os.getpid()}"
    assert waits == []
    assert (tmp_path / ".mlbuild" / "lock").read_text() == ""


def test_lock_freed_when_holder_dies(tmp_path, holder):
    holder.kill()
    holder.wait(timeout=10)
    with ProjectLock(tmp_path / ".mlbuild", timeout=2):
        pass


def test_lock_timeout_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MLBUILD_LOCK_TIMEOUT", "7.5")
    assert ProjectLock(tmp_path).timeout == 7.5
    monkeypatch.delenv("MLBUILD_LOCK_TIMEOUT")
    assert ProjectLock(tmp_path).timeout == 600


# -- Registry ---------------------------------------------------------------------------

@pytest.fixture
def reg(db):
    return Registry(db, DigestCache(db))


def test_register_file(tmp_path, reg):
    src = tmp_path / "x.pkl"
    src.write_bytes(b"model one")
    mv, created = reg.register(src, "x", description="d", tags={"a": "1"}, source="x.pkl")
    assert created and mv.version == 1 and mv.ref == "x@1"
    assert mv.files == (("x.pkl", sha(b"model one"), 9),)
    assert mv.size == 9 and mv.source == "x.pkl"
    assert reg.blob_path(sha(b"model one")).read_bytes() == b"model one"


def test_register_folder(tmp_path, reg):
    out = tmp_path / "outputs"
    (out / "a").mkdir(parents=True)
    (out / "a" / "b.txt").write_text("bee")
    (out / "c.txt").write_text("sea!")
    (out / "__pycache__").mkdir()
    (out / "__pycache__" / "z.pyc").write_bytes(b"x")
    mv, created = reg.register(out, "folder")
    assert created
    assert [f[0] for f in mv.files] == ["outputs/a/b.txt", "outputs/c.txt"]
    assert mv.size == 7
    dest = tmp_path / "got"
    reg.materialize(mv, dest)
    assert (dest / "outputs/a/b.txt").read_text() == "bee"


def test_register_empty_folder_or_missing(tmp_path, reg):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match="holds no files"):
        reg.register(tmp_path / "empty", "e")
    with pytest.raises(InvalidInput, match="no such file"):
        reg.register(tmp_path / "nope", "e")


def test_same_content_no_new_version_metadata_merged(tmp_path, reg):
    src = tmp_path / "x.pkl"
    src.write_bytes(b"v1")
    reg.register(src, "x", description="first", tags={"a": "1", "b": "2"}, framework="onnx")
    mv, created = reg.register(src, "x", tags={"b": "20", "c": "3"})
    assert not created and mv.version == 1
    assert dict(mv.tags) == {"a": "1", "b": "20", "c": "3"}
    assert (mv.description, mv.framework) == ("first", "onnx")  # kept
    assert len(reg.versions("x")) == 1


def test_same_content_replace_metadata(tmp_path, reg):
    src = tmp_path / "x.pkl"
    src.write_bytes(b"v1")
    reg.register(src, "x", description="first", tags={"a": "1"}, framework="onnx",
                 resources={"cpu": 1})
    mv, created = reg.register(src, "x", tags={"b": "2"}, replace_metadata=True)
    assert not created
    assert dict(mv.tags) == {"b": "2"}
    assert (mv.description, mv.framework, mv.resources) == (None, None, None)


def test_new_content_new_version(tmp_path, reg):
    src = tmp_path / "x.pkl"
    src.write_bytes(b"v1")
    reg.register(src, "x")
    src.write_bytes(b"v2, longer")
    mv, created = reg.register(src, "x")
    assert created and mv.version == 2
    assert [v.version for v in reg.versions("x")] == [1, 2]
    assert reg.latest("x").digest == mv.digest != reg.find("x", 1).digest


def test_blobs_read_only_and_isolated_from_source(tmp_path, reg):
    src = tmp_path / "x.pkl"
    src.write_bytes(b"original")
    mv, _ = reg.register(src, "x")
    blob = reg.blob_path(mv.files[0][1])
    assert stat.S_IMODE(blob.stat().st_mode) == 0o444
    assert blob.stat().st_ino != src.stat().st_ino
    with open(src, "r+b") as f:  # training code rewriting the model in place
        f.write(b"REWRITTEN")
    assert blob.read_bytes() == b"original"
    dest = tmp_path / "out"
    reg.materialize(reg.get("x@1"), dest)
    assert (dest / "x.pkl").read_bytes() == b"original"


def test_materialize_links_or_copies(tmp_path, reg):
    src = tmp_path / "x.pkl"
    src.write_bytes(b"content")
    mv, _ = reg.register(src, "x")
    blob = reg.blob_path(mv.files[0][1])
    reg.materialize(mv, tmp_path / "linked")
    assert (tmp_path / "linked/x.pkl").stat().st_ino == blob.stat().st_ino
    reg.materialize(mv, tmp_path / "copied", link=False)
    copied = tmp_path / "copied/x.pkl"
    assert copied.stat().st_ino != blob.stat().st_ino
    assert copied.read_bytes() == b"content"
    assert stat.S_IMODE(copied.stat().st_mode) == 0o644


def test_delete_and_gc_remove_only_unreferenced_blobs(tmp_path, reg):
    a, b = tmp_path / "a.pkl", tmp_path / "b.pkl"
    a.write_bytes(b"shared")
    b.write_bytes(b"only in v2")
    reg.register(a, "x")                     # x@1: shared
    reg.register(b, "x")                     # x@2: only in v2
    shared_copy = tmp_path / "shared" / "a.pkl"
    shared_copy.parent.mkdir()
    shared_copy.write_bytes(b"shared")
    reg.register(shared_copy, "y")           # y@1: the same blob as x@1
    blob_shared, blob_v2 = reg.blob_path(sha(b"shared")), reg.blob_path(sha(b"only in v2"))
    gone = reg.delete("x@2")
    assert [v.ref for v in gone] == ["x@2"]
    assert not blob_v2.exists() and blob_shared.exists()
    reg.delete("x")
    assert blob_shared.exists()              # y@1 still needs it
    reg.delete("y")
    assert not blob_shared.exists()
    assert reg.names() == []
    assert reg.gc() == 0


def test_gc_counts_orphans(tmp_path, reg, db):
    src = tmp_path / "x.pkl"
    src.write_bytes(b"keep")
    reg.register(src, "x")
    orphan = reg.blob_path(sha(b"orphan"))
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"orphan")
    assert reg.gc() == 1
    assert not orphan.exists() and reg.blob_path(sha(b"keep")).exists()


def test_get_errors(tmp_path, reg):
    src = tmp_path / "ridge.pkl"
    src.write_bytes(b"r")
    reg.register(src, "ridge")
    assert reg.get("ridge").ref == "ridge@1" and reg.get("ridge@1").ref == "ridge@1"
    with pytest.raises(InvalidInput) as ei:
        reg.get("ridgee")
    assert ei.value.message == "no registered model 'ridgee' (did you mean 'ridge'?)"
    with pytest.raises(InvalidInput, match=r"^model ridge has no version 4 \(versions: 1\)$"):
        reg.get("ridge@4")
    with pytest.raises(InvalidInput, match="no registered model 'lasso'$"):
        reg.get("lasso@1")
    for bad in ("ridge@x", "ridge@0", "ridge@-1"):
        with pytest.raises(InvalidInput, match="is not a positive whole number"):
            reg.get(bad)
    with pytest.raises(InvalidInput, match="is not a model reference"):
        reg.get("@2")
    assert parse_ref("a@12") == ("a", 12) and parse_ref("a") == ("a", None)


def test_materialize_missing_blob(tmp_path, reg):
    src = tmp_path / "x.pkl"
    src.write_bytes(b"gone soon")
    mv, _ = reg.register(src, "x")
    reg.blob_path(mv.files[0][1]).unlink()
    assert not reg.blobs_present(mv)
    with pytest.raises(StateError, match="the blob of x@1 file x.pkl is missing"):
        reg.materialize(mv, tmp_path / "out")


# -- fsutil -----------------------------------------------------------------------------

def test_replace_dir_swaps(tmp_path):
    target = tmp_path / "pkg"
    target.mkdir()
    (target / "old.txt").write_text("old")
    stage = fsutil.staging_dir(target)
    assert stage.parent == tmp_path and stage.name.startswith(".pkg.tmp-")
    (stage / "new.txt").write_text("new")
    fsutil.replace_dir(stage, target)
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert not stage.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_replace_dir_target_missing(tmp_path):
    target = tmp_path / "pkg"
    stage = fsutil.staging_dir(target)
    (stage / "f").write_text("x")
    fsutil.replace_dir(stage, target)
    assert (target / "f").read_text() == "x" and not stage.exists()


def test_replace_dir_without_exchange(tmp_path, monkeypatch):
    monkeypatch.setattr(fsutil, "_exchange", lambda a, b: False)
    target = tmp_path / "pkg"
    target.mkdir()
    (target / "old").write_text("old")
    stage = fsutil.staging_dir(target)
    (stage / "new").write_text("new")
    fsutil.replace_dir(stage, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]
    assert [p.name for p in target.iterdir()] == ["new"]


def test_remove_stale_staging(tmp_path):
    for d in (".x.tmp-abc", ".x.old-123", "x", ".hidden", "x.tmp-1", "y.old-2"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "f").write_text("f")
    (tmp_path / ".y.tmp-file").write_text("f")
    (tmp_path / ".gitignore").write_text("*")
    fsutil.remove_stale_staging(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        [".gitignore", ".hidden", "x", "x.tmp-1", "y.old-2"]
    fsutil.remove_stale_staging(tmp_path / "missing")  # no error


def test_link_or_copy_and_write_atomic(tmp_path):
    src = tmp_path / "s"
    src.write_text("s")
    assert fsutil.link_or_copy(src, tmp_path / "d") is True
    assert (tmp_path / "d").stat().st_ino == src.stat().st_ino
    target = tmp_path / "sub" / "w.txt"
    fsutil.write_atomic(target, "one")
    ino = target.stat().st_ino
    fsutil.write_atomic(target, b"two")
    assert target.read_text() == "two"
    assert target.stat().st_ino != ino  # a new file, never rewritten in place
    assert sorted(p.name for p in target.parent.iterdir()) == ["w.txt"]


def test_state_database_is_its_owners_alone(tmp_path):
    """It holds every service's keys: 0600, its WAL too, and an old 0644 one is fixed."""
    sd = tmp_path / ".mlbuild"
    db = StateDB(sd)  # its schema is written: the WAL files exist while it is open
    try:
        modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in sd.glob("state.db*")}
    finally:
        db.close()
    assert modes["state.db"] == 0o600 and set(modes.values()) == {0o600}, modes
    os.chmod(sd / "state.db", 0o644)
    StateDB(sd).close()
    assert stat.S_IMODE((sd / "state.db").stat().st_mode) == 0o600
