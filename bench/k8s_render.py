"""Rendering the kubernetes target's objects for 100 services (mlbuild/kube/render.py).

    python bench/k8s_render.py [--services 100] [--repeat 7]

Goal (issue: kubernetes target): under 1 s for 100 services. Each service gets every
object (autoscale with a PodDisruptionBudget, ingress, auth key, GPU, pull secret).
Three renders are timed: ``render_target`` (the files a deploy writes to out),
``render_service`` for each service (the same templates, parsed into the objects the
deploy step applies), and the first render in a fresh process (templates compiled).
The baseline, measured in the same run, is ``yaml.safe_dump`` of the same objects: what
writing them out from Python dicts would cost, with no templates at all (``json.dumps``
beside it, the floor of any serialisation).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from mlbuild.kube.render import ServiceInput, render_service, render_target  # noqa: E402
from mlbuild.kube.settings import Autoscale, Ingress, KubeSettings  # noqa: E402

GOAL_S = 1.0
SETTINGS = KubeSettings(
    namespace="ml", replicas=None, autoscale=Autoscale(min=2, max=10), gpu=1,
    max_concurrent_requests=4, image_pull_secret="registry-credentials",
    ingress=Ingress(host="ml.example.com", class_name="nginx", tls_secret="ml-tls"),
)


def services(n: int) -> list[ServiceInput]:
    return [ServiceInput(name=f"svc{i}", image=f"127.0.0.1:5000/ml/bench-svc{i}@sha256:"
                         + f"{i:064x}", fingerprint=f"{i:064x}", auth="key",
                         cors=("https://app.example.com",)) for i in range(n)]


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cold(n: int) -> float:
    """The first render_target of a fresh process: templates loaded and compiled."""
    code = ("import time, sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2]);"
            "from k8s_render import SETTINGS, services;"
            "from mlbuild.kube.render import render_target;"
            f"s = services({n}); t = time.perf_counter(); render_target('bench', s, SETTINGS);"
            "print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code, str(REPO), str(Path(__file__).parent)],
                         check=True, capture_output=True, text=True).stdout
    return float(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    svcs = services(args.services)

    def per_service():
        return [o for s in svcs for o in render_service(
            "bench", s.name, s.image, s.fingerprint, SETTINGS, auth=s.auth, cors=s.cors)]

    objects = per_service()
    files = render_target("bench", svcs, SETTINGS)
    results = {
        "render_target (files for out)": timed(lambda: render_target("bench", svcs, SETTINGS),
                                               args.repeat),
        "render_service x N (parsed objects)": timed(per_service, args.repeat),
        "first render_target, fresh process": cold(args.services),
        "baseline: yaml.safe_dump of the objects": timed(
            lambda: [yaml.safe_dump(o, sort_keys=False) for o in objects], args.repeat),
        "baseline: json.dumps of the objects": timed(
            lambda: [json.dumps(o) for o in objects], args.repeat),
    }
    base = results["baseline: yaml.safe_dump of the objects"]
    print(f"{args.services} services, {len(objects)} objects, {len(files)} files\n")
    print(f"{'':44}{'median s':>12}{'x safe_dump':>14}")
    for name, s in results.items():
        print(f"{name:44}{s:12.4f}{s / base:14.2f}")
    worst = max(results[k] for k in list(results)[:3])
    scaled = worst * 100 / args.services
    verdict = "ok" if scaled < GOAL_S else "MISSED"
    print(f"\ngoal: under {GOAL_S:g} s for 100 services: slowest render {scaled:.3f} s "
          f"per 100 services: {verdict}")


if __name__ == "__main__":
    main()
