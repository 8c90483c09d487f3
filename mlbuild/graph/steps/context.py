"""``context`` steps: assemble a service's build context.

The context (``.mlbuild/contexts/<service>/``) holds only what the image needs::

    Dockerfile                  rendered from templates/Dockerfile.j2, for any builder
    Dockerfile.buildkit         the same for BuildKit: the installers' caches as cache
                                mounts (what mlbuild builds where the engine has BuildKit)
    env/requirements.lock.txt   a pip environment's lock (without its header), or
    env/conda-lock.yml          a conda environment's lock (its packages alone), and
    env/installer/mlbuild/...   the installer the image's builder stage runs on it
    env/runtime-requirements.txt  the serving runtime's requirements (and its
                                OpenTelemetry extra, for a service with tracing: true)
    env/slim.py                 makes the installed environment smaller (mlbuild/slim.py)
    env/base.lock.txt, base.key   a pip environment's layers (mlbuild/envlayers.py):
    env/delta.lock.txt,           the lock of the environment's base layer, and what
      delta.remove.txt            the layer above it adds and removes (when anything)
    imports.txt                 what the service imports at start, compiled in the image
                                (mlbuild/startup_imports.py, mlbuild/runtime/warm.py)
    wheels/, conda-pkgs/        offline only: every locked file
    runtime/mlbuild/...         the serving runtime (mlbuild/__init__.py + runtime/)
    models/NAME/VERSION/...     hard links to the registry's blobs
    app/...                     source dir and entry script
    samples/input.json ...      schema samples, when given

It is built in a staging folder of hard links and swapped in atomically; nothing is
copied that can be linked. Its output identity is the digest of the file listing, so
a change that renders to the same files rebuilds nothing downstream.
"""

from __future__ import annotations

import os
import posixpath
import shlex
import shutil
from functools import lru_cache
from pathlib import Path

import mlbuild
from mlbuild import fsutil
from mlbuild.errors import InvalidInput
from mlbuild.graph.step import BuildContext, Step
from mlbuild.manifest.model import DEFAULT_BASE_IMAGE, MODEL_DATA_IN_IMAGE
from mlbuild.state.digest import hash_bytes, hash_json, walk_files

MODEL_ROOT = "/var/mlbuild/models"
APP_ROOT = "/var/mlbuild/app"
RUNTIME_ROOT = "/opt/mlbuild"
CONTAINER_PORT = 5001
CONDA_PREFIX = "/opt/conda"
DOCKERFILE = "Dockerfile"
DOCKERFILE_BUILDKIT = "Dockerfile.buildkit"
# The installer of every image's Python packages, pinned: its version is part of the
# Dockerfile, so of the image's fingerprint. Offline, its wheel is among the wheels.
UV_REQUIREMENT = "uv==0.13.9"
# How the environment's layers are made (envlayers.py); part of the base layer's key, so
# raise it when the base layer's RUN changes in a way that makes old bases unusable.
ENV_LAYOUT = 1


@lru_cache(maxsize=1)
def runtime_files() -> list[tuple[str, Path]]:
    """The serving runtime as ``(path in context, source path)``."""
    pkg = Path(mlbuild.__file__).parent
    files = [("runtime/mlbuild/__init__.py", pkg / "__init__.py")]
    files += [(f"runtime/mlbuild/runtime/{rel}", p) for rel, p in walk_files(pkg / "runtime")]
    return files


def build_tools() -> dict[str, Path]:
    """mlbuild's modules that shape an image without being part of its runtime."""
    pkg = Path(mlbuild.__file__).parent
    return {"slim.py": pkg / "slim.py", "startup_imports.py": pkg / "startup_imports.py"}


def app_files(ctx: BuildContext, service) -> tuple[list[tuple[str, Path, str]], str | None]:
    """Files of the app folder as ``(path in context, source, display path)`` and the
    entry script's path inside ``app/`` (None for a no-code service).

    Raises:
        InvalidInput: a file resolves outside the project or into mlbuild's state
            folder (a hard link to one of the state's files is refused where its
            digest is taken, :class:`mlbuild.state.digest.DigestCache`).
    """
    project = ctx.project
    guard = ctx.db.guard
    out: list[tuple[str, Path, str]] = []
    entry_in_app = None
    src = service.source_dir
    if src:
        root_real = os.path.realpath(project.root)
        for rel, p in walk_files(project.path(src)):
            real = os.path.realpath(p)
            if not fsutil.within(root_real, real):
                raise InvalidInput(f"services.{service.name}.source_dir: {src}/{rel} is a "
                                   f"symlink to {real}, outside the project",
                                   hint="copy the file into the project, or remove the link")
            if guard.holds(real):
                guard.refuse(f"services.{service.name}.source_dir", f"{src}/{rel}", p, real)
            out.append((f"app/{rel}", p, f"{src}/{rel}"))
    if service.entry_script:
        es = service.entry_script
        check_not_state(ctx, f"services.{service.name}.entry_script", es)
        if src and (es + "/").startswith(src.rstrip("/") + "/"):
            entry_in_app = posixpath.relpath(es, src)
        else:
            entry_in_app = posixpath.basename(es)
            out = [f for f in out if f[0] != f"app/{entry_in_app}"]
            out.append((f"app/{entry_in_app}", project.path(es), es))
    return sorted(out), entry_in_app


def check_not_state(ctx: BuildContext, field: str, rel: str) -> None:
    """Refuse the manifest path ``rel`` when it leads into mlbuild's state folder (a
    symlink made after the manifest was checked). Raises InvalidInput."""
    p = ctx.project.path(rel)
    real = os.path.realpath(p)
    if ctx.db.guard.holds(real):
        ctx.db.guard.refuse(field, rel, p, real)


class ContextStep(Step):
    kind = "context"
    version = 7
    templates = ("Dockerfile.j2",)

    def _service(self, ctx):
        return ctx.project.services[self.params["service"]]

    def config(self, ctx: BuildContext) -> dict:
        s = self._service(ctx)
        env = ctx.project.environments[s.environment]
        cfg = {"name": ctx.project.name, f"services.{s.name}": s.config(),
               f"environments.{env.name}": env.config()}
        if self.params.get("offline"):
            cfg["offline"] = True
        if s.no_code:
            m = ctx.project.models.get(s.models[0].name)
            if m is not None:
                cfg[f"models.{m.name}.framework"] = m.framework
        return cfg

    def inputs(self, ctx: BuildContext) -> dict[str, str]:
        s = self._service(ctx)
        env = ctx.project.environments[s.environment]
        d = ctx.digests
        files = {disp: d.file(p) for _, p, disp in app_files(ctx, s)[0]}
        if env.kind == "conda":  # the environment itself comes in through its lock step
            from mlbuild.backends.conda import installer_files

            for rel, p in installer_files():
                files[f"<mlbuild>/{rel.removeprefix('mlbuild/')}"] = d.file(p)
        for key, sample in (("input", s.schema_input), ("output", s.schema_output)):
            if sample:
                check_not_state(ctx, f"services.{s.name}.schema.{key}", sample)
                files[sample] = d.file(ctx.project.path(sample))
        for rel, p in runtime_files():
            files[f"<mlbuild>/{rel.removeprefix('runtime/')}"] = d.file(p)
        for name, p in build_tools().items():
            files[f"<mlbuild>/mlbuild/{name}"] = d.file(p)
        return files

    def out_dir(self, ctx: BuildContext) -> Path:
        suffix = "+offline" if self.params.get("offline") else ""
        return ctx.state_dir / "contexts" / (self.params["service"] + suffix)

    def check_outputs(self, ctx: BuildContext, outputs: dict) -> str | None:
        return check_tree(ctx, ctx.project.root / outputs["dir"], outputs["files"], outputs["dir"])

    def run(self, ctx: BuildContext, upstream: dict, fingerprint: str) -> dict:
        from mlbuild.render import render

        project = ctx.project
        s = self._service(ctx)
        env = project.environments[s.environment]
        target = self.out_dir(ctx)
        fsutil.remove_stale_staging(target.parent)
        stage = fsutil.staging_dir(target)
        listing: dict[str, str] = {}
        try:
            def put_file(rel: str, src: Path, digest: str | None = None) -> None:
                # A copy (a clone where the file system can), never a hard link: the
                # user's files are edited in place, and an edit must not reach into a
                # built context or package. Only the registry's blobs are linked.
                dst = stage / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                fsutil.clone_or_copy(src, dst)
                listing[rel] = digest or ctx.digests.file(src)

            def put_text(rel: str, text: str) -> None:
                data = text.encode()
                dst = stage / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(data)
                listing[rel] = hash_bytes(data)

            # The environment's lock.
            pip_section = False
            lock = project.path(upstream[f"lock:{env.name}"]["file"])
            if env.kind == "conda":
                from mlbuild.backends import conda

                pip_section = check_conda_lock(env, lock, upstream[f"lock:{env.name}"]["file"])
                # Its packages alone (not the spec's hash): the environment layer is
                # keyed by what gets installed.
                env_file = "env/conda-lock.yml"
                put_text(env_file, conda.install_text(lock, "linux-64"))
                for rel, src in conda.installer_files():
                    put_file(f"env/installer/{rel}", src)
            else:  # the lock: exact versions with hashes
                from mlbuild.graph.steps.lock import packages_of

                # Without its header (the spec's digest): the image's environment layer
                # is keyed by what is installed alone, so a spec edit that resolves to
                # the same packages rebuilds nothing, even when other files change.
                env_file = "env/requirements.lock.txt"
                lock_text = packages_of(lock.read_text())
                put_text(env_file, lock_text)

            # Offline: every wheel, linked from the content-addressed cache.
            wheels = upstream.get(f"wheels:{env.name}")
            if wheels is not None:
                from mlbuild.graph.steps.wheels import cached_path

                # The OpenTelemetry extra's own wheels only where this service traces.
                for name, digest in wheels["wheels"] + (wheels.get("otel", []) if s.tracing
                                                        else []):
                    dst = stage / "wheels" / name
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    fsutil.link_or_copy(cached_path(ctx, digest, name), dst)
                    listing[f"wheels/{name}"] = digest
                for name, digest in wheels.get("conda", []):
                    dst = stage / "conda-pkgs" / name
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    fsutil.link_or_copy(cached_path(ctx, digest, name), dst)
                    listing[f"conda-pkgs/{name}"] = digest

            put_file("env/slim.py", build_tools()["slim.py"])

            # The runtime (its requirements also beside the lock: the environment is
            # installed from env/ alone, which a BuildKit build mounts as it is).
            # With tracing, the OpenTelemetry extra joins them: the image installs it
            # where it installs those (offline: its wheels are among the wheels step's),
            # and nothing else of the Dockerfile changes.
            runtime_reqs = "env/runtime-requirements.txt"
            for rel, p in runtime_files():
                put_file(rel, p)
            put_text(runtime_reqs, runtime_requirements_text(tracing=s.tracing))

            # Models, in MODEL_DIR layout: models/NAME/VERSION/<file or folder>.
            models = []
            for dep, out in upstream.items():
                if not dep.startswith("model:"):
                    continue
                mv = ctx.registry.find(out["name"], out["version"])
                dest = f"models/{mv.name}/{mv.version}"
                ctx.registry.materialize(mv, stage / dest)
                for rel, digest, _ in mv.files:
                    listing[f"{dest}/{rel}"] = digest
                models.append({"name": mv.name, "version": mv.version, "size": mv.size,
                               "dir": dest, "files": [f[0] for f in mv.files]})
            # Biggest first: the largest layers change least often and cache best.
            models.sort(key=lambda m: (-m["size"], m["name"]))
            if len(models) == 1:
                model_dir = f"{MODEL_ROOT}/{models[0]['name']}/{models[0]['version']}"
            else:
                model_dir = MODEL_ROOT

            # The app.
            files, entry_in_app = app_files(ctx, s)
            for rel, p, _ in files:
                put_file(rel, p)

            # What a start imports, compiled into the image (see startup_imports).
            from mlbuild.startup_imports import cached_pickle_modules, service_imports

            model_modules: set[str] = set()
            for m in models:
                for rel in m["files"]:
                    model_modules |= cached_pickle_modules(
                        stage / m["dir"] / rel, listing[f"{m['dir']}/{rel}"],
                        ctx.state_dir / "cache" / "pickle-modules")
            imports = service_imports(
                [(rel.removeprefix("app/"), p) for rel, p, _ in files], model_modules,
                sorted({project.models[m["name"]].framework for m in models
                        if m["name"] in project.models and project.models[m["name"]].framework}))
            put_text("imports.txt", "".join(f"{n}\n" for n in imports))

            samples = {}
            for key, sample in (("input", s.schema_input), ("output", s.schema_output)):
                if sample:
                    put_file(f"samples/{key}.json", project.path(sample))
                    samples[key] = f"/var/mlbuild/samples/{key}.json"

            no_code = None
            if s.no_code:
                m = models[0]
                # The model's own top entry (its file, or its folder, in which the runtime
                # picks the one model file), never files[0]: for a folder model that is
                # whatever sorts first (a README, external ONNX weights, ...).
                top = sorted({f.split("/", 1)[0] for f in m["files"]})
                path = f"{MODEL_ROOT}/{m['name']}/{m['version']}"
                no_code = {"path": f"{path}/{top[0]}" if len(top) == 1 else path,
                           "framework": project.models[m["name"]].framework}

            if env.base_image:
                base_image = env.base_image
            elif env.python and env.kind != "conda":
                base_image = f"python:{env.python}-slim"
            else:
                base_image = DEFAULT_BASE_IMAGE

            # A pip environment's layers (mlbuild/envlayers.py): the base as the previous
            # context had it, and a delta of what the lock changed since.
            layers = None
            if env.kind != "conda":
                from mlbuild import envlayers

                key = envlayers.base_key(
                    runtime=listing[runtime_reqs], slim=listing["env/slim.py"],
                    uv=UV_REQUIREMENT, base_image=base_image, layout=ENV_LAYOUT)
                old_base = _read_text(target / "env/base.lock.txt")
                layers = envlayers.split(lock_text, key, old_base,
                                         _read_text(target / "env/base.key"),
                                         offline=wheels is not None)
                put_text("env/base.lock.txt", layers.base)
                put_text("env/base.key", key)
                if layers.delta:
                    put_text("env/delta.lock.txt", layers.delta)
                if layers.remove:
                    put_text("env/delta.remove.txt", "".join(f"{n}\n" for n in layers.remove))

            values = dict(
                mlbuild_version=mlbuild.__version__,
                project=project.name,
                service=s.name,
                base_image=base_image,
                env_kind=env.kind,
                env_file=env_file,
                pip_section=pip_section,
                conda_prefix=CONDA_PREFIX,
                builder_image=DEFAULT_BASE_IMAGE,
                installer_requirements=installer_requirements(),
                uv_requirement=shlex.quote(UV_REQUIREMENT),
                uv_cache_id=uv_cache_id(base_image),
                conda_cache_id=CONDA_CACHE_ID,
                offline=wheels is not None,
                env_delta=layers is not None and layers.has_delta,
                env_remove=bool(layers and layers.remove),
                env_delta_install=bool(layers and layers.delta),
                runtime_requirements=runtime_reqs,
                runtime_root=RUNTIME_ROOT,
                models=models,
                model_root=MODEL_ROOT,
                model_dir=model_dir,
                app_root=APP_ROOT,
                has_app=bool(files),
                entry_script=f"{APP_ROOT}/{entry_in_app}" if entry_in_app else None,
                no_code=no_code,
                samples=samples,
                auth=s.auth,
                cors=",".join(s.cors),
                max_body_bytes=s.max_body_bytes,
                batching_env=s.batching.runtime_env() if s.batching else {},
                observability_env=s.observability_env(),
                model_data_dir=MODEL_DATA_IN_IMAGE if s.collect_model_data is not None
                and s.collect_model_data.to != "stdout" else None,
                port=CONTAINER_PORT,
                model_refs=",".join(f"{m['name']}:{m['version']}" for m in models),
            )
            put_text(DOCKERFILE, render("Dockerfile.j2", buildkit=False, **values))
            put_text(DOCKERFILE_BUILDKIT, render("Dockerfile.j2", buildkit=True, **values))
            fsutil.replace_dir(stage, target)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        # We know every digest we just laid out: no need to read the files again.
        for rel, digest in listing.items():
            ctx.digests.remember(target / rel, digest)
        # The runtime's environment, as the Dockerfile sets it (paths inside the image;
        # the process target maps them onto its own copy of the context).
        runtime_env = {"AML_APP_ROOT": APP_ROOT, "MLBUILD_MODEL_DIR": model_dir,
                       "AZUREML_MODEL_DIR": model_dir, "MLBUILD_AUTH": s.auth,
                       "MLBUILD_SERVICE_NAME": s.name}
        if entry_in_app:
            runtime_env["MLBUILD_ENTRY_SCRIPT"] = f"{APP_ROOT}/{entry_in_app}"
        if no_code:
            runtime_env["MLBUILD_NO_CODE_MODEL"] = no_code["path"]
            runtime_env["MLBUILD_NO_CODE_FRAMEWORK"] = no_code["framework"]
        for key, path in samples.items():
            runtime_env[f"MLBUILD_SCHEMA_{key.upper()}"] = path
        if s.cors:
            runtime_env["MLBUILD_CORS_ORIGINS"] = ",".join(s.cors)
        runtime_env.update(s.runtime_env())
        return {
            "dir": os.path.relpath(target, project.root).replace(os.sep, "/"),
            "env": runtime_env,
            "digest": hash_json(sorted(listing.items())),
            "files": listing,
            "models": [f"{m['name']}@{m['version']}" for m in models],
            "model_dir": model_dir,
            "entry_script": f"{APP_ROOT}/{entry_in_app}" if entry_in_app else None,
        }

    def identity(self, outputs: dict):
        return outputs["digest"]

    def summary(self, outputs: dict) -> str:
        return f"{len(outputs['files'])} files in {outputs['dir']}"


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def runtime_requirements_text(tracing: bool) -> str:
    """The runtime's requirements as an image installs them: with ``tracing``, its
    OpenTelemetry extra (``requirements-otel.txt``) after them."""
    from mlbuild.graph.steps.venv import otel_requirements, runtime_requirements

    text = runtime_requirements().read_text()
    if tracing:
        text = (text.rstrip("\n") + "\n# services.NAME.tracing: the runtime's OpenTelemetry "
                "extra (mlbuild/runtime/requirements-otel.txt)\n"
                + otel_requirements().read_text())
    return text


def context_of(upstream: dict) -> dict:
    """The outputs of the context step among ``upstream`` (``context:S`` or, for an
    offline target, ``context:S+offline``)."""
    return next(v for k, v in upstream.items() if k.startswith("context:"))


def map_image_path(value: str, roots: dict[str, Path]) -> str:
    """``value`` (a path inside the image) with the first of ``roots`` (image folder ->
    folder on this machine) it lies in replaced; other values as they are."""
    for inside, outside in roots.items():
        if value == inside or value.startswith(inside + "/"):
            return str(outside) + value[len(inside):]
    return value


CONDA_CACHE_ID = "mlbuild-conda-pkgs"


def uv_cache_id(base_image: str) -> str:
    """The id of the engine's cache mount for uv under BuildKit: one per base image.

    NOTE: per base image, not one for all: uv keys the wheels it builds from sources by
    their tags (``linux_x86_64``), not by the C library they were built against, so a
    wheel built on one base could be taken on an older one.
    """
    return f"mlbuild-uv-{base_image}"


def installer_requirements() -> str:
    """The builder stage's pip arguments for the conda installer's own packages."""
    from mlbuild.backends.conda import INSTALLER_REQUIREMENTS

    return " ".join(f"'{r}'" for r in INSTALLER_REQUIREMENTS)


def check_conda_lock(env, lock: Path, shown: str) -> bool:
    """A conda lock an image can be made of: linux-64 packages with python and pip.

    Returns:
        Whether the lock has a pip section.
    """
    from mlbuild.backends import conda

    packages = conda.locked_packages(lock, "linux-64")
    names = {p.name for p in packages if p.manager == "conda"}
    for need, why in (("python", "the service runs on it"),
                      ("pip", "the image's pip, first on its PATH, is the environment's")):
        if need not in names:
            raise InvalidInput(f"environments.{env.name}: {shown} has no {need} for "
                               f"linux-64 ({why})",
                               hint=f"add {need} to the dependencies of {env.conda} and "
                                    f"lock again (mlbuild lock {env.name})")
    return any(p.manager == "pip" for p in packages)


def check_tree(ctx: BuildContext, root: Path, files: dict[str, str], shown: str,
               allow: frozenset[str] = frozenset()) -> str | None:
    """None if ``root`` holds exactly ``files`` with those digests, else the reason."""
    if not root.is_dir():
        return f"output {shown} missing"
    on_disk = {rel for rel, _ in walk_files(root)}
    for rel, digest in files.items():
        p = root / rel
        if rel not in on_disk:
            return f"output {shown}/{rel} missing"
        try:
            if ctx.digests.file(p) != digest:
                return f"output {shown}/{rel} was modified"
        except Exception:
            return f"output {shown}/{rel} unreadable"
    extra = sorted(on_disk - set(files) - allow)
    if extra:
        return f"output {shown} has an unexpected file {extra[0]}"
    return None
