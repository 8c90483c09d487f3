"""The load generator's ceiling (mlbuild.profile.loadgen) beside wrk, on the bare ASGI app.

    python bench/loadgen.py [--duration S] [--rounds N] [--processes P] [--no-pin]

Goal (issue 17, "Speed"): the generator's ceiling against the bare ASGI app at c=16 is
at least 0.9x what `wrk` reaches.

Server: bench/serve.py's "bare" app -- a hand-written ASGI callable on uvicorn with the
runtime's settings (httptools, uvloop, no access log), predicting with a Ridge on POSTs of
2 rows x 10 features -- built and started with bench/serve.py's own helpers, one worker.
Loads, all at c=16 on the same URL with the same body:
  wrk          wrk -t2 --latency with a POST Lua script (as bench/serve.py runs it)
  generator    generate_load(..., processes=P) -- the default, 2
  generator/1  generate_load(..., processes=1) -- one process, shown for the NOTE in
               loadgen.py on why the default is 2 (not judged)
Each round runs every load once for --duration seconds, in an order reversed every other
round, so compared runs are seconds apart on this noisy machine; ratios are medians of
the per-round ratios. wrk and the generator run on the first CPU, the server on the
others (taskset / sched_setaffinity; --no-pin leaves placement to the kernel).
CPU us/req: the load's own user+system CPU over the responses it got (wrk: its rusage,
reaped here; the generator: what it measured in its window), beside the server's.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import serve as serve_bench  # noqa: E402  (bench/serve.py: the bare app, wrk, pinning)

from mlbuild.profile.loadgen import generate_load  # noqa: E402

CONNS = 16
GOAL = 0.9


def run_wrk(server, lua: Path, duration: float, pin: list[str]) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu0 = server.cpu_seconds()
    r = serve_bench.run_wrk(server.url, lua, CONNS, duration, 2, pin)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = max(1, r["requests"])
    return {"rps": r["rps"], "p99": r["p99"],
            "cpu_us": ((after.ru_utime + after.ru_stime)
                       - (before.ru_utime + before.ru_stime)) * 1e6 / done,
            "server_us": (server.cpu_seconds() - cpu0) * 1e6 / done,
            "bad": r["non2xx"] + (1 if r["errors"] else 0)}


def run_gen(server, body: bytes, duration: float, processes: int, cpus) -> dict:
    cpu0 = server.cpu_seconds()
    r = generate_load(server.url, concurrency=CONNS, duration=duration, bodies=[body],
                      processes=processes, cpus=cpus)
    done = max(1, r.responses)
    return {"rps": r.rps, "p99": r.latency.percentile(99) / 1000,
            "cpu_us": r.cpu_us_per_response,
            # NOTE: includes the generator processes' start (the server idles then)
            "server_us": (server.cpu_seconds() - cpu0) * 1e6 / done,
            "bad": r.responses - r.successes + r.error_count}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=2.0, help="seconds per run [2]")
    ap.add_argument("--rounds", type=int, default=10, help="interleaved rounds [10]")
    ap.add_argument("--processes", type=int, default=2, help="generator processes [2]")
    ap.add_argument("--no-pin", dest="pin", action="store_false",
                    help="do not pin the loads to the first CPU and the server to the others")
    args = ap.parse_args()
    if not 1 <= args.duration <= 60 or not 1 <= args.rounds <= 50 or args.processes < 1:
        ap.error("--duration must be in [1, 60], --rounds in 1..50, --processes >= 1")
    if not shutil.which("wrk"):
        print("wrk not found: install it with `apt-get install wrk`", file=sys.stderr)
        return 2

    def _exit(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, _exit)

    with tempfile.TemporaryDirectory(prefix="mlbuild-bench-loadgen-") as tmp:
        work = Path(tmp)
        body, expected = serve_bench.train(work)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLBUILD_", "AZUREML_"))}
        env.update(PYTHONUNBUFFERED="1", BENCH_MODEL_DIR=str(work / "model"))
        loop = "uvloop" if serve_bench._has("uvloop") else "asyncio"
        http = "httptools" if serve_bench._has("httptools") else "h11"
        server = serve_bench.Server("bare", [
            sys.executable, "-m", "uvicorn", "--app-dir", str(work), "bare_app:app",
            "--host", "127.0.0.1", "--http", http, "--loop", loop, "--workers", "1",
            "--no-access-log", "--no-server-header", "--no-proxy-headers",
            "--log-level", "warning", "--port", str(serve_bench.free_port())], env, work)
        load_pin, server.pin = serve_bench.cpu_split(args.pin)
        gen_cpus = [int(load_pin[-1])] if load_pin else None
        if load_pin:
            print(f"pinned: wrk and the generator to CPU {load_pin[-1]}, "
                  f"the server to CPU {server.pin[-1]}")
        lua = work / "post.lua"
        loads = {
            "wrk": lambda: run_wrk(server, lua, args.duration, load_pin),
            "generator": lambda: run_gen(server, body, args.duration, args.processes,
                                         gen_cpus),
            "generator/1": lambda: run_gen(server, body, args.duration, 1, gen_cpus),
        }
        if args.processes == 1:
            del loads["generator/1"]
        results: dict[str, list[dict]] = {name: [] for name in loads}
        try:
            server.start()
            got = server.wait_ready(body)
            assert all(abs(a - b) <= 1e-9 for a, b in zip(got, expected)), got
            for name, load in loads.items():  # warm-up: first calls, imports, caches
                load()
            names = list(loads)
            print(f"{args.rounds} rounds x {len(names)} loads x {args.duration:g} s at c={CONNS}")
            for rnd in range(args.rounds):
                for name in (names if rnd % 2 == 0 else names[::-1]):
                    if server.proc.poll() is not None:
                        raise RuntimeError(f"server died:\n{server.log_tail()}")
                    r = loads[name]()
                    results[name].append(r)
                    print(f"  round {rnd + 1:>2} {name:<12} {r['rps']:>8.0f} req/s  "
                          f"p99 {r['p99']:>6.2f} ms  CPU {r['cpu_us']:>4.0f} us/req  "
                          f"server {r['server_us']:>4.0f} us/req"
                          + (f"  NOT OK: {r['bad']}" if r["bad"] else ""))
        finally:
            server.stop()

    print()
    print(f"medians of {args.rounds} interleaved rounds, {args.duration:g} s each, c={CONNS}, "
          f"bare ASGI app (one uvicorn worker), 127.0.0.1")
    head = (f"{'load':<14}{'req/s':>9}{'vs wrk':>8}{'p99 ms':>8}{'CPU us/req':>12}"
            f"{'server us/req':>15}")
    print(head)
    print("-" * len(head))
    ratios = {}
    for name, runs in results.items():
        ratio = statistics.median(g["rps"] / w["rps"] for g, w in zip(runs, results["wrk"]))
        ratios[name] = ratio
        print(f"{name:<14}{statistics.median(r['rps'] for r in runs):>9.0f}{ratio:>8.2f}"
              f"{statistics.median(r['p99'] for r in runs):>8.2f}"
              f"{statistics.median(r['cpu_us'] for r in runs):>12.1f}"
              f"{statistics.median(r['server_us'] for r in runs):>15.1f}")
    spread = [r["rps"] for r in results["wrk"]]
    print(f"noise: wrk ranged {min(spread):.0f}-{max(spread):.0f} req/s over the rounds")
    cpu_ratio = statistics.median(g["cpu_us"] / w["cpu_us"]
                                  for g, w in zip(results["generator"], results["wrk"]))
    print(f"CPU per request, generator / wrk: {cpu_ratio:.2f}x (median of per-round ratios)")
    met = ratios["generator"] >= GOAL
    print()
    print(f"goal: generator req/s c={CONNS} >= {GOAL}x wrk (processes={args.processes})  "
          f"{ratios['generator']:.2f}  {'OK' if met else 'MISS'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; server stopped", file=sys.stderr)
        sys.exit(130)
