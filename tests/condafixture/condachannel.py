"""A local conda channel of tiny hand-made noarch packages, for tests without a network.

No conda channel is reachable from the test machines, so the tests make their own::

    <root>/channel/noarch/python-3.11.0-0.tar.bz2        a stand-in, no interpreter (or,
                                                          with python=, a venv-style
                                                          link to a real one)
    <root>/channel/noarch/pip-24.0-pyhd8ed1ab_0.tar.bz2   a stand-in (conda-lock adds
                                                          pip when a spec has a pip
                                                          section)
    <root>/channel/noarch/tinydep-0.1-pyhd8ed1ab_0.tar.bz2
    <root>/channel/noarch/tinydep-0.2-pyhd8ed1ab_0.tar.bz2
    <root>/channel/noarch/tinypkg-1.0-pyhd8ed1ab_0.tar.bz2   depends tinydep >=0.1
    <root>/channel/noarch/tinypkg-1.1-pyhd8ed1ab_0.tar.bz2   depends tinydep >=0.2
    <root>/channel/noarch/repodata.json                   written by rattler's indexer
    <root>/channel/linux-64/repodata.json                 (empty: solvers want the
                                                          platform's subdir too)
    <root>/pypi-mapping.json                              PyPI name -> conda name

The archives are deterministic (fixed mtimes, sorted members), so a package's sha256 is
the same on every run and machine: tests may compare the lock's hashes with
:func:`file_hashes` of the archive.

:func:`make_channel` builds all of it; :data:`PACKAGES` says what is in it.
"""

from __future__ import annotations

import asyncio
import bz2
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

# 2024-01-01T00:00:00Z: every archive member and every index.json carries it.
EPOCH = 1704067200
# The names conda-lock asks the mapping for; every other name maps to itself.
PYPI_MAPPING = {
    name: {"conda_name": name, "conda_forge": name, "pypi_name": name}
    for name in ("pip", "six", "tinypkg", "tinydep")
}


@dataclass(frozen=True)
class Package:
    """One package of the fixture channel.

    Attributes:
        files: relative path in the prefix (site-packages/ for ``noarch: python``)
            -> text content.
    """

    name: str
    version: str
    build: str = "pyhd8ed1ab_0"
    noarch: str = "python"
    depends: tuple[str, ...] = ()
    files: dict[str, str] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)  # path -> symlink target

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.version}-{self.build}.tar.bz2"


def _module(name: str, version: str) -> dict[str, str]:
    return {f"site-packages/{name}/__init__.py": f'__version__ = "{version}"\n'}


PACKAGES: tuple[Package, ...] = (
    # Not an interpreter: conda-lock needs a ``python`` in the solution to lock a pip
    # section (its version picks the wheels), and noarch: python packages depend on it.
    Package("python", "3.11.0", build="0", noarch="generic",
            files={"share/python-stand-in/README": "a test stand-in, no interpreter\n"}),
    Package("pip", "24.0", depends=("python >=3.7",), files=_module("pip", "24.0")),
    Package("tinydep", "0.1", depends=("python >=3.8",), files=_module("tinydep", "0.1")),
    Package("tinydep", "0.2", depends=("python >=3.8",), files=_module("tinydep", "0.2")),
    Package("tinypkg", "1.0", depends=("python >=3.8", "tinydep >=0.1"),
            files=_module("tinypkg", "1.0")),
    Package("tinypkg", "1.1", depends=("python >=3.8", "tinydep >=0.2"),
            files=_module("tinypkg", "1.1")),
)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = EPOCH
    info.mode = 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def build_package(pkg: Package, subdir_path: Path) -> Path:
    """Write ``pkg`` as a .tar.bz2 conda package into ``subdir_path``; returns its path."""
    index = {
        "name": pkg.name,
        "version": pkg.version,
        "build": pkg.build,
        "build_number": 0,
        "depends": list(pkg.depends),
        "license": "MIT",
        "subdir": "noarch",
        "noarch": pkg.noarch,
        "timestamp": EPOCH * 1000,
    }
    entries = [{"_path": path, "path_type": "hardlink",
                "sha256": hashlib.sha256(text.encode()).hexdigest(),
                "size_in_bytes": len(text.encode())}
               for path, text in pkg.files.items()]
    entries += [{"_path": path, "path_type": "softlink",
                 "sha256": hashlib.sha256(target.encode()).hexdigest(),
                 "size_in_bytes": len(target.encode())}
                for path, target in pkg.links.items()]
    paths = {"paths": sorted(entries, key=lambda e: e["_path"]), "paths_version": 1}
    members = {
        "info/index.json": json.dumps(index, indent=2, sort_keys=True),
        "info/paths.json": json.dumps(paths, indent=2, sort_keys=True),
        "info/files": "".join(f"{p}\n" for p in sorted({*pkg.files, *pkg.links})),
        "info/about.json": json.dumps({"summary": f"{pkg.name}: a mlbuild test package"}),
        **pkg.files,
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted({*members, *pkg.links}):
            if name in pkg.links:
                info = tarfile.TarInfo(name)
                info.type = tarfile.SYMTYPE
                info.linkname = pkg.links[name]
                info.mtime = EPOCH
                info.uname = info.gname = ""
                tar.addfile(info)
            else:
                _add(tar, name, members[name].encode())
    out = subdir_path / pkg.filename
    out.write_bytes(bz2.compress(buf.getvalue(), 9))
    return out


def index_channel(channel: Path) -> None:
    """(Re)write the repodata.json files of ``channel`` with rattler's indexer."""
    from rattler.index import index_fs

    # Every subdir folder present is indexed, an empty one too. (NOTE: no
    # target_platform: with it py-rattler 0.28 skips noarch and crashes at exit.)
    asyncio.run(index_fs(channel, write_zst=False, write_shards=False, force=True))


def file_hashes(path: Path) -> dict[str, str]:
    """The md5 and sha256 of a file, as a lock records them."""
    data = path.read_bytes()
    return {"md5": hashlib.md5(data).hexdigest(), "sha256": hashlib.sha256(data).hexdigest()}


@dataclass(frozen=True)
class FixtureChannel:
    """A built fixture channel.

    Attributes:
        path: the channel's folder (``url`` is its file:// URL, for a spec's ``channels``).
        mapping: the PyPI -> conda name-mapping file (conda-lock's
            ``--pypi_to_conda_lookup_file``; its default URL is unreachable here).
    """

    path: Path
    mapping: Path

    @property
    def url(self) -> str:
        return self.path.as_uri()

    packages: tuple[Package, ...] = PACKAGES

    def archive(self, name: str, version: str) -> Path:
        """The archive of the package ``name`` ``version``."""
        for pkg in self.packages:
            if (pkg.name, pkg.version) == (name, version):
                return self.path / "noarch" / pkg.filename
        raise KeyError(f"{name} {version} is not in the fixture channel")


def with_interpreter(python: str, system_site: bool = False,
                     packages: tuple[Package, ...] = PACKAGES) -> tuple[Package, ...]:
    """``packages`` with a ``python`` that runs: ``bin/python`` links to the interpreter
    ``python`` (a path where the environment is installed: the host's, or the image's
    /usr/bin/python3.11) and ``pyvenv.cfg`` makes the prefix its virtual environment,
    so the prefix's ``lib/python3.11/site-packages`` is on its path, as in a real conda
    environment. ``pip`` then ships no module: with ``system_site``, the interpreter's
    own pip (Debian's in the image) is the environment's."""
    home = str(Path(python).parent)
    cfg = (f"home = {home}\ninclude-system-site-packages = {str(system_site).lower()}\n"
           "version = 3.11\n")
    out = []
    for pkg in packages:
        if pkg.name == "python":
            pkg = Package("python", pkg.version, build=pkg.build, noarch=pkg.noarch,
                          files={"pyvenv.cfg": cfg},
                          links={"bin/python": python, "bin/python3": "python",
                                 "bin/python3.11": "python"})
        elif pkg.name == "pip":
            pkg = Package("pip", pkg.version, depends=pkg.depends,
                          files={"share/pip-stand-in/README": "the interpreter's own pip\n"})
        out.append(pkg)
    return tuple(out)


def make_channel(root: Path, packages: tuple[Package, ...] = PACKAGES) -> FixtureChannel:
    """Build the fixture channel (packages, repodata, name mapping) under ``root``."""
    channel = root / "channel"
    noarch = channel / "noarch"
    noarch.mkdir(parents=True, exist_ok=True)
    (channel / "linux-64").mkdir(exist_ok=True)
    for pkg in packages:
        build_package(pkg, noarch)
    index_channel(channel)
    mapping = root / "pypi-mapping.json"
    mapping.write_text(json.dumps(PYPI_MAPPING, indent=2, sort_keys=True))
    return FixtureChannel(channel, mapping, packages)


# An Azure ML v1-style spec on the fixture channel: conda packages, and a pip section
# with azureml-defaults (which mlbuild drops) and six (from PyPI). The last lines are
# this machine's PyPI settings for conda-lock (its default PyPI access is unreachable
# here), not mlbuild defaults.
V1_SPEC = """\
name: tiny
channels:
  - {channel}
dependencies:
  - python=3.11
  - tinypkg>=1.0
  - pip
  - pip:
      - azureml-defaults>=1.40
      - six
pip-repositories:
  - https://pypi.org/simple
allow-pypi-requests: false
"""
