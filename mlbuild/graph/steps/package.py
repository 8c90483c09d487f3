"""``package`` steps: write the downloadable package directory of a service.

``<out>/<service>/`` gets the build context (Dockerfile, env spec, runtime, models,
app, samples), a README with the exact commands to build and run it, and
``mlbuild-package.json`` listing every file with its digest.

Rewritten incrementally: the new directory is made in a staging folder beside the
old one, unchanged files are hard links to the old ones (same inode, same mtime: a
downstream rsync or ``make`` sees them untouched), stale files are simply not carried
over, and the two folders are swapped atomically.

A deploy deletes no file that mlbuild did not write. ``mlbuild-package.json`` is the
record of what it wrote in ``<out>/<service>/``, and a deploy replaces that folder
only when it holds nothing else:

    <out>/<service>/ holds                      the deploy
    nothing (no folder, an empty one)           writes the package
    only the files its record lists             replaces them (edited ones too: the
                                                package is an output, rewritten)
    any other file (the user's notes, a folder  stops before touching anything, naming
    mlbuild never wrote, a symlink in place     the file: the user moves it and deploys
    of the folder, an unreadable record)        again

NOTE: stopping, rather than carrying the user's files over into the new folder: a
file carried over would ship in a package (and its build context) nobody asked it to
be in, and moving files in and out of staging folders is how they get lost on a
Ctrl-C. The check is made before any work and again just before the swap; the old
folder is then emptied file by file by its record (never ``rmtree``), so even a file
that comes in between is kept (and named in the log).

Staging folders (``<out>/.<service>.tmp-*``, ``.<service>.old-*`` where the system
cannot swap two folders in one call) left by a killed run are removed by the next
one, as much as is mlbuild's: all of a stage still being filled (it carries
``.mlbuild-staging``), the recorded files of a finished one or of an old package.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
from pathlib import Path

import mlbuild
from mlbuild import fsutil
from mlbuild.errors import StepFailed
from mlbuild.graph.step import BuildContext, Step
from mlbuild.graph.steps.context import CONTAINER_PORT, check_tree
from mlbuild.state.digest import hash_bytes

PACKAGE_MANIFEST = "mlbuild-package.json"
PACKAGE_FORMAT = 1
STAGING_MARK = ".mlbuild-staging"  # in a staging folder while it is being filled


def _record(folder: Path) -> tuple[dict[str, str], str | None]:
    """The files ``folder``'s record says mlbuild wrote there (empty without a record),
    and why the record cannot be trusted (None when it can)."""
    path = folder / PACKAGE_MANIFEST
    if path.is_symlink():
        return {}, "is a symbolic link"
    try:
        files = json.loads(path.read_text())["files"]
    except FileNotFoundError:
        return {}, None
    except (OSError, ValueError, KeyError, TypeError):
        return {}, "is unreadable"
    if not isinstance(files, dict):
        return {}, "is unreadable"
    for rel in files:
        if not isinstance(rel, str) or "\x00" in rel or rel.startswith("/") \
                or posixpath.normpath(rel) != rel or rel in (".", "..") or rel.startswith("../"):
            return {}, f"lists {rel!r}, not a path inside its folder"
    return files, None


def _strangers(folder: Path, owned: set[str]) -> list[str]:
    """What lies below ``folder`` that is not in ``owned`` (relative paths, sorted):
    files, symlinks, and folders that cannot be read. Folders are not listed."""
    found: list[str] = []

    def unreadable(e: OSError) -> None:
        found.append(os.path.relpath(e.filename, folder) if e.filename else ".")

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable):
        here = os.path.relpath(dirpath, folder)
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in filenames + links:
            rel = name if here == "." else f"{here}/{name}".replace(os.sep, "/")
            if rel not in owned:
                found.append(rel)
    return sorted(found)


def remove_written(folder: Path) -> bool:
    """Remove mlbuild's files from ``folder`` (a staging folder or an old package) and
    the folders left empty: all of it while it carries :data:`STAGING_MARK`, else the
    files its record lists, the record last (a run killed half-way leaves a folder the
    next one can still read). Returns True when nothing is left."""
    try:
        marked = (folder / STAGING_MARK).lstat()
    except OSError:
        marked = None
    if marked is not None:
        shutil.rmtree(folder, ignore_errors=True)
        return not os.path.lexists(folder)
    files, why = _record(folder)
    owned = set(files) if why is None else set()
    for dirpath, dirnames, filenames in os.walk(folder, topdown=False):
        here = os.path.relpath(dirpath, folder)
        for name in filenames + dirnames:
            path = os.path.join(dirpath, name)
            rel = name if here == "." else f"{here}/{name}".replace(os.sep, "/")
            try:
                if rel in owned and (name in filenames or os.path.islink(path)):
                    os.unlink(path)
                elif name in dirnames and not os.path.islink(path):
                    os.rmdir(path)  # only when empty
            except OSError:
                pass
    if why is None:
        try:
            os.unlink(folder / PACKAGE_MANIFEST)
        except OSError:
            pass
    try:
        os.rmdir(folder)
    except OSError:
        pass
    return not os.path.lexists(folder)


def _remove_stale(out_parent: Path, service: str) -> None:
    """Empty what a killed run left beside ``<out>/<service>`` (see the module doc)."""
    if not out_parent.is_dir():
        return
    for p in out_parent.iterdir():
        if p.name.startswith((f".{service}.tmp-", f".{service}.old-")) \
                and p.is_dir() and not p.is_symlink():
            remove_written(p)


def _swap(stage: Path, out: Path) -> Path | None:
    """Put the folder ``stage`` in place of ``out``, atomically where the system can
    (as :func:`mlbuild.fsutil.replace_dir`). Returns where the old folder now is, for
    the caller to empty (None when there was none)."""
    if not os.path.lexists(out):
        os.rename(stage, out)
        return None
    # NOTE: replace_dir would rmtree the old folder; this one is emptied by its record.
    if fsutil._exchange(str(stage), str(out)):
        return stage
    aside = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.rename(out, aside)
    os.rename(stage, out)
    return aside


def readme_settings(project, service) -> dict:
    """What the README's run command and notes say of ``workers``,
    ``collect_model_data`` and ``tracing`` (nothing for a service without them: its
    README stays as it was)."""
    from mlbuild.manifest.model import MODEL_DATA_IN_IMAGE

    out: dict = {}
    options = []
    c = service.collect_model_data
    if c is not None and c.destination("package") == "folder":
        volume = f"mlbuild-{project.name}-{service.name}-model-data"
        options.append(f"-v {volume}:{MODEL_DATA_IN_IMAGE}")
        out.update(model_data_volume=volume, model_data_dir=MODEL_DATA_IN_IMAGE)
    elif c is not None:
        out["model_data_stdout"] = True
    if service.tracing:
        # Without a value docker passes on the shell's (nothing when it is unset).
        options.append("-e OTEL_EXPORTER_OTLP_ENDPOINT")
        out["tracing"] = True
    if service.workers is not None:
        out["workers"] = service.workers
    if options:
        out["run_options"] = " ".join(options) + " "
    return out


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

        _remove_stale(out.parent, service.name)
        # What the old package holds and can be reused (verified, not trusted); it stops
        # here, before any work, when the folder holds a file mlbuild did not write.
        old = self._replaceable(out, out_rel)

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
            **readme_settings(project, service),
        ).encode()

        stage = fsutil.staging_dir(out)
        files: dict[str, str] = {}
        reused = 0
        try:
            (stage / STAGING_MARK).write_bytes(b"")
            wanted = dict(context["files"])
            wanted["README.md"] = hash_bytes(readme)
            for rel in sorted(wanted):
                digest = wanted[rel]
                dst = stage / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                old_file = out / rel
                if old.get(rel) == digest and old_file.is_file() and \
                        not old_file.is_symlink() and ctx.digests.file(old_file) == digest:
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
            os.unlink(stage / STAGING_MARK)
            self._replaceable(out, out_rel)  # again: a file may have come in meanwhile
            displaced = _swap(stage, out)
        except BaseException:
            remove_written(stage)
            raise
        if displaced is not None and not remove_written(displaced):
            ctx.log(f"  kept        {displaced.relative_to(project.root)}: files that "
                    f"mlbuild did not write came into {out_rel} during the deploy")
        for rel, digest in files.items():
            ctx.digests.remember(out / rel, digest)
        return {"dir": out_rel, "files": files, "image": image, "reused": reused}

    def _replaceable(self, out: Path, shown: str) -> dict[str, str]:
        """The files of the package in ``out`` by its record ({} when there is none).

        Raises:
            StepFailed: ``out`` holds something mlbuild did not write (named), so a
                deploy may not replace it.
        """
        if os.path.islink(out):
            raise StepFailed(self.id, f"{shown} is a symbolic link, where mlbuild writes the "
                                      "package folder", hint="remove the link (what it points "
                                      "to is not touched), or choose another out folder")
        if not os.path.exists(out):
            return {}
        if not out.is_dir():
            raise StepFailed(self.id, f"{shown} is a file mlbuild did not write, where it "
                                      "writes the package folder",
                             hint="move the file elsewhere, then deploy again")
        files, why = _record(out)
        if why is not None:
            raise StepFailed(self.id, f"{shown}/{PACKAGE_MANIFEST} {why}: mlbuild cannot tell "
                                      "the files it wrote there from yours",
                             hint=f"if {shown} holds nothing of yours, delete it and deploy again")
        strangers = _strangers(out, set(files) | {PACKAGE_MANIFEST})
        if strangers:
            first = shown if strangers[0] == "." else f"{shown}/{strangers[0]}"
            more = f" (and {len(strangers) - 1} more)" if len(strangers) > 1 else ""
            raise StepFailed(self.id, f"{first} was not written by mlbuild{more}; nothing was "
                                      "changed",
                             hint=f"move it elsewhere, then deploy again: a deploy replaces "
                                  f"{shown} as a whole and keeps nothing it did not write there")
        return files

    def identity(self, outputs: dict):
        return {"dir": outputs["dir"], "files": outputs["files"]}

    def summary(self, outputs: dict) -> str:
        n = len(outputs["files"]) + 1
        return f"{outputs['dir']} ({n} files, {outputs.get('reused', 0)} unchanged)"
