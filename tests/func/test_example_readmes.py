"""Every command of every example's README, and of the header comment of its
mlproject.yaml (and of the root mlproject.yaml's), runs as written on a fresh copy of
the example; and what the README says of it holds.

"As written" with three adaptations, so that a test never collides with another or
with a developer's own servers, and never reaches a package index:

- a fixed port (the READMEs' ``5001``, the manifests' dev ports) becomes a free one;
- ``mlbuild``, ``python`` and ``pip`` are the test's own (its venv first on PATH), with
  ``PIP_NO_INDEX=1``: a README's ``pip install`` of what the test extras already hold
  succeeds offline, anything else fails here, loudly;
- a command that serves (``python -m mlbuild.runtime``, ``mlbuild serve``) runs in the
  background until it answers ``GET /``, and is stopped at the end.

Docker: the onnx-nocode and multi-model READMEs' "docker build and docker run the
package" is run by tests/integration/test_example_packages.py; the diabetes README's
``local`` target is deployed by tests/integration/test_docker_target.py, its package
README run by tests/integration/test_package_readme.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from clitools import free_port

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
TESTED = {"diabetes", "multi-model", "onnx-nocode"}  # one test each, below
README_PORT = "5001"  # the port the READMEs' own commands name


def sh_commands(readme: str) -> list[str]:
    """The commands of every ```sh block, in order: comments dropped, lines continued
    with a backslash joined."""
    out = []
    for block in re.findall(r"```sh\n(.*?)\n```", readme, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s+)#.*$", "", line).strip()
            if line:
                out.append(line)
    return out


def manifest_commands(manifest: Path) -> list[str]:
    """The commands of an mlproject.yaml's header comment: its lines ``#   COMMAND  # why``
    (a line that only goes on with the comment of the one above holds no command)."""
    out = []
    for line in manifest.read_text().splitlines():
        if not line.startswith("#"):
            break
        m = re.match(r"#\s+((?:python|mlbuild) .*?)(\s+#.*)?$", line)
        if m:
            out.append(m.group(1).strip())
    return out


def fresh_copy(files: list[str], dest: Path) -> None:
    """Copy what a clone would hold of ``files`` (paths or folders of the repository):
    the files git tracks or would (never a model trained here, a dist/ or .mlbuild/)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "--", *files],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for f in listed:
        if (REPO / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dest / f)


def example_copy(name: str, tmp_path: Path) -> Path:
    fresh_copy([f"examples/{name}"], tmp_path)
    proj = tmp_path / "examples" / name
    assert (proj / "README.md").is_file(), f"examples/{name} has no README.md"
    assert not (proj / "models").exists()  # train.py is what makes them
    return proj


def use_free_dev_port(manifest: Path, port: int) -> None:
    text, n = re.subn(r"(dev:\s*\{type: process, port: )\d+", rf"\g<1>{port}",
                      manifest.read_text())
    assert n <= 1
    manifest.write_text(text)


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, headers={
        "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def close(a, b) -> bool:
    """``a == b``, floats within 1e-6 relative (another BLAS, another last digit)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b, rel=1e-6, abs=1e-12)
    return a == b


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


class Shell:
    """Runs a README's commands in ``cwd`` (see the module's docstring) and keeps what
    each printed."""

    def __init__(self, cwd: Path, port: int):
        self.cwd, self.port = cwd, port
        self.env = {**{k: v for k, v in os.environ.items()
                       if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH", "PIP_"))},
                    "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                    "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        self.out: dict[str, str] = {}
        self.servers: list[subprocess.Popen] = []

    def __call__(self, command: str, timeout: float = 600) -> str:
        cmd = re.sub(rf"\b{README_PORT}\b", str(self.port), command)
        if cmd.startswith(("python -m mlbuild.runtime ", "mlbuild serve ")):
            assert f"--port {self.port}" in cmd, f"{command}: serves on a port of its choice"
            self._serve(cmd)
            self.out[command] = ""
            return ""
        r = subprocess.run(cmd, shell=True, cwd=self.cwd, env=self.env, capture_output=True,
                           text=True, timeout=timeout)
        assert r.returncode == 0, \
            f"{command}\nexited {r.returncode}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
        self.out[command] = r.stdout
        return r.stdout

    def _serve(self, cmd: str) -> None:
        p = subprocess.Popen(cmd, shell=True, cwd=self.cwd, env=self.env, text=True,
                             start_new_session=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
        self.servers.append(p)
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=2) as r:
                    if r.read() == b"Healthy":
                        return
            except OSError:
                pass
            if p.poll() is not None or time.monotonic() > deadline:
                self._stop(p)
                raise AssertionError(f"{cmd}\ndid not serve:\n{p.stdout.read()}")
            time.sleep(0.2)

    @staticmethod
    def _stop(p: subprocess.Popen) -> None:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()

    def stop_servers(self) -> None:
        while self.servers:
            self._stop(self.servers.pop())


def inline_commands(readme: str) -> list[str]:
    """The commands a README names in its prose (``mlbuild keys diabetes``), outside
    its fenced blocks; ``docker`` ones are the integration tests'."""
    prose = re.sub(r"```.*?```", "", readme, flags=re.S)
    return [s for s in re.findall(r"`([^`\n]+)`", prose)
            if re.match(r"(mlbuild|python|pip|curl)( |$)", s)]


def assert_every_command_ran(shell: Shell, proj: Path) -> None:
    """Each command of the README's prose ran as written (a bare ``mlbuild invoke``:
    some invoke ran)."""
    not_run = [c for c in inline_commands((proj / "README.md").read_text())
               if not any(ran == c or ran.startswith(c + " ") for ran in shell.out)]
    assert not not_run, f"{proj.name}/README.md: no test runs {not_run}"


def paths_named(readme: str) -> list[str]:
    """The relative paths a README names in backquotes (``src/score.py``), leaving out
    placeholders (``NAME/VERSION/...``) and URL paths (``/swagger.json``)."""
    out = []
    for token in re.findall(r"`([\w.-]+(?:/[\w.-]+)+/?)`", readme):
        parts = token.rstrip("/").split("/")
        if not any(p.isupper() or p == "..." for p in parts):
            out.append(token)
    return out


def assert_named_paths_exist(proj: Path) -> None:
    readme = (proj / "README.md").read_text()
    missing = [p for p in paths_named(readme) if not (proj / p).exists()]
    assert not missing, f"{proj.name}/README.md names what is not there: {missing}"


def run_commands(shell: Shell, proj: Path) -> list[str]:
    """The README's commands, then its manifest's header comment's."""
    commands = sh_commands((proj / "README.md").read_text())
    assert commands, f"{proj.name}/README.md has no ```sh block"
    for command in commands + manifest_commands(proj / "mlproject.yaml"):
        shell(command)
    return commands


# -- the tests ------------------------------------------------------------------------

def test_every_example_has_a_readme_and_a_test_here():
    examples = {p.name for p in EXAMPLES.iterdir() if (p / "mlproject.yaml").is_file()}
    assert examples == TESTED
    for name in examples:
        assert (EXAMPLES / name / "README.md").is_file(), name


def test_command_parsing():
    readme = ("x\n```sh\npip install a b   # why\ncurl -s http://h/score \\\n"
              "  --data @x.json\n# only a comment\n```\n```json\n{\"not\": 1}\n```\n")
    assert sh_commands(readme) == ["pip install a b",
                                   "curl -s http://h/score    --data @x.json"]
    assert paths_named("`src/score.py`, `NAME/VERSION/...`, `/swagger.json`, "
                       "`dist/package/iris/README.md`, `a b/c`") == \
        ["src/score.py", "dist/package/iris/README.md"]


def test_no_doc_or_comment_is_stale():
    """No Markdown or YAML file of the repository says a target is "not built yet" or
    points at a DESIGN.md: the design lives outside the repository."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "--", "*.md",
                            "*.yaml", "*.yml"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    stale = [f"{f}: {line.strip()}" for f in files if (REPO / f).is_file()
             for line in (REPO / f).read_text(errors="replace").splitlines()
             if re.search(r"not built yet|not yet built|DESIGN\.md", line, re.I)]
    assert not stale, "\n".join(stale)


@pytest.mark.slow
def test_diabetes_readme(tmp_path):
    proj = example_copy("diabetes", tmp_path)
    dev_port = free_port()
    use_free_dev_port(proj / "mlproject.yaml", dev_port)
    shell = Shell(proj, free_port())
    try:
        commands = run_commands(shell, proj)
        assert (proj / "models/sklearn_regression_model.pkl").is_file()
        deploy = shell.out["mlbuild deploy"]
        assert deploy.startswith("deploy dev:"), deploy  # the default target, dev
        status = json.loads(shell("mlbuild --json status dev"))[0]
        assert status["state"] == "Healthy" and status["pid"], status  # a local process
        assert shell.out["mlbuild deploy bundle"].startswith("deploy bundle:")
        assert (proj / "dist/package/diabetes/Dockerfile").is_file()
        # The samples are a request and its response; key auth: a Bearer key.
        url = f"http://127.0.0.1:{dev_port}"
        request = (proj / "samples/input.json").read_bytes()
        response = json.loads((proj / "samples/output.json").read_text())
        assert post(url + "/score", request)[0] == 401
        key = re.search(r"^primary:\s+(\S+)$", shell("mlbuild keys diabetes"), re.M).group(1)
        code, body = post(url + "/score", request, {"Authorization": f"Bearer {key}"})
        assert code == 200 and close(json.loads(body), response)
        invoked = shell.out["mlbuild invoke diabetes --data @samples/input.json"]
        assert close(json.loads(invoked), response)
        # ... and they feed the generated /swagger.json.
        swagger = get_json(url + "/swagger.json")["definitions"]
        assert swagger["ServiceInput"]["example"] == json.loads(request)
        assert close(swagger["ServiceOutput"]["example"], response)
        # envs/sklearn.yml is the conda alternative the manifest's comment names.
        m = proj / "mlproject.yaml"
        text = m.read_text()
        assert "    # conda: envs/sklearn.yml" in text
        m.write_text(re.sub(r"    requirements: envs/requirements.txt\n    # (conda: \S+)",
                            r"    \1", text))
        assert "valid" in shell("mlbuild validate")
        m.write_text(text)
        assert_named_paths_exist(proj)
        shell("mlbuild down")  # stops the service
        assert json.loads(shell("mlbuild --json status dev"))[0]["state"] == "-"
        assert_every_command_ran(shell, proj)
        assert len(commands) == 4
    finally:
        shell.stop_servers()
        subprocess.run("mlbuild down", shell=True, cwd=proj, env=shell.env,
                       capture_output=True, timeout=120)


@pytest.mark.slow
def test_multi_model_readme(tmp_path):
    proj = example_copy("multi-model", tmp_path)
    shell = Shell(proj, free_port())
    try:
        run_commands(shell, proj)
        assert {p.name for p in (proj / "models").iterdir()} == {"ridge.pkl", "lasso.pkl"}
        assert shell.out["mlbuild deploy"].startswith("deploy bundle:")
        assert (proj / "dist/package/compare/Dockerfile").is_file()
        script = (proj / "src/score.py").read_text()  # the Azure ML v1 way, as the README says
        assert "from azureml.core.model import Model" in script
        assert "Model.get_model_path(model_name=" in script
        # A request answers with both models' predictions, as samples/ shows.
        # The curl's answer: both models' predictions, as samples/output.json.
        curl = next(c for c in shell.out if c.startswith("curl "))
        answer = json.loads(shell.out[curl])
        assert set(answer) == {"ridge", "lasso"}, answer
        assert close(answer, json.loads((proj / "samples/output.json").read_text()))
        assert_named_paths_exist(proj)
        assert_every_command_ran(shell, proj)
    finally:
        shell.stop_servers()


@pytest.mark.slow
def test_onnx_nocode_readme(tmp_path):
    proj = example_copy("onnx-nocode", tmp_path)
    shell = Shell(proj, free_port())
    readme = (proj / "README.md").read_text()
    try:
        commands = run_commands(shell, proj)
        assert commands[-1].startswith("curl ")
        assert (proj / "models/iris.onnx").is_file()
        assert shell.out["mlbuild validate"].startswith("mlproject.yaml: valid")
        assert shell.out["mlbuild deploy"].startswith("deploy bundle:")
        assert (proj / "dist/package/iris/README.md").is_file()  # "as it says": docker
        # The curl's answer is samples/output.json: label and probabilities.
        answer = json.loads(shell.out[commands[-1]])
        response = json.loads((proj / "samples/output.json").read_text())
        assert answer["label"] == response["label"] == [0, 2]
        assert close(answer, response)
        # "(or the bare array)"
        url = f"http://127.0.0.1:{shell.port}/score"
        bare = json.dumps(json.loads((proj / "samples/input.json").read_text())["data"])
        assert close(json.loads(post(url, bare.encode())[1]), response)
        # Input of the wrong shape: the 400 the README shows, word for word.
        shown = re.search(r"```json\n(.*?)\n```", readme, re.S).group(1)
        assert post(url, b'{"data": [[1, 2]]}') == (400, shown.encode())
        assert_named_paths_exist(proj)
        assert_every_command_ran(shell, proj)
    finally:
        shell.stop_servers()
    # The samples feed the generated /swagger.json of the service.
    shell(f"mlbuild serve iris --port {README_PORT}")
    try:
        swagger = get_json(f"http://127.0.0.1:{shell.port}/swagger.json")["definitions"]
        assert swagger["ServiceInput"]["example"] == \
            json.loads((proj / "samples/input.json").read_text())
        assert close(swagger["ServiceOutput"]["example"], response)
    finally:
        shell.stop_servers()


@pytest.mark.slow
def test_root_manifest_comment_commands(tmp_path):
    """The root mlproject.yaml is the diabetes example seen from the repository root: its
    header comment's commands run there as written."""
    fresh_copy(["mlproject.yaml", "examples/diabetes"], tmp_path)
    port = free_port()
    use_free_dev_port(tmp_path / "mlproject.yaml", port)
    shell = Shell(tmp_path, free_port())
    try:
        commands = manifest_commands(tmp_path / "mlproject.yaml")
        assert commands[0] == "python examples/diabetes/train.py && mlbuild deploy", commands
        for command in commands:
            shell(command)
        assert shell.out[commands[0]].splitlines()[1].startswith("deploy dev:")
        invoked = shell.out["mlbuild invoke diabetes --data @examples/diabetes/samples/input.json"]
        assert close(json.loads(invoked),
                     json.loads((tmp_path / "examples/diabetes/samples/output.json").read_text()))
        assert shell.out["mlbuild deploy bundle"].startswith("deploy bundle:")
        assert (tmp_path / "dist/package/diabetes/Dockerfile").is_file()
    finally:
        subprocess.run("mlbuild down", shell=True, cwd=tmp_path, env=shell.env,
                       capture_output=True, timeout=120)
