"""The rollout verdict: what a Deployment, its pods and their events say about a service.

Pure functions over the plain dicts the API server returns (``kubectl get -o json``, or
the raw JSON of any client: camelCase keys), with no client and no I/O::

    Deployment ─┐
    its pods ───┼─▶ evaluate()  ─▶ Verdict   the deploy's wait: done? failed? why?
    events ─────┘   status_of() ─▶ Verdict   ``mlbuild status`` of a deployed service

    Deployment, ReplicaSets ─▶ revision_hash_of() ─▶ which pods are the new ones

The code that watches the cluster stays thin: it lists, calls one of these, prints the
reason, and on ``failed`` fetches the last log lines of ``failing_pod``/``failing_container``
and rolls back. Everything that decides is here, tested on API documents of each moment
of a rollout (tests/unit/kube_fixtures/).

Two sources, each matched on purpose:

* kubectl's rollout rule (``polymorphichelpers/rollout_status.go``, DeploymentStatusViewer):
  once ``metadata.generation`` is observed, a Progressing condition with reason
  ProgressDeadlineExceeded is a failure; otherwise the rollout waits while fewer replicas
  are updated than ``spec.replicas``, while old replicas remain (``status.replicas >
  updatedReplicas``), and while fewer updated replicas are available than updated. Done
  when none of these holds. It alone decides ``done``.
* Skaffold's pod diagnosis (``pkg/diag/validator/validator.go``, ``resource/deployment.go``):
  a pod that is not Ready is looked at container by container, init containers first, and
  some states are unrecoverable -- the image cannot be pulled, the container crash-loops,
  cannot be created or started, or exited non-zero. Waiting longer only burns the progress
  deadline, so the deploy fails fast on them.

Choices where the sources leave room:

* Unschedulable pods do not fail the deploy by themselves (``failed`` False): as in Skaffold,
  the wait goes on, because a cluster autoscaler adding a node or a PersistentVolume binding
  resolves them without any change from us; the progress deadline bounds the wait. When the
  deadline passes while new pods are unschedulable, the verdict says Unschedulable (with
  ``failed`` True), since the scheduler's message tells what to change, not the deadline.
* Pods are judged only once the generation is observed: before that the controller has not
  acted on the new spec, and a ProgressDeadlineExceeded condition may be left over from the
  last rollout (kubectl ignores it too).
* Pods that are terminating (``deletionTimestamp``) or finished (phase Succeeded/Failed, an
  evicted pod) are not judged: the ReplicaSet replaces them, and a pod stopped by SIGTERM
  exits non-zero without anything being wrong.
* Beyond Skaffold's list, InvalidImageName and ErrImageNeverPull count as image pull
  failures (the kubelet never retries them), and a container whose *last* run ended with a
  non-zero code and that is not ready again counts as "exited non-zero" (a new pod that
  crashed once will crash again: the next state is CrashLoopBackOff after a back-off).
  CreateContainerError is only a warning: the kubelet retries it and it is often transient
  (a name conflict, a runtime timeout); kubectl shows it as a warning too.
* A ReplicaSet that cannot create pods (reason FailedCreate: a quota, an admission webhook)
  fails the deploy, seen either as a Warning event on the new ReplicaSet or as the
  ReplicaFailure condition the Deployment controller copies from it. With ``maxUnavailable:
  0`` the old pods do not make room, so it would not resolve before the deadline.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable, Mapping, Sequence

from mlbuild.backends.process import FAILED, HEALTHY, TRANSITIONING, UNHEALTHY, UNSCHEDULABLE

POD_TEMPLATE_HASH = "pod-template-hash"  # the label telling a ReplicaSet's pods apart
REVISION_ANNOTATION = "deployment.kubernetes.io/revision"
TIMED_OUT = "ProgressDeadlineExceeded"  # kubectl's deploymentutil.TimedOutReason
COMPLETE = "NewReplicaSetAvailable"  # the Progressing reason of a finished rollout
FAILED_CREATE = "FailedCreate"

IMAGE_PULL_REASONS = frozenset({
    "ErrImagePull", "ImagePullBackOff", "ErrImagePullBackOff",  # Skaffold's
    "InvalidImageName", "ErrImageNeverPull",  # never retried by the kubelet
})
CRASH_LOOP = "CrashLoopBackOff"
CREATE_CONFIG_ERROR = "CreateContainerConfigError"  # a missing Secret/ConfigMap (key)
RUN_CONTAINER_ERROR = "RunContainerError"  # the runtime could not start the process
# Waiting reasons on the way up: not a problem, not worth a warning.
_STARTING = frozenset({"ContainerCreating", "PodInitializing"})

# A ReplicaSet's name is the Deployment's, a dash and its pod-template-hash, written with
# the alphabet of apimachinery's rand.SafeEncodeString.
_HASH = re.compile(r"[bcdfghjklmnpqrstvwxz2456789]+")
_NEVER = datetime.min.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class Verdict:
    """What the Deployment and its pods say, in mlbuild's service states.

    Attributes:
        state: Transitioning, Healthy, Unhealthy, Unschedulable or Failed.
        done: the rollout is complete by kubectl's rule (the state is Healthy).
        failed: it will not get better without a change: an unrecoverable pod, pods that
            cannot be created, or the progress deadline passed. The deploy stops and rolls
            back on it; the state is Failed, or Unschedulable/Unhealthy when that says more.
        reason: one line for a person ("2 of 3 updated replicas available",
            "pod diabetes-7d4f8c9b65-x7k2p: container diabetes is crash-looping: ...").
        message: Kubernetes' own words behind the reason (the scheduler's message, the
            kubelet's waiting message, a termination message, an event), or "".
        cause: the reason as a keyword, Kubernetes' where it has one (ErrImagePull,
            CrashLoopBackOff, Unschedulable, FailedCreate, ProgressDeadlineExceeded, ...),
            else mlbuild's (Progressing, NotObserved, Complete, NotReady, Exited).
        ready / desired / updated / available: replicas, from the Deployment's status and
            ``spec.replicas``.
        restarts: container restarts summed over the pods judged.
        image: the image of the pod template's first container.
        failing_pod: the pod the reason is about, when it is about one.
        failing_container: the container whose last log lines explain the failure; None
            when it never ran (an image pull error), so there are no logs to show.
        logs_previous: those lines are the previous run's (``kubectl logs --previous``):
            the container is waiting to restart or already running again.
    """

    state: str
    done: bool
    failed: bool
    reason: str
    message: str = ""
    cause: str = ""
    ready: int = 0
    desired: int = 0
    updated: int = 0
    available: int = 0
    restarts: int = 0
    image: str | None = None
    failing_pod: str | None = None
    failing_container: str | None = None
    logs_previous: bool = False


@dataclass(frozen=True)
class _Problem:
    """Why one pod is not ready (Skaffold's per-pod ActionableErr)."""

    pod: str
    cause: str
    reason: str
    message: str = ""
    fatal: bool = False
    unschedulable: bool = False
    container: str | None = None  # set only when the container has logs
    previous: bool = False


def evaluate(deployment: Mapping, pods: Iterable[Mapping] = (), events: Iterable[Mapping] = (),
             *, revision_hash: str | None = None, since: str | None = None) -> Verdict:
    """Judge a rollout in progress: done, failed, or still transitioning, and why.

    kubectl's rule decides ``done``; the pods decide ``failed`` before the deadline does.
    Call it on every poll or watch event with fresh objects; it keeps no state.

    Args:
        deployment: the Deployment as the API server returns it (with ``status``).
        pods: the Deployment's pods. Either only those of its new ReplicaSet
            (``revision_hash`` None), or all its selector matches, old ones included, with
            ``revision_hash`` telling the new ones apart.
        events: core/v1 Events of the namespace, or of the new ReplicaSet and its pods;
            others are ignored. Warning events on a pod explain a pod that is not ready;
            FailedCreate on the new ReplicaSet fails the rollout.
        revision_hash: the new ReplicaSet's ``pod-template-hash`` label (see
            :func:`revision_hash_of`). Pods with another hash are old and not judged.
        since: the apply's time, as the server's clock tells it (RFC 3339, or a
            ``datetime.isoformat()``): ReplicaSet events last seen before it are ignored.
            A rollout back to an earlier template reuses its ReplicaSet, whose events from
            the earlier attempt live on for an hour.

    Returns:
        The verdict: Healthy and done, Failed/Unschedulable and failed, or Transitioning
        (Unschedulable while the scheduler cannot place a new pod).
    """
    events = list(events)
    d, base, problems, fatal, unschedulable, early = _look(deployment, pods, events,
                                                          revision_hash)
    if early is not None:
        return early
    waiting = d.waiting()
    if waiting is None:
        return Verdict(HEALTHY, True, False, "successfully rolled out", cause="Complete", **base)
    if fatal:
        return _problem_verdict(FAILED, fatal, base)
    failed_create = _failed_create(deployment, events, revision_hash, since)
    if failed_create:
        rs, message = failed_create
        return Verdict(FAILED, False, True, f"{rs} cannot create pods: {message}",
                       message, FAILED_CREATE, **base)
    if unschedulable:
        return _unschedulable_verdict(waiting, unschedulable, base, failed=False)
    return _transitioning(waiting, problems, base)


def _look(deployment: Mapping, pods: Iterable[Mapping], events: Iterable[Mapping],
          revision_hash: str | None):
    """What :func:`evaluate` and :func:`status_of` both read first: the counts, the
    judged pods' problems, and the verdict that needs nothing more (the spec not observed
    yet, or the progress deadline passed), else None."""
    d = _Counts.of(deployment)
    judged = _judged(pods, revision_hash)
    base = dict(d.fields(), restarts=_restarts(judged))
    if not d.observed:
        return d, base, [], None, [], Verdict(TRANSITIONING, False, False,
                                              d.not_observed_reason, cause="NotObserved",
                                              **base)
    problems = _problems(judged, list(events))
    fatal = next((p for p in problems if p.fatal), None)
    unschedulable = [p for p in problems if p.unschedulable]
    progressing = _condition(deployment, "Progressing")
    early = None
    if progressing and progressing.get("reason") == TIMED_OUT:
        early = _deadline_verdict(d, progressing, fatal, unschedulable, base)
    return d, base, problems, fatal, unschedulable, early


def status_of(deployment: Mapping, pods: Iterable[Mapping] = (), events: Iterable[Mapping] = (),
              *, revision_hash: str | None = None) -> Verdict:
    """The state of a deployed service, for ``mlbuild status``.

    Unlike :func:`evaluate`, a Deployment whose rollout finished can be Unhealthy: it asks
    whether the service serves as declared now, not whether a rollout may still finish::

        spec not observed yet                          Transitioning
        progress deadline passed                       Failed (Unschedulable if that is why)
        a pod unrecoverable, none ready                Failed
        a pod unrecoverable, some ready                Unhealthy  (failed: needs a change)
        pods cannot be created (ReplicaFailure)        the same
        a pod the scheduler cannot place               Unschedulable
        kubectl's rule: complete                       Healthy
        a rollout or scale-up under way                Transitioning
        otherwise (fewer available than desired)       Unhealthy, with the first pod's reason

    Args:
        deployment: the Deployment as the API server returns it.
        pods: its pods (see :func:`evaluate`).
        events: Warning events on the pods explain a pod that is not ready (ReplicaSet
            events are not read: the Deployment's ReplicaFailure condition is current).
        revision_hash: see :func:`evaluate`.

    Returns:
        The verdict; ``done`` and ``failed`` keep :func:`evaluate`'s meaning.
    """
    events = list(events)
    d, base, problems, fatal, unschedulable, early = _look(deployment, pods, events,
                                                          revision_hash)
    if early is not None:
        return early
    if fatal:
        return _problem_verdict(FAILED if d.ready == 0 else UNHEALTHY, fatal, base,
                                prefix=f"{d.ready} of {d.desired} replicas ready; ")
    # Only the condition: it is the controller's current word, while the events of a
    # FailedCreate that has since resolved live on for an hour.
    failed_create = _failed_create(deployment, (), revision_hash, None)
    if failed_create:
        rs, message = failed_create
        return Verdict(FAILED if d.ready == 0 else UNHEALTHY, False, True,
                       f"{d.ready} of {d.desired} replicas ready; {rs} cannot create pods: "
                       f"{message}", message, FAILED_CREATE, **base)
    waiting = d.waiting()
    if unschedulable:
        return _unschedulable_verdict(waiting or f"{d.ready} of {d.desired} replicas ready",
                                      unschedulable, base, failed=False)
    if waiting is None:
        return Verdict(HEALTHY, True, False, f"{d.available} of {d.desired} replicas available",
                       cause="Complete", **base)
    progressing = _condition(deployment, "Progressing")
    rolling = progressing is not None and progressing.get("reason") != COMPLETE
    if rolling or d.updated < (d.spec_replicas or 0) or d.replicas > d.updated:
        return _transitioning(waiting, problems, base)
    reason = f"{d.ready} of {d.desired} replicas ready"
    if not problems:  # the Deployment's count is ahead of the pods listed
        return Verdict(UNHEALTHY, False, False, reason, cause="NotReady", **base)
    first = problems[0]
    return Verdict(UNHEALTHY, False, False, f"{reason}; pod {first.pod}: {first.reason}",
                   first.message, first.cause, failing_pod=first.pod, **base)


def revision_hash_of(deployment: Mapping, replica_sets: Iterable[Mapping]) -> str | None:
    """The ``pod-template-hash`` of the Deployment's new ReplicaSet, for :func:`evaluate`.

    The new ReplicaSet is the one the Deployment controls whose revision annotation equals
    the Deployment's: the controller writes both when it creates or adopts it, in the same
    sync that records ``observedGeneration``.

    Args:
        deployment: the Deployment as the API server returns it.
        replica_sets: ReplicaSets of its namespace (a list by its selector will do).

    Returns:
        The hash, or None while the generation is not observed or the new ReplicaSet is
        not in the list yet (then judge no pods: pass none, or all but old ones).
    """
    if not _Counts.of(deployment).observed:
        return None
    meta = deployment.get("metadata") or {}
    revision = (meta.get("annotations") or {}).get(REVISION_ANNOTATION)
    if revision is None:
        return None
    for rs in replica_sets:
        rs_meta = rs.get("metadata") or {}
        if not _controlled_by(rs_meta, meta):
            continue
        if (rs_meta.get("annotations") or {}).get(REVISION_ANNOTATION) == revision:
            return (rs_meta.get("labels") or {}).get(POD_TEMPLATE_HASH)
    return None


# --- the Deployment -------------------------------------------------------------------


@dataclass(frozen=True)
class _Counts:
    """The numbers kubectl's rule reads; the API server omits zeros, so all default to 0."""

    generation: int
    observed_generation: int
    spec_replicas: int | None
    replicas: int
    updated: int
    ready: int
    available: int
    image: str | None
    deadline_s: int

    @classmethod
    def of(cls, deployment: Mapping) -> _Counts:
        meta = deployment.get("metadata") or {}
        spec = deployment.get("spec") or {}
        status = deployment.get("status") or {}
        containers = ((spec.get("template") or {}).get("spec") or {}).get("containers") or []
        return cls(
            generation=meta.get("generation", 0),
            observed_generation=status.get("observedGeneration", 0),
            spec_replicas=spec.get("replicas"),
            replicas=status.get("replicas", 0),
            updated=status.get("updatedReplicas", 0),
            ready=status.get("readyReplicas", 0),
            available=status.get("availableReplicas", 0),
            image=containers[0].get("image") if containers else None,
            deadline_s=spec.get("progressDeadlineSeconds", 600),
        )

    @property
    def observed(self) -> bool:
        return self.generation <= self.observed_generation

    @property
    def desired(self) -> int:
        # The API server defaults spec.replicas to 1; kubectl skips its check without one.
        return 1 if self.spec_replicas is None else self.spec_replicas

    @property
    def not_observed_reason(self) -> str:
        return (f"waiting for the spec update to be observed (generation {self.generation}, "
                f"observed {self.observed_generation})")

    def fields(self) -> dict:
        return dict(ready=self.ready, desired=self.desired, updated=self.updated,
                    available=self.available, image=self.image)

    def waiting(self) -> str | None:
        """kubectl's rule once the generation is observed and the deadline has not passed:
        what the rollout waits for, or None when it is complete."""
        if self.spec_replicas is not None and self.updated < self.spec_replicas:
            return f"{self.updated} of {self.spec_replicas} replicas updated"
        if self.replicas > self.updated:
            old = self.replicas - self.updated
            return f"waiting for {old} old replica{'s' if old != 1 else ''} to terminate"
        if self.available < self.updated:
            return f"{self.available} of {self.updated} updated replicas available"
        return None


def _condition(obj: Mapping, kind: str) -> Mapping | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind:
            return c
    return None


def _controlled_by(meta: Mapping, owner_meta: Mapping) -> bool:
    """Is the object with ``meta`` controlled by the Deployment with ``owner_meta``?

    By uid when both have one; by name for objects without (rendered, not applied)."""
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") != "Deployment" or not ref.get("controller"):
            continue
        if ref.get("uid") and owner_meta.get("uid"):
            return ref["uid"] == owner_meta["uid"]
        return ref.get("name") == owner_meta.get("name")
    return False


def _deadline_verdict(d: _Counts, cond: Mapping, fatal: _Problem | None,
                      unschedulable: list[_Problem], base: dict) -> Verdict:
    """kubectl: "deployment exceeded its progress deadline" -- with the pod that says why."""
    said = f"rollout made no progress within its deadline of {d.deadline_s} s"
    if fatal:
        return _problem_verdict(FAILED, fatal, base, prefix=f"{said}; ")
    if unschedulable:
        return _unschedulable_verdict(said, unschedulable, base, failed=True)
    return Verdict(FAILED, False, True, said, cond.get("message", ""), TIMED_OUT, **base)


def _transitioning(waiting: str, problems: list[_Problem], base: dict) -> Verdict:
    """Still on its way; like kubectl's "(Warning: ...)", name the first pod's trouble."""
    said = next((p for p in problems if p.cause != "NotReady"), None)
    if said is None:
        return Verdict(TRANSITIONING, False, False, waiting, cause="Progressing", **base)
    return Verdict(TRANSITIONING, False, False, f"{waiting}; pod {said.pod}: {said.reason}",
                   said.message, "Progressing", failing_pod=said.pod, **base)


def _problem_verdict(state: str, p: _Problem, base: dict, prefix: str = "") -> Verdict:
    return Verdict(state, False, p.fatal, f"{prefix}pod {p.pod}: {p.reason}", p.message, p.cause,
                   failing_pod=p.pod, failing_container=p.container, logs_previous=p.previous,
                   **base)


def _unschedulable_verdict(waiting: str, pods: list[_Problem], base: dict, *,
                           failed: bool) -> Verdict:
    first = pods[0]
    count = f"{len(pods)} pod{'s' if len(pods) != 1 else ''} cannot be scheduled"
    return Verdict(UNSCHEDULABLE, False, failed, f"{waiting}; {count}: {first.message}",
                   first.message, "Unschedulable", failing_pod=first.pod, **base)


def _failed_create(deployment: Mapping, events: Iterable[Mapping], revision_hash: str | None,
                   since: str | None) -> tuple[str, str] | None:
    """(ReplicaSet, message) when the new ReplicaSet cannot create its pods, else None."""
    d_name = (deployment.get("metadata") or {}).get("name", "")
    cond = _condition(deployment, "ReplicaFailure")
    if cond and cond.get("status") == "True" and cond.get("reason") == FAILED_CREATE:
        rs = f"ReplicaSet {d_name}-{revision_hash}" if revision_hash else "the new ReplicaSet"
        return rs, cond.get("message", "")
    latest = None
    for e in events:
        obj = e.get("involvedObject") or {}
        if (e.get("type") != "Warning" or e.get("reason") != FAILED_CREATE
                or obj.get("kind") != "ReplicaSet"):
            continue
        rs = obj.get("name", "")
        if revision_hash is not None:
            if rs != f"{d_name}-{revision_hash}":
                continue
        elif not (rs.startswith(f"{d_name}-") and _HASH.fullmatch(rs[len(d_name) + 1:])):
            continue
        if since is not None and _when(e) < _instant(since):
            continue
        if latest is None or _when(e) > _when(latest):
            latest = e
    if latest is None:
        return None
    return f"ReplicaSet {latest['involvedObject']['name']}", latest.get("message", "")


# --- the pods -------------------------------------------------------------------------


def _judged(pods: Iterable[Mapping], revision_hash: str | None) -> list[Mapping]:
    """The pods whose state counts: the new ReplicaSet's, alive, not on their way out."""
    out = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        if revision_hash is not None and \
                (meta.get("labels") or {}).get(POD_TEMPLATE_HASH) != revision_hash:
            continue
        if meta.get("deletionTimestamp"):
            continue
        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            continue
        out.append(pod)
    return out


def _restarts(pods: Sequence[Mapping]) -> int:
    return sum(cs.get("restartCount", 0)
               for pod in pods
               for _, cs in _statuses(pod))


def _statuses(pod: Mapping) -> list[tuple[bool, Mapping]]:
    """(init?, status) of each container, init containers first: they run first, so
    their trouble comes first."""
    status = pod.get("status") or {}
    return [*((True, cs) for cs in status.get("initContainerStatuses") or []),
            *((False, cs) for cs in status.get("containerStatuses") or [])]


def _problems(pods: Sequence[Mapping], events: Sequence[Mapping]) -> list[_Problem]:
    found = (_diagnose(pod, events) for pod in pods)
    return [p for p in found if p is not None]


def _diagnose(pod: Mapping, events: Sequence[Mapping]) -> _Problem | None:
    """Why a pod is not ready, or None when it is ready (Skaffold's getPodStatus)."""
    meta = pod.get("metadata") or {}
    name = meta.get("name", "")
    conditions = {c.get("type"): c for c in (pod.get("status") or {}).get("conditions") or []}
    if (conditions.get("Ready") or {}).get("status") == "True":
        return None

    scheduled = conditions.get("PodScheduled") or {}
    if scheduled.get("status") == "False":
        if scheduled.get("reason") == "Unschedulable":
            said = scheduled.get("message") or _latest_warning(events, meta, "FailedScheduling")
            return _Problem(name, "Unschedulable", f"cannot be scheduled: {said}", said or "",
                            unschedulable=True)
        why = scheduled.get("reason") or "Pending"  # SchedulingGated, or not tried yet
        return _Problem(name, why, f"not scheduled yet ({why})", scheduled.get("message", ""))

    warning = None
    for init, cs in _statuses(pod):
        p = _container_problem(name, cs, init=init)
        if p is not None and p.fatal:
            return p
        warning = warning or p
    if warning is not None:
        return warning
    event = _latest_warning_event(events, meta)
    if event is not None:
        text = event.get("message", "").strip()
        return _Problem(name, event.get("reason", ""), f"{event.get('reason')}: {text}", text)
    return _Problem(name, "NotReady", "not ready yet")


def _container_problem(pod: str, cs: Mapping, *, init: bool) -> _Problem | None:
    """Skaffold's getContainerStatus and extractErrorMessageFromWaitingContainerStatus."""
    who = f"{'init container' if init else 'container'} {cs.get('name')}"
    state = cs.get("state") or {}
    waiting, terminated = state.get("waiting"), state.get("terminated")
    last = (cs.get("lastState") or {}).get("terminated")
    has_run = last is not None  # a previous run left logs behind

    if waiting is not None:
        reason, text = waiting.get("reason", ""), (waiting.get("message") or "").strip()
        logs = dict(container=cs.get("name") if has_run else None, previous=has_run)
        if reason in IMAGE_PULL_REASONS:
            return _Problem(pod, reason,
                            f"{who} cannot pull its image {cs.get('image')}: {reason}", text,
                            fatal=True, **logs)
        if reason == CRASH_LOOP:
            ended = _exit(last) if last else "exited"
            restarts = cs.get("restartCount", 0)
            return _Problem(pod, reason, f"{who} is crash-looping: {ended}, restarted {restarts} "
                            f"time{'s' if restarts != 1 else ''}",
                            ((last or {}).get("message") or text).strip(), fatal=True, **logs)
        if reason == CREATE_CONFIG_ERROR:
            return _Problem(pod, reason, f"{who} cannot be created: {reason}: {text}", text,
                            fatal=True, **logs)
        if reason == RUN_CONTAINER_ERROR:
            return _Problem(pod, reason, f"{who} cannot be started: {reason}", text, fatal=True,
                            **logs)
        if last is not None and last.get("exitCode", 0) != 0:
            return _exited(pod, who, cs, last, previous=True)
        if reason in _STARTING:
            return None
        return _Problem(pod, reason, f"{who} is waiting: {reason}" + (f": {text}" if text else ""),
                        text)
    if terminated is not None:
        if terminated.get("exitCode", 0) != 0:
            return _exited(pod, who, cs, terminated, previous=False)
        if init:
            return None  # completed, as init containers should
        return _Problem(pod, "Exited", f"{who} exited with code 0", container=cs.get("name"))
    if not cs.get("ready") and last is not None and last.get("exitCode", 0) != 0:
        return _exited(pod, who, cs, last, previous=True)
    return None


def _exited(pod: str, who: str, cs: Mapping, term: Mapping, *, previous: bool) -> _Problem:
    again = " and was restarted" if previous else ""
    return _Problem(pod, term.get("reason") or "Error", f"{who} {_exit(term)}{again}",
                    (term.get("message") or "").strip(), fatal=True, container=cs.get("name"),
                    previous=previous)


def _exit(term: Mapping) -> str:
    """"exited with code 137 (OOMKilled)": the code alone does not say OOM from SIGKILL."""
    code, reason = term.get("exitCode", 0), term.get("reason")
    return f"exited with code {code}" + (f" ({reason})" if reason else "")


# --- events ---------------------------------------------------------------------------


def _about(event: Mapping, meta: Mapping) -> bool:
    obj = event.get("involvedObject") or {}
    if obj.get("kind") != "Pod" or obj.get("name") != meta.get("name"):
        return False
    return not (obj.get("uid") and meta.get("uid")) or obj["uid"] == meta["uid"]


def _latest_warning_event(events: Sequence[Mapping], meta: Mapping,
                          reason: str | None = None) -> Mapping | None:
    """The newest Warning event about the pod (Skaffold's processPodEvents)."""
    latest = None
    for e in events:
        if e.get("type") != "Warning" or not _about(e, meta):
            continue
        if reason is not None and e.get("reason") != reason:
            continue
        if latest is None or _when(e) >= _when(latest):
            latest = e
    return latest


def _latest_warning(events: Sequence[Mapping], meta: Mapping, reason: str) -> str | None:
    e = _latest_warning_event(events, meta, reason)
    return e.get("message") if e else None


def _when(event: Mapping) -> datetime:
    """When the event was last seen.

    Kubelet and controllers fill ``lastTimestamp`` (seconds); components on the
    events.k8s.io API, the scheduler among them, fill ``eventTime`` (microseconds) or a
    ``series`` instead."""
    series = event.get("series") or {}
    stamp = (series.get("lastObservedTime") or event.get("lastTimestamp")
             or event.get("eventTime") or (event.get("metadata") or {}).get("creationTimestamp")
             or "")
    return _instant(stamp)


def _instant(stamp: str) -> datetime:
    """An RFC 3339 time as the API server writes it ("...:04Z", "...:04.123456Z"), or
    Python's isoformat(); naive times are UTC. Text order would put "...:04.5Z" before
    "...:04Z"."""
    if not stamp:
        return _NEVER
    t = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)
