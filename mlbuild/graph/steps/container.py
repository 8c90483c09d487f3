"""``container`` steps: run a service's image on the Docker engine (the docker target).

    image:diabetes ──▶ container:local/diabetes

The container is ``<project>-<service>-<target>``, with the target's CPU and memory
limits (where the target sets none: the sum of the service's models' ``resources``), restart policy ``unless-stopped`` and labels naming the project, service,
target and the step's fingerprint. Keys (``auth: key``) reach it as a read-only
mounted file, never through the image, its environment or its labels.

Networking: the container shares the engine host's network and its runtime listens on
127.0.0.1:``port`` (``port + 1``, ... for the target's services, as on a process
target) with SO_REUSEPORT, exactly like a process target's release. That is what lets
a changed service start *beside* the old one on the same port, without a gap:

    1. ``NAME-next`` from the new image; its runtime binds the port only once its
       init() returned, and reports readiness on a health port of its own (a free
       port picked here) — until then the old container serves every request;
    2. ready → the old container is retired without waiting for it: renamed
       ``NAME-old``, never restarted, sent SIGTERM (its listener closes on its event loop's
       next turn -- until then it may still take a new connection --, its
       in-flight requests finish, then it exits by itself; the next deploy or ``down``
       removes it), and ``NAME-next`` is renamed ``NAME``: one container start per
       deploy, and no wait for a stop (~0.5 s of each redeploy of the demo);
    3. it fails or exits → removed; the old container was never touched and keeps
       serving; the step fails with its exit status and last log lines. Exit status 1
       is the runtime's "cannot listen": another program holds the port
       (Unschedulable).

Model data (``collect_model_data``, to a folder): the named volume
``mlbuild-<project>-<service>-model-data`` is mounted at the image's folder for it
(``/var/mlbuild/model-data``): a new volume starts as a copy of that folder, which is
the image user's (uid 10001), so the runtime can write to it; the volume outlives the
container (``docker volume rm`` deletes the records). With ``path``, that folder of this
machine is bind-mounted there instead (made writable by everyone when mlbuild creates
it; a folder that exists must be writable by uid 10001, else the runtime drops the
records and says so in its log). A service with ``tracing: true`` gets the ``OTEL_*``
variables of the shell that runs ``mlbuild deploy`` (the exporter's endpoint).

(A published port, ``-p``, cannot be shared by two containers: an old/new overlap
would need a proxy in front, and every redeploy would start the service twice.
Host networking needs a Linux engine; the runtime still binds 127.0.0.1 only.)

Up to date means: the container exists, runs, and carries this step's fingerprint.
"""

from __future__ import annotations

import http.client
import os
import socket
import time

from mlbuild.backends import dockerapi
from mlbuild.errors import StepFailed
from mlbuild.graph.step import BuildContext
from mlbuild.graph.steps.context import context_of
from mlbuild.graph.steps.image import LABEL_FINGERPRINT, engine
from mlbuild.graph.steps.process import (GRACEFUL_TIMEOUT, RunningServiceStep, keys_file,
                                         otel_env, service_port)
from mlbuild.manifest.model import MODEL_DATA_IN_IMAGE, Resources, resources_hint
from mlbuild.state import keys as keystore

HOST = "127.0.0.1"
KEYS_IN_CONTAINER = "/run/secrets/mlbuild-keys"
READY_TIMEOUT = float(os.environ.get("MLBUILD_READY_TIMEOUT", "300"))
LONG_POLL = 1.0  # seconds a readiness request may be held by the runtime
ENGINE_EVERY = 0.2


def container_name(project, service: str, target: str) -> str:
    return f"{project.name}-{service}-{target}"


def model_data_volume(project, service) -> str | None:
    """The volume (a name, or an absolute host path) mounted at the image's model data
    folder for ``service``; None when it collects no model data into a folder."""
    c = service.collect_model_data
    if c is None or c.destination("docker") != "folder":
        return None
    if c.path is None:
        return f"mlbuild-{project.name}-{service.name}-model-data"
    return c.path if os.path.isabs(c.path) else str(project.root / c.path)


def _ready(port: int, wait: float = 0.0) -> bool:
    """Does the runtime on ``port`` answer ready? With ``wait``, it may hold its answer
    up to that long and answer as soon as it is (``?wait=``; an older runtime ignores it
    and answers at once)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=2 + wait)
    try:
        conn.request("GET", f"/healthz/ready?wait={wait:g}" if wait else "/healthz/ready")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_ready(eng, name: str, health_port: int, timeout: float):
    """Wait until the container reports ready on ``health_port``. Returns None when it
    does, else why not: its ContainerState (it exited), "gone" or "timeout".

    One long-polling request at a time (``?wait=``): polling every few ms would take the
    GIL from the new release's init() in its health thread at every poll, and an answer
    comes within ~10 ms of readiness. Between answers the engine is asked how the
    container is, at most every ENGINE_EVERY seconds (an exit resets the held request,
    so an exit is seen within that)."""
    deadline = time.monotonic() + timeout
    asked = time.monotonic()
    while True:
        started = time.monotonic()
        if started >= deadline:
            return "timeout"
        if _ready(health_port, wait=min(LONG_POLL, max(deadline - started, 0.01))):
            return None
        now = time.monotonic()
        if now - asked >= ENGINE_EVERY:
            asked = now
            st = eng.container_state(name)
            if st is None:
                return "gone"
            if not st.running or st.status == "restarting" or st.restart_count:
                return st
        if now - started < 0.05:  # refused, reset or answered at once (an older runtime)
            time.sleep(0.05)


class ContainerStep(RunningServiceStep):
    kind = "container"
    version = 1

    def config(self, ctx: BuildContext) -> dict:
        # The container's name holds the project's.
        out = {"name": ctx.project.name, **super().config(ctx)}
        cpu, memory_gb = self._limits(ctx)
        if (cpu, memory_gb) != (ctx.target.cpu, ctx.target.memory_gb):
            # Only when the models' hint fills a gap: other fingerprints stay as they were.
            out["limits"] = {"cpu": cpu, "memory_gb": memory_gb}
        return out

    def _limits(self, ctx: BuildContext) -> tuple[float | None, float | None]:
        """The container's CPU and memory limits: the target's ``cpu``/``memory_gb``;
        where it has none, the sum of the service's models' ``resources`` (what
        ``mlbuild profile --write`` recommends)."""
        t = ctx.target
        s = self._service(ctx)
        hint = resources_hint(ctx.project.models[r.name] for r in s.models)
        if hint is not None and hint.memory_gb and isinstance(s.workers, int):
            # Each worker process loads the models.
            hint = Resources(cpu=hint.cpu, memory_gb=hint.memory_gb * s.workers)
        return (t.cpu if t.cpu is not None else getattr(hint, "cpu", None),
                t.memory_gb if t.memory_gb is not None else getattr(hint, "memory_gb", None))

    def check_outputs(self, ctx: BuildContext, outputs: dict) -> str | None:
        name = outputs["container"]
        try:
            c = dockerapi.inspect("containers", name)
        except dockerapi.Unavailable:
            st = engine(ctx).container_state(name)
            c = None if st is None else {"State": {"Running": st.running,
                                                   "ExitCode": st.exit_code},
                                         "Config": {"Labels": st.labels}}
        if c is None:
            return f"container {name} is gone"
        if (c["Config"].get("Labels") or {}).get(LABEL_FINGERPRINT) != outputs["fingerprint"]:
            return f"container {name} runs another release"
        if not c["State"].get("Running"):
            return f"container {name} is not running (exit status {c['State'].get('ExitCode')})"
        return None

    def run(self, ctx: BuildContext, upstream: dict, fingerprint: str) -> dict:
        project, target = ctx.project, ctx.target
        s = self._service(ctx)
        image = upstream[f"image:{s.name}"]["tag"]
        context = context_of(upstream)
        name = container_name(project, s.name, target.name)
        port = service_port(project, target, s.name)
        eng = engine(ctx)
        labels = {LABEL_FINGERPRINT: fingerprint, "dev.mlbuild.project": project.name,
                  "dev.mlbuild.service": s.name, "dev.mlbuild.target": target.name}
        env = {"MLBUILD_MODEL_DIR": context["env"]["MLBUILD_MODEL_DIR"],
               "AZUREML_MODEL_DIR": context["env"]["MLBUILD_MODEL_DIR"],
               **target.runtime_env()}
        mounts = {}
        if s.auth == "key":
            kf = keys_file(ctx.state_dir, target.name, s.name)
            keystore.write_file(kf, keystore.ensure(ctx.db, target.name, s.name))
            # The folder stays 0700 (only we reach the file on this machine); the file
            # itself must be readable by the container's non-root user.
            os.chmod(kf, 0o644)
            mounts[str(kf)] = KEYS_IN_CONTAINER
            env["MLBUILD_AUTH_KEYS_FILE"] = KEYS_IN_CONTAINER
        volumes = {}
        volume = model_data_volume(project, s)
        if volume is not None:
            volumes[volume] = MODEL_DATA_IN_IMAGE
            if os.path.isabs(volume):
                self._host_folder(ctx, volume)
        if s.tracing:
            env.update(otel_env())
        health_port = _free_port()
        env.update(MLBUILD_HOST=HOST, MLBUILD_PORT=str(port), MLBUILD_REUSE_PORT="1",
                   MLBUILD_HEALTH_PORT=str(health_port),
                   MLBUILD_GRACEFUL_TIMEOUT=f"{GRACEFUL_TIMEOUT:g}")
        candidate, retired = f"{name}-next", f"{name}-old"
        eng.remove_container(candidate, stop_timeout=0)  # left by a killed deploy
        # The release retired last time: long gone (an rm), or still finishing requests.
        eng.remove_container(retired, stop_timeout=int(GRACEFUL_TIMEOUT) + 5)
        old = eng.container_state(name)
        ctx.log(f"  starting    {candidate} from {image} on {HOST}:{port}")
        try:
            # NOTE: inside the try: a Ctrl-C while the engine creates or starts it must
            # not leave NAME-next behind.
            cpus, memory_gb = self._limits(ctx)
            eng.run_container(candidate, image, network_mode="host", restart="unless-stopped",
                              env=env, labels=labels, cpus=cpus,
                              memory=f"{int(memory_gb * 1024)}m" if memory_gb else None,
                              mounts=mounts, volumes=volumes, step_id=self.id)
            self._wait_or_fail(eng, candidate, health_port, port,
                               had_old=old is not None and old.running)
        except BaseException:
            eng.remove_container(candidate, stop_timeout=0)
            raise
        if old is not None:  # ready: the old one goes, its in-flight requests finish
            eng.retire_container(name, retired)
        eng.rename_container(candidate, name)
        st = eng.container_state(name)
        url = f"http://{HOST}:{port}"
        dep = {"container": name, "id": st.id, "image": image, "url": url, "port": port,
               "fingerprint": fingerprint, "started_at": time.time()}
        if s.collect_model_data is not None:
            dep["model_data"] = f"stdout (mlbuild logs {s.name} -t {target.name})" \
                if volume is None else (f"{volume}/{s.name}/" if os.path.isabs(volume)
                                        else f"volume {volume}: {s.name}/")
        ctx.db.put_deployment(target.name, s.name, dep)
        return {"container": name, "id": st.id, "url": url, "image": image,
                "fingerprint": fingerprint}

    def _host_folder(self, ctx: BuildContext, folder: str) -> None:
        """Make the model data folder bind-mounted into the container: one made here is
        writable by everyone (the container's user is uid 10001, not yours); of one that
        exists, say when that user may not be able to write to it."""
        if not os.path.isdir(folder):
            os.makedirs(folder, exist_ok=True)
            os.chmod(folder, 0o777)
            return
        st = os.stat(folder)
        if st.st_uid != 10001 and not st.st_mode & 0o002:
            ctx.log(f"  note        {folder} is not writable by the container's user "
                    "(uid 10001): the service drops its model data records (chmod o+w, "
                    "or chown 10001 the folder)")

    def _wait_or_fail(self, eng, name: str, health_port: int, port: int,
                      had_old: bool) -> None:
        why = wait_ready(eng, name, health_port, READY_TIMEOUT)
        if why is None:
            return
        logs = eng.container_logs(name, tail=20).rstrip().splitlines()
        kept = "the previous container keeps serving" if had_old else "nothing is serving"
        hint = "fix the error above and deploy again"
        if why == "timeout":
            what = f"Transitioning: not ready after {READY_TIMEOUT:.0f} s (MLBUILD_READY_TIMEOUT)"
        elif why == "gone":
            what = "Failed: the new container vanished"
        elif why.exit_code == 1:
            what = f"Unschedulable: port {port} on {HOST} is in use by another program"
            hint = "stop that program, or give the target another port"
        else:
            what = f"Failed: the new container exited with status {why.exit_code}"
            if why.oom_killed:
                what += " (killed: out of memory; raise the target's memory_gb)"
        raise StepFailed(self.id, f"{what}; {kept}. Last lines of its log:\n    "
                         + "\n    ".join(logs[-20:]), hint=hint)

    def summary(self, outputs: dict) -> str:
        return f"Healthy at {outputs['url']} ({outputs['container']})"


def observe(dep: dict) -> tuple[str, str]:
    """The state of a recorded docker deployment and a few words of detail."""
    from mlbuild.backends import process as proc

    name = dep["container"]
    try:
        c = dockerapi.inspect("containers", name)
    except dockerapi.Unavailable:
        from mlbuild.backends.docker import connect

        st = connect().container_state(name)
        c = None if st is None else {
            "State": {"Status": st.status, "Running": st.running, "ExitCode": st.exit_code,
                      "OOMKilled": st.oom_killed},
            "RestartCount": st.restart_count, "Config": {"Labels": st.labels}}
    if c is None:
        return proc.FAILED, f"container {name} is gone (removed outside mlbuild)"
    state = c["State"]
    if (c["Config"].get("Labels") or {}).get(LABEL_FINGERPRINT) != dep["fingerprint"]:
        return proc.UNHEALTHY, f"container {name} was replaced outside mlbuild"
    restarts = c.get("RestartCount", 0)
    if state.get("Status") == "restarting" or (restarts >= 3 and not _ready(dep["port"])):
        return proc.FAILED, f"crash loop: restarted {restarts} times, last exit status " \
                            f"{state.get('ExitCode')}"
    if not state.get("Running"):
        why = " (out of memory)" if state.get("OOMKilled") else ""
        return proc.FAILED, f"exited with status {state.get('ExitCode')}{why}"
    code = proc.probe(f"{dep['url']}/healthz/ready")
    if code == 200:
        return proc.HEALTHY, f"restarted {restarts} times" if restarts else ""
    if code == 503:
        return proc.TRANSITIONING, "init() still running"
    return proc.UNHEALTHY, "does not answer health checks" if code is None \
        else f"answers health checks with {code}"
