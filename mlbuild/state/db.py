"""The state database: one SQLite file in ``.mlbuild/state.db``.

It holds step records, the model registry, deployments, the file-digest cache, the
manifest-validation cache and the plan cache. Writes happen in transactions
(``with db.transaction():``); a step is recorded only after it succeeded, so a run
that is interrupted or killed leaves the previous records and the next run redoes
exactly the unfinished steps.

The format is versioned (``SCHEMA_VERSION``). An unreadable or corrupt file, or one
written by a newer mlbuild, raises :class:`StateError` naming the file to delete.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from mlbuild.errors import StateError

SCHEMA_VERSION = 2
STATE_DIR = ".mlbuild"
DB_NAME = "state.db"

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
        StateError: the file is corrupt, unreadable, or from a newer mlbuild.
    """

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / DB_NAME
        try:
            # Only its owner may read it: it holds the services' auth keys.
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            if self.state_dir.stat().st_mode & 0o077:
                os.chmod(self.state_dir, 0o700)
            # The database itself 0600 too (SQLite gives its -wal and -shm the same mode):
            # a folder's mode is lost when it is copied or unpacked elsewhere.
            if not self.path.exists():
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            for f in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
                if f.exists() and f.stat().st_mode & 0o077:
                    os.chmod(f, 0o600)
        except OSError as e:
            raise StateError(f"cannot create the state folder {self.state_dir}: {e.strerror}") from e
        self._depth = 0
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves.
            self.conn = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise self._corrupt(e) from e

    def _corrupt(self, err: Exception) -> StateError:
        return StateError(
            f"the state database {self.path} is unreadable: {err}",
            hint=f"move it aside (mv {self.path} {self.path}.broken) and run again; "
            "steps will be redone, and registered models must be registered again",
        )

    def _migrate(self) -> None:
        row = None
        try:
            row = self.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.OperationalError:
            pass  # a new, empty database
        if row is None:
            with self.transaction():
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        self.conn.execute(stmt)
                self.conn.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                )
            return
        version = int(row[0])
        if version > SCHEMA_VERSION:
            raise StateError(
                f"the state database {self.path} was written by a newer mlbuild "
                f"(format {version}, this one reads {SCHEMA_VERSION})",
                hint="upgrade mlbuild, or move the file aside to start afresh",
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
        except sqlite3.DatabaseError as e:
            raise self._corrupt(e) from e
        self._depth = 1
        try:
            yield self.conn
        except BaseException:
            self._depth = 0
            self.conn.execute("ROLLBACK")
            raise
        else:
            self._depth = 0
            self.conn.execute("COMMIT")

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        try:
            return self.conn.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as e:
            raise self._corrupt(e) from e

    def execute(self, sql: str, args: tuple = ()) -> None:
        """One statement in its own transaction (or the current one)."""
        try:
            with self.transaction():
                self.conn.execute(sql, args)
        except sqlite3.DatabaseError as e:
            raise self._corrupt(e) from e

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
        self.db.validated_add(key)
