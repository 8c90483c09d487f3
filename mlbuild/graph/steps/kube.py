"""``k8s`` steps: a service on a kubernetes target.

    image:diabetes ──▶ push:diabetes ──▶ k8s:staging/diabetes

Renders the service's objects (kube/render.py), writes them into the target's ``out``
(with a ``kustomization.yaml``; never the keys), and -- unless ``apply: false``, the
GitOps mode -- applies them with server-side apply (field manager ``mlbuild``) and
watches the rollout until kubectl's rule says it is complete, or a pod reason Skaffold
treats as unrecoverable (kube/rollout.py) says it never will be. A failed rollout shows
the failing container's last log lines, is rolled back to the Deployment that was
serving (maxUnavailable 0: its pods never stopped) and fails the step. Ctrl-C leaves
the rollout as it is; the step is not recorded, so the next deploy applies the same
objects (a no-op for the API server) and watches again.

Up to date means: the files in ``out`` are the ones written (and none is left over
from services the target no longer has), and (applied) the live Deployment carries
this step's fingerprint and is available -- reality, not the record.

``out`` may hold the user's files too (a GitOps repository's folder): the steps
overwrite and remove there only what ``out/mlbuild-written.json`` says mlbuild wrote
(mlbuild/written.py has the rule). A file of the same name as one it writes -- the
user's own ``kustomization.yaml`` -- stops the deploy, naming it, before anything is
written. NOTE: the user's other files are left where they are, also at the first
deploy into a folder that already exists: they cannot be lost, the objects are
applied from the files' texts in memory (not from ``out``), and kustomize reads only
the files ``kustomization.yaml`` lists. Files of an earlier render that no service of
the target writes any more (a service removed, an ingress switched off) are removed
when the record lists them; a file an older mlbuild wrote before it kept the record is
taken as its own when the step's state shows it wrote exactly that content.
"""

from __future__ import annotations

import os
import time

from mlbuild import written
from mlbuild.errors import InvalidInput, StepFailed
from mlbuild.fsutil import write_atomic
from mlbuild.graph.step import BuildContext, Step
from mlbuild.kube import render
from mlbuild.manifest.model import MODEL_DATA_IN_IMAGE, Resources, resources_hint
from mlbuild.state import keys as keystore
from mlbuild.state.digest import hash_bytes, hash_file, hash_json

POLL = float(os.environ.get("MLBUILD_K8S_POLL", "1.0"))  # seconds between looks
LOG_LINES = 20  # of the failing container, in the error
DEADLINE_SLACK = 60.0  # seconds past progressDeadlineSeconds we watch on our own


def pinned_image(push: dict) -> str:
    """``registry/name@sha256:...`` from the push step's outputs (tag and digest)."""
    repo = push["tag"].rsplit(":", 1)[0]
    return f"{repo}@{push['digest']}"


def connect(target):
    """The API client of a kubernetes target (imports lightkube: only now)."""
    from mlbuild.kube.client import KubeClient

    return KubeClient(target.kube.context, target.kube.namespace)


def service_url(settings, service: str, svc_obj: dict | None) -> str | None:
    """Where clients reach the service from outside: the Ingress, else a load
    balancer's address; None for ClusterIP and NodePort (invoke --url then)."""
    if settings.ingress is not None:
        scheme = "https" if settings.ingress.tls_secret else "http"
        return f"{scheme}://{settings.ingress.host}/{service}"
    if settings.service_type == "LoadBalancer" and svc_obj:
        for lb in ((svc_obj.get("status") or {}).get("loadBalancer") or {}).get("ingress") or ():
            host = lb.get("hostname") or lb.get("ip")
            if host:
                return f"http://{host}:{settings.port}" if settings.port != 80 \
                    else f"http://{host}"
    return None


class KubeStep(Step):
    kind = "k8s"
    version = 1
    templates = render.TEMPLATES

    def _service(self, ctx: BuildContext):
        return ctx.project.services[self.params["service"]]

    def config(self, ctx: BuildContext) -> dict:
        t, s = ctx.target, self._service(ctx)
        out = {"name": ctx.project.name, "registry": ctx.project.registry,
               f"targets.{t.name}": t.config(), f"services.{s.name}.auth": s.auth,
               f"services.{s.name}.cors": list(s.cors)}
        if s.max_body_mb is not None:  # only when set: older fingerprints stay
            out[f"services.{s.name}.max_body_mb"] = s.max_body_mb
        for key in ("workers", "collect_model_data", "tracing"):  # the same
            value = getattr(s, key)
            if value is not None and value is not False:
                out[f"services.{s.name}.{key}"] = \
                    value.config() if hasattr(value, "config") else value
        for m in self._models(ctx):  # their resources hint sizes the requests
            if m.resources is not None:
                out[f"models.{m.name}.resources"] = m.resources.config()
        return out

    def _resources(self, ctx: BuildContext):
        """The models' resources hint, its memory times ``workers`` where that is a
        number: each worker process loads the models."""
        hint = resources_hint(self._models(ctx))
        workers = self._service(ctx).workers
        if hint is not None and hint.memory_gb and isinstance(workers, int):
            hint = Resources(cpu=hint.cpu, memory_gb=hint.memory_gb * workers)
        return hint

    def _models(self, ctx: BuildContext) -> list:
        return [ctx.project.models[r.name] for r in self._service(ctx).models]

    def extra(self, ctx: BuildContext) -> dict:
        s = self._service(ctx)
        if s.auth == "key" and ctx.target.kube.apply:
            # Regenerated keys reach the Secret at the next deploy.
            return {"keys": hash_json(keystore.ensure(ctx.db, ctx.target.name, s.name))[:16]}
        return {}

    # -- files -----------------------------------------------------------------------
    def _texts(self, ctx: BuildContext, image: str, fingerprint: str) -> dict[str, str]:
        project, target, s = ctx.project, ctx.target, self._service(ctx)
        mine = render.render_target(project.name, [render.ServiceInput(
            name=s.name, image=image, fingerprint=fingerprint, auth=s.auth,
            cors=tuple(s.cors), resources=self._resources(ctx),
            max_body_bytes=s.max_body_bytes, workers=s.workers,
            model_data=s.collect_model_data.destination("kubernetes")
            if s.collect_model_data is not None else None, tracing=s.tracing)],
            target.kube)
        # The kustomization lists every service's files: the names alone, known without
        # their images (each service's step rewrites it the same way).
        listed = [f for other in sorted(project.services_for(target), key=lambda x: x.name)
                  for f in render.file_names(other.name, target.kube)]
        mine[render.KUSTOMIZATION_FILE] = render.kustomization(project.name, listed)
        return mine

    def check_outputs(self, ctx: BuildContext, outputs: dict) -> str | None:
        root = ctx.project.root
        from mlbuild.state.digest import hash_file

        for rel, digest in outputs["files"].items():
            path = root / rel
            if rel.endswith(render.KUSTOMIZATION_FILE):
                if not path.is_file():
                    return f"output {rel} missing"
                continue  # rewritten by each service's step
            try:
                if hash_file(path) != digest:
                    return f"output {rel} was modified"
            except FileNotFoundError:
                return f"output {rel} missing"
        out = root / ctx.target.kube.out
        recorded, _ = written.read_record(out)
        for name in sorted(set(recorded) - self._target_files(ctx)):
            if os.path.lexists(out / name):
                return f"output {ctx.target.kube.out}/{name} is left from an earlier render"
        if not outputs.get("applied"):
            return None
        from mlbuild.kube import probe, rollout

        settings = ctx.target.kube
        try:  # the standard library where the kubeconfig allows (kube/probe.py says why)
            dep = probe.get_deployment(settings.context, settings.namespace,
                                       outputs["deployment"])
        except probe.Unsupported:
            dep = connect(ctx.target).get("Deployment", outputs["deployment"])
        if dep is None:
            return f"Deployment {outputs['deployment']} is gone (deleted outside mlbuild)"
        seen = (dep["metadata"].get("annotations") or {}).get(render.FINGERPRINT_ANNOTATION)
        if seen != outputs["fingerprint"]:
            return f"Deployment {outputs['deployment']} was changed outside mlbuild"
        verdict = rollout.evaluate(dep, [], [])
        if not verdict.done:
            return f"Deployment {outputs['deployment']} is not available ({verdict.reason})"
        return None

    # -- deploy ----------------------------------------------------------------------
    def run(self, ctx: BuildContext, upstream: dict, fingerprint: str) -> dict:
        project, target, s = ctx.project, ctx.target, self._service(ctx)
        settings = target.kube
        image = pinned_image(upstream[f"push:{s.name}"])
        texts = self._texts(ctx, image, fingerprint)
        files = self._write_out(ctx, texts)
        result = {"files": files, "applied": settings.apply, "image": image,
                  "fingerprint": fingerprint}
        if not settings.apply:
            ctx.log(f"  wrote       {len(files)} files to {settings.out}/ (apply: false)")
            return result

        client = connect(target)
        if not client.namespace_exists():
            raise InvalidInput(f"namespace {settings.namespace!r} does not exist in context "
                               f"{client.context!r}",
                               hint=f"kubectl create namespace {settings.namespace}, or fix "
                                    f"targets.{target.name}.namespace")
        name = render.object_name(project.name, s.name)
        record = ctx.db.get_deployment(target.name, s.name)
        serving = (record or {}).get("applied_deployment")
        force = bool(ctx.options.get("force_conflicts"))
        if s.auth == "key":
            primary, secondary = keystore.ensure(ctx.db, target.name, s.name)
            client.apply(render.secret_object(project.name, s.name, settings.namespace,
                                              primary, secondary), force=force)
        objects = render.objects_of(texts)
        deployment = next(o for o in objects if o["kind"] == "Deployment")
        for obj in objects:
            client.apply(obj, force=force)
        ctx.log(f"  applied     {len(objects) + (s.auth == 'key')} objects to "
                f"{settings.namespace} ({client.context}); watching {name}")
        verdict = self._watch(ctx, client, name, settings.progress_deadline_s)
        if not verdict.done:
            self._fail(client, name, verdict, serving)
        svc_obj = client.get("Service", name)
        url = service_url(settings, s.name, svc_obj)
        record = {
            "kube": {"context": client.context, "namespace": settings.namespace,
                     "deployment": name},
            "url": url or "", "image": image, "fingerprint": fingerprint,
            "started_at": time.time(), "applied_deployment": deployment}
        if s.collect_model_data is not None:  # where `mlbuild status` says they go
            record["model_data"] = (
                f"stdout (kubectl logs -n {settings.namespace} deployment/{name})"
                if s.collect_model_data.destination("kubernetes") == "stdout" else
                f"emptyDir {MODEL_DATA_IN_IMAGE} in each pod: {s.name}/")
        ctx.db.put_deployment(target.name, s.name, record)
        return dict(result, deployment=name, namespace=settings.namespace, url=url)

    def _target_files(self, ctx: BuildContext) -> set[str]:
        """The names every service of the target writes in ``out`` (from the settings)."""
        target = ctx.target
        return {render.KUSTOMIZATION_FILE} | {
            f for other in ctx.project.services_for(target)
            for f in render.file_names(other.name, target.kube)}

    def _write_out(self, ctx: BuildContext, texts: dict[str, str]) -> dict[str, str]:
        """Write ``texts`` into the target's ``out`` by the rule of mlbuild/written.py
        and remove the recorded files no service writes any more.

        Returns:
            ``{path relative to the project: digest}`` of the files written.

        Raises:
            StepFailed: a file to write is not mlbuild's (named); nothing was changed.
        """
        settings = ctx.target.kube
        out = ctx.project.root / settings.out
        record = written.Written.open(out, settings.out, self.id)
        record.check(texts, adopt=self._written_before(ctx),
                     hint=" A kustomization of your own can live in another folder and "
                          f"list {settings.out} among its resources.")
        record.begin(texts)
        files = {}
        for name, text in texts.items():
            data = text.encode()
            write_atomic(out / name, data)  # a GitOps repo never sees half a file
            files[f"{settings.out}/{name}"] = digest = hash_bytes(data)
            record.wrote(name, digest)
        removed, failed = record.remove_stale(self._target_files(ctx))
        record.save()
        if removed:
            ctx.log(f"  removed     {', '.join(removed)} from {settings.out}/ "
                    "(no service of the target writes them any more)")
        if failed:
            ctx.log(f"  kept        {', '.join(failed)} in {settings.out}/: could not remove "
                    "them (the next deploy tries again)")
        return files

    def _written_before(self, ctx: BuildContext):
        """``adopt`` for Written.check: a file in ``out`` that the target's steps recorded
        writing, with that very content (written by an mlbuild that kept no record)."""
        prefix = f"{ctx.target.kube.out}/"
        known: dict[str, set[str]] = {}
        for sid, rec in ctx.db.all_steps().items():
            if sid.startswith(f"{self.kind}:{ctx.target.name}/"):
                for rel, digest in (rec.outputs.get("files") or {}).items():
                    if rel.startswith(prefix) and "/" not in rel[len(prefix):]:
                        known.setdefault(rel[len(prefix):], set()).add(digest)

        def adopt(name: str, path) -> bool:
            return name in known and hash_file(path) in known[name]
        return adopt

    def _watch(self, ctx: BuildContext, client, name: str, deadline_s: float):
        """Look every POLL seconds until the verdict is done or failed, or the deadline
        (the Deployment's own, plus slack for a controller that never says) passed."""
        from mlbuild.kube import ops, rollout

        give_up = time.monotonic() + deadline_s + DEADLINE_SLACK
        said = None
        while True:
            dep = client.get("Deployment", name)
            if dep is None:
                raise StepFailed(self.id, f"Deployment {name} vanished during the rollout")
            pods, new_hash = ops.pods_of(client, dep)
            # Events of the Deployment, its new ReplicaSet (FailedCreate) and its pods.
            about = [name] + ([f"{name}-{new_hash}"] if new_hash else []) + [
                p["metadata"]["name"] for p in pods
                if (p["metadata"].get("labels") or {}).get("pod-template-hash") == new_hash]
            events = [e for who in about for e in client.events(who)]
            verdict = rollout.evaluate(dep, pods, events, revision_hash=new_hash)
            if verdict.done or verdict.failed:
                return verdict
            if verdict.reason != said:
                said = verdict.reason
                ctx.log(f"  rollout     {name}: {verdict.state}: {verdict.reason}")
            if time.monotonic() > give_up:
                return verdict
            time.sleep(POLL)

    def _fail(self, client, name: str, verdict, serving: dict | None):
        lines: list[str] = []
        if verdict.failing_pod and verdict.failing_container:
            lines = list(client.logs(verdict.failing_pod, verdict.failing_container,
                                     tail=LOG_LINES, previous=verdict.logs_previous))
        if serving is not None:
            client.apply(serving, force=True)
            kept = "rolled back to the Deployment that was serving (its pods never stopped)"
        else:
            kept = "nothing was serving before (first deploy): left as it is"
        where = f"{verdict.failing_pod}/{verdict.failing_container}" \
            if verdict.failing_pod else name
        why = verdict.reason + (f" ({verdict.message})" if verdict.message
                                and verdict.message not in verdict.reason else "")
        text = f"{verdict.state}: {why}; {kept}"
        if lines:
            text += f". Last lines of {where}:\n    " + "\n    ".join(lines[-LOG_LINES:])
        raise StepFailed(self.id, text, hint="fix the cause above and deploy again "
                                             "(mlbuild status shows the pods)")

    def summary(self, outputs: dict) -> str:
        if not outputs.get("applied"):
            return f"wrote {len(outputs['files'])} files (apply: false)"
        where = outputs.get("url") or f"{outputs['namespace']}/{outputs['deployment']}"
        return f"Healthy at {where}"
