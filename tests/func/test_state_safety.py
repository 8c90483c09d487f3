"""The state survives a full disk, and a lost state database is not a new project
(issue 16, points 8 and 9): the real CLI on a real small file system (tmpfs) that is
filled up, and on state databases that are emptied, deleted (their -wal left) or
damaged.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from clitools import CLI, copy_example, free_port

NOT_A_CORRUPTION = ("unreadable", "move it aside", "mv ", "Traceback", "mlbuild broke")


def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"SKIPPED LOUDLY: the full-disk test needs a tmpfs it can fill, and "
                    f"mount refused ({(r.stderr or r.stdout).strip()}); run it as root or "
                    "with CAP_SYS_ADMIN")


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB file system of its own (a tmpfs), unmounted afterwards."""
    mnt = tmp_path / "disk"
    _mount_tmpfs(mnt, "16m")
    yield mnt
    if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def leave_free(mnt: Path, nbytes: int) -> None:
    """Fill the file system but ``nbytes`` (tmpfs counts in pages of 4 KB)."""
    filler = mnt / "filler"
    filler.unlink(missing_ok=True)
    free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
    with open(filler, "wb") as f:
        left = free - nbytes
        chunk = b"\0" * (1 << 20)
        while left > 0:
            try:
                left -= f.write(chunk[:min(left, len(chunk))])
            except OSError as e:
                assert e.errno == errno.ENOSPC
                break
    assert os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize <= nbytes


def state_rows(proj: Path, full: bool = False) -> tuple:
    """The registry and the keys, read by SQLite itself (not by mlbuild); on a ``full``
    disk from the database file alone (there is no room for a -shm file)."""
    db = proj / ".mlbuild/state.db"
    c = sqlite3.connect(f"file:{db}?immutable=1", uri=True) if full else sqlite3.connect(db)
    try:
        assert c.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        return (c.execute("SELECT name, version, digest FROM models ORDER BY 1, 2").fetchall(),
                c.execute("SELECT target, service, primary_key, secondary_key FROM keys "
                          "ORDER BY 1, 2").fetchall())
    finally:
        c.close()


def says_disk_full(r: subprocess.CompletedProcess, mnt: Path) -> None:
    assert "no space left on the file system holding" in r.stderr, r.stderr
    assert f"mounted on {mnt}" in r.stderr and "free of 16.0 MB" in r.stderr, r.stderr
    assert re.search(r"free (some space|at least [0-9.]+ KB|a few MB) on ", r.stderr), r.stderr
    assert f"df -h {mnt}" in r.stderr and "hint: " in r.stderr, r.stderr
    for wrong in NOT_A_CORRUPTION:
        assert wrong not in r.stderr, r.stderr


def test_full_disk_is_said_so_and_the_state_survives(small_disk, trained_models, tmp_path):
    proj = copy_example("diabetes", small_disk, trained_models)
    cli = CLI(proj)
    cli("deploy", "bundle")
    keys = cli.json("keys", "diabetes", "-t", "dev")
    before = state_rows(proj)
    assert before[0] and before[1]

    # Full to the last byte, and with room for SQLite's -shm but not for a page of
    # its -wal: a write of the state database (new keys) does not fit.
    for room in (0, 32 * 1024, 36 * 1024):
        leave_free(small_disk, room)
        r = cli("keys", "diabetes", "-t", "local", check=2)
        says_disk_full(r, small_disk)
        assert "free a few MB" in r.stderr
        assert state_rows(proj, full=True) == before

    # A model that does not fit in the blob store: how much it needs, and no partial
    # copy left behind to hold the space.
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(300_000))
    leave_free(small_disk, 100 * 1024)
    r = cli("models", "register", str(big), "--name", "big", check=2)
    says_disk_full(r, small_disk)
    assert "it needs 293.0 KB" in r.stderr and "free at least" in r.stderr
    assert not [p for p in (proj / ".mlbuild/blobs").rglob("*") if ".tmp-" in p.name]
    assert state_rows(proj, full=True) == before

    # A deploy whose new model fits but not the rest: the step that failed says what
    # to free, and what was done before it stays recorded.
    leave_free(small_disk, 1 << 20)
    (proj / "models/sklearn_regression_model.pkl").write_bytes(os.urandom(60_000))
    leave_free(small_disk, 160 * 1024)
    r = cli("deploy", "bundle", check=None)
    assert r.returncode in (1, 2), r.stderr
    says_disk_full(r, small_disk)

    # Room again: the next run finishes, with the registry and the keys it had.
    (small_disk / "filler").unlink()
    assert cli.json("keys", "diabetes", "-t", "dev") == keys
    cli("deploy", "bundle")
    models, keys_rows = state_rows(proj)
    assert models[:1] == before[0] and [m[:2] for m in models] == [("ridge", 1), ("ridge", 2)]
    assert keys_rows[0] == before[1][0]


# -- a lost state database -------------------------------------------------------------

def score(url: str, key: str, proj: Path) -> int:
    req = urllib.request.Request(url + "/score", data=(proj / "samples/input.json").read_bytes(),
                                 method="POST", headers={"Content-Type": "application/json",
                                                         "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def reset(cli: CLI, check: int = 0) -> subprocess.CompletedProcess:
    """mlbuild --json state reset; stdout is its report (or the error) as JSON."""
    return cli("--json", "state", "reset", check=check, timeout=120)


@pytest.fixture
def dev(diabetes):
    m = diabetes / "mlproject.yaml"
    port = free_port()
    m.write_text(m.read_text().replace("dev:    {type: process, port: 8890}",
                                       f"dev:    {{type: process, port: {port}}}"))
    cli = CLI(diabetes)
    yield cli, f"http://127.0.0.1:{port}"
    cli("down", "dev", check=None)


def test_emptied_state_db_is_refused_and_reset_keeps_keys_and_service(dev):
    cli, url = dev
    proj = cli.cwd
    cli("deploy", "dev")
    key = cli.json("keys", "diabetes")["primary"]
    pid = next(r for r in cli.json("status", "dev") if r["service"] == "diabetes")["pid"]
    assert score(url, key, proj) == 200
    db = proj / ".mlbuild/state.db"
    db.write_bytes(b"")  # truncated to 0 bytes

    for verb in (["status"], ["deploy", "dev"], ["models", "list"], ["keys", "diabetes"]):
        r = cli(*verb, check=2)
        assert f"the state database {db} is empty (0 bytes), but this project had one" \
            in r.stderr, r.stderr
        assert "secrets/ (keys of dev/diabetes)" in r.stderr
        assert "run/ (releases of dev/diabetes)" in r.stderr
        assert "Nothing was changed" in r.stderr and "mlbuild state reset" in r.stderr
        assert "Traceback" not in r.stderr
    assert db.stat().st_size == 0  # nothing changed: no new database ...
    assert score(url, key, proj) == 200  # ... and the service was neither stopped nor re-keyed
    assert len([p for p in (proj / ".mlbuild/blobs").rglob("*") if p.is_file()]) == 1

    report = json.loads(reset(cli).stdout)
    assert report["reason"] == "lost"
    assert report["moved"][0].startswith("state.db -> state.db.lost-")
    assert (report["keys"], report["models"], report["deployments"]) == \
        (["dev/diabetes"], ["ridge@1"], ["dev/diabetes"])
    row = next(r for r in cli.json("status", "dev") if r["service"] == "diabetes")
    assert (row["state"], row["pid"]) == ("Healthy", pid)  # known again, still running
    assert cli.json("keys", "diabetes")["primary"] == key
    assert [m["version"] for m in cli.json("models", "list", "ridge")] == [1]

    cli("deploy", "dev")  # the model is ridge@1 still; the new release has the same keys
    assert [m["version"] for m in cli.json("models", "list", "ridge")] == [1]
    assert cli.json("models", "show", "ridge")["tags"] == {"area": "diabetes",
                                                          "type": "regression"}
    assert score(url, key, proj) == 200
    reset(cli, check=3)  # a sound database is not reset


def test_deleted_state_db_with_its_wal_left_is_refused_and_the_wal_kept(cli: CLI, diabetes: Path):
    cli("deploy", "bundle")
    cli("keys", "diabetes", "-t", "dev")
    sd = diabetes / ".mlbuild"
    # A process that wrote and died before a checkpoint: its changes are in the -wal.
    subprocess.run([sys.executable, "-c",
                    "import os, sys; from mlbuild.state.db import StateDB\n"
                    f"db = StateDB({str(sd)!r}); db.put_keys('dev', 'other', 'p', 's')\n"
                    "os._exit(0)"], check=True)
    wal = sd / "state.db-wal"
    size = wal.stat().st_size
    assert size > 0
    (sd / "state.db").unlink()

    r = cli("models", "list", check=2)
    assert f"the state database {sd / 'state.db'} is missing, but this project had one" \
        in r.stderr, r.stderr
    assert "state.db-wal (" in r.stderr and "without their database" in r.stderr
    assert wal.stat().st_size == size  # SQLite would have deleted it, had it opened the db
    assert not (sd / "state.db").exists()

    report = json.loads(reset(cli).stdout)
    assert sorted(m.split(" -> ")[0] for m in report["moved"]) == ["state.db-shm", "state.db-wal"]
    assert (sd / next(m for m in report["moved"] if m.startswith("state.db-wal"))
            .split(" -> ")[1]).stat().st_size == size
    assert report["models"] == ["ridge@1"] and report["keys"] == []  # never handed out
    assert cli.ran("deploy", "bundle") == ["lock:sklearn", "model:ridge", "context:diabetes",
                                          "package:bundle/diabetes"]


def test_state_db_without_tables_is_refused(cli: CLI, diabetes: Path):
    cli("deploy", "bundle")
    db = diabetes / ".mlbuild/state.db"
    db.unlink()
    c = sqlite3.connect(db)  # a valid, empty SQLite database
    c.execute("PRAGMA user_version = 1")
    c.close()
    r = cli("plan", "bundle", check=2)
    assert "holds no state (no mlbuild tables), but this project had one" in r.stderr
    assert "blobs/ (1 model file)" in r.stderr
    assert sqlite3.connect(db).execute("SELECT name FROM sqlite_master").fetchall() == []


def test_a_new_project_and_an_older_state_still_open(cli: CLI, diabetes: Path):
    sd = diabetes / ".mlbuild"
    sd.mkdir()
    (sd / "lock").touch()  # left by nothing that needs a state
    cli("deploy", "bundle")
    assert json.loads((sd / "state.id").read_text())["id"]
    # A state made before state.id existed gets one, and is not refused.
    (sd / "state.id").unlink()
    cli("deploy", "bundle")
    assert (sd / "state.id").exists()
    assert [m["version"] for m in cli.json("models", "list", "ridge")] == [1]


def test_corrupt_state_db_reset_keeps_the_models_and_says_so(cli: CLI, diabetes: Path):
    cli("deploy", "bundle")
    db = diabetes / ".mlbuild/state.db"
    for extra in ("state.db-wal", "state.db-shm"):
        (diabetes / ".mlbuild" / extra).unlink(missing_ok=True)
    db.write_bytes(b"this is not a database" * 100)
    r = cli("status", check=2)
    assert "unreadable" in r.stderr and "mlbuild state reset" in r.stderr
    report = json.loads(reset(cli).stdout)
    assert report["reason"] == "broken" and report["models"] == ["ridge@1"]
    broken = diabetes / ".mlbuild" / report["moved"][0].split(" -> ")[1]
    assert broken.read_bytes() == b"this is not a database" * 100
    assert [s["id"] for s in cli.json("deploy", "bundle")["steps"]
            if s["status"] == "ran"][:2] == ["lock:sklearn", "model:ridge"]
    assert [m["version"] for m in cli.json("models", "list", "ridge")] == [1]
