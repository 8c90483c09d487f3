"""Start-up and failure: slow init, failing init, broken scripts, busy port, isolation."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO, START_TIMEOUT, write_script


def test_scoring_port_holds_requests_until_init_returned(start_server, tmp_path):
    """As azmlinfsrv: nothing on the scoring port answers before init() returned -- a
    client polling GET / and then posting gets its answer, not a 503. The explicit probes
    answer at once: /healthz/live 200, /healthz/ready 503 until ready."""
    script = write_script(tmp_path, """
        import time

        def init():
            time.sleep(2.0)

        def run(raw_data):
            return "ok"
    """)
    server = start_server(["--entry-script", str(script)], wait="listening")
    assert server.get("/healthz/live").status == 200
    ready = server.get("/healthz/ready")
    assert ready.status == 503 and ready.json()["status_code"] == 503
    started = time.monotonic()
    health = server.get("/", timeout=15)  # held, then "Healthy"
    held_for = time.monotonic() - started
    assert (health.status, health.body) == (200, b"Healthy")
    assert held_for > 0.5, held_for  # it waited for init(), it did not answer at once
    assert server.get("/healthz/ready").status == 200
    assert server.post(body="{}").json() == "ok"


def test_a_request_held_past_start_hold_gets_503(start_server, tmp_path):
    script = write_script(tmp_path, """
        import time

        def init():
            time.sleep(3.0)

        def run(raw_data):
            return "ok"
    """)
    server = start_server(["--entry-script", str(script)], wait="listening",
                          env={"MLBUILD_START_HOLD": "0.3"})
    busy = server.post(body="{}")
    assert busy.status == 503 and busy.json()["status_code"] == 503
    assert busy.headers["retry-after"]
    server.wait_ready(timeout=15)
    assert server.post(body="{}").json() == "ok"


def test_init_raising_exits_nonzero_with_traceback(start_server, tmp_path):
    script = write_script(tmp_path, """
        def init():
            raise RuntimeError("cannot load the model file")

        def run(raw_data):
            return None
    """)
    server = start_server(["--entry-script", str(script)], wait=None)
    started = time.monotonic()
    code = server.wait_exit(timeout=START_TIMEOUT)
    assert code != 0
    assert time.monotonic() - started < START_TIMEOUT
    out = server.output()
    assert "Traceback" in out and "cannot load the model file" in out
    assert 'score.py", line 3, in init' in out


@pytest.mark.parametrize("source, needle", [
    ("def init(:\n    pass\n", "SyntaxError"),
    ("def init():\npass\n", "IndentationError"),
    ("import no_such_module_xyz\n", "ModuleNotFoundError"),
    ("def init():\n    pass\n", "defines no run()"),
])
def test_broken_script_exits_nonzero(start_server, tmp_path, source, needle):
    (tmp_path / "score.py").write_text(source)
    server = start_server(["--entry-script", str(tmp_path / "score.py")], wait=None)
    assert server.wait_exit() != 0
    assert needle in server.output()


def test_missing_script_and_no_script(start_server, tmp_path):
    server = start_server(["--entry-script", str(tmp_path / "nope.py")], wait=None)
    assert server.wait_exit() != 0
    assert "does not exist" in server.output()
    bare = start_server([], wait=None)
    assert bare.wait_exit() == 2
    assert "nothing to serve" in bare.output()


def test_port_in_use_exits_and_leaves_the_other_server_alone(start_server, tmp_path):
    script = write_script(tmp_path, "def init():\n    pass\n\ndef run(raw_data):\n    return 1\n")
    first = start_server(["--entry-script", str(script)])
    second = start_server(["--entry-script", str(script)], port=first.port, wait=None)
    assert second.wait_exit() == 1
    assert "cannot listen" in second.output()
    assert first.post(body="{}").json() == 1


def test_runtime_runs_from_a_copy_without_the_rest_of_mlbuild(start_server, tmp_path):
    """As in an image: only mlbuild/__init__.py and mlbuild/runtime/ on the path."""
    opt = tmp_path / "opt"
    shutil.copytree(REPO / "mlbuild" / "runtime", opt / "mlbuild" / "runtime",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "mlbuild" / "__init__.py", opt / "mlbuild" / "__init__.py")
    script = write_script(tmp_path, """
        import sys
        import mlbuild

        def init():
            pass

        def run(raw_data):
            # click is not listed: uvicorn itself depends on (and imports) it.
            heavy = ["yaml", "jinja2", "networkx", "jsonschema", "mlbuild.cli"]
            return {"file": mlbuild.__file__,
                    "loaded": [m for m in heavy if m in sys.modules],
                    "others": sorted(m for m in sys.modules if m.startswith("mlbuild.")
                                     and not m.startswith("mlbuild.runtime"))}
    """)
    server = start_server(["--entry-script", str(script)], pythonpath=str(opt))
    out = server.post(body="{}").json()
    assert out["file"].startswith(str(opt))
    assert out["loaded"] == [] and out["others"] == []


def test_requirements_file_lists_the_runtime_dependencies():
    text = (REPO / "mlbuild" / "runtime" / "requirements.txt").read_text()
    names = [ln.split(">=")[0].strip() for ln in text.splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert names == ["uvicorn", "httptools", "uvloop", "prometheus_client"]


def test_help_accepts_azure_spellings():
    out = subprocess.run([sys.executable, "-m", "mlbuild.runtime", "--help"],
                         capture_output=True, text=True, timeout=30).stdout
    for flag in ("--entry_script", "--model_dir", "--worker_count",
                 "--access_control_allow_origins", "--max-body-bytes"):
        assert flag in out
