"""A default profile of the demo (`mlbuild profile diabetes`, docker target): its wall time.

    python bench/profile.py

Goal (issue 17): under 2 minutes, the image build included (the first run also builds
the environment layers; the time of a second run, image up to date, is shown too).
Prints each grid point's sustained rate and the recommendation beside the times.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import demo_copy, mlbuild_cmd, row  # noqa: E402

GOAL_S = 120.0


def run(proj: Path) -> tuple[float, dict]:
    t = time.perf_counter()
    r = subprocess.run([*mlbuild_cmd(), "--json", "profile", "diabetes", "-t", "local"],
                       cwd=proj, capture_output=True, text=True, timeout=900)
    took = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"mlbuild profile failed:\n{r.stdout}\n{r.stderr}")
    return took, json.loads(r.stdout)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        proj = demo_copy(Path(tmp))
        first, _ = run(proj)
        second, doc = run(proj)
    print(row("default profile of the demo", "seconds", "goal"))
    print(row("  first run (image built)", f"{first:.1f}", f"<= {GOAL_S:.0f}"))
    print(row("  second run (image up to date)", f"{second:.1f}", f"<= {GOAL_S:.0f}"))
    for p in doc["grid"]:
        print(row(f"  cpu {p['cpu']:g}, memory {p['memory_gb']:g} GB: sustained req/s",
                  str(p["sustained_rps"]), ""))
        print(f"      stopped: {p['stop']}")
    print(row("  recommended cpu / memory GB",
              f"{doc['recommendedCpu']} / {doc['recommendedMemoryInGB']}", ""))
    print(f"ratio to the goal: {max(first, second) / GOAL_S:.2f}x "
          f"({'met' if max(first, second) <= GOAL_S else 'MISSED'})")


if __name__ == "__main__":
    main()
