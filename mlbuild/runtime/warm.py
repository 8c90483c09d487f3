"""``python -m mlbuild.runtime.warm [IMPORTS]``: compile, while an image is built, the
bytecode of what a service imports when it starts.

The environment reaches the image without ``__pycache__`` (``mlbuild/slim.py``: most of
a numpy/scipy/scikit-learn environment's bytecode is for modules no service start
imports). This layer brings back the part that matters, by doing what a start does:

1. the runtime itself starts for real, serving a no-op entry script on loopback until
   it is ready, answers one ``/score``, and stops: uvicorn, its protocol and loop
   modules and the runtime's own are imported as in a real start;
2. every module named in IMPORTS (one per line; ``mlbuild/startup_imports.py`` writes
   it from the app's imports and the models' pickled classes) is imported.

Python writes the bytecode of each module as it imports it (as root, here). A module
that cannot be imported is noted and skipped: a start imports it (or fails) as without
this step. Never fails the build: the worst outcome is the compile-at-start cost this
saves. Bounded by a time limit (``WARM_SECONDS``).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

WARM_SECONDS = 300
READY_SECONDS = 120

NOOP_SCRIPT = "def init():\n    pass\n\n\ndef run(data):\n    return data\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_runtime_once() -> str:
    """Start the runtime on a no-op script, call it once, stop it. Returns a note."""
    with tempfile.TemporaryDirectory(prefix="mlbuild-warm-") as tmp:
        script = os.path.join(tmp, "score.py")
        ready = os.path.join(tmp, "ready.json")
        with open(script, "w", encoding="utf-8") as fh:
            fh.write(NOOP_SCRIPT)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("MLBUILD_", "AZUREML_", "AML_"))
               and k != "PYTHONDONTWRITEBYTECODE"}
        env.update(MLBUILD_AUTH="none", HOME=tmp)
        port = _free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlbuild.runtime", "--entry-script", script,
             "--host", "127.0.0.1", "--port", str(port), "--ready-file", ready,
             "--log-level", "warning"], env=env, cwd=tmp)
        try:
            deadline = time.monotonic() + READY_SECONDS
            while not os.path.exists(ready):
                if proc.poll() is not None:
                    return f"the runtime exited with {proc.returncode} before it was ready"
                if time.monotonic() > deadline:
                    return f"the runtime was not ready within {READY_SECONDS} s"
                time.sleep(0.05)
            req = urllib.request.Request(f"http://127.0.0.1:{port}/score",
                                         data=json.dumps({"warm": 1}).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as resp:
                resp.read()
            return "runtime started and answered"
        except OSError as exc:
            return f"the runtime did not answer: {exc}"
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def import_listed(names: list[str]) -> tuple[int, list[str]]:
    """Import each of ``names``; returns (how many imported, the failures noted)."""
    done, failed = 0, []
    for name in names:
        try:
            importlib.import_module(name)
            done += 1
        except BaseException as exc:  # noqa: BLE001 -- an import may raise anything
            failed.append(f"{name} ({type(exc).__name__})")
    return done, failed


def main(argv: list[str]) -> int:
    sys.dont_write_bytecode = False
    # SIGALRM's default action ends the process: a hanging import cannot hang the build
    # (the RUN line goes on either way).
    signal.alarm(WARM_SECONDS)
    # What an import writes to a home folder (font caches, config) stays out of the image.
    home = tempfile.mkdtemp(prefix="mlbuild-warm-home-")
    os.environ["HOME"] = home
    note = start_runtime_once()
    names: list[str] = []
    if argv:
        with open(argv[0], encoding="utf-8") as fh:
            names = [ln.strip() for ln in fh if ln.strip() and not ln.startswith("#")]
    # NOTE: an imported module may print, or start threads that would hold the exit.
    done, failed = import_listed(names)
    msg = f"warm: {note}; imported {done} of {len(names)} listed modules"
    if failed:
        msg += f" (not importable, compiled at first use if ever: {', '.join(failed[:20])}"
        msg += f" and {len(failed) - 20} more)" if len(failed) > 20 else ")"
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    shutil.rmtree(home, ignore_errors=True)
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
