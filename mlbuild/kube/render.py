"""The Kubernetes objects of a kubernetes target, rendered from ``templates/kubernetes/``.

Per service, in apply order (Helm's install order)::

    PodDisruptionBudget  <project>-<service>   replicas >= 2, or autoscale.min >= 2
    Service              <project>-<service>   the scoring port only
    Deployment           <project>-<service>   image pinned by digest, probes, non-root
    HorizontalPodAutoscaler                    with autoscale (autoscaling/v2, CPU)
    Ingress                                    with ingress: host/<service> (Prefix)

The Secret with a service's keys is never rendered into files: the Deployment mounts it
by name, the deploy step applies :func:`secret_object` beside the files, and
``mlbuild keys --secret`` prints the same object for a GitOps flow.

The templates go through mlbuild's one renderer (:mod:`mlbuild.render`: sandboxed Jinja,
StrictUndefined; the environment keeps the compiled templates). This module computes the
values (names, labels, quantities, probe numbers) and the templates lay out the YAML,
quoting every value with ``tojson``.

Choices the settings leave open, and why:

- The fingerprint annotation (``mlbuild.dev/fingerprint``) is on every object's metadata
  but not on the pod template: a change of, say, the HPA's maximum changes the
  fingerprint and must not restart every pod. A change the pods see (image, env,
  resources, probes) changes the pod template by itself.
- With ``autoscale`` the Deployment has no ``replicas``: a server-side apply of a
  ``replicas`` would take the count back from the HPA on every deploy.
- Probes all go to the health port (``HEALTH_PORT``), which answers from the first
  moment, also while ``init()`` runs. The startupProbe on ``/healthz/ready`` allows
  ``progress_deadline_s`` for ``init()`` (a model may take minutes to load; a pod not
  ready by then fails the rollout anyway); until it succeeds the other probes are off,
  so the liveness probe's ``initial_delay_s`` is not needed to cover start-up: the
  setting is passed through as written (Azure's default 310 only postpones the first
  liveness check; 0 is safe here).
- Requests are the larger of the target's ``cpu``/``memory_gb`` and the models'
  ``resources`` hint (a profiled model is not starved by the target's small default).
  The memory limit is ``memory_gb_limit``, else the request (a replica that grows past
  what it asked for is restarted rather than starving its node's neighbours); there is no
  CPU limit unless ``cpu_limit`` says so (CPU is compressible: a limit only throttles).
- ``MLBUILD_AUTH`` is set (to ``key``) only with a Secret: a Deployment never says
  ``none``, so an image built with ``auth: key`` fails closed if rendered without one.
- Pods run as the image's user (uid ``RUN_AS_UID``) with a read-only root file system,
  an emptyDir at ``/tmp``, no privilege escalation, no capabilities, the RuntimeDefault
  seccomp profile (Pod Security "restricted"), no service account token, no service
  links.
- The Ingress (one per service, so that several services share the target's host)
  routes ``host/<service>`` (pathType Prefix) to the Service. Kubernetes' Ingress has no
  portable rewrite, so the path reaches the runtime with its ``/<service>`` prefix, and
  the runtime is told to answer below it (``MLBUILD_PATH_PREFIX``): no
  controller-specific rewrite annotation is needed.
- The Ingress carries ``nginx.ingress.kubernetes.io/proxy-body-size``, the service's body
  limit (``max_body_mb``, else the runtime's 10 MiB): ingress-nginx refuses bodies over
  1 MiB by default, which would cut the service's own limit short. Other controllers
  ignore the annotation.
- ``workers: auto`` counts the CPUs of the container's CPU limit (``cpu_limit``; the
  runtime reads its cgroup quota). Without a limit it would count the node's CPUs, so
  then ``MLBUILD_WORKERS`` comes from the container's CPU request through the downward
  API (``requests.cpu``, divisor 1: rounded up, at least 1).
- ``collect_model_data``: stdout by default (``MLBUILD_MODEL_DATA_DIR=-``), where the
  cluster's log collector picks the records up: the root file system is read-only and
  an emptyDir dies with its pod. ``to: folder`` gets that emptyDir at the image's folder
  (``/var/mlbuild/model-data``), for a sidecar that ships it (or a volume patched in).
- ``tracing``: ``MLBUILD_TRACING=1``; the exporter's ``OTEL_*`` variables are the
  cluster's to give (a kustomize patch of ``out``, or ``kubectl set env``, whose entries
  server-side apply leaves alone).
- Quantities: CPU in millicores unless whole (``100m``, ``2``), memory in MiB (``512Mi``),
  as the docker target counts it.
"""

from __future__ import annotations

import base64
import math
import re
from dataclasses import dataclass
from typing import Iterable

import yaml

from mlbuild.kube.settings import CONTAINER_PORT, GRACEFUL_STOP_S, HEALTH_PORT, KubeSettings
from mlbuild.render import render
from mlbuild.manifest.model import MODEL_DATA_IN_IMAGE, MODEL_DATA_STDOUT
from mlbuild.runtime.config import DEFAULT_MAX_BODY_BYTES

# The oldest and the newest Kubernetes version every rendered object is validated
# against (kubernetes-validate --strict, in tests/unit/test_kube_render.py).
SUPPORTED_KUBERNETES = ("1.28", "1.37")

RUN_AS_UID = 10001  # the user mlbuild of templates/Dockerfile.j2
MANAGED_BY = "mlbuild"
FINGERPRINT_ANNOTATION = "mlbuild.dev/fingerprint"
KEYS_DIR = "/run/secrets/mlbuild"  # where the Secret is mounted
KEYS_FILE = f"{KEYS_DIR}/keys"  # MLBUILD_AUTH_KEYS_FILE: one key per line
STARTUP_PERIOD_S = 5
READINESS_PERIOD_S = 5
READINESS_FAILURE_THRESHOLD = 3
PROBE_TIMEOUT_S = 2

# (file suffix, template), in apply order.
_KINDS = (
    ("pdb", "kubernetes/pdb.yaml.j2"),
    ("service", "kubernetes/service.yaml.j2"),
    ("deployment", "kubernetes/deployment.yaml.j2"),
    ("hpa", "kubernetes/hpa.yaml.j2"),
    ("ingress", "kubernetes/ingress.yaml.j2"),
)
KUSTOMIZATION = "kubernetes/kustomization.yaml.j2"
KUSTOMIZATION_FILE = "kustomization.yaml"
# Every template a render reads: their digests belong in the deploy step's fingerprint.
TEMPLATES = ("kubernetes/_macros.j2", *(t for _, t in _KINDS), KUSTOMIZATION)

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_PINNED = re.compile(r"^[^@\s]+@sha256:[0-9a-f]{64}$")

try:  # libyaml is ~10x faster than the pure-Python parser
    _Loader = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - PyYAML built without libyaml
    _Loader = yaml.SafeLoader


@dataclass(frozen=True)
class ServiceInput:
    """What :func:`render_target` needs of one service (see :func:`render_service`)."""

    name: str
    image: str
    fingerprint: str
    auth: str = "none"
    auth_secret: str | None = None
    cors: tuple[str, ...] = ()
    resources: object | None = None
    max_body_bytes: int | None = None
    workers: int | str | None = None
    model_data: str | None = None
    tracing: bool = False


def object_name(project: str, service: str) -> str:
    """The name of a service's objects: ``<project>-<service>``."""
    return f"{project}-{service}"


def secret_name(project: str, service: str) -> str:
    """The name of the Secret holding a service's keys."""
    return f"{object_name(project, service)}-keys"


def labels(project: str, service: str) -> dict[str, str]:
    """The ``app.kubernetes.io/*`` labels of every object of a service."""
    return {
        "app.kubernetes.io/name": service,
        "app.kubernetes.io/instance": object_name(project, service),
        "app.kubernetes.io/part-of": project,
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def selector(project: str, service: str) -> dict[str, str]:
    """The labels that select a service's pods (a Deployment's selector is immutable,
    so only the two that never change)."""
    return {"app.kubernetes.io/name": service,
            "app.kubernetes.io/instance": object_name(project, service)}


def cpu_quantity(cores: float) -> str:
    """``0.1`` -> ``100m``, ``2`` -> ``2``."""
    milli = max(1, round(cores * 1000))
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


def memory_quantity(gb: float) -> str:
    """``0.5`` -> ``512Mi`` (GB counted as GiB, as the docker target does)."""
    return f"{max(1, math.ceil(gb * 1024))}Mi"


def _resources(settings: KubeSettings, hint) -> tuple[dict, dict]:
    cpu = max(settings.cpu, getattr(hint, "cpu", None) or 0)
    memory = max(settings.memory_gb, getattr(hint, "memory_gb", None) or 0)
    requests = {"cpu": cpu_quantity(cpu), "memory": memory_quantity(memory)}
    limits = {"memory": memory_quantity(max(settings.memory_gb_limit or memory, memory))}
    if settings.cpu_limit is not None:
        limits["cpu"] = cpu_quantity(max(settings.cpu_limit, cpu))
    if settings.gpu:
        limits["nvidia.com/gpu"] = str(settings.gpu)
    return requests, limits


def _check(project: str, service: str, image: str, auth: str, auth_secret) -> None:
    name = object_name(project, service)
    if not _DNS_LABEL.match(name) or not _DNS_LABEL.match(service):
        raise ValueError(f"{name!r}: object names must be DNS labels (a-z, 0-9, '-', "
                         "starting with a letter, at most 63 characters)")
    if not _PINNED.match(image):
        raise ValueError(f"image {image!r} is not pinned by digest "
                         "(expected REPOSITORY@sha256:<64 hex digits>)")
    if auth not in ("none", "key"):
        raise ValueError(f"auth {auth!r}: expected none or key")
    if auth == "none" and auth_secret is not None:
        raise ValueError("auth_secret given for a service with auth: none")


def body_size(max_body_bytes: int | None) -> str:
    """The Ingress's ``nginx.ingress.kubernetes.io/proxy-body-size`` (an nginx size) for a
    service's body limit (None: the runtime's default): ``10m``, ``512k``, ``1000``."""
    n = DEFAULT_MAX_BODY_BYTES if max_body_bytes is None else max_body_bytes
    if n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)}m"
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _documents(project: str, service: str, image: str, fingerprint: str,
               settings: KubeSettings, *, auth: str = "none", auth_secret: str | None = None,
               cors: tuple[str, ...] = (), resources=None,
               max_body_bytes: int | None = None, workers: int | str | None = None,
               model_data: str | None = None,
               tracing: bool = False) -> list[tuple[str, str]]:
    """(kind suffix, YAML text) of each object of a service, in apply order."""
    _check(project, service, image, auth, auth_secret)
    if workers is not None and workers != "auto" and not (
            isinstance(workers, int) and workers >= 1):
        raise ValueError(f"workers {workers!r}: expected a number of 1 or more, or auto")
    if model_data not in (None, "folder", "stdout"):
        raise ValueError(f"model_data {model_data!r}: expected folder or stdout")
    if auth == "key" and auth_secret is None:
        auth_secret = secret_name(project, service)
    requests, limits = _resources(settings, resources)
    autoscale = settings.autoscale
    replicas = None if autoscale is not None else (settings.replicas or 1)
    values = dict(
        project=project,
        service=service,
        name=object_name(project, service),
        namespace=settings.namespace,
        labels=labels(project, service),
        selector=selector(project, service),
        fingerprint=fingerprint,
        image=image,
        replicas=replicas,
        autoscale=autoscale,
        progress_deadline_s=settings.progress_deadline_s,
        graceful_stop_s=GRACEFUL_STOP_S,
        termination_grace_s=GRACEFUL_STOP_S + 5,
        uid=RUN_AS_UID,
        image_pull_secret=settings.image_pull_secret,
        container_port=CONTAINER_PORT,
        health_port=HEALTH_PORT,
        service_port=settings.port,
        service_type=settings.service_type,
        scoring_timeout_ms=settings.scoring_timeout_ms,
        max_concurrent_requests=settings.max_concurrent_requests,
        max_request_wait_ms=settings.max_request_wait_ms,
        cors=tuple(cors),
        max_body_bytes=max_body_bytes,
        ingress_body_size=body_size(max_body_bytes),
        workers=workers,
        # auto without a CPU limit: the request, through the downward API (see above).
        workers_from_request=workers == "auto" and "cpu" not in limits,
        model_data=model_data,
        model_data_dir=MODEL_DATA_STDOUT if model_data == "stdout" else MODEL_DATA_IN_IMAGE,
        tracing=tracing,
        auth_secret=auth_secret,
        keys_dir=KEYS_DIR,
        keys_file=KEYS_FILE,
        startup_period_s=STARTUP_PERIOD_S,
        startup_failure_threshold=max(1, math.ceil(settings.progress_deadline_s
                                                   / STARTUP_PERIOD_S)),
        readiness_period_s=READINESS_PERIOD_S,
        readiness_failure_threshold=READINESS_FAILURE_THRESHOLD,
        probe_timeout_s=PROBE_TIMEOUT_S,
        liveness=settings.liveness,
        requests=requests,
        limits=limits,
        ingress=settings.ingress,
        ingress_path=f"/{service}",
    )
    wanted = _wanted(settings)
    return [(kind, render(template, **values)) for kind, template in _KINDS if kind in wanted]


def _wanted(settings: KubeSettings) -> set[str]:
    """The kinds of object a service of a target with these settings gets."""
    autoscale = settings.autoscale
    lowest = autoscale.min if autoscale is not None else (settings.replicas or 1)
    out = {"service", "deployment"}
    if lowest >= 2:
        out.add("pdb")
    if autoscale is not None:
        out.add("hpa")
    if settings.ingress is not None:
        out.add("ingress")
    return out


def file_names(service: str, settings: KubeSettings) -> list[str]:
    """The files :func:`render_target` writes for ``service``, in apply order: known
    from the settings alone (a deploy step lists every service's in the kustomization
    without rendering them)."""
    wanted = _wanted(settings)
    return [f"{service}-{kind}.yaml" for kind, _ in _KINDS if kind in wanted]


def kustomization(project: str, files: list[str]) -> str:
    """``kustomization.yaml`` listing ``files`` (in the order given)."""
    return render(KUSTOMIZATION, project=project, files=list(files))


def render_service(project: str, service: str, image: str, fingerprint: str,
                   settings: KubeSettings, *, auth: str = "none",
                   auth_secret: str | None = None, cors: tuple[str, ...] = (),
                   resources=None, max_body_bytes: int | None = None,
                   workers: int | str | None = None, model_data: str | None = None,
                   tracing: bool = False) -> list[dict]:
    """The Kubernetes objects of one service, in apply order.

    Args:
        project: the project's name.
        service: the service's name.
        image: the image pinned by digest, ``registry/project-service@sha256:<hex>``.
        fingerprint: the deploy step's fingerprint (the ``mlbuild.dev/fingerprint``
            annotation).
        settings: the target's settings.
        auth: ``none`` or ``key``.
        auth_secret: the Secret with the keys (auth: key); default
            :func:`secret_name`. Only its name is rendered.
        cors: the allowed CORS origins.
        resources: the models' resources hint (``cpu``, ``memory_gb``; see
            :func:`mlbuild.manifest.model.resources_hint`), or None.
        max_body_bytes: the service's body limit (``max_body_mb``), or None for the
            runtime's default.
        workers: the service's worker processes, a number or ``auto``; None for the
            image's setting.
        model_data: where collected model data goes on kubernetes (``folder`` or
            ``stdout``, see the module docstring); None when the service collects none.
        tracing: the service traces (``MLBUILD_TRACING=1``).

    Returns:
        The objects as dicts, parsed from the rendered YAML (the Secret is not among
        them: see :func:`secret_object`).

    Raises:
        ValueError: a name is not a DNS label, the image is not pinned by digest,
            ``auth`` is not none/key, ``workers`` not a number or auto, or
            ``model_data`` not folder/stdout.
    """
    docs = _documents(project, service, image, fingerprint, settings, auth=auth,
                      auth_secret=auth_secret, cors=cors, resources=resources,
                      max_body_bytes=max_body_bytes, workers=workers,
                      model_data=model_data, tracing=tracing)
    return [yaml.load(text, Loader=_Loader) for _, text in docs]


def render_target(project: str, services: Iterable[ServiceInput],
                  settings: KubeSettings) -> dict[str, str]:
    """The files a kubernetes target writes to its ``out``: one object per file,
    ``<service>-<kind>.yaml``, and ``kustomization.yaml`` listing them in apply order.

    Services come in name order, so the same manifest gives the same files. The texts
    are those :func:`render_service` parses; no key is in any of them.

    Raises:
        ValueError: as :func:`render_service`, or two services with one name.
    """
    files: dict[str, str] = {}
    for s in sorted(services, key=lambda s: s.name):
        for kind, text in _documents(project, s.name, s.image, s.fingerprint, settings,
                                     auth=s.auth, auth_secret=s.auth_secret, cors=s.cors,
                                     resources=s.resources,
                                     max_body_bytes=s.max_body_bytes, workers=s.workers,
                                     model_data=s.model_data, tracing=s.tracing):
            file = f"{s.name}-{kind}.yaml"
            if file in files:
                raise ValueError(f"service {s.name!r} is given twice")
            files[file] = text
    files[KUSTOMIZATION_FILE] = kustomization(project, list(files))
    return files


def objects_of(files: dict[str, str]) -> list[dict]:
    """The objects of :func:`render_target`'s files, in apply order (the kustomization
    left out): what a deploy applies is exactly what it wrote."""
    return [yaml.load(text, Loader=_Loader) for name, text in files.items()
            if name != KUSTOMIZATION_FILE]


def secret_object(project: str, service: str, namespace: str, primary: str,
                  secondary: str) -> dict:
    """The Secret with a service's keys, for the deploy step to apply and for
    ``mlbuild keys --secret`` to print; never written to ``out``.

    It holds ``primary`` and ``secondary`` (each key alone, as ``mlbuild keys`` names
    them) and ``keys``, the file the runtime reads (``MLBUILD_AUTH_KEYS_FILE``: one key
    per line, as ``mlbuild.state.keys.write_file`` writes it; the Deployment mounts
    only this item).
    """
    def b64(text: str) -> str:
        return base64.b64encode(text.encode("utf-8")).decode("ascii")

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": secret_name(project, service),
            "namespace": namespace,
            "labels": labels(project, service),
        },
        "type": "Opaque",
        "data": {
            "primary": b64(primary),
            "secondary": b64(secondary),
            "keys": b64(f"{primary}\n{secondary}\n"),
        },
    }
