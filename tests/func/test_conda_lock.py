"""conda environments locked for real: conda-lock (the real one, as a subprocess)
against a local file channel of tiny hand-made packages, through a micromamba stand-in
built on py-rattler (tests/condafixture/: no conda channel is reachable here). The pip
section is locked against PyPI's simple index.

The spec's ``pip-repositories: [https://pypi.org/simple]`` with ``allow-pypi-requests:
false`` and the local PyPI -> conda name mapping are this network's settings (conda-lock's
default PyPI access and mapping URL are unreachable here), not mlbuild defaults.

Covers: the lock beside its spec with the packages' hashes (conda and pip), a spec that
does not resolve (conda and pip part) naming the package and the conflict and leaving
the committed lock alone, a missing solver saying what to install, the Azure ML v1
rule, an update that moves only the package asked for, the lock reduced to what gets
installed, and the lock installed into a prefix with py-rattler (the image's way),
hashes checked."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "condafixture"))

from condachannel import FixtureChannel, file_hashes, make_channel
from fakemicromamba import write_solver

from mlbuild.backends import conda
from mlbuild.errors import EXIT_INVALID, EXIT_STEP_FAILED

TIMEOUT = 120  # seconds a conda-lock run may take here (about 2 s each)
PIP_SETTINGS = """\
# This machine's PyPI settings (conda-lock's default PyPI access is unreachable here).
pip-repositories:
  - https://pypi.org/simple
allow-pypi-requests: false
"""


@pytest.fixture(scope="module")
def channel(tmp_path_factory) -> FixtureChannel:
    return make_channel(tmp_path_factory.mktemp("conda-channel"))


@pytest.fixture(scope="module")
def solver(tmp_path_factory) -> Path:
    return write_solver(tmp_path_factory.mktemp("conda-solver"))


@pytest.fixture(autouse=True)
def _solver_env(monkeypatch, solver):
    monkeypatch.setenv(conda.SOLVER_ENV, str(solver))


def write_spec(folder: Path, channel: FixtureChannel, conda_deps=("python=3.11", "tinypkg>=1.0"),
               pip=("six",), name: str = "environment.yml") -> Path:
    lines = ["name: demo", "channels:", f"  - {channel.url}", "dependencies:"]
    lines += [f"  - {d}" for d in conda_deps]
    if pip:
        lines += ["  - pip", "  - pip:"] + [f"      - {p}" for p in pip]
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / name
    spec.write_text("\n".join(lines) + "\n" + PIP_SETTINGS)
    return spec


def do_lock(spec: Path, channel: FixtureChannel, **kw) -> conda.LockResult:
    return conda.lock(spec, mapping=channel.mapping, timeout=TIMEOUT, **kw)


def versions(lock: Path, manager: str | None = None) -> dict[str, str]:
    return {p.name: p.version for p in conda.locked_packages(lock, manager=manager)}


def test_lock_conda_and_pip_sections_with_hashes(tmp_path, channel):
    spec = write_spec(tmp_path / "envs", channel)
    result = do_lock(spec, channel)

    lock = spec.with_name("conda-lock.yml")
    assert result.path == lock and result.platforms == ("linux-64",) and result.dropped == ()
    assert sorted(p.name for p in (tmp_path / "envs").iterdir()) == \
        ["conda-lock.yml", "environment.yml"]  # no copy of the spec left beside it
    conda_pkgs = conda.locked_packages(lock, "linux-64", manager="conda")
    assert {p.name: p.version for p in conda_pkgs} == \
        {"python": "3.11.0", "pip": "24.0", "tinypkg": "1.1", "tinydep": "0.2"}
    for p in conda_pkgs:  # the hashes of the very archives in the channel
        archive = channel.archive(p.name, p.version)
        assert p.url == archive.as_uri() and p.filename == archive.name
        assert {"md5": p.md5, "sha256": p.sha256} == file_hashes(archive)
    assert conda_pkgs[[p.name for p in conda_pkgs].index("tinypkg")].dependencies == \
        {"python": ">=3.8", "tinydep": ">=0.2"}

    (six,) = conda.locked_packages(lock, "linux-64", manager="pip")
    assert six.name == "six" and six.url.endswith(".whl") and len(six.sha256) == 64
    assert conda.pip_requirements(lock) == f"six @ {six.url} --hash=sha256:{six.sha256}\n"
    meta = conda._read_lock(lock)["metadata"]
    assert meta["sources"] == ["environment.yml"] and meta["platforms"] == ["linux-64"]
    assert result.packages == 5

    with pytest.raises(conda.LockFileError, match="no packages for osx-arm64") as e:
        conda.locked_packages(lock, "osx-arm64")
    assert "it locks linux-64" in str(e.value)


def test_a_conda_conflict_names_the_packages_and_keeps_the_lock(tmp_path, channel):
    spec = write_spec(tmp_path, channel)
    do_lock(spec, channel)
    before = spec.with_name("conda-lock.yml").read_bytes()

    write_spec(tmp_path, channel, conda_deps=("python=3.11", "tinypkg>=1.1", "tinydep<0.2"))
    with pytest.raises(conda.LockFailed) as e:
        do_lock(spec, channel)
    msg = str(e.value)
    assert msg.startswith(f"cannot lock {spec}: the conda packages do not resolve for linux-64:")
    assert "tinypkg >=1.1" in msg and "tinydep >=0.2" in msg
    assert "Traceback" not in msg and "Command:" not in msg
    assert e.value.platform == "linux-64" and e.value.exit_code == EXIT_STEP_FAILED
    assert "environment.yml" in e.value.hint
    assert spec.with_name("conda-lock.yml").read_bytes() == before  # untouched

    write_spec(tmp_path, channel, conda_deps=("python=3.11", "nosuchpkg"))
    with pytest.raises(conda.LockFailed, match="nosuchpkg"):
        do_lock(spec, channel)


def test_a_pip_conflict_names_the_package(tmp_path, channel):
    spec = write_spec(tmp_path, channel, pip=("six>=99",))
    with pytest.raises(conda.LockFailed) as e:
        do_lock(spec, channel)
    assert "the pip section does not resolve" in str(e.value)
    assert "six (>=99) which doesn't match any versions" in str(e.value)
    assert "Traceback" not in str(e.value)
    assert not spec.with_name("conda-lock.yml").exists()


def test_a_missing_solver_says_what_to_install(tmp_path, channel, monkeypatch):
    spec = write_spec(tmp_path, channel)
    monkeypatch.delenv(conda.SOLVER_ENV)
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(conda.SolverNotFound) as e:
        do_lock(spec, channel)
    assert "no micromamba, mamba nor conda on PATH" in str(e.value)
    assert "install micromamba" in e.value.hint and conda.SOLVER_ENV in e.value.hint
    assert e.value.exit_code == EXIT_INVALID
    assert not spec.with_name("conda-lock.yml").exists()

    monkeypatch.setenv(conda.SOLVER_ENV, str(tmp_path / "no-such-micromamba"))
    with pytest.raises(conda.SolverNotFound, match=f"^{conda.SOLVER_ENV} is "):
        conda.find_solver()
    # The manifest's choice, when the variable is not set; a name found on PATH.
    monkeypatch.delenv(conda.SOLVER_ENV)
    with pytest.raises(conda.SolverNotFound, match="the environment's solver is 'mamba'"):
        conda.find_solver("mamba")
    (empty / "micromamba").symlink_to(write_solver(tmp_path / "real"))
    assert conda.find_solver() == str(empty / "micromamba")


def test_azureml_v1_packages_are_dropped_inference_schema_stays(tmp_path, channel):
    spec = write_spec(tmp_path, channel, pip=("azureml-defaults>=1.40", "azureml_core",
                                              "'Azureml.Contrib-Services'", "six",
                                              "inference-schema>=1.8"))
    text = spec.read_text()
    spec.write_text(text.replace("      - six", "      - six  # [linux]"))
    result = do_lock(spec, channel)

    assert result.dropped == ("azureml-defaults", "azureml_core", "Azureml.Contrib-Services")
    pip = versions(result.path, "pip")
    assert "six" in pip and "inference-schema" in pip
    assert not any(n.startswith("azureml") for n in pip)
    assert spec.read_text() == text.replace("      - six", "      - six  # [linux]")  # as is

    filtered, dropped = conda.filter_spec(spec.read_text())
    assert "      - six  # [linux]\n" in filtered  # comments and selectors stay
    assert "azureml" not in filtered.lower() and len(dropped) == 3
    flow, dropped = conda.filter_spec("dependencies:\n  - python\n  - pip: [azureml-core, six]\n")
    assert dropped == ["azureml-core"] and "six" in flow and "azureml" not in flow


def test_update_moves_only_the_package_asked_for(tmp_path, channel):
    spec = write_spec(tmp_path, channel, conda_deps=("python=3.11", "tinypkg<1.1", "tinydep<0.2"),
                      pip=())
    lock = do_lock(spec, channel).path
    assert versions(lock) == {"python": "3.11.0", "tinypkg": "1.0", "tinydep": "0.1"}

    write_spec(tmp_path, channel, conda_deps=("python=3.11", "tinypkg", "tinydep"), pip=())
    do_lock(spec, channel, extra_args=["--update", "tinydep"])  # from the previous lock
    assert versions(lock) == {"python": "3.11.0", "tinypkg": "1.0", "tinydep": "0.2"}
    do_lock(spec, channel, upgrade=True)
    assert versions(lock) == {"python": "3.11.0", "tinypkg": "1.1", "tinydep": "0.2"}


def test_install_text_is_the_same_for_a_spec_edit_that_locks_the_same(tmp_path, channel):
    spec = write_spec(tmp_path, channel)
    lock = do_lock(spec, channel).path
    before, text = lock.read_text(), conda.install_text(lock)
    write_spec(tmp_path, channel, conda_deps=("python=3.11.*", "tinypkg>=1.1"))
    do_lock(spec, channel)
    assert lock.read_text() != before  # conda-lock's content hash of the spec moved
    assert conda.install_text(lock) == text
    assert "content_hash" not in text and "environment.yml" not in text


def test_the_lock_installs_into_a_prefix_with_py_rattler(tmp_path, channel):
    """The image's way, without docker: ``python -m mlbuild.backends.conda install``,
    run from the installer folder alone (what the builder stage copies), puts exactly
    the locked packages into a prefix, from the reduced lock."""
    installer = tmp_path / "installer"
    for rel, src in conda.installer_files():
        (installer / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, installer / rel)

    def run_installer(*args) -> subprocess.CompletedProcess:
        # -I: neither PYTHONPATH nor the checkout; the installer folder is the only mlbuild.
        code = ("import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); "
                "runpy.run_module('mlbuild.backends.conda', run_name='__main__')")
        return subprocess.run([sys.executable, "-I", "-c", code, str(installer),
                               *map(str, args)],
                              capture_output=True, text=True, timeout=TIMEOUT)

    r = run_installer("--help")
    assert r.returncode == 0 and "install" in r.stdout
    spec = write_spec(tmp_path / "env", channel)
    lock = do_lock(spec, channel).path
    reduced = tmp_path / "ctx" / "conda-lock.yml"
    reduced.parent.mkdir()
    reduced.write_text(conda.install_text(lock))
    prefix, cache = tmp_path / "opt-conda", tmp_path / "pkgs-cache"

    r = run_installer("install", reduced, prefix, "--platform", "linux-64", "--cache-dir", cache)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"installed 4 conda packages into {prefix}"
    site = prefix / "lib/python3.11/site-packages"  # noarch: python, linked for python 3.11
    assert (site / "tinypkg/__init__.py").read_text() == '__version__ = "1.1"\n'
    assert (site / "tinydep/__init__.py").read_text() == '__version__ = "0.2"\n'
    assert (prefix / "share/python-stand-in/README").is_file()
    records = {json.loads(p.read_text())["name"]: json.loads(p.read_text())
               for p in (prefix / "conda-meta").glob("*.json")}
    assert sorted(records) == ["pip", "python", "tinydep", "tinypkg"]
    assert records["tinypkg"]["sha256"] == file_hashes(channel.archive("tinypkg", "1.1"))["sha256"]
    assert "six" not in records  # the pip section is pip's, from pip-requirements
    r = run_installer("pip-requirements", reduced, "--wheels", tmp_path / "wheels")
    assert r.returncode == 0 and r.stdout.startswith(
        f"six @ {(tmp_path / 'wheels').resolve().as_uri()}/six-") and "--hash=sha256:" in r.stdout

    # Offline: every archive from one folder, each checked against the lock's hash.
    pkgs = tmp_path / "conda-pkgs"
    pkgs.mkdir()
    for p in conda.locked_packages(lock, manager="conda"):
        (pkgs / p.filename).write_bytes(channel.archive(p.name, p.version).read_bytes())
    r = run_installer("install", reduced, tmp_path / "offline", "--packages", pkgs,
                      "--cache-dir", tmp_path / "cache2")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "offline/lib/python3.11/site-packages/tinypkg/__init__.py").is_file()

    tampered = pkgs / channel.archive("tinydep", "0.2").name
    tampered.write_bytes(tampered.read_bytes() + b"\0")
    r = run_installer("install", reduced, tmp_path / "bad", "--packages", pkgs,
                      "--cache-dir", tmp_path / "cache3")
    assert r.returncode == EXIT_STEP_FAILED
    assert f"error: {tampered}: sha256 " in r.stderr and "is not the locked" in r.stderr
    assert not (tmp_path / "bad/conda-meta").exists()  # nothing installed
