"""Incremental deploys of the demo to a docker target, beside a naive Dockerfile.

    python bench/incremental.py [--repeat N] [--naive-repeat N] [--prune-builder] [--keep]

Goals for `mlbuild deploy local` (which builds the image AND checks or replaces the
running container). Issue "docker, speed and size": no-op <= 0.3 s; edit-code redeploy
<= 3 s and <= 0.1x mlbuild's own cold build; edit-model redeploy reinstalls nothing;
image <= 0.7x the naive image; what mlbuild adds beyond the environment's own packages
<= 20 MB. Issue 18 ("environment layers that rebuild in seconds"): cold build <= 0.5x
the naive Dockerfile's; adding one package to the environment <= 0.2x mlbuild's own
cold build, printed twice: for the whole deploy, and for the build steps alone (lock,
model, context, image: the container step's start, health check and swap, ~1 s in
either, left out). The environment is two layers (mlbuild/envlayers.py): adding a
package runs the delta layer alone ("environment delta layer ran, base reused").

Measured in one run, on the same copy of examples/diabetes (its Ridge trained here) and
the same base image (the engine's `python:3.11-slim`):

  naive      an Azure-v1-style Dockerfile: the app code and model COPYed before
             `pip install --no-cache-dir -r requirements.txt azureml-inference-server-http`,
             CMD azmlinfsrv; built with plain `docker build` (nothing is deployed: its
             columns are image builds only, no container is started or replaced).
  mlbuild    `mlbuild deploy local` (target `local: {type: docker}`): model, context,
             image and container steps, the container health-checked and swapped in.
  reference  FROM the base, only `pip install --no-cache-dir -r FILE`, FILE being the
             environment file mlbuild puts in its context (the lock, installed
             `--require-hashes --no-deps` as mlbuild does; same versions). It defines
                 env packages       = size(reference) - size(base)
                 mlbuild additions  = size(mlbuild image) - size(reference)
             i.e. everything in mlbuild's image that is neither the base nor the
             environment's own packages installed the plain way: the serving runtime
             and its requirements, the model, the source, samples, the service user,
             and any excess in how mlbuild installs the environment itself.

Scenarios: cold (nothing cached, nothing deployed), no-op (nothing changed), edit code
(a comment appended to score.py), edit model (the Ridge re-fit with another alpha and
written over the model file), add package (one more small package in
envs/requirements.txt, a different one each time: mlbuild locks it and rebuilds the
environment layer; the naive Dockerfile installs everything again). Warm scenarios run
--repeat times (default 3) and report medians, except the naive edit rebuilds: each
re-runs the whole pip install (a cold build in all but name), so they run
--naive-repeat times (default 1) to keep the run at ~4-5 minutes. For mlbuild, the
steps that ran, the Dockerfile steps run/cached, whether the step that installs the
environment ran (from the Dockerfile steps mlbuild prints as they run), and how many
packages uv had to download and unpack ("Prepared N packages" in the build log) are
reported for each change.

Every timed command starts after an (untimed) `sync`: a build leaves hundreds of MB
of freshly written layers whose write-back would otherwise land in the next run, of
either tool (an mlbuild edit-code redeploy right after the naive rebuild took ~0.4 s
longer than one after a no-op).

Cold builds. mlbuild builds with BuildKit where the engine has it (through the
engine API; MLBUILD_BUILDER=classic forces the classic builder), the naive and reference
Dockerfiles with plain `docker build` and DOCKER_BUILDKIT=0 (the classic builder, as
they were measured before). Every run builds its own base `FROM python:3.11-slim` plus
a random nonce (a label, and a file of its own: a new image id and a new top layer),
and all three images start FROM it, so no step can hit a layer cache left by an earlier
run or by another session sharing the engine (the classic builder keys its cache by
parent image id, BuildKit by the base's layers). mlbuild's uv cache mount is one per
base image (its id names the base), so it starts empty too: the cold build downloads
every wheel. The naive build
downloads them each time as well (--no-cache-dir); mlbuild's cold build runs first, so
any warming of the download path (a caching proxy) favours the naive build, not mlbuild.
--prune-builder runs `docker builder prune -f` before the cold builds. NOTE: the engine
is shared: that prune empties other sessions' BuildKit caches too.

Everything this run makes is named mlbench-incr-<nonce>-* (project, images, containers)
and removed at the end: the containers by name, the images by that name and as the
descendants of this run's own base image (the classic builder's intermediate images,
ids checked through their parent chain), and BuildKit's build cache of this run: its
uv cache mount and the records of every step built on this run's base (found through
the environment step, which names the base). --keep leaves them and prints their names
(the size study builds variants from the kept build context).
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import demo_copy, med, mlbuild_cmd

BASE = "python:3.11-slim"
SERVICE = "diabetes"
ENV = "sklearn"
TARGET = "local"
MODEL_FILE = "sklearn_regression_model.pkl"

NAIVE_DOCKERFILE = """\
# Azure ML v1 style: everything copied, then the environment installed on top of it.
FROM {base}
WORKDIR /var/azureml-app
COPY . /var/azureml-app/
RUN pip install --no-cache-dir -r requirements.txt azureml-inference-server-http
ENV AZUREML_MODEL_DIR=/var/azureml-app/models \\
    AZUREML_ENTRY_SCRIPT=/var/azureml-app/score.py
EXPOSE 5001
CMD ["azmlinfsrv", "--entry_script", "/var/azureml-app/score.py", "--port", "5001"]
"""

REFERENCE_DOCKERFILE = """\
# The environment's own packages, installed the plain way, and nothing else.
FROM {base}
COPY {file} /tmp/{file}
RUN pip install --no-cache-dir {flags}-r /tmp/{file}
"""

# Re-fits the demo's Ridge with another alpha (a different model, same shape).
RETRAIN = """\
import sys, joblib
from sklearn.datasets import load_diabetes
from sklearn.linear_model import Ridge
X, y = load_diabetes(return_X_y=True)
m = Ridge(alpha=float(sys.argv[1])).fit(X, y)
for p in sys.argv[2:]:
    joblib.dump(m, p)
"""

# The classic builder for the naive and reference `docker build`s (mlbuild chooses its
# own builder through the engine API; DOCKER_BUILDKIT does not reach it).
DOCKER_ENV = {**os.environ, "DOCKER_BUILDKIT": "0"}

# Added to the environment one per run of the "add package" scenario: small, pure
# Python, none among the demo's dependencies.
EXTRA_PACKAGES = ["six", "idna", "toolz", "tomli", "pyparsing"]


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sh(cmd: list[str], cwd: Path | None = None, stdin: str | None = None,
       merge: bool = True) -> str:
    """Run a command that must succeed. Returns its stdout (with stderr when ``merge``:
    mlbuild's progress goes there); the output is shown when it fails."""
    p = subprocess.run(cmd, cwd=cwd, input=stdin, text=True, env=DOCKER_ENV, check=False,
                       stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT if merge else subprocess.PIPE)
    if p.returncode:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n"
                         f"{p.stdout[-3000:]}{p.stderr[-3000:] if p.stderr else ''}")
    return p.stdout


def query(cmd: list[str]) -> str:
    """The stdout alone of a command that must succeed (for output that is parsed)."""
    return sh(cmd, merge=False)


def timed(cmd: list[str], cwd: Path | None = None) -> tuple[float, str]:
    """Wall time and output of a command. The file systems are synced first (not timed):
    a build writes hundreds of MB of layers, and the write-back of the previous build
    (mlbuild's or the naive one's) would otherwise land in whichever run comes next."""
    os.sync()
    t = time.perf_counter()
    out = sh(cmd, cwd)
    return time.perf_counter() - t, out


# ---------------------------------------------------------------------------------
# mlbuild's output, read back
# ---------------------------------------------------------------------------------

@dataclass
class Deploy:
    """One `mlbuild deploy` as its output tells it."""

    seconds: float
    ran: list[str] = field(default_factory=list)  # steps that ran, in order
    why: dict[str, str] = field(default_factory=dict)  # the reason mlbuild gives for each
    step_s: dict[str, float] = field(default_factory=dict)
    docker_run: int | None = None  # Dockerfile steps run
    docker_cached: int | None = None
    tag: str | None = None
    builder: str | None = None  # "BuildKit" or "classic builder", as mlbuild says
    own_s: float | None = None  # the time mlbuild reports for itself (after start-up)
    docker_steps: list[str] = field(default_factory=list)  # Dockerfile steps that ran
    prepared: int | None = None  # packages uv downloaded/unpacked (the build log)

    @property
    def env_rebuilt(self) -> bool | None:
        """Whether the step that installs the environment ran (None: nothing built)."""
        if self.tag is None:
            return None
        return any(is_env_step(s) for s in self.docker_steps)

    @property
    def base_rebuilt(self) -> bool:
        """Whether the environment's base layer ran (not just the delta above it, the
        lock's changes since: mlbuild/envlayers.py)."""
        return any(is_env_step(s) and not is_delta_step(s) for s in self.docker_steps)

    @property
    def build_s(self) -> float:
        """The time of the steps that build (lock, model, context, image): the deploy
        without the container step's start, health check and swap."""
        return sum(v for k, v in self.step_s.items() if not k.startswith("container:"))

    @classmethod
    def parse(cls, seconds: float, out: str) -> Deploy:
        d = cls(seconds)
        for line in out.splitlines():
            if m := re.match(r"\s+run\s+(\S+)(?:\s+\((.*)\))?\s*$", line):
                d.ran.append(m.group(1))
                d.why[m.group(1)] = m.group(2) or ""
            if m := re.match(r"\s+done\s+(\S+)\s.*\[([\d.]+) s\]\s*$", line):
                d.step_s[m.group(1)] = float(m.group(2))
            if m := re.match(r"deploy \S+: .*[(, ]([\d.]+) s\)\s*$", line):
                d.own_s = float(m.group(1))
            if m := re.search(r"built (\S+) \((\d+) steps run, (\d+) cached"
                              r".*?(?:; (BuildKit|classic builder))?\)", line):
                d.tag, d.docker_run, d.docker_cached = m.group(1), int(m.group(2)), int(m.group(3))
                d.builder = m.group(4)
            if m := re.match(r"^    \S+ \[\d+/\d+\] (.*)$", line):
                d.docker_steps.append(m.group(1))
        return d

    def read_build_log(self, proj: Path) -> None:
        """How many packages uv prepared (downloaded and unpacked) in this build."""
        log = proj / ".mlbuild/logs" / f"build-{SERVICE}.log"
        if self.tag is None or not log.exists():
            return
        text = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text())  # the classic builder colours stderr
        self.prepared = sum(int(n) for n in re.findall(r"Prepared (\d+) packages? in", text))

    def describe(self) -> str:
        if not self.ran:
            return "nothing ran"
        kinds = ", ".join(s.split(":")[0] for s in self.ran)
        s = f"{len(self.ran)} steps ran ({kinds})"
        if self.docker_run is not None:
            s += (f"; Dockerfile steps {self.docker_run} run / {self.docker_cached} cached"
                  f" ({self.builder or '?'})")
        if self.env_rebuilt is not None:
            s += ("; environment step RAN" if self.base_rebuilt
                  else "; environment delta layer ran, base reused" if self.env_rebuilt
                  else "; environment step reused")
        if self.prepared is not None:
            s += f", uv prepared {self.prepared} packages"
        times = " ".join(f"{k.split(':')[0]} {v:.2f}" for k, v in self.step_s.items())
        first = self.ran[0]
        return f"{s}  [{times} s]  first: {first} ({self.why.get(first, '')})"


# ---------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------

def image_size(ref: str) -> int:
    return int(query(["docker", "image", "inspect", "--format", "{{.Size}}", ref]).strip())


def is_env_layer(created_by: str) -> bool:
    """Whether a history row made the environment: a `pip install` (or mlbuild's
    `uv pip install`, BuildKit) in the image, or (mlbuild, classic builder: installed in
    a builder stage) the COPY of that stage's tree onto `/`."""
    return "pip install" in created_by or bool(
        re.search(r"COPY (dir:\S+ in |/opt/mlbuild-root/ |/opt/conda )(/|/opt/conda) *"
                  r"(# buildkit)?\s*$", created_by))


def is_delta_step(instruction: str) -> bool:
    """Whether a Dockerfile step is the environment's delta layer (mlbuild/envlayers.py)."""
    return instruction.startswith("RUN --mount=type=bind,source=env,target=/srv")


def is_env_step(instruction: str) -> bool:
    """Whether a Dockerfile step mlbuild printed as run installs the environment (it
    prints 64 characters of each)."""
    return any(k in instruction for k in ("pip install", "UV_PYTHON", "--mount=type=cache",
                                          "source=env,target=/srv",
                                          "--from=env", "--from=conda-env"))


def pip_layers(ref: str) -> list[str]:
    """Ids of the intermediate images made by the steps that install the environment
    (the classic builder's: the naive image): the same ids in a new image mean those
    steps were cache hits, not re-run."""
    out = query(["docker", "history", "--no-trunc", "--format", "{{.ID}}\t{{.CreatedBy}}", ref])
    ids = [line.split("\t")[0] for line in out.splitlines() if is_env_layer(line)]
    if not ids:
        raise SystemExit(f"no environment layer found in the history of {ref}")
    return ids


def layer_sizes(ref: str, base_ref: str) -> list[tuple[int, str]]:
    """(bytes, instruction) of the layers above the base, bottom first, non-empty only.
    (By count of history rows: BuildKit's images name no intermediate image ids.)"""
    fmt = ["--format", "{{.ID}}\t{{.Size}}\t{{.CreatedBy}}"]
    out = query(["docker", "history", "--no-trunc", "--human=false", *fmt, ref])
    n_base = len(query(["docker", "history", "-q", base_ref]).split())
    lines = out.splitlines()
    rows = []
    for line in lines[:len(lines) - n_base]:
        _iid, size, how = line.split("\t", 2)
        if int(size):
            how = re.sub(r"^(RUN )?/bin/sh -c (#\(nop\)\s*)?", "", how)
            rows.append((int(size), how))
    return rows[::-1]


def descendants(root_id: str) -> list[str]:
    """Every image in the engine whose parent chain reaches ``root_id``, deepest first."""
    ids = query(["docker", "images", "-a", "-q", "--no-trunc"]).split()
    if not ids:
        return []
    parent = {}
    for line in query(["docker", "image", "inspect", "--format", "{{.Id}} {{.Parent}}",
                    *sorted(set(ids))]).splitlines():
        iid, _, par = line.partition(" ")
        parent[iid] = par.strip()

    def depth(i: str) -> int | None:
        n = 0
        while i and i != root_id:
            i, n = parent.get(i, ""), n + 1
        return n if i == root_id else None

    found = [(d, i) for i in parent if i != root_id and (d := depth(i)) is not None]
    return [i for _, i in sorted(found, reverse=True)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------

def setup(tmp: Path, name: str, base_tag: str) -> tuple[Path, Path, Path]:
    """The demo copy (deploying to this run's base, port and names), the naive context
    and the reference context."""
    proj = demo_copy(tmp)
    manifest = proj / "mlproject.yaml"
    text = manifest.read_text()
    edits = [("name: diabetes\n", f"name: {name}\n"),
             ("local:  {type: docker, port: 6789}",
              f"local:  {{type: docker, port: {free_port()}}}"),
             ("    requirements: envs/requirements.txt\n",
              f"    requirements: envs/requirements.txt\n    base_image: {base_tag}\n")]
    for old, new in edits:
        if old not in text:
            raise SystemExit(f"examples/diabetes/mlproject.yaml changed: no {old.strip()!r}")
        text = text.replace(old, new, 1)
    manifest.write_text(text)

    naive = tmp / "naive"
    (naive / "models").mkdir(parents=True)
    (naive / "score.py").write_bytes((proj / "src/score.py").read_bytes())
    (naive / "requirements.txt").write_bytes((proj / "envs/requirements.txt").read_bytes())
    (naive / "models" / MODEL_FILE).write_bytes((proj / "models" / MODEL_FILE).read_bytes())
    (naive / "Dockerfile").write_text(NAIVE_DOCKERFILE.format(base=base_tag))

    ref = tmp / "reference"  # its Dockerfile is written once mlbuild made its context
    ref.mkdir()
    return proj, naive, ref


def reference_context(ref: Path, proj: Path, base_tag: str) -> None:
    """The reference's context: the environment file of mlbuild's build context."""
    env_dir = proj / ".mlbuild/contexts" / SERVICE / "env"
    lock = env_dir / "requirements.lock.txt"
    env_file = lock if lock.exists() else env_dir / "requirements.txt"
    (ref / env_file.name).write_bytes(env_file.read_bytes())
    flags = "--require-hashes --no-deps " if env_file == lock else ""
    (ref / "Dockerfile").write_text(
        REFERENCE_DOCKERFILE.format(base=base_tag, file=env_file.name, flags=flags))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs of each warm scenario (median)")
    ap.add_argument("--naive-repeat", type=int, default=1,
                    help="runs of the naive edit rebuilds (each a full pip install)")
    ap.add_argument("--prune-builder", action="store_true",
                    help="`docker builder prune -f` before the cold builds (shared engine!)")
    ap.add_argument("--keep", action="store_true", help="leave the images, containers and files")
    args = ap.parse_args()

    try:
        sh(["docker", "version", "--format", "{{.Server.Version}}"])
    except (SystemExit, FileNotFoundError):
        raise SystemExit("no Docker engine answers: run `bash .ci/engines.sh` first")

    nonce = secrets.token_hex(3)
    name = f"mlbench-incr-{nonce}"
    base_tag, naive_tag, ref_tag = (f"{name}-{k}:latest" for k in ("base", "naive", "ref"))
    tmpdir = tempfile.mkdtemp(prefix=f"{name}-")
    tmp = Path(tmpdir)
    deploy = [*mlbuild_cmd(), "deploy", TARGET]
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    base_id = None
    try:
        # A layer of its own (BuildKit keys a base by its layers, not by its labels).
        sh(["docker", "build", "-q", "-t", base_tag, "-"],
           stdin=f"FROM {BASE}\nLABEL dev.mlbuild.bench-nonce={nonce}\n"
                 f"RUN echo {nonce} > /etc/mlbench-nonce\n")
        base_id = query(["docker", "image", "inspect", "--format", "{{.Id}}", base_tag]).strip()
        proj, naive, ref = setup(tmp, name, base_tag)
        if args.prune_builder:
            say("docker builder prune -f (BuildKit cache of the whole engine)")
            sh(["docker", "builder", "prune", "-f"])
        naive_build = ["docker", "build", "-t", naive_tag, str(naive)]

        # Cold: nothing cached (fresh base id), nothing deployed.
        say(f"[{name}] cold: mlbuild deploy {TARGET} ...")
        s, out = timed(deploy, proj)
        ml_cold = Deploy.parse(s, out)
        ml_cold.read_build_log(proj)
        if ml_cold.tag is None or ml_cold.docker_cached:
            raise SystemExit(f"the cold deploy was not a cold build:\n{out}")
        say(f"  {s:.1f} s; {ml_cold.describe()}")
        say("cold: naive docker build ...")
        naive_cold, out = timed(naive_build)
        if "Using cache" in out:
            raise SystemExit(f"the cold naive build hit the cache:\n{out}")
        say(f"  {naive_cold:.1f} s")
        say("cold: reference (only pip install of the environment file) ...")
        reference_context(ref, proj, base_tag)
        ref_cold, _ = timed(["docker", "build", "-t", ref_tag, str(ref)])
        say(f"  {ref_cold:.1f} s")

        # No-op: interleaved, after one settling run each.
        say("no-op ...")
        timed(deploy, proj)
        timed(naive_build)
        ml_noop, ml_noop_own, naive_noop = [], [], []
        for _ in range(args.repeat):
            s, out = timed(deploy, proj)
            d = Deploy.parse(s, out)
            if d.ran:
                raise SystemExit(f"no-op deploy ran steps: {d.ran}\n{out}")
            ml_noop.append(s)
            ml_noop_own.append(d.own_s)
            naive_noop.append(timed(naive_build)[0])

        # Edit code, then edit model, then add a package.
        ml_tag = ml_cold.tag
        results: dict[str, tuple[list[Deploy], list[float], list[bool]]] = {}
        for scenario in ("edit code", "edit model", "add package"):
            say(f"{scenario} ...")
            ml_runs, naive_runs, naive_pip = [], [], []
            for i in range(max(args.repeat, args.naive_repeat)):
                if scenario == "edit code":
                    for f in (proj / "src/score.py", naive / "score.py"):
                        with open(f, "a") as fh:
                            fh.write(f"# bench edit {i}\n")
                elif scenario == "edit model":
                    sh([sys.executable, "-c", RETRAIN, f"{0.2 + 0.1 * i:.2f}",
                        str(proj / "models" / MODEL_FILE), str(naive / "models" / MODEL_FILE)])
                else:
                    for f in (proj / "envs/requirements.txt", naive / "requirements.txt"):
                        with open(f, "a") as fh:
                            fh.write(f"{EXTRA_PACKAGES[i % len(EXTRA_PACKAGES)]}\n")
                if i < args.repeat:
                    s, out = timed(deploy, proj)
                    d = Deploy.parse(s, out)
                    if d.tag is None:
                        raise SystemExit(f"{scenario}: no image was built\n{out}")
                    if scenario == "add package" and f"lock:{ENV}" not in d.ran:
                        raise SystemExit(f"{scenario}: the environment was not locked again\n{out}")
                    d.read_build_log(proj)
                    ml_tag = d.tag
                    ml_runs.append(d)
                    say(f"  mlbuild {s:.2f} s; {d.describe()}")
                if i < args.naive_repeat:
                    before = pip_layers(naive_tag)
                    s, _ = timed(naive_build)
                    naive_runs.append(s)
                    naive_pip.append(pip_layers(naive_tag) != before)
                    say(f"  naive {s:.1f} s; pip layer {'rebuilt' if naive_pip[-1] else 'reused'}")
            results[scenario] = (ml_runs, naive_runs, naive_pip)

        # The deployed container runs the last image and answers.
        running = query(["docker", "inspect", "--format", "{{.Config.Image}}",
                         f"{name}-{SERVICE}-{TARGET}"]).strip()
        sh([*mlbuild_cmd(), "invoke", SERVICE, "-t", TARGET, "--data", "@samples/input.json"], proj)
        which = "the last image" if running == ml_tag else "NOT the last image"
        serving = f"container runs {running}: {which}; POST /score answers"

        sizes = {k: image_size(v) for k, v in
                 (("base", base_tag), ("naive", naive_tag), ("mlbuild", ml_tag), ("ref", ref_tag))}
        breakdown = layer_sizes(ml_tag, base_tag)
        report(args, ml_cold, naive_cold, ref_cold, ml_noop, ml_noop_own, naive_noop, results,
               sizes, breakdown, serving, time.perf_counter() - t_start, load_start)
    finally:
        if args.keep:
            say(f"kept: project {tmp / 'diabetes'}, images {name}-*, "
                f"container {name}-{SERVICE}-{TARGET}")
        else:
            cleanup(name, tmp, base_tag, base_id)


def cleanup(name: str, tmp: Path, base_tag: str, base_id: str | None) -> None:
    proj = tmp / "diabetes"
    if (proj / ".mlbuild").exists():
        subprocess.run([*mlbuild_cmd(), "down", TARGET], cwd=proj,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    for suffix in ("", "-next", "-old"):
        subprocess.run(["docker", "rm", "-f", f"{name}-{SERVICE}-{TARGET}{suffix}"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    try:
        base_id = base_id or query(["docker", "image", "inspect", "--format", "{{.Id}}",
                                    base_tag]).strip()
        ours = descendants(base_id)
    except SystemExit:
        ours = []
    # Leaves first; removing one also removes its untagged parents, hence the batches
    # that partly name images already gone (errors ignored).
    for i in range(0, len(ours), 50):
        subprocess.run(["docker", "rmi", "-f", *ours[i:i + 50]],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    # mlbuild's images (BuildKit's name no parent image), by this run's name.
    tags = subprocess.run(["docker", "images", "--format", "{{.Repository}}:{{.Tag}}",
                           "--filter", f"reference={name}-*"],
                          capture_output=True, text=True, check=False).stdout.split()
    if tags:
        subprocess.run(["docker", "rmi", "-f", *tags],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    subprocess.run(["docker", "rmi", base_tag],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    prune_build_cache(name)
    shutil.rmtree(tmp, ignore_errors=True)


def prune_build_cache(name: str) -> None:
    """Remove what this run's BuildKit builds left in the engine's build cache: the
    records whose step names this run (mlbuild's environment step echoes its uv cache
    id, which holds the base image's name; the uv cache mount itself), this run's base
    layer as BuildKit took it (the nearest "from local" record below them), and every
    record made on top of those, children first."""
    try:
        import docker

        client = docker.from_env(timeout=60)
        recs = {r["ID"]: r for r in client.df().get("BuildCache") or []}
        doomed = {i for i, r in recs.items() if name in (r.get("Description") or "")}
        for i in list(doomed):
            p = recs[i].get("Parent")
            while p in recs and recs[p].get("Description") != "from local":
                p = recs[p].get("Parent")
            if p in recs:
                doomed.add(p)
        grew = True
        while grew:
            more = {i for i, r in recs.items() if i not in doomed and r.get("Parent") in doomed}
            doomed |= more
            grew = bool(more)
        while doomed:
            parents = {recs[i].get("Parent") for i in doomed}
            leaves = [i for i in doomed if i not in parents]
            if not leaves:
                break
            for i in leaves:
                client.api.prune_builds(filters={"id": [i]})
                doomed.discard(i)
    except Exception as e:  # noqa: BLE001  a leftover cache is not worth failing the run
        say(f"(the build cache of {name} was not all removed: {e})")


# ---------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------

def report(args, ml_cold: Deploy, naive_cold: float, ref_cold: float, ml_noop, ml_noop_own,
           naive_noop, results, sizes, breakdown, serving: str, total_s: float,
           load_start: float) -> None:
    MB = 1e6
    code_ml, code_naive, code_naive_pip = results["edit code"]
    model_ml, model_naive, model_naive_pip = results["edit model"]
    pkg_ml, pkg_naive, pkg_naive_pip = results["add package"]
    ml = {"cold": ml_cold.seconds, "no-op": med(ml_noop),
          "edit code": med([d.seconds for d in code_ml]),
          "edit model": med([d.seconds for d in model_ml]),
          "add package": med([d.seconds for d in pkg_ml])}
    # The build alone (lock, model, context, image: the deploy but its container step).
    ml_build = {"cold": ml_cold.build_s, "edit code": med([d.build_s for d in code_ml]),
                "add package": med([d.build_s for d in pkg_ml])}
    nv = {"cold": naive_cold, "no-op": med(naive_noop),
          "edit code": med(code_naive), "edit model": med(model_naive),
          "add package": med(pkg_naive)}

    def secs(x: float) -> str:
        return f"{x:.2f} s" if x < 10 else f"{x:.0f} s"

    cols = ("cold", "no-op", "edit code", "edit model", "add package")
    print(f"repeats: mlbuild warm x{args.repeat}, naive no-op x{args.repeat}, "
          f"naive edits x{args.naive_repeat} (medians); base {BASE} {sizes['base'] / MB:.0f} MB; "
          f"load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
          f"({os.cpu_count()} CPUs; the engine and the network are shared)\n")
    print("| | cold | no-op | edit code | edit model | add package | image |")
    print("|---|---|---|---|---|---|---|")
    print("| naive Azure-v1-style Dockerfile (`docker build`, nothing deployed) | "
          + " | ".join(secs(nv[c]) for c in cols) + f" | {sizes['naive'] / MB:.0f} MB |")
    print("| `mlbuild deploy local` (build + check/replace container) | "
          + " | ".join(secs(ml[c]) for c in cols) + f" | {sizes['mlbuild'] / MB:.0f} MB |")
    print("| mlbuild / naive | " + " | ".join(f"{ml[c] / nv[c]:.2f}x" for c in cols)
          + f" | {sizes['mlbuild'] / sizes['naive']:.2f}x |")
    print(f"\nmlbuild's build steps alone (lock, model, context, image; no container step): "
          f"cold {ml_build['cold']:.2f} s, edit code {ml_build['edit code']:.2f} s "
          f"({ml_build['edit code'] / ml_build['cold']:.2f}x), add package "
          f"{ml_build['add package']:.2f} s ({ml_build['add package'] / ml_build['cold']:.2f}x)")

    env_pkgs = sizes["ref"] - sizes["base"]
    additions = sizes["mlbuild"] - sizes["ref"]
    print(f"\nreference (base + `pip install --no-cache-dir -r <the environment's file>`): "
          f"{sizes['ref'] / MB:.0f} MB, cold build {ref_cold:.0f} s; env packages "
          f"{env_pkgs / MB:.1f} MB")
    env_at = max((i for i, (_, how) in enumerate(breakdown) if is_env_layer(how)), default=-1)
    above_env = sum(size for size, _ in breakdown[env_at + 1:])
    print(f"mlbuild additions = image - reference = {additions / MB:.1f} MB "
          f"(layers above the environment's: {above_env / MB:.1f} MB)")
    print("mlbuild image layers above the base:")
    for size, how in breakdown:
        print(f"  {size / MB:8.1f} MB  {how[:90]}")

    print("\nwhat ran (mlbuild):")
    print(f"  cold        {ml_cold.describe()}")
    for label, runs in (("edit code", code_ml), ("edit model", model_ml),
                        ("add package", pkg_ml)):
        for d in runs:
            print(f"  {label:<11} {d.seconds:5.2f} s  {d.describe()}")
    print(f"  no-op runs  {' '.join(f'{x:.3f}' for x in ml_noop)} s wall; mlbuild's own "
          f"report {' '.join(f'{x:.2f}' for x in ml_noop_own if x is not None)} s (the rest is "
          f"interpreter start-up and imports)")
    print(f"  naive: edit code pip layer rebuilt {sum(code_naive_pip)}/{len(code_naive_pip)}, "
          f"edit model {sum(model_naive_pip)}/{len(model_naive_pip)}, "
          f"add package {sum(pkg_naive_pip)}/{len(pkg_naive_pip)}; no-op runs "
          f"{' '.join(f'{x:.3f}' for x in naive_noop)} s")
    print(f"  {serving}")

    def mark(ok: bool) -> str:
        return "OK" if ok else "MISSED"

    reused = sum(not d.env_rebuilt for d in model_ml)
    goals = [
        ("no-op <= 0.3 s", f"{ml['no-op']:.3f} s", ml["no-op"] <= 0.3),
        ("edit code <= 3 s", f"{ml['edit code']:.2f} s", ml["edit code"] <= 3),
        ("edit code <= 0.1x own cold", f"{ml['edit code'] / ml['cold']:.2f}x",
         ml["edit code"] <= 0.1 * ml["cold"]),
        ("edit model reinstalls nothing", f"environment step reused {reused}/{len(model_ml)}",
         reused == len(model_ml)),
        ("cold <= 0.5x naive cold", f"{ml['cold'] / nv['cold']:.2f}x",
         ml["cold"] <= 0.5 * nv["cold"]),
        ("add package <= 0.2x own cold (deploy)", f"{ml['add package'] / ml['cold']:.2f}x",
         ml["add package"] <= 0.2 * ml["cold"]),
        ("add package <= 0.2x own cold (build steps)",
         f"{ml_build['add package'] / ml_build['cold']:.2f}x",
         ml_build["add package"] <= 0.2 * ml_build["cold"]),
        ("image <= 0.7x naive", f"{sizes['mlbuild'] / sizes['naive']:.2f}x",
         sizes["mlbuild"] <= 0.7 * sizes["naive"]),
        ("additions <= 20 MB", f"{additions / MB:.1f} MB", additions <= 20 * MB),
    ]
    print("\ngoals: " + "; ".join(f"{g}: {v} {mark(ok)}" for g, v, ok in goals))
    print(f"({sum(ok for *_, ok in goals)}/{len(goals)} met; bench took {total_s:.0f} s)")


if __name__ == "__main__":
    main()
