"""Content digests of files and folders, with a cache that avoids re-reading.

The cache is keyed by absolute path and checked against ``(size, mtime_ns, inode)``
— doit's MD5Checker habit: compare the cheap things first, read content only when
they differ — so re-checking an unchanged multi-GB model costs one ``stat``.

Digests are ``sha256:<hex>`` strings. A folder's digest is the sha256 of a canonical
listing of its files (relative POSIX paths, sorted) with their digests, so it does
not depend on where the folder lives.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat as stat_mod
import time
from pathlib import Path

from mlbuild.errors import InvalidInput

# A file modified less than this long ago is hashed but its digest not kept: file
# times are coarse (a kernel tick), so a second write in the same tick with the same
# size would otherwise look unchanged ("racy git" problem).
RACY_NS = 1_000_000_000
CHUNK = 1 << 20  # 1 MiB: large enough that hashing runs at sha256sum's speed
PREFIX = "sha256:"

# Never part of a digest or a build context: caches and version-control metadata.
IGNORED_NAMES = frozenset({"__pycache__", ".git", ".hg", ".svn", ".mlbuild", ".ipynb_checkpoints",
                           ".pytest_cache", ".mypy_cache", ".DS_Store"})
IGNORED_SUFFIXES = (".pyc", ".pyo")


def hash_bytes(data: bytes) -> str:
    return PREFIX + hashlib.sha256(data).hexdigest()


def hash_json(value) -> str:
    """Digest of a canonical JSON encoding (sorted keys, no spaces)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hash_bytes(text.encode())


def hash_file(path: Path | str) -> str:
    """sha256 of a file's content, read in 1 MiB chunks into one reused buffer."""
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return PREFIX + h.hexdigest()


def walk_files(folder: Path) -> list[tuple[str, Path]]:
    """Files below ``folder`` as sorted ``(relative posix path, absolute path)``.

    Skips IGNORED_NAMES and compiled Python files. Symlinks to files are followed
    (the caller checks that they stay inside the project); symlinked folders are not.
    """
    out: list[tuple[str, Path]] = []
    base = str(folder)
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d not in IGNORED_NAMES)
        rel_dir = os.path.relpath(dirpath, base)
        for name in filenames:
            if name in IGNORED_NAMES or name.endswith(IGNORED_SUFFIXES):
                continue
            rel = name if rel_dir == "." else f"{rel_dir}/{name}".replace(os.sep, "/")
            out.append((rel, Path(dirpath) / name))
    out.sort()
    return out


class DigestCache:
    """File digests cached in the state database.

    Args:
        db: a :class:`mlbuild.state.db.StateDB`, or None for no persistence.

    Lookups are served from one bulk read of the table; new digests are kept in
    memory and written by :meth:`flush` in one transaction.

    Every file mlbuild takes as input is digested here first, so this is where a
    file that is one of the state's own (state.db, a key file: under another name, by
    a hard or a symbolic link) is refused, on the ``stat`` made anyway
    (:class:`mlbuild.state.guard.StateGuard`).
    """

    def __init__(self, db=None):
        self.db = db
        self.guard = getattr(db, "guard", None)
        self._mem: dict[str, tuple[int, int, int, str]] | None = None
        self._dirty: dict[str, tuple[int, int, int, str]] = {}
        self.hashed_bytes = 0  # how much content was actually read (for tests/benchmarks)

    def _load(self) -> dict:
        if self._mem is None:
            self._mem = {}
            if self.db is not None:
                for path, size, mtime, ino, digest in self.db.query(
                    "SELECT path, size, mtime_ns, inode, digest FROM file_digests"
                ):
                    self._mem[path] = (size, mtime, ino, digest)
        return self._mem

    def file(self, path: Path | str) -> str:
        """Digest of one file. Raises InvalidInput when it cannot be read."""
        p = os.path.abspath(path)
        try:
            st = os.stat(p)
        except OSError as e:
            raise InvalidInput(f"cannot read {path}: {e.strerror}") from e
        if not stat_mod.S_ISREG(st.st_mode):
            raise InvalidInput(f"{path} is not a regular file")
        if self.guard is not None and self.guard.private_file(st) is not None:
            shown = self.guard.shown(p)
            raise InvalidInput(f"{shown} {self.guard.why(p, st=st)}: mlbuild does not read it",
                               hint=f"remove the link (rm {shown}); the file it names stays")
        key = (st.st_size, st.st_mtime_ns, st.st_ino)
        hit = self._load().get(p)
        if hit is not None and hit[:3] == key:
            return hit[3]
        try:
            digest = hash_file(p)
        except OSError as e:
            raise InvalidInput(f"cannot read {path}: {e.strerror}") from e
        self.hashed_bytes += st.st_size
        entry = (*key, digest)
        self._mem[p] = entry
        if time.time_ns() - st.st_mtime_ns >= RACY_NS:
            self._dirty[p] = entry
        return digest

    def tree(self, folder: Path) -> tuple[str, dict[str, str]]:
        """Digest of a folder and its ``{relative path: digest}`` listing."""
        listing = {rel: self.file(abs_) for rel, abs_ in walk_files(folder)}
        return hash_json(sorted(listing.items())), listing

    def remember(self, path: Path | str, digest: str) -> None:
        """Record a digest we computed while writing a file (saves a re-read)."""
        p = os.path.abspath(path)
        st = os.stat(p)
        entry = (st.st_size, st.st_mtime_ns, st.st_ino, digest)
        self._load()[p] = entry
        if time.time_ns() - st.st_mtime_ns >= RACY_NS:
            self._dirty[p] = entry

    def flush(self) -> None:
        """Write new digests to the database."""
        if self.db is None or not self._dirty or getattr(self.db, "read_only", False):
            return
        with self.db.transaction() as c:
            c.executemany(
                "INSERT OR REPLACE INTO file_digests VALUES (?,?,?,?,?)",
                [(p, *e) for p, e in self._dirty.items()],
            )
        self._dirty.clear()
