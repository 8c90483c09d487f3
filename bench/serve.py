"""Scoring throughput, tail latency and memory of the serving runtime, beside two baselines.

    python bench/serve.py [--duration S] [--rounds N] [--threads T] [--workers N]
                          [--no-pin] [--azmlinfsrv PATH] [--no-tracing]

Goals, at c=16 with one worker each, 127.0.0.1 only (issue "serving runtime", section
"Speed and memory"; issue "drop-in for the Azure ML inference server", section "Speed"):
  runtime req/s >= 0.9x bare and >= 3x azmlinfsrv; runtime p99 <= 1.5x bare; runtime
  peak RSS <= 1.1x bare; serve req/s >= 3x azmlinfsrv and >= 0.9x bare.

Servers, all serving the same Ridge (trained here on sklearn's bundled diabetes data) to
POSTs of 2 rows x 10 features:
  runtime     python -m mlbuild.runtime --entry-script score.py, an Azure-v1-style script
              unchanged, with the runtime's defaults (access log on, written to a file;
              request ids; metrics)
  serve       the drop-in command line: mlbuild serve --entry-script score.py --model-dir
              DIR --port P (plus --host 127.0.0.1), the same script
  bare        a hand-written ASGI callable on uvicorn doing the same predict and JSON
              encoding, with the uvicorn settings the runtime uses (httptools, uvloop when
              installed, no access log, no server header, no proxy-header middleware) --
              the practical limit
  traced      the runtime as above with OpenTelemetry traces on (OTEL_EXPORTER_OTLP_ENDPOINT
              to an OTLP/HTTP receiver in this process, pinned beside wrk; every request
              sampled: a server and a run() span each): what tracing costs a request,
              printed after the goals (no goal). Needs `pip install -e '.[otel]'`;
              skipped without it or with --no-tracing
  azmlinfsrv  azureml-inference-server-http with the same score.py. Its pinned deps (flask
              etc.) clash with ours, so it lives in its own venv, found through --azmlinfsrv
              or $AZMLINFSRV (else /tmp/azvenv/bin/azmlinfsrv); skipped when absent:
                  python3 -m venv /tmp/azvenv
                  /tmp/azvenv/bin/pip install azureml-inference-server-http \\
                      scikit-learn==<same as here> joblib numpy
Load: `wrk --latency` with a POST Lua script at c=2 and c=16, in short runs (1 s) over
many rounds (20), since the machine is noisy: every server is started once, and each
round runs every server once per concurrency, in an order reversed every other round, so
that compared runs are seconds apart. wrk runs on the first CPU and the servers on the
others (taskset; --no-pin leaves placement to the kernel). Reported: medians over the
rounds; ratios are medians of the per-round ratios; a noise line compares runtime and
serve, which run the same server code. CPU us/req: user+system CPU time of the server's
process tree during a c=16 run, over the requests it served. Peak RSS: VmHWM from /proc,
summed over the process tree (the Azure server runs a gunicorn master and a worker), read
after the last round. The runtime's and serve's access logs are counted at the end: one
line per request served, so the log was on while measured.
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
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
    # The least an ASGI app can do for this model: read the body, predict, answer JSON.
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
        self.pin: list[str] = []  # a taskset prefix, set by main()
        self.port = int(cmd[cmd.index("--port") + 1])
        self.url = f"http://127.0.0.1:{self.port}/score"
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen([*self.pin, *self.cmd], env=self.env, stdout=log,
                                         stderr=log, stdin=subprocess.DEVNULL,
                                         start_new_session=True)

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

    def cpu_seconds(self) -> float:
        """User + system CPU time used so far by the server's process tree."""
        total = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime (man 5 proc)
        return total / os.sysconf("SC_CLK_TCK")

    def peak_rss_mb(self) -> float:
        total = 0
        for pid in self.pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            m = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
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


def run_wrk(url: str, lua: Path, conns: int, duration: float, threads: int = 2,
            pin: list[str] = ()) -> dict:
    cmd = [*pin, "wrk", f"-t{min(threads, conns)}", f"-c{conns}", f"-d{max(1, round(duration))}s",
           "--timeout", "10s", "--latency", "-s", str(lua), url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False,
                         timeout=duration + 30).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.MULTILINE)
    if not rps or not p99:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    done = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:(.*)", out)
    return {"rps": float(rps.group(1)), "p99": _ms(p99.group(1)),
            "requests": int(done.group(1)) if done else 0,
            "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "errors": errors.group(1).strip() if errors else ""}


# --- report ---------------------------------------------------------------------------

LABELS = {"runtime": "mlbuild runtime", "serve": "mlbuild serve", "bare": "bare ASGI",
          "traced": "runtime+tracing",
          "azmlinfsrv": "azmlinfsrv"}


def run_rounds(servers: list, lua: Path, concurrency: tuple, rounds: int, duration: float,
               threads: int, wrk_pin: list[str]) -> dict:
    """wrk against every server at every concurrency, ``rounds`` times, in an order
    reversed every other round (compared runs are seconds apart on a noisy machine).
    Returns ``{(server name, c): [wrk result, ...]}``, each with the server's CPU time
    per request (``cpu_us``)."""
    results = {(s.name, c): [] for s in servers for c in concurrency}
    total = rounds * len(concurrency) * len(servers) * round(duration)
    print(f"{rounds} rounds x c={concurrency} x {len(servers)} servers x "
          f"{duration:g} s (~{total:.0f} s)")
    for rnd in range(rounds):
        for c in concurrency:
            for s in servers if rnd % 2 == 0 else servers[::-1]:
                if s.proc.poll() is not None:
                    raise RuntimeError(f"{s.name} died:\n{s.log_tail()}")
                cpu = s.cpu_seconds()
                r = run_wrk(s.url, lua, c, duration, threads, wrk_pin)
                r["cpu_us"] = (s.cpu_seconds() - cpu) * 1e6 / max(1, r["requests"])
                results[(s.name, c)].append(r)
                bad = (f"  non-2xx {r['non2xx']}" if r["non2xx"] else "") + \
                      (f"  socket errors: {r['errors']}" if r["errors"] else "")
                print(f"  round {rnd + 1} c={c:<3} {s.name:<11} {r['rps']:>8.0f} req/s"
                      f"  p99 {r['p99']:>7.2f} ms  CPU {r['cpu_us']:>5.0f} us/req{bad}")
    return results


def paired_ratio(results: dict, num: str, den: str, c: int, metric: str) -> float | None:
    """Median over the rounds of ``num``'s metric / ``den``'s, run by run."""
    pairs = [a[metric] / b[metric] for a, b in zip(results[(num, c)], results[(den, c)])
             if b[metric]]
    return statistics.median(pairs) if pairs else None


def report(servers: list, results: dict, rss: dict, args) -> list[tuple[str, float, bool]]:
    """Print the tables; returns the goals as (label, ratio, met)."""
    names = [s.name for s in servers]
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("rps", "p99", "cpu_us")}
           for k, v in results.items()}
    print()
    print(f"medians of {args.rounds} interleaved rounds, {args.duration:g} s each, "
          f"workers={args.workers}, 127.0.0.1, wrk -t{args.threads} --latency"
          + (", wrk and servers on separate CPUs" if args.pinned else ""))
    head = (f"{'server':<17}" + "".join(f"{f'req/s c={c}':>11}{f'p99 ms c={c}':>13}"
                                        for c in CONCURRENCY)
            + f"{'CPU us/req':>12}{'peak RSS MB':>13}")
    print(head)
    print("-" * len(head))
    for n in names:
        print(f"{LABELS[n]:<17}" + "".join(
            f"{med[(n, c)]['rps']:>11.0f}{med[(n, c)]['p99']:>13.2f}" for c in CONCURRENCY)
            + f"{med[(n, 16)]['cpu_us']:>12.0f}{rss[n]:>13.1f}")

    def fmt(x):
        return f"{x:.2f}" if x is not None else "n/a"

    azml = "azmlinfsrv" in names
    print()
    print("ratios (medians of per-round ratios; CPU us/req at c=16)")
    head = (f"{'server':<17}{'vs bare: req/s c=2':>19}{'req/s c=16':>11}{'p99 c=16':>10}"
            f"{'CPU/req':>9}{'RSS':>7}" + (f"{'vs azmlinfsrv: req/s c=16':>27}" if azml else ""))
    print(head)
    print("-" * len(head))
    for n in names:
        if n == "bare":
            continue
        row = (f"{LABELS[n]:<17}{fmt(paired_ratio(results, n, 'bare', 2, 'rps')):>19}"
               f"{fmt(paired_ratio(results, n, 'bare', 16, 'rps')):>11}"
               f"{fmt(paired_ratio(results, n, 'bare', 16, 'p99')):>10}"
               f"{fmt(paired_ratio(results, n, 'bare', 16, 'cpu_us')):>9}"
               f"{rss[n] / rss['bare']:>7.2f}")
        if azml:
            row += f"{fmt(paired_ratio(results, n, 'azmlinfsrv', 16, 'rps')):>27}"
        print(row)

    goals = [
        ("runtime req/s c=16 >= 0.9x bare", paired_ratio(results, "runtime", "bare", 16, "rps"),
         lambda r: r >= 0.9),
        ("runtime req/s c=16 >= 3x azmlinfsrv",
         paired_ratio(results, "runtime", "azmlinfsrv", 16, "rps") if azml else None,
         lambda r: r >= 3),
        ("runtime p99 c=16 <= 1.5x bare", paired_ratio(results, "runtime", "bare", 16, "p99"),
         lambda r: r <= 1.5),
        ("runtime peak RSS <= 1.1x bare", rss["runtime"] / rss["bare"], lambda r: r <= 1.1),
        ("serve req/s c=16 >= 3x azmlinfsrv",
         paired_ratio(results, "serve", "azmlinfsrv", 16, "rps") if azml else None,
         lambda r: r >= 3),
        ("serve req/s c=16 >= 0.9x bare", paired_ratio(results, "serve", "bare", 16, "rps"),
         lambda r: r >= 0.9),
    ]
    print()
    print("goals (c=16, one worker each)")
    out = []
    for label, ratio, ok in goals:
        if ratio is None:
            print(f"  {label:<38} skipped (azmlinfsrv not installed)")
            continue
        met = ok(ratio)
        out.append((label, ratio, met))
        print(f"  {label:<38} {ratio:>6.2f}  {'OK' if met else 'MISS'}")
    if "serve" in names:  # the same server code twice: what noise alone does to a ratio
        aa = paired_ratio(results, "runtime", "serve", 16, "rps")
        spread = [r["rps"] for r in results[("bare", 16)]]
        print(f"  noise: runtime/serve req/s c=16 {aa:.2f} (same server, ideally 1.00); "
              f"bare req/s c=16 ranged {min(spread):.0f}-{max(spread):.0f} over the rounds")
    missed = [g for g in out if not g[2]]
    print(f"goals: {len(out) - len(missed)} of {len(out)} met"
          + (f" (missed: {', '.join(g[0] for g in missed)})" if missed else ""))
    return out


class SpanReceiver:
    """An OTLP/HTTP traces receiver (POST /v1/traces) in a thread of this process that
    counts the spans it is sent, as a collector beside the service would take them."""

    def __init__(self):
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb

        self.spans = 0
        self.posts = 0
        self._lock = threading.Lock()
        receiver = self
        ok = pb.ExportTraceServiceResponse().SerializeToString()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a collector answers

            def do_POST(self):
                data = pb.ExportTraceServiceRequest.FromString(
                    self.rfile.read(int(self.headers.get("content-length", 0))))
                count = sum(len(ss.spans) for rs in data.resource_spans
                            for ss in rs.scope_spans)
                with receiver._lock:
                    receiver.spans += count
                    receiver.posts += 1
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(ok)))
                self.end_headers()
                self.wfile.write(ok)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def pin(self, cpu: int) -> None:
        """Keep the receiver off the servers' CPUs (on wrk's), as a collector elsewhere.
        Its handler threads inherit the serving thread's CPUs."""
        os.sched_setaffinity(self._thread.native_id, {cpu})

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def report_tracing(results: dict, receiver: SpanReceiver) -> None:
    """What traces cost a request: the traced runtime beside the same runtime untraced."""
    print()
    print("tracing (OpenTelemetry on: OTLP http/protobuf to a receiver in this process, every "
          "request sampled; medians of per-round values)")
    for c in CONCURRENCY:
        ratio = paired_ratio(results, "traced", "runtime", c, "rps")
        # NOTE: one worker busy at c=16 serves one request at a time: 1/(req/s) is the
        # time a request holds it, so the difference is what tracing adds to each.
        wall = statistics.median(1e6 / t["rps"] - 1e6 / r["rps"] for t, r in
                                 zip(results[("traced", c)], results[("runtime", c)]))
        cpu = statistics.median(t["cpu_us"] - r["cpu_us"] for t, r in
                                zip(results[("traced", c)], results[("runtime", c)]))
        rps_t = statistics.median(r["rps"] for r in results[("traced", c)])
        rps_r = statistics.median(r["rps"] for r in results[("runtime", c)])
        print(f"  c={c:<3} req/s traced {rps_t:>7.0f} vs untraced {rps_r:>7.0f} "
              f"({ratio:.2f}x); cost per request {wall:+.0f} us (1/req/s), "
              f"{cpu:+.0f} us server CPU (export thread included)")
    served = sum(r["requests"] for r in results[("traced", 16)] + results[("traced", 2)])
    print(f"  spans received: {receiver.spans} in {receiver.posts} exports "
          f"(~{served} requests measured, plus warm-up: 2 spans a request)")


def access_lines(path: Path) -> int:
    """Access-log lines in a server's output (proof that the log was on while measured)."""
    count, tail = 0, b""
    marker = b" azmlinfsrv.access - "
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            data = tail + chunk
            count += data.count(marker)
            tail = data[-(len(marker) - 1):]
    return count


def cpu_split(enabled: bool) -> tuple[list[str], list[str]]:
    """``taskset`` prefixes putting wrk on the first CPU and the servers on the others.

    NOTE: on a 2-CPU machine an unpinned wrk -t2 and a one-worker server are three busy
    threads on two CPUs, and the server loses its CPU to wrk at random moments: in one
    comparison the per-round ratios of the same two servers spread 0.64-1.19 unpinned,
    0.82-1.00 pinned. Empty when disabled, on fewer than 2 CPUs, or without taskset.
    """
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not enabled or len(cpus) < 2 or not shutil.which("taskset"):
        return [], []
    return (["taskset", "-c", str(cpus[0])],
            ["taskset", "-c", ",".join(str(c) for c in cpus[1:])])


def mlbuild_cli(py: str) -> list[str]:
    """The ``mlbuild`` console script of this Python (else ``python -m mlbuild``)."""
    script = Path(py).with_name("mlbuild")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [py, "-m", "mlbuild"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=1.0, help="seconds per wrk run [1]")
    ap.add_argument("--rounds", type=int, default=20, help="interleaved rounds [20]")
    ap.add_argument("--threads", type=int, default=2, help="wrk threads [2]")
    ap.add_argument("--workers", type=int, default=1, help="worker processes per server [1]")
    ap.add_argument("--no-pin", dest="pin", action="store_false",
                    help="do not pin wrk to the first CPU and the servers to the others")
    ap.add_argument("--azmlinfsrv", help="path of azmlinfsrv [$AZMLINFSRV, /tmp/azvenv/bin]")
    ap.add_argument("--no-tracing", dest="tracing", action="store_false",
                    help="leave out the runtime with OpenTelemetry traces on (and its cost line)")
    args = ap.parse_args()
    if args.duration <= 0 or args.duration > 120 or not 1 <= args.rounds <= 50 \
            or args.threads < 1:
        ap.error("--duration must be in (0, 120], --rounds in 1..50, --threads >= 1")

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
                    if not k.startswith(("MLBUILD_", "AZUREML_", "OTEL_"))
                    and k not in ("FORWARDED_ALLOW_IPS", "WORKER_COUNT", "AML_APP_ROOT")}
        base_env["PYTHONUNBUFFERED"] = "1"
        py = sys.executable
        loop = "uvloop" if _has("uvloop") else "asyncio"
        http = "httptools" if _has("httptools") else "h11"
        script = str(work / "score.py")

        servers.append(Server("runtime", [
            py, "-m", "mlbuild.runtime", "--entry-script", script,
            "--model-dir", str(model_dir), "--host", "127.0.0.1",
            "--workers", str(args.workers), "--port", str(free_port())],
            base_env, work))
        servers.append(Server("bare", [
            py, "-m", "uvicorn", "--app-dir", str(work), "bare_app:app",
            "--host", "127.0.0.1", "--http", http, "--loop", loop,
            "--workers", str(args.workers), "--no-access-log", "--no-server-header",
            "--no-proxy-headers", "--log-level", "warning", "--port", str(free_port())],
            dict(base_env, BENCH_MODEL_DIR=str(model_dir)), work))
        servers.append(Server("serve", [
            *mlbuild_cli(py), "serve", "--entry-script", script, "--model-dir", str(model_dir),
            "--host", "127.0.0.1", "--workers", str(args.workers), "--port", str(free_port())],
            base_env, work))
        if azml:
            servers.append(Server("azmlinfsrv", [
                *azmlinfsrv_loopback(azml), "--entry_script", script,
                "--model_dir", str(model_dir), "--worker_count", str(args.workers),
                "--port", str(free_port())],
                dict(base_env, AZUREML_MODEL_DIR=str(model_dir)), work))
        receiver = None
        if args.tracing and not (_has("opentelemetry.sdk") and _has("opentelemetry.proto")):
            print("OpenTelemetry not installed: the traced runtime is skipped (install it "
                  "with pip install -e '.[otel]')")
        elif args.tracing:
            receiver = SpanReceiver()
            servers.append(Server("traced", [
                py, "-m", "mlbuild.runtime", "--entry-script", script,
                "--model-dir", str(model_dir), "--host", "127.0.0.1",
                "--workers", str(args.workers), "--port", str(free_port())],
                dict(base_env, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
                     OTEL_SERVICE_NAME="bench-serve", OTEL_TRACES_SAMPLER="always_on"), work))

        wrk_pin, server_pin = cpu_split(args.pin)
        for s in servers:
            s.pin = server_pin
        if server_pin:
            print(f"pinned: wrk to CPU {wrk_pin[-1]}, servers to CPU {server_pin[-1]}")
            if receiver is not None:
                receiver.pin(int(wrk_pin[-1]))
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
                run_wrk(s.url, work / "post.lua", 16, 1, args.threads, wrk_pin)

            results = run_rounds(servers, work / "post.lua", CONCURRENCY, args.rounds,
                                 args.duration, args.threads, wrk_pin)
            rss = {s.name: s.peak_rss_mb() for s in servers}
        finally:
            for s in servers:
                s.stop()
            if receiver is not None:
                receiver.close()

        args.pinned = bool(server_pin)
        report(servers, results, rss, args)
        if receiver is not None:
            report_tracing(results, receiver)
        for s in (s for s in servers if s.name in ("runtime", "serve")):  # after stop: the
            # last lines are written at shutdown
            print(f"{s.name} access log: {access_lines(s.log_path)} lines "
                  f"(one per request, as served)")
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
