"""``python -m mlbuild.runtime.warm``: the runtime started for real on loopback, the
listed modules imported, bytecode written for exactly what was imported."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_warm_compiles_what_is_imported_and_nothing_else(tmp_path):
    lib = tmp_path / "lib"
    (lib / "hotpkg").mkdir(parents=True)
    (lib / "hotpkg/__init__.py").write_text("from hotpkg import sub\n")
    (lib / "hotpkg/sub.py").write_text("VALUE = 1\n")
    (lib / "coldmod.py").write_text("VALUE = 2\n")
    (lib / "broken.py").write_text("raise RuntimeError('import-time failure')\n")
    imports = tmp_path / "imports.txt"
    imports.write_text("hotpkg\nbroken\nno_such_module_here\n")
    # The runtime as an image holds it (/opt/mlbuild), without any bytecode.
    rt = tmp_path / "rt/mlbuild"
    shutil.copytree(REPO / "mlbuild/runtime", rt / "runtime",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "mlbuild/__init__.py", rt / "__init__.py")
    env = {**os.environ, "PYTHONPATH": f"{lib}{os.pathsep}{rt.parent}",
           "PYTHONDONTWRITEBYTECODE": "1",  # as the image's ENV sets it
           "MLBUILD_AUTH": "key"}  # the image's settings do not reach the warm-up start

    r = subprocess.run([sys.executable, "-m", "mlbuild.runtime.warm", str(imports)],
                       capture_output=True, text=True, env=env, timeout=180, cwd=tmp_path)

    assert r.returncode == 0, r.stdout + r.stderr
    assert "warm: runtime started and answered; imported 1 of 3 listed modules" in r.stdout
    assert "broken (RuntimeError)" in r.stdout
    assert "no_such_module_here (ModuleNotFoundError)" in r.stdout
    # broken.py was compiled before it raised: a start would import it the same way.
    compiled = sorted(p.name.split(".")[0] for p in lib.rglob("*.pyc"))
    assert compiled == ["__init__", "broken", "sub"]
    # The runtime's own modules were imported by a real start, so they have bytecode too.
    runtime_pycs = {p.name.split(".")[0] for p in (rt / "runtime").rglob("*.pyc")}
    assert {"server", "app", "scoring", "config"} <= runtime_pycs
