"""Shared helpers for the benchmarks: timing whole commands, medians, tables."""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def mlbuild_cmd() -> list[str]:
    """The installed console script beside this Python, else ``python -m mlbuild``.

    NOTE: mlbuild's own bytecode is brought up to date first, as a ``pip install``
    leaves it: in an editable checkout under PYTHONDONTWRITEBYTECODE=1 (or with a
    read-only tree) every timed run would otherwise compile ~35 modules again
    (~0.08 s of each no-op measured), which no user's installed mlbuild does.
    """
    import compileall

    for pkg in ("mlbuild", "templates", "schemas"):
        compileall.compile_dir(str(REPO / pkg), quiet=2)
    script = Path(sys.executable).parent / "mlbuild"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mlbuild"]


def time_cmd(cmd: list[str], cwd: Path | None = None, repeat: int = 7) -> list[float]:
    """Wall times of ``repeat`` runs of a command (which must succeed)."""
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out.append(time.perf_counter() - t)
    return out


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def demo_copy(dest: Path) -> Path:
    """A copy of examples/diabetes with its model trained."""
    proj = dest / "diabetes"
    shutil.copytree(REPO / "examples/diabetes", proj,
                    ignore=shutil.ignore_patterns("dist", ".mlbuild", "__pycache__"))
    if not (proj / "models/sklearn_regression_model.pkl").exists():
        subprocess.run([sys.executable, str(proj / "train.py")], check=True, stdout=subprocess.DEVNULL)
    return proj


def row(*cols, widths=(44, 12, 12)) -> str:
    return "".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                   for i, (c, w) in enumerate(zip(cols, widths)))
