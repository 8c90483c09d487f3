"""Load ``mlproject.yaml`` into a validated, immutable :class:`Project`.

::

    bytes ──yamlload.parse──▶ data + lines ──schema.validate──▶ ──semantic──▶ Project
                 (syntax, duplicate keys)    (skipped when cached)  (refs, files)

Every problem of every stage is collected and raised at once as one
:class:`~mlbuild.errors.ManifestError`; bad input never raises anything else.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from mlbuild.errors import InvalidInput, ManifestError, Problem
from mlbuild.manifest import schema, semantic, yamlload
from mlbuild.manifest.model import Project

__all__ = ["MANIFEST_NAMES", "find_manifest", "load_project", "read_manifest_data"]

MANIFEST_NAMES = ("mlproject.yaml", "mlproject.yml")


def find_manifest(directory: Path, file: str | None = None) -> Path:
    """The manifest to use.

    Args:
        directory: folder to look in (usually the current one).
        file: ``-f FILE`` as given, relative to ``directory`` (or absolute).

    Returns:
        The absolute path of the manifest.

    Raises:
        InvalidInput: there is no such file, no manifest in ``directory``, or both
            ``mlproject.yaml`` and ``mlproject.yml``.
    """
    directory = Path(os.path.abspath(directory))
    if file is not None:
        path = directory / file
        if not path.is_file():
            raise InvalidInput(f"no manifest file {file!r}",
                               hint=f"check the path (relative to {directory})")
        return Path(os.path.abspath(path))
    found = [directory / n for n in MANIFEST_NAMES if (directory / n).is_file()]
    if len(found) > 1:
        raise InvalidInput(f"both {MANIFEST_NAMES[0]} and {MANIFEST_NAMES[1]} in {directory}",
                           hint="delete one, or choose with -f FILE")
    if not found:
        raise InvalidInput(f"no {MANIFEST_NAMES[0]} in {directory}",
                           hint="run mlbuild init to create one, or name it with -f FILE")
    return found[0]


def display_name(path: Path) -> str:
    """The manifest's name as the user sees it: relative to cwd if short, else the
    file name."""
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return path.name
    if len(rel) <= 40 and not rel.startswith(".."):
        return Path(rel).as_posix()
    return path.name


def _read(path: Path, file: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ManifestError([Problem(file, None, "", f"cannot read: {e.strerror or e}")]) from None


def read_manifest_data(path) -> tuple[dict, dict]:
    """The manifest as plain data and its line map, for tooling (no validation).

    Returns:
        ``(data, lines)``: lines maps path tuples such as
        ``("services", "diabetes", "environment")`` to 1-based lines.

    Raises:
        ManifestError: the file cannot be read or is not a YAML mapping.
    """
    path = Path(os.path.abspath(path))
    file = display_name(path)
    doc = yamlload.parse(_read(path, file), file)
    if doc.problems:
        raise ManifestError(doc.problems)
    return doc.data, doc.lines


def load_project(path, schema_cache=None) -> Project:
    """Load, validate and type the manifest at ``path``.

    Args:
        path: the manifest file.
        schema_cache: optional object with ``seen(key) -> bool`` and ``add(key)``;
            key is the sha256 hex of the manifest bytes + the schema bytes. When
            seen, the JSON Schema check (and the jsonschema import) is skipped;
            YAML and semantic checks always run.

    Returns:
        The Project.

    Raises:
        ManifestError: with every problem found, each with file, line and field.
    """
    path = Path(os.path.abspath(path))
    file = display_name(path)
    content = _read(path, file)
    doc = yamlload.parse(content, file)
    if doc.data is None:
        raise ManifestError(doc.problems)
    problems = list(doc.problems)

    key = hashlib.sha256(content + schema.schema_bytes()).hexdigest()
    if schema_cache is None or not schema_cache.seen(key):
        found = schema.validate(doc.data, doc.lines, doc.raw, file)
        problems += found
        if schema_cache is not None and not problems:
            schema_cache.add(key)

    project, found = semantic.build_project(
        doc.data, doc.lines, doc.raw,
        manifest_path=path, digest=hashlib.sha256(content).hexdigest(), file=file,
    )
    problems += found
    if problems or project is None:
        raise ManifestError(list(dict.fromkeys(problems)))
    return project
