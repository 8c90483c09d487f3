"""The package README (templates/package-README.md.j2): a service's keys reach the
container as a mounted file, never through its configuration, which ``docker inspect``
shows to anyone who may talk to the engine (issue 16, point 12).

tests/integration/test_package_readme.py runs the README's commands for real.
"""

from __future__ import annotations

import re

from mlbuild.render import render


def readme(auth: str) -> str:
    return render("package-README.md.j2", project="demo", service="svc",
                  image="demo-svc:0123456789abcdef", port=5001, auth=auth, models=["m@1"],
                  has_sample=True, has_app=True, mlbuild_version="0")


def commands(text: str) -> list[str]:
    """The shell commands of the README's ``sh`` blocks, continuation lines joined."""
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    return [c.strip() for b in blocks for c in b.replace("\\\n", " ").splitlines() if c.strip()]


def test_keys_are_mounted_as_a_file():
    text = readme("key")
    (run,) = [c for c in commands(text) if c.startswith("docker run")]
    assert re.search(r"--mount type=bind,src=\S+,dst=/run/secrets/mlbuild-keys,readonly", run)
    assert "-e MLBUILD_AUTH_KEYS_FILE=/run/secrets/mlbuild-keys" in run
    # Not the key itself, in no form that lands in the container's configuration.
    assert "SCORING_KEY" not in run and "--env-file" not in run
    assert not re.search(r"MLBUILD_AUTH_KEYS=", run)
    # The README says why (and why not an env file).
    assert "docker inspect" in text and "--env-file" in text


def test_no_key_file_without_auth():
    text = readme("none")
    assert "SCORING_KEY" not in text and "MLBUILD_AUTH_KEYS" not in text
    (run,) = [c for c in commands(text) if c.startswith("docker run")]
    assert run == "docker run --rm -p 5001:5001 demo-svc:0123456789abcdef"
