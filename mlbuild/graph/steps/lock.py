"""``lock`` steps: an environment resolved to exact versions with hashes.

    lock:sklearn ──▶ context:diabetes ──▶ image / package / process

The lock file lives beside its spec and is committed with it:

    envs/requirements.txt   →  envs/requirements.lock.txt
    packages: [...]         →  locks/<env>.lock.txt    (an inline environment, and the
                                                        default one of no-code services)

It is made by ``uv pip compile --generate-hashes`` for the environment's Python
(``python:``, default 3.11, the default base image's) on Linux, and starts with a
line recording the digest of the spec it was made from. The step re-locks only when
the spec (or the Python) changed; the existing lock is given to uv as the preference,
so versions move only where the spec made them. ``mlbuild lock --upgrade`` moves
everything to the newest allowed. ``--frozen`` (CI) never writes a lock: a lock that
does not match its spec is an error saying to run ``mlbuild lock``.

A conda environment (``conda: environment.yml``, with an optional ``- pip:`` section)
is locked by the real conda-lock (:mod:`mlbuild.backends.conda`) for its
``platforms`` (default linux-64) into ``conda-lock.yml`` beside the spec
(``<stem>.conda-lock.yml`` for a spec not named environment.yml), with the same kind
of first line. The solver is ``$MLBUILD_CONDA_EXE``, else the environment's
``solver:``, else micromamba/mamba/conda on PATH; ``$MLBUILD_PYPI_TO_CONDA_MAPPING``
names a PyPI -> conda name-mapping file for networks where conda-lock's default (on
GitHub) is unreachable. Its identity is :func:`mlbuild.backends.conda.install_text`:
the packages alone.

Azure ML v1 migration: ``azureml-defaults``, ``azureml-core`` and
``azureml-contrib-services`` are dropped before locking, with a notice — mlbuild's
runtime replaces them (``inference-schema`` stays).

The lock is what the image and the process target's venv install
(``--require-hashes --no-deps``), and what downstream steps depend on: a spec edit
that resolves to the same lock rebuilds nothing.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

from mlbuild import fsutil
from mlbuild.errors import InvalidInput, StepFailed
from mlbuild.graph.step import BuildContext, Step
from mlbuild.state.digest import hash_bytes

DEFAULT_PYTHON = "3.11"
PLATFORM = "linux"
HEADER = "# mlbuild lock: spec {spec}; python {python}; platform {platform}\n"
_HEADER_RE = re.compile(r"^# mlbuild lock: spec (\S+); python (\S+); platform (\S+)$")
_PIN_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s\\;]+)", re.M)


CONDA_HEADER = "# mlbuild lock: spec {spec}; platforms {platforms}\n"


def lock_path(env) -> str:
    """The lock file of an environment, relative to the project."""
    if env.conda:
        folder, _, name = env.conda.rpartition("/")
        stem = name.rsplit(".", 1)[0]
        lock = "conda-lock.yml" if stem == "environment" else f"{stem}.conda-lock.yml"
        return f"{folder}/{lock}" if folder else lock
    if env.requirements:
        spec = env.requirements
        stem = spec[:-4] if spec.endswith(".txt") else spec
        return f"{stem}.lock.txt"
    return f"locks/{env.name}.lock.txt"


def spec_lines(ctx: BuildContext, env) -> tuple[list[str], list[str]]:
    """The requirement lines to lock, and the Azure ML packages dropped from them."""
    # One list and one reading of a requirement for pip and conda specs.
    from mlbuild.backends.conda import AZUREML_REPLACED, canonical_name, requirement_name

    if env.requirements:
        lines = read_text(ctx.project.path(env.requirements), env.requirements,
                          f"environments.{env.name}.requirements").splitlines()
    else:
        lines = list(env.packages)
    kept, dropped = [], []
    for line in lines:
        name = requirement_name(line)
        if name is not None and canonical_name(name) in AZUREML_REPLACED:
            dropped.append(name)
        else:
            kept.append(line)
    return kept, dropped


def read_text(path: Path, shown: str, what: str) -> str:
    """A requirements or lock file's text: UTF-8, what uv reads.

    Args:
        shown: the path to name in errors; what: what the file is (the manifest field).

    Raises:
        InvalidInput: it cannot be read, or is not UTF-8 (naming the line).
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InvalidInput(f"{what}: cannot read {shown}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InvalidInput(
            f"{what}: {shown} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}): "
            "mlbuild reads requirement files as UTF-8",
            hint=f"save {shown} as UTF-8 (e.g. iconv -f LATIN1 -t UTF-8), or remove the "
            "character") from None


def first_line(path: Path) -> str | None:
    try:
        # (errors replaced: a line that is not UTF-8 is no mlbuild header, and the
        # whole file says so when it is read)
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.readline()
    except OSError:
        return None


def read_header(path: Path) -> tuple[str, str, str] | None:
    m = _HEADER_RE.match((first_line(path) or "").rstrip("\n"))
    return (m.group(1), m.group(2), m.group(3)) if m else None


class ResolveError(Exception):
    """The requirements do not resolve; the message is the resolver's explanation."""


def resolve(lines: list[str], python: str, platform: str, cwd: Path,
            previous: str | None, upgrade: bool) -> str:
    """Pin ``lines`` with hashes (uv pip compile); returns the lock's body.

    Args:
        cwd: the folder relative ``-r``/``-c`` lines are resolved against.
        previous: the current lock, whose versions are kept where they still fit.

    Raises:
        ResolveError: no solution, naming the requirement at fault.
    """
    from mlbuild.graph.steps.venv import uv_bin, uv_env

    with tempfile.TemporaryDirectory() as tmp:
        spec_file = Path(tmp) / "requirements.in"
        spec_file.write_text("\n".join(lines) + "\n")
        out = Path(tmp) / "lock.txt"
        if previous is not None:
            out.write_text(previous)  # uv keeps the versions it pins where they still fit
        cmd = [uv_bin(), "pip", "compile", "--quiet", "--generate-hashes", "--no-header",
               "--no-annotate", "--python-version", python, "--python-platform", platform,
               str(spec_file), "-o", str(out)]
        if upgrade:
            cmd.append("--upgrade")
        run_env = uv_env()
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=run_env,
                           stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise ResolveError("\n    ".join((r.stderr or r.stdout).strip().splitlines()[-12:]))
        return out.read_text()


class LockStep(Step):
    kind = "lock"
    version = 1

    def _env(self, ctx: BuildContext):
        return ctx.project.environments[self.params["environment"]]

    def _python(self, env) -> str:
        return env.python or DEFAULT_PYTHON

    def config(self, ctx: BuildContext) -> dict:
        env = self._env(ctx)
        return {f"environments.{env.name}": env.config()}

    def inputs(self, ctx: BuildContext) -> dict[str, str]:
        # The spec only: the lock file is this step's output (check_outputs notices
        # when it changes, e.g. a teammate's lock arriving with git pull).
        env = self._env(ctx)
        if env.spec_file:
            return {env.spec_file: ctx.digests.file(ctx.project.path(env.spec_file))}
        return {}

    def check_outputs(self, ctx: BuildContext, outputs: dict) -> str | None:
        lock = ctx.project.path(outputs["file"])
        try:
            if ctx.digests.file(lock) != outputs["digest"]:
                return f"{outputs['file']} was changed"
        except OSError:
            return f"{outputs['file']} missing"
        return None

    def spec_digest(self, ctx: BuildContext, env) -> str:
        if env.conda:  # line endings as git may check them out (CRLF) do not count
            text = ctx.project.path(env.conda).read_bytes().replace(b"\r\n", b"\n")
        else:
            text = "\n".join(spec_lines(ctx, env)[0]).encode()
        return hash_bytes(text).split(":")[-1][:16]

    def _refuse_frozen(self, env, rel: str, lock: Path):
        what = "is missing" if not lock.exists() else "does not match its spec"
        spec = env.spec_file or ("no-code default" if env.default_for else "packages")
        raise StepFailed(self.id, f"{rel} {what} ({spec})",
                         hint=f"run mlbuild lock {env.name} and commit {rel}")

    def _run_conda(self, ctx: BuildContext, env) -> dict:
        from mlbuild.backends import conda

        rel = lock_path(env)
        lock = ctx.project.path(rel)
        header = CONDA_HEADER.format(spec=self.spec_digest(ctx, env),
                                     platforms=",".join(sorted(env.platforms)))
        upgrade = bool(ctx.options.get("upgrade"))
        if first_line(lock) == header and not upgrade:
            return self._outputs(ctx, rel, lock, "up to date with its spec", env)
        if ctx.options.get("frozen"):
            self._refuse_frozen(env, rel, lock)
        ctx.log(f"  locking     {env.conda} with conda-lock for {', '.join(env.platforms)}")
        try:
            result = conda.lock(ctx.project.path(env.conda), lock, platforms=env.platforms,
                                solver=env.solver, upgrade=upgrade, header=header,
                                mapping=os.environ.get(conda.MAPPING_ENV) or None)
        except conda.LockFailed as e:
            raise StepFailed(self.id, f"environment {env.name} does not resolve "
                                      f"({env.conda}): {e}", hint=e.hint) from None
        for name in result.dropped:
            ctx.log(f"  notice      {name} dropped from environment {env.name}: mlbuild's "
                    "runtime replaces it")
        return self._outputs(ctx, rel, lock, "upgraded" if upgrade else "locked", env)

    def run(self, ctx: BuildContext, upstream: dict, fingerprint: str) -> dict:
        env = self._env(ctx)
        if env.conda:
            return self._run_conda(ctx, env)
        project = ctx.project
        rel = lock_path(env)
        lock = project.path(rel)
        python = self._python(env)
        kept, dropped = spec_lines(ctx, env)
        spec = self.spec_digest(ctx, env)
        want = (spec, python, PLATFORM)
        upgrade = bool(ctx.options.get("upgrade"))
        if read_header(lock) == want and not upgrade:
            return self._outputs(ctx, rel, lock, "up to date with its spec")
        if ctx.options.get("frozen"):
            self._refuse_frozen(env, rel, lock)
        for name in dropped:
            ctx.log(f"  notice      {name} dropped from environment {env.name}: mlbuild's "
                    "runtime replaces it")
        cwd = project.path(env.requirements).parent if env.requirements else project.root
        previous = read_text(lock, rel, f"the lock of environments.{env.name}") \
            if lock.exists() and not upgrade else None
        try:
            body = resolve(kept, python, PLATFORM, cwd, previous, upgrade)
        except ResolveError as e:
            shown = env.requirements or "packages"
            hint = "fix the requirement named above and deploy again"
            if env.default_for:  # not written by the user: say what it holds, and why
                shown = f"no-code default: {', '.join(env.packages)}"
            if env.default_for == "scikit-learn":
                hint = ("set framework_version of the no-code scikit-learn models to a "
                        "released version (or give their services an environment)")
            raise StepFailed(self.id, f"environment {env.name} does not resolve ({shown}):"
                                      f"\n    {e}", hint=hint) from None
        fsutil.write_atomic(lock, HEADER.format(spec=spec, python=python, platform=PLATFORM)
                            + body)
        return self._outputs(ctx, rel, lock, "upgraded" if upgrade else "locked")

    def _outputs(self, ctx: BuildContext, rel: str, lock: Path, how: str, env=None) -> dict:
        if env is not None and env.conda:
            from mlbuild.backends import conda

            body = conda.install_text(lock)
            pins = len(conda.locked_packages(lock, "linux-64"))
        else:
            text = read_text(lock, rel, f"the lock of environments.{self._env(ctx).name}")
            body = packages_of(text)
            pins = len(pins_of(text))
        return {"file": rel, "digest": ctx.digests.file(lock), "pins": pins, "how": how,
                "packages_digest": hash_bytes(body.encode())}

    def identity(self, outputs: dict):
        # What gets installed, not the header: a spec edit that resolves to the same
        # packages changes nothing downstream.
        return outputs["packages_digest"]

    def summary(self, outputs: dict) -> str:
        return f"{outputs['file']}: {outputs['pins']} packages pinned with hashes ({outputs['how']})"


def pins_of(text: str) -> list[str]:
    """The ``name==version`` of every package a pip lock pins (extras left out)."""
    return [f"{m.group(1)}=={m.group(2)}" for m in _PIN_RE.finditer(text)]


def packages_of(text: str) -> str:
    """A lock file's text without its header: what gets installed."""
    return text.partition("\n")[2] if text.startswith("# mlbuild lock:") else text
