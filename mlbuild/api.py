"""One function per verb. The CLI only parses arguments, calls these and prints.

Every function takes ``directory`` (``-C``) and ``file`` (``-f``) to find the
manifest, and raises only :class:`mlbuild.errors.MlbuildError` for expected failures.
Verbs that change state take the project lock; read-only verbs do not.
"""

from __future__ import annotations

import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from mlbuild.errors import InvalidInput, MlbuildError
from mlbuild.state.db import STATE_DIR, SchemaCache, StateDB
from mlbuild.traffic import Traffic


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
def _state(state_dir: Path, lock: bool, on_wait=_say, read_only: bool = False
           ) -> Iterator[StateDB]:
    """The state database, under the project lock when ``lock``; ``read_only`` for a
    verb that only reads (it then opens also on a full disk, see StateDB)."""
    from mlbuild.state.lock import ProjectLock

    db = StateDB(state_dir, read_only=read_only)
    lk = ProjectLock(state_dir, on_wait=on_wait) if lock else None
    try:
        if lk:
            lk.acquire()
        yield db
    except MlbuildError as e:
        _say_what_to_free(e, state_dir)
        raise
    except OSError as e:  # a write into .mlbuild, the project or a package
        from mlbuild.state import space

        err = space.from_os_error(e, state_dir)
        if err is None:
            raise
        raise err from e
    finally:
        if lk:
            lk.release()
        db.close()


def _say_what_to_free(e: MlbuildError, state_dir: Path) -> None:
    """A step that failed on a full (or read-only) file system says what to do."""
    from mlbuild.state import space

    cause = e.__cause__
    if e.hint is None and isinstance(cause, OSError):
        err = space.from_os_error(cause, state_dir)
        if err is not None:
            e.hint = f"{err.message}: {err.hint}"


def _project_root(directory, file) -> Path:
    """The folder of the manifest found from ``directory`` (or ``file``); ``directory``
    itself when there is none (the state then lives in ``directory/.mlbuild``)."""
    from mlbuild.manifest import find_manifest

    try:
        return find_manifest(Path(directory), file).parent
    except InvalidInput:
        if file:
            raise
        return Path(directory)


@contextmanager
def session(directory: str | Path = ".", file: str | None = None, *, lock: bool = False,
            on_wait: Callable[[str], None] = _say, read_only: bool = False
            ) -> Iterator[Session]:
    """Open the project in ``directory`` (manifest ``file``, default mlproject.yaml);
    ``read_only`` for a verb that writes nothing (see StateDB)."""
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
    with _state(state_dir, lock, on_wait, read_only) as db:
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
    from mlbuild.state.digest import DigestCache
    from mlbuild.state.registry import Registry

    root = _project_root(directory, file)
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


def _run(directory, file, target, kinds, on_event, force, image_tar=False,
         jobs: int = 1, frozen: bool = False, offline: bool = False,
         force_conflicts: bool = False) -> RunResult:
    import dataclasses

    from mlbuild.graph.executor import execute
    from mlbuild.graph.planner import image_tar_steps

    with session(directory, file, lock=True) as s:
        t = s.project.target(target)
        if offline:
            if t.type not in ("package", "docker"):
                raise InvalidInput(f"--offline: target {t.name!r} is of type {t.type}",
                                   hint="--offline goes with a package or docker target")
            t = dataclasses.replace(t, offline=True)
        specs = _steps(s, t, kinds)
        if image_tar:
            if t.type != "package":
                raise InvalidInput(f"--image-tar: target {t.name!r} is of type {t.type}",
                                   hint="--image-tar goes with a package target")
            specs += image_tar_steps(s.project, t)
        if kinds is None and t.type in RUNNING_TYPES:
            prune_removed_services(s, t)
        result = RunResult(t, [])
        frozen = frozen or os.environ.get("MLBUILD_FROZEN") == "1"
        result.outcomes = execute(s.context(t, {"frozen": frozen,
                                                "force_conflicts": force_conflicts}),
                                  specs, force=force, on_event=on_event, jobs=jobs)
        return result


def build(directory=".", file=None, target: str | None = None, on_event=None,
          force: bool = False, jobs: int = 1, frozen: bool = False) -> RunResult:
    """Build what ``target`` needs (models and build contexts; images for docker)."""
    return _run(directory, file, target, {"context", "image"}, on_event, force, jobs=jobs,
                frozen=frozen)


def deploy(directory=".", file=None, target: str | None = None, on_event=None,
           force: bool = False, image_tar: bool = False, jobs: int = 1,
           frozen: bool = False, offline: bool = False,
           force_conflicts: bool = False) -> RunResult:
    """Bring ``target`` (default: the manifest's default_target) up to date.

    Args:
        image_tar: (package targets) also build each service's image and write it as
            ``<out>/<service>.image.tar``.
        force_conflicts: (kubernetes targets) take over fields another field manager
            owns instead of failing on the conflict.
    """
    return _run(directory, file, target, None, on_event, force, image_tar, jobs, frozen,
                offline, force_conflicts)


def push(directory=".", file=None, target: str | None = None, on_event=None,
         force: bool = False, jobs: int = 1) -> RunResult:
    """Build the images of a docker target and push them to the project's registry."""
    with session(directory, file) as s:
        t = s.project.target(target)
        if t.type != "docker":
            raise InvalidInput(f"target {t.name!r} is of type {t.type}: only docker targets "
                               "have images to push", hint="name a docker target")
        if not s.project.registry:
            raise InvalidInput(f"{s.project.manifest_path.name}: no registry to push to",
                               hint="set registry: HOST[:PORT][/PATH] in the manifest")
    return _run(directory, file, target, {"push"}, on_event, force, jobs=jobs)


def lock(directory=".", file=None, environment: str | None = None, upgrade: bool = False,
         on_event=None) -> list:
    """Lock the environments (or one): re-resolve those whose spec changed; with
    ``upgrade``, move every package to the newest version the spec allows."""
    from mlbuild.graph.executor import execute
    from mlbuild.graph.step import StepSpec
    from mlbuild.manifest.suggest import did_you_mean

    with session(directory, file, lock=True) as s:
        p = s.project
        names = list(p.environments)
        if environment is not None:
            if environment not in p.environments:
                raise InvalidInput(f"no environment {environment!r} in "
                                   f"{p.manifest_path.name}"
                                   + did_you_mean(environment, p.environments))
            names = [environment]
        specs = [StepSpec(f"lock:{n}", "lock", {"environment": n}) for n in names]
        t = next(iter(p.targets.values()))
        return execute(s.context(t, {"upgrade": upgrade}), specs, force=True,
                       on_event=on_event)


def clean_images(directory=".", file=None, keep: int = 2) -> list[str]:
    """Remove the project's images but the newest ``keep`` per service (and any image a
    container still uses). Returns the tags removed."""
    from mlbuild.backends.docker import connect
    from mlbuild.manifest import find_manifest, load_project

    project = load_project(find_manifest(Path(directory), file))
    eng = connect()
    # Releases a redeploy retired (NAME-old) that have stopped hold their image: they go.
    for name in eng.list_containers({"dev.mlbuild.project": project.name}):
        st = eng.container_state(name) if name.endswith("-old") else None
        if st is not None and not st.running:
            eng.remove_container(name, stop_timeout=0)
    by_service: dict[str, list] = {}
    for img in eng.list_images({"dev.mlbuild.project": project.name}):
        by_service.setdefault(img.labels.get("dev.mlbuild.service", "?"), []).append(img)
    removed = []
    for images in by_service.values():  # newest first
        for img in images[keep:]:
            for tag in img.tags:
                try:
                    if eng.remove_image(tag):
                        removed.append(tag)
                except MlbuildError:
                    pass  # in use by a container: kept
    return removed


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

def clean(directory=".", file=None, packages: bool = False, everything: bool = False) -> dict:
    """Remove build contexts, logs and step records (next deploy redoes every step).

    Args:
        packages: also remove what package targets wrote: the files each package
            folder's ``mlbuild-package.json`` lists, and the image tars ``out``'s
            ``mlbuild-written.json`` lists. Nothing else: the user's files stay.
        everything: remove the whole ``.mlbuild`` folder, the model registry included.

    Returns:
        ``{"removed": [paths], "kept": [{"path", "why"}]}``, paths relative to the
        project; ``kept``: files of the user in the package folders (and image tars
        mlbuild has no record of writing) that were left where they are.
    """
    from mlbuild.manifest import find_manifest, load_project

    manifest = find_manifest(Path(directory), file)
    root = manifest.parent
    removed = []
    project = load_project(manifest) if packages else None
    state_dir = root / STATE_DIR
    if everything:
        if state_dir.exists():
            with _state(state_dir, lock=True) as db:
                running = sorted(f"{t}/{svc}" for (t, svc) in db.deployments())
                if running:
                    # Removing the state would leave them running, unknown to mlbuild.
                    targets = sorted({r.split("/")[0] for r in running})
                    raise InvalidInput(
                        "services still run: " + ", ".join(running),
                        hint="stop them first: " + "; ".join(f"mlbuild down {t}"
                                                             for t in targets))
                shutil.rmtree(state_dir / "contexts", ignore_errors=True)
            shutil.rmtree(state_dir, ignore_errors=True)
            removed.append(STATE_DIR)
    elif state_dir.exists():
        with _state(state_dir, lock=True) as db:
            if (state_dir / "contexts").exists():
                shutil.rmtree(state_dir / "contexts")
                removed.append(f"{STATE_DIR}/contexts")
            # Logs, but those running services still write to.
            live = {root / d["log"] for d in db.deployments().values() if d.get("log")}
            logs = state_dir / "logs"
            if logs.exists():
                for dirpath, _, names in os.walk(logs, topdown=False):
                    for n in names:
                        if Path(dirpath, n) not in live:
                            os.unlink(Path(dirpath, n))
                    try:
                        os.rmdir(dirpath)
                    except OSError:
                        pass  # holds a live log
                removed.append(f"{STATE_DIR}/logs" + (" (but running services' logs)"
                                                       if live else ""))
            db.forget_steps()
    kept: list[dict] = []
    if project is not None:
        from mlbuild import written
        from mlbuild.graph.steps import package

        # Only files mlbuild's records list are removed (never a folder as a whole).
        for t in project.targets.values():
            if t.type != "package" or not t.out or not (root / t.out).is_dir():
                continue
            out = root / t.out
            for sub in sorted(out.iterdir()):
                if sub.is_symlink() or not sub.is_dir() or \
                        not (sub / package.PACKAGE_MANIFEST).is_file():
                    continue
                package.remove_written(sub)
                rel = f"{t.out}/{sub.name}"
                if os.path.lexists(sub / package.PACKAGE_MANIFEST):  # left: untrusted
                    kept.append({"path": rel, "why": f"its {package.PACKAGE_MANIFEST} is "
                                 "unreadable or a link: mlbuild cannot tell its files from "
                                 "yours"})
                    continue
                removed.append(rel)
                for dirpath, dirnames, names in os.walk(sub):
                    here = os.path.relpath(dirpath, sub).replace(os.sep, "/")
                    here = rel if here == "." else f"{rel}/{here}"
                    links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
                    kept += [{"path": f"{here}/{n}", "why": "not written by mlbuild"}
                             for n in sorted(names + links)]
            gone, why = written.remove_written(out)
            removed += [f"{t.out}/{n}" for n in gone]
            if why is not None:
                kept.append({"path": f"{t.out}/{written.RECORD}", "why": f"it {why}"})
            still, _ = written.read_record(out)  # what could not be removed
            for service in sorted(project.services):
                tar = out / f"{service}.image.tar"
                if os.path.lexists(tar):
                    kept.append({"path": f"{t.out}/{tar.name}", "why": "could not be removed"
                                 if tar.name in still else f"not in {t.out}/{written.RECORD}, "
                                 "the record of what mlbuild wrote there"})
            try:
                out.rmdir()  # only when nothing else is left in it
            except OSError:
                pass
    return {"removed": removed, "kept": kept}


def init(directory=".", name: str | None = None, force: bool = False) -> list[str]:
    """Scaffold a project that deploys as is. Returns the files written."""
    from mlbuild.scaffold import scaffold

    return scaffold(Path(directory), name, force)


def state_reset(directory=".", file=None):
    """Start a new state database after the old one was lost (deleted, emptied) or
    damaged, keeping the blobs and taking back the services' keys, the deployed model
    versions and the running process releases (see :mod:`mlbuild.state.recover`).
    Refuses when the database is sound. Returns a ResetReport."""
    from mlbuild.state.lock import ProjectLock
    from mlbuild.state.recover import reset

    root = _project_root(directory, file)
    state_dir = root / STATE_DIR
    if not state_dir.is_dir():
        raise InvalidInput(f"no state to reset: {state_dir} does not exist")
    with ProjectLock(state_dir, on_wait=_say):
        return reset(state_dir)


# -- running services: status / logs / down / invoke / keys / serve ----------------------

def _service_of(project, name: str):
    from mlbuild.manifest.suggest import did_you_mean

    try:
        return project.services[name]
    except KeyError:
        raise InvalidInput(f"no service {name!r} in {project.manifest_path.name}"
                           + did_you_mean(name, project.services),
                           hint="services: " + ", ".join(sorted(project.services))) from None


RUNNING_TYPES = ("process", "docker", "kubernetes")


def _running_target(project, target: str | None):
    """A target whose services run (process, docker, kubernetes). Raises NotSupported
    otherwise."""
    from mlbuild.errors import NotSupported

    t = project.target(target)
    if t.type not in RUNNING_TYPES:
        raise NotSupported(f"target {t.name!r} is of type {t.type}: nothing runs there",
                           hint="name a process, docker or kubernetes target")
    return t


STATUS_LOG_LINES = 5  # of a Failed service's log, in status


@dataclass
class ServiceStatus:
    target: str
    service: str
    state: str
    type: str = "process"
    url: str | None = None
    image: str | None = None
    pid: int | None = None
    fingerprint: str | None = None
    since: float | None = None
    detail: str = ""
    last_lines: tuple[str, ...] = ()  # of its log, when it Failed
    # Its last minute of /score (mlbuild/traffic.py), when it runs and its /metrics answers.
    traffic: Traffic | None = None
    # Where its collected model data goes (collect_model_data), as its deploy recorded it.
    model_data: str | None = None

    def to_json(self) -> dict:
        return dict(self.__dict__, last_lines=list(self.last_lines),
                    traffic=self.traffic.to_json() if self.traffic is not None else None)


def status(directory=".", file=None, target: str | None = None) -> list[ServiceStatus]:
    """The state of every service of ``target`` (default: of every process, docker and
    kubernetes target).

    A manifest that does not load does not hide what runs: the recorded deployments
    are shown, each noting that the manifest has problems (``validate`` lists them).
    """
    from mlbuild.errors import ManifestError
    from mlbuild.manifest import find_manifest

    try:
        return _status(directory, file, target)
    except ManifestError as e:
        manifest = find_manifest(Path(directory), file)
        state_dir = manifest.parent / STATE_DIR
        if not state_dir.exists():
            raise
        note = f"{manifest.name} does not load ({len(e.problems)} problem" \
               f"{'s' if len(e.problems) != 1 else ''}: mlbuild validate)"
        with _state(state_dir, lock=False, read_only=True) as db:
            deps = db.deployments(target)
        return [_observe(manifest.parent, t, name, _type_of(dep), dep, note)
                for (t, name), dep in deps.items()]


def _type_of(record: dict) -> str:
    """The target type a deployment record was written by."""
    return "kubernetes" if "kube" in record else "docker" if "container" in record \
        else "process"


def _status(directory, file, target: str | None) -> list[ServiceStatus]:
    with session(directory, file, read_only=True) as s:
        p = s.project
        targets = [_running_target(p, target)] if target else \
            [t for t in p.targets.values() if t.type in RUNNING_TYPES]
        out = []
        for t in targets:
            deps = s.db.deployments(t.name)
            names = [sv.name for sv in p.services_for(t)]
            names += sorted(n for (_, n) in deps if n not in names)
            for name in names:
                dep = deps.get((t.name, name))
                if dep is None:
                    out.append(ServiceStatus(t.name, name, "-", t.type, detail="not deployed"))
                    continue
                note = "no longer in the manifest (mlbuild down stops it)" \
                    if name not in p.services else ""
                out.append(_observe(p.root, t.name, name, t.type, dep, note))
        return out


def _observe(root: Path, target: str, name: str, ttype: str, dep: dict,
             note: str = "") -> ServiceStatus:
    from mlbuild.backends import process as proc
    from mlbuild.graph.steps import container

    last: list[str] = []
    if ttype == "kubernetes":
        from mlbuild.errors import MlbuildError
        from mlbuild.kube import ops

        try:
            state, detail, last = ops.observe(dep)
        except MlbuildError as e:  # one unreachable cluster must not hide the rest
            state, detail = "Unknown", f"cannot ask the cluster: {e.message}"
    elif ttype == "docker":
        state, detail = container.observe(dep)
    else:
        state, detail = proc.observe(dict(dep, release=str(root / dep["release"])))
    if note:
        detail += f"; {note}"
    if state == proc.FAILED and not last:  # why it failed is usually in its last words
        last = _last_lines(root, target, name, ttype, dep)
    seen = None  # the last minute, from the runtime's own /metrics
    if state in (proc.HEALTHY, proc.UNHEALTHY):
        if ttype == "kubernetes":
            # A kubernetes URL is a Service's or an Ingress's: one scrape would reach one
            # pod, and maybe not at all from here. ops.traffic reads every ready pod
            # through the API server's pod proxy and adds their windows up.
            from mlbuild.errors import MlbuildError
            from mlbuild.kube import ops

            try:
                seen = ops.traffic(dep)
            except MlbuildError:  # one unreachable cluster must not hide the rest
                seen = None
        elif dep["url"]:  # process and docker: the URL is the runtime's own port
            from mlbuild import traffic

            seen = traffic.read(dep["url"])
    return ServiceStatus(target, name, state, ttype, dep["url"] or None, dep.get("image"),
                         dep.get("pid"), dep["fingerprint"].split(":")[-1][:12],
                         dep["started_at"], detail.lstrip("; "), tuple(last), seen,
                         model_data=dep.get("model_data"))


def _last_lines(root: Path, target: str, name: str, ttype: str, dep: dict,
                n: int = STATUS_LOG_LINES) -> list[str]:
    """The last ``n`` non-blank lines of a deployment's log ([] when there is none)."""
    if ttype == "kubernetes":
        return []  # ops.observe reads the failing container's own
    if ttype == "docker":
        try:
            from mlbuild.backends.docker import connect

            text = connect().container_logs(dep["container"], tail=n * 3)
        except Exception:  # noqa: BLE001 - a status must not fail for want of a log
            return []
        lines = text.splitlines()
    else:
        from mlbuild.backends.process import tail
        from mlbuild.graph.steps.process import log_file

        lines = tail(log_file(root / STATE_DIR, target, name), n * 3)
    return [ln for ln in lines if ln.strip()][-n:]


def logs(service: str, directory=".", file=None, target: str | None = None,
         lines: int | None = 200, follow: bool = False):
    """The log of ``service``: yields lines (the last ``lines``; then, with ``follow``,
    new ones as they come, until interrupted)."""
    from mlbuild.backends.process import follow_log, read_log, tail

    with session(directory, file) as s:
        t = _running_target(s.project, target)
        dep = s.db.get_deployment(t.name, service)
        if t.type in ("kubernetes", "docker") and dep is None:
            _service_of(s.project, service)
            raise InvalidInput(f"service {service!r} is not deployed to target {t.name!r}",
                               hint=f"run mlbuild deploy {t.name}")
        if t.type == "kubernetes":
            from mlbuild.kube import ops

            yield from ops.logs(dep, lines, follow)
            return
        if t.type == "docker":
            from mlbuild.backends.docker import connect

            eng = connect()
            if follow:
                yield from (ln.rstrip("\n") for ln in eng.follow_logs(dep["container"],
                                                                      tail=lines or None))
            else:
                yield from eng.container_logs(dep["container"],
                                              tail=lines or None).rstrip("\n").splitlines()
            return
        path = _log_path(s, t, service)
    # A process target's log is rotated by size: these read across its older files.
    yield from tail(path, lines) if lines else read_log(path)
    if follow:
        yield from follow_log(path)


def _log_path(s: Session, t, service: str) -> Path:
    from mlbuild.graph.steps.process import log_file

    path = log_file(s.db.state_dir, t.name, service)
    if not path.exists():
        if service not in s.project.services:
            _service_of(s.project, service)
        raise InvalidInput(f"service {service!r} has no log on target {t.name!r} yet",
                           hint=f"deploy it first: mlbuild deploy {t.name}")
    return path


def down(directory=".", file=None, target: str | None = None) -> list[str]:
    """Stop every service of a process or docker target. Returns the services stopped.

    Works from the recorded deployments, so a manifest that no longer loads (or no
    longer names the target or the service) does not keep anything running; only the
    default target needs the manifest.
    """
    from mlbuild.errors import ManifestError
    from mlbuild.manifest import find_manifest, load_project

    manifest = find_manifest(Path(directory), file)
    project = None
    try:
        project = load_project(manifest)
    except ManifestError:
        if target is None:
            raise
    name = target or _running_target(project, None).name
    state_dir = manifest.parent / STATE_DIR
    if not state_dir.exists():
        if project is not None:
            _running_target(project, name)
        return []
    with _state(state_dir, lock=True) as db:
        deps = db.deployments(name)
        if not deps and project is not None:
            _running_target(project, name)  # a target neither recorded nor declared
        stopped = [svc for (_, svc), dep in deps.items()
                   if _stop_deployment(manifest.parent, db, name, svc, dep)]
        stopped += [svc for svc in _stop_strays(manifest.parent, state_dir, project, name)
                    if svc not in stopped]
        db.forget_steps(f"process:{name}/")
        db.forget_steps(f"container:{name}/")
        db.forget_steps(f"k8s:{name}/")
        return sorted(stopped)


def _stop_deployment(root: Path, db: StateDB, target: str, service: str, dep: dict) -> bool:
    """Stop one recorded deployment and forget it. True (it was recorded as running)."""
    from mlbuild.graph.steps.process import stop_release

    if "kube" in dep:
        from mlbuild.kube import ops

        ops.delete(dep)
    elif "container" in dep:
        from mlbuild.backends.docker import connect

        eng = connect()
        for c in (dep["container"], f"{dep['container']}-next", f"{dep['container']}-old"):
            eng.remove_container(c, stop_timeout=10)
    else:
        stop_release(root / dep["release"])
    db.drop_deployment(target, service)
    return True


def _stop_strays(root: Path, state_dir: Path, project, target: str) -> list[str]:
    """Stop what a killed deploy may have left unrecorded; returns those services."""
    import shutil as sh

    from mlbuild.graph.steps.process import stop_stray_releases

    found = []
    run_dir = state_dir / "run" / target
    if run_dir.is_dir():
        for svc_dir in run_dir.iterdir():
            if stop_stray_releases(svc_dir, keep=set()):
                found.append(svc_dir.name)
        sh.rmtree(run_dir, ignore_errors=True)
    t = project.targets.get(target) if project is not None else None
    if t is not None and t.type == "docker":
        from mlbuild.backends.docker import connect
        from mlbuild.graph.steps.container import container_name

        eng = connect()
        for svc in project.services_for(t):
            cname = container_name(project, svc.name, target)
            for c in (cname, f"{cname}-next", f"{cname}-old"):
                if eng.remove_container(c, stop_timeout=10):
                    found.append(svc.name)
    return found


def prune_removed_services(s: Session, t, say=_say) -> list[str]:
    """Stop the services recorded on ``t`` that it no longer deploys (renamed or
    removed in the manifest), so their ports are free for the others."""
    keep = {svc.name for svc in s.project.services_for(t)}
    gone = []
    for (_, svc), dep in s.db.deployments(t.name).items():
        if svc not in keep:
            _stop_deployment(s.project.root, s.db, t.name, svc, dep)
            s.db.forget_steps(f"process:{t.name}/{svc}")
            s.db.forget_steps(f"container:{t.name}/{svc}")
            s.db.forget_steps(f"k8s:{t.name}/{svc}")
            say(f"  stopped     {svc}  (no longer deployed to target {t.name})")
            gone.append(svc)
    return gone


@dataclass
class Response:
    status: int
    headers: dict
    body: bytes


def invoke(service: str, data: bytes, directory=".", file=None, target: str | None = None,
           content_type: str = "application/json", timeout: float = 60.0,
           path: str = "/score", url: str | None = None) -> Response:
    """POST ``data`` to a deployed service (with its key when it has auth: key), at its
    recorded URL or ``url`` (a kubernetes service without an ingress or load balancer
    has none reachable from here: kubectl port-forward, then --url)."""
    import http.client
    from urllib.parse import urlsplit

    from mlbuild.errors import StepFailed

    with session(directory, file) as s:
        t = _running_target(s.project, target)
        svc = _service_of(s.project, service)
        dep = s.db.get_deployment(t.name, service)
        if dep is None and url is None:
            raise InvalidInput(f"service {service!r} is not deployed to target {t.name!r}",
                               hint=f"run mlbuild deploy {t.name}")
        base = url or dep["url"]
        if not base:
            from mlbuild.kube.render import object_name

            raise InvalidInput(
                f"service {service!r} on target {t.name!r} has no address outside the "
                f"cluster (service_type {t.kube.service_type if t.kube else '?'}, no "
                "ingress)",
                hint=f"kubectl port-forward svc/{object_name(s.project.name, service)} "
                     f"8080:{t.kube.port if t.kube else 80} -n "
                     f"{t.kube.namespace if t.kube else 'default'}, then mlbuild invoke "
                     f"{service} --url http://127.0.0.1:8080")
        keys = None
        if svc.auth == "key":
            # The keys the running release was started with (a regenerated key applies
            # at the next deploy), else the current ones.
            from mlbuild.graph.steps.process import keys_file
            from mlbuild.runtime.config import read_keys_file

            kf = keys_file(s.db.state_dir, t.name, service)
            keys = read_keys_file(str(kf)) if kf.exists() else s.db.get_keys(t.name, service)
    u = urlsplit(base)
    headers = {"Content-Type": content_type}
    if keys:
        headers["Authorization"] = f"Bearer {keys[0]}"
    kind = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    conn = kind(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("POST", u.path.rstrip("/") + path, body=data, headers=headers)
        r = conn.getresponse()
        return Response(r.status, dict(r.getheaders()), r.read())
    except OSError as e:
        raise StepFailed(f"invoke:{service}", f"{base}{path} does not answer: "
                         f"{e.strerror or e}",
                         hint=f"mlbuild status {t.name} shows its state; mlbuild logs "
                              f"{service} -t {t.name} its log") from e
    finally:
        conn.close()


def keys(service: str, directory=".", file=None, target: str | None = None,
         regenerate: str | None = None) -> tuple[str, str]:
    """The primary and secondary key of ``service`` on ``target`` (made when missing)."""
    from mlbuild.state import keys as keystore

    with session(directory, file, lock=True) as s:
        t = s.project.target(target)
        svc = _service_of(s.project, service)
        if svc.auth != "key":
            raise InvalidInput(f"service {service!r} does not use keys (auth: {svc.auth})",
                               hint=f"set services.{service}.auth: key in "
                                    f"{s.project.manifest_path.name}")
        if regenerate:
            return keystore.regenerate(s.db, t.name, service, regenerate)
        return keystore.ensure(s.db, t.name, service)


def keys_secret(service: str, directory=".", file=None, target: str | None = None) -> str:
    """The Secret with ``service``'s keys on a kubernetes target, as YAML: what a
    GitOps flow (apply: false) seals or applies itself; never written to ``out``."""
    import yaml

    from mlbuild.kube.render import secret_object

    primary, secondary = keys(service, directory, file, target)
    with session(directory, file) as s:
        t = s.project.target(target)
        if t.type != "kubernetes":
            raise InvalidInput(f"--secret: target {t.name!r} is of type {t.type}",
                               hint="--secret goes with a kubernetes target")
        obj = secret_object(s.project.name, service, t.kube.namespace, primary, secondary)
    return yaml.safe_dump(obj, sort_keys=False)


@dataclass
class DevServer:
    """What ``mlbuild serve SERVICE`` runs, and what it watches for ``--reload``."""

    argv: list
    env: dict
    cwd: str
    watch: list


def prepare_serve(service: str, directory=".", file=None, host: str = "127.0.0.1",
                  port: int = 5001, on_event=None) -> DevServer:
    """Register the service's models and build its context, then say how to serve it
    from this Python, with the entry script and source taken from the project itself
    (so an edit shows at the next reload, without a rebuild)."""
    import os

    from mlbuild.graph.executor import execute
    from mlbuild.graph.planner import service_steps
    from mlbuild.graph.steps.context import MODEL_ROOT, map_image_path

    with session(directory, file, lock=True) as s:
        p = s.project
        svc = _service_of(p, service)
        outcomes = execute(s.context(p.targets.get(p.default_target or "")
                                     or next(iter(p.targets.values()))),
                           service_steps(p, service), on_event=on_event)
        context = next(o.outputs for o in outcomes if o.kind == "context")
        ctx_dir = p.root / context["dir"]
        app_root = str(p.path(svc.source_dir)) if svc.source_dir else \
            str(p.path(svc.entry_script).parent) if svc.entry_script else str(p.root)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("MLBUILD_", "AZUREML_", "AML_"))}
        # Collected model data (collect_model_data) goes to .mlbuild/model-data/serve/.
        from mlbuild.manifest.model import MODEL_DATA_IN_IMAGE

        env.update({k: map_image_path(v, {MODEL_ROOT: ctx_dir / "models",
                                          MODEL_DATA_IN_IMAGE: s.db.state_dir / "model-data"
                                          / "serve"})
                    for k, v in context["env"].items()})
        if env.get("MLBUILD_MODEL_DATA_DIR", "-") != "-":
            os.makedirs(env["MLBUILD_MODEL_DATA_DIR"], exist_ok=True)
        env["AML_APP_ROOT"] = app_root
        env["MLBUILD_AUTH"] = "none"
        env["MLBUILD_SHOW_ERRORS"] = "1"  # the development server: run()'s error text in a 500
        if svc.entry_script:
            env["MLBUILD_ENTRY_SCRIPT"] = str(p.path(svc.entry_script))
        for key, sample in (("INPUT", svc.schema_input), ("OUTPUT", svc.schema_output)):
            if sample:
                env[f"MLBUILD_SCHEMA_{key}"] = str(p.path(sample))
        watch = [p.manifest_path]
        if svc.entry_script:
            watch.append(p.path(svc.entry_script))
        if svc.source_dir:
            watch.append(p.path(svc.source_dir))
        watch += [p.path(s_) for s_ in (svc.schema_input, svc.schema_output) if s_]
        watch += [p.path(p.models[m.name].path) for m in svc.models
                  if m.name in p.models and p.models[m.name].path]
        argv = [sys.executable, "-m", "mlbuild.runtime", "--host", host, "--port", str(port)]
        return DevServer(argv, env, app_root, [str(w) for w in watch])


# -- profile -----------------------------------------------------------------------------

@dataclass
class ProfileResult:
    """What ``profile`` measured and wrote: ``doc`` is profile.json's content."""

    doc: dict
    out: Path
    written: list[str]


def profile(service: str, directory=".", file=None, target: str | None = None,
            data: str | None = None, cpus=(0.5, 1, 2), memory_gb=(2,),
            concurrency=(1, 2, 4, 8, 16, 32), window: float = 3.0, warmup: float = 2.0,
            slo_p99_ms: float | None = None, out: str | None = None, write: bool = False,
            on_event=None, say: Callable[[str], None] = _say,
            on_step: Callable[[int, int, str, str], None] | None = None) -> ProfileResult:
    """Load-test ``service`` over a grid of CPU and memory limits and recommend both.

    The service runs from its image (built through the graph as for ``target``, a docker
    target: default the first one deploying it) in a container per grid point; with a
    process target, or when no Docker engine answers, as a local process without limits
    (one point; the report says so). See mlbuild/profile/run.py for the loop and
    recommend.py for the rule.

    Args:
        data: request bodies, a file relative to ``directory``: one per line (Azure's
            format) or a JSON list; default the service's schema input sample.
        cpus, memory_gb: the grid (CPU limits, memory limits in GB).
        concurrency: the steps, in order; window: seconds measured per step; warmup:
            seconds of load first, not counted.
        slo_p99_ms: the latency objective (None: errors alone decide).
        out: the report's folder (default ``.mlbuild/profile/SERVICE``).
        write: store the recommendation as tags of the served model versions and as
            ``models.NAME.resources`` in the manifest.
        on_step: told (point number, points, point label, step label) as it goes.

    Raises:
        InvalidInput: a bad argument, target, or data (a body the service answers 4xx
            to: named by file and line, before any load).
        StepFailed: the image did not build, or the service never started.
    """
    import dataclasses
    import secrets as _secrets

    from mlbuild.graph.executor import execute
    from mlbuild.graph.planner import closure, plan_steps
    from mlbuild.manifest.model import Target
    from mlbuild.profile import data as pdata
    from mlbuild.profile import report
    from mlbuild.profile.recommend import recommend
    from mlbuild.profile.run import ContainerRunner, Settings, run_grid

    conc = sorted(set(int(c) for c in concurrency))
    if not conc or conc[0] < 1 or window <= 0 or warmup < 0 or not cpus or not memory_gb \
            or any(c <= 0 for c in cpus) or any(m <= 0 for m in memory_gb):
        raise InvalidInput("profile: concurrency steps must be >= 1, --window > 0, "
                           "--warmup >= 0, --cpus and --memory-gb positive numbers")
    if slo_p99_ms is not None and slo_p99_ms <= 0:
        raise InvalidInput("profile: --slo-p99-ms must be positive")
    base = Path(directory)
    key = _secrets.token_urlsafe(24)
    note = None
    with session(directory, file, lock=True) as s:
        p = s.project
        svc = _service_of(p, service)
        t = _profile_target(p, service, target)
        bodies = pdata.load_bodies(
            base / data if data else None,
            p.path(svc.schema_input) if svc.schema_input else None,
            shown=data, sample_shown=f"services.{service}.schema.input ({svc.schema_input})")
        eng = None
        if t.type == "docker":
            try:
                from mlbuild.backends.docker import connect

                eng = connect()
            except MlbuildError as e:  # no SDK, no engine: the process route, said so
                note = f"no Docker engine ({e.message}): ran as a local process"
                say(f"  {note}")
                t = Target(name=f"{t.name}-as-process", type="process")
        runtime_env = dict(t.runtime_env(), **svc.runtime_env())
        if svc.auth == "key":
            runtime_env["MLBUILD_AUTH_KEYS"] = key
        if eng is not None:
            specs = closure(plan_steps(p, t, s.db), {f"image:{service}"})
        else:
            specs = closure(plan_steps(p, dataclasses.replace(t, services=None)),
                             {f"context:{service}", f"venv:{svc.environment}"})
        outcomes = execute(s.context(t), specs, on_event=on_event)
        got = {o.id: o.outputs for o in outcomes}
        models = [(o.outputs["name"], o.outputs["version"]) for o in outcomes
                  if o.kind == "model" and o.outputs]
        context = next(o.outputs for o in outcomes if o.kind == "context")
        state_dir = s.db.state_dir
        if eng is not None:
            image = got[f"image:{service}"]["tag"]
            env = {"MLBUILD_MODEL_DIR": context["env"]["MLBUILD_MODEL_DIR"],
                   "AZUREML_MODEL_DIR": context["env"]["MLBUILD_MODEL_DIR"], **runtime_env}
            runner = ContainerRunner(eng, image, env, f"{p.name}-{service}-profile",
                                     {"dev.mlbuild.project": p.name,
                                      "dev.mlbuild.service": service,
                                      "dev.mlbuild.profile": "1"})
            grid = [(c, m) for c in sorted(set(cpus)) for m in sorted(set(memory_gb),
                                                                        reverse=True)]
        else:
            runner = _process_runner(p, svc, got, context, runtime_env, state_dir)
            grid = [(None, None)]
    dest = Path(out) if out and Path(out).is_absolute() else \
        base / out if out else state_dir / "profile" / service
    settings = Settings(tuple(conc), window, warmup, slo_p99_ms)
    say(f"  profiling   {service} on {runner.where}: {len(grid)} grid point"
        f"{'s' if len(grid) != 1 else ''}, concurrency {','.join(map(str, conc))}, "
        f"{window:g} s a step")

    def check(svc_running):
        pdata.check_bodies(bodies, svc_running.url,
                           authorization=f"Bearer {key}" if svc.auth == "key" else None,
                           say=say)

    points = run_grid(runner, grid, [b.data for b in bodies], settings,
                      authorization=f"Bearer {key}" if svc.auth == "key" else None,
                      before_load=check, on_step=on_step)
    rec = recommend(points, slo_p99_ms, limited=runner.limited)
    doc = report.profile_json(service, runner.where + (f" ({note})" if note else ""),
                              runner.limited, points, rec, settings,
                              data or f"services.{service}.schema.input", len(bodies), t.name)
    doc["models"] = [f"{n}@{v}" for n, v in models]
    written = _write_profile(dest, doc)
    if write:
        written += _write_recommendation(directory, file, service, models, rec, say)
    return ProfileResult(doc, dest, written)


def _profile_target(p, service: str, name: str | None):
    """The target a profile runs as: ``name`` (docker or process), else the first docker
    target deploying ``service``, else the first process target, else a process one."""
    from mlbuild.manifest.model import Target

    if name is not None:
        t = p.target(name)
        if t.type not in ("docker", "process"):
            raise InvalidInput(f"target {t.name!r} is of type {t.type}: a profile runs on a "
                               "docker target (or a process target)",
                               hint="name a docker or process target, or none")
        return t
    ts = [t for t in p.targets.values() if any(s.name == service for s in p.services_for(t))]
    for kind in ("docker", "process"):
        found = next((t for t in ts if t.type == kind), None)
        if found is not None:
            return found
    return Target(name="profile", type="process")


def _process_runner(p, svc, got: dict, context: dict, runtime_env: dict, state_dir: Path):
    """The service as a process target runs it: the venv's Python on the build context
    (models, app, runtime), with the runtime's environment."""
    from mlbuild.graph.steps.context import APP_ROOT, MODEL_ROOT, map_image_path
    from mlbuild.profile.run import ProcessRunner

    venv = got[f"venv:{svc.environment}"]
    ctx_dir = p.root / context["dir"]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLBUILD_", "AZUREML_", "AML_", "PYTHON"))}
    from mlbuild.manifest.model import MODEL_DATA_IN_IMAGE

    roots = {MODEL_ROOT: ctx_dir / "models", APP_ROOT: ctx_dir / "app",
             "/var/mlbuild/samples": ctx_dir / "samples",
             # collect_model_data: the profile's records apart from any target's
             MODEL_DATA_IN_IMAGE: state_dir / "model-data" / "profile"}
    env.update({k: map_image_path(v, roots) for k, v in context["env"].items()})
    env.update({k: map_image_path(v, roots) for k, v in runtime_env.items()})
    if env.get("MLBUILD_MODEL_DATA_DIR", "-") != "-":
        os.makedirs(env["MLBUILD_MODEL_DATA_DIR"], exist_ok=True)
    env.update(PYTHONPATH=str(ctx_dir / "runtime"), PYTHONUNBUFFERED="1",
               PYTHONDONTWRITEBYTECODE="1")
    log = state_dir / "logs" / "profile" / f"{svc.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    python = p.root / venv["dir"] / venv["python"]
    cwd = ctx_dir / "app" if (ctx_dir / "app").is_dir() else ctx_dir
    return ProcessRunner([str(python), "-m", "mlbuild.runtime"], env, str(cwd), log)


def _write_profile(dest: Path, doc: dict) -> list[str]:
    import json

    from mlbuild.profile import report

    dest.mkdir(parents=True, exist_ok=True)
    (dest / "profile.json").write_text(json.dumps(doc, indent=2) + "\n")
    (dest / "profile.html").write_text(report.page(doc))
    return [str(dest / "profile.json"), str(dest / "profile.html")]


def _write_recommendation(directory, file, service: str, models: list, rec,
                          say: Callable[[str], None]) -> list[str]:
    """``--write``: models.NAME.resources in the manifest (the service's recommendation
    split evenly over its models: Kubernetes targets sum them), the model steps run again
    (so the registry records the new resources and a later deploy keeps the tags), then
    the tags requestedCpu / requestedMemoryInGb on each served version."""
    import math

    from mlbuild.graph.executor import execute
    from mlbuild.graph.planner import service_steps
    from mlbuild.profile.write import set_resources

    if rec.cpu is None and rec.memory_gb is None:
        raise InvalidInput("--write: there is no recommendation to write",
                           hint="see the reasons in the report; profile again with a "
                                "wider grid")
    names = sorted({n for n, _ in models})
    share = lambda x: None if x is None else math.ceil(x / len(names) * 100) / 100  # noqa: E731
    with session(directory, file, lock=True) as s:
        manifest = s.project.manifest_path
        set_resources(manifest, {n: (share(rec.cpu), share(rec.memory_gb)) for n in names})
    written = [str(manifest)]
    with session(directory, file, lock=True) as s:  # the edited manifest, loaded again
        specs = [sp for sp in service_steps(s.project, service) if sp.kind == "model"]
        outcomes = execute(s.context(next(iter(s.project.targets.values()))), specs)
        tags = {}
        if rec.cpu is not None:
            tags["requestedCpu"] = f"{rec.cpu:g}"
        if rec.memory_gb is not None:
            tags["requestedMemoryInGb"] = f"{rec.memory_gb:g}"
        for o in outcomes:
            mv = s.registry.tag(f"{o.outputs['name']}@{o.outputs['version']}", tags)
            written.append(mv.ref)
            say(f"  tagged      {mv.ref}: " + ", ".join(f"{k}={v}" for k, v in tags.items()))
    say(f"  wrote       models.{{{','.join(names)}}}.resources in {manifest.name}")
    return written
