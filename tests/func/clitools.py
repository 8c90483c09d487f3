"""Helpers for functional tests: the CLI run as a subprocess on copies of examples/."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


def free_port() -> int:
    """A port free on 127.0.0.1 now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CLI:
    """Runs ``python -m mlbuild`` in a project folder."""

    def __init__(self, cwd: Path):
        self.cwd = cwd

    def __call__(self, *args: str, check: int | None = 0, env: dict | None = None,
                 timeout: float = 120) -> subprocess.CompletedProcess:
        full_env = {**os.environ, **(env or {})}
        r = subprocess.run([sys.executable, "-m", "mlbuild", *args], cwd=self.cwd,
                           capture_output=True, text=True, env=full_env, timeout=timeout)
        if check is not None and r.returncode != check:
            raise AssertionError(
                f"mlbuild {' '.join(args)} exited {r.returncode}, expected {check}\n"
                f"--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}")
        return r

    def json(self, *args: str, **kw) -> dict:
        r = self("--json", *args, **kw)
        return json.loads(r.stdout)

    def ran(self, *args: str, **kw) -> list[str]:
        """Ids of the steps that ran."""
        data = self.json(*args, **kw)
        return [s["id"] for s in data["steps"] if s["status"] == "ran"]




def train_examples(work_root: Path) -> dict[str, Path]:
    """Run each example's train.py once; returns {example: models folder}."""
    out = {}
    for name in ("diabetes", "multi-model"):
        work = work_root / f"train-{name}"
        shutil.copytree(EXAMPLES / name, work / name,
                        ignore=shutil.ignore_patterns("*.pkl", "dist", ".mlbuild"))
        subprocess.run([sys.executable, str(work / name / "train.py")], check=True,
                       capture_output=True, timeout=300)
        out[name] = work / name / "models"
    return out


def copy_example(name: str, dest: Path, trained: dict[str, Path]) -> Path:
    proj = dest / name
    shutil.copytree(EXAMPLES / name, proj,
                    ignore=shutil.ignore_patterns("*.pkl", "dist", ".mlbuild", "__pycache__"))
    (proj / "models").mkdir(exist_ok=True)  # holds only git-ignored files: absent in a clone
    for f in trained[name].iterdir():
        shutil.copy2(f, proj / "models" / f.name)
    return proj
