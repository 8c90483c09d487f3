"""``model`` steps: register the current content of a manifest model, or resolve a
pinned registered version (``ridge@3``).

Output identity is (name, version, content digest): editing a model's description
or tags re-runs this step (the registry's metadata is updated) but does not change
what downstream steps see, so nothing is rebuilt for it.
"""

from __future__ import annotations

import os

from mlbuild.errors import InvalidInput
from mlbuild.fsutil import within
from mlbuild.graph.step import BuildContext, Step
from mlbuild.state.digest import walk_files


class ModelStep(Step):
    kind = "model"
    version = 1

    def _model(self, ctx: BuildContext):
        return ctx.project.models[self.params["model"]]

    @property
    def pinned(self) -> int | None:
        return self.params.get("version")

    def config(self, ctx: BuildContext) -> dict:
        if self.pinned is not None:
            return {}
        name = self.params["model"]
        return {f"models.{name}": self._model(ctx).config()}

    def inputs(self, ctx: BuildContext) -> dict[str, str]:
        if self.pinned is not None:
            return {}
        m = self._model(ctx)
        p = ctx.project.path(m.path)
        # Into mlbuild's state folder (also a symlink made after the manifest was
        # checked), or a file of it: refused. (A hard link to one of the state's files
        # is refused where its digest is taken, DigestCache.file.)
        guard = ctx.db.guard
        real = os.path.realpath(p)
        if guard.holds(real):
            guard.refuse(f"models.{m.name}.path", m.path, p, real)
        if p.is_dir():
            root_real = os.path.realpath(ctx.project.root)
            files = {}
            for rel, f in walk_files(p):
                real = os.path.realpath(f)
                if not within(root_real, real):
                    raise InvalidInput(
                        f"models.{m.name}.path: {m.path}/{rel} is a symlink to {real}, "
                        "outside the project", hint="copy the file into the project")
                if guard.holds(real):
                    guard.refuse(f"models.{m.name}.path", f"{m.path}/{rel}", f, real)
                files[f"{m.path}/{rel}"] = ctx.digests.file(f)
            return files
        return {m.path: ctx.digests.file(p)}

    def extra(self, ctx: BuildContext) -> dict:
        if self.pinned is None:
            return {}
        mv = ctx.registry.find(self.params["model"], self.pinned)
        return {"registered": mv.digest if mv else None}

    def check_outputs(self, ctx: BuildContext, outputs: dict) -> str | None:
        mv = ctx.registry.find(outputs["name"], outputs["version"])
        if mv is None or mv.digest != outputs["digest"]:
            return f"registered version {outputs['name']}@{outputs['version']} missing"
        if not ctx.registry.blobs_present(mv):
            return f"blobs of {mv.ref} missing from the registry"
        return None

    def run(self, ctx: BuildContext, upstream: dict, fingerprint: str) -> dict:
        name = self.params["model"]
        if self.pinned is not None:
            mv = ctx.registry.find(name, self.pinned)
            if mv is None:
                have = ", ".join(str(v.version) for v in ctx.registry.versions(name)) or "none"
                raise InvalidInput(
                    f"model {name}@{self.pinned} is not registered (versions: {have})",
                    hint=f"register it (mlbuild models register PATH --name {name}) "
                    "or change the pin in the manifest")
            return {"name": name, "version": mv.version, "digest": mv.digest, "created": False}
        m = self._model(ctx)
        mv, created = ctx.registry.register(
            ctx.project.path(m.path), name, description=m.description, tags=m.tags,
            properties=m.properties, framework=m.framework,
            framework_version=m.framework_version,
            resources=m.resources.config() if m.resources else None, source=m.path,
            replace_metadata=True)
        return {"name": name, "version": mv.version, "digest": mv.digest, "created": created}

    def identity(self, outputs: dict):
        return {k: outputs[k] for k in ("name", "version", "digest")}

    def summary(self, outputs: dict) -> str:
        ref = f"{outputs['name']}@{outputs['version']}"
        return f"registered {ref}" if outputs.get("created") else f"{ref} (content unchanged)"
