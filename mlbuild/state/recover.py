"""``mlbuild state reset``: a new state database after the old one was lost (deleted,
emptied) or damaged, keeping what can be found again.

What the database held, and where a reset finds it again::

    keys of the services    secrets/TARGET/SERVICE.keys, the files the running releases
                            and containers were given: taken back as they are, so
                            clients keep working and the next deploy keeps them
    model versions          the MODEL_DIR layout models/NAME/VERSION/... of the build
                            contexts and releases (hard links to the blobs): registered
                            again as the same NAME@VERSION, so pins still mean the same
                            content; their description and tags come back from the
                            manifest at the next deploy
    model content           blobs/: all kept, also content no version names any more
    process deployments     run/TARGET/SERVICE/RELEASE whose runtime still answers:
                            recorded again, so status shows it and the next deploy
                            replaces it without downtime
    step records, caches    not recovered: the next deploy redoes the steps

Not recovered: docker and kubernetes deployments (they keep running; the next deploy
replaces them, ``mlbuild down`` stops them), keys that were never handed to a release
(a kubernetes target's are in its Secret), and versions no context or release holds.

Nothing is deleted: the old ``state.db`` and its ``-wal``/``-shm`` are renamed
``state.db.lost-TIME`` (``.broken-TIME`` when it was damaged), ``state.db-wal.lost-TIME``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlbuild.errors import InvalidInput, StateCorrupt, StateLost
from mlbuild.state.db import DB_NAME, StateDB, dumps
from mlbuild.state.digest import hash_file, hash_json, walk_files


@dataclass
class ResetReport:
    """What ``reset`` did. Paths are relative to the state folder."""

    reason: str                                         # "lost" or "broken"
    moved: list[str] = field(default_factory=list)      # files renamed aside
    keys: list[str] = field(default_factory=list)       # TARGET/SERVICE
    models: list[str] = field(default_factory=list)     # NAME@VERSION
    deployments: list[str] = field(default_factory=list)  # TARGET/SERVICE
    blobs: int = 0                                      # model files kept in blobs/

    def to_json(self) -> dict:
        return dict(self.__dict__)


def reset(state_dir: Path) -> ResetReport:
    """Move a lost or damaged state database aside and start a new one, recovering
    what :mod:`this module <mlbuild.state.recover>` lists. Take the project lock
    around it.

    Raises:
        InvalidInput: there is no state here, or it is sound (nothing to reset).
        StateError: the database cannot be opened for another reason (a full disk, a
            read-only file system, a lock): a reset would not help, the error says what does.
    """
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        raise InvalidInput(f"no state to reset: {state_dir} does not exist")
    try:
        StateDB(state_dir).close()
    except StateLost:
        reason = "lost"
    except StateCorrupt:
        reason = "broken"
    else:
        raise InvalidInput(
            f"the state database {state_dir / DB_NAME} is sound: nothing to reset",
            hint="mlbuild clean --all removes the whole state, the model registry included "
                 "(stop the services first: mlbuild down TARGET)")
    report = ResetReport(reason)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for suffix in ("", "-wal", "-shm"):
        old = state_dir / f"{DB_NAME}{suffix}"
        if old.exists():
            aside = old.with_name(f"{old.name}.{reason}-{stamp}")
            os.rename(old, aside)
            report.moved.append(f"{old.name} -> {aside.name}")
    db = StateDB(state_dir, new=True)
    try:
        with db.transaction():
            report.keys = _recover_keys(db)
            report.models = _recover_models(db)
            report.deployments = _recover_deployments(db)
    finally:
        db.close()
    blobs = state_dir / "blobs"
    report.blobs = sum(1 for p in blobs.rglob("*") if p.is_file()) if blobs.is_dir() else 0
    return report


def _recover_keys(db: StateDB) -> list[str]:
    found = []
    for f in sorted((db.state_dir / "secrets").glob("*/*.keys")):
        try:
            keys = [ln.strip() for ln in f.read_text().splitlines()
                    if ln.strip() and not ln.startswith("#")]
        except OSError:
            continue
        if len(keys) >= 2:
            target, service = f.parent.name, f.name.removesuffix(".keys")
            db.put_keys(target, service, keys[0], keys[1])
            found.append(f"{target}/{service}")
    return found


def _recover_models(db: StateDB) -> list[str]:
    sd = db.state_dir
    blob_root = sd / "blobs" / "sha256"
    by_inode = {}
    if blob_root.is_dir():
        for blob in blob_root.glob("*/*"):
            st = blob.stat()
            by_inode[(st.st_dev, st.st_ino)] = f"sha256:{blob.name}"
    holders = sorted(sd.glob("contexts/*/models")) + sorted(sd.glob("run/*/*/*/models"))
    versions: dict[tuple[str, int], Path] = {}
    for models in holders:
        for folder in sorted(models.glob("*/*")):
            if folder.is_dir() and folder.name.isdigit():
                versions.setdefault((folder.parent.name, int(folder.name)), folder)
    from mlbuild.state.registry import Registry, check_name

    registry = Registry(db)
    done = []
    last: dict[str, int] = {}
    for (name, version), folder in sorted(versions.items()):
        try:
            check_name(name)
        except InvalidInput:
            continue
        listing = []
        for rel, p in walk_files(folder):
            st = p.stat()
            digest = by_inode.get((st.st_dev, st.st_ino)) or hash_file(p)
            registry._store_blob(p, digest, st.st_size)  # puts back a blob that is gone
            listing.append((rel, digest, st.st_size))
        if not listing:
            continue
        db.conn.execute(
            "INSERT INTO models VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (name, version, hash_json([[rel, d] for rel, d, _ in listing]),
             dumps([list(x) for x in listing]), sum(s for _, _, s in listing), None, None,
             "{}", dumps({"recovered_from": os.path.relpath(folder, sd)}), None, None, None,
             time.time()))
        last[name] = max(version, last.get(name, 0))
        done.append(f"{name}@{version}")
    for name, version in last.items():  # versions are never reused
        db.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                        (f"model-last:{name}", str(version)))
    return done


def _recover_deployments(db: StateDB) -> list[str]:
    """Record again the process releases whose runtime still answers, as the process
    step records them (the fingerprint only as far as the release's name tells it)."""
    from mlbuild.backends import process as proc
    from mlbuild.graph.steps.process import HOST, log_file

    root = db.state_dir.parent
    rel = lambda p: os.path.relpath(p, root).replace(os.sep, "/")  # noqa: E731
    found = []
    for release in sorted((db.state_dir / "run").glob("*/*/*")):
        target, service = release.parent.parent.name, release.parent.name
        ready = proc.read_ready(release)
        if not ready or not ready.get("pid") or not ready.get("port") or \
                db.get_deployment(target, service) is not None:
            continue
        pid, port = ready["pid"], ready["port"]
        pgid = proc.release_group(release)
        if pgid is None or not proc.is_runtime(pid, port):
            continue
        try:  # started as VENV/bin/python -m mlbuild.runtime ...
            python = Path(os.fsdecode(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]))
        except OSError:
            continue
        venv = python.parent.parent
        db.put_deployment(target, service, {
            "pid": pid, "pgid": pgid, "host": HOST, "port": port,
            "url": f"http://{HOST}:{port}", "release": rel(release),
            "venv": rel(venv) if venv.is_absolute() else str(venv),
            "fingerprint": "sha256:" + release.name.split("-")[0],
            "started_at": (release / proc.READY_FILE).stat().st_mtime,
            "log": rel(log_file(db.state_dir, target, service))})
        found.append(f"{target}/{service}")
    return found
