"""A kubernetes target's settings, with the defaults of Azure ML v1's
``AksWebservice.deploy_configuration`` where it had one (named in brackets).

Built by the manifest loader from ``targets.NAME`` of ``type: kubernetes``; consumed by
the renderer (render.py), the deploy step and the runtime's settings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

SERVICE_TYPES = ("ClusterIP", "LoadBalancer", "NodePort")
CONTAINER_PORT = 5001  # the runtime's scoring port inside the pod (azmlinfsrv's)
HEALTH_PORT = 5000  # the runtime's separate health port inside the pod (azmlinfsrv's)
GRACEFUL_STOP_S = 30  # the runtime's graceful stop; terminationGracePeriodSeconds adds 5


@dataclass(frozen=True)
class Autoscale:
    """[autoscale_min_replicas, autoscale_max_replicas, autoscale_target_utilization]"""

    min: int = 1
    max: int = 10
    target_cpu_percent: int = 70


@dataclass(frozen=True)
class Liveness:
    """The liveness probe [period_seconds, initial_delay_seconds, timeout_seconds,
    failure_threshold, success_threshold]. Kubernetes requires success_threshold 1 for
    a liveness probe; the manifest check says so."""

    period_s: int = 10
    initial_delay_s: int = 310
    timeout_s: int = 2
    failure_threshold: int = 3
    success_threshold: int = 1


@dataclass(frozen=True)
class Ingress:
    host: str
    class_name: str | None = None  # `class` in the manifest
    tls_secret: str | None = None


@dataclass(frozen=True)
class KubeSettings:
    """Everything a kubernetes target says about how its services run.

    Attributes:
        context: kubeconfig context (None: the current one).
        namespace: where the objects go.
        port: the Service's port (the pod listens on CONTAINER_PORT).
        replicas: fixed replica count [num_replicas]; None with ``autoscale``.
        autoscale: a HorizontalPodAutoscaler instead of fixed replicas.
        cpu / memory_gb: requests [cpu_cores, memory_gb].
        cpu_limit / memory_gb_limit: limits [cpu_cores_limit, memory_gb_limit].
        gpu: ``nvidia.com/gpu`` count [gpu_cores].
        scoring_timeout_ms: run()'s bound [scoring_timeout_ms].
        max_concurrent_requests: per replica [replica_max_concurrent_requests]; None: no cap.
        max_request_wait_ms: a request that waited this long for a free slot gets 503
            [max_request_wait_time].
        liveness: the liveness probe's settings.
        progress_deadline_s: the Deployment's progressDeadlineSeconds.
        service_type: ClusterIP, LoadBalancer or NodePort.
        ingress: an Ingress in front of the Service, or None.
        apply: False renders only (the GitOps mode).
        out: where the rendered objects are written (relative to the project).
        image_pull_secret: the Secret the pods pull the image with, or None.
    """

    namespace: str = "default"
    context: str | None = None
    port: int = 80
    replicas: int | None = 1
    autoscale: Autoscale | None = None
    cpu: float = 0.1
    memory_gb: float = 0.5
    cpu_limit: float | None = None
    memory_gb_limit: float | None = None
    gpu: int | None = None
    scoring_timeout_ms: int = 60000
    max_concurrent_requests: int | None = None
    max_request_wait_ms: int = 500
    liveness: Liveness = field(default_factory=Liveness)
    progress_deadline_s: int = 600
    service_type: str = "ClusterIP"
    ingress: Ingress | None = None
    apply: bool = True
    out: str = "dist/kubernetes"
    image_pull_secret: str | None = None

    def config(self) -> dict:
        """The canonical JSON-able form (it enters the k8s step's fingerprint)."""
        return asdict(self)
