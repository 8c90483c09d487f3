"""``package`` steps: write the downloadable package directory of a service.

``<out>/<service>/`` gets the build context (Dockerfile, env spec, runtime, models,
app, samples), a README with the exact commands to build and run it, and
``mlbuild-package.json`` listing every file with its digest.

Rewritten incrementally: the new directory is made in a staging folder beside the
old one, unchanged files are hard links to the old ones (same inode, same mtime: a
downstream rsync or ``make`` sees them untouched), stale files are simply not carried
over, and the two folders are swapped atomically.
"""

from __future__ import annotations

import json
import shutil

import mlbuild
from mlbuild import fsutil
from mlbuild.graph.step import BuildContext, Step
from mlbuild.graph.steps.context import CONTAINER_PORT, check_tree
from mlbuild.state.digest import hash_bytes

PACKAGE_MANIFEST = "mlbuild-package.json"
PACKAGE_FORMAT = 1


class PackageStep(Step):
    kind = "package"
    version = 1
    templates = ("package-README.md.j2",)

    def _out_rel(self, ctx: BuildContext) -> str:
        return f"{ctx.target.out.rstrip('/')}/{self.params['service']}"

    def config(self, ctx: BuildContext) -> dict:
        t = ctx.target
        s = ctx.project.services[self.params["service"]]
        return {"name": ctx.project.name, f"targets.{t.name}": t.config(),
                f"services.{s.name}.auth": s.auth}

    def check_outputs(self, ctx: BuildContext, outputs: dict) -> str | None:
        out = ctx.project.root / outputs["dir"]
        manifest = out / PACKAGE_MANIFEST
        try:
            listed = json.loads(manifest.read_text())["files"]
        except FileNotFoundError:
            return f"output {outputs['dir']} missing" if not out.exists() \
                else f"output {outputs['dir']}/{PACKAGE_MANIFEST} missing"
        except (OSError, ValueError, KeyError, TypeError):
            return f"output {outputs['dir']}/{PACKAGE_MANIFEST} unreadable"
        if listed != outputs["files"]:
            return f"output {outputs['dir']}/{PACKAGE_MANIFEST} does not match"
        return check_tree(ctx, out, listed, outputs["dir"], allow=frozenset({PACKAGE_MANIFEST}))

    def run(self, ctx: BuildContext, upstream: dict, fingerprint: str) -> dict:
        from mlbuild.render import render

        project = ctx.project
        service = project.services[self.params["service"]]
        context = upstream[self.spec.deps[0]]  # context:SERVICE (or its offline variant)
        ctx_dir = project.root / context["dir"]
        out_rel = self._out_rel(ctx)
        out = project.root / out_rel

        # What the old package holds and can be reused (verified, not trusted).
        old: dict[str, str] = {}
        try:
            old = json.loads((out / PACKAGE_MANIFEST).read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            old = {}

        # Named after the context's content: the same files give the same tag, whatever
        # the package target's own settings.
        image = f"{project.name}-{service.name}:{context['digest'].split(':')[-1][:16]}"
        readme = render(
            "package-README.md.j2",
            project=project.name,
            service=service.name,
            image=image,
            port=CONTAINER_PORT,
            auth=service.auth,
            models=context.get("models", []),
            has_sample="samples/input.json" in context["files"],
            has_app=any(rel.startswith("app/") for rel in context["files"]),
            mlbuild_version=mlbuild.__version__,
        ).encode()

        fsutil.remove_stale_staging(out.parent)
        stage = fsutil.staging_dir(out)
        files: dict[str, str] = {}
        reused = 0
        try:
            wanted = dict(context["files"])
            wanted["README.md"] = hash_bytes(readme)
            for rel in sorted(wanted):
                digest = wanted[rel]
                dst = stage / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                old_file = out / rel
                if old.get(rel) == digest and old_file.is_file() and \
                        ctx.digests.file(old_file) == digest:
                    fsutil.link_or_copy(old_file, dst)  # unchanged: keep the very same file
                    reused += 1
                elif rel == "README.md":
                    dst.write_bytes(readme)
                else:
                    fsutil.link_or_copy(ctx_dir / rel, dst)
                files[rel] = digest
            manifest = {
                "format": PACKAGE_FORMAT,
                "project": project.name,
                "service": service.name,
                "target": ctx.target.name,
                "image": image,
                "fingerprint": fingerprint,
                "mlbuild_version": mlbuild.__version__,
                "files": files,
            }
            (stage / PACKAGE_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            fsutil.replace_dir(stage, out)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        for rel, digest in files.items():
            ctx.digests.remember(out / rel, digest)
        return {"dir": out_rel, "files": files, "image": image, "reused": reused}

    def identity(self, outputs: dict):
        return {"dir": outputs["dir"], "files": outputs["files"]}

    def summary(self, outputs: dict) -> str:
        n = len(outputs["files"]) + 1
        return f"{outputs['dir']} ({n} files, {outputs.get('reused', 0)} unchanged)"
