"""The model registry: versions of models, their metadata, content-addressed blobs.

Layout in ``.mlbuild/``::

    blobs/sha256/ab/abcdef...     one read-only file per distinct content
    state.db  (table models)      name, version, digest, files, metadata

A model version is a list of files (relative paths under the model's own name: a
file model ``models/x.pkl`` is ``x.pkl``; a folder model ``outputs/`` is
``outputs/...``, as Azure ML v1 laid them out) with their blob digests. Its digest
is the digest of that listing, so the same content always has the same digest.

Registering copies content into the blob store (a copy-on-write clone where the
file system can). It does NOT hard-link the user's file: training code commonly
rewrites a model file in place (``open(path, "wb")`` truncates the same inode),
which would silently change an already registered version. From the blob store on,
everything is hard-linked: blobs are never written again.

A new version is made only when the content differs from the latest version;
registering the same content again updates the metadata and says so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from mlbuild.errors import InvalidInput, StateError
from mlbuild.fsutil import clone_or_copy, link_or_copy
from mlbuild.state import space
from mlbuild.state.db import StateDB, dumps
from mlbuild.state.digest import DigestCache, hash_json, walk_files


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    digest: str
    files: tuple[tuple[str, str, int], ...]  # (relative path, blob digest, size)
    size: int
    source: str | None = None
    description: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    properties: Mapping[str, str] = field(default_factory=dict)
    framework: str | None = None
    framework_version: str | None = None
    resources: Mapping | None = None
    created_at: float = 0.0

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "digest": self.digest,
            "size": self.size,
            "files": [{"path": p, "digest": d, "size": s} for p, d, s in self.files],
            "source": self.source,
            "description": self.description,
            "tags": dict(self.tags),
            "properties": dict(self.properties),
            "framework": self.framework,
            "framework_version": self.framework_version,
            "resources": dict(self.resources) if self.resources else None,
            "created_at": self.created_at,
        }


_COLS = ("name, version, digest, files, size, source, description, tags, properties, "
         "framework, framework_version, resources, created_at")


def _row(r) -> ModelVersion:
    return ModelVersion(
        name=r[0], version=r[1], digest=r[2],
        files=tuple(tuple(f) for f in json.loads(r[3])), size=r[4], source=r[5],
        description=r[6], tags=json.loads(r[7]), properties=json.loads(r[8]),
        framework=r[9], framework_version=r[10],
        resources=json.loads(r[11]) if r[11] else None, created_at=r[12],
    )


def _meta_row(meta: dict) -> tuple:
    """The metadata columns, in table order (description .. resources)."""
    return (meta["description"], dumps(meta["tags"]), dumps(meta["properties"]),
            meta["framework"], meta["framework_version"],
            dumps(meta["resources"]) if meta["resources"] else None)


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_name(name: str) -> None:
    """A model name as the manifest allows it. Raises InvalidInput."""
    if not _NAME.fullmatch(name or "") or len(name) > 255:
        raise InvalidInput(f"model name {name!r} is not valid",
                           hint="use letters, digits, '.', '_' and '-', starting with a "
                           "letter or digit")


def parse_ref(text: str) -> tuple[str, int | None]:
    """``NAME`` or ``NAME@VERSION``. Raises InvalidInput."""
    name, sep, ver = text.partition("@")
    if not name or not _NAME.fullmatch(name):
        raise InvalidInput(f"{text!r} is not a model reference", hint="write NAME or NAME@VERSION")
    if not sep:
        return name, None
    if not ver.isdigit() or int(ver) < 1:
        raise InvalidInput(f"{text!r}: version {ver!r} is not a positive whole number",
                           hint="write NAME or NAME@VERSION, e.g. ridge@3")
    return name, int(ver)


class Registry:
    """Model versions in the state database, content in the blob store.

    Args:
        db: the project's StateDB.
        digests: the DigestCache to hash source files through.
    """

    def __init__(self, db: StateDB, digests: DigestCache | None = None):
        self.db = db
        self.digests = digests or DigestCache(db)
        self.blob_root = db.state_dir / "blobs" / "sha256"

    # -- blobs ----------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return self.blob_root / hexd[:2] / hexd

    def _store_blob(self, src: Path, digest: str, size: int) -> None:
        dst = self.blob_path(digest)
        if dst.exists() and dst.stat().st_size == size:
            return
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
        before = os.stat(src)
        try:
            clone_or_copy(src, tmp)
        except BaseException as e:
            tmp.unlink(missing_ok=True)  # a partial copy would only hold the space
            if isinstance(e, OSError) and e.errno in space.NO_SPACE:
                raise space.disk_full(self.blob_root, self.db.state_dir, needed=size,
                                      what=f"the model file {src}") from e
            raise
        after = os.stat(src)
        if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
            tmp.unlink(missing_ok=True)
            raise InvalidInput(f"{src} changed while it was being registered",
                               hint="register it again once it is written")
        os.chmod(tmp, 0o444)
        os.replace(tmp, dst)

    # -- queries --------------------------------------------------------------------

    def names(self) -> list[str]:
        return [r[0] for r in self.db.query("SELECT DISTINCT name FROM models ORDER BY name")]

    def versions(self, name: str | None = None) -> list[ModelVersion]:
        if name is None:
            rows = self.db.query(f"SELECT {_COLS} FROM models ORDER BY name, version")
        else:
            rows = self.db.query(f"SELECT {_COLS} FROM models WHERE name=? ORDER BY version", (name,))
        return [_row(r) for r in rows]

    def latest(self, name: str) -> ModelVersion | None:
        rows = self.db.query(
            f"SELECT {_COLS} FROM models WHERE name=? ORDER BY version DESC LIMIT 1", (name,))
        return _row(rows[0]) if rows else None

    def find(self, name: str, version: int | None) -> ModelVersion | None:
        if version is None:
            return self.latest(name)
        rows = self.db.query(f"SELECT {_COLS} FROM models WHERE name=? AND version=?", (name, version))
        return _row(rows[0]) if rows else None

    def get(self, ref: str) -> ModelVersion:
        """The version named by ``NAME`` (latest) or ``NAME@VERSION``. Raises InvalidInput."""
        name, version = parse_ref(ref)
        mv = self.find(name, version)
        if mv is None:
            from mlbuild.manifest.suggest import did_you_mean

            if version is not None and self.latest(name) is not None:
                have = ", ".join(str(v.version) for v in self.versions(name))
                raise InvalidInput(f"model {name} has no version {version} (versions: {have})")
            raise InvalidInput(f"no registered model {name!r}" + did_you_mean(name, self.names()),
                               hint="see mlbuild models list")
        return mv

    # -- changes --------------------------------------------------------------------

    def register(self, src: Path, name: str, *, description: str | None = None,
                 tags: Mapping[str, str] | None = None, properties: Mapping[str, str] | None = None,
                 framework: str | None = None, framework_version: str | None = None,
                 resources: Mapping | None = None, source: str | None = None,
                 replace_metadata: bool = False) -> tuple[ModelVersion, bool]:
        """Register the file or folder ``src`` as a version of model ``name``.

        Returns:
            (the version, True if a new version was made). When the content equals the
            latest version's, no version is made and its metadata is updated: replaced
            by the given (``replace_metadata``, what the manifest's model step does: the
            manifest is the truth) or merged with it (what ``models register`` does:
            given fields and tags win, others are kept).

        Raises:
            InvalidInput: ``src`` does not exist or cannot be read.
        """
        check_name(name)
        src = Path(src)
        if not src.exists():
            raise InvalidInput(f"cannot register {src}: no such file or folder")
        # mlbuild's state (the folder, a file of it, a link to either) would be copied
        # into the blob store, and from there into contexts, images and packages.
        guard = self.db.guard
        if why := guard.why(src):
            raise InvalidInput(f"cannot register {src}: it {why}",
                               hint="register a model file or folder of your own")
        if src.is_dir():
            files = [(f"{src.name}/{rel}", p) for rel, p in walk_files(src)]
            if not files:
                raise InvalidInput(f"cannot register {src}: the folder holds no files")
            # A link that leaves the folder would register (and ship) another file's
            # content -- /etc/passwd, a key -- under the model's name. (A hard link to
            # a file of the state is refused where its digest is taken.)
            from mlbuild.fsutil import within

            root = os.path.realpath(src)
            for rel, p in files:
                real = os.path.realpath(p)
                if not within(root, real):
                    raise InvalidInput(f"cannot register {src}: {rel.split('/', 1)[1]} is a "
                                       f"link to {real}, outside the folder",
                                       hint="copy the file into the folder, or remove the link")
                if guard.holds(real):  # the folder holds the project (.MLBUILD, a link)
                    raise InvalidInput(f"cannot register {src}: {rel.split('/', 1)[1]} "
                                       f"{guard.why(p, real=real, links=False)}",
                                       hint="register a model file or folder of your own")
        else:
            files = [(src.name, src)]
        listing = [(rel, self.digests.file(p), p.stat().st_size) for rel, p in files]
        digest = hash_json([[rel, d] for rel, d, _ in listing])
        # Stored first in both cases below: for content already registered this puts
        # back a blob lost from the store, and costs one stat otherwise.
        for (_, d, size), (_, p) in zip(listing, files):
            self._store_blob(p, d, size)
        meta = dict(
            description=description, tags=dict(tags or {}), properties=dict(properties or {}),
            framework=framework, framework_version=framework_version,
            resources=dict(resources) if resources else None,
        )
        latest = self.latest(name)
        if latest is not None and latest.digest == digest:
            current = dict(description=latest.description, tags=dict(latest.tags),
                           properties=dict(latest.properties), framework=latest.framework,
                           framework_version=latest.framework_version,
                           resources=dict(latest.resources) if latest.resources else None)
            if not replace_metadata:
                meta = {k: ({**current[k], **v} if k in ("tags", "properties")
                            else current[k] if v is None else v)
                        for k, v in meta.items()}
            if current != meta:
                self.db.execute(
                    "UPDATE models SET description=?, tags=?, properties=?, framework=?, "
                    "framework_version=?, resources=? WHERE name=? AND version=?",
                    (*_meta_row(meta), name, latest.version))
                latest = self.find(name, latest.version)
            self.digests.flush()
            return latest, False
        total = sum(s for _, _, s in listing)
        with self.db.transaction() as c:
            # Versions are never reused, even after a delete: a pin such as ridge@1
            # must not silently come to mean other content.
            row = c.execute("SELECT MAX(version) FROM models WHERE name=?", (name,)).fetchone()
            last = c.execute("SELECT value FROM meta WHERE key=?", (f"model-last:{name}",)).fetchone()
            version = max(row[0] or 0, int(last[0]) if last else 0) + 1
            c.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"model-last:{name}", str(version)))
            c.execute(
                "INSERT INTO models VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (name, version, digest, dumps([list(x) for x in listing]), total, source,
                 *_meta_row(meta), time.time()))
        self.digests.flush()
        return self.find(name, version), True

    def tag(self, ref: str, set_tags: Mapping[str, str], remove: list[str] = ()) -> ModelVersion:
        mv = self.get(ref)
        tags = dict(mv.tags)
        tags.update(set_tags)
        for k in remove:
            if k not in tags:
                raise InvalidInput(f"model {mv.ref} has no tag {k!r}")
            del tags[k]
        self.db.execute("UPDATE models SET tags=? WHERE name=? AND version=?",
                        (dumps(tags), mv.name, mv.version))
        return self.find(mv.name, mv.version)

    def delete(self, ref: str) -> list[ModelVersion]:
        """Delete one version (``NAME@V``) or every version (``NAME``); unreferenced
        blobs are removed. Returns what was deleted."""
        name, version = parse_ref(ref)
        gone = [self.get(ref)] if version is not None else self.versions(name)
        if not gone:
            self.get(ref)  # raises the "no registered model" error
        with self.db.transaction() as c:
            for mv in gone:
                c.execute("DELETE FROM models WHERE name=? AND version=?", (mv.name, mv.version))
        self.gc()
        return gone

    def gc(self) -> int:
        """Remove blobs that no version references. Returns how many."""
        used = set()
        for (files,) in self.db.query("SELECT files FROM models"):
            used.update(d for _, d, _ in json.loads(files))
        removed = 0
        if self.blob_root.is_dir():
            for sub in self.blob_root.iterdir():
                for blob in sub.iterdir():
                    if f"sha256:{blob.name}" not in used:
                        blob.unlink()
                        removed += 1
        return removed

    def materialize(self, mv: ModelVersion, dest: Path, link: bool = True) -> None:
        """Lay the version's files out below ``dest`` (hard links, or copies)."""
        for rel, digest, _ in mv.files:
            blob = self.blob_path(digest)
            if not blob.exists():
                raise StateError(
                    f"the blob of {mv.ref} file {rel} is missing from {self.blob_root}",
                    hint=f"register the model again (mlbuild models register ... --name {mv.name})")
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            if link:
                link_or_copy(blob, out)
            else:
                shutil.copyfile(blob, out)
                os.chmod(out, 0o644)

    def blobs_present(self, mv: ModelVersion) -> bool:
        return all(self.blob_path(d).exists() for _, d, _ in mv.files)
