"""One function per verb. The CLI only parses arguments, calls these and prints.

Every function takes ``directory`` (``-C``) and ``file`` (``-f``) to find the
manifest, and raises only :class:`mlbuild.errors.MlbuildError` for expected failures.
Verbs that change state take the project lock; read-only verbs do not.
"""

from __future__ import annotations

import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from mlbuild.errors import InvalidInput
from mlbuild.state.db import STATE_DIR, SchemaCache, StateDB


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Session:
    """An open project: its manifest, state database, digest cache and registry."""

    project: object
    db: StateDB
    digests: object
    registry: object

    def context(self, target, options=None, log=_say):
        from mlbuild.graph.step import BuildContext

        return BuildContext(self.project, target, self.db, self.digests, self.registry,
                            options or {}, log)


class _NewCache:
    """A validation cache that has seen nothing and remembers what it is told."""

    def __init__(self):
        self.keys: list[str] = []

    def seen(self, key: str) -> bool:
        return False

    def add(self, key: str) -> None:
        self.keys.append(key)


@contextmanager
def _state(state_dir: Path, lock: bool, on_wait=_say) -> Iterator[StateDB]:
    from mlbuild.state.lock import ProjectLock

    db = StateDB(state_dir)
    lk = ProjectLock(state_dir, on_wait=on_wait) if lock else None
    try:
        if lk:
            lk.acquire()
        yield db
    finally:
        if lk:
            lk.release()
        db.close()


@contextmanager
def session(directory: str | Path = ".", file: str | None = None, *, lock: bool = False,
            on_wait: Callable[[str], None] = _say) -> Iterator[Session]:
    """Open the project in ``directory`` (manifest ``file``, default mlproject.yaml)."""
    from mlbuild.manifest import find_manifest, load_project
    from mlbuild.state.digest import DigestCache
    from mlbuild.state.registry import Registry

    manifest = find_manifest(Path(directory), file)
    state_dir = manifest.parent / STATE_DIR
    project = None
    if not state_dir.exists():
        # Bad input must not leave a .mlbuild folder behind: load before creating it,
        # and remember the validation once the database exists.
        fresh = _NewCache()
        project = load_project(manifest, schema_cache=fresh)
    with _state(state_dir, lock, on_wait) as db:
        if project is None:
            project = load_project(manifest, schema_cache=SchemaCache(db))
        else:
            for key in fresh.keys:
                db.validated_add(key)
        digests = DigestCache(db)
        try:
            yield Session(project, db, digests, Registry(db, digests))
        finally:
            digests.flush()


@contextmanager
def registry_session(directory: str | Path = ".", file: str | None = None, *,
                     lock: bool = False) -> Iterator[Session]:
    """The registry of the project in ``directory``; works without a manifest too
    (the state then lives in ``directory/.mlbuild``)."""
    from mlbuild.manifest import find_manifest
    from mlbuild.state.digest import DigestCache
    from mlbuild.state.registry import Registry

    try:
        root = find_manifest(Path(directory), file).parent
    except InvalidInput:
        if file:
            raise
        root = Path(directory)
    with _state(root / STATE_DIR, lock) as db:
        digests = DigestCache(db)
        yield Session(None, db, digests, Registry(db, digests))


# -- validate / plan / graph ---------------------------------------------------------

def validate(directory=".", file=None):
    """Load and check the manifest. Returns the Project; raises ManifestError."""
    from mlbuild.manifest import find_manifest, load_project

    return load_project(find_manifest(Path(directory), file))


@dataclass
class RunResult:
    target: object
    outcomes: list

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)


def _steps(s: Session, target, kinds: set[str] | None = None):
    from mlbuild.graph.planner import plan_steps, select

    specs = plan_steps(s.project, target, s.db)
    return select(specs, kinds) if kinds else specs


def plan(directory=".", file=None, target: str | None = None) -> RunResult:
    """What ``deploy`` would do, with the reason for every step that would run."""
    from mlbuild.graph.executor import execute

    with session(directory, file) as s:
        t = s.project.target(target)
        outcomes = execute(s.context(t), _steps(s, t), dry_run=True)
        return RunResult(t, outcomes)


def graph(directory=".", file=None, target: str | None = None, fmt: str = "text") -> str:
    from mlbuild.graph.planner import render_graph

    with session(directory, file) as s:
        t = s.project.target(target)
        return render_graph(_steps(s, t), fmt)


def _run(directory, file, target, kinds, on_event, force) -> RunResult:
    from mlbuild.graph.executor import execute

    with session(directory, file, lock=True) as s:
        t = s.project.target(target)
        specs = _steps(s, t, kinds)
        result = RunResult(t, [])
        result.outcomes = execute(s.context(t), specs, force=force, on_event=on_event)
        return result


def build(directory=".", file=None, target: str | None = None, on_event=None,
          force: bool = False) -> RunResult:
    """Build what ``target`` needs (models and build contexts; images for docker)."""
    return _run(directory, file, target, {"context", "image"}, on_event, force)


def deploy(directory=".", file=None, target: str | None = None, on_event=None,
           force: bool = False) -> RunResult:
    """Bring ``target`` (default: the manifest's default_target) up to date."""
    return _run(directory, file, target, None, on_event, force)


# -- models ------------------------------------------------------------------------------

def models_register(path: str, name: str, directory=".", file=None, **meta):
    """Register a file or folder. Returns (ModelVersion, created)."""
    p = Path(directory) / path
    with registry_session(directory, file, lock=True) as s:
        return s.registry.register(p, name, source=path, **meta)


def models_list(directory=".", file=None, name: str | None = None):
    with registry_session(directory, file) as s:
        versions = s.registry.versions(name)
        if name and not versions:
            s.registry.get(name)  # raises with a "did you mean"
        return versions


def models_show(ref: str, directory=".", file=None):
    with registry_session(directory, file) as s:
        return s.registry.get(ref)


def models_download(ref: str, out: str | None = None, directory=".", file=None) -> Path:
    """Copy a version's files into ``out`` (default ./NAME-VERSION)."""
    with registry_session(directory, file) as s:
        mv = s.registry.get(ref)
        dest = Path(out) if out else Path(f"{mv.name}-{mv.version}")
        if dest.is_dir() and any(dest.iterdir()) or dest.exists() and not dest.is_dir():
            raise InvalidInput(f"{dest} already exists and is not empty",
                               hint="choose another folder with -o")
        s.registry.materialize(mv, dest, link=False)
        return dest


def models_delete(ref: str, directory=".", file=None):
    with registry_session(directory, file, lock=True) as s:
        return s.registry.delete(ref)


def models_tag(ref: str, set_tags: dict, remove: list, directory=".", file=None):
    with registry_session(directory, file, lock=True) as s:
        return s.registry.tag(ref, set_tags, remove)


# -- clean / init ------------------------------------------------------------------------

def clean(directory=".", file=None, packages: bool = False, everything: bool = False) -> list[str]:
    """Remove build contexts, logs and step records (next deploy redoes every step).

    Args:
        packages: also remove the package directories of package targets.
        everything: remove the whole ``.mlbuild`` folder, the model registry included.

    Returns:
        The paths removed, relative to the project.
    """
    from mlbuild.manifest import find_manifest, load_project

    manifest = find_manifest(Path(directory), file)
    root = manifest.parent
    removed = []
    project = load_project(manifest) if packages else None
    state_dir = root / STATE_DIR
    if everything:
        if state_dir.exists():
            with _state(state_dir, lock=True):
                shutil.rmtree(state_dir / "contexts", ignore_errors=True)
            shutil.rmtree(state_dir, ignore_errors=True)
            removed.append(STATE_DIR)
    elif state_dir.exists():
        with _state(state_dir, lock=True) as db:
            for sub in ("contexts", "logs"):
                if (state_dir / sub).exists():
                    shutil.rmtree(state_dir / sub)
                    removed.append(f"{STATE_DIR}/{sub}")
            db.forget_steps()
    if project is not None:
        # Only folders mlbuild wrote (they hold its package manifest) are removed.
        for t in project.targets.values():
            if t.type != "package" or not t.out or not (root / t.out).is_dir():
                continue
            for sub in sorted((root / t.out).iterdir()):
                if sub.is_dir() and (sub / "mlbuild-package.json").is_file():
                    shutil.rmtree(sub)
                    removed.append(f"{t.out}/{sub.name}")
            try:
                (root / t.out).rmdir()  # only when nothing else is left in it
            except OSError:
                pass
    return removed


def init(directory=".", name: str | None = None, force: bool = False) -> list[str]:
    """Scaffold a project that deploys as is. Returns the files written."""
    from mlbuild.scaffold import scaffold

    return scaffold(Path(directory), name, force)
