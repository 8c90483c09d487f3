"""``wheels`` steps: every locked package of an environment as a file, for offline builds.

    lock:sklearn ──▶ wheels:sklearn ──▶ context:diabetes+offline ──▶ package:bundle/diabetes

For a package target with ``offline: true`` (or ``deploy --offline``): the lock's wheels
for Linux x86_64 / the environment's Python, and the serving runtime's, are fetched
with ``pip download`` (which checks the lock's hashes) into a content-addressed cache,
``.mlbuild/wheels/sha256/ab/<digest>/<file>``, and hard-linked into the build context.
The Dockerfile then installs with ``--no-index`` from them alone, so ``docker build
--network none`` of the package directory works. A wheel already in the cache is
never fetched again: the cache is offered to pip as its download folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from mlbuild import fsutil
from mlbuild.errors import NotSupported, StepFailed
from mlbuild.graph.step import BuildContext, Step
from mlbuild.graph.steps.lock import DEFAULT_PYTHON
from mlbuild.graph.steps.venv import runtime_requirements
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


class WheelsStep(Step):
    kind = "wheels"
    version = 1

    def _env(self, ctx: BuildContext):
        return ctx.project.environments[self.params["environment"]]

    def config(self, ctx: BuildContext) -> dict:
        env = self._env(ctx)
        if env.kind == "conda":
            raise NotSupported(f"environments.{env.name}: offline packages of conda "
                               "environments are not built yet",
                               hint="use a pip environment for an offline package")
        return {f"environments.{env.name}.python": env.python}

    def inputs(self, ctx: BuildContext) -> dict[str, str]:
        return {"<mlbuild>/runtime/requirements.txt": ctx.digests.file(runtime_requirements())}

    def check_outputs(self, ctx: BuildContext, outputs: dict) -> str | None:
        for name, digest in outputs["wheels"]:
            if not cached_path(ctx, digest, name).is_file():
                return f"wheel {name} missing from the cache"
        return None

    def _download(self, ctx: BuildContext, dest: Path, args: list[str]) -> set[str]:
        """pip download into ``dest``; returns the names of the files it used."""
        python = self._env(ctx).python or DEFAULT_PYTHON
        cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
               "--progress-bar", "off",
               "--only-binary=:all:", "--implementation", "cp", "--python-version", python,
               *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(dest), *args]
        r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            lines = [ln for ln in (r.stderr or r.stdout).splitlines()
                     if ln.startswith(("ERROR", "THESE PACKAGES", "    "))][-10:]
            raise StepFailed(self.id, "fetching the wheels failed:\n    " + "\n    ".join(lines),
                             hint="a hash mismatch means the file differs from the one "
                                  "locked: re-lock (mlbuild lock) only if you trust the change")
        used = set()
        for line in r.stdout.splitlines():
            for prefix in ("Saved ", "File was already downloaded "):
                if line.startswith(prefix):
                    used.add(Path(line[len(prefix):].strip()).name)
        return used

    def run(self, ctx: BuildContext, upstream: dict, fingerprint: str) -> dict:
        env = self._env(ctx)
        lock = ctx.project.path(upstream[f"lock:{env.name}"]["file"])
        cache = cache_dir(ctx)
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=ctx.state_dir) as tmp:
            dl = Path(tmp)
            # What the cache holds is offered as already downloaded (pip checks it).
            known = {}
            for p in cache.glob("*/*/*"):
                if p.name not in known:
                    known[p.name] = p
                    fsutil.link_or_copy(p, dl / p.name)
            used = self._download(ctx, dl, ["--require-hashes", "--no-deps", "-r", str(lock)])
            used |= self._download(ctx, dl, ["-r", str(runtime_requirements())])
            wheels = []
            new = 0
            for name in sorted(used):
                f = dl / name
                digest = hash_file(f)
                dest = cached_path(ctx, digest, name)
                if not dest.exists():
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.chmod(f, 0o444)
                    os.replace(f, dest)
                    new += 1
                wheels.append([name, digest])
        return {"wheels": wheels, "downloaded": new}

    def identity(self, outputs: dict):
        return outputs["wheels"]

    def summary(self, outputs: dict) -> str:
        return f"{len(outputs['wheels'])} wheels ({outputs['downloaded']} downloaded)"
