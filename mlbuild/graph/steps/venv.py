"""``venv`` steps: a virtual environment made from an environment, for the process target.

``.mlbuild/venvs/<env>-<key>/`` holds the environment's packages and the serving
runtime's requirements (the runtime itself runs from the release's copy of the build
context, exactly as in an image), and its OpenTelemetry extra where a service of the
target on this environment has ``tracing: true`` (:func:`traces`). ``key`` is a digest
of what was installed and the Python it runs on, so two targets needing the same
environment share one venv.

Installed with uv (a dependency of mlbuild, chosen because it installs the demo
environment in ~1-3 s where pip takes ~18 s on the same machine and cache). The venv
is made in a staging folder and renamed into place, so an interrupted install leaves
nothing that looks finished. Environments no deployment uses any more are removed
when a new one of the same name is made.

A conda environment becomes a conda prefix instead, installed from its lock exactly as
in an image: ``python -m mlbuild.backends.conda install`` (py-rattler; run as a child
process, whose exit py-rattler cannot crash), then the lock's pip section and the
runtime's requirements with uv. A conda prefix holds its own path in its files, so it
is installed in place (not staged and renamed); the marker written last tells a
finished one from an interrupted one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from mlbuild import fsutil
from mlbuild.errors import StepFailed
from mlbuild.graph.step import BuildContext, Step
from mlbuild.state.digest import hash_json

MARKER = "mlbuild-venv.json"


def runtime_requirements() -> Path:
    import mlbuild

    return Path(mlbuild.__file__).parent / "runtime" / "requirements.txt"


def otel_requirements() -> Path:
    """The runtime's OpenTelemetry extra (``mlbuild[otel]``): what ``tracing: true``
    installs beside :func:`runtime_requirements`."""
    import mlbuild

    return Path(mlbuild.__file__).parent / "runtime" / "requirements-otel.txt"


def traces(project, target, environment: str) -> bool:
    """Whether a service of ``target`` running on ``environment`` has ``tracing: true``:
    then the target's venv (or offline wheels) of that environment carries the
    OpenTelemetry extra. Per target, so another target's tracing changes nothing here."""
    return any(s.tracing for s in project.services_for(target)
               if s.environment == environment)


def runtime_inputs(ctx, tracing: bool) -> dict[str, str]:
    """The digests of the runtime's requirement files a venv or wheels step installs
    from: its requirements, and with ``tracing`` its OpenTelemetry extra."""
    out = {"<mlbuild>/runtime/requirements.txt": ctx.digests.file(runtime_requirements())}
    if tracing:
        out["<mlbuild>/runtime/requirements-otel.txt"] = ctx.digests.file(otel_requirements())
    return out


def uv_bin() -> str:
    try:
        from uv import find_uv_bin
    except ImportError as e:  # pragma: no cover - uv is a dependency
        raise StepFailed("venv", "uv is not installed", hint="pip install uv") from e
    return find_uv_bin()


def uv_env(**extra: str) -> dict[str, str]:
    """The environment uv runs in: never downloads a Python; trusts the system's
    certificate store (where a TLS-intercepting proxy's CA lives; uv's built-in roots
    would not trust it) unless the user chose otherwise."""
    env = dict(os.environ, UV_PYTHON_DOWNLOADS="never", **extra)
    env.setdefault("UV_NATIVE_TLS", "1")
    return env


class VenvStep(Step):
    kind = "venv"
    version = 2

    def _env(self, ctx: BuildContext):
        return ctx.project.environments[self.params["environment"]]

    def config(self, ctx: BuildContext) -> dict:
        env = self._env(ctx)
        out = {f"environments.{env.name}": env.config()}
        if self._tracing(ctx):  # only then: other venvs keep their fingerprints
            out["tracing"] = True
        return out

    def _tracing(self, ctx: BuildContext) -> bool:
        return traces(ctx.project, ctx.target, self.params["environment"])

    def _requirements(self, ctx: BuildContext) -> list[str]:
        """uv's arguments for the runtime's requirements (and its OpenTelemetry extra)."""
        out = ["-r", str(runtime_requirements())]
        if self._tracing(ctx):
            out += ["-r", str(otel_requirements())]
        return out

    def inputs(self, ctx: BuildContext) -> dict[str, str]:
        # The environment comes in through its lock step (upstream).
        return runtime_inputs(ctx, self._tracing(ctx))

    def extra(self, ctx: BuildContext) -> dict:
        env = self._env(ctx)
        if env.kind == "conda":  # the lock (upstream) names its Python
            return {"platform": sys.platform}
        return {"python": env.python or f"{sys.version_info[0]}.{sys.version_info[1]}",
                "platform": sys.platform}

    def _dir(self, ctx: BuildContext, fingerprint: str) -> Path:
        return ctx.state_dir / "venvs" / f"{self.params['environment']}-{fingerprint.split(':')[-1][:16]}"

    def check_outputs(self, ctx: BuildContext, outputs: dict) -> str | None:
        root = ctx.project.root / outputs["dir"]
        if not (root / MARKER).is_file():
            return f"output {outputs['dir']} missing"
        if not os.path.exists(root / outputs["python"]):
            return f"output {outputs['dir']}/{outputs['python']} missing"
        return None

    def run(self, ctx: BuildContext, upstream: dict, fingerprint: str) -> dict:
        env = self._env(ctx)
        project = ctx.project
        final = self._dir(ctx, fingerprint)
        final.parent.mkdir(parents=True, exist_ok=True)
        fsutil.remove_stale_staging(final.parent)
        marker = hash_json({"fingerprint": fingerprint})
        if final.exists():
            try:
                if (final / MARKER).read_text() == marker:
                    # Complete (its record was lost, e.g. by mlbuild clean), and a
                    # running service may use it: keep it.
                    return self._outputs(ctx, final)
            except OSError:
                pass
            shutil.rmtree(final)  # unfinished
        lock = project.path(upstream[f"lock:{env.name}"]["file"])
        # A conda prefix is made in place (see the module doc), a venv beside it.
        stage = final if env.kind == "conda" else fsutil.staging_dir(final)
        log_path = ctx.state_dir / "logs" / f"venv-{env.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        uv = uv_bin()
        python = env.python or sys.executable
        run_env = uv_env(VIRTUAL_ENV="")
        in_venv = ["--python", str(stage / "bin" / "python")]
        if env.kind == "conda":
            from mlbuild.backends import conda

            pip_lock = log_path.with_name(f"venv-{env.name}.pip.lock.txt")
            pip_section = conda.pip_requirements(lock)
            pip_lock.write_text(pip_section)
            commands = [[sys.executable, "-m", "mlbuild.backends.conda", "install", str(lock),
                         str(stage), "--platform", "linux-64",
                         "--cache-dir", str(ctx.state_dir / "conda-pkgs")],
                        [uv, "pip", "install", *in_venv, "--require-hashes", "--no-deps",
                         "-r", str(pip_lock)],
                        [uv, "pip", "install", *in_venv, *self._requirements(ctx)]]
            if not pip_section:
                del commands[1]
        else:
            commands = [[uv, "venv", "--quiet", "--python", python, str(stage)],
                        [uv, "pip", "install", *in_venv, "--require-hashes", "--no-deps",
                         "-r", str(lock)],
                        [uv, "pip", "install", *in_venv, *self._requirements(ctx)]]
        try:
            with open(log_path, "w", encoding="utf-8") as log:
                for cmd in commands:
                    log.write("$ " + " ".join(cmd) + "\n")
                    log.flush()
                    rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=run_env).returncode
                    if rc != 0:
                        lines = log_path.read_text(errors="replace").splitlines()[-15:]
                        if cmd[1] == "venv":
                            what = f"no Python {python} found (uv exit {rc})"
                            hint = (f"install Python {python}, or drop "
                                    f"environments.{env.name}.python")
                        elif cmd[0] == sys.executable:
                            what = ("installing the conda packages (mlbuild's py-rattler "
                                    f"installer) failed (exit {rc})")
                            hint = ("if py-rattler is missing: pip install 'mlbuild[conda]'; "
                                    "otherwise see the log above")
                        else:
                            what = f"installing the packages failed (uv exit {rc})"
                            hint = "fix the environment's requirements and deploy again"
                        raise StepFailed(self.id, f"{what}; last lines of "
                                         f"{os.path.relpath(log_path, project.root)}:\n    "
                                         + "\n    ".join(lines), hint=hint)
            (stage / MARKER).write_text(marker)
            if stage != final:
                os.rename(stage, final)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        self._prune(ctx, keep=final)
        return self._outputs(ctx, final)

    def _outputs(self, ctx: BuildContext, final: Path) -> dict:
        version = subprocess.run([str(final / "bin" / "python"), "-c",
                                  "import sys; print(sys.version.split()[0])"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        return {"dir": os.path.relpath(final, ctx.project.root).replace(os.sep, "/"),
                "python": "bin/python", "python_version": version}

    def _prune(self, ctx: BuildContext, keep: Path) -> None:
        """Remove this environment's older venvs that no deployment uses."""
        in_use = {d.get("venv") for d in ctx.db.deployments().values()}
        prefix = f"{self.params['environment']}-"
        for p in keep.parent.iterdir():
            rel = os.path.relpath(p, ctx.project.root).replace(os.sep, "/")
            if p != keep and p.name.startswith(prefix) and len(p.name) == len(keep.name) \
                    and rel not in in_use:
                shutil.rmtree(p, ignore_errors=True)

    def identity(self, outputs: dict):
        return [outputs["dir"], outputs["python_version"]]

    def summary(self, outputs: dict) -> str:
        return f"Python {outputs['python_version']} in {outputs['dir']}"
