"""``--json`` on every command, before or after the command's name (issue 16, point 14).

With --json, stdout is exactly one JSON document: the command's result, or
``{"error": {...}}`` when it failed. Every command of the CLI has a case below, and a
test fails when a command has none, so a new command cannot forget --json.
"""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest

from clitools import CLI

MODEL = "models/sklearn_regression_model.pkl"

# command -> (words before --json when it comes first, the rest, what it gives:
# "ok" a result, "error" an error document; "registered": ridge@1 registered first).
# The demo project's targets: dev (process, the default), local (docker), bundle (package).
CASES = {
    "init": (["-C", "fresh"], ["init"], "ok"),
    "validate": ([], ["validate"], "ok"),
    "plan": ([], ["plan", "bundle"], "ok"),
    "graph": ([], ["graph", "bundle"], "ok"),
    "build": ([], ["build", "bundle"], "ok"),
    "deploy": ([], ["deploy", "bundle"], "ok"),
    "lock": ([], ["lock"], "ok"),
    "push": ([], ["push", "local"], "error"),  # the demo names no registry
    "clean": ([], ["clean"], "ok"),
    "status": ([], ["status"], "ok"),
    "logs": ([], ["logs", "diabetes"], "ok"),  # a log the test writes
    "down": ([], ["down"], "ok"),
    "invoke": ([], ["invoke", "diabetes", "--data", "{}"], "error"),  # not deployed
    "keys": ([], ["keys", "diabetes"], "ok"),
    "serve": ([], ["serve", "diabetes"], "error"),  # a server has no JSON result
    "models register": ([], ["models", "register", MODEL, "-n", "other"], "ok"),
    "models list": ([], ["models", "list"], "registered"),
    "models show": ([], ["models", "show", "ridge"], "registered"),
    "models download": ([], ["models", "download", "ridge", "-o", "out"], "registered"),
    "models delete": ([], ["models", "delete", "ridge@1"], "registered"),
    "models tag": ([], ["models", "tag", "ridge", "stage=prod"], "registered"),
    "state reset": ([], ["state", "reset"], "error"),  # the state is sound: nothing to reset
    "profile": ([], ["profile", "diabetes", "--data", "missing.txt"], "error"),  # no such file
}


def _commands(group, prefix="") -> set[str]:
    import click

    out = set()
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            out |= _commands(cmd, f"{prefix}{name} ")
        else:
            out.add(f"{prefix}{name}")
    return out


def test_every_command_has_a_case():
    from mlbuild.cli import cli

    assert _commands(cli) == set(CASES)


def one_document(r: subprocess.CompletedProcess):
    """stdout parsed as exactly one JSON document (json.loads refuses a second one)."""
    assert r.stdout.strip(), f"nothing on stdout\n--- stderr\n{r.stderr}"
    try:
        return json.loads(r.stdout)
    except ValueError as e:
        raise AssertionError(f"stdout is not one JSON document: {e}\n--- stdout\n{r.stdout}"
                             f"\n--- stderr\n{r.stderr}") from None


def write_log(cli: CLI, project: Path) -> None:
    """A log of the service on the dev target, as a deploy would leave it."""
    cli("keys", "diabetes")  # the project's state, made as every command makes it
    log = project / ".mlbuild/logs/dev/diabetes.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("first line\nsecond line\n")


@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize("command", sorted(CASES))
def test_json_before_and_after_the_command(cli: CLI, diabetes: Path, command, where):
    first, words, expect = CASES[command]
    if expect == "registered":
        cli("models", "register", MODEL, "-n", "ridge")
    if command == "logs":
        write_log(cli, diabetes)
    args = [*first, "--json", *words] if where == "before" else [*first, *words, "--json"]
    r = cli(*args, check=None, timeout=60)
    doc = one_document(r)
    if expect == "error":
        assert r.returncode != 0 and set(doc) == {"error"}, doc
        assert doc["error"]["exit_code"] == r.returncode
    else:
        assert r.returncode == 0, r.stderr
        assert not (isinstance(doc, dict) and "error" in doc), doc


def test_json_between_a_group_and_its_command(cli: CLI):
    cli("models", "register", MODEL, "-n", "ridge")
    assert one_document(cli("models", "--json", "show", "ridge"))["name"] == "ridge"


def test_graph_json_is_the_step_graph(cli: CLI):
    text = cli("graph", "bundle").stdout
    doc = one_document(cli("graph", "bundle", "--format", "dot", "--json"))
    assert doc["target"] == "bundle"
    steps = {s["id"]: s for s in doc["steps"]}
    assert list(steps) == [line.split("  <- ")[0] for line in text.splitlines()]
    pkg = steps["package:bundle/diabetes"]
    assert pkg["kind"] == "package" and "context:diabetes" in pkg["deps"]
    assert steps["lock:sklearn"]["deps"] == []
    # the default target when none is named
    assert one_document(cli("graph", "--json"))["target"] == "dev"


def test_logs_json_holds_the_lines(cli: CLI, diabetes: Path):
    write_log(cli, diabetes)
    doc = one_document(cli("logs", "diabetes", "--json"))
    assert doc == {"service": "diabetes", "lines": ["first line", "second line"]}


def test_keys_secret_json_is_the_secret(cli: CLI, diabetes: Path):
    m = diabetes / "mlproject.yaml"
    m.write_text(m.read_text().replace(
        "  bundle: ", "  kube: {type: kubernetes, namespace: ml, apply: false, out: dist/k8s}\n"
                     "  bundle: "))
    primary = one_document(cli("keys", "diabetes", "-t", "kube", "--json"))["primary"]
    secret = one_document(cli("keys", "diabetes", "-t", "kube", "--secret", "--json"))
    assert (secret["kind"], secret["metadata"]["namespace"]) == ("Secret", "ml")
    assert base64.b64decode(secret["data"]["primary"]).decode() == primary


def test_logs_follow_refuses_json(cli: CLI, diabetes: Path):
    # A followed log is a stream: it cannot be one JSON document.
    write_log(cli, diabetes)
    r = cli("logs", "diabetes", "-f", "--json", check=3, timeout=30)
    err = one_document(r)["error"]
    assert "--follow" in err["message"] and err["hint"]


def test_serve_refuses_json(cli: CLI):
    r = cli("--json", "serve", "--entry-script", "src/score.py", check=3, timeout=30)
    assert "serve" in one_document(r)["error"]["message"]


@pytest.mark.parametrize("args", [
    ["status", "--json", "--no-such-flag"],
    ["status", "--no-such-flag", "--json"],
    ["no-such-command", "--json"],
    ["models", "show", "--json"],  # a missing argument
])
def test_usage_errors_after_the_command_are_json(cli: CLI, args):
    r = cli(*args, check=3)
    assert one_document(r)["error"]["exit_code"] == 3
