"""No-op deploy of a kubernetes target (against tests/kubefake's API server) beside a
no-op deploy of the process target of the same project, measured in the same run.

    python bench/k8s_noop.py [--repeat N]

Goal (issue "Kubernetes target", section "Speed"): a no-op `mlbuild deploy staging` <= 2x
a no-op `mlbuild deploy dev`. Needs the engines (Docker and the registry on
127.0.0.1:5000: .ci/engines.sh) for the one real deploy before the no-ops, and lightkube.
The fake API server and its controller stand-in run in this process; only 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import demo_copy, med, mlbuild_cmd, row, time_cmd  # noqa: E402

REGISTRY = os.environ.get("MLBUILD_REGISTRY_ADDR", "127.0.0.1:5000")


def main() -> None:
    from kubefake import Controller, KubeFake

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=11)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, KubeFake() as kube:
        kube.add_namespace("ml")
        ctl = Controller(kube)
        ctl.run(interval=0.05)
        proj = demo_copy(Path(tmp))
        m = proj / "mlproject.yaml"
        m.write_text(m.read_text().replace("name: diabetes", f"name: diabetes\nregistry: "
                                                             f"{REGISTRY}/bench")
                     .replace("default_target: dev", "  staging: {type: kubernetes, "
                                                     "namespace: ml, replicas: 2}\n"
                                                     "default_target: dev"))
        os.environ["KUBECONFIG"] = str(kube.write_kubeconfig(Path(tmp) / "kubeconfig"))
        cmd = mlbuild_cmd()
        runs = {"mlbuild deploy dev (process, no-op)": [*cmd, "deploy", "dev"],
                "mlbuild deploy staging (kubernetes, no-op)": [*cmd, "deploy", "staging"]}
        try:
            for c in runs.values():
                time_cmd(c, proj, repeat=1)  # the real deploys
                time_cmd(c, proj, repeat=2)  # settle caches
            results: dict[str, list[float]] = {name: [] for name in runs}
            for _ in range(args.repeat):  # interleaved: noise hits both alike
                for name, c in runs.items():
                    results[name] += time_cmd(c, proj, repeat=1)
        finally:
            time_cmd([*cmd, "down", "dev"], proj, repeat=1)
            ctl.stop()
        base = med(results["mlbuild deploy dev (process, no-op)"])
        print(row("command", "median s", "x process"))
        for name, xs in results.items():
            print(row(name, f"{med(xs):.3f}", f"{med(xs) / base:.2f}"))
        ratio = med(results["mlbuild deploy staging (kubernetes, no-op)"]) / base
        print(f"\nkubernetes no-op / process no-op: {ratio:.2f} (goal <= 2.0): "
              f"{'OK' if ratio <= 2.0 else 'MISSED'}")


if __name__ == "__main__":
    main()
