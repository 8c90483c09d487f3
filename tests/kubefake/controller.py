"""A stand-in for the Deployment and ReplicaSet controllers, the scheduler and the kubelet,
driven step by step by a test (or in a background thread with ``run()``).

    ctl = Controller(kube)
    ctl.reconcile("ml", "diabetes", outcome="crashloop", steps=3, logs=["Traceback ..."])
    ctl.settle("ml", "diabetes")                       # outcome "ready", until complete

One step is one pass of each actor, in this order:

1. kubelet/scheduler: every pod advances one state for its outcome (below); pods marked
   for deletion in the previous step go.
2. Deployment controller: a new pod template gets a ReplicaSet ``<name>-<hash>`` (label
   ``pod-template-hash``; an old one with the same template is reused, its revision
   bumped, as in a rollback); RollingUpdate scales the new ReplicaSet up within
   maxSurge and old ones down keeping ``replicas - maxUnavailable`` available
   (upstream's reconcileNewReplicaSet / reconcileOldReplicaSets, unhealthy old
   replicas first); Recreate scales old ones to 0 first. Old ReplicaSets beyond
   revisionHistoryLimit are deleted. ``ScalingReplicaSet`` events.
3. ReplicaSet controller: creates pods ``<rs>-<5 chars>`` (template labels and
   annotations, ownerReferences) or marks the surplus terminating (deletionTimestamp;
   gone next step), not-ready and newest first.
4. Status, as upstream's calculateStatus / syncRolloutStatus: ReplicaSets'
   replicas/ready/available/fullyLabeled/observedGeneration (and the ReplicaFailure
   condition); the Deployment's observedGeneration, replicas, updatedReplicas,
   readyReplicas, availableReplicas, unavailableReplicas (zeros omitted, as the API
   does), conditions Available (MinimumReplicasAvailable / Unavailable) and Progressing
   (NewReplicaSetCreated, FoundNewReplicaSet, ReplicaSetUpdated, NewReplicaSetAvailable,
   ProgressDeadlineExceeded), ReplicaFailure; annotation
   ``deployment.kubernetes.io/revision`` on the Deployment and its ReplicaSets.

Pod states per outcome, step by step after creation (step 0 is the creating step):

=====================  ==========================================================
ready                  0 ContainerCreating, 1 Running and Ready
crashloop              0 ContainerCreating, 1 Running (not ready), 2 terminated
                       (Error, exit ``exit_code``), 3+ CrashLoopBackOff with
                       lastState.terminated and restartCount 1, 2, ...
exit1                  as crashloop, but stays terminated from step 2 on
imagepull              0 ContainerCreating, 1 ErrImagePull, 2+ ImagePullBackOff
createcontainerconfig  0 ContainerCreating, 1+ CreateContainerConfigError
                       (``secret "<the first secret the pod uses>" not found``)
runcontainer           0 ContainerCreating, 1+ RunContainerError
unschedulable          0+ Pending, PodScheduled False reason Unschedulable
failedcreate           no pods: FailedCreate events (exceeded quota) on the
                       ReplicaSet and its ReplicaFailure condition
deadline               0 ContainerCreating, 1+ Running, not Ready (readiness probe
                       failing); the Deployment's Progressing condition turns
                       False/ProgressDeadlineExceeded two steps after the new
                       ReplicaSet appeared (``expire_deadline()`` does it any time)
=====================  ==========================================================

Each start of a container writes the ``logs`` lines to its log (a crash-looping
program prints the same trace every run); ``log()`` appends a line to the run that
``kubectl logs`` would show. Events carry the kubelet's, scheduler's and controllers'
real reasons and messages.

Not modelled: minReadySeconds, paused Deployments, proportional scaling of several
ReplicaSets during a rollout, the hash upstream computes (same alphabet and length,
different value), readiness of terminating pods, real time passing (the deadline is a
step count or an explicit call).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import threading
from dataclasses import dataclass, field
from typing import Any

from .server import ApiStatus, KubeFake, _log_container_id, rfc3339, rfc3339_nano

OUTCOMES = ("ready", "crashloop", "exit1", "imagepull", "createcontainerconfig", "runcontainer",
            "unschedulable", "failedcreate", "deadline")
MANAGER = "kube-controller-manager"
REVISION = "deployment.kubernetes.io/revision"
_ALNUM = "bcdfghjklmnpqrstvwxz2456789"


def pod_template_hash(template: dict, collision_count: int = 0) -> str:
    """FNV-32a of the template, encoded as upstream's rand.SafeEncodeString(uint32)."""
    data = json.dumps(template, sort_keys=True, separators=(",", ":")).encode()
    if collision_count:
        data += str(collision_count).encode()
    h = 0x811C9DC5
    for b in data:
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return "".join(_ALNUM[ord(c) % len(_ALNUM)] for c in str(h))


def _int_or_percent(value: Any, total: int, round_up: bool) -> int:
    if isinstance(value, str) and value.endswith("%"):
        exact = int(value[:-1]) * total / 100
        return math.ceil(exact) if round_up else math.floor(exact)
    return int(value or 0)


def _owned_by(obj: dict, uid: str) -> bool:
    return any(r.get("uid") == uid and r.get("controller") for r in obj["metadata"].get("ownerReferences") or [])


def _revision(obj: dict) -> int:
    return int((obj["metadata"].get("annotations") or {}).get(REVISION, "0"))


@dataclass
class _Container:
    ids: list[str] = field(default_factory=list)  # one containerID per run, oldest first
    restarts: int = 0


@dataclass
class _PodSim:
    outcome: str
    stage: int = 0
    node: int = 0
    ip: str = ""
    containers: dict[str, _Container] = field(default_factory=dict)
    terminating: bool = False


@dataclass
class _Plan:
    outcome: str = "ready"
    logs: list[str] = field(default_factory=list)
    exit_code: int = 1
    steps_with_new_rs: int = 0
    expired: bool = False
    rs_name: str = ""


class Controller:
    """Moves Deployments, ReplicaSets and Pods of a :class:`KubeFake` along.

    Args:
        kube: the fake apiserver (the controller writes through Python calls, never HTTP).
        nodes: node names pods are scheduled on, round robin.
        seed: for pod names and container IDs (tests stay reproducible).
    """

    def __init__(self, kube: KubeFake, *, nodes: tuple[str, ...] = ("kind-worker", "kind-worker2", "kind-worker3"),
                 seed: int = 0):
        self.kube = kube
        self.nodes = nodes
        self._rand = random.Random(seed)
        self._plans: dict[tuple[str, str], _Plan] = {}
        self._pods: dict[tuple[str, str], _PodSim] = {}
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._next_node = 0
        self._next_ip = 0

    # ------------------------------------------------------------------ public

    def reconcile(self, namespace: str, name: str, outcome: str = "ready", steps: int = 1, *,
                  logs: list[str] | None = None, exit_code: int = 1) -> dict:
        """Run ``steps`` steps for Deployment ``name`` whose new pods meet ``outcome``.

        The outcome (and ``logs``, ``exit_code``) stays for later steps and for ``run()``.
        Returns the Deployment as a client would GET it.

        Raises:
            KeyError: no such Deployment.
            ValueError: an unknown outcome.
        """
        self.set_outcome(namespace, name, outcome, logs=logs, exit_code=exit_code)
        for _ in range(steps):
            self.step(namespace, name)
        return self._deployment(namespace, name)

    def settle(self, namespace: str, name: str, outcome: str = "ready", *, max_steps: int = 40,
               logs: list[str] | None = None) -> dict:
        """Step until the rollout is complete and no old pod is left terminating (for
        outcomes that never complete, at most ``max_steps``: use ``reconcile``)."""
        self.set_outcome(namespace, name, outcome, logs=logs)
        for _ in range(max_steps):
            self.step(namespace, name)
            dep = self._deployment(namespace, name)
            if _complete(dep) and not any("deletionTimestamp" in p["metadata"]
                                          for p in self.kube.list("Pod", namespace)):
                return dep
        return self._deployment(namespace, name)

    def set_outcome(self, namespace: str, name: str, outcome: str, *, logs: list[str] | None = None,
                    exit_code: int = 1) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}: one of {', '.join(OUTCOMES)}")
        with self._lock:
            plan = self._plans.setdefault((namespace, name), _Plan())
            plan.outcome = outcome
            plan.exit_code = exit_code
            if logs is not None:
                plan.logs = list(logs)

    def expire_deadline(self, namespace: str, name: str) -> dict:
        """The progress deadline passes now: a rollout that is not complete times out
        (at the next step's status, done here at once)."""
        with self._lock:
            self._plans.setdefault((namespace, name), _Plan()).expired = True
            self._update_deployment_status(namespace, name)
            return self._deployment(namespace, name)

    def step(self, namespace: str, name: str) -> None:
        """One step of every actor for one Deployment (see the module docstring)."""
        with self._lock:
            dep = self.kube.get("Deployment", namespace, name)
            if dep is None:
                raise KeyError(f"no Deployment {namespace}/{name}")
            plan = self._plans.setdefault((namespace, name), _Plan())
            uid = dep["metadata"]["uid"]
            for rs in self._replicasets(namespace, uid):
                for pod in self._pods_of(namespace, rs["metadata"]["uid"]):
                    self._advance_pod(pod, plan)
            for rs in self._replicasets(namespace, uid):
                self._update_replicaset_status(rs)
            new_rs = self._sync_deployment(namespace, name, plan)
            for rs in self._replicasets(namespace, uid):
                self._sync_replicaset(rs, plan if rs["metadata"]["name"] == new_rs else None)
            for rs in self._replicasets(namespace, uid):
                self._update_replicaset_status(rs)
            self._update_deployment_status(namespace, name)

    def run_pod(self, namespace: str, name: str, outcome: str = "ready", steps: int = 2, *,
                logs: list[str] | None = None, exit_code: int = 1) -> dict:
        """Advance a pod that no ReplicaSet owns (a test applied it) ``steps`` states."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        with self._lock:
            plan = _Plan(outcome=outcome, logs=list(logs or []), exit_code=exit_code)
            for _ in range(steps):
                pod = self.kube.get("Pod", namespace, name)
                if pod is None:
                    raise KeyError(f"no Pod {namespace}/{name}")
                if (namespace, name) not in self._pods:
                    self._pods[(namespace, name)] = self._new_sim(outcome)
                    self._kubelet_write(pod, self._pods[(namespace, name)], plan)
                else:
                    self._advance_pod(pod, plan)
            return self.kube.get("Pod", namespace, name)

    def log(self, pod: str, container: str, line: str, namespace: str = "default") -> None:
        """Append ``line`` to the run of ``container`` that ``kubectl logs`` shows now.

        Raises:
            ValueError: the container has not started (the kubelet's message says why).
        """
        obj = self.kube.get("Pod", namespace, pod)
        if obj is None:
            raise KeyError(f"no Pod {namespace}/{pod}")
        try:
            cid = _log_container_id(obj, container, previous=False)
        except ApiStatus as e:
            raise ValueError(e.message) from None
        self.kube.store.append_log(namespace, pod, cid, line)

    def delete_pod(self, namespace: str, name: str) -> None:
        """The pod goes at once (its ReplicaSet makes a new one at the next step)."""
        self.kube.delete("Pod", namespace, name)
        self._pods.pop((namespace, name), None)

    def run(self, interval: float = 0.05) -> None:
        """Step every Deployment in the background, each with its last outcome
        ("ready" unless ``set_outcome`` said otherwise), until ``stop()``."""
        if self._thread is not None:
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(interval):
                for dep in self.kube.list("Deployment"):
                    try:
                        self.step(dep["metadata"]["namespace"], dep["metadata"]["name"])
                    except (KeyError, ApiStatus):
                        pass  # deleted meanwhile (by a client, between two reads)
        self._thread = threading.Thread(target=loop, name="kubefake-controller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    # ------------------------------------------------------------------ reads

    def _deployment(self, namespace: str, name: str) -> dict:
        dep = self.kube.get("Deployment", namespace, name)
        if dep is None:
            raise KeyError(f"no Deployment {namespace}/{name}")
        return dep

    def _replicasets(self, namespace: str, dep_uid: str) -> list[dict]:
        rss = [rs for rs in self.kube.list("ReplicaSet", namespace) if _owned_by(rs, dep_uid)]
        for rs in rss:  # list items come without apiVersion and kind
            rs["apiVersion"], rs["kind"] = "apps/v1", "ReplicaSet"
        return sorted(rss, key=lambda r: (r["metadata"]["creationTimestamp"], _revision(r)))

    def _pods_of(self, namespace: str, rs_uid: str) -> list[dict]:
        pods = [p for p in self.kube.list("Pod", namespace) if _owned_by(p, rs_uid)]
        for p in pods:
            p["apiVersion"], p["kind"] = "v1", "Pod"
        return pods

    # ------------------------------------------------------------------ deployment controller

    def _sync_deployment(self, namespace: str, name: str, plan: _Plan) -> str:
        dep = self._deployment(namespace, name)
        spec = dep["spec"]
        uid = dep["metadata"]["uid"]
        template = spec["template"]
        collision = (dep.get("status") or {}).get("collisionCount", 0)
        h = pod_template_hash(template, collision)
        rss = self._replicasets(namespace, uid)
        new_rs = next((rs for rs in rss if (rs["metadata"].get("labels") or {}).get("pod-template-hash") == h), None)
        max_rev = max((_revision(rs) for rs in rss), default=0)
        desired = spec.get("replicas", 1)
        strategy = spec.get("strategy") or {}
        ru = strategy.get("rollingUpdate") or {}
        surge = _int_or_percent(ru.get("maxSurge", "25%"), desired, True)
        unavailable = _int_or_percent(ru.get("maxUnavailable", "25%"), desired, False)
        if surge == 0 and unavailable == 0:
            unavailable = 1
        created = False
        # getNewReplicaSet: "Found new replica set" only when no Progressing condition exists
        found = not any(c.get("type") == "Progressing" for c in (dep.get("status") or {}).get("conditions") or [])
        if new_rs is None:
            new_rs = self._create_replicaset(dep, h, max_rev + 1, desired, surge)
            created = True
        elif _revision(new_rs) < max_rev:  # a rollback to an old template: its revision moves up
            rev = max_rev + 1
            self.kube.update("ReplicaSet", namespace, new_rs["metadata"]["name"],
                             lambda o: o["metadata"].setdefault("annotations", {}).__setitem__(REVISION, str(rev)))
        if plan.rs_name != new_rs["metadata"]["name"]:
            plan.steps_with_new_rs = 0
            plan.expired = False
        plan.rs_name = new_rs["metadata"]["name"]
        plan.steps_with_new_rs += 1
        if plan.outcome == "deadline" and plan.steps_with_new_rs > 2:
            plan.expired = True
        new_name = new_rs["metadata"]["name"]
        rev = _revision(self.kube.get("ReplicaSet", namespace, new_name))
        if (dep["metadata"].get("annotations") or {}).get(REVISION) != str(rev):
            self.kube.update("Deployment", namespace, name,
                             lambda o: o["metadata"].setdefault("annotations", {}).__setitem__(REVISION, str(rev)))
        if created or found:
            reason, msg = ("NewReplicaSetCreated", f'Created new replica set "{new_name}"') if created else \
                ("FoundNewReplicaSet", f'Found new replica set "{new_name}"')
            self._set_condition(namespace, name, "Progressing", "True", reason, msg)

        rss = self._replicasets(namespace, uid)
        new_rs = next(rs for rs in rss if rs["metadata"]["name"] == new_name)
        olds = [rs for rs in rss if rs["metadata"]["name"] != new_name]
        avail = {rs["metadata"]["name"]: self._available(rs) for rs in rss}

        def scale(rs: dict, to: int) -> None:
            frm = rs["spec"].get("replicas", 0)
            if frm == to:
                return
            rs["spec"]["replicas"] = to

            def change(o: dict) -> None:
                o["spec"]["replicas"] = to
                ann = o["metadata"].setdefault("annotations", {})
                ann["deployment.kubernetes.io/desired-replicas"] = str(desired)
                ann["deployment.kubernetes.io/max-replicas"] = str(desired + surge)
            self.kube.update("ReplicaSet", namespace, rs["metadata"]["name"], change)
            self._event(dep, "Normal", "ScalingReplicaSet",
                        f"Scaled {'up' if to > frm else 'down'} replica set {rs['metadata']['name']} from {frm} to {to}",
                        component="deployment-controller")

        if strategy.get("type", "RollingUpdate") == "Recreate":
            for rs in olds:
                scale(rs, 0)
            if all(not self._pods_of(namespace, rs["metadata"]["uid"]) for rs in olds):
                scale(new_rs, desired)
            else:
                scale(new_rs, 0)
        else:
            new_count = new_rs["spec"].get("replicas", 0)
            all_count = sum(rs["spec"].get("replicas", 0) for rs in rss)
            if new_count > desired:
                scale(new_rs, desired)
            elif new_count < desired and all_count < desired + surge:
                scale(new_rs, new_count + min(desired + surge - all_count, desired - new_count))
            old_count = sum(rs["spec"].get("replicas", 0) for rs in olds)
            all_count = sum(rs["spec"].get("replicas", 0) for rs in rss)
            min_available = desired - unavailable
            new_unavailable = new_rs["spec"].get("replicas", 0) - avail[new_name]
            budget = all_count - min_available - new_unavailable  # maxScaledDown
            if old_count and budget > 0:
                for rs in olds:  # cleanupUnhealthyReplicas: unhealthy old replicas first
                    if budget <= 0:
                        break
                    count = rs["spec"].get("replicas", 0)
                    unhealthy = count - avail[rs["metadata"]["name"]]
                    if unhealthy > 0:
                        down = min(unhealthy, budget)
                        scale(rs, count - down)
                        budget -= down
                # scaleDownOldReplicaSetsForRollingUpdate
                total_down = sum(avail.values()) - min_available
                done = 0
                for rs in olds:
                    count = rs["spec"].get("replicas", 0)
                    if done >= total_down or count == 0:
                        continue
                    down = min(count, total_down - done)
                    scale(rs, count - down)
                    done += down
        # revisionHistoryLimit: old, empty ReplicaSets beyond it go, oldest first
        limit = spec.get("revisionHistoryLimit", 10)
        empty_olds = [rs for rs in self._replicasets(namespace, uid)
                      if rs["metadata"]["name"] != new_name and rs["spec"].get("replicas", 0) == 0
                      and not self._pods_of(namespace, rs["metadata"]["uid"])]
        for rs in sorted(empty_olds, key=_revision)[: max(0, len(empty_olds) - limit)]:
            self.kube.delete("ReplicaSet", namespace, rs["metadata"]["name"])
        return new_name

    def _create_replicaset(self, dep: dict, h: str, revision: int, desired: int, surge: int) -> dict:
        meta = dep["metadata"]
        template = copy.deepcopy(dep["spec"]["template"])
        tmeta = template.setdefault("metadata", {})
        tmeta.setdefault("labels", {})["pod-template-hash"] = h
        selector = copy.deepcopy(dep["spec"]["selector"])
        selector.setdefault("matchLabels", {})["pod-template-hash"] = h
        rs = {
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {
                "name": f"{meta['name']}-{h}", "namespace": meta["namespace"],
                "labels": dict(tmeta["labels"]),
                "annotations": {"deployment.kubernetes.io/desired-replicas": str(desired),
                                "deployment.kubernetes.io/max-replicas": str(desired + surge),
                                REVISION: str(revision)},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": meta["name"],
                                     "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}],
            },
            "spec": {"replicas": 0, "selector": selector, "template": template},
            "status": {"replicas": 0},
        }
        return self.kube.create(rs)

    def _available(self, rs: dict) -> int:
        return sum(1 for p in self._pods_of(rs["metadata"]["namespace"], rs["metadata"]["uid"])
                   if _ready(p) and "deletionTimestamp" not in p["metadata"])

    # ------------------------------------------------------------------ replicaset controller

    def _sync_replicaset(self, rs: dict, plan: _Plan | None) -> None:
        ns = rs["metadata"]["namespace"]
        pods = [p for p in self._pods_of(ns, rs["metadata"]["uid"]) if "deletionTimestamp" not in p["metadata"]]
        want = rs["spec"].get("replicas", 0)
        outcome = plan.outcome if plan else "ready"
        if len(pods) < want:
            if outcome == "failedcreate":
                self._failed_create(rs)
                return
            for _ in range(want - len(pods)):
                self._create_pod(rs, outcome, plan or _Plan())
        elif len(pods) > want:
            # upstream's ActivePods ordering: unscheduled, pending, not ready, then newest first
            def rank(p: dict) -> tuple:
                scheduled = bool((p.get("spec") or {}).get("nodeName"))
                phase = (p.get("status") or {}).get("phase")
                return (scheduled, phase == "Running", _ready(p), _neg_time(p["metadata"]["creationTimestamp"]))
            now = rfc3339(self.kube.store.clock())
            for p in sorted(pods, key=rank)[: len(pods) - want]:
                def mark(o: dict) -> None:
                    o["metadata"]["deletionTimestamp"] = now
                    o["metadata"]["deletionGracePeriodSeconds"] = o["spec"].get("terminationGracePeriodSeconds", 30)
                self.kube.update("Pod", ns, p["metadata"]["name"], mark)
                sim = self._pods.get((ns, p["metadata"]["name"]))
                if sim:
                    sim.terminating = True
                self._event(rs, "Normal", "SuccessfulDelete", f"Deleted pod: {p['metadata']['name']}",
                            component="replicaset-controller")
        if outcome != "failedcreate" and any(c.get("type") == "ReplicaFailure"
                                             for c in (rs.get("status") or {}).get("conditions") or []):
            status = copy.deepcopy(rs.get("status") or {})
            status["conditions"] = [c for c in status.get("conditions") or [] if c.get("type") != "ReplicaFailure"]
            if not status["conditions"]:
                del status["conditions"]
            self.kube.set_status("ReplicaSet", ns, rs["metadata"]["name"], status)

    def _failed_create(self, rs: dict) -> None:
        ns = rs["metadata"]["namespace"]
        # Admission sees the pod before its name is generated: upstream's NewForbidden
        # names it by generateName ("this is necessary because name object name
        # generation has not occurred yet"), so every retry says the same and counts up.
        name = f"{rs['metadata']['name']}-"
        cpu = "1"
        for c in rs["spec"]["template"]["spec"].get("containers") or []:
            cpu = ((c.get("resources") or {}).get("requests") or {}).get("cpu", cpu)
        msg = (f'pods "{name}" is forbidden: exceeded quota: compute-quota, requested: requests.cpu={cpu}, '
               f"used: requests.cpu=4, limited: requests.cpu=4")
        self._event(rs, "Warning", "FailedCreate", f"Error creating: {msg}", component="replicaset-controller")
        status = copy.deepcopy(rs.get("status") or {})
        conds = [c for c in status.get("conditions") or [] if c.get("type") != "ReplicaFailure"]
        old = next((c for c in status.get("conditions") or [] if c.get("type") == "ReplicaFailure"), None)
        conds.append({"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": msg,
                      "lastTransitionTime": old["lastTransitionTime"] if old else self._now()})
        status["conditions"] = conds
        self.kube.set_status("ReplicaSet", ns, rs["metadata"]["name"], status)

    def _create_pod(self, rs: dict, outcome: str, plan: _Plan) -> None:
        ns = rs["metadata"]["namespace"]
        template = rs["spec"]["template"]
        name = f"{rs['metadata']['name']}-{self._suffix()}"
        tmeta = template.get("metadata") or {}
        meta: dict[str, Any] = {
            "name": name, "generateName": f"{rs['metadata']['name']}-", "namespace": ns,
            "labels": dict(tmeta.get("labels") or {}),
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs["metadata"]["name"],
                                 "uid": rs["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}],
        }
        if tmeta.get("annotations"):
            meta["annotations"] = dict(tmeta["annotations"])
        spec = copy.deepcopy(template.get("spec") or {})
        spec.setdefault("serviceAccountName", "default")
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec,
               "status": {"phase": "Pending", "qosClass": _qos(spec)}}
        pod = self.kube.create(pod)
        self._event(rs, "Normal", "SuccessfulCreate", f"Created pod: {name}", component="replicaset-controller")
        sim = self._new_sim(outcome)
        self._pods[(ns, name)] = sim
        self._kubelet_write(pod, sim, plan)

    # ------------------------------------------------------------------ scheduler and kubelet

    def _new_sim(self, outcome: str) -> _PodSim:
        sim = _PodSim(outcome=outcome, node=self._next_node % len(self.nodes))
        self._next_node += 1
        self._next_ip += 1
        sim.ip = f"10.244.{sim.node + 1}.{self._next_ip % 250 + 2}"
        return sim

    def _advance_pod(self, pod: dict, plan: _Plan) -> None:
        ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        sim = self._pods.get((ns, name))
        if sim is None:  # a pod the controller did not make: treat it as newly created
            sim = self._pods[(ns, name)] = self._new_sim(plan.outcome)
        if sim.terminating or "deletionTimestamp" in pod["metadata"]:
            self.kube.delete("Pod", ns, name)
            self._pods.pop((ns, name), None)
            return
        owner_rs = next((r["name"] for r in pod["metadata"].get("ownerReferences") or [] if r.get("kind") == "ReplicaSet"), None)
        if owner_rs is not None and owner_rs == plan.rs_name:
            sim.outcome = plan.outcome  # the plan's latest word holds for the new ReplicaSet's pods
        sim.stage += 1
        self._kubelet_write(pod, sim, plan)

    def _kubelet_write(self, pod: dict, sim: _PodSim, plan: _Plan) -> None:
        """Write the pod's status for its outcome and stage, with the events of the change."""
        ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        now = self._now()
        node = self.nodes[sim.node]
        spec = pod["spec"]
        old_status = pod.get("status") or {}
        containers = spec.get("containers") or []
        outcome, stage = sim.outcome, sim.stage
        status: dict[str, Any] = {"phase": "Pending", "qosClass": _qos(spec)}

        if outcome == "unschedulable":
            msg = (f"0/{len(self.nodes)} nodes are available: {len(self.nodes)} Insufficient cpu. preemption: "
                   f"0/{len(self.nodes)} nodes are available: {len(self.nodes)} No preemption victims found for "
                   "incoming pod.")
            status["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                     "message": msg, "lastProbeTime": None,
                                     "lastTransitionTime": _keep_time(old_status, "PodScheduled", "False", now)}]
            self.kube.set_status("Pod", ns, name, status, manager="kube-scheduler")
            self._event(pod, "Warning", "FailedScheduling", msg, component="default-scheduler", scheduler=True)
            return

        if not spec.get("nodeName"):
            self.kube.update("Pod", ns, name, lambda o: o["spec"].__setitem__("nodeName", node), manager="kube-scheduler")
            self._event(pod, "Normal", "Scheduled", f"Successfully assigned {ns}/{name} to {node}",
                        component="default-scheduler", scheduler=True)
            pod = self.kube.get("Pod", ns, name) or pod

        statuses = []
        ready_all = True
        ran_before = False
        for c in containers:
            cname, image = c.get("name", ""), c.get("image", "")
            run = sim.containers.setdefault(cname, _Container())
            cs: dict[str, Any] = {"name": cname, "image": image, "imageID": "", "lastState": {},
                                  "ready": False, "restartCount": run.restarts, "started": False}
            field_path = f"spec.containers{{{cname}}}"

            def start(at_restart: bool = False) -> str:
                cid = "containerd://" + self._hex(64)
                run.ids.append(cid)
                for line in plan.logs:
                    self.kube.store.append_log(ns, name, cid, line)
                if not at_restart:
                    self._event(pod, "Normal", "Pulled", f'Container image "{image}" already present on machine',
                                field_path=field_path, host=node)
                    self._event(pod, "Normal", "Created", f"Created container: {cname}", field_path=field_path, host=node)
                    self._event(pod, "Normal", "Started", f"Started container {cname}", field_path=field_path, host=node)
                return cid

            def terminated(cid: str) -> dict:
                return {"containerID": cid, "exitCode": plan.exit_code, "reason": "Error",
                        "startedAt": now, "finishedAt": now}

            if stage == 0:
                cs["state"] = {"waiting": {"reason": "ContainerCreating"}}
            elif outcome in ("ready", "deadline") or (outcome in ("crashloop", "exit1") and stage == 1):
                cid = run.ids[-1] if run.ids and stage > 1 else start()
                cs.update(containerID=cid, imageID=_image_id(image), started=True,
                          state={"running": {"startedAt": now if stage == 1 else _started(old_status, cname, now)}})
                cs["ready"] = outcome == "ready"
                if outcome == "deadline":
                    self._event(pod, "Warning", "Unhealthy",
                                "Readiness probe failed: HTTP probe failed with statuscode: 503",
                                field_path=field_path, host=node)
            elif outcome in ("crashloop", "exit1"):
                ran_before = True
                if stage == 2 or outcome == "exit1":
                    cs.update(containerID=run.ids[-1], imageID=_image_id(image),
                              state={"terminated": terminated(run.ids[-1])})
                else:  # another run crashed: back-off
                    run.restarts += 1
                    cid = start(at_restart=True)
                    backoff = min(10 * 2 ** (run.restarts - 1), 300)
                    back = f"{backoff // 60}m{backoff % 60}s" if backoff >= 60 else f"{backoff}s"
                    uid = pod["metadata"]["uid"]
                    cs.update(containerID=cid, imageID=_image_id(image), restartCount=run.restarts,
                              lastState={"terminated": terminated(cid)},
                              state={"waiting": {"reason": "CrashLoopBackOff", "message":
                                                 f"back-off {back} restarting failed container={cname} "
                                                 f"pod={name}_{ns}({uid})"}})
                    self._event(pod, "Warning", "BackOff",
                                f"Back-off restarting failed container {cname} in pod {name}_{ns}({uid})",
                                field_path=field_path, host=node)
            elif outcome == "imagepull":
                if stage == 1:
                    err = (f'rpc error: code = NotFound desc = failed to pull and unpack image "{image}": failed to '
                           f'resolve reference "{image}": {image}: not found')
                    cs["state"] = {"waiting": {"reason": "ErrImagePull", "message": err}}
                    self._event(pod, "Warning", "Failed", f'Failed to pull image "{image}": {err}',
                                field_path=field_path, host=node)
                    self._event(pod, "Warning", "Failed", "Error: ErrImagePull", field_path=field_path, host=node)
                else:
                    cs["state"] = {"waiting": {"reason": "ImagePullBackOff",
                                               "message": f'Back-off pulling image "{image}"'}}
                    self._event(pod, "Normal", "BackOff", f'Back-off pulling image "{image}"',
                                field_path=field_path, host=node)
                    self._event(pod, "Warning", "Failed", "Error: ImagePullBackOff", field_path=field_path, host=node)
            elif outcome == "createcontainerconfig":
                secret = _first_secret(spec, c) or "missing"
                cs["state"] = {"waiting": {"reason": "CreateContainerConfigError",
                                           "message": f'secret "{secret}" not found'}}
                self._event(pod, "Warning", "Failed", f'Error: secret "{secret}" not found',
                            field_path=field_path, host=node)
            elif outcome == "runcontainer":
                cmd = (c.get("command") or ["/opt/mlbuild/bin/serve"])[0]
                err = ("failed to create containerd task: failed to create shim task: OCI runtime create failed: "
                       "runc create failed: unable to start container process: error during container init: "
                       f'exec: "{cmd}": stat {cmd}: no such file or directory: unknown')
                cs["state"] = {"waiting": {"reason": "RunContainerError", "message": err}}
                self._event(pod, "Warning", "Failed", f"Error: {err}", field_path=field_path, host=node)
            ready_all = ready_all and cs["ready"]
            statuses.append(cs)

        started_any = any("running" in cs["state"] for cs in statuses)
        status["phase"] = "Running" if (started_any or ran_before) else "Pending"
        not_ready = [cs["name"] for cs in statuses if not cs["ready"]]
        ready = "True" if ready_all and statuses else "False"
        conds = [
            {"type": "PodReadyToStartContainers", "status": "True" if stage > 0 else "False"},
            {"type": "Initialized", "status": "True"},
            {"type": "Ready", "status": ready},
            {"type": "ContainersReady", "status": ready},
            {"type": "PodScheduled", "status": "True"},
        ]
        for cond in conds:
            cond["lastProbeTime"] = None
            cond["lastTransitionTime"] = _keep_time(old_status, cond["type"], cond["status"], now)
            if cond["type"] in ("Ready", "ContainersReady") and ready == "False":
                cond["reason"] = "ContainersNotReady"
                cond["message"] = f"containers with unready status: [{' '.join(not_ready)}]"
        status.update(conditions=conds, containerStatuses=statuses, hostIP=f"172.18.0.{sim.node + 2}",
                      hostIPs=[{"ip": f"172.18.0.{sim.node + 2}"}], startTime=old_status.get("startTime", now))
        if stage > 0:
            status.update(podIP=sim.ip, podIPs=[{"ip": sim.ip}])
        self.kube.set_status("Pod", ns, name, status, manager="kubelet")

    # ------------------------------------------------------------------ status

    def _update_replicaset_status(self, rs: dict) -> None:
        ns = rs["metadata"]["namespace"]
        rs = self.kube.get("ReplicaSet", ns, rs["metadata"]["name"]) or rs
        pods = [p for p in self._pods_of(ns, rs["metadata"]["uid"]) if "deletionTimestamp" not in p["metadata"]]
        selector = rs["spec"]["template"]["metadata"].get("labels") or {}
        status = {k: v for k, v in (rs.get("status") or {}).items() if k == "conditions"}
        status["replicas"] = len(pods)
        counts = {
            "fullyLabeledReplicas": sum(1 for p in pods if all((p["metadata"].get("labels") or {}).get(k) == v
                                                               for k, v in selector.items())),
            "readyReplicas": sum(1 for p in pods if _ready(p)),
            "availableReplicas": sum(1 for p in pods if _ready(p)),
        }
        status.update({k: v for k, v in counts.items() if v})
        status["observedGeneration"] = rs["metadata"].get("generation", 1)
        if status != rs.get("status"):
            self.kube.set_status("ReplicaSet", ns, rs["metadata"]["name"], status)

    def _update_deployment_status(self, namespace: str, name: str) -> None:
        dep = self._deployment(namespace, name)
        plan = self._plans.setdefault((namespace, name), _Plan())
        spec = dep["spec"]
        desired = spec.get("replicas", 1)
        rss = self._replicasets(namespace, dep["metadata"]["uid"])
        new = next((rs for rs in rss if rs["metadata"]["name"] == plan.rs_name), None)
        old_status = dep.get("status") or {}
        st = lambda rs, k: (rs.get("status") or {}).get(k, 0)  # noqa: E731
        available = sum(st(rs, "availableReplicas") for rs in rss)
        total_spec = sum(rs["spec"].get("replicas", 0) for rs in rss)
        counts = {
            "observedGeneration": dep["metadata"].get("generation", 1),
            "replicas": sum(st(rs, "replicas") for rs in rss),
            "updatedReplicas": st(new, "replicas") if new else 0,
            "readyReplicas": sum(st(rs, "readyReplicas") for rs in rss),
            "availableReplicas": available,
            "unavailableReplicas": max(total_spec - available, 0),
        }
        status: dict[str, Any] = {k: v for k, v in counts.items() if v}
        if old_status.get("collisionCount"):
            status["collisionCount"] = old_status["collisionCount"]
        conds = {c["type"]: c for c in old_status.get("conditions") or []}
        now = self._now()
        ru = (spec.get("strategy") or {}).get("rollingUpdate") or {}
        max_unavailable = 0 if (spec.get("strategy") or {}).get("type") == "Recreate" else \
            _int_or_percent(ru.get("maxUnavailable", "25%"), desired, False)
        if available >= desired - max_unavailable:
            _set_cond(conds, "Available", "True", "MinimumReplicasAvailable", "Deployment has minimum availability.", now)
        else:
            _set_cond(conds, "Available", "False", "MinimumReplicasUnavailable",
                      "Deployment does not have minimum availability.", now)
        cur = conds.get("Progressing")
        rs_name = new["metadata"]["name"] if new else name
        complete_before = cur is not None and cur.get("reason") == "NewReplicaSetAvailable" and \
            counts["replicas"] == counts["updatedReplicas"]
        if not complete_before:
            old_old = old_status.get("replicas", 0) - old_status.get("updatedReplicas", 0)
            new_old = counts["replicas"] - counts["updatedReplicas"]
            if counts["updatedReplicas"] == desired and counts["replicas"] == desired and available == desired:
                _set_cond(conds, "Progressing", "True", "NewReplicaSetAvailable",
                          f'ReplicaSet "{rs_name}" has successfully progressed.', now)
            elif (counts["updatedReplicas"] > old_status.get("updatedReplicas", 0) or new_old < old_old
                  or counts["readyReplicas"] > old_status.get("readyReplicas", 0)
                  or available > old_status.get("availableReplicas", 0)):
                _set_cond(conds, "Progressing", "True", "ReplicaSetUpdated", f'ReplicaSet "{rs_name}" is progressing.',
                          now, always_touch=True)
            elif plan.expired or (cur is not None and cur.get("reason") == "ProgressDeadlineExceeded"):
                _set_cond(conds, "Progressing", "False", "ProgressDeadlineExceeded",
                          f'ReplicaSet "{rs_name}" has timed out progressing.', now)
        failure = next((c for rs in rss for c in (rs.get("status") or {}).get("conditions") or []
                        if c.get("type") == "ReplicaFailure" and c.get("status") == "True"), None)
        if failure:
            _set_cond(conds, "ReplicaFailure", "True", failure.get("reason", "FailedCreate"), failure.get("message", ""), now)
        else:
            conds.pop("ReplicaFailure", None)
        order = ["Available", "Progressing", "ReplicaFailure"]
        status["conditions"] = [conds[t] for t in order if t in conds]
        if status != old_status:
            self.kube.set_status("Deployment", namespace, name, status)

    def _set_condition(self, namespace: str, name: str, type_: str, status: str, reason: str, message: str) -> None:
        dep = self._deployment(namespace, name)
        st = copy.deepcopy(dep.get("status") or {})
        conds = {c["type"]: c for c in st.get("conditions") or []}
        _set_cond(conds, type_, status, reason, message, self._now(), always_touch=True)
        st["conditions"] = [conds[t] for t in ("Available", "Progressing", "ReplicaFailure") if t in conds]
        self.kube.set_status("Deployment", namespace, name, st)

    # ------------------------------------------------------------------ events

    def _event(self, involved: dict, type_: str, reason: str, message: str, *, component: str = "kubelet",
               host: str | None = None, field_path: str | None = None, scheduler: bool = False) -> None:
        """Record an Event the way its component does; a repeat raises ``count``."""
        meta = involved["metadata"]
        ns = meta.get("namespace", "default")
        now = self._now()
        for ev in self.kube.list("Event", ns, fields=f"involvedObject.uid={meta['uid']}"):
            if ev.get("reason") == reason and ev.get("message") == message and ev.get("type") == type_:
                def bump(o: dict) -> None:
                    if o.get("series") is not None or scheduler:
                        series = o.setdefault("series", {"count": 1})
                        series["count"] += 1
                        series["lastObservedTime"] = rfc3339_nano(self.kube.store.clock())
                    else:
                        o["count"] = o.get("count", 1) + 1
                        o["lastTimestamp"] = now
                self.kube.update("Event", ns, ev["metadata"]["name"], bump, manager=component)
                return
        ref = {"apiVersion": involved.get("apiVersion", "v1"), "kind": involved.get("kind", "Pod"),
               "name": meta["name"], "namespace": ns, "uid": meta["uid"],
               "resourceVersion": meta.get("resourceVersion", "")}
        if field_path:
            ref["fieldPath"] = field_path
        ev: dict[str, Any] = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{self._hex(16)}", "namespace": ns},
            "involvedObject": ref, "reason": reason, "message": message, "type": type_,
            "reportingComponent": component,
        }
        if scheduler:  # events.k8s.io/v1 seen through core/v1
            ev.update(eventTime=rfc3339_nano(self.kube.store.clock()), firstTimestamp=None, lastTimestamp=None,
                      action="Scheduling", reportingInstance=f"{component}-kind-control-plane", source={})
        else:
            source = {"component": component}
            if host:
                source["host"] = host
            ev.update(count=1, firstTimestamp=now, lastTimestamp=now, eventTime=None, source=source,
                      reportingInstance=host or "")
        self.kube.create(ev, manager=component)

    # ------------------------------------------------------------------ small helpers

    def _now(self) -> str:
        return rfc3339(self.kube.store.clock())

    def _suffix(self) -> str:
        return "".join(self._rand.choice(_ALNUM) for _ in range(5))

    def _hex(self, n: int) -> str:
        return "".join(self._rand.choice("0123456789abcdef") for _ in range(n))


def _set_cond(conds: dict, type_: str, status: str, reason: str, message: str, now: str,
              always_touch: bool = False) -> None:
    """upstream's SetDeploymentCondition: the transition time moves only with the status;
    the update time with a new reason (or always, for progress)."""
    cur = conds.get(type_)
    if cur and cur.get("status") == status and cur.get("reason") == reason and cur.get("message") == message \
            and not always_touch:
        return
    conds[type_] = {
        "type": type_, "status": status,
        "lastUpdateTime": now,
        "lastTransitionTime": cur["lastTransitionTime"] if cur and cur.get("status") == status else now,
        "reason": reason, "message": message,
    }


def _complete(dep: dict) -> bool:
    status = dep.get("status") or {}
    desired = dep["spec"].get("replicas", 1)
    return (status.get("observedGeneration", 0) >= dep["metadata"].get("generation", 1)
            and status.get("updatedReplicas", 0) == desired and status.get("replicas", 0) == desired
            and status.get("availableReplicas", 0) == desired)


def _ready(pod: dict) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def _neg_time(ts: str) -> tuple:
    return tuple(-ord(ch) for ch in ts)


def _keep_time(old_status: dict, type_: str, status: str, now: str) -> str:
    for c in old_status.get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == status and c.get("lastTransitionTime"):
            return c["lastTransitionTime"]
    return now


def _started(old_status: dict, container: str, now: str) -> str:
    for cs in old_status.get("containerStatuses") or []:
        if cs.get("name") == container:
            return ((cs.get("state") or {}).get("running") or {}).get("startedAt", now)
    return now


def _image_id(image: str) -> str:
    if "@" in image:
        return image
    repo = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
    return f"{repo}@sha256:{hashlib.sha256(image.encode()).hexdigest()}"


def _first_secret(spec: dict, container: dict) -> str | None:
    for env in container.get("env") or []:
        ref = ((env.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name")
        if ref:
            return ref
    for src in container.get("envFrom") or []:
        ref = (src.get("secretRef") or {}).get("name")
        if ref:
            return ref
    for vol in spec.get("volumes") or []:
        ref = (vol.get("secret") or {}).get("secretName")
        if ref:
            return ref
    return None


def _qos(spec: dict) -> str:
    containers = spec.get("containers") or []
    reqs = [((c.get("resources") or {}).get("requests") or {}) for c in containers]
    lims = [((c.get("resources") or {}).get("limits") or {}) for c in containers]
    if not any(reqs) and not any(lims):
        return "BestEffort"
    if all(l.get("cpu") and l.get("memory") and (not r or r == {k: l[k] for k in r}) for r, l in zip(reqs, lims)):
        return "Guaranteed"
    return "Burstable"
