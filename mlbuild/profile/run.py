"""The profiling loop: start the service at each grid point, load it step by step, measure.

    for each (cpu, memory) of the grid:                       one Point
        start the service (container with --cpus/--memory, pinned; or a local process)
        warm-up ── c=1 ── c=2 ── c=4 ── ...                   one Step each, a window long
                   stop at: p99 over the objective, errors over 1 %, an OOM kill or a
                   restart, the service gone, or a plateau (< 10 % more than the best)
        stop the service (always: Ctrl-C too)

Where the service runs is a :class:`Runner`: :class:`ContainerRunner` (the service's
image on the Docker engine; the container on the highest CPUs, the load generator on
the others) or :class:`ProcessRunner` (the runtime as a local subprocess, no limits).
Both hand back a :class:`Running` service: its URL, the source of its CPU and memory
readings (mlbuild.profile.cgroup) and whether it was killed.

The figures of a step come from the load generator (counts, rate, HDR latency) and from
a sampler of the service's cgroup (CPU over the window, memory peak).
"""

from __future__ import annotations

import math
import os
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from mlbuild.errors import StepFailed
from mlbuild.profile import cgroup
from mlbuild.profile.loadgen import LoadResult, generate_load

GB = 1024 ** 3          # memory limits count GiB, as the docker target does
MAX_ERROR_RATE = 0.01   # a step with more errors than this ends the point
PLATEAU_GAIN = 0.10     # a step gaining less than this over the best so far ends it
STEP_WARMUP = 0.25      # seconds of each step's load not counted (connections, queues)
READY_TIMEOUT = float(os.environ.get("MLBUILD_READY_TIMEOUT", "300"))
HOST = "127.0.0.1"
PERCENTILES = (50, 90, 95, 99, 99.9)


@dataclass
class Settings:
    """What the loop does at each grid point."""

    concurrency: Sequence[int] = (1, 2, 4, 8, 16, 32)
    window: float = 3.0
    warmup: float = 2.0
    slo_p99_ms: float | None = None
    timeout: float = 10.0


@dataclass
class Step:
    """One window of load at one concurrency (JSON-ready through :meth:`to_json`)."""

    concurrency: int
    load: LoadResult
    cpu_used: float | None          # cores, averaged over the window
    memory_peak: int | None         # bytes, the largest sampled in the window
    oom_kills: int = 0              # during this step
    restarts: int = 0               # during this step
    stop: str | None = None         # why the point ended after this step

    def latency_ms(self) -> dict[str, float]:
        h = self.load.latency
        values = h.percentiles(PERCENTILES)
        out = {f"p{q:g}": round(v / 1000, 3) for q, v in zip(PERCENTILES, values)}
        out["mean"] = round(h.mean / 1000, 3)
        out["max"] = round(h.max / 1000, 3)
        return out

    def ok(self, slo_p99_ms: float | None) -> bool:
        """Meets the objective: errors within 1 %, p99 within the SLO, nothing killed."""
        r = self.load
        if self.oom_kills or self.restarts or not r.responses:
            return False
        if 1 - r.success_rate > MAX_ERROR_RATE:
            return False
        return slo_p99_ms is None or self.latency_ms()["p99"] <= slo_p99_ms

    def to_json(self, slo_p99_ms: float | None = None) -> dict:
        r = self.load
        return {
            "concurrency": self.concurrency, "duration_s": round(r.duration, 3),
            "requests": r.requests, "responses": r.responses, "successes": r.successes,
            "success_rate": round(r.success_rate, 5), "rps": round(r.rps, 2),
            "status": {str(k): v for k, v in sorted(r.status.items())},
            "errors": dict(sorted(r.errors.items())),
            "latency_ms": self.latency_ms(),
            "cpu_used": None if self.cpu_used is None else round(self.cpu_used, 3),
            "memory_peak_gb": None if self.memory_peak is None
            else round(self.memory_peak / GB, 4),
            "oom_kills": self.oom_kills, "restarts": self.restarts,
            "meets_objective": self.ok(slo_p99_ms), "stop": self.stop,
            "generator_cpu_us_per_response": round(r.cpu_us_per_response, 1),
        }


@dataclass
class Point:
    """One grid point: a CPU and memory limit (None: unlimited), and its steps."""

    cpu: float | None
    memory_gb: float | None
    steps: list[Step] = field(default_factory=list)
    pinned: str | None = None       # CPUs the container ran on ("1"), None: not pinned
    generator_cpus: list[int] | None = None
    memory_peak: int | None = None  # bytes, the kernel's high-water mark over its life
    oom_kills: int = 0
    restarts: int = 0
    died: str | None = None         # the service ended during the point: why
    stop: str | None = None
    timeline: list[tuple[float, float]] = field(default_factory=list)  # (s, GB)
    started_s: float = 0.0          # seconds from the profile's start

    def sustained(self, slo_p99_ms: float | None) -> Step | None:
        """The step of the highest rate that met the objective."""
        good = [s for s in self.steps if s.ok(slo_p99_ms)]
        return max(good, key=lambda s: s.load.rps) if good else None

    def to_json(self, slo_p99_ms: float | None = None) -> dict:
        best = self.sustained(slo_p99_ms)
        return {
            "cpu": self.cpu, "memory_gb": self.memory_gb, "pinned_cpus": self.pinned,
            "generator_cpus": self.generator_cpus,
            "memory_peak_gb": None if self.memory_peak is None
            else round(self.memory_peak / GB, 4),
            "oom_kills": self.oom_kills, "restarts": self.restarts, "died": self.died,
            "stop": self.stop,
            "sustained_rps": round(best.load.rps, 2) if best else None,
            "sustained_concurrency": best.concurrency if best else None,
            "steps": [s.to_json(slo_p99_ms) for s in self.steps],
            # NOTE: at most ~200 samples a point: enough for the plot, not a huge file
            "memory_timeline": [[round(t, 2), round(g, 4)] for t, g in
                                self.timeline[::max(1, len(self.timeline) // 200)]],
        }


# --- where the service runs --------------------------------------------------------------

@dataclass
class Running:
    """A started service: where to load it and how to read what it uses."""

    url: str
    source: object                          # cgroup.Cgroup / cgroup.ProcessTree / None
    state: Callable[[], tuple[bool, bool, int]]  # () -> (alive, oom_killed, restarts)
    log: Callable[[], str]
    pinned: str | None = None
    generator_cpus: list[int] | None = None


class Runner:
    """Starts and stops the service at a grid point. ``limited``: whether CPU and memory
    limits apply (a container) or not (a local process)."""

    limited = False
    where = ""

    def start(self, cpu: float | None, memory_gb: float | None) -> Running:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def placement(cpu: float | None, ncpu: int) -> tuple[str | None, list[int] | None]:
    """The CPUs of the container and of the load generator.

    The container gets the highest ``ceil(cpu)`` CPUs and the generator the rest, when
    one is left for it (2 CPUs, ``cpu`` 1: container ``"1"``, generator ``[0]``); else
    neither is pinned and the two share the machine.
    """
    if cpu is None or ncpu < 2:
        return None, None
    k = max(1, math.ceil(cpu - 1e-9))
    if k > ncpu - 1:
        return None, None
    return ",".join(str(c) for c in range(ncpu - k, ncpu)), list(range(ncpu - k))


class ContainerRunner(Runner):
    """The service's image in a container on the host's network (its runtime on a free
    loopback port), ``--cpus``/``--memory`` (swap off) per grid point, named uniquely and
    removed at :meth:`stop`."""

    limited = True

    def __init__(self, engine, image: str, env: dict[str, str], name_prefix: str,
                 labels: dict[str, str]):
        self.eng = engine
        self.image = image
        self.env = env
        self.prefix = name_prefix
        self.labels = labels
        self.name: str | None = None
        self.where = f"container of {image}"

    def start(self, cpu, memory_gb) -> Running:
        from mlbuild.graph.steps.container import wait_ready

        self.name = f"{self.prefix}-{secrets.token_hex(4)}"
        port, health = free_port(), free_port()
        pinned, gen_cpus = placement(cpu, os.cpu_count() or 1)
        env = dict(self.env, MLBUILD_HOST=HOST, MLBUILD_PORT=str(port),
                   MLBUILD_HEALTH_PORT=str(health))
        memory = int(memory_gb * GB) if memory_gb else None
        st = self.eng.run_container(self.name, self.image, network_mode="host", env=env,
                                    labels=self.labels, cpus=cpu, memory=memory,
                                    step_id=f"profile {self.name}")
        # NOTE: DockerEngine.run_container has no cpuset or swap limit: set through the
        # SDK's update right after the start (init() is still importing by then). Swap
        # off (memswap = memory), so an OOM kill happens at the limit, as on Kubernetes.
        update = {}
        if pinned:
            update["cpuset_cpus"] = pinned
        if memory:
            update.update(mem_limit=memory, memswap_limit=memory)
        if update:
            try:
                self.eng.api.update_container(self.name, **update)
            except Exception as e:  # noqa: BLE001 - the engine's refusal, said plainly
                raise StepFailed(f"profile {self.name}", f"docker update {self.name}: {e}")
        why = wait_ready(self.eng, self.name, health, READY_TIMEOUT)
        if why is not None:
            logs = self.eng.container_logs(self.name, tail=20).rstrip()
            oom = getattr(why, "oom_killed", False)
            raise StepFailed(f"profile {self.name}",
                             f"the service did not become ready ({_why(why)})"
                             + (" — killed: out of memory" if oom else "")
                             + ". Last lines of its log:\n    "
                             + "\n    ".join(logs.splitlines()[-20:]),
                             hint="raise --memory-gb" if oom else None)
        source = cgroup.find(st.id)

        def state() -> tuple[bool, bool, int]:
            s = self.eng.container_state(self.name)
            if s is None:
                return False, False, 0
            return s.running and s.status != "restarting", s.oom_killed, s.restart_count

        return Running(f"http://{HOST}:{port}/score", source, state,
                       lambda: self.eng.container_logs(self.name, tail=20),
                       pinned, gen_cpus)

    def stop(self) -> None:
        if self.name:
            self.eng.remove_container(self.name, stop_timeout=0)
            self.name = None


def _why(why) -> str:
    if isinstance(why, str):
        return why
    return f"exited with status {why.exit_code}"


class ProcessRunner(Runner):
    """The runtime as a local subprocess (a process target's way), in its own process
    group, on a free loopback port; no limits."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: str, log_path):
        self.argv, self.env, self.cwd, self.log_path = argv, env, cwd, log_path
        self.popen: subprocess.Popen | None = None
        self.where = "local process (no CPU or memory limit)"

    def start(self, cpu, memory_gb) -> Running:
        from mlbuild.backends.process import probe

        port = free_port()
        log = open(self.log_path, "ab")
        try:
            self.popen = subprocess.Popen(self.argv + ["--host", HOST, "--port", str(port)],
                                          env=self.env, cwd=self.cwd, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + READY_TIMEOUT
        while probe(f"http://{HOST}:{port}/healthz/ready", timeout=2) != 200:
            if self.popen.poll() is not None:
                raise StepFailed("profile", f"the service exited with status "
                                            f"{self.popen.returncode} before it was ready. "
                                            f"Last lines of {self.log_path}:\n    "
                                 + "\n    ".join(self._tail()))
            if time.monotonic() > deadline:
                raise StepFailed("profile", f"the service is not ready after "
                                            f"{READY_TIMEOUT:.0f} s (MLBUILD_READY_TIMEOUT)")
            time.sleep(0.1)
        popen = self.popen

        def state() -> tuple[bool, bool, int]:
            return popen.poll() is None, False, 0

        return Running(f"http://{HOST}:{port}/score", cgroup.ProcessTree(popen.pid), state,
                       lambda: "\n".join(self._tail()))

    def _tail(self, n: int = 20) -> list[str]:
        try:
            with open(self.log_path, "rb") as fh:
                return fh.read().decode("utf-8", "replace").splitlines()[-n:]
        except OSError:
            return []

    def stop(self) -> None:
        p, self.popen = self.popen, None
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        except ProcessLookupError:
            pass


# --- the loop --------------------------------------------------------------------------------

def run_point(runner: Runner, cpu: float | None, memory_gb: float | None, bodies: list[bytes],
              settings: Settings, *, authorization: str | None = None,
              content_type: str = "application/json", t_origin: float | None = None,
              before_load: Callable[[Running], None] | None = None,
              on_step: Callable[[str], None] | None = None) -> Point:
    """Start the service with these limits, load it step by step, stop it.

    Args:
        before_load: called once the service is ready, before any load (the data check).
        on_step: told ``"c=4"``-like labels as steps start (the progress display).

    Raises:
        StepFailed: the service did not start.
        InvalidInput: from ``before_load``.
    """
    point = Point(cpu, memory_gb)
    t_origin = t_origin if t_origin is not None else time.monotonic()
    point.started_s = time.monotonic() - t_origin
    sampler = None
    try:
        svc = runner.start(cpu, memory_gb)
        point.pinned, point.generator_cpus = svc.pinned, svc.generator_cpus
        if svc.source is not None:
            sampler = cgroup.Sampler(svc.source).start()
        if before_load:
            before_load(svc)
        kw = dict(bodies=bodies, content_type=content_type, authorization=authorization,
                  timeout=settings.timeout, cpus=svc.generator_cpus)
        oom0 = _oom(svc)
        if settings.warmup > 0:
            if on_step:
                on_step("warm-up")
            generate_load(svc.url, concurrency=settings.concurrency[0],
                          duration=settings.warmup, **kw)
        best_rps = 0.0
        restarts0 = svc.state()[2]
        for i, c in enumerate(settings.concurrency):
            if on_step:
                on_step(f"c={c}")
            oom_before = _oom(svc)
            load = generate_load(svc.url, concurrency=c, duration=settings.window,
                                 warmup=STEP_WARMUP, **kw)
            t0, t1 = load.started, load.started + load.duration
            cpu_used = mem = None
            if sampler is not None:
                sampler.sample()
                used = sampler.cpu_between(t0, t1)
                cpu_used = used / load.duration if used is not None and load.duration else None
                mem = sampler.memory_peak(t0, t1)
            alive, oom_killed, restarts = svc.state()
            step = Step(c, load, cpu_used, mem, oom_kills=max(0, _oom(svc) - oom_before),
                        restarts=max(0, restarts - restarts0))
            if oom_killed and not step.oom_kills:
                step.oom_kills = 1
            restarts0 = restarts
            point.steps.append(step)
            step.stop = _stop_reason(step, best_rps, settings, alive, i)
            if not alive:
                point.died = "killed: out of memory" if oom_killed or step.oom_kills else \
                    "the service exited"
            if step.stop:
                point.stop = step.stop
                break
            best_rps = max(best_rps, load.rps)
        if point.stop is None:
            point.stop = "last concurrency step"
        point.oom_kills = max(0, _oom(svc) - oom0) or sum(s.oom_kills for s in point.steps)
        point.restarts = sum(s.restarts for s in point.steps)
        if svc.source is not None:
            peak = svc.source.memory_peak()
            sampled = max((m for _, _, m in sampler.samples if m is not None), default=None) \
                if sampler else None
            point.memory_peak = max(filter(None, (peak, sampled)), default=None)
    finally:
        if sampler is not None:
            sampler.stop()
            point.timeline = [(t - t_origin, m / GB) for t, _, m in sampler.samples
                              if m is not None]
        runner.stop()
    return point


def _oom(svc: Running) -> int:
    n = svc.source.oom_kills() if svc.source is not None else None
    return n or 0


def _stop_reason(step: Step, best_rps: float, settings: Settings, alive: bool,
                 index: int) -> str | None:
    r = step.load
    if step.oom_kills:
        return "OOM kill"
    if not alive:
        return "the service died"
    if step.restarts:
        return "the service restarted"
    ended = r.responses + r.error_count
    if ended and 1 - r.success_rate > MAX_ERROR_RATE:
        return f"error rate {100 * (1 - r.success_rate):.1f} % over 1 %"
    if not r.responses:
        return "no response"
    if settings.slo_p99_ms is not None and step.latency_ms()["p99"] > settings.slo_p99_ms:
        return f"p99 {step.latency_ms()['p99']:.1f} ms over the objective " \
               f"{settings.slo_p99_ms:g} ms"
    if index > 0 and r.rps < best_rps * (1 + PLATEAU_GAIN):
        return f"plateau: {r.rps:.0f} req/s, < {100 * PLATEAU_GAIN:.0f} % over " \
               f"{best_rps:.0f}"
    return None


def run_grid(runner: Runner, grid: Sequence[tuple[float | None, float | None]],
             bodies: list[bytes], settings: Settings, *, authorization: str | None = None,
             content_type: str = "application/json",
             before_load: Callable[[Running], None] | None = None,
             on_step: Callable[[int, int, str, str], None] | None = None) -> list[Point]:
    """:func:`run_point` for each grid point; ``before_load`` only before the first.

    A point whose service does not start (killed while init() loads the model, its
    memory too small) is kept, with ``died`` saying why and no steps.
    """
    points = []
    t_origin = time.monotonic()
    checked: list[bool] = []
    last_error: StepFailed | None = None
    for k, (cpu, mem) in enumerate(grid):
        label = _label(cpu, mem)

        def check(svc, _checked=checked):
            if before_load and not _checked:
                try:
                    before_load(svc)
                except StepFailed as e:
                    e.from_check = True  # the data's verdict: no other point runs
                    raise
                _checked.append(True)

        def step(text, _k=k, _label=label):
            if on_step:
                on_step(_k + 1, len(grid), _label, text)

        if on_step:
            on_step(k + 1, len(grid), label, "starting")
        try:
            points.append(run_point(runner, cpu, mem, bodies, settings,
                                    authorization=authorization, content_type=content_type,
                                    t_origin=t_origin, before_load=check, on_step=step))
        except StepFailed as e:
            if getattr(e, "from_check", False):
                raise
            last_error = e
            p = Point(cpu, mem, died=e.message.split(". Last lines")[0], stop="did not start")
            if "out of memory" in e.message:
                p.oom_kills = 1
            points.append(p)
    if not any(p.steps for p in points):
        raise last_error
    return points


def _label(cpu, mem) -> str:
    if cpu is None and mem is None:
        return "unlimited"
    return f"cpu {cpu:g}, memory {mem:g} GB" if mem else f"cpu {cpu:g}"

