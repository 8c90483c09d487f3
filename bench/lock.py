"""Locked environments on the demo: lock time, a spec edit that keeps the lock, offline twice.

    python bench/lock.py [--repeat N]

Measured in one run on a copy of examples/diabetes (package target `bundle`):

  lock        `mlbuild lock sklearn --upgrade` (uv pip compile --generate-hashes for
              linux/3.11, the demo's requirements) beside the baseline, pip's own
              resolver on the same requirements: `pip install --dry-run
              --ignore-installed --quiet -r envs/requirements.txt` (resolves and fetches
              metadata, installs nothing; it gives no hashes, which only makes it cheaper).
  spec edit   a comment added to envs/requirements.txt, then `mlbuild deploy bundle`:
              the lock step re-runs and finds the same packages; every other step must
              be up to date (zero environment rebuild). Beside: a no-op deploy.
  offline x2  `mlbuild deploy bundle --offline` cold (wheels downloaded), then after
              `mlbuild clean` again: the wheels must all come from the cache (0
              downloaded). Ratio: second / first.

Goals (issue: environments, "Speed"): spec edit rebuilds nothing but the lock step;
the second offline package downloads nothing. Lock time is reported against pip.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import demo_copy, med, mlbuild_cmd, row  # noqa: E402


def run(cmd: list[str], cwd: Path) -> tuple[float, str]:
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")
    return dt, r.stdout


def steps(out: str) -> dict[str, dict]:
    return {s["id"]: s for s in json.loads(out)["steps"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    mb = mlbuild_cmd()
    ok = True
    with tempfile.TemporaryDirectory(prefix="mlbuild-bench-lock-") as tmp:
        proj = demo_copy(Path(tmp))
        spec = proj / "envs/requirements.txt"

        lock_t, pip_t = [], []
        for _ in range(args.repeat):
            lock_t.append(run([*mb, "lock", "sklearn", "--upgrade"], proj)[0])
            pip_t.append(run([sys.executable, "-m", "pip", "install", "--dry-run",
                              "--ignore-installed", "--quiet", "--disable-pip-version-check",
                              "-r", str(spec)], proj)[0])

        run([*mb, "deploy", "bundle"], proj)
        noop_t, edit_t, rebuilt = [], [], set()
        for i in range(args.repeat):
            noop_t.append(run([*mb, "deploy", "bundle"], proj)[0])
            spec.write_text(f"# edit {i}\n" + spec.read_text())
            dt, out = run([*mb, "--json", "deploy", "bundle"], proj)
            edit_t.append(dt)
            rebuilt |= {k for k, s in steps(out).items() if s["status"] == "ran"} - {"lock:sklearn"}

        first, out1 = run([*mb, "--json", "deploy", "bundle", "--offline"], proj)
        run([*mb, "clean"], proj)
        second, out2 = run([*mb, "--json", "deploy", "bundle", "--offline"], proj)
        w1, w2 = steps(out1)["wheels:sklearn"]["summary"], steps(out2)["wheels:sklearn"]["summary"]

    print(row("", "mlbuild", "baseline", "ratio", widths=(44, 12, 12, 10)))
    print(row("lock the demo env (vs pip --dry-run)", f"{med(lock_t):.2f} s",
              f"{med(pip_t):.2f} s", f"{med(lock_t) / med(pip_t):.2f}x", widths=(44, 12, 12, 10)))
    print(row("deploy after a spec edit (vs no-op)", f"{med(edit_t):.2f} s",
              f"{med(noop_t):.2f} s", f"{med(edit_t) / med(noop_t):.2f}x", widths=(44, 12, 12, 10)))
    print(row("offline package, 2nd (vs 1st)", f"{second:.2f} s", f"{first:.2f} s",
              f"{second / first:.2f}x", widths=(44, 12, 12, 10)))
    print()
    print(f"spec edit: steps rebuilt besides the lock: {sorted(rebuilt) or 'none'}"
          f"  [{'ok' if not rebuilt else 'MISSED'}]")
    ok &= not rebuilt
    print(f"offline 1st: {w1}")
    zero = w2 == w1.split(" (")[0] + " (0 downloaded)"  # the same files, none fetched
    print(f"offline 2nd: {w2}  [{'ok' if zero else 'MISSED'}]")
    ok &= zero
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
