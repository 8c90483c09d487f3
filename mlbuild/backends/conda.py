"""conda environments: locked with conda-lock, installed from the lock with py-rattler.

This module knows conda specs (``environment.yml``), conda-lock and its lock file; it
knows nothing of manifests, steps or fingerprints. The graph's ``lock`` step for a
conda environment calls it with paths it computed itself.

    environment.yml ──lock()──▶ conda-lock.yml ──install_locked()──▶ prefix
                      │                   ├─ locked_packages(): name, version, url, hashes
                      │                   ├─ pip_requirements(): the pip section, hashed
                      │                   └─ install_text(): what gets installed, alone
                      └─ find_solver(): micromamba / mamba / conda

Locking
    :func:`lock` runs the real conda-lock (``python -m conda_lock``, or a
    ``conda-lock`` on PATH) as a subprocess, for the given platforms (default
    linux-64), and writes ``conda-lock.yml`` beside the spec. conda-lock needs a conda
    solver executable to solve the conda part: :func:`find_solver` takes the one named
    by ``MLBUILD_CONDA_EXE``, else the one the manifest configures, else the first of
    micromamba, mamba, conda on PATH. The pip section (``- pip: [...]``) is locked by
    conda-lock's own resolver (with sha256 hashes) against the Python of the conda
    solution.

    conda-lock runs on a copy of the spec in a temporary folder, and its lock is
    written there and renamed over the old one only when it succeeded: a failed lock
    leaves the committed one untouched. The previous lock is given to conda-lock (it
    keeps its other platforms and prefers its pip versions) unless ``upgrade``.
    ``metadata.sources`` in the lock names the spec by its file name.

    Azure ML v1 migration: ``azureml-defaults``, ``azureml-core`` and
    ``azureml-contrib-services`` are dropped from the pip section (the copy conda-lock
    reads), and reported in :attr:`LockResult.dropped` for the caller's notice;
    mlbuild's runtime replaces them. ``inference-schema`` stays. Lines are removed
    from the text, so comments and conda-lock's ``# [linux]`` selectors survive.

    Errors (every one an :class:`~mlbuild.errors.MlbuildError` with a hint):
    :class:`SolverNotFound` (no solver; says what to install),
    :class:`~mlbuild.errors.NotSupported` (conda-lock is not installed),
    :class:`LockFailed` (the spec does not resolve: the solver's explanation, naming
    the package and the conflict), :class:`LockFileError` (a missing, unreadable or
    foreign lock, or a platform it does not hold), :class:`HashMismatch` (a package
    file is not the one locked; names the file).

Installing a lock in the image (issue 5, "the image installs exactly the locked
packages")
    Chosen: py-rattler's installer, not micromamba. micromamba is a binary from
    GitHub / conda-forge (or the mambaorg/micromamba image), none of which this
    machine can reach, so a micromamba path could never be tested here. py-rattler is
    a wheel on PyPI (manylinux_2_17, abi3 for CPython >= 3.10, no dependencies) that
    installs in a ``docker build`` wherever pip works, and its ``install()`` is the
    linker pixi uses: noarch: python packages go to ``lib/pythonX.Y/site-packages``,
    prefixes are replaced, ``conda-meta/`` is written. The functional tests prove it:
    a lock made by the real conda-lock is installed from the local fixture channel
    into a prefix, by the installer folder alone. The installer needs the standard
    library, PyYAML, py-rattler and four files of mlbuild (:func:`installer_files`:
    this one, ``errors.py`` and two ``__init__.py``); it runs as ``python -m
    mlbuild.backends.conda install LOCK PREFIX``. (py-rattler 0.28 can crash the
    interpreter's exit after its work, so that command ends with ``os._exit``.)

    templates/Dockerfile.j2 uses it in a builder stage (``FROM base AS conda-env``),
    so neither py-rattler nor the package cache reaches the final image: pip-install
    :data:`INSTALLER_REQUIREMENTS`, copy the installer folder and the lock reduced by
    :func:`install_text`, ``install`` into /opt/conda, then the lock's pip section
    (``pip-requirements``, installed ``--require-hashes --no-deps`` by the
    environment's own pip) and the runtime's requirements. The final stage copies
    /opt/conda (the same path: prefixes were replaced for it) and puts its bin first
    on PATH. Both stages use the environment's base image (default python:3.11-slim:
    glibc for the conda packages, and a Python with pip for the installer).

    Offline (``--network none``): the context holds the locked archives
    (``conda-pkgs/``, fetched and verified by the ``wheels`` step) and the wheels of
    the installer, the pip section and the runtime; the builder installs from them
    alone (``install --packages DIR``, ``pip-requirements --wheels DIR``,
    ``pip install --no-index``).

    Hashes: py-rattler checks the sha256 of what it downloads over http(s) but not of
    file:// packages, so :func:`install_locked` checks local files itself.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from mlbuild.errors import EXIT_STEP_FAILED, InvalidInput, MlbuildError, NotSupported

# What an image's builder stage needs of mlbuild to run ``python -m
# mlbuild.backends.conda install``, relative to the mlbuild package (see installer_files).
INSTALLER_FILES = ("__init__.py", "errors.py", "backends/__init__.py", "backends/conda.py")
SOLVER_ENV = "MLBUILD_CONDA_EXE"
# A PyPI -> conda name-mapping file for conda-lock (its default is a URL on GitHub).
MAPPING_ENV = "MLBUILD_PYPI_TO_CONDA_MAPPING"
SOLVER_NAMES = ("micromamba", "mamba", "conda")
DEFAULT_PLATFORMS = ("linux-64",)
# What the image's builder stage pip-installs to run the installer (see the module doc).
INSTALLER_REQUIREMENTS = ("py-rattler>=0.28,<0.29", "pyyaml>=6")
LOCK_NAME = "conda-lock.yml"
LOCK_TIMEOUT = 900.0  # seconds conda-lock may take (a cold conda-forge solve is slow)
CONDA_LOCK_HINT = "pip install 'conda-lock>=4,<5'"
SOLVER_HINT = (f"install micromamba (https://mamba.readthedocs.io/en/latest/installation/"
               f"micromamba-installation.html), mamba or conda, and put it on PATH, or set "
               f"{SOLVER_ENV} to the solver's path")
# Replaced by mlbuild's runtime: never installed (the same list as the pip lock step's,
# mlbuild/graph/steps/lock.py).
AZUREML_REPLACED = ("azureml-defaults", "azureml-core", "azureml-contrib-services",
                    "azureml-monitoring")
_NAME_RE = re.compile(r"""^\s*['"]?([A-Za-z0-9][A-Za-z0-9._-]*)""")
_PIP_BLOCK_RE = re.compile(r"^(\s*)-\s*pip\s*:\s*(#.*)?$")
_ITEM_RE = re.compile(r"^(\s*)-\s*(\S.*)$")


class SolverNotFound(InvalidInput):
    """No conda solver executable (micromamba, mamba, conda) could be found."""


class LockFailed(MlbuildError):
    """conda-lock could not lock the spec (it does not resolve, or conda-lock broke).

    Attributes:
        platform: the platform whose conda part did not resolve, or None.
    """

    exit_code = EXIT_STEP_FAILED

    def __init__(self, message: str, hint: str | None = None, platform: str | None = None):
        super().__init__(message, hint)
        self.platform = platform


class LockFileError(InvalidInput):
    """A conda lock file is missing, unreadable, not conda-lock's format, or does not
    hold the platform asked for."""


class HashMismatch(MlbuildError):
    """A package file is not the one the lock names (its hash differs)."""

    exit_code = EXIT_STEP_FAILED


# --------------------------------------------------------------------------------------
# the solver and conda-lock


def _executable(value: str) -> str | None:
    """The path of ``value`` (a path, or a name looked up on PATH) if it can be run."""
    if os.sep in value or (os.altsep and os.altsep in value):
        p = Path(value).expanduser()
        return str(p) if p.is_file() and os.access(p, os.X_OK) else None
    return shutil.which(value)


def find_solver(configured: str | None = None) -> str:
    """The conda solver executable conda-lock should use.

    Looked for in this order: ``$MLBUILD_CONDA_EXE`` (this machine's choice wins),
    ``configured`` (the manifest's), then micromamba, mamba, conda on PATH. A value may
    be a path or a name on PATH. conda-lock picks the commands it sends by the name
    (micromamba, mamba or conda), so a wrapper should keep one of those names.

    Returns:
        The path of the executable.

    Raises:
        SolverNotFound: the variable or the configured value names nothing that can be
            run, or nothing was given and none is on PATH; the hint says what to install.
    """
    for where, value in ((SOLVER_ENV, os.environ.get(SOLVER_ENV)),
                         ("the environment's solver", configured)):
        if value:
            exe = _executable(value)
            if exe is None:
                raise SolverNotFound(f"{where} is {value!r}, which is not an executable "
                                     "file nor a command on PATH", hint=SOLVER_HINT)
            return exe
    for name in SOLVER_NAMES:
        exe = shutil.which(name)
        if exe:
            return exe
    raise SolverNotFound("conda environments need a conda solver to lock them, and none "
                         f"was found: no {SOLVER_ENV}, and no micromamba, mamba nor conda "
                         "on PATH", hint=SOLVER_HINT)


def conda_lock_command() -> list[str]:
    """The command that runs conda-lock: this Python's module, else one on PATH.

    Raises:
        NotSupported: conda-lock is not installed.
    """
    if importlib.util.find_spec("conda_lock") is not None:
        return [sys.executable, "-m", "conda_lock"]
    exe = shutil.which("conda-lock")
    if exe:
        return [exe]
    raise NotSupported("conda environments are locked with conda-lock, which is not "
                       f"installed: {CONDA_LOCK_HINT}",
                       hint=f"run {CONDA_LOCK_HINT} in the environment mlbuild runs in")


# --------------------------------------------------------------------------------------
# the spec


def canonical_name(name: str) -> str:
    """A PyPI project name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(item: str) -> str | None:
    """The project named by a requirement line (None for a blank or comment line)."""
    m = _NAME_RE.match(item.split("#", 1)[0])
    return m.group(1) if m else None


def _yaml():
    import yaml

    return yaml


def _load_yaml(text: str, what: str):
    yaml = _yaml()
    try:
        return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:
        raise InvalidInput(f"{what} is not valid YAML: {e}") from None


def _pip_items(data) -> list[str]:
    deps = data.get("dependencies") if isinstance(data, dict) else None
    items: list[str] = []
    for d in deps or []:
        if isinstance(d, dict) and isinstance(d.get("pip"), list):
            items += [str(x) for x in d["pip"]]
    return items


def filter_spec(text: str, drop: Iterable[str] = AZUREML_REPLACED,
                what: str = "the conda spec") -> tuple[str, list[str]]:
    """``text`` without the pip-section requirements naming a package in ``drop``.

    Lines are removed from the text, so comments and ``# [linux]`` selectors stay. A
    pip section written in flow style (``pip: [a, b]``) is re-written as YAML instead.

    Returns:
        The filtered text and the requirement names dropped, as written in the spec.

    Raises:
        InvalidInput: the text is not YAML.
    """
    drop_set = {canonical_name(n) for n in drop}
    data = _load_yaml(text, what)

    def dropped(item: str) -> bool:
        name = requirement_name(item)
        return name is not None and canonical_name(name) in drop_set

    names = [requirement_name(i) for i in _pip_items(data) if dropped(i)]
    if not names:
        return text, []
    out: list[str] = []
    pip_indent: int | None = None
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if pip_indent is not None and stripped and not stripped.startswith("#") \
                and indent <= pip_indent:
            pip_indent = None
        m = _PIP_BLOCK_RE.match(line)
        if m:
            pip_indent = len(m.group(1))
        elif pip_indent is not None:
            item = _ITEM_RE.match(line)
            if item and dropped(item.group(2)):
                continue
        out.append(line)
    filtered = "".join(out)
    if any(dropped(i) for i in _pip_items(_load_yaml(filtered, what))):
        # NOTE: a flow-style pip list: no line to remove. Rewrite the data (comments
        # and selectors in it are lost, which flow style rarely carries).
        for d in data.get("dependencies") or []:
            if isinstance(d, dict) and isinstance(d.get("pip"), list):
                d["pip"] = [x for x in d["pip"] if not dropped(str(x))]
        filtered = _yaml().safe_dump(data, sort_keys=False)
    return filtered, [n for n in names if n]


# --------------------------------------------------------------------------------------
# locking


@dataclass(frozen=True)
class LockResult:
    """What :func:`lock` did.

    Attributes:
        path: the lock file written.
        platforms: the platforms locked.
        dropped: pip requirements dropped by the Azure ML rule, as written in the spec
            (the caller shows a notice for each).
        packages: the number of packages locked, all platforms.
    """

    path: Path
    platforms: tuple[str, ...]
    dropped: tuple[str, ...] = ()
    packages: int = 0


def lock(spec_path: Path | str, out_path: Path | str | None = None, *,
         platforms: Sequence[str] = DEFAULT_PLATFORMS, solver: str | None = None,
         mapping: Path | str | None = None, upgrade: bool = False,
         drop: Iterable[str] = AZUREML_REPLACED, extra_args: Sequence[str] = (),
         timeout: float = LOCK_TIMEOUT, env: dict[str, str] | None = None,
         log: Callable[[str], None] | None = None, header: str = "") -> LockResult:
    """Lock a conda spec with conda-lock into ``conda-lock.yml``.

    Args:
        spec_path: the environment.yml (with an optional ``- pip:`` section).
        out_path: the lock file; default ``conda-lock.yml`` beside the spec.
        platforms: conda subdirs to lock for.
        solver: the configured solver (a path or a name on PATH), see :func:`find_solver`.
        mapping: a PyPI -> conda name-mapping file or URL (conda-lock's
            ``--pypi_to_conda_lookup_file``); default conda-lock's own (on GitHub).
        upgrade: re-solve from nothing; otherwise the previous lock (when it holds no
            other platforms) is given to conda-lock, which keeps its pip versions where
            they still fit. (conda-lock solves the conda part afresh either way, to the
            newest versions allowed; ``extra_args=["--update", NAME]`` moves NAME only,
            NAME being a package the spec names.)
        drop: pip requirements removed before locking (the Azure ML v1 rule).
        extra_args: more conda-lock ``lock`` arguments (e.g. ``--virtual-package-spec``).
        timeout: seconds conda-lock may take.
        env: the environment of conda-lock (default: this process's).
        log: called with each line conda-lock writes, for a verbose mode.
        header: a comment line written before conda-lock's lock (mlbuild records the
            spec's digest there).

    Returns:
        What was locked; ``dropped`` names the requirements the caller should report.

    Raises:
        InvalidInput: the spec is missing or not YAML.
        SolverNotFound: no solver (checked before anything runs).
        NotSupported: conda-lock is not installed.
        LockFailed: the spec does not resolve (the message is the solver's, naming the
            package and the conflict), or conda-lock failed or took too long.
    """
    from mlbuild import fsutil

    spec = Path(spec_path)
    out = Path(out_path) if out_path is not None else spec.with_name(LOCK_NAME)
    platforms = tuple(platforms)
    try:
        text = spec.read_text(encoding="utf-8")
    except OSError as e:
        raise InvalidInput(f"cannot read the conda spec {spec}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise InvalidInput(f"the conda spec {spec} is not UTF-8 text ({e.reason} at byte "
                           f"{e.start})", hint=f"save {spec} as UTF-8") from None
    filtered, dropped = filter_spec(text, drop, what=str(spec))
    solver_exe = find_solver(solver)
    command = conda_lock_command()

    with tempfile.TemporaryDirectory(prefix="mlbuild-conda-lock-") as tmp:
        tmp_spec = Path(tmp) / spec.name
        tmp_spec.write_text(filtered, encoding="utf-8")
        tmp_lock = Path(tmp) / out.name
        if not upgrade and out.exists() and _platforms_within(out, platforms):
            shutil.copyfile(out, tmp_lock)
        args = [*command, "lock", "--conda", solver_exe, "--kind", "lock",
                "--file", str(tmp_spec), "--lockfile", str(tmp_lock)]
        for p in platforms:
            args += ["--platform", p]
        if mapping is not None:
            args += ["--pypi_to_conda_lookup_file", str(mapping)]
        args += list(extra_args)
        try:
            # cwd: conda-lock reads virtual-packages.yml from there, as when it is run
            # by hand beside the spec.
            r = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                               cwd=spec.parent if spec.parent.is_dir() else None,
                               env=env, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise LockFailed(f"conda-lock did not finish locking {spec} within "
                             f"{timeout:.0f} s", hint="check the channels can be reached, "
                             "or lock by hand with conda-lock to see where it waits") from None
        if log is not None:
            for line in (r.stdout + r.stderr).splitlines():
                log(line)
        if r.returncode != 0 or not tmp_lock.exists():
            message, platform = explain_failure(r.stderr, r.stdout)
            raise LockFailed(f"cannot lock {spec}: {message}", platform=platform,
                             hint=f"fix the requirement named above in {spec.name}, then "
                                  "lock again")
        data = tmp_lock.read_bytes()
    fsutil.write_atomic(out, header.encode() + data)
    count = len(_read_lock(out).get("package") or [])
    return LockResult(out, platforms, tuple(dropped), count)


def _platforms_within(lock_path: Path, platforms: tuple[str, ...]) -> bool:
    """Does the lock hold no platform beyond ``platforms``? (conda-lock keeps the
    packages of every platform it is not asked to lock: a platform dropped from the
    manifest would stay in the lock, stale.)"""
    try:
        held = _read_lock(lock_path)["metadata"]["platforms"]
    except (LockFileError, InvalidInput, KeyError, TypeError):
        return False
    return set(held) <= set(platforms)


_MAMBA_HEADLINE = "Could not solve for environment specs"
_LIBMAMBA_RE = re.compile(r"^(?:error|critical|warning|info)\s+libmamba\s*")
_PIP_FAILURE_RE = re.compile(
    r"^[\w.]*(?:SolverProblemError|SolveFailureError|PackageNotFoundError): (.*)$")
_EXCEPTION_RE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Exit)\b:? ?(.*)$")


def explain_failure(stderr: str, stdout: str = "") -> tuple[str, str | None]:
    """The reason conda-lock gave for failing, without its traceback.

    conda's failed solves are reported by conda-lock as "Could not lock the environment
    for platform P", the solver's JSON message, and the solver's own output (which for
    micromamba/mamba explains the conflict, package by package); a pip section that
    does not resolve ends in poetry's SolverProblemError ("Because ... depends on X
    (>=99) which doesn't match any versions").

    Returns:
        The explanation (several lines), and the platform it concerns (or None).
    """
    lines = stderr.splitlines()
    head = next((i for i, ln in enumerate(lines)
                 if ln.startswith("Could not lock the environment for platform ")), None)
    if head is not None:
        platform = lines[head].rsplit(" ", 1)[-1]
        rest = lines[head + 1:]
        detail: list[str] = []
        if "    STDERR:" in rest:
            for line in rest[rest.index("    STDERR:") + 1:]:
                if line.startswith("Traceback (most recent call last)"):
                    break
                line = _LIBMAMBA_RE.sub("", line.rstrip())
                if line.strip() and line not in detail and line != _MAMBA_HEADLINE:
                    detail.append(line)
        if not any(ln.startswith((" ", "\t")) for ln in detail):
            # conda's explanation is its JSON "message", which conda-lock printed first.
            end = next((i for i, ln in enumerate(rest) if ln.startswith("    Command:")),
                       len(rest))
            detail = [ln.rstrip() for ln in rest[:end] if ln.strip()] or detail
        return (f"the conda packages do not resolve for {platform}:\n"
                + _indent(detail)), platform
    for line in reversed(lines):
        m = _PIP_FAILURE_RE.match(line)
        if m:
            reason = m.group(1).replace("-dummy-package- depends on",
                                        "the pip section asks for")
            return f"the pip section does not resolve:\n    {reason}", None
    if any("Got pip specs without Python" in ln for ln in lines):
        return ("the spec has a pip section but no python among its conda "
                "dependencies: add python (e.g. python=3.11)"), None
    tail = _last_exception(lines) or [ln for ln in lines if ln.strip()][-12:] \
        or [ln for ln in stdout.splitlines() if ln.strip()][-12:]
    return "conda-lock failed:\n" + _indent(tail), None


def _last_exception(lines: list[str]) -> list[str]:
    """The message of the last exception of a traceback, with its continuation lines."""
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("Traceback (most recent call last)"):
            for j in range(i + 1, len(lines)):
                if not lines[j].startswith(" ") and _EXCEPTION_RE.match(lines[j]):
                    return [ln for ln in lines[j:] if ln.strip()][:12]
            return []
    return []


def _indent(lines: list[str]) -> str:
    width = min((len(ln) - len(ln.lstrip()) for ln in lines if ln.strip()), default=0)
    return "\n".join("    " + ln[width:] for ln in lines)


# --------------------------------------------------------------------------------------
# reading a lock


@dataclass(frozen=True)
class LockedPackage:
    """One package of a conda lock, for one platform.

    Attributes:
        manager: ``conda`` or ``pip``.
        url: where the archive (conda) or the wheel/sdist (pip) is downloaded from.
        md5: hex digest, or "" (pip packages carry only sha256).
        sha256: hex digest, or "" (old conda channels carry only md5).
        dependencies: name -> version constraint, as the lock records them.
    """

    name: str
    version: str
    url: str
    sha256: str
    md5: str
    manager: str = "conda"
    dependencies: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def filename(self) -> str:
        """The archive's file name (the last part of its URL)."""
        return unquote(PurePosixPath(urlsplit(self.url).path).name)


def _read_lock(lock_path: Path | str) -> dict:
    path = Path(lock_path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LockFileError(f"{path} does not exist",
                            hint="lock the environment first (mlbuild lock)") from None
    except OSError as e:
        raise LockFileError(f"cannot read {path}: {e.strerror or e}") from None
    data = _load_yaml(text, str(path))
    if not isinstance(data, dict) or data.get("version") != 1 \
            or not isinstance(data.get("package"), list):
        raise LockFileError(f"{path} is not a conda-lock.yml of version 1",
                            hint=f"delete {path.name} and lock again (mlbuild lock)")
    return data


def locked_packages(lock_path: Path | str, platform: str = "linux-64",
                    manager: str | None = None) -> list[LockedPackage]:
    """The packages ``lock_path`` locks for ``platform``, in the lock's order (conda
    packages first, then the pip section's).

    Args:
        manager: only ``conda`` or only ``pip`` packages; default both.

    Raises:
        LockFileError: the lock is missing, not conda-lock's format, or has no packages
            for ``platform``.
    """
    data = _read_lock(lock_path)
    platforms = (data.get("metadata") or {}).get("platforms") or sorted(
        {p.get("platform") for p in data["package"] if isinstance(p, dict)})
    if platform not in platforms:
        raise LockFileError(f"{lock_path} has no packages for {platform} "
                            f"(it locks {', '.join(map(str, platforms)) or 'nothing'})",
                            hint=f"add {platform} to the environment's platforms and lock "
                                 "again (mlbuild lock)")
    out = []
    for p in data["package"]:
        if not isinstance(p, dict) or p.get("platform") != platform:
            continue
        if manager is not None and p.get("manager") != manager:
            continue
        hashes = p.get("hash") or {}
        out.append(LockedPackage(
            name=str(p["name"]), version=str(p["version"]), url=str(p["url"]),
            sha256=str(hashes.get("sha256") or ""), md5=str(hashes.get("md5") or ""),
            manager=str(p.get("manager", "conda")),
            dependencies={str(k): str(v) for k, v in (p.get("dependencies") or {}).items()}))
    return out


def python_version(lock_path: Path | str, platform: str = "linux-64") -> str | None:
    """The ``X.Y`` of the lock's ``python`` package for ``platform`` (None without one)."""
    for p in locked_packages(lock_path, platform, manager="conda"):
        if p.name == "python":
            return ".".join(p.version.split(".")[:2])
    return None


def install_text(lock_path: Path | str, platform: str | None = None) -> str:
    """The lock reduced to what gets installed: its packages and channels, without the
    spec's content hash nor its file name.

    The file to put in an image's build context: a spec edit that locks the same
    packages gives the same bytes, so the environment layer is not rebuilt.
    :func:`install_locked` and :func:`pip_requirements` read it like the full lock.

    Args:
        platform: keep this platform's packages only (an image's: a change on another
            platform then leaves its environment layer alone).
    """
    data = _read_lock(lock_path)
    meta = data.get("metadata") or {}
    packages = [p for p in data["package"]
                if platform is None or (isinstance(p, dict) and p.get("platform") == platform)]
    platforms = [platform] if platform is not None else meta.get("platforms") or []
    reduced = {"version": 1,
               "metadata": {"channels": meta.get("channels") or [], "platforms": platforms},
               "package": packages}
    return ("# The packages of a conda-lock.yml, as mlbuild installs them.\n"
            + _yaml().safe_dump(reduced, sort_keys=True, default_flow_style=False))


def pip_requirements(lock_path: Path | str, platform: str = "linux-64",
                     wheels: Path | str | None = None) -> str:
    """The pip section of a lock as a requirements file for ``pip install
    --require-hashes --no-deps``: one ``name @ url --hash=sha256:...`` line each.

    Args:
        wheels: a folder holding the files (offline); the lines point there instead.

    Raises:
        LockFileError: as :func:`locked_packages`, or a pip package without a sha256.
    """
    lines = []
    for p in locked_packages(lock_path, platform, manager="pip"):
        if not p.sha256:
            raise LockFileError(f"{lock_path}: the pip package {p.name} {p.version} has no "
                                "sha256", hint="lock again (mlbuild lock --upgrade)")
        url = (Path(wheels).resolve() / p.filename).as_uri() if wheels else p.url
        lines.append(f"{p.name} @ {url} --hash=sha256:{p.sha256}\n")
    return "".join(lines)


# --------------------------------------------------------------------------------------
# installing a lock (inside the image: standard library, PyYAML and py-rattler only)


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, pkg: LockedPackage) -> None:
    """Check a local archive against the lock's hash (sha256, else md5).

    Raises:
        HashMismatch: the file differs from the locked one; names the file.
        LockFileError: the file is missing, or the lock records no hash for it.
    """
    if not path.is_file():
        raise LockFileError(f"{path} is missing ({pkg.name} {pkg.version} of the lock)")
    algorithm, want = ("sha256", pkg.sha256) if pkg.sha256 else ("md5", pkg.md5)
    if not want:
        raise LockFileError(f"the lock records no hash for {pkg.filename}",
                            hint="lock again (mlbuild lock --upgrade)")
    got = file_digest(path, algorithm)
    if got != want:
        raise HashMismatch(f"{path}: {algorithm} {got} is not the locked {want} "
                           f"({pkg.name} {pkg.version})",
                           hint="the file changed since it was locked: delete it and fetch "
                                "it again, or lock again if the channel replaced it")


def _local_path(url: str) -> Path | None:
    parts = urlsplit(url)
    return Path(unquote(parts.path)) if parts.scheme == "file" else None


def _record(pkg: LockedPackage, url: str):
    """A py-rattler RepoDataRecord for a locked conda package (build string, build
    number and subdir come from the archive's file name and URL, as conda-lock's own
    ``fake_conda_environment`` derives them)."""
    from rattler import BuildString, PackageRecord, RepoDataRecord

    path = PurePosixPath(urlsplit(pkg.url).path)
    stem = pkg.filename.removesuffix(".conda").removesuffix(".tar.bz2")
    build = stem.rsplit("-", 1)[-1]
    try:
        build_number = int(build.rsplit("_", 1)[-1])
    except ValueError:
        build_number = 0
    record = PackageRecord(
        name=pkg.name, version=pkg.version, build=BuildString(build),
        build_number=build_number, subdir=path.parent.name,
        depends=[f"{k} {v}".strip() for k, v in pkg.dependencies.items()],
        md5=bytes.fromhex(pkg.md5) if pkg.md5 else None,
        sha256=bytes.fromhex(pkg.sha256) if pkg.sha256 else None)
    channel = pkg.url.rsplit("/", 2)[0]
    return RepoDataRecord(record, pkg.filename, url, channel)


def install_locked(lock_path: Path | str, prefix: Path | str, platform: str = "linux-64",
                   *, packages_dir: Path | str | None = None,
                   cache_dir: Path | str | None = None) -> list[LockedPackage]:
    """Install exactly the conda packages a lock names for ``platform`` into ``prefix``
    with py-rattler (the pip section is :func:`pip_requirements`' job).

    Args:
        packages_dir: read every archive from this folder (offline) instead of its URL.
        cache_dir: py-rattler's package cache (default: its own, under ~/.cache).

    Returns:
        The conda packages installed.

    Raises:
        LockFileError: as :func:`locked_packages`, or a package missing from
            ``packages_dir``.
        HashMismatch: a local archive differs from the locked one.
        NotSupported: py-rattler is not installed.
        MlbuildError: py-rattler failed (a download, a link).
    """
    import asyncio

    try:
        import rattler
    except ImportError:
        raise NotSupported("installing a conda lock needs py-rattler: pip install "
                           "'py-rattler>=0.28'") from None
    pkgs = locked_packages(lock_path, platform, manager="conda")
    records = []
    for pkg in pkgs:
        url = pkg.url
        local = Path(packages_dir) / pkg.filename if packages_dir else _local_path(url)
        if local is not None:
            verify(local, pkg)  # py-rattler checks downloads, not file:// packages
            url = local.resolve().as_uri()
        records.append(_record(pkg, url))
    try:
        asyncio.run(rattler.install(records, Path(prefix), platform=rattler.Subdir(platform),
                                    cache_dir=Path(cache_dir) if cache_dir else None,
                                    show_progress=False))
    except Exception as e:  # py-rattler's exceptions share no public base class
        raise MlbuildError(f"installing {lock_path} into {prefix} failed: {e}") from None
    return pkgs


def installer_files() -> list[tuple[str, Path]]:
    """The files of the image-side installer as ``(path under an installer folder,
    source path)``: with that folder on PYTHONPATH, ``python -m mlbuild.backends.conda``
    runs with PyYAML and py-rattler as its only other requirements."""
    import mlbuild

    pkg = Path(mlbuild.__file__).parent
    return [(f"mlbuild/{rel}", pkg / rel) for rel in INSTALLER_FILES]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mlbuild.backends.conda install LOCK PREFIX [--platform P]
    [--packages DIR]`` and ``pip-requirements LOCK [--platform P] [--wheels DIR]``:
    what an image's build runs."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mlbuild.backends.conda")
    sub = parser.add_subparsers(dest="command", required=True)
    inst = sub.add_parser("install", help="install a lock's conda packages into a prefix")
    inst.add_argument("lock")
    inst.add_argument("prefix")
    inst.add_argument("--platform", default="linux-64")
    inst.add_argument("--packages", help="folder holding every locked archive (offline)")
    inst.add_argument("--cache-dir")
    pipr = sub.add_parser("pip-requirements", help="print the lock's pip section, hashed")
    pipr.add_argument("lock")
    pipr.add_argument("--platform", default="linux-64")
    pipr.add_argument("--wheels", help="folder holding every locked wheel (offline)")
    args = parser.parse_args(argv)
    try:
        if args.command == "install":
            pkgs = install_locked(args.lock, args.prefix, args.platform,
                                  packages_dir=args.packages, cache_dir=args.cache_dir)
            print(f"installed {len(pkgs)} conda packages into {args.prefix}")
        else:
            sys.stdout.write(pip_requirements(args.lock, args.platform, args.wheels))
    except MlbuildError as e:
        print(f"error: {e}" + (f"\nhint: {e.hint}" if e.hint else ""), file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # NOTE: not sys.exit: py-rattler 0.28's runtime threads can crash the interpreter's
    # finalization (SIGSEGV/SIGABRT) after an install, which would fail a docker build
    # that succeeded.
    os._exit(code)
