"""Scoring throughput, tail latency and memory of the serving runtime, beside two baselines.

    python bench/serve.py [--duration S] [--rounds N] [--workers N] [--azmlinfsrv PATH]

Goals (issue: serving runtime, "Speed and memory"), one worker each, 127.0.0.1 only:
  mlbuild/bare req/s >= 0.9 (c=2 and c=16), mlbuild/azmlinfsrv req/s at c=16 >= 3,
  p99 mlbuild/bare <= 1.5, peak RSS mlbuild/bare <= 1.1.

Servers, all serving the same Ridge (trained here on sklearn's bundled diabetes data) to
POSTs of 2 rows x 10 features:
  mlbuild     python -m mlbuild.runtime with an Azure-v1-style score.py (its defaults:
              access log on, written to a file)
  bare        a hand-written ASGI callable on uvicorn (httptools, uvloop when installed,
              no access log) doing the same predict -- the practical limit
  azmlinfsrv  azureml-inference-server-http with the same score.py. Its pinned deps (flask
              etc.) clash with ours, so it lives in its own venv, found through --azmlinfsrv
              or $AZMLINFSRV (else /tmp/azvenv/bin/azmlinfsrv); skipped when absent:
                  python3 -m venv /tmp/azvenv
                  /tmp/azvenv/bin/pip install azureml-inference-server-http \\
                      scikit-learn==<same as here> joblib numpy
Load: `wrk --latency` with a POST Lua script at c=2 and c=16, every server started once and
the wrk runs interleaved server by server, round by round (the machine is noisy); medians
are reported. Peak RSS is VmHWM from /proc (summed over the server's process tree: the
Azure server runs a gunicorn master and a worker) read after the last round.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

CONCURRENCY = (2, 16)

SCORE_PY = textwrap.dedent("""\
    # An Azure ML v1 entry script, unchanged.
    import json
    import os

    import joblib
    import numpy as np


    def init():
        global model
        model = joblib.load(os.path.join(os.environ["AZUREML_MODEL_DIR"], "model.pkl"))


    def run(raw_data):
        data = np.array(json.loads(raw_data)["data"])
        return model.predict(data).tolist()
    """)

BARE_PY = textwrap.dedent("""\
    # The least an ASGI server can do for this model: read the body, predict, answer.
    import json
    import os

    import joblib
    import numpy as np

    model = joblib.load(os.path.join(os.environ["BENCH_MODEL_DIR"], "model.pkl"))


    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        out = json.dumps(model.predict(np.array(json.loads(body)["data"])).tolist()).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})
    """)

POST_LUA = textwrap.dedent("""\
    wrk.method = "POST"
    wrk.headers["Content-Type"] = "application/json"
    local f = assert(io.open("{body}", "rb"))
    wrk.body = f:read("*a")
    f:close()
    """)


# --- setup ----------------------------------------------------------------------------

def train(workdir: Path) -> tuple[bytes, list[float]]:
    """Model, scripts and request body in ``workdir``; returns the body and its prediction."""
    import joblib
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import Ridge

    X, y = load_diabetes(return_X_y=True)
    model = Ridge().fit(X, y)
    models = workdir / "model"
    models.mkdir()
    joblib.dump(model, models / "model.pkl")
    (workdir / "score.py").write_text(SCORE_PY)
    (workdir / "bare_app.py").write_text(BARE_PY)
    body = json.dumps({"data": X[:2].tolist()}).encode()
    (workdir / "body.json").write_bytes(body)
    (workdir / "post.lua").write_text(POST_LUA.format(body=workdir / "body.json"))
    return body, model.predict(X[:2]).tolist()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_azmlinfsrv(given: str | None) -> str | None:
    given = given or os.environ.get("AZMLINFSRV")
    for cand in ((given,) if given else ("/tmp/azvenv/bin/azmlinfsrv", shutil.which("azmlinfsrv"))):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return None


# azmlinfsrv has no address option: it hands gunicorn "-b 0.0.0.0:PORT", from the
# DEFAULT_HOST that amlserver star-imports from its constants. Run its console script's
# function with that global set to loopback instead.
AZML_LOOPBACK = ("import sys; import azureml_inference_server_http.amlserver as a; "
                 "a.DEFAULT_HOST = '127.0.0.1'; sys.argv[0] = 'azmlinfsrv'; sys.exit(a.run())")


def azmlinfsrv_loopback(azml: str) -> list[str]:
    """The command running ``azml`` bound to 127.0.0.1 only, with the Python it was made for."""
    with open(azml, "rb") as fh:
        first = fh.readline().decode(errors="replace").strip()
    interp = first[2:].strip().split() if first.startswith("#!") else []
    if not interp or "python" not in Path(interp[-1]).name:
        raise SystemExit(f"{azml}: not a Python console script (first line {first!r}); "
                         "cannot bind it to 127.0.0.1")
    return [*interp, "-c", AZML_LOOPBACK]


class Server:
    """One server subprocess in its own process group (so it and its children stop together)."""

    def __init__(self, name: str, cmd: list[str], env: dict, workdir: Path):
        self.name, self.cmd, self.env = name, cmd, env
        self.port = int(cmd[cmd.index("--port") + 1])
        self.url = f"http://127.0.0.1:{self.port}/score"
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()

    def wait_ready(self, body: bytes, timeout: float = 90.0) -> list[float]:
        """Poll POST /score until it answers 200; returns the prediction it gave."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                   + self.log_tail())
            try:
                req = urllib.request.Request(self.url, data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=5) as resp:
                    out = json.loads(resp.read())
                    if isinstance(out, str):  # some servers JSON-encode run()'s output twice
                        out = json.loads(out)
                    return out
            except (urllib.error.URLError, ConnectionError, OSError) as exc:
                last = exc
                time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s ({last}):\n"
                           + self.log_tail())

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def pids(self) -> list[int]:
        """The server's process and all its descendants."""
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            for task in Path(f"/proc/{pid}/task").glob("*"):
                try:
                    todo += [int(c) for c in (task / "children").read_text().split()]
                except OSError:
                    pass
        return out

    def peak_rss_mb(self) -> float:
        total = 0
        for pid in self.pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            m = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
            if m:
                total += int(m.group(1))
        return total / 1024

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 8), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


# --- load -----------------------------------------------------------------------------

_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"cannot parse wrk latency {text!r}")
    return float(m.group(1)) * _UNIT[m.group(2)]


def run_wrk(url: str, lua: Path, conns: int, duration: float) -> dict:
    threads = min(2, conns)
    cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{max(1, round(duration))}s",
           "--timeout", "10s", "--latency", "-s", str(lua), url]
    out = subprocess.run(cmd, capture_output=True, text=True,
                         timeout=duration + 30).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    if not rps or not p99:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:(.*)", out)
    return {"rps": float(rps.group(1)), "p99": _ms(p99.group(1)),
            "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "errors": errors.group(1).strip() if errors else ""}


# --- report ---------------------------------------------------------------------------

def ratio_line(label: str, num: float, den: float, goal: str, ok) -> str:
    if not den:
        return f"  {label:<36} {'n/a':>7}   goal {goal}"
    r = num / den
    return f"  {label:<36} {r:>7.2f}   goal {goal:<6} {'OK' if ok(r) else 'MISS'}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run [5]")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds [3]")
    ap.add_argument("--workers", type=int, default=1, help="worker processes per server [1]")
    ap.add_argument("--azmlinfsrv", help="path of azmlinfsrv [$AZMLINFSRV, /tmp/azvenv/bin]")
    args = ap.parse_args()
    if args.duration <= 0 or args.duration > 120 or args.rounds < 1:
        ap.error("--duration must be in (0, 120] and --rounds >= 1")

    if not shutil.which("wrk"):
        print("wrk not found: install it with `apt-get install wrk`", file=sys.stderr)
        return 2

    azml = find_azmlinfsrv(args.azmlinfsrv)
    if not azml:
        import sklearn
        where = args.azmlinfsrv or os.environ.get("AZMLINFSRV") or "/tmp/azvenv/bin or PATH"
        print(f"azmlinfsrv not found ({where}): the azureml-inference-server-http baseline is "
              "skipped.\n  install: python3 -m venv /tmp/azvenv && /tmp/azvenv/bin/pip install "
              f"azureml-inference-server-http scikit-learn=={sklearn.__version__} joblib numpy\n"
              "  then pass --azmlinfsrv /tmp/azvenv/bin/azmlinfsrv (or set AZMLINFSRV)")

    # SIGTERM (and SIGHUP) end the run through the same finally as Ctrl-C does.
    def _exit(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGHUP, _exit)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with it ignored

    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="mlbuild-bench-serve-") as tmp:
        work = Path(tmp)
        body, expected = train(work)
        model_dir = work / "model"
        base_env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("MLBUILD_", "AZUREML_"))}
        base_env["PYTHONUNBUFFERED"] = "1"
        py = sys.executable
        loop = "uvloop" if _has("uvloop") else "asyncio"
        http = "httptools" if _has("httptools") else "h11"

        servers.append(Server("mlbuild", [
            py, "-m", "mlbuild.runtime", "--entry-script", str(work / "score.py"),
            "--model-dir", str(model_dir), "--host", "127.0.0.1",
            "--workers", str(args.workers), "--port", str(free_port())],
            base_env, work))
        servers.append(Server("bare", [
            py, "-m", "uvicorn", "--app-dir", str(work), "bare_app:app",
            "--host", "127.0.0.1", "--http", http, "--loop", loop,
            "--workers", str(args.workers), "--no-access-log", "--log-level", "warning",
            "--port", str(free_port())],
            dict(base_env, BENCH_MODEL_DIR=str(model_dir)), work))
        if azml:
            servers.append(Server("azmlinfsrv", [
                *azmlinfsrv_loopback(azml), "--entry_script", str(work / "score.py"), "--model_dir", str(model_dir),
                "--worker_count", str(args.workers),
                "--port", str(free_port())],
                dict(base_env, AZUREML_MODEL_DIR=str(model_dir)), work))

        try:
            for s in servers:
                s.start()
            for s in servers:
                got = s.wait_ready(body)
                assert len(got) == len(expected) and all(
                    abs(a - b) <= 1e-9 for a, b in zip(got, expected)), \
                    f"{s.name} predicted {got}, expected {expected}"
                print(f"{s.name:<11} ready on :{s.port}, prediction matches "
                      f"({', '.join(f'{v:.6f}' for v in got)})")
            for s in servers:  # warm-up: first-call costs and lazy imports off the clock
                run_wrk(s.url, work / "post.lua", 16, 1)

            results = {(s.name, c): [] for s in servers for c in CONCURRENCY}
            total = args.rounds * len(CONCURRENCY) * len(servers) * args.duration
            print(f"{args.rounds} rounds x c={CONCURRENCY} x {len(servers)} servers x "
                  f"{args.duration:g} s (~{total:.0f} s)")
            for rnd in range(args.rounds):
                for c in CONCURRENCY:
                    order = servers if rnd % 2 == 0 else servers[::-1]
                    for s in order:
                        if s.proc.poll() is not None:
                            raise RuntimeError(f"{s.name} died:\n{s.log_tail()}")
                        r = run_wrk(s.url, work / "post.lua", c, args.duration)
                        results[(s.name, c)].append(r)
                        bad = (f"  non-2xx {r['non2xx']}" if r["non2xx"] else "") + \
                              (f"  socket errors: {r['errors']}" if r["errors"] else "")
                        print(f"  round {rnd + 1} c={c:<3} {s.name:<11} {r['rps']:>8.0f} req/s"
                              f"  p99 {r['p99']:>7.2f} ms{bad}")
            rss = {s.name: s.peak_rss_mb() for s in servers}
        finally:
            for s in servers:
                s.stop()

        med = {k: {m: statistics.median(r[m] for r in v) for m in ("rps", "p99")}
               for k, v in results.items()}
        print()
        print(f"medians of {args.rounds} rounds, {args.duration:g} s each, "
              f"workers={args.workers}, 127.0.0.1, wrk -t2 --latency")
        head = f"{'server':<12}" + "".join(f"{f'req/s c={c}':>12}{f'p99 ms c={c}':>13}"
                                            for c in CONCURRENCY) + f"{'peak RSS MB':>13}"
        print(head)
        print("-" * len(head))
        for s in servers:
            print(f"{s.name:<12}" + "".join(
                f"{med[(s.name, c)]['rps']:>12.0f}{med[(s.name, c)]['p99']:>13.2f}"
                for c in CONCURRENCY) + f"{rss[s.name]:>13.1f}")
        print()
        m, b = "mlbuild", "bare"
        for c in CONCURRENCY:
            print(ratio_line(f"req/s mlbuild/bare c={c}", med[(m, c)]["rps"],
                             med[(b, c)]["rps"], ">= 0.9", lambda r: r >= 0.9))
        if azml:
            print(ratio_line("req/s mlbuild/azmlinfsrv c=16", med[(m, 16)]["rps"],
                             med[("azmlinfsrv", 16)]["rps"], ">= 3", lambda r: r >= 3))
        else:
            print(f"  {'req/s mlbuild/azmlinfsrv c=16':<36} skipped (azmlinfsrv not installed)")
        for c in CONCURRENCY:
            print(ratio_line(f"p99 mlbuild/bare c={c}", med[(m, c)]["p99"],
                             med[(b, c)]["p99"], "<= 1.5", lambda r: r <= 1.5))
        print(ratio_line("peak RSS mlbuild/bare", rss[m], rss[b], "<= 1.1",
                         lambda r: r <= 1.1))
    return 0


def _has(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped", file=sys.stderr)
        sys.exit(130)
