"""services.NAME.max_body_mb through the CLI: the process target's runtime answers 413 over
the manifest's limit and 200 under it, and follows a change of it at the next deploy; the
package's Dockerfile declares it. (The docker target: tests/integration/
test_max_body_docker.py; the kubernetes objects: tests/unit/test_max_body_settings.py.)"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from clitools import CLI, free_port

SAMPLE = Path("samples/input.json")


def set_limit(proj: Path, mb: float | None, port: int | None = None) -> None:
    """services.diabetes.max_body_mb: ``mb`` (None: not set); the dev target on ``port``."""
    m = proj / "mlproject.yaml"
    text = re.sub(r"\n    max_body_mb: .*", "", m.read_text())
    if mb is not None:
        text = text.replace("    auth: key\n", f"    auth: key\n    max_body_mb: {mb}\n", 1)
    if port is not None:
        text = re.sub(r"dev:\s*\{type: process, port: \d+\}",
                      f"dev: {{type: process, port: {port}}}", text)
    m.write_text(text)


def body_of(proj: Path, size: int) -> bytes:
    """The sample request, padded with spaces (still valid JSON) to ``size`` bytes."""
    body = (proj / SAMPLE).read_bytes().rstrip()
    assert len(body) < size
    return body + b" " * (size - len(body))


def post(url: str, body: bytes, key: str) -> tuple[int, bytes]:
    req = urllib.request.Request(url + "/score", data=body, method="POST", headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture
def dev(diabetes):
    port = free_port()
    set_limit(diabetes, None, port)
    cli = CLI(diabetes)
    yield cli, f"http://127.0.0.1:{port}"
    cli("down", "dev", check=None)


def test_process_target_answers_413_over_the_manifests_limit(dev):
    cli, url = dev
    proj = cli.cwd
    set_limit(proj, 0.01)  # 10486 bytes
    cli("deploy", timeout=300)
    key = cli.json("keys", "diabetes")["primary"]
    code, answer = post(url, body_of(proj, 10_000), key)
    assert code == 200 and len(json.loads(answer)) == 2
    code, answer = post(url, body_of(proj, 11_000), key)
    assert code == 413, answer
    assert "10486" in json.loads(answer)["message"]

    # A change of the limit reaches the running service at the next deploy.
    set_limit(proj, 0.02)  # 20972 bytes
    ran = cli.ran("deploy", timeout=300)
    assert "process:dev/diabetes" in ran
    assert post(url, body_of(proj, 11_000), key)[0] == 200
    assert post(url, body_of(proj, 21_000), key)[0] == 413

    # Left out: the runtime's default (10 MiB), and nothing else runs a second time.
    set_limit(proj, None)
    cli("deploy", timeout=300)
    assert post(url, body_of(proj, 1_000_000), key)[0] == 200
    assert cli.ran("deploy") == []


def test_package_dockerfile_declares_the_limit(diabetes):
    set_limit(diabetes, 2.5)
    cli = CLI(diabetes)
    cli("deploy", "bundle", timeout=300)
    dockerfile = (diabetes / "dist/package/diabetes/Dockerfile").read_text()
    assert dockerfile.rstrip().endswith(f"ENV MLBUILD_MAX_BODY_BYTES={int(2.5 * 1024 * 1024)}")


def test_a_bad_limit_is_refused_naming_the_field(diabetes):
    cli = CLI(diabetes)
    for value, says in (("0", "must be greater than 0, got 0"),
                        ("2048", "must be at most 1024, got 2048"),
                        ("lots", "expected a number, got 'lots'")):
        set_limit(diabetes, value)
        r = cli("validate", check=None)
        assert r.returncode != 0
        assert f"services.diabetes.max_body_mb: {says}" in r.stdout + r.stderr
