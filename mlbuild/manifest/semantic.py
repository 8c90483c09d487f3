"""Checks the schema cannot make, and the typed :class:`Project` they produce.

Runs on whatever parts of the data are well-typed, also when the schema found
problems elsewhere, and collects every problem instead of stopping at the first:

* references: service -> environment and models, target -> services,
  ``default_target`` -> targets (with "did you mean");
* files: model paths, entry scripts, source folders, environment specs and schema
  samples exist, are of the right kind, and stay inside the project (no absolute
  paths, no ``..``, no symlink that resolves outside) and out of mlbuild's state
  folder (not written in it, no symlink into it, no hard link to its files:
  :mod:`mlbuild.state.guard`);
* names: ``<project>-<service>-<target>`` fits a Docker/Kubernetes name (63);
* process/docker targets do not share a port; an ``out`` folder (package, kubernetes)
  holds no path the project reads (model, code, samples, environment spec, lock file,
  the manifest; also through a symlink) and no other target writes where a package
  target replaces ``<out>/<service>``;
* a service without an entry script has exactly one no-code model;
* a service's batching window is shorter than the scoring timeout of each target
  that runs it;
* a service's ``workers`` times its models' memory (their ``resources``) fits the
  memory limit of each docker and kubernetes target that runs it; its
  ``collect_model_data.path`` is no folder the project reads, nor mlbuild's state;
* a service without an environment is a no-code one: it gets the default environment
  of its model's framework (:mod:`mlbuild.manifest.nocode`), added to the Project.
"""

from __future__ import annotations

import math
import os
import posixpath
import re
import stat
from pathlib import Path
from types import MappingProxyType

from mlbuild.errors import Problem

from mlbuild.fsutil import resolves_outside, within
from mlbuild.kube.settings import SERVICE_TYPES, Autoscale, Ingress, KubeSettings, Liveness
from mlbuild.manifest import nocode
from mlbuild.manifest.model import (
    EMBEDDED_DEFAULT_TARGET,
    MAX_WORKERS,
    NO_CODE_FRAMEWORKS,
    TARGET_TYPES,
    Environment,
    Model,
    ModelRef,
    Project,
    Batching,
    ModelDataCollection,
    Resources,
    Service,
    Target,
    resources_hint,
)
from mlbuild.manifest.suggest import did_you_mean
from mlbuild.manifest.yamlload import dotted, line_of
from mlbuild.state.guard import STATE_DIR as STATE_FOLDER
from mlbuild.state.guard import StateGuard

MAX_OBJECT_NAME = 63  # a DNS label: Kubernetes object and container names
DEFAULT_PROCESS_PORT = 8890
_VERSION = re.compile(r"^\d+(\.\d+){0,2}$")


def build_project(
    data: dict,
    lines: dict,
    raw: dict,
    *,
    manifest_path: Path,
    digest: str,
    file: str,
) -> tuple[Project | None, list[Problem]]:
    """Check ``data`` and build the Project from it.

    Args:
        data: the manifest as plain data (possibly with schema problems).
        lines, raw: from :mod:`mlbuild.manifest.yamlload`.
        manifest_path: absolute path of the manifest; its folder is the root.
        digest: sha256 hex of the manifest bytes.
        file: manifest name shown in problems.

    Returns:
        ``(project, problems)``; the project is None when a required part is
        unusable. Callers must not use the project when there are problems.
    """
    return _Builder(data, lines, raw, manifest_path, digest, file).build()


def _mapping(value) -> dict:
    return value if isinstance(value, dict) else {}


def _str(value) -> str | None:
    return value if isinstance(value, str) else None


def _overlap(a: str, b: str) -> bool:
    """Whether one of two normalised relative paths (``.``: the project) is, or lies
    inside, the other."""
    return a == b or "." in (a, b) or a.startswith(b + "/") or b.startswith(a + "/")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Builder:
    def __init__(self, data, lines, raw, manifest_path: Path, digest: str, file: str):
        self.data = data if isinstance(data, dict) else {}
        self.lines, self.raw, self.file = lines, raw, file
        self.manifest_path = manifest_path
        self.digest = digest
        self.root = manifest_path.parent
        self.root_real = os.path.realpath(self.root)
        self.guard = StateGuard(self.root / STATE_FOLDER)
        self.problems: list[Problem] = []
        # Where the package and kubernetes targets checked so far write:
        # (path, "where target 'p' writes service s").
        self.target_writes: list[tuple[str, str]] = []

    # -- helpers ---------------------------------------------------------------------

    def add(self, path: tuple, message: str) -> None:
        self.problems.append(Problem(self.file, line_of(self.lines, path), dotted(path), message))

    def line(self, path: tuple) -> int | None:
        return self.lines.get(path)

    def text(self, value, path: tuple) -> str | None:
        """A text field that YAML may have read as a number or boolean: the text
        as written (``1.10`` stays ``"1.10"``)."""
        if isinstance(value, str):
            return value
        if _is_number(value) or isinstance(value, bool):
            return self.raw.get(path, str(value))
        return None

    def number(self, value, path: tuple) -> float | None:
        if not _is_number(value):
            return None
        try:
            value = float(value)
        except OverflowError:
            self.add(path, "is too large")
            return None
        if not math.isfinite(value):
            self.add(path, f"must be a finite number, got {self.raw.get(path, value)}")
            return None
        if value <= 0:
            return None  # the schema says "must be greater than 0"
        return value

    def whole(self, value) -> int | None:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and math.isfinite(value) and value == int(value):
            return int(value)
        return None

    def rel_path(self, value, path: tuple, kind: str | None, missing: str = "") -> str | None:
        """Normalise a manifest-relative path and check it stays inside the project.

        Args:
            kind: "file", "dir", "any" (must exist) or None (need not exist).
            missing: extra hint appended when the path does not exist.

        Returns:
            The relative POSIX path (``./src/a.py`` -> ``src/a.py``), or None when
            it is unusable (not text, absolute, outside the project).
        """
        if not isinstance(value, str) or not value:
            return None
        if "\x00" in value:
            self.add(path, "the path contains a NUL character")
            return None
        if "\\" in value:
            self.add(path, f"{value!r}: use '/' to separate folders")
            return None
        if value.startswith("/") or re.match(r"^[A-Za-z]:", value):
            self.add(path, f"{value!r} is an absolute path; paths must be relative to the "
                           "project folder")
            return None
        rel = posixpath.normpath(value)
        if rel == ".." or rel.startswith("../"):
            self.add(path, f"{value!r} points outside the project folder")
            return None
        if rel.split("/", 1)[0] == STATE_FOLDER:
            # It holds the state database with every service's keys: a model or source
            # folder inside it would carry them into a build context and a package.
            self.add(path, f"{value!r} is inside {STATE_FOLDER}/, mlbuild's state folder "
                           "(it holds the keys): point at a file or folder of your own")
            return None
        full = os.path.join(self.root, rel)
        try:
            real = os.path.realpath(full)
            if not within(self.root_real, real):
                self.add(path, f"{value!r} resolves to {real!r}, outside the project folder "
                               "(a symlink?)")
                return None
            if kind is None:
                return rel
            try:
                st = os.stat(real)
            except OSError:  # (what os.path.exists says False for)
                st = None
            # A symlink into the state folder (also one spelt .MLBUILD), or a hard link
            # to one of its files. (A file with one link cannot be a hard link: the
            # set of the state's files is read only for the rare one with several.)
            why = self.guard.why(full, real=real, st=st,
                                 links=st is not None and st.st_nlink > 1)
            if why is not None:
                self.add(path, f"{value!r} {why}: point at a file or folder of your own")
                return None
            if st is None:
                self.add(path, f"{value!r} does not exist{missing}")
            elif kind == "file" and not stat.S_ISREG(st.st_mode):
                self.add(path, f"{value!r} is not a file")
            elif kind == "dir" and not stat.S_ISDIR(st.st_mode):
                self.add(path, f"{value!r} is not a folder")
        except (OSError, ValueError) as e:
            self.add(path, f"{value!r} cannot be checked: {e}")
            return None
        return rel

    # -- sections --------------------------------------------------------------------

    def build(self) -> tuple[Project | None, list[Problem]]:
        name = _str(self.data.get("name"))
        registry = _str(self.data.get("registry"))
        models = self.models()
        envs = self.environments()
        services = self.services(models, envs)  # adds the no-code default environments
        inputs = self.inputs(models, envs, services)
        targets = self.targets(set(services) | set(_mapping(self.data.get("services"))), inputs)
        default = self.default_target(targets)
        self.check_name_lengths(name, services, targets)
        self.check_batching(services, targets)
        self.check_workers(services, targets, models)
        if name is None:
            return None, self.problems
        project = Project(
            name=name,
            root=self.root,
            manifest_path=self.manifest_path,
            manifest_digest=self.digest,
            registry=registry,
            models=MappingProxyType(models),
            environments=MappingProxyType(envs),
            services=MappingProxyType(services),
            targets=MappingProxyType(targets),
            default_target=default,
        )
        return project, self.problems

    def models(self) -> dict[str, Model]:
        out = {}
        for name, m in _mapping(self.data.get("models")).items():
            base = ("models", name)
            if not isinstance(m, dict):
                continue
            rel = self.rel_path(
                m.get("path"), base + ("path",), "any",
                missing=" (does it need to be created first, e.g. by a train script?)",
            )
            if rel is None:
                continue
            res = _mapping(m.get("resources"))
            resources = None
            if res:
                resources = Resources(
                    cpu=self.number(res.get("cpu"), base + ("resources", "cpu")),
                    memory_gb=self.number(res.get("memory_gb"), base + ("resources", "memory_gb")),
                )
            framework = _str(m.get("framework"))
            out[name] = Model(
                name=name,
                path=rel,
                framework=framework,
                framework_version=self.text(m.get("framework_version"),
                                            base + ("framework_version",)),
                description=_str(m.get("description")),
                tags=self.text_map(m.get("tags"), base + ("tags",)),
                properties=self.text_map(m.get("properties"), base + ("properties",)),
                resources=resources,
                line=self.line(base),
            )
        return out

    def text_map(self, value, path: tuple):
        out = {}
        for k, v in _mapping(value).items():
            t = self.text(v, path + (k,))
            if t is not None:
                out[k] = t
        return MappingProxyType(out)

    def environments(self) -> dict[str, Environment]:
        out = {}
        for name, e in _mapping(self.data.get("environments")).items():
            base = ("environments", name)
            if not isinstance(e, dict):
                continue
            conda = self.rel_path(e.get("conda"), base + ("conda",), "file")
            req = self.rel_path(e.get("requirements"), base + ("requirements",), "file")
            python = self.text(e.get("python"), base + ("python",))
            if python is not None and not _VERSION.match(python):
                self.add(base + ("python",), f"{python!r} is not a Python version like \"3.11\"")
                python = None
            packages = e.get("packages")
            packages = tuple(p for p in packages if isinstance(p, str)) \
                if isinstance(packages, list) else ()
            platforms = e.get("platforms")
            platforms = tuple(p for p in platforms if isinstance(p, str)) \
                if isinstance(platforms, list) and platforms else ("linux-64",)
            for key in ("platforms", "solver"):
                if key in e and not conda:
                    self.add(base + (key,), f"{key} applies to conda environments only: "
                             f"remove it, or use a conda spec (conda: FILE)")
            if conda and "linux-64" not in platforms:
                self.add(base + ("platforms",), "images and the process target need "
                         "linux-64, which is not among the platforms: add it")
            out[name] = Environment(
                name=name,
                conda=conda,
                requirements=req,
                python=python,
                packages=packages,
                # The project's base serves environments naming neither a base nor a
                # pip Python (whose own slim image would otherwise be silently replaced).
                base_image=_str(e.get("base_image")) or (
                    None if python is not None and not conda
                    else _str(self.data.get("base_image"))),
                platforms=platforms,
                solver=_str(e.get("solver")),
                line=self.line(base),
            )
        return out

    def services(self, models: dict, envs: dict) -> dict[str, Service]:
        """The services; a no-code service without an environment gets its framework's
        default one, added to ``envs``."""
        declared_models = set(_mapping(self.data.get("models")))
        declared_envs = set(_mapping(self.data.get("environments")))
        out = {}
        for name, s in _mapping(self.data.get("services")).items():
            base = ("services", name)
            if not isinstance(s, dict):
                continue
            env = _str(s.get("environment"))
            if env is not None and env not in declared_envs:
                self.add(base + ("environment",),
                         f"no environment {env!r}" + (
                             ": a default environment is not named; leave environment out "
                             "of a no-code service to get one"
                             if env.startswith(nocode.PREFIX) else
                             did_you_mean(env, declared_envs)))
            refs = []
            raw_models = s.get("models")
            for i, text in enumerate(raw_models if isinstance(raw_models, list) else []):
                if not isinstance(text, str):
                    continue
                try:
                    ref = ModelRef.parse(text)
                except ValueError:
                    continue  # the schema's pattern reports it
                refs.append(ref)
                if ref.version is None and ref.name not in declared_models:
                    hint = did_you_mean(ref.name, declared_models) or (
                        f"; declare it under models: or pin a registered version "
                        f"({ref.name}@N)")
                    self.add(base + ("models", i), f"no model {ref.name!r}{hint}")
            entry = self.rel_path(s.get("entry_script"), base + ("entry_script",), "file")
            source = self.rel_path(s.get("source_dir"), base + ("source_dir",), "dir")
            sch = _mapping(s.get("schema"))
            sin = self.rel_path(sch.get("input"), base + ("schema", "input"), "file")
            sout = self.rel_path(sch.get("output"), base + ("schema", "output"), "file")
            no_code_model = None
            if "entry_script" not in s:
                frameworks = [models[r.name].framework if r.name in models else None
                              for r in refs]
                if len(refs) == 1 and frameworks[0] in NO_CODE_FRAMEWORKS:
                    no_code_model = models[refs[0].name]
                else:
                    self.add(base, "needs an entry_script, or exactly one model with framework "
                                   f"{' or '.join(NO_CODE_FRAMEWORKS)} to be served without code")
            if "environment" not in s:
                if no_code_model is not None:
                    env = self.default_environment(no_code_model, envs)
                else:
                    self.add(base, "needs an environment: declare one under environments and "
                                   "name it (environment: NAME); only a no-code service (no "
                                   "entry_script, one scikit-learn or onnx model) gets a "
                                   "default one")
            auth = s.get("auth", "none")
            cors = s.get("cors")
            if env is None:
                continue
            out[name] = Service(
                name=name,
                environment=env,
                models=tuple(refs),
                entry_script=entry,
                source_dir=source,
                schema_input=sin,
                schema_output=sout,
                auth=auth if isinstance(auth, str) else "none",
                cors=tuple(c for c in cors if isinstance(c, str))
                if isinstance(cors, list) else (),
                max_body_mb=self.number(s.get("max_body_mb"), base + ("max_body_mb",)),
                batching=self.batching(s.get("batching")),
                workers=self.workers(s.get("workers")),
                collect_model_data=self.collect_model_data(
                    s.get("collect_model_data"), base + ("collect_model_data",), models, s),
                tracing=s.get("tracing") is True,
                line=self.line(base),
            )
        return out

    def workers(self, value) -> int | str | None:
        """``services.NAME.workers``: a whole number or ``auto``; None when absent or
        out of range (the schema reports that)."""
        if value == "auto":
            return value
        n = self.whole(value) if not isinstance(value, str) else None
        return n if n is not None and 1 <= n <= MAX_WORKERS else None

    def collect_model_data(self, value, path: tuple, models: dict,
                           service: dict) -> ModelDataCollection | None:
        """``services.NAME.collect_model_data``: None when off (false, absent, or of the
        wrong shape, which the schema reports)."""
        if value is True:
            return ModelDataCollection()
        if not isinstance(value, dict):
            return None
        to = value.get("to") if value.get("to") in ("folder", "stdout") else None
        folder = value.get("path")
        if not isinstance(folder, str) or not folder:
            return ModelDataCollection(to=to)
        if to == "stdout":
            self.add(path + ("path",), "a path goes with to: folder, not to: stdout: remove "
                                       "one of them")
            return None
        if "\x00" in folder:
            self.add(path + ("path",), "the path contains a NUL character")
            return None
        if posixpath.isabs(folder):
            return ModelDataCollection(to="folder", path=posixpath.normpath(folder))
        rel = posixpath.normpath(folder)
        # What the project reads (a write there would change the next build's inputs),
        # the project folder itself and mlbuild's state.
        reads = [(m.path, f"models.{m.name}.path") for m in models.values()]
        reads += [(p, key) for key in ("entry_script", "source_dir")
                  if isinstance(p := service.get(key), str) and p]
        why = None
        if rel == "." or rel.split("/", 1)[0] in (STATE_FOLDER, ".git"):
            why = "is the project folder or inside .mlbuild/ or .git/: choose a folder " \
                  "of its own (left out, the process target writes under .mlbuild/model-data/)"
        else:
            for other, what in reads:
                if _overlap(rel, posixpath.normpath(other)):
                    why = f"overlaps {other!r} ({what}): the records would become part of " \
                          "what the project builds; choose a folder of its own"
                    break
        if why is not None:
            self.add(path + ("path",), f"{folder!r} {why}")
            return None
        return ModelDataCollection(to="folder", path=rel)

    def check_workers(self, services: dict, targets: dict, models: dict) -> None:
        """Each worker process loads the service's models: ``workers`` times their memory
        (``models.NAME.resources.memory_gb``) must fit the memory limit a docker
        (``memory_gb``) or kubernetes (``memory_gb_limit``) target that runs the service
        sets; where a target sets none, the limit follows the hint times ``workers``."""
        for s in services.values():
            if not isinstance(s.workers, int) or s.workers < 2:
                continue
            hint = resources_hint(models[r.name] for r in s.models if r.name in models)
            need = getattr(hint, "memory_gb", None)
            if not need:
                continue
            for t in targets.values():
                if t.services is not None and s.name not in t.services:
                    continue
                if t.type == "docker":
                    limit, key = t.memory_gb, "memory_gb"
                elif t.type == "kubernetes" and t.kube is not None:
                    # NOTE: without a limit of its own the Deployment's memory is sized
                    # by the hint times workers (graph/steps/kube.py); docker's too.
                    limit, key = t.kube.memory_gb_limit, "memory_gb_limit"
                else:
                    continue
                if limit is not None and s.workers * need > limit + 1e-9:
                    self.add(("services", s.name, "workers"),
                             f"{s.workers} workers each load the models "
                             f"({need:g} GB by their resources): {s.workers * need:g} GB, "
                             f"over the memory limit of target {t.name!r} ({limit:g} GB): "
                             f"lower workers, or raise targets.{t.name}.{key}")

    def batching(self, value) -> Batching | None:
        """``services.NAME.batching``, or None when absent or of the wrong shape (the
        schema reports that)."""
        if not isinstance(value, dict):
            return None
        size = self.whole(value.get("max_batch_size"))
        latency = value.get("max_latency_ms")
        if size is None or size < 1:
            return None
        if latency is not None:
            try:
                latency = float(latency) if _is_number(latency) else math.nan
            except OverflowError:
                latency = math.nan
            if not 0 <= latency < math.inf:
                return None
        return Batching(max_batch_size=size, max_latency_ms=latency)

    def check_batching(self, services: dict, targets: dict) -> None:
        """A batching window must end before the scoring timeout of every target that
        runs the service: else a request that comes alone times out waiting for company."""
        from mlbuild.runtime.config import DEFAULT_BATCH_MAX_LATENCY_MS

        for s in services.values():
            if s.batching is None:
                continue
            window = s.batching.max_latency_ms
            path = ("services", s.name, "batching")
            if window is None:
                window = DEFAULT_BATCH_MAX_LATENCY_MS
            else:
                path += ("max_latency_ms",)
            for t in targets.values():
                if t.services is not None and s.name not in t.services:
                    continue
                timeout = t.kube.scoring_timeout_ms if t.kube else t.scoring_timeout_ms
                if timeout is not None and window >= timeout:
                    self.add(path, f"a window of {window:g} ms is not shorter than the "
                                   f"scoring_timeout_ms of target {t.name!r} ({timeout}): a "
                                   "request that comes alone would time out waiting for its "
                                   "batch")

    def default_environment(self, model: Model, envs: dict) -> str | None:
        """The name of ``model``'s no-code default environment, added to ``envs``
        (once: services with the same one share it); None if it cannot be made."""
        version = model.framework_version if model.framework == "scikit-learn" else None
        if version is not None and not _VERSION.match(version):
            # NOTE: it becomes a pip requirement (scikit-learn==VERSION.*).
            self.add(("models", model.name, "framework_version"),
                     f"{version!r} is not a version like \"1.5\": the default environment "
                     f"of a no-code service pins scikit-learn to it (write the version the "
                     f"model was saved with, or give the service an environment)")
            return None
        env = nocode.default_environment(model.framework, version,
                                         _str(self.data.get("base_image")))
        envs.setdefault(env.name, env)
        return env.name

    def targets(self, service_names: set,
                inputs: list[tuple[str, str | None, str]]) -> dict[str, Target]:
        declared = _mapping(self.data.get("targets"))
        if not declared:
            return {"dev": EMBEDDED_DEFAULT_TARGET}
        out = {}
        ports: dict[int, str] = {}
        ranges: dict[str, range] = {}
        outs: dict[str, str] = {}
        for name, t in declared.items():
            base = ("targets", name)
            if not isinstance(t, dict):
                continue
            ttype = t.get("type")
            if ttype not in TARGET_TYPES:
                continue
            port = self.whole(t.get("port"))
            if port is not None and not 1 <= port <= 65535:
                port = None  # the schema reports it
            if port is None and ttype == "process":
                port = DEFAULT_PROCESS_PORT
            if port is not None and ttype in ("process", "docker"):
                # Each service of the target listens on its own port: port, port + 1, ...
                svc_list = t.get("services")
                n = len(svc_list) if isinstance(svc_list, list) else len(service_names)
                used = range(port, port + max(n, 1))
                clash = next((p for p in used if p in ports), None)
                if clash is not None:
                    other = ranges[ports[clash]]
                    self.add(base + ("port",),
                             f"port {clash} is already used by target {ports[clash]!r}"
                             + (f" (its services use {other[0]}-{other[-1]})"
                                if len(other) > 1 else "")
                             + (f" (this target's services need {port}-{used[-1]})"
                                if n > 1 else ""))
                elif used[-1] > 65535:
                    self.add(base + ("port",), f"{n} services need ports {port}-{used[-1]}, "
                                               "past 65535")
                else:
                    ports.update((p, name) for p in used)
                    ranges[name] = used
            out_dir = None
            if ttype == "package":
                listed = t.get("services")
                out_dir = self.out_dir(name, t, inputs, outs, services=sorted(
                    s for s in (listed if isinstance(listed, list) else service_names)
                    if isinstance(s, str)))
            svc = t.get("services")
            services = None
            if isinstance(svc, list):
                services = tuple(s for s in svc if isinstance(s, str))
                for i, s in enumerate(svc):
                    if isinstance(s, str) and s not in service_names:
                        self.add(base + ("services", i),
                                 f"no service {s!r}" + did_you_mean(s, service_names))
            replicas = self.whole(t.get("replicas"))
            kube = None
            if ttype == "kubernetes":
                kube = self.kube_settings(name, t, inputs, outs)
                replicas = kube.replicas if kube is not None else replicas
                out_dir = kube.out if kube is not None else None
            offline = t.get("offline", False)
            out[name] = Target(
                name=name,
                type=ttype,
                port=port,
                namespace=kube.namespace if kube is not None else _str(t.get("namespace")),
                replicas=replicas,
                cpu=self.number(t.get("cpu"), base + ("cpu",)),
                memory_gb=self.number(t.get("memory_gb"), base + ("memory_gb",)),
                out=out_dir,
                offline=offline if isinstance(offline, bool) else False,
                services=services,
                scoring_timeout_ms=self.whole(t.get("scoring_timeout_ms")),
                max_concurrent_requests=self.whole(t.get("max_concurrent_requests")),
                max_request_wait_ms=self.whole(t.get("max_request_wait_ms")),
                kube=kube,
                line=self.line(base),
            )
        return out

    def out_dir(self, name: str, t: dict, inputs: list[tuple[str, str | None, str]],
                outs: dict[str, str], services: list[str] | None = None) -> str | None:
        """A package or kubernetes target's ``out`` (default ``dist/<target>``): below the
        project, clear of every path the project reads (``inputs``, see :meth:`inputs`),
        also through a symlink, and of what the other targets write (``outs``,
        ``self.target_writes``); None when it is not.

        Args:
            services: a package target's services, each replaced as a whole in
                ``<out>/<service>``; None for a kubernetes target, which writes in ``out``.
        """
        base = ("targets", name)
        written = t.get("out", f"dist/{name}")
        out_dir = self.rel_path(written, base + ("out",), None)
        if out_dir is None:
            return None
        if out_dir == ".":
            self.add(base + ("out",), "must be a folder below the project folder, "
                                      "not the project folder itself")
            return None
        if why := self.out_overlaps(out_dir, inputs):
            self.add(base + ("out",), why)
            return None
        if out_dir in outs:
            self.add(base + ("out",), f"{out_dir!r} is already the out folder of "
                                      f"target {outs[out_dir]!r}")
            return None
        mine = [(out_dir, None, f"the out folder of target {name!r}")] if services is None \
            else [(f"{out_dir}/{s}", s, f"where target {name!r} writes service {s}")
                  for s in services]
        for path, service, _ in mine:
            for other, what in self.target_writes:
                if _overlap(path, other):
                    self.add(base + ("out",), (
                        f"{out_dir!r} overlaps" if service is None else
                        f"{out_dir!r} writes service {service} to {path!r}, which overlaps")
                        + f" {other!r} ({what}): each target needs a folder of its own")
                    return None
        outs[out_dir] = name
        self.target_writes += [(path, what) for path, _, what in mine]
        return out_dir

    def out_overlaps(self, out_dir: str, inputs: list[tuple[str, str | None, str]]) -> str | None:
        """Why ``out_dir`` may not be an out folder, or None.

        mlbuild replaces and deletes what it wrote below ``out``: it must not hold or lie
        inside anything the project reads, nor mlbuild's state or version control, as
        written or once symlinks are resolved.
        """
        real = self.real_rel(out_dir)
        forms = [(out_dir, "")] + ([(real, f" (really {real!r})")]
                                   if real is not None and real != out_dir else [])
        for form, shown in forms:
            top = form.split("/", 1)[0]
            if top in (STATE_FOLDER, ".git"):
                return (f"{out_dir!r}{shown} is inside {top}/: choose a folder of its own, "
                        "e.g. dist/NAME")
        for path, path_real, what in inputs:
            for form, shown in forms:
                if _overlap(form, path):
                    really = ""
                elif path_real is not None and _overlap(form, path_real):
                    really = f", really {path_real!r}"
                else:
                    continue
                return (f"{out_dir!r}{shown} overlaps {path!r} ({what}{really}): mlbuild "
                        "replaces what is in out, so it must be a folder of its own, "
                        "e.g. dist/NAME")
        return None

    def real_rel(self, rel: str) -> str | None:
        """``rel`` with its symlinks resolved, relative to the project (``.`` for the
        project folder itself); None when it resolves outside."""
        try:
            real = os.path.realpath(os.path.join(self.root, rel))
        except ValueError:  # a NUL in a name: no such path (the schema says why)
            return None
        if resolves_outside(self.root_real, real) is not None:
            return None
        return "." if real == self.root_real else \
            os.path.relpath(real, self.root_real).replace(os.sep, "/")

    def inputs(self, models: dict, envs: dict, services: dict) -> list[tuple[str, str | None, str]]:
        """Every path the project reads, as ``(path, path with symlinks resolved, what
        it is)``: no out folder may hold or lie inside one. Empty when no target has an
        out folder (the lock files' names come from the lock step's module)."""
        targets = _mapping(self.data.get("targets")).values()
        if not any(isinstance(t, dict) and t.get("type") in ("package", "kubernetes")
                   for t in targets):
            return []
        # NOTE: imported here: the lock file naming rule lives with the lock step, and
        # only a manifest with an out folder needs it.
        import mlbuild
        from mlbuild import resources
        from mlbuild.graph.steps.lock import lock_path

        found = [(self.manifest_path.name, "the manifest")]
        found += [(m.path, f"models.{m.name}.path") for m in models.values()]
        for e in envs.values():
            found += [(p, f"environments.{e.name}.{key}")
                      for key, p in (("conda", e.conda), ("requirements", e.requirements)) if p]
            # The lock is committed beside its spec: the source of truth of every build.
            found.append((lock_path(e), f"the lock file of environments.{e.name}"))
        for s in services.values():
            found += [(p, f"services.{s.name}.{key}") for key, p in (
                ("entry_script", s.entry_script), ("source_dir", s.source_dir),
                ("schema.input", s.schema_input), ("schema.output", s.schema_output)) if p]
        # mlbuild's own files (the runtime copied into every context, the templates),
        # where the project holds them: a checkout of mlbuild with its demo manifest.
        for folder, what in ((os.path.dirname(mlbuild.__file__), "mlbuild's own source"),
                             (str(resources.templates_dir()), "mlbuild's templates")):
            rel = os.path.relpath(os.path.realpath(folder), self.root_real)
            if resolves_outside(self.root_real, folder) is None and rel != ".":
                found.append((rel.replace(os.sep, "/"), what))
        return [(p, self.real_rel(p), what) for p, what in found]

    def kube_settings(self, name: str, t: dict, inputs: list[tuple[str, str | None, str]],
                      outs: dict[str, str]) -> KubeSettings | None:
        """A kubernetes target's settings, every problem reported (the schema has
        checked types and ranges; these are the rules between keys)."""
        base = ("targets", name)
        # NOTE: the registry a cluster pulls from is checked when the target is planned,
        # not here: a kubernetes target declared for later must not stop `deploy dev`.
        ok = True
        replicas = self.whole(t.get("replicas"))
        raw_auto = t.get("autoscale")
        autoscale = None
        if isinstance(raw_auto, dict):
            if replicas is not None:
                self.add(base + ("autoscale",), "replicas and autoscale exclude each other: "
                                                "keep replicas for a fixed count, autoscale "
                                                "for an HPA")
                ok = False
            defaults = Autoscale()
            low = self.whole(raw_auto.get("min")) or defaults.min
            high = self.whole(raw_auto.get("max")) or defaults.max
            if low > high:
                self.add(base + ("autoscale", "min"), f"min {low} is above max {high}")
                ok = False
            autoscale = Autoscale(min=low, max=high, target_cpu_percent=self.whole(
                raw_auto.get("target_cpu_percent")) or defaults.target_cpu_percent)
        defaults = KubeSettings()
        cpu = self.number(t.get("cpu"), base + ("cpu",)) or defaults.cpu
        memory = self.number(t.get("memory_gb"), base + ("memory_gb",)) or defaults.memory_gb
        cpu_limit = self.number(t.get("cpu_limit"), base + ("cpu_limit",))
        memory_limit = self.number(t.get("memory_gb_limit"), base + ("memory_gb_limit",))
        if cpu_limit is not None and cpu_limit < cpu:
            self.add(base + ("cpu_limit",), f"{cpu_limit:g} is below the request cpu {cpu:g}: "
                                            "a limit must be at least its request")
            ok = False
        if memory_limit is not None and memory_limit < memory:
            self.add(base + ("memory_gb_limit",), f"{memory_limit:g} is below the request "
                                                  f"memory_gb {memory:g}: a limit must be at "
                                                  "least its request")
            ok = False
        raw_live = _mapping(t.get("liveness"))
        live = Liveness(**{k: v for k in ("period_s", "initial_delay_s", "timeout_s",
                                          "failure_threshold", "success_threshold")
                           if (v := self.whole(raw_live.get(k))) is not None})
        raw_ingress = t.get("ingress")
        ingress = None
        if isinstance(raw_ingress, dict) and _str(raw_ingress.get("host")):
            ingress = Ingress(host=raw_ingress["host"], class_name=_str(raw_ingress.get("class")),
                              tls_secret=_str(raw_ingress.get("tls_secret")))
        out_dir = self.out_dir(name, t, inputs, outs)
        apply = t.get("apply", True)
        if not ok or out_dir is None:
            return None
        port = self.whole(t.get("port"))
        timeout = self.whole(t.get("scoring_timeout_ms"))
        wait = self.whole(t.get("max_request_wait_ms"))
        return KubeSettings(
            namespace=_str(t.get("namespace")) or defaults.namespace,
            context=_str(t.get("context")),
            port=port if port is not None and 1 <= port <= 65535 else defaults.port,
            replicas=None if autoscale is not None else (replicas or 1),
            autoscale=autoscale,
            cpu=cpu, memory_gb=memory, cpu_limit=cpu_limit, memory_gb_limit=memory_limit,
            gpu=self.whole(t.get("gpu")),
            scoring_timeout_ms=timeout if timeout is not None else defaults.scoring_timeout_ms,
            max_concurrent_requests=self.whole(t.get("max_concurrent_requests")),
            max_request_wait_ms=wait if wait is not None else defaults.max_request_wait_ms,
            liveness=live,
            progress_deadline_s=self.whole(t.get("progress_deadline_s"))
            or defaults.progress_deadline_s,
            service_type=t.get("service_type") if t.get("service_type") in SERVICE_TYPES
            else defaults.service_type,
            ingress=ingress,
            apply=apply if isinstance(apply, bool) else True,
            out=out_dir,
            image_pull_secret=_str(t.get("image_pull_secret")),
        )

    def default_target(self, targets: dict) -> str | None:
        if "default_target" in self.data:
            name = self.data["default_target"]
            if not isinstance(name, str):
                return None
            names = set(_mapping(self.data.get("targets"))) or set(targets)
            if name not in names:
                self.add(("default_target",), f"no target {name!r}" + (
                    did_you_mean(name, names) or f" (targets: {', '.join(sorted(names))})"))
            return name
        if "dev" in targets:
            return "dev"
        if len(targets) == 1:
            return next(iter(targets))
        return None

    def check_name_lengths(self, project: str | None, services: dict, targets: dict) -> None:
        if project is None:
            return
        for t in targets.values():
            names = t.services if t.services is not None else tuple(services)
            for s in names:
                if s not in services:
                    continue
                full = f"{project}-{s}-{t.name}"
                if len(full) > MAX_OBJECT_NAME:
                    self.add(("services", s),
                             f"{full!r} (project-service-target) is {len(full)} characters; "
                             f"Docker and Kubernetes names allow {MAX_OBJECT_NAME}: shorten the "
                             "project, service or target name")
