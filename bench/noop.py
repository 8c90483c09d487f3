"""No-op deploy of the demo's package target, beside Python's own start-up.

    python bench/noop.py [--repeat N]

Goal (issue: core): a no-op `mlbuild deploy bundle` <= 0.3 s wall. Printed beside
`python -c pass` and `python -c "import mlbuild"`, measured in the same run, with
ratios to `python -c pass` (the floor any Python CLI pays).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import demo_copy, med, mlbuild_cmd, row, time_cmd  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=11)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proj = demo_copy(Path(tmp))
        deploy = [*mlbuild_cmd(), "deploy", "bundle"]
        cold = time_cmd(deploy, proj, repeat=1)[0]
        time_cmd(deploy, proj, repeat=2)  # settle caches
        results = {}
        # interleave the three so machine noise hits them alike
        runs = {"python -c pass": [sys.executable, "-c", "pass"],
                "python -c 'import mlbuild'": [sys.executable, "-c", "import mlbuild"],
                "mlbuild deploy bundle (no-op)": deploy,
                "mlbuild plan bundle": [*mlbuild_cmd(), "plan", "bundle"]}
        for name in runs:
            results[name] = []
        for _ in range(args.repeat):
            for name, cmd in runs.items():
                results[name] += time_cmd(cmd, proj, repeat=1)
        base = med(results["python -c pass"])
        print(row("command", "median s", "x pass"))
        print(row("mlbuild deploy bundle (cold, first run)", f"{cold:.3f}", f"{cold / base:.1f}"))
        for name, xs in results.items():
            print(row(name, f"{med(xs):.3f}", f"{med(xs) / base:.1f}"))
        noop = med(results["mlbuild deploy bundle (no-op)"])
        print(f"\nno-op deploy: {noop:.3f} s (goal <= 0.300 s): {'OK' if noop <= 0.3 else 'OVER'}")


if __name__ == "__main__":
    main()
