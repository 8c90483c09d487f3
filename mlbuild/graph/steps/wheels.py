"""``wheels`` steps: every locked package of an environment as a file, for offline builds.

    lock:sklearn ──▶ wheels:sklearn ──▶ context:diabetes+offline ──▶ package:bundle/diabetes

For a package target with ``offline: true`` (or ``deploy --offline``): the lock's wheels
for Linux x86_64 / the environment's Python, and the serving runtime's, are fetched
with ``pip download`` (which checks the lock's hashes), and the wheel of uv, the
image's installer (``UV_REQUIREMENT``), into a content-addressed cache,
``.mlbuild/wheels/sha256/ab/<digest>/<file>``, and hard-linked into the build context
(``.mlbuild/wheels/found/<fingerprint>.json`` remembers what a step found, so the
same step after ``mlbuild clean`` takes the files without asking pip).
The Dockerfile then installs with ``--no-index`` from them alone, so ``docker build
--network none`` of the package directory works. A wheel already in the cache is
never fetched again: the cache is offered to pip as its download folder.

A conda environment's lock gives three kinds of files, all in the same cache (keyed by
sha256): its linux-64 conda archives (downloaded from the lock's URLs and checked
against its hashes; they go to the context's ``conda-pkgs/``), the wheels of its pip
section and of the runtime's requirements for the environment's Python, and the
wheels of the image builder stage's installer (py-rattler, PyYAML, uv) for the base
image's Python.

Where a service of the target on this environment has ``tracing: true``, the wheels of
the runtime's OpenTelemetry extra (``requirements-otel.txt``, within the lock's pins too)
are fetched as well and listed apart (``otel``): only a tracing service's context links
them, so another service's stays as it was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from mlbuild import fsutil
from mlbuild.errors import MlbuildError, StepFailed
from mlbuild.graph.step import BuildContext, Step
from mlbuild.graph.steps.context import UV_REQUIREMENT
from mlbuild.graph.steps.lock import DEFAULT_PYTHON, pins_of
from mlbuild.graph.steps.venv import (otel_requirements, runtime_inputs,
                                      runtime_requirements, traces)
from mlbuild.state.digest import hash_file

# The images' platform: Linux x86_64 with glibc 2.36 (Debian bookworm), which takes
# every manylinux wheel up to that glibc.
PLATFORMS = [f"manylinux_2_{v}_x86_64" for v in range(36, 4, -1)] + \
    ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


def cache_dir(ctx: BuildContext) -> Path:
    return ctx.state_dir / "wheels" / "sha256"


def cached_path(ctx: BuildContext, digest: str, name: str) -> Path:
    hexd = digest.split(":")[-1]
    return cache_dir(ctx) / hexd[:2] / hexd / name


def store(ctx: BuildContext, f: Path) -> tuple[str, bool]:
    """Move the file ``f`` into the cache (read-only) unless the cache has it already.
    Returns its digest and whether it was added."""
    digest = hash_file(f)
    dest = cached_path(ctx, digest, f.name)
    if dest.exists():
        return digest, False
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(f, 0o444)
    os.replace(f, dest)
    return digest, True


class WheelsStep(Step):
    kind = "wheels"
    version = 3

    def _env(self, ctx: BuildContext):
        return ctx.project.environments[self.params["environment"]]

    def config(self, ctx: BuildContext) -> dict:
        env = self._env(ctx)
        out = {f"environments.{env.name}.python": env.python}
        if self._tracing(ctx):  # only then: other fingerprints stay as they were
            out["tracing"] = True
        return out

    def _tracing(self, ctx: BuildContext) -> bool:
        return traces(ctx.project, ctx.target, self.params["environment"])

    def inputs(self, ctx: BuildContext) -> dict[str, str]:
        return runtime_inputs(ctx, self._tracing(ctx))

    def extra(self, ctx: BuildContext) -> dict:
        # What else decides the files: the images' platform tags and, for conda, the
        # builder stage's installer (its Python is the default base image's).
        from mlbuild.backends.conda import INSTALLER_REQUIREMENTS

        return {"platforms": PLATFORMS, "installer": list(INSTALLER_REQUIREMENTS),
                "builder_python": DEFAULT_PYTHON, "uv": UV_REQUIREMENT}

    def _download(self, ctx: BuildContext, dest: Path, args: list[str],
                  python: str | None = None, failed: str = "fetching the wheels failed",
                  hint: str = "a hash mismatch means the file differs from the one locked: "
                              "re-lock (mlbuild lock) only if you trust the change") -> set[str]:
        """pip download into ``dest``; returns the names of the files it used."""
        python = python or self._env(ctx).python or DEFAULT_PYTHON
        cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
               "--progress-bar", "off",
               "--only-binary=:all:", "--implementation", "cp", "--python-version", python,
               *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(dest), *args]
        r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            # pip explains a conflict on stdout ("The conflict is caused by: ..."), the
            # errors on stderr.
            lines = [ln for ln in (r.stdout + "\n" + r.stderr).splitlines()
                     if ln.startswith(("ERROR", "THESE PACKAGES", "The conflict", "    "))][-12:]
            raise StepFailed(self.id, f"{failed}:\n    " + "\n    ".join(lines), hint=hint)
        used = set()
        for line in r.stdout.splitlines():
            line = line.strip()  # pip indents "File was already downloaded"
            for prefix in ("Saved ", "File was already downloaded "):
                if line.startswith(prefix):
                    used.add(Path(line[len(prefix):].strip()).name)
        return used

    def run(self, ctx: BuildContext, upstream: dict, fingerprint: str) -> dict:
        env = self._env(ctx)
        lock = ctx.project.path(upstream[f"lock:{env.name}"]["file"])
        cache = cache_dir(ctx)
        cache.mkdir(parents=True, exist_ok=True)
        # What this very step (same fingerprint: same lock, Python, runtime) found
        # before, kept with the cache: it survives `mlbuild clean`, and when every file
        # is still there, pip is not even asked (it would consult the index).
        memo = cache.parent / "found" / f"{fingerprint.split(':')[-1]}.json"
        try:
            found = json.loads(memo.read_text())
            if self.check_outputs(ctx, found) is None:
                return dict(found, downloaded=0)
        except (OSError, ValueError, KeyError, TypeError):
            pass
        with tempfile.TemporaryDirectory(dir=ctx.state_dir) as tmp:
            dl = Path(tmp) / "dl"  # pip's download folder; tmp/ holds what else we write
            dl.mkdir()
            # What the cache holds is offered as already downloaded (pip checks it).
            known = {}
            for p in cache.glob("*/*/*"):
                if p.name not in known:
                    known[p.name] = p
                    fsutil.link_or_copy(p, dl / p.name)
            conda_pkgs: list[list[str]] = []
            new = 0
            otel_used: set[str] = set()
            if env.kind == "conda":
                conda_pkgs, new = self._conda_archives(ctx, lock, dl)
                used = self._conda_wheels(ctx, lock, dl)
                if self._tracing(ctx):
                    from mlbuild.backends import conda

                    otel_used = self._download(
                        ctx, dl, ["-r", str(otel_requirements())],
                        conda.python_version(lock) or DEFAULT_PYTHON,
                        failed="fetching the wheels of the runtime's OpenTelemetry extra "
                               "failed")
            else:
                used = self._download(ctx, dl, ["--require-hashes", "--no-deps", "-r", str(lock)])
                # The runtime's requirements within the lock's pins: the image installs
                # them beside the locked packages, and a version the lock does not allow
                # would be installed next to the locked one (offline, under pip --root).
                pins = dl.parent / "lock-pins.txt"  # constraints take no extras
                pins.write_text("".join(f"{pin}\n" for pin in pins_of(lock.read_text())))
                used |= self._download(
                    ctx, dl, ["-r", str(runtime_requirements()), "-c", str(pins)],
                    failed=f"the serving runtime's requirements conflict with the lock of "
                           f"environment {env.name}",
                    hint="allow the version the runtime needs in the environment's spec "
                         "(see the conflict above), then mlbuild lock")
                # The installer, which the image's builder runs on the same Python.
                used |= self._download(ctx, dl, [UV_REQUIREMENT],
                                       failed="fetching the wheel of uv failed")
                if self._tracing(ctx):  # within the lock's pins too
                    otel_used = self._download(
                        ctx, dl, ["-r", str(otel_requirements()), "-c", str(pins)],
                        failed=f"the runtime's OpenTelemetry extra (tracing: true) "
                               f"conflicts with the lock of environment {env.name}",
                        hint="allow the version it needs in the environment's spec (see "
                             "the conflict above), then mlbuild lock")
            wheels, otel = [], []
            for name in sorted(used | otel_used):
                digest, added = store(ctx, dl / name)
                new += added
                (wheels if name in used else otel).append([name, digest])
        out = {"wheels": wheels, "downloaded": new}
        if self._tracing(ctx):
            out["otel"] = otel
        if env.kind == "conda":
            out["conda"] = conda_pkgs
        memo.parent.mkdir(exist_ok=True)
        fsutil.write_atomic(memo, json.dumps(out).encode())
        return out

    def _conda_wheels(self, ctx: BuildContext, lock: Path, dl: Path) -> set[str]:
        from mlbuild.backends import conda

        python = conda.python_version(lock) or DEFAULT_PYTHON
        used = set()
        pip_lock = conda.pip_requirements(lock)
        if pip_lock:
            req = dl.parent / "pip-section.lock.txt"  # in the step's temporary folder
            req.write_text(pip_lock)
            used |= self._download(ctx, dl, ["--require-hashes", "--no-deps", "-r", str(req)],
                                   python)
        used |= self._download(ctx, dl, ["-r", str(runtime_requirements())], python)
        # The builder stage runs the installer on the base image's own Python.
        used |= self._download(ctx, dl, [*conda.INSTALLER_REQUIREMENTS, UV_REQUIREMENT],
                               DEFAULT_PYTHON)
        return used

    def _conda_archives(self, ctx: BuildContext, lock: Path, dl: Path) -> tuple[list, int]:
        """The lock's linux-64 conda archives in the cache: ``[[file, digest]]`` and
        how many were downloaded."""
        import shutil
        import urllib.request

        from mlbuild.backends import conda

        out, new = [], 0
        for pkg in conda.locked_packages(lock, "linux-64", manager="conda"):
            if pkg.sha256 and cached_path(ctx, f"sha256:{pkg.sha256}", pkg.filename).is_file():
                out.append([pkg.filename, f"sha256:{pkg.sha256}"])
                continue
            # Not into dl/: it holds hard links to the cache's files, and writing through
            # one of the same name would rewrite a cached file.
            fresh = dl.parent / "conda"
            fresh.mkdir(exist_ok=True)
            f = fresh / pkg.filename
            try:
                with urllib.request.urlopen(pkg.url, timeout=60) as r, open(f, "xb") as w:
                    shutil.copyfileobj(r, w, 1 << 20)
                conda.verify(f, pkg)
            except MlbuildError as e:
                raise StepFailed(self.id, str(e), hint=e.hint) from None
            except OSError as e:
                raise StepFailed(self.id, f"fetching {pkg.url} failed: {e}",
                                 hint="check the channel can be reached, then deploy again") \
                    from None
            digest, _ = store(ctx, f)
            new += 1
            out.append([pkg.filename, digest])
        return out, new

    def identity(self, outputs: dict):
        if "otel" in outputs:
            return [outputs["wheels"], outputs.get("conda", []), outputs["otel"]]
        return [outputs["wheels"], outputs.get("conda", [])]

    def check_outputs(self, ctx: BuildContext, outputs: dict) -> str | None:
        for name, digest in outputs["wheels"] + outputs.get("conda", []) \
                + outputs.get("otel", []):
            if not cached_path(ctx, digest, name).is_file():
                return f"{name} missing from the cache"
        return None

    def summary(self, outputs: dict) -> str:
        conda = f" and {len(outputs['conda'])} conda packages" if "conda" in outputs else ""
        otel = f" + {len(outputs['otel'])} of the OpenTelemetry extra" \
            if "otel" in outputs else ""
        return f"{len(outputs['wheels'])} wheels{otel}{conda} " \
               f"({outputs['downloaded']} downloaded)"
