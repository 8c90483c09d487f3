"""``process`` steps: run a service's runtime as a local background process.

    context:diabetes ──┐
                       ├─▶ process:dev/diabetes
    venv:sklearn ──────┘

A release is a folder of hard links to the build context (what an image would
hold) under ``.mlbuild/run/<target>/<service>/<fingerprint[:12]>-<random>/``, run with the
venv's Python. The new release starts beside the old one on the same port (see
``mlbuild.backends.process``) and the old one is stopped only once the new one is
ready; when the new one fails, the old one keeps serving and the step fails saying so.

Up to date means: the recorded process is alive and is our runtime on that port.

Model data (``collect_model_data``): the records go to ``.mlbuild/model-data/<target>/``
(``<service>/<model>/<version>/...`` below it, as Azure laid them out), outside the
release folder, which a replacement removes; or to the folder ``path`` names, or to
the service's log (``to: stdout``). The deployment record says where (``mlbuild status``).

Ports: the services of a process target listen on ``port``, ``port + 1``, ... in
the order the target lists them (manifest order), on 127.0.0.1 only (a process
target is for this machine; a docker or kubernetes target is for serving others).
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from pathlib import Path

from mlbuild import fsutil
from mlbuild.backends import process as proc
from mlbuild.errors import StepFailed
from mlbuild.graph.step import BuildContext, Step
from mlbuild.graph.steps.context import APP_ROOT, MODEL_ROOT, map_image_path
from mlbuild.manifest.model import MODEL_DATA_IN_IMAGE
from mlbuild.state import keys as keystore
from mlbuild.state.digest import hash_json

HOST = "127.0.0.1"
READY_TIMEOUT = float(os.environ.get("MLBUILD_READY_TIMEOUT", "300"))
# In-flight requests get this long to finish when a release is stopped.
GRACEFUL_TIMEOUT = float(os.environ.get("MLBUILD_GRACEFUL_TIMEOUT", "30"))
_SAMPLES_ROOT = "/var/mlbuild/samples"


def service_port(project, target, service_name: str) -> int:
    names = [s.name for s in project.services_for(target)]
    return (target.port or 8890) + names.index(service_name)


def keys_file(state_dir: Path, target: str, service: str) -> Path:
    return state_dir / "secrets" / target / f"{service}.keys"


def log_file(state_dir: Path, target: str, service: str) -> Path:
    return state_dir / "logs" / target / f"{service}.log"


def release_root(state_dir: Path, target: str, service: str) -> Path:
    return state_dir / "run" / target / service


def model_data_dir(project, state_dir: Path, target: str, service) -> Path | None:
    """The folder on this machine a service's collected model data goes to (the
    runtime adds ``<service>/...`` below it): ``path`` of ``collect_model_data``, else
    ``.mlbuild/model-data/<target>``; None when collection is off or goes to stdout."""
    c = service.collect_model_data
    if c is None or c.destination("process") != "folder":
        return None
    if c.path is not None:
        return Path(c.path) if os.path.isabs(c.path) else project.root / c.path
    return state_dir / "model-data" / target


def otel_env() -> dict[str, str]:
    """The OpenTelemetry variables (``OTEL_*``) of the shell that runs mlbuild: a
    service with ``tracing: true`` gets them on the process and docker targets."""
    return {k: v for k, v in os.environ.items() if k.startswith("OTEL_")}


def stop_release(release: Path) -> bool:
    """Stop the processes of a release folder (ready or not) and remove the folder.

    Waits up to the graceful timeout for in-flight requests, then kills. Returns True
    when something was running.
    """
    pgid = proc.release_group(release)
    if pgid is not None:
        proc.stop(pgid, timeout=GRACEFUL_TIMEOUT + 5)
    shutil.rmtree(release, ignore_errors=True)
    return pgid is not None


def stop_stray_releases(root: Path, keep: set[Path]) -> int:
    """Stop and remove the releases under ``root`` other than ``keep`` (a deploy killed
    while it waited leaves one behind). Returns how many were running."""
    n = 0
    if root.is_dir():
        for other in root.iterdir():
            if other not in keep:
                n += stop_release(other)
    return n


class RunningServiceStep(Step):
    """What the process and container steps share: one service of a running target,
    on its port, restarted when its keys are regenerated."""

    def _service(self, ctx):
        return ctx.project.services[self.params["service"]]

    def config(self, ctx: BuildContext) -> dict:
        t = ctx.target
        s = self._service(ctx)
        out = {f"targets.{t.name}": t.config(), f"services.{s.name}.auth": s.auth}
        if s.collect_model_data is not None:  # only when set: older fingerprints stay
            # (where the records go is no part of the image: a path must restart it)
            out[f"services.{s.name}.collect_model_data"] = s.collect_model_data.config()
        return out

    def extra(self, ctx: BuildContext) -> dict:
        s = self._service(ctx)
        out = {"port": service_port(ctx.project, ctx.target, s.name)}
        if s.auth == "key":
            # Regenerated keys reach the service at the next deploy.
            out["keys"] = hash_json(keystore.ensure(ctx.db, ctx.target.name, s.name))[:16]
        if s.tracing and otel_env():
            # A changed exporter endpoint (OTEL_* of mlbuild's shell) restarts it.
            out["otel"] = hash_json(sorted(otel_env().items()))[:16]
        return out


class ProcessStep(RunningServiceStep):
    kind = "process"
    version = 1

    def check_outputs(self, ctx: BuildContext, outputs: dict) -> str | None:
        dep = ctx.db.get_deployment(ctx.target.name, self.params["service"])
        if dep is None or dep.get("release") != outputs["release"]:
            return "not running (stopped by mlbuild down)"
        if not proc.is_runtime(dep["pid"], dep["port"]):
            _, why = proc.observe(self._abs(ctx, dep))
            return f"process {dep['pid']} is not running ({why})"
        if proc.probe(f"{dep['url']}/healthz/live", timeout=5) != 200:
            return f"process {dep['pid']} does not answer (hung?)"
        return None

    @staticmethod
    def _abs(ctx: BuildContext, dep: dict) -> dict:
        return dict(dep, release=str(ctx.project.root / dep["release"]))

    def run(self, ctx: BuildContext, upstream: dict, fingerprint: str) -> dict:
        project, target = ctx.project, ctx.target
        s = self._service(ctx)
        context = upstream[f"context:{s.name}"]
        venv = upstream[f"venv:{s.environment}"]
        port = service_port(project, target, s.name)
        state_dir = ctx.state_dir
        root = release_root(state_dir, target.name, s.name)
        # Named after the fingerprint, and unique: --force starts a new one beside it.
        release = root / f"{fingerprint.split(':')[-1][:12]}-{secrets.token_hex(3)}"
        rel = lambda p: os.path.relpath(p, project.root).replace(os.sep, "/")  # noqa: E731
        old = ctx.db.get_deployment(target.name, s.name)

        # Releases nobody recorded (a deploy killed while waiting) are stopped first.
        stop_stray_releases(root, keep={release} | (
            {project.root / old["release"]} if old else set()))

        # Only our own running release may hold the port (SO_REUSEPORT would let a
        # second project's runtime share it silently).
        ours = old is not None and old.get("port") == port and \
            proc.is_runtime(old.get("pid") or 0, port)
        try:
            free = proc.port_available(HOST, port)
        except OSError as e:
            raise StepFailed(self.id, f"{proc.UNSCHEDULABLE}: cannot listen on {HOST}:{port}: "
                                      f"{e.strerror}",
                             hint="ports below 1024 need privileges: choose another port "
                                  f"(targets.{target.name}.port)") from None
        if not free or (not ours and proc.listening(HOST, port)):
            holder = next((f"service {svc!r} of target {t!r}, deployed by mlbuild"
                           for (t, svc), d in ctx.db.deployments().items()
                           if d.get("port") == port and (t, svc) != (target.name, s.name)),
                          "another program")
            raise StepFailed(self.id, f"{proc.UNSCHEDULABLE}: port {port} on {HOST} is in use "
                                      f"by {holder}",
                             hint=f"stop it (mlbuild down TARGET for a service of this "
                                  f"project), or give target {target.name!r} another port "
                                  f"(targets.{target.name}.port)")

        # The release: hard links of the context, less what only an image build needs.
        ctx_dir = project.root / context["dir"]
        stage = fsutil.staging_dir(release)
        try:
            for f in context["files"]:
                if f == "Dockerfile" or f.startswith("env/"):
                    continue
                dst = stage / f
                dst.parent.mkdir(parents=True, exist_ok=True)
                fsutil.link_or_copy(ctx_dir / f, dst)
            (stage / "app").mkdir(exist_ok=True)
            os.rename(stage, release)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise

        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("MLBUILD_", "AZUREML_", "AML_", "PYTHON"))}
        roots = {MODEL_ROOT: release / "models", APP_ROOT: release / "app",
                 _SAMPLES_ROOT: release / "samples"}
        data_dir = model_data_dir(project, state_dir, target.name, s)
        if data_dir is not None:
            data_dir.mkdir(parents=True, exist_ok=True)
            roots[MODEL_DATA_IN_IMAGE] = data_dir
        env.update({k: map_image_path(v, roots) for k, v in context["env"].items()})
        env.update(target.runtime_env())
        env.update(PYTHONPATH=str(release / "runtime"), PYTHONUNBUFFERED="1",
                   PYTHONDONTWRITEBYTECODE="1", MLBUILD_REUSE_PORT="1",
                   MLBUILD_READY_FILE=str(release / proc.READY_FILE))
        if s.auth == "key":
            kf = keys_file(state_dir, target.name, s.name)
            keystore.write_file(kf, keystore.ensure(ctx.db, target.name, s.name))
            env["MLBUILD_AUTH_KEYS_FILE"] = str(kf)

        python = project.root / venv["dir"] / venv["python"]
        argv = [str(python), "-m", "mlbuild.runtime", "--host", HOST, "--port", str(port),
                "--graceful-timeout", f"{GRACEFUL_TIMEOUT:g}"]
        log = log_file(state_dir, target.name, s.name)
        url = f"http://{HOST}:{port}"
        ctx.log(f"  starting    {s.name} on {url} (log: {rel(log)})")
        started = proc.start(release, argv, env, log, cwd=release / "app")
        try:
            state, info = proc.wait_ready(
                started, READY_TIMEOUT,
                tick=lambda sec: ctx.log(f"  waiting     {s.name}: init() running for {sec:.0f} s"))
        except BaseException:
            proc.stop(started.pgid, popen=started.popen)
            shutil.rmtree(release, ignore_errors=True)
            raise
        if state != proc.HEALTHY:
            proc.stop(started.pgid, popen=started.popen)
            lines = _since_start(proc.tail(log, 60), release.name)
            shutil.rmtree(release, ignore_errors=True)
            if state == proc.FAILED:
                what = f"{proc.FAILED}: the new process exited with status {info}"
            else:
                what = f"{proc.TRANSITIONING}: not ready after {READY_TIMEOUT:.0f} s " \
                       "(MLBUILD_READY_TIMEOUT)"
            alive = old is not None and proc.is_runtime(old.get("pid") or 0, old.get("port"))
            kept = "the previous release keeps serving" if alive else "nothing is serving"
            raise StepFailed(self.id, f"{what}; {kept}. Last lines of {rel(log)}:\n    "
                             + "\n    ".join(lines[-20:]),
                             hint=f"fix the error above and deploy again; mlbuild logs {s.name}"
                                  f" -t {target.name} shows the whole log")

        dep = {"pid": info["pid"], "pgid": started.pgid, "host": HOST, "port": port,
               "url": url, "release": rel(release), "venv": venv["dir"],
               "fingerprint": fingerprint, "started_at": time.time(), "log": rel(log)}
        if s.collect_model_data is not None:
            if data_dir is None:
                dep["model_data"] = f"stdout (in {rel(log)})"
            else:
                inside = fsutil.within(os.path.realpath(project.root),
                                       os.path.realpath(data_dir))
                dep["model_data"] = f"{rel(data_dir) if inside else data_dir}/{s.name}/"
        ctx.db.put_deployment(target.name, s.name, dep)
        if old is not None and old.get("release") != dep["release"]:
            stop_release(project.root / old["release"])
        return {"url": url, "pid": dep["pid"], "release": dep["release"], "port": port}

    def summary(self, outputs: dict) -> str:
        return f"{proc.HEALTHY} at {outputs['url']} (pid {outputs['pid']})"


def _since_start(lines: list[str], release_name: str) -> list[str]:
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("--- ") and lines[i].endswith(f"release {release_name}"):
            return lines[i + 1:]
    return lines
