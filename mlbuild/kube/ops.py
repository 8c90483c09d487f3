"""``status`` (its state and last minute of traffic), ``logs`` and ``down`` of a service
recorded on a kubernetes target.

They work from the deployment record (context, namespace, Deployment name), so a
manifest that no longer loads does not hide or keep anything running.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from mlbuild.errors import MlbuildError
from mlbuild.kube import render
from mlbuild.kube.client import APPLIED_KINDS, KubeClient
from mlbuild.kube.settings import CONTAINER_PORT

if TYPE_CHECKING:
    from mlbuild.traffic import Traffic

_RECORD_KEY = "kube"
MAX_SCRAPED_PODS = 10  # pods whose /metrics one status reads (in parallel)


def client_of(record: dict) -> KubeClient:
    k = record[_RECORD_KEY]
    return KubeClient(k["context"], k["namespace"])


def pods_of(client: KubeClient, dep: dict) -> tuple[list[dict], str | None]:
    """The Deployment's pods (its selector's) and its new ReplicaSet's pod-template-hash,
    which tells the new pods from the old (kube/rollout.py)."""
    from mlbuild.kube import rollout

    selector = dep["spec"]["selector"]["matchLabels"]
    return (client.list("Pod", selector),
            rollout.revision_hash_of(dep, client.list("ReplicaSet", selector)))


def observe(record: dict) -> tuple[str, str, list[str]]:
    """``(state, detail, last log lines)`` of a recorded service, from its live
    Deployment and pods (the last lines only when it Failed)."""
    from mlbuild.backends.process import FAILED, HEALTHY
    from mlbuild.kube import rollout

    client = client_of(record)
    name = record[_RECORD_KEY]["deployment"]
    dep = client.get("Deployment", name)
    if dep is None:
        return FAILED, f"Deployment {name} is gone (deleted outside mlbuild)", []
    pods, new_hash = pods_of(client, dep)
    v = rollout.status_of(dep, pods, revision_hash=new_hash)
    detail = f"{v.ready}/{v.desired} ready"
    if v.restarts:
        detail += f", {v.restarts} restarts"
    if v.state != HEALTHY and v.reason:
        detail += f"; {v.reason}"
    seen = (dep["metadata"].get("annotations") or {}).get(render.FINGERPRINT_ANNOTATION)
    if seen != record["fingerprint"]:
        detail += "; changed outside mlbuild (another fingerprint)"
    last: list[str] = []
    if v.state == FAILED and v.failing_pod and v.failing_container:
        last = list(client.logs(v.failing_pod, v.failing_container, tail=5,
                                previous=v.logs_previous))
    return v.state, detail, last


def traffic(record: dict) -> Traffic | None:
    """The last minute of ``/score`` of a recorded service: every ready pod's own window
    (its runtime's ``/metrics``, read through the API server's pod proxy), added up by
    :func:`mlbuild.traffic.combine`. None when no pod answered.

    NOTE: the service's URL (a Service's or an Ingress's) reaches one pod per request,
    and maybe not at all from here; the pod proxy reaches each pod from wherever the
    kubeconfig reaches the API server. A pod that does not answer (not listening, gone
    meanwhile, too slow) is left out: the others still tell. Of more than
    ``MAX_SCRAPED_PODS`` ready pods, the first by name are read (a status stays quick;
    the counts are then those of these pods).

    Raises:
        MlbuildError: the cluster cannot be asked for the Deployment or its pods.
    """
    from concurrent.futures import ThreadPoolExecutor

    from mlbuild import traffic as tr

    client = client_of(record)
    dep = client.get("Deployment", record[_RECORD_KEY]["deployment"])
    if dep is None:
        return None
    pods = serving_pods(client.list("Pod", dep["spec"]["selector"]["matchLabels"]))
    if not pods:
        return None

    def scrape(pod: Mapping) -> tr.Traffic | None:
        try:
            code, text = client.proxy_get(pod["metadata"]["name"], scoring_port(pod),
                                          "metrics", timeout=tr.FETCH_TIMEOUT)
        except MlbuildError:
            return None
        if code != 200:
            return None
        try:
            return tr.parse(text)
        except ValueError:  # not Prometheus text
            return None

    # NOTE: in parallel, so that pods that do not answer cost one timeout, not one each.
    with ThreadPoolExecutor(max_workers=len(pods)) as pool:
        seen = [t for t in pool.map(scrape, pods) if t is not None]
    return tr.combine(seen)


def serving_pods(pods: list[Mapping], limit: int = MAX_SCRAPED_PODS) -> list[Mapping]:
    """The pods that take requests (Ready, not terminating), at most ``limit``, by name."""
    def ready(pod: Mapping) -> bool:
        conditions = (pod.get("status") or {}).get("conditions") or []
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)

    out = [p for p in pods if ready(p) and not p["metadata"].get("deletionTimestamp")]
    return sorted(out, key=lambda p: p["metadata"]["name"])[:limit]


def scoring_port(pod: Mapping) -> int:
    """The port the runtime listens on in a pod: its container port named ``http``
    (templates/kubernetes/deployment.yaml.j2), else mlbuild's default."""
    for c in (pod.get("spec") or {}).get("containers") or []:
        for port in c.get("ports") or []:
            if port.get("name") == "http" and port.get("containerPort"):
                return int(port["containerPort"])
    return CONTAINER_PORT


def logs(record: dict, lines: int | None, follow: bool) -> Iterator[str]:
    """Every replica's log, each line prefixed by its pod: ``[pod] line``."""
    client = client_of(record)
    name = record[_RECORD_KEY]["deployment"]
    dep = client.get("Deployment", name)
    selector = dep["spec"]["selector"]["matchLabels"] if dep else \
        {"app.kubernetes.io/instance": name}
    pods = sorted(p["metadata"]["name"] for p in client.list("Pod", selector))
    if not follow:
        for pod in pods:
            for line in client.logs(pod, tail=lines):
                yield f"[{pod}] {line}"
        return
    # Follow: one reader per pod, lines as they come, until interrupted.
    q: queue.Queue = queue.Queue()

    def read(pod: str) -> None:
        for line in client.logs(pod, tail=lines, follow=True):
            q.put(f"[{pod}] {line}")

    for pod in pods:
        threading.Thread(target=read, args=(pod,), daemon=True).start()
    while True:
        yield q.get()


def delete(record: dict) -> list[str]:
    """Delete what mlbuild applied for a recorded service -- found by its labels
    (``instance`` and ``managed-by: mlbuild``), nothing else. Returns what went."""
    client = client_of(record)
    name = record[_RECORD_KEY]["deployment"]
    gone = []
    labels = {"app.kubernetes.io/instance": name,
              "app.kubernetes.io/managed-by": render.MANAGED_BY}
    for kind in APPLIED_KINDS:
        for obj in client.list(kind, labels):
            if client.delete(kind, obj["metadata"]["name"]):
                gone.append(f"{kind}/{obj['metadata']['name']}")
    return gone
