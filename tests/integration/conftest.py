"""Fixtures of the integration tests: the real Docker engine, the registry on
127.0.0.1:5000 and the ``python:3.11-slim`` stand-in, all brought up by
``.ci/engines.sh`` (which ``tests/run.sh`` runs first when it is root on Linux).

Where one of them is missing, a test that needs it skips with the precise reason;
under ``CI=true`` it fails instead, since CI is where they must exist.
``MLBUILD_ENGINES`` (set by tests/run.sh: ``ok`` or why the engines did not start)
only adds to the message: an engine that answers is used whoever started it.

Helpers other test modules may want live here as fixtures, not in an importable
module: two other ``conftest.py`` exist (tests/unit, tests/func), so a module imported
by the name ``conftest`` would be ambiguous.
"""

from __future__ import annotations

import os
import subprocess
import urllib.error
import urllib.request
import uuid

import pytest

REGISTRY = os.environ.get("MLBUILD_REGISTRY_ADDR", "127.0.0.1:5000")
BASE_IMAGE = os.environ.get("MLBUILD_BASE_IMAGE", "python:3.11-slim")
TEST_LABEL = "dev.mlbuild.test"  # on everything the tests create, for the clean-up


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "docker: needs the real Docker engine, the registry on 127.0.0.1:5000 and the "
        "python:3.11-slim stand-in (.ci/engines.sh brings them up)",
    )


def _missing(what: str, reason: str):
    """Skip (or, under CI=true, fail) the test: ``what`` is not available."""
    engines = os.environ.get("MLBUILD_ENGINES")
    if engines and engines != "ok":
        reason += f"; tests/run.sh: {engines}"
    elif not engines:
        reason += "; bring the engines up with `sudo bash .ci/engines.sh` (tests/run.sh does it as root)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {what} is not available: {reason}", pytrace=False)
    pytest.skip(f"{what} not available: {reason}")


@pytest.fixture(scope="session")
def docker_client():
    """The Docker SDK client of the engine (``DOCKER_HOST`` or the local socket)."""
    try:
        import docker
    except ImportError:
        _missing("the Docker SDK", "the `docker` package is not installed (pip install 'mlbuild[docker]')")
    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except Exception as e:  # noqa: BLE001  any failure to reach it is the reason
        _missing("the Docker engine", f"no engine answers at {where}: {e}")
    client.api.timeout = 900
    yield client
    client.close()


@pytest.fixture(scope="session")
def engine(docker_client):
    """mlbuild's DockerEngine over the same engine."""
    from mlbuild.backends.docker import DockerEngine

    return DockerEngine(docker_client, os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock")


@pytest.fixture(scope="session")
def registry(docker_client) -> str:
    """The address (``host:port``) of the registry the tests push to."""
    url = f"http://{REGISTRY}/v2/"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    except OSError as e:
        _missing(f"the registry on {REGISTRY}", f"GET {url} failed: {e}")
    if status != 200:
        _missing(f"the registry on {REGISTRY}", f"GET {url} answered HTTP {status} (one without auth is needed)")
    return REGISTRY


@pytest.fixture(scope="session")
def base_image(docker_client) -> str:
    """The default base image of mlbuild's Dockerfiles, present in the engine."""
    import docker

    try:
        docker_client.images.get(BASE_IMAGE)
    except docker.errors.ImageNotFound:
        _missing(f"the base image {BASE_IMAGE}",
                 "not in the engine and it cannot be pulled here (.ci/engines.sh makes a stand-in)")
    return BASE_IMAGE


@pytest.fixture(scope="session")
def run_id() -> str:
    """Unique per test session: names of containers and tags do not collide with a
    concurrent or killed earlier run."""
    return uuid.uuid4().hex[:8]


class Offline:
    """``docker build --network none`` of a package directory, and ``docker run
    --network none`` of what it built: an offline package proves itself with these."""

    def __init__(self, run_id: str):
        self.run_id = run_id

    def build(self, pkg, tag: str) -> subprocess.CompletedProcess:
        return subprocess.run(["docker", "build", "-q", "--network", "none", "--label",
                               f"{TEST_LABEL}={self.run_id}", "-t", tag, str(pkg)],
                              capture_output=True, text=True, timeout=900)

    def run(self, tag: str, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["docker", "run", "--rm", "--network", "none", tag, *cmd],
                              capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def offline(docker_client, run_id) -> Offline:
    return Offline(run_id)


@pytest.fixture(scope="session", autouse=True)
def _remove_test_objects(run_id):
    """After the session, remove the containers and images this run created."""
    yield
    try:
        import docker

        client = docker.from_env(timeout=10)
        client.ping()
    except Exception:  # noqa: BLE001  no engine: nothing was created
        return
    selector = {"label": f"{TEST_LABEL}={run_id}"}
    for c in client.containers.list(all=True, filters=selector):
        c.remove(force=True)
    for img in client.images.list(filters=selector):
        for tag in img.tags:
            try:
                client.images.remove(tag, force=True)
            except docker.errors.APIError:
                pass
    client.close()
