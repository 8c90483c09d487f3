"""The state database: one SQLite file in ``.mlbuild/state.db``.

It holds step records, the model registry, deployments, the file-digest cache, the
manifest-validation cache and the plan cache. Writes happen in transactions
(``with db.transaction():``); a step is recorded only after it succeeded, so a run
that is interrupted or killed leaves the previous records and the next run redoes
exactly the unfinished steps.

The format is versioned (``SCHEMA_VERSION``): a file written by a newer mlbuild is
refused. SQLite's refusals are told apart by their result code, not their text: a full
disk (:class:`DiskFull`), a read-only file system, a database locked by another
process, an I/O error (which may be any of these) and real damage
(:class:`StateCorrupt`) each get their own message and hint. Only damage is worth
moving the file aside for.

A lost database is not a new project. ``state.id`` beside it records that one was
created here; when state.db is then missing, empty or without tables, or any trace of
an earlier state remains (its -wal file, blobs, keys, releases), opening it raises
:class:`StateLost` and changes nothing -- instead of silently starting afresh and, at
the next deploy, re-registering the models and generating new keys while the old
service still runs. ``mlbuild state reset`` (:mod:`mlbuild.state.recover`) is the
explicit way to start a new one.

A verb that only reads (``status``) opens it with ``read_only``: where a full or
read-only file system leaves SQLite no room for its ``-shm`` index, the file is then
read as it is on disk (when no change waits in its ``-wal``) instead of refused.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import stat
import time
import urllib.parse
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

from mlbuild import fsutil
from mlbuild.errors import LockTimeout, StateCorrupt, StateError, StateLost
from mlbuild.state import space
from mlbuild.state.guard import STATE_DIR  # noqa: F401 (defined there, without sqlite3)
from mlbuild.state.guard import StateGuard

SCHEMA_VERSION = 2
DB_NAME = "state.db"
ID_NAME = "state.id"  # written once the database exists: "this project has a state"
RESET = "mlbuild state reset"

# Folders that only a project which has had a state database holds: every verb opens
# (and so creates) state.db before it writes any of them.
TRACES = ("blobs", "secrets", "run", "contexts", "venvs", "logs")

# SQLite primary result codes (the low byte of sqlite_errorcode).
_BUSY, _LOCKED, _READONLY, _IOERR, _FULL, _CANTOPEN = 5, 6, 8, 10, 13, 14

_KEYS_TABLE = """CREATE TABLE IF NOT EXISTS keys (
    target TEXT NOT NULL,
    service TEXT NOT NULL,
    primary_key TEXT NOT NULL,
    secondary_key TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (target, service)
)"""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS steps (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    output_key TEXT NOT NULL,
    detail TEXT NOT NULL,
    outputs TEXT NOT NULL,
    finished_at REAL NOT NULL,
    duration REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS file_digests (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    digest TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS models (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    digest TEXT NOT NULL,
    files TEXT NOT NULL,
    size INTEGER NOT NULL,
    source TEXT,
    description TEXT,
    tags TEXT NOT NULL,
    properties TEXT NOT NULL,
    framework TEXT,
    framework_version TEXT,
    resources TEXT,
    created_at REAL NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS validated (key TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS plans (key TEXT PRIMARY KEY, plan TEXT NOT NULL, used_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS deployments (
    target TEXT NOT NULL,
    service TEXT NOT NULL,
    data TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (target, service)
);
"""+ _KEYS_TABLE + ";\n"

# Format N-1 -> N: statements that bring an older database up to date.
_MIGRATIONS = {
    2: _KEYS_TABLE,
}


def dumps(value: Any) -> str:
    """Compact, key-sorted JSON (what the database stores)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class StateDB:
    """The project's state database.

    Args:
        state_dir: the ``.mlbuild`` folder; created when missing.

    Raises:
        StateCorrupt: the file is damaged.
        StateLost: the file is missing, empty or without tables where a state was.
        DiskFull: a write did not fit (also raised by the methods that write).
        LockTimeout: another process kept the database locked.
        StateError: read-only, unopenable, an I/O error, a directory (not a file), or
            from a newer mlbuild.
    """

    def __init__(self, state_dir: Path, *, new: bool = False, read_only: bool = False):
        """``new``: make a new database even where traces of a lost one remain (what
        ``mlbuild state reset`` does once it moved the remains aside).

        ``read_only``: for a verb that only reads (``status``). Where SQLite cannot open
        the database for lack of room (or on a read-only file system: its ``-shm``
        index cannot be made), it is read as it is on disk, without locks, provided no
        change waits in its ``-wal``; :attr:`read_only` is then True and writes fail.
        """
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / DB_NAME
        self.read_only = False
        try:
            # Only its owner may read it: it holds the services' auth keys.
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            if self.state_dir.stat().st_mode & 0o077:
                os.chmod(self.state_dir, 0o700)
            self._refuse_if_not_a_file()
            # Before SQLite sees the file: it deletes a -wal file whose database is
            # empty, and the -wal may be all that is left of the lost state.
            if not new and not self._has_content():
                self._refuse_if_lost("is empty (0 bytes)" if self.path.exists() else "is missing")
            # The database itself 0600 too (SQLite gives its -wal and -shm the same mode):
            # a folder's mode is lost when it is copied or unpacked elsewhere.
            if not self.path.exists():
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            for f in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
                if f.exists() and f.stat().st_mode & 0o077:
                    os.chmod(f, 0o600)
        except OSError as e:
            raise space.from_os_error(e, self.state_dir) or StateError(
                f"cannot create the state folder {self.state_dir}: {e.strerror}") from e
        self._depth = 0
        self.conn = None
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves.
            self.conn = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self._migrate(new)
        except BaseException as e:
            self.close()
            if isinstance(e, sqlite3.Error):
                err = self._error(e)
                if read_only and self._open_as_on_disk(e):
                    return
                raise err from e
            raise
        self._mark(new)

    def _open_as_on_disk(self, err: sqlite3.Error) -> bool:
        """Open the database file alone, read-only and without locks (SQLite's
        ``immutable``), after ``err`` refused the ordinary way. Only where that reads
        the whole state: no change waiting in the -wal, tables of this format."""
        code = getattr(err, "sqlite_errorcode", None)
        if code is None or code & 0xFF not in (_FULL, _IOERR, _READONLY, _CANTOPEN):
            return False  # (locked, damaged: a read without locks would not help)
        try:
            if os.path.getsize(f"{self.path}-wal"):
                return False  # the last changes are there: the file alone is stale
        except OSError:
            pass  # no -wal: the file holds everything
        try:
            uri = "file:" + urllib.parse.quote(str(self.path.resolve())) + "?immutable=1"
            self.conn = sqlite3.connect(uri, uri=True, isolation_level=None)
            row = self._schema_row()
        except sqlite3.Error:
            self.close()
            return False
        if row is None or row[0] != str(SCHEMA_VERSION):
            self.close()
            return False
        self.read_only = True
        return True

    @cached_property
    def guard(self) -> StateGuard:
        """What keeps this state out of the project's inputs (one per command)."""
        return StateGuard(self.state_dir)

    # -- what went wrong ------------------------------------------------------------

    def _error(self, err: sqlite3.Error) -> StateError:
        """The error to show for what SQLite said, told apart by its result code."""
        code = getattr(err, "sqlite_errorcode", None)
        name = getattr(err, "sqlite_errorname", None) or "?"
        primary = code & 0xFF if code is not None else None
        if primary == _FULL or primary == _IOERR and space.is_full(self.state_dir):
            # (A full disk often shows as an I/O error: SQLITE_IOERR_SHMSIZE when the
            # -shm file cannot grow, SQLITE_IOERR_WRITE.)
            return space.disk_full(self.path, self.state_dir, needed="a few MB")
        if primary == _READONLY or primary == _CANTOPEN and space.read_only(self.state_dir):
            return space.not_writable(self.path, name)
        if primary in (_BUSY, _LOCKED):
            return LockTimeout(
                f"the state database {self.path} stayed locked by another process for "
                f"30 s ({name})",
                hint="another mlbuild, or a program reading it (sqlite3, a backup), holds "
                "it: let it finish or stop it, then run again; nothing was changed")
        if primary == _CANTOPEN:
            return StateError(
                f"cannot open the state database {self.path} ({name})",
                hint=f"check that {self.state_dir} exists and is yours to read and write "
                f"(ls -ld {self.state_dir} {self.path}); nothing was changed")
        if primary == _IOERR:
            return StateError(
                f"an I/O error on the state database {self.path} ({name}): the disk "
                "failed, the file system is full or a network file system does not "
                "support SQLite's locking",
                hint=f"check the disk (dmesg, df -h {self.state_dir}) and that .mlbuild "
                "is on a local file system, then run again. Do not move the file aside "
                "for this: it is likely intact")
        return self._corrupt(err)  # SQLITE_CORRUPT, SQLITE_NOTADB, a schema not ours

    def _corrupt(self, err: Exception) -> StateError:
        if self.read_only:  # read without locks: a writer may have changed it meanwhile
            return StateError(
                f"the state database {self.path} could not be read as it is on disk "
                f"({err}): it was read without locks, SQLite could not open it the "
                "ordinary way (a full or read-only file system), and may have been "
                "written meanwhile",
                hint="run again (once there is room, it is read the ordinary way); "
                "nothing was changed")
        return StateCorrupt(
            f"the state database {self.path} is unreadable: {err}",
            hint=f"restore it from a backup; or move it aside (mv {self.path} "
            f"{self.path}.broken) and run {RESET}, which starts a new one keeping the "
            "model blobs, the services' keys and the deployed model versions; steps will "
            "be redone")

    # -- a lost database ------------------------------------------------------------

    def _has_content(self) -> bool:
        try:
            return self.path.stat().st_size > 0
        except FileNotFoundError:
            return False

    def traces(self) -> list[str]:
        """What remains here of an earlier state database, described (``[]`` for a
        folder that never had one)."""
        sd = self.state_dir
        found = []
        try:
            created = json.loads((sd / ID_NAME).read_text()).get("created", "?")
            found.append(f"{ID_NAME} (made {created})")
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError):
            found.append(ID_NAME)
        wal = Path(f"{self.path}-wal")
        if wal.exists() and wal.stat().st_size:
            found.append(f"{wal.name} ({space.human(wal.stat().st_size)} of the last "
                         "changes, without their database)")
        for name in TRACES:
            folder = sd / name
            try:
                entries = sorted(folder.iterdir())
            except OSError:
                continue
            if not entries:
                continue
            if name == "blobs":
                n = sum(1 for _ in folder.rglob("*") if _.is_file())
                found.append(f"blobs/ ({n} model file{'s' if n != 1 else ''})")
            elif name in ("secrets", "run"):
                what = sorted(f"{t.name}/{s.name.removesuffix('.keys')}" for t in entries
                              if t.is_dir() for s in t.iterdir())
                label = "keys" if name == "secrets" else "releases"
                found.append(f"{name}/ ({label} of {', '.join(what)})" if what else f"{name}/")
            else:
                found.append(f"{name}/")
        if len(found) > 3:  # the caches say no more than the rest
            found = [f for f in found if f.rstrip("/") not in ("contexts", "venvs", "logs")]
        return found

    def _refuse_if_not_a_file(self) -> None:
        """A folder (or a FIFO, a device) where state.db belongs: SQLite would only say
        SQLITE_CANTOPEN, which reads as a permission problem."""
        try:
            mode = self.path.stat().st_mode
        except FileNotFoundError:
            return
        if stat.S_ISREG(mode):
            return
        what = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        how = f"is {what}, not the database file (mlbuild did not make it)"
        self._refuse_if_lost(how)  # a state was here: restore it, or reset
        raise StateError(
            f"the state database {self.path} {how}",
            hint=f"look at what it holds and move it aside (mv {self.path} "
            f"{self.path}.moved); mlbuild then makes a new database there. Nothing was "
            "changed")

    def _refuse_if_lost(self, how: str) -> None:
        traces = self.traces()
        if not traces:
            return
        raise StateLost(
            f"the state database {self.path} {how}, but this project had one: "
            f"{self.state_dir} still holds {', '.join(traces)}. Nothing was changed: "
            "starting afresh would register the models again and make new keys (clients "
            "of the running services would get 401)",
            hint=f"restore {self.path} from a backup (keep the {DB_NAME}-wal file beside "
            f"it, if there is one); or, to start a new state that keeps the model blobs, "
            f"the services' keys and the deployed model versions, run {RESET}. Running "
            "services keep running either way")

    def _mark(self, new: bool) -> None:
        """Write ``state.id`` (once): from now on a missing database is a lost one."""
        sidecar = self.state_dir / ID_NAME
        if sidecar.exists() and not new:
            return
        data = {"id": secrets.token_hex(8),
                "created": time.strftime("%Y-%m-%d %H:%M %z"),
                "about": f"mlbuild made {DB_NAME} here; if it is missing or empty, it "
                         f"was lost: restore it from a backup, or run {RESET}"}
        try:
            fsutil.write_atomic(sidecar, json.dumps(data, indent=1) + "\n")
        except OSError:
            pass  # (a full disk) written by the next run that opens the database

    def _schema_row(self) -> tuple | None:
        if not self.conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone():
            return None
        return self.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()

    def _migrate(self, new: bool = False) -> None:
        row = self._schema_row()
        if row is None:
            with self.transaction():
                # Again under the write lock: another process may have just made it.
                row = self._schema_row()
                if row is None:
                    if not new:
                        self._refuse_if_lost("holds no state (no mlbuild tables)")
                    for stmt in _SCHEMA.split(";"):
                        if stmt.strip():
                            self.conn.execute(stmt)
                    self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                                      (str(SCHEMA_VERSION),))
            if row is None:
                return
        version = int(row[0])
        if version > SCHEMA_VERSION:
            raise StateError(
                f"the state database {self.path} was written by a newer mlbuild "
                f"(format {version}, this one reads {SCHEMA_VERSION})",
                hint=f"upgrade mlbuild; or, to start afresh, move the file aside and run {RESET}",
            )
        if version < SCHEMA_VERSION:
            with self.transaction():
                for v in range(version + 1, SCHEMA_VERSION + 1):
                    self.conn.execute(_MIGRATIONS[v])
                self.conn.execute("UPDATE meta SET value=? WHERE key='schema_version'",
                                  (str(SCHEMA_VERSION),))

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; nested calls join the outer one."""
        if self._depth:
            self._depth += 1
            try:
                yield self.conn
            finally:
                self._depth -= 1
            return
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise self._error(e) from e
        self._depth = 1
        try:
            yield self.conn
            self.conn.execute("COMMIT")
        except BaseException as e:
            # SQLite may have rolled back already (SQLITE_FULL, SQLITE_IOERR): a second
            # ROLLBACK would fail and hide the reason.
            if self.conn.in_transaction:
                try:
                    self.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            if isinstance(e, sqlite3.Error):
                raise self._error(e) from e
            raise
        finally:
            self._depth = 0

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        try:
            return self.conn.execute(sql, args).fetchall()
        except sqlite3.Error as e:
            raise self._error(e) from e

    def execute(self, sql: str, args: tuple = ()) -> None:
        """One statement in its own transaction (or the current one)."""
        with self.transaction():  # (which says what went wrong)
            self.conn.execute(sql, args)

    # -- step records ---------------------------------------------------------------

    def get_step(self, step_id: str) -> "StepRecord | None":
        rows = self.query(
            "SELECT id, kind, fingerprint, output_key, detail, outputs, finished_at, duration "
            "FROM steps WHERE id=?",
            (step_id,),
        )
        if not rows:
            return None
        r = rows[0]
        return StepRecord(r[0], r[1], r[2], r[3], json.loads(r[4]), json.loads(r[5]), r[6], r[7])

    def all_steps(self) -> dict[str, "StepRecord"]:
        rows = self.query(
            "SELECT id, kind, fingerprint, output_key, detail, outputs, finished_at, duration FROM steps"
        )
        return {
            r[0]: StepRecord(r[0], r[1], r[2], r[3], json.loads(r[4]), json.loads(r[5]), r[6], r[7])
            for r in rows
        }

    def record_step(self, rec: "StepRecord") -> None:
        self.execute(
            "INSERT OR REPLACE INTO steps VALUES (?,?,?,?,?,?,?,?)",
            (rec.id, rec.kind, rec.fingerprint, rec.output_key, dumps(rec.detail),
             dumps(rec.outputs), rec.finished_at, rec.duration),
        )

    def forget_steps(self, prefix: str | None = None) -> int:
        with self.transaction() as c:
            if prefix is None:
                return c.execute("DELETE FROM steps").rowcount
            return c.execute("DELETE FROM steps WHERE id LIKE ?", (prefix + "%",)).rowcount

    # -- deployments and keys -------------------------------------------------------

    def get_deployment(self, target: str, service: str) -> dict | None:
        rows = self.query("SELECT data FROM deployments WHERE target=? AND service=?",
                          (target, service))
        return json.loads(rows[0][0]) if rows else None

    def deployments(self, target: str | None = None) -> dict[tuple[str, str], dict]:
        rows = self.query("SELECT target, service, data FROM deployments"
                          + (" WHERE target=?" if target else "") + " ORDER BY target, service",
                          (target,) if target else ())
        return {(r[0], r[1]): json.loads(r[2]) for r in rows}

    def put_deployment(self, target: str, service: str, data: dict) -> None:
        self.execute("INSERT OR REPLACE INTO deployments VALUES (?,?,?,?)",
                     (target, service, dumps(data), time.time()))

    def drop_deployment(self, target: str, service: str) -> None:
        self.execute("DELETE FROM deployments WHERE target=? AND service=?", (target, service))

    def get_keys(self, target: str, service: str) -> tuple[str, str] | None:
        rows = self.query("SELECT primary_key, secondary_key FROM keys "
                          "WHERE target=? AND service=?", (target, service))
        return (rows[0][0], rows[0][1]) if rows else None

    def put_keys(self, target: str, service: str, primary: str, secondary: str) -> None:
        self.execute("INSERT OR REPLACE INTO keys VALUES (?,?,?,?,?)",
                     (target, service, primary, secondary, time.time()))

    # -- small caches ---------------------------------------------------------------

    def validated_seen(self, key: str) -> bool:
        return bool(self.query("SELECT 1 FROM validated WHERE key=?", (key,)))

    def validated_add(self, key: str) -> None:
        self.execute("INSERT OR IGNORE INTO validated VALUES (?)", (key,))

    def get_plan(self, key: str) -> Any | None:
        rows = self.query("SELECT plan FROM plans WHERE key=?", (key,))
        return json.loads(rows[0][0]) if rows else None

    def put_plan(self, key: str, plan: Any) -> None:
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO plans VALUES (?,?,?)", (key, dumps(plan), time.time()))
            # Keep the cache small: the 32 most recently made plans.
            c.execute(
                "DELETE FROM plans WHERE key NOT IN "
                "(SELECT key FROM plans ORDER BY used_at DESC LIMIT 32)"
            )

    def close(self) -> None:
        try:
            if self.conn is not None:
                self.conn.close()
        except sqlite3.Error:
            pass


class StepRecord:
    """What the state remembers of a step that succeeded."""

    __slots__ = ("id", "kind", "fingerprint", "output_key", "detail", "outputs", "finished_at", "duration")

    def __init__(self, id, kind, fingerprint, output_key, detail, outputs, finished_at, duration):
        self.id = id
        self.kind = kind
        self.fingerprint = fingerprint
        self.output_key = output_key
        self.detail = detail
        self.outputs = outputs
        self.finished_at = finished_at
        self.duration = duration


class SchemaCache:
    """Adapter giving ``load_project`` the validation cache (seen/add)."""

    def __init__(self, db: StateDB):
        self.db = db

    def seen(self, key: str) -> bool:
        return self.db.validated_seen(key)

    def add(self, key: str) -> None:
        if not self.db.read_only:  # (a cache: remembered by the next run that can write)
            self.db.validated_add(key)
