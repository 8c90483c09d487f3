"""The process target (`mlbuild deploy dev`) on the demo: cold, no-op, edit code, edit model.

    python bench/process.py [--repeat N]

Baselines measured in the same run:
  * `python -c pass` — the floor of any Python CLI (for the no-op deploy);
  * "runtime start" — `python -m mlbuild.runtime` on the same script and model, from
    exec to the first 200 from /score: the floor of any redeploy that restarts the
    service (a redeploy adds the context rebuild, the swap and mlbuild's own start-up).

Goals: no-op deploy <= 0.3 s; a redeploy after editing score.py <= 2x "runtime start";
editing the model re-registers it and restarts the service but never re-makes the venv.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import demo_copy, med, mlbuild_cmd, row, time_cmd  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy(proj: Path) -> tuple[float, list[str]]:
    t = time.perf_counter()
    r = subprocess.run([*mlbuild_cmd(), "--json", "deploy", "dev"], cwd=proj, check=True,
                       capture_output=True, text=True)
    took = time.perf_counter() - t
    return took, [s["id"] for s in json.loads(r.stdout)["steps"] if s["status"] == "ran"]


def runtime_start(proj: Path, python: str) -> float:
    """exec of the runtime -> first 200 from /score, with the release the target made."""
    run_root = proj / ".mlbuild/run/dev/diabetes"
    release = next(p for p in run_root.iterdir() if (p / "ready.json").exists())
    model_dir = next((release / "models/ridge").iterdir())  # the current version
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLBUILD_", "AZUREML_"))}
    env.update(PYTHONPATH=str(release / "runtime"),
               MLBUILD_ENTRY_SCRIPT=str(release / "app/score.py"),
               MLBUILD_MODEL_DIR=str(model_dir), MLBUILD_ACCESS_LOG="0")
    body = (proj / "samples/input.json").read_bytes()
    t = time.perf_counter()
    p = subprocess.Popen([python, "-m", "mlbuild.runtime", "--host", "127.0.0.1", "--port",
                          str(port)], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, cwd=release / "app")
    try:
        while True:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/score", data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - t
            except OSError:
                if p.poll() is not None:
                    raise SystemExit(f"the runtime exited with status {p.returncode}")
                time.sleep(0.005)
    finally:
        p.terminate()
        p.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proj = demo_copy(Path(tmp))
        m = proj / "mlproject.yaml"
        m.write_text(re.sub(r"dev:\s*\{type: process, port: \d+\}",
                            f"dev: {{type: process, port: {free_port()}}}", m.read_text())
                     .replace("auth: key", "auth: none"))
        try:
            cold, _ = deploy(proj)
            venv_python = str(next((proj / ".mlbuild/venvs").iterdir()) / "bin/python")
            score = proj / "src/score.py"
            model = proj / "models/sklearn_regression_model.pkl"
            res: dict[str, list[float]] = {"pass": [], "noop": [], "edit": [], "model": [],
                                           "start": []}
            ran_edit, ran_model = [], []
            for i in range(args.repeat):
                res["pass"] += time_cmd([sys.executable, "-c", "pass"], repeat=1)
                res["noop"].append(deploy(proj)[0])
                score.write_text(score.read_text() + f"\n# edit {i}\n")
                t, ran_edit = deploy(proj)
                res["edit"].append(t)
                with open(model, "ab") as fh:  # same pickle, new bytes: a new version
                    fh.write(b"\0")
                t, ran_model = deploy(proj)
                res["model"].append(t)
                res["start"].append(runtime_start(proj, venv_python))
        finally:
            subprocess.run([*mlbuild_cmd(), "down", "dev"], cwd=proj, capture_output=True)
        base, start = med(res["pass"]), med(res["start"])
        print(row("measure", "median s", "ratio", widths=(52, 10, 22)))
        print(row("python -c pass", f"{base:.3f}", "1.0x pass", widths=(52, 10, 22)))
        print(row("runtime start (exec -> first 200)", f"{start:.3f}", "1.0x start",
                  widths=(52, 10, 22)))
        print(row("deploy dev, cold (venv from uv's cache)", f"{cold:.3f}",
                  f"{cold / start:.1f}x start", widths=(52, 10, 22)))
        print(row("deploy dev, no-op (service running)", f"{med(res['noop']):.3f}",
                  f"{med(res['noop']) / base:.1f}x pass", widths=(52, 10, 22)))
        print(row("deploy dev after editing score.py", f"{med(res['edit']):.3f}",
                  f"{med(res['edit']) / start:.1f}x start", widths=(52, 10, 22)))
        print(row("deploy dev after changing the model", f"{med(res['model']):.3f}",
                  f"{med(res['model']) / start:.1f}x start", widths=(52, 10, 22)))
        print(f"\nsteps run after editing score.py: {ran_edit}")
        print(f"steps run after changing the model: {ran_model}")
        noop = med(res["noop"])
        print(f"no-op <= 0.3 s: {'OK' if noop <= 0.3 else 'OVER'}; edit <= 2x start: "
              f"{'OK' if med(res['edit']) <= 2 * start else 'OVER'}; model change re-made "
              f"the venv: {'YES (bad)' if any(s.startswith('venv:') for s in ran_model) else 'no'}")


if __name__ == "__main__":
    main()
