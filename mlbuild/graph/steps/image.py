"""``image`` and ``push`` steps: a service's image, named after its content.

    context:diabetes ──▶ image:diabetes ──▶ push:diabetes (when a registry is set)

The tag is ``[<registry>/]<project>-<service>:<fingerprint[:16]>``. The fingerprint
covers the build context's digest (Dockerfile, environment spec, runtime, models,
source), so two checkouts of the same commit name the same tag. Before building:

    tag in the engine        → nothing to do
    tag in the registry      → pull it (a fresh CI machine pulls instead of building)
    otherwise                → build: the context's Dockerfile.buildkit with BuildKit
                               where the engine has it (the installers' caches as cache
                               mounts), else its Dockerfile with the classic builder

Both Dockerfiles make the same image, so the tag does not depend on the builder.
``MLBUILD_BUILDER`` (``auto``, ``buildkit`` or ``classic``) overrides the choice.

Up to date means the recorded tag is still in the engine (one cheap API call).
"""

from __future__ import annotations

import json
import os

from mlbuild import written
from mlbuild.backends import dockerapi
from mlbuild.errors import InvalidInput, StepFailed
from mlbuild.graph.step import BuildContext, Step
from mlbuild.graph.steps.context import DOCKERFILE, DOCKERFILE_BUILDKIT, context_of

LABEL_FINGERPRINT = "dev.mlbuild.fingerprint"
BUILDER_ENV = "MLBUILD_BUILDER"


def engine(ctx: BuildContext):
    """The run's Docker engine connection, made on first use and shared by the steps."""
    eng = ctx.options.get("_docker")
    if eng is None:
        from mlbuild.backends.docker import connect

        eng = ctx.options["_docker"] = connect()
    return eng


def repository(project, service: str) -> str:
    repo = f"{project.name}-{service}"
    return f"{project.registry.rstrip('/')}/{repo}" if project.registry else repo


def image_tag(project, service: str, fingerprint: str) -> str:
    return f"{repository(project, service)}:{fingerprint.split(':')[-1][:16]}"


def builder_for(eng) -> str:
    """``buildkit`` or ``classic``: ``$MLBUILD_BUILDER`` when it names one, else BuildKit
    where the engine has it.

    Raises:
        InvalidInput: ``$MLBUILD_BUILDER`` is set to something else.
    """
    choice = os.environ.get(BUILDER_ENV, "").strip().lower() or "auto"
    if choice not in ("auto", "buildkit", "classic"):
        raise InvalidInput(f"{BUILDER_ENV}={choice!r} is not a builder",
                           hint="auto (the default), buildkit or classic")
    if choice != "auto":
        return choice
    return "buildkit" if eng.buildkit_available() else "classic"


def image_present(tag: str) -> bool | None:
    """Is ``tag`` in the engine? None when the engine cannot be asked cheaply."""
    try:
        return dockerapi.inspect("images", tag) is not None
    except dockerapi.Unavailable:
        return None


class ImageStep(Step):
    kind = "image"
    version = 1

    def config(self, ctx: BuildContext) -> dict:
        return {"name": ctx.project.name, "registry": ctx.project.registry}

    def check_outputs(self, ctx: BuildContext, outputs: dict) -> str | None:
        present = image_present(outputs["tag"])
        if present is None:
            present = engine(ctx).image_exists(outputs["tag"])
        return None if present else f"image {outputs['tag']} is not in the engine"

    def preview(self, ctx: BuildContext, fingerprint: str | None) -> str:
        """What ``run`` would do, for ``mlbuild plan``."""
        if fingerprint is None:
            return "will build (its context changes)"
        tag = image_tag(ctx.project, self.params["service"], fingerprint)
        if image_present(tag):
            return f"{tag} is in the engine: nothing to build"
        if ctx.project.registry:
            try:
                if engine(ctx).registry_has(tag):
                    return f"will pull {tag} from the registry"
            except Exception as e:  # plan must not fail on a registry hiccup
                return f"will build {tag} (registry not reachable: {e})"
        return f"will build {tag}"

    def run(self, ctx: BuildContext, upstream: dict, fingerprint: str) -> dict:
        service = self.params["service"]
        project = ctx.project
        context = context_of(upstream)
        tag = image_tag(project, service, fingerprint)
        eng = engine(ctx)
        built = cached = 0
        if eng.image_exists(tag):
            how = "present"
        elif project.registry and eng.registry_has(tag):
            ctx.log(f"  pulling     {tag}")
            eng.pull(tag, retries=3)
            how = "pulled"
        else:
            log_path = ctx.state_dir / "logs" / f"build-{service}.log"

            def progress(ev) -> None:
                # Steps that ran are shown as they finish; cache hits are counted in
                # the summary (and listed in the build log).
                if ev.status == "done":
                    ctx.log(f"    {service} [{ev.step}/{ev.total}] {ev.instruction[:64]}")

            from mlbuild.backends.docker import BuildkitUnavailable

            def build(builder: str):
                return eng.build(project.root / context["dir"], tag, log_path=log_path,
                                 labels={LABEL_FINGERPRINT: fingerprint}, progress_cb=progress,
                                 builder=builder,
                                 dockerfile=DOCKERFILE_BUILDKIT if builder == "buildkit" else DOCKERFILE,
                                 step_id=self.id)

            builder = builder_for(eng)
            try:
                res = build(builder)
            except BuildkitUnavailable as e:
                if os.environ.get(BUILDER_ENV, "").strip().lower() == "buildkit":
                    raise StepFailed(self.id, str(e), hint=f"unset {BUILDER_ENV}: mlbuild "
                                     "then builds with the classic builder") from None
                ctx.log(f"  note        {e}; building with the classic builder")
                builder = "classic"
                res = build(builder)
            how, built, cached = "built", res.built, res.cached
        info = eng.image_info(tag)
        return {"tag": tag, "image_id": info.id, "how": how, "built": built, "cached": cached,
                "builder": builder if how == "built" else None, "size": info.size,
                "log": os.path.relpath(ctx.state_dir / "logs" / f"build-{service}.log",
                                       project.root) if how == "built" else None}

    def identity(self, outputs: dict):
        return outputs["tag"]

    def summary(self, outputs: dict) -> str:
        mb = outputs["size"] / 1e6
        if outputs["how"] == "built":
            builder = {"buildkit": "; BuildKit", "classic": "; classic builder"}.get(
                outputs.get("builder") or "", "")
            return (f"built {outputs['tag']} ({outputs['built']} steps run, "
                    f"{outputs['cached']} cached; {mb:.0f} MB{builder})")
        return f"{outputs['how']} {outputs['tag']} ({mb:.0f} MB)"


class PushStep(Step):
    kind = "push"
    version = 1

    def config(self, ctx: BuildContext) -> dict:
        return {"registry": ctx.project.registry}

    def run(self, ctx: BuildContext, upstream: dict, fingerprint: str) -> dict:
        tag = upstream[f"image:{self.params['service']}"]["tag"]
        eng = engine(ctx)
        digest = eng.push(tag, retries=3)
        return {"tag": tag, "digest": digest}

    def identity(self, outputs: dict):
        return outputs["digest"]

    def summary(self, outputs: dict) -> str:
        return f"pushed {outputs['tag']} ({outputs['digest'][:19]})"


class ImageTarStep(Step):
    """``deploy PACKAGE-TARGET --image-tar``: the built image as ``docker save`` output
    beside the package directory (``<out>/<service>.image.tar``), for those who want
    to download the image rather than build it. ``docker load -i`` reads it.

    ``<out>`` may hold the user's files: the tar is written only where there is none
    or where ``<out>/mlbuild-written.json`` (mlbuild/written.py) records it as
    mlbuild's; a file of the user by that name stops the step, named, untouched. A
    tar an older mlbuild wrote before it kept that record is taken as its own when
    this step's state says it wrote it (same size, and the tar names the same tag).
    """

    kind = "imagetar"
    version = 1

    def _path(self, ctx: BuildContext):
        return ctx.project.root / ctx.target.out / f"{self.params['service']}.image.tar"

    def config(self, ctx: BuildContext) -> dict:
        return {f"targets.{ctx.target.name}.out": ctx.target.out}

    def check_outputs(self, ctx: BuildContext, outputs: dict) -> str | None:
        try:
            size = self._path(ctx).stat().st_size
        except OSError:
            return f"output {outputs['file']} missing"
        return None if size == outputs["size"] else f"output {outputs['file']} was modified"

    def run(self, ctx: BuildContext, upstream: dict, fingerprint: str) -> dict:
        from mlbuild.state.digest import hash_file

        tag = upstream[f"image:{self.params['service']}"]["tag"]
        path = self._path(ctx)
        record = written.Written.open(path.parent, ctx.target.out, self.id)
        record.check([path.name], adopt=self._written_before(ctx))
        record.begin([path.name])  # before the tar: a run stopped meanwhile leaves it claimed
        size = engine(ctx).save_image(tag, path)
        record.wrote(path.name, hash_file(path))
        record.save()
        return {"file": os.path.relpath(path, ctx.project.root), "size": size, "tag": tag}

    def _written_before(self, ctx: BuildContext):
        """``adopt`` for Written.check: the tar this step's state says it wrote there."""
        import tarfile

        prev = ctx.db.get_step(self.id)
        outputs = prev.outputs if prev is not None else {}

        def adopt(name: str, path) -> bool:
            if outputs.get("file") != os.path.relpath(path, ctx.project.root):
                return False
            try:
                if os.stat(path).st_size != outputs.get("size"):
                    return False
                with tarfile.open(path, "r:") as tf:
                    member = tf.extractfile("manifest.json")
                    images = json.load(member) if member is not None else []
            except (OSError, tarfile.TarError, KeyError, ValueError):
                return False
            return isinstance(images, list) and any(
                isinstance(i, dict) and outputs.get("tag") in (i.get("RepoTags") or ())
                for i in images)
        return adopt

    def summary(self, outputs: dict) -> str:
        return f"{outputs['file']} ({outputs['size'] / 1e6:.0f} MB, {outputs['tag']})"
