"""`mlbuild plan` on generated projects of 10, 100 and 1,000 services.

    python bench/plan_scale.py [--sizes 10,100,1000]

Goal (issue: core): < 1 s at 1,000 services, growing linearly. Each service has its
own entry script and source folder; all share one environment and one model. Two
numbers per size: the first plan (validates the schema, builds the networkx graph,
hashes every file) and a warm plan (caches in .mlbuild hit), with the per-service
cost so linearity shows.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import med, mlbuild_cmd, row, time_cmd  # noqa: E402


def generate(root: Path, n: int) -> None:
    (root / "envs").mkdir(parents=True)
    (root / "envs/requirements.txt").write_text("scikit-learn>=1.5\n")
    (root / "models").mkdir()
    (root / "models/m.bin").write_bytes(b"\0" * 4096)
    lines = ["name: scale", "models:", "  m: {path: models/m.bin}",
             "environments:", "  env: {requirements: envs/requirements.txt}", "services:"]
    for i in range(n):
        src = root / f"svc{i}"
        src.mkdir()
        (src / "score.py").write_text(f"def init():\n    pass\n\ndef run(d):\n    return {i}\n")
        lines.append(f"  s{i}: {{entry_script: svc{i}/score.py, source_dir: svc{i}, "
                     f"environment: env, models: [m]}}")
    lines += ["targets:", "  bundle: {type: package, out: dist}", "default_target: bundle"]
    (root / "mlproject.yaml").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10,100,1000")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(row("services", "first s", "warm s", "warm ms/svc", widths=(12, 12, 12, 14)))
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            generate(root, n)
            time.sleep(1.1)  # out of the digest cache's "recently modified" window
            cmd = [*mlbuild_cmd(), "plan", "bundle"]
            first = time_cmd(cmd, root, repeat=1)[0]
            warm = med(time_cmd(cmd, root, repeat=5))
            print(row(n, f"{first:.3f}", f"{warm:.3f}", f"{warm / n * 1000:.2f}",
                      widths=(12, 12, 12, 14)))


if __name__ == "__main__":
    main()
