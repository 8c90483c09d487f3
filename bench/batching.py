"""Adaptive batching in the serving runtime, beside the same service unbatched and BentoML.

    python bench/batching.py [--duration S] [--rounds N] [--batch-size N] [--latency-ms M]
                             [--threads T] [--no-pin] [--bentoml PATH]

Goals, at c=32 with one worker each, 127.0.0.1 only (issue 18, section 1, "Speed"):
  batched req/s >= 4x unbatched; batched p99 <= unbatched p99; batched req/s ahead of
  BentoML 1.4's adaptive batching (ratio > 1; printed with the p99 ratio).

Servers, all serving the same RandomForestRegressor(n_estimators=100) on 16 features
(trained here on make_regression data, random_state 0) to POSTs of one row,
``{"data": [[16 floats]]}`` (a body both runtimes take as it is):
  batched     python -m mlbuild.runtime serving the pickle without code, with
              MLBUILD_BATCH_MAX_SIZE=--batch-size and MLBUILD_BATCH_MAX_LATENCY_MS=
              --latency-ms (what ``batching: {max_batch_size, max_latency_ms}`` sets);
              the runtime's defaults otherwise (access log on, written to a file)
  unbatched   the same command without those two variables
  bentoml     BentoML 1.4, ``bentoml serve`` of a service.py written here: one worker,
              ``@bentoml.api(batchable=True, max_batch_size=--batch-size)`` loading the same
              pickle; its max_latency_ms left at its default (60000): in BentoML it is a
              latency budget past which queued requests are refused with 503, not a
              window, and its dispatcher picks the wait itself. Its own venv (its pins
              clash with ours), found through --bentoml or $BENTOML (else
              /tmp/bentovenv/bin/bentoml); skipped, saying why, when absent:
                  python3 -m venv /tmp/bentovenv
                  /tmp/bentovenv/bin/pip install 'bentoml>=1.4,<1.5' \\
                      scikit-learn==<same as here> joblib numpy
Load: `wrk --latency` with a POST Lua script at c=32 (and c=1, shown, not a goal: what
a request alone pays for the window), in short runs over interleaved rounds, the order
reversed every other round; wrk on the first CPU and the servers on the others
(taskset; --no-pin leaves placement to the kernel). Reported: medians over the rounds;
ratios are medians of the per-round ratios; CPU us/req is the server process tree's
user+system CPU time over the requests it answered; non-2xx answers are counted (a
server that answers errors fast is not fast). At the end the batched server's
/metrics gives its mean batch size and the mean time a request waited for its batch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import Server, cpu_split, free_port, paired_ratio, run_rounds, run_wrk  # noqa: E402

CONCURRENCY = (1, 32)
GOAL_C = 32

BENTO_SERVICE = textwrap.dedent("""\
    # BentoML 1.4's adaptive batching over the same pickled forest.
    import os

    import bentoml
    import joblib
    import numpy as np


    @bentoml.service(workers=1)
    class Forest:
        def __init__(self) -> None:
            self.model = joblib.load(os.environ["BENCH_MODEL"])

        @bentoml.api(batchable=True, max_batch_size={batch_size})
        def predict(self, data: np.ndarray) -> np.ndarray:
            return self.model.predict(data)
    """)

POST_LUA = textwrap.dedent("""\
    wrk.method = "POST"
    wrk.headers["Content-Type"] = "application/json"
    local f = assert(io.open("{body}", "rb"))
    wrk.body = f:read("*a")
    f:close()
    """)

LABELS = {"batched": "mlbuild batched", "unbatched": "mlbuild unbatched",
          "bentoml": "BentoML 1.4 batched"}


def train(workdir: Path) -> tuple[bytes, float]:
    """The forest, the request body and the Lua script in ``workdir``; returns the body
    and the forest's prediction for it."""
    import joblib
    from sklearn.datasets import make_regression
    from sklearn.ensemble import RandomForestRegressor

    X, y = make_regression(n_samples=4000, n_features=16, noise=5.0, random_state=0)
    model = RandomForestRegressor(n_estimators=100, random_state=0).fit(X, y)
    joblib.dump(model, workdir / "model.pkl")
    body = json.dumps({"data": X[:1].tolist()}).encode()
    (workdir / "body.json").write_bytes(body)
    (workdir / "post.lua").write_text(POST_LUA.format(body=workdir / "body.json"))
    return body, float(model.predict(X[:1])[0])


def find_bentoml(given: str | None) -> tuple[str | None, str]:
    """``(path of the bentoml command, why not)``: a 1.4 one, or None and the reason."""
    cand = given or os.environ.get("BENTOML") or "/tmp/bentovenv/bin/bentoml"
    if not (Path(cand).is_file() and os.access(cand, os.X_OK)):
        return None, f"{cand} not found"
    python = Path(cand).with_name("python")
    try:
        version = subprocess.run(
            [str(python), "-c", "import bentoml, sklearn; print(bentoml.__version__, "
             "sklearn.__version__)"], capture_output=True, text=True, timeout=120).stdout.split()
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"cannot run {python}: {exc}"
    if len(version) != 2 or not version[0].startswith("1.4"):
        return None, f"{cand} is BentoML {version[0] if version else '?'}, not 1.4"
    import sklearn
    if version[1] != sklearn.__version__:
        return None, (f"{cand}'s scikit-learn is {version[1]}, ours {sklearn.__version__}: "
                      "the pickle would not load the same")
    return cand, ""


def batch_stats(url: str) -> str:
    """Mean batch size and mean queue wait from the batched server's /metrics."""
    with urllib.request.urlopen(url.replace("/score", "/metrics"), timeout=5) as resp:
        text = resp.read().decode()

    def value(name):
        m = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        return float(m.group(1)) if m else 0.0

    batches = value("mlbuild_batch_size_count")
    if not batches:
        return "no batches recorded"
    return (f"{batches:.0f} batches, mean size {value('mlbuild_batch_size_sum') / batches:.1f}, "
            f"mean wait for a batch "
            f"{value('mlbuild_batch_wait_seconds_sum') / value('mlbuild_batch_wait_seconds_count') * 1e3:.2f} ms")


def report(names: list[str], results: dict, args) -> list[tuple[str, float, bool]]:
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("rps", "p99", "cpu_us")}
           for k, v in results.items()}
    non2xx = {k: sum(r["non2xx"] for r in v) for k, v in results.items()}
    print()
    print(f"medians of {args.rounds} interleaved rounds, {args.duration:g} s each, one worker, "
          f"127.0.0.1, wrk -t{args.threads} --latency, batch size {args.batch_size}, "
          f"window {args.latency_ms:g} ms" + (", wrk and servers on separate CPUs"
                                              if args.pinned else ""))
    head = (f"{'server':<21}" + "".join(f"{f'req/s c={c}':>12}{f'p99 ms c={c}':>13}"
                                        for c in CONCURRENCY)
            + f"{f'CPU us/req c={GOAL_C}':>17}{'non-2xx':>9}")
    print(head)
    print("-" * len(head))
    for n in names:
        print(f"{LABELS[n]:<21}" + "".join(
            f"{med[(n, c)]['rps']:>12.0f}{med[(n, c)]['p99']:>13.2f}" for c in CONCURRENCY)
            + f"{med[(n, GOAL_C)]['cpu_us']:>17.0f}"
            + f"{sum(non2xx[(n, c)] for c in CONCURRENCY):>9}")

    def fmt(x):
        return f"{x:.2f}" if x is not None else "n/a"

    print()
    print("ratios of mlbuild batched to ... (medians of per-round ratios)")
    head = f"{'':<21}{f'req/s c={GOAL_C}':>13}{f'p99 c={GOAL_C}':>11}{'req/s c=1':>11}{'p99 c=1':>10}"
    print(head)
    print("-" * len(head))
    for other in (n for n in names if n != "batched"):
        print(f"{LABELS[other]:<21}"
              f"{fmt(paired_ratio(results, 'batched', other, GOAL_C, 'rps')):>13}"
              f"{fmt(paired_ratio(results, 'batched', other, GOAL_C, 'p99')):>11}"
              f"{fmt(paired_ratio(results, 'batched', other, 1, 'rps')):>11}"
              f"{fmt(paired_ratio(results, 'batched', other, 1, 'p99')):>10}")

    bento = "bentoml" in names
    goals = [
        (f"batched req/s c={GOAL_C} >= 4x unbatched",
         paired_ratio(results, "batched", "unbatched", GOAL_C, "rps"), lambda r: r >= 4),
        (f"batched p99 c={GOAL_C} <= unbatched p99",
         paired_ratio(results, "batched", "unbatched", GOAL_C, "p99"), lambda r: r <= 1),
        (f"batched req/s c={GOAL_C} ahead of BentoML 1.4",
         paired_ratio(results, "batched", "bentoml", GOAL_C, "rps") if bento else None,
         lambda r: r > 1),
    ]
    print()
    print(f"goals (c={GOAL_C}, one worker each)")
    out = []
    for label, ratio, ok in goals:
        if ratio is None:
            print(f"  {label:<42} skipped (BentoML not installed)")
            continue
        met = ok(ratio)
        out.append((label, ratio, met))
        print(f"  {label:<42} {ratio:>6.2f}  {'OK' if met else 'MISS'}")
    if bento:
        print(f"  (p99 c={GOAL_C} batched / BentoML: "
              f"{fmt(paired_ratio(results, 'batched', 'bentoml', GOAL_C, 'p99'))})")
    bad = {n: sum(non2xx[(n, c)] for c in CONCURRENCY) for n in names}
    if any(bad.values()):
        print("  non-2xx answers: " + ", ".join(f"{LABELS[n]} {v}" for n, v in bad.items() if v))
    missed = [g for g in out if not g[2]]
    print(f"goals: {len(out) - len(missed)} of {len(out)} met"
          + (f" (missed: {', '.join(g[0] for g in missed)})" if missed else ""))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=2.0, help="seconds per wrk run [2]")
    ap.add_argument("--rounds", type=int, default=10, help="interleaved rounds [10]")
    ap.add_argument("--threads", type=int, default=2, help="wrk threads [2]")
    ap.add_argument("--batch-size", type=int, default=32, help="max_batch_size [32]")
    ap.add_argument("--latency-ms", type=float, default=5.0, help="max_latency_ms [5]")
    ap.add_argument("--no-pin", dest="pin", action="store_false",
                    help="do not pin wrk to the first CPU and the servers to the others")
    ap.add_argument("--bentoml", help="path of the bentoml command [$BENTOML, /tmp/bentovenv/bin]")
    args = ap.parse_args()
    if args.duration <= 0 or args.duration > 120 or not 1 <= args.rounds <= 50 \
            or args.threads < 1 or args.batch_size < 1 or args.latency_ms < 0:
        ap.error("--duration in (0, 120], --rounds in 1..50, --threads, --batch-size >= 1, "
                 "--latency-ms >= 0")
    if not shutil.which("wrk"):
        print("wrk not found: install it with `apt-get install wrk`", file=sys.stderr)
        return 2
    bento, why = find_bentoml(args.bentoml)
    if not bento:
        import sklearn
        print(f"BentoML 1.4 not used ({why}): the peer is skipped.\n  install: python3 -m "
              "venv /tmp/bentovenv && /tmp/bentovenv/bin/pip install 'bentoml>=1.4,<1.5' "
              f"scikit-learn=={sklearn.__version__} joblib numpy\n  then pass --bentoml "
              "/tmp/bentovenv/bin/bentoml (or set BENTOML)")

    def _exit(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGHUP, _exit)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="mlbuild-bench-batching-") as tmp:
        work = Path(tmp)
        body, expected = train(work)
        base_env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("MLBUILD_", "AZUREML_", "BENTOML_"))
                    and k not in ("FORWARDED_ALLOW_IPS", "WORKER_COUNT", "AML_APP_ROOT")}
        base_env["PYTHONUNBUFFERED"] = "1"
        py = sys.executable
        model = str(work / "model.pkl")
        runtime = [py, "-m", "mlbuild.runtime", "--no-code-model", model, "--host", "127.0.0.1",
                   "--workers", "1"]
        servers.append(Server("batched", [*runtime, "--port", str(free_port())], dict(
            base_env, MLBUILD_BATCH_MAX_SIZE=str(args.batch_size),
            MLBUILD_BATCH_MAX_LATENCY_MS=f"{args.latency_ms:g}"), work))
        servers.append(Server("unbatched", [*runtime, "--port", str(free_port())], base_env,
                              work))
        if bento:
            bento_dir = work / "bento"
            bento_dir.mkdir()
            (bento_dir / "service.py").write_text(BENTO_SERVICE.format(batch_size=args.batch_size))
            s = Server("bentoml", [bento, "serve", "service:Forest", "--working-dir",
                                   str(bento_dir), "--host", "127.0.0.1", "--port",
                                   str(free_port())],
                       dict(base_env, BENCH_MODEL=model, BENTOML_DO_NOT_TRACK="true"), work)
            s.url = f"http://127.0.0.1:{s.port}/predict"
            servers.append(s)

        wrk_pin, server_pin = cpu_split(args.pin)
        for s in servers:
            s.pin = server_pin
        if server_pin:
            print(f"pinned: wrk to CPU {wrk_pin[-1]}, servers to CPU {server_pin[-1]}")
        try:
            for s in servers:
                s.start()
            for s in servers:
                got = s.wait_ready(body, timeout=120)
                assert len(got) == 1 and abs(got[0] - expected) <= 1e-9, \
                    f"{s.name} predicted {got}, expected [{expected}]"
                print(f"{s.name:<10} ready on :{s.port}, prediction matches ({got[0]:.6f})")
            for s in servers:  # warm-up: first-call costs and lazy imports off the clock
                run_wrk(s.url, work / "post.lua", GOAL_C, 2, args.threads, wrk_pin)

            results = run_rounds(servers, work / "post.lua", CONCURRENCY, args.rounds,
                                 args.duration, args.threads, wrk_pin)
            stats = batch_stats(servers[0].url)
        finally:
            for s in servers:
                s.stop()

        args.pinned = bool(server_pin)
        report([s.name for s in servers], results, args)
        print(f"batched server: {stats}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped", file=sys.stderr)
        sys.exit(130)
