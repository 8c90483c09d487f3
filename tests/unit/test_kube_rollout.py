"""``mlbuild.kube.rollout``: kubectl's rollout rule and Skaffold's unrecoverable pod
states, on objects as the API server returns them.

Each file in kube_fixtures/ is one moment of the demo project's ``diabetes`` service
(Deployment ``diabetes-diabetes`` in namespace ``ml``) as ``kubectl get deploy,rs,pods,events
-o json`` prints it: a ``List``, Kubernetes 1.30 with containerd on a three-node kind
cluster. Revision 1 (pod-template-hash 5c9d7b6f48) serves, revision 2 (7d4f8c9b65) rolls
out with ``maxSurge: 1, maxUnavailable: 0``. They were not captured from a live cluster:
the pod template is what mlbuild.kube.render renders, with what the API server's
defaulting and admission add; the status, condition and event texts are the controllers',
the scheduler's and the kubelet's own; fields the server omits when zero are absent, the
scheduler's events carry ``eventTime`` and no timestamps, and every object passes
kubernetes-validate --strict (test_fixtures_pass_kubernetes_validate). Most rollout
moments list only the new ReplicaSet's pods (a listing by its ``pod-template-hash``);
crash_loop.json lists everything the Deployment's selector matches.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest

from mlbuild.kube.render import SUPPORTED_KUBERNETES
from mlbuild.kube.rollout import Verdict, evaluate, revision_hash_of, status_of

FIXTURES = Path(__file__).parent / "kube_fixtures"
NEW = "7d4f8c9b65"
OLD = "5c9d7b6f48"
NAME = "diabetes-diabetes"
NEW_POD = f"{NAME}-{NEW}-x7k2p"
NEW_IMAGE = ("127.0.0.1:5000/ml/diabetes-diabetes@sha256:"
             "4e8a2c6f1b9d3e7a5c0f8b2d6e4a1c9f7b3d5e0a8c2f6b4d1e9a7c3f5b0d2e8a")


@dataclasses.dataclass
class Moment:
    deployment: dict
    replica_sets: list[dict]
    pods: list[dict]
    events: list[dict]

    def evaluate(self, **kw) -> Verdict:
        return evaluate(self.deployment, self.pods, self.events, revision_hash=NEW, **kw)

    def status(self, **kw) -> Verdict:
        return status_of(self.deployment, self.pods, self.events, **kw)


def moment(name: str) -> Moment:
    doc = json.loads((FIXTURES / f"{name}.json").read_text())
    assert doc["kind"] == "List"
    kinds: dict[str, list[dict]] = {"Deployment": [], "ReplicaSet": [], "Pod": [], "Event": []}
    for item in doc["items"]:
        kinds[item["kind"]].append(item)
    (deployment,) = kinds["Deployment"]
    return Moment(deployment, kinds["ReplicaSet"], kinds["Pod"], kinds["Event"])


@pytest.mark.parametrize("version", SUPPORTED_KUBERNETES)
def test_fixtures_pass_kubernetes_validate(version):
    """Every object is a valid API object of its kind, with no field the API does not
    know (--strict), from the oldest to the newest Kubernetes mlbuild supports."""
    kv = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[test]'")
    for path in sorted(FIXTURES.glob("*.json")):
        for item in json.loads(path.read_text())["items"]:
            assert kv.validate(item, version, strict=True) == version, (path.name, item["kind"])


def test_every_fixture_is_a_plausible_api_document():
    """Guard the recordings themselves: full objects, not stubs."""
    for path in sorted(FIXTURES.glob("*.json")):
        for item in json.loads(path.read_text())["items"]:
            assert {"apiVersion", "kind", "metadata"} <= item.keys(), path.name
            assert item["metadata"]["namespace"] == "ml", path.name
            if item["kind"] != "Event":
                assert {"spec", "status"} <= item.keys(), path.name
            if item["kind"] == "Deployment":
                assert any(c["type"] == "Progressing" for c in item["status"]["conditions"])
            if item["kind"] == "Pod":
                assert item["status"]["conditions"], path.name


# --- kubectl's rule -------------------------------------------------------------------


def test_complete_rollout_is_healthy_and_done():
    m = moment("complete")
    v = m.evaluate()
    assert (v.state, v.done, v.failed) == ("Healthy", True, False)
    assert (v.ready, v.desired, v.updated, v.available) == (3, 3, 3, 3)
    assert v.image == NEW_IMAGE
    # One pod was restarted once (liveness) and is ready again: counted, not judged.
    assert v.restarts == 1
    assert v.failing_pod is None


def test_old_replica_pending_termination_is_not_done():
    """kubectl: status.replicas > updatedReplicas -- "old replicas are pending termination",
    although every updated replica is available."""
    m = moment("old_replica_pending")
    v = m.evaluate()
    assert (v.state, v.done, v.failed) == ("Transitioning", False, False)
    assert v.reason == "waiting for 1 old replica to terminate"
    assert (v.updated, v.available) == (3, 4)


def test_terminating_pods_are_not_judged_even_without_a_hash():
    m = moment("old_replica_pending")
    terminating = [p for p in m.pods if p["metadata"].get("deletionTimestamp")]
    assert len(terminating) == 1 and terminating[0]["status"]["conditions"][2]["status"] == "False"
    new = [p for p in m.pods if p["metadata"]["labels"]["pod-template-hash"] == NEW]
    v = evaluate(m.deployment, new + terminating, m.events)
    assert v.reason == "waiting for 1 old replica to terminate"  # no word on the pod
    assert v.failing_pod is None


def test_generation_not_observed_is_not_done():
    """The status still reads complete -- of generation 2, while the spec is at 3."""
    m = moment("not_observed")
    v = m.evaluate()
    assert (v.state, v.done, v.failed) == ("Transitioning", False, False)
    assert v.cause == "NotObserved"
    assert "generation 3, observed 2" in v.reason
    assert status_of(m.deployment, m.pods).state == "Transitioning"


def test_stale_deadline_is_ignored_until_the_generation_is_observed():
    """A fix applied over a timed-out rollout: the old ProgressDeadlineExceeded stays
    until the controller catches up, and must not fail the new attempt."""
    m = moment("progress_deadline")
    m.deployment["metadata"]["generation"] = 3
    v = m.evaluate()
    assert (v.state, v.failed, v.cause) == ("Transitioning", False, "NotObserved")


def test_updated_replicas_available_count():
    m = moment("first_rollout_progressing")
    v = evaluate(m.deployment, m.pods, m.events, revision_hash=OLD)
    assert (v.state, v.done, v.failed) == ("Transitioning", False, False)
    assert v.reason.startswith(f"2 of 3 updated replicas available; pod {NAME}-{OLD}-t6p2c: ")
    assert v.message == "Readiness probe failed: HTTP probe failed with statuscode: 503"


def test_new_replicas_not_all_updated_yet():
    m = moment("crash_loop")
    pods = [p for p in m.pods if p["metadata"]["labels"]["pod-template-hash"] == OLD]
    v = evaluate(m.deployment, pods, m.events, revision_hash=NEW)  # no new pod listed yet
    assert (v.state, v.done, v.failed) == ("Transitioning", False, False)
    assert v.reason == "1 of 3 replicas updated"


def test_progress_deadline_fails():
    m = moment("progress_deadline")
    v = m.evaluate()
    assert (v.state, v.done, v.failed) == ("Failed", False, True)
    assert v.cause == "ProgressDeadlineExceeded"
    assert v.reason.startswith("rollout made no progress within its deadline of 600 s")
    assert v.message == f'ReplicaSet "{NAME}-{NEW}" has timed out progressing.'


# --- Skaffold's unrecoverable pod states ----------------------------------------------


@pytest.mark.parametrize("name, cause, says, message_has, container, previous", [
    ("err_image_pull", "ErrImagePull",
     f"container diabetes cannot pull its image {NEW_IMAGE}: ErrImagePull", "not found",
     None, False),
    ("image_pull_backoff", "ImagePullBackOff",
     f"container diabetes cannot pull its image {NEW_IMAGE}: ImagePullBackOff",
     "Back-off pulling image", None, False),
    ("crash_loop", "CrashLoopBackOff",
     "container diabetes is crash-looping: exited with code 1 (Error), restarted 3 times",
     "back-off 40s restarting failed container=diabetes", "diabetes", True),
    ("create_container_config_error", "CreateContainerConfigError",
     "container diabetes cannot be created: CreateContainerConfigError: "
     'secret "diabetes-diabetes-keys" not found',
     "diabetes-diabetes-keys", None, False),
    ("run_container_error", "RunContainerError",
     "container diabetes cannot be started: RunContainerError",
     "/opt/mlbuild/bin/serve: no such file or directory", None, False),
    ("exited_nonzero", "Error",
     "container diabetes exited with code 3 (Error)", "", "diabetes", False),
    ("restarted_after_exit", "OOMKilled",
     "container diabetes exited with code 137 (OOMKilled) and was restarted", "",
     "diabetes", True),
])
def test_unrecoverable_pod_fails_fast(name, cause, says, message_has, container, previous):
    m = moment(name)
    v = m.evaluate()
    assert (v.state, v.done, v.failed) == ("Failed", False, True)
    assert v.cause == cause
    assert v.reason == f"pod {NEW_POD}: {says}"
    assert message_has in v.message
    assert (v.failing_pod, v.failing_container, v.logs_previous) == (NEW_POD, container, previous)
    # While the old replicas keep serving:
    assert (v.ready, v.desired, v.updated, v.available) == (3, 3, 1, 3)


def test_without_a_hash_the_pods_given_are_the_new_ones():
    m = moment("crash_loop")
    new = [p for p in m.pods if p["metadata"]["labels"]["pod-template-hash"] == NEW]
    assert evaluate(m.deployment, new, m.events) == m.evaluate()
    assert m.evaluate().restarts == 3  # the new pod's; the old pods are not counted


def test_failed_create_event_fails():
    """The quota rejects the new ReplicaSet's pod: only the ReplicaSet's event says so."""
    m = moment("failed_create")
    assert not any(c["type"] == "ReplicaFailure" for c in m.deployment["status"]["conditions"])
    v = m.evaluate()
    assert (v.state, v.done, v.failed, v.cause) == ("Failed", False, True, "FailedCreate")
    assert v.reason.startswith(f"ReplicaSet {NAME}-{NEW} cannot create pods: Error creating: "
                               f'pods "{NAME}-{NEW}-h2n6v" is forbidden: exceeded quota: ml-quota')
    assert v.failing_pod is None
    # The same without a hash: the ReplicaSet is recognised by its name.
    assert evaluate(m.deployment, [], m.events).cause == "FailedCreate"


def test_failed_create_condition_fails_without_events():
    """A moment later the Deployment controller copies the ReplicaSet's ReplicaFailure."""
    m = moment("failed_create")
    (rs,) = m.replica_sets
    m.deployment["status"]["conditions"].append(copy.deepcopy(rs["status"]["conditions"][0]))
    v = evaluate(m.deployment, [], [], revision_hash=NEW)
    assert (v.state, v.failed, v.cause) == ("Failed", True, "FailedCreate")
    assert "exceeded quota: ml-quota" in v.message


def test_failed_create_events_of_an_earlier_attempt_are_ignored():
    m = moment("failed_create")
    v = m.evaluate(since="2026-03-02T11:00:00Z")
    assert (v.state, v.failed) == ("Transitioning", False)
    assert m.evaluate(since="2026-03-02T10:30:40Z").cause == "FailedCreate"


def test_failed_create_of_another_deployment_is_ignored():
    m = moment("failed_create")
    for e in m.events:
        e["involvedObject"]["name"] = e["involvedObject"]["name"].replace(NAME, f"{NAME}-v2")
    assert evaluate(m.deployment, [], m.events).state == "Transitioning"


def test_unschedulable_waits_with_the_schedulers_message():
    m = moment("unschedulable")
    v = m.evaluate()
    assert (v.state, v.done, v.failed) == ("Unschedulable", False, False)
    assert v.message == ("0/3 nodes are available: 3 Insufficient cpu. preemption: 0/3 nodes are "
                         "available: 3 No preemption victims found for incoming pod.")
    assert v.reason == f"1 of 3 replicas updated; 1 pod cannot be scheduled: {v.message}"
    assert v.failing_pod == NEW_POD and v.failing_container is None


def test_unschedulable_message_from_the_schedulers_event_when_the_condition_has_none():
    m = moment("unschedulable")
    del m.pods[0]["status"]["conditions"][0]["message"]
    assert m.evaluate().message.startswith("0/3 nodes are available: 3 Insufficient cpu.")


def test_unschedulable_past_the_deadline_fails_as_unschedulable():
    m = moment("unschedulable")
    progressing = m.deployment["status"]["conditions"][1]
    progressing.update(status="False", reason="ProgressDeadlineExceeded",
                       message=f'ReplicaSet "{NAME}-{NEW}" has timed out progressing.',
                       lastTransitionTime="2026-03-02T10:40:03Z",
                       lastUpdateTime="2026-03-02T10:40:03Z")
    v = m.evaluate()
    assert (v.state, v.done, v.failed) == ("Unschedulable", False, True)
    assert "deadline of 600 s" in v.reason and "Insufficient cpu" in v.reason


def test_deadline_names_the_unrecoverable_pod():
    m = moment("settled_all_crash_looping")
    v = evaluate(m.deployment, m.pods, m.events, revision_hash=OLD)
    assert (v.state, v.failed, v.cause) == ("Failed", True, "CrashLoopBackOff")
    assert v.reason.startswith("rollout made no progress within its deadline of 600 s; pod ")
    assert (v.failing_container, v.logs_previous) == ("diabetes", True)


def test_verdict_is_frozen():
    v = moment("complete").evaluate()
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.state = "Failed"  # type: ignore[misc]


# --- the new ReplicaSet ---------------------------------------------------------------


def test_revision_hash_of_the_new_replica_set():
    assert revision_hash_of(moment("complete").deployment, moment("complete").replica_sets) == NEW
    m = moment("crash_loop")
    assert revision_hash_of(m.deployment, reversed(m.replica_sets)) == NEW
    assert revision_hash_of(m.deployment, []) is None
    # Not observed: the revision annotation still names the previous ReplicaSet's.
    m = moment("not_observed")
    assert revision_hash_of(m.deployment, m.replica_sets) is None


def test_revision_hash_ignores_replica_sets_of_another_owner():
    m = moment("complete")
    for rs in m.replica_sets:
        rs["metadata"]["ownerReferences"][0]["uid"] = "0e8a1c2d-0000-4000-8000-000000000000"
    assert revision_hash_of(m.deployment, m.replica_sets) is None


# --- status_of ------------------------------------------------------------------------


def test_status_healthy():
    v = moment("complete").status()
    assert (v.state, v.done, v.failed) == ("Healthy", True, False)
    assert (v.ready, v.desired, v.restarts, v.image) == (3, 3, 1, NEW_IMAGE)


def test_status_one_replica_crash_looping_is_unhealthy():
    m = moment("settled_one_crash_looping")
    v = m.status()
    assert (v.state, v.done, v.failed) == ("Unhealthy", False, True)
    assert v.reason == (f"2 of 3 replicas ready; pod {NAME}-{NEW}-m5w8z: container diabetes is "
                        "crash-looping: exited with code 137 (OOMKilled), restarted 5 times")
    assert v.restarts == 6  # 0 + 1 + 5
    assert (v.failing_pod, v.failing_container, v.logs_previous) == (
        f"{NAME}-{NEW}-m5w8z", "diabetes", True)


def test_status_none_ready_and_unrecoverable_is_failed():
    m = moment("settled_all_crash_looping")
    v = m.status()
    assert (v.state, v.done, v.failed) == ("Failed", False, True)
    assert (v.ready, v.desired, v.restarts) == (0, 2, 12)
    assert v.message.startswith("back-off 5m0s restarting failed container=diabetes")


def test_status_first_deploy_crash_looping_before_the_deadline_is_failed():
    m = moment("settled_all_crash_looping")
    progressing = m.deployment["status"]["conditions"][1]
    progressing.update(status="True", reason="ReplicaSetUpdated",
                       message=f'ReplicaSet "{NAME}-{OLD}" is progressing.')
    v = m.status()
    assert (v.state, v.failed, v.cause) == ("Failed", True, "CrashLoopBackOff")
    assert v.reason.startswith("0 of 2 replicas ready; pod ")


def test_status_scaled_up_without_room_is_unschedulable():
    v = moment("settled_scaled_unschedulable").status()
    assert (v.state, v.done, v.failed) == ("Unschedulable", False, False)
    assert v.message.startswith("0/3 nodes are available: 1 node(s) had untolerated taint")
    assert v.reason.startswith("2 of 3 updated replicas available; 1 pod cannot be scheduled: ")


def test_status_not_ready_without_a_crash_is_unhealthy():
    v = moment("settled_not_ready").status()
    assert (v.state, v.done, v.failed) == ("Unhealthy", False, False)
    assert v.reason == (f"2 of 3 replicas ready; pod {NAME}-{NEW}-q9r4t: Unhealthy: Readiness "
                        'probe failed: Get "http://10.244.2.57:5000/healthz/ready": context '
                        "deadline exceeded (Client.Timeout exceeded while awaiting headers)")
    assert v.failing_pod == f"{NAME}-{NEW}-q9r4t" and v.failing_container is None


def test_status_during_a_rollout_is_transitioning():
    m = moment("old_replica_pending")
    v = status_of(m.deployment, m.pods, revision_hash=NEW)
    assert (v.state, v.reason) == ("Transitioning", "waiting for 1 old replica to terminate")


def test_status_rollout_past_deadline_is_failed_though_old_replicas_serve():
    m = moment("progress_deadline")
    v = status_of(m.deployment, m.pods, m.events, revision_hash=NEW)
    assert (v.state, v.failed, v.ready, v.desired) == ("Failed", True, 3, 3)


def test_status_of_a_rollout_with_a_broken_new_pod_while_old_ones_serve():
    m = moment("crash_loop")
    v = status_of(m.deployment, m.pods, m.events, revision_hash=NEW)
    assert (v.state, v.failed, v.cause) == ("Unhealthy", True, "CrashLoopBackOff")
    assert v.reason.startswith(f"3 of 3 replicas ready; pod {NEW_POD}: ")


def test_status_pods_cannot_be_created():
    """Scaled up into an exhausted quota: the Deployment carries the ReplicaSet's failure."""
    m = moment("failed_create")
    (rs,) = m.replica_sets
    m.deployment["status"]["conditions"].append(copy.deepcopy(rs["status"]["conditions"][0]))
    v = status_of(m.deployment, [], m.events, revision_hash=NEW)
    assert (v.state, v.failed, v.cause) == ("Unhealthy", True, "FailedCreate")
    assert v.reason.startswith(
        f"3 of 3 replicas ready; ReplicaSet {NAME}-{NEW} cannot create pods: ")
    # The events alone, an hour's memory of a failure that may have passed, do not count.
    fresh = moment("failed_create")
    assert status_of(fresh.deployment, [], fresh.events).state == "Transitioning"


# --- details --------------------------------------------------------------------------


def test_events_may_be_a_one_shot_iterable():
    m = moment("failed_create")
    assert evaluate(m.deployment, iter([]), iter(m.events)).cause == "FailedCreate"
    m = moment("first_rollout_progressing")
    v = evaluate(m.deployment, iter(m.pods), (e for e in m.events))
    assert "Readiness probe failed" in v.message


def test_init_container_crash_loop_comes_first():
    """Init:CrashLoopBackOff: the init container fails, the app container waits."""
    m = moment("crash_loop")
    pod = next(p for p in m.pods if p["metadata"]["name"] == NEW_POD)
    (failing,) = pod["status"]["containerStatuses"]
    failing = dict(failing, name="fetch-model")
    waiting = {"image": NEW_IMAGE, "imageID": "", "lastState": {}, "name": "diabetes",
               "ready": False, "restartCount": 0, "started": False,
               "state": {"waiting": {"reason": "PodInitializing"}}}
    pod["status"]["initContainerStatuses"] = [failing]
    pod["status"]["containerStatuses"] = [waiting]
    pod["status"]["phase"] = "Pending"
    pod["status"]["conditions"][1].update(
        status="False", reason="ContainersNotInitialized",
        message="containers with incomplete status: [fetch-model]")
    v = m.evaluate()
    assert (v.state, v.failed, v.cause) == ("Failed", True, "CrashLoopBackOff")
    assert v.reason.startswith(f"pod {NEW_POD}: init container fetch-model is crash-looping")
    assert (v.failing_container, v.logs_previous) == ("fetch-model", True)


def test_event_times_compare_as_times():
    """A scheduler event at 10:30:02.418533 is later than a kubelet one at 10:30:02."""
    m = moment("unschedulable")
    (sched,) = m.events
    older = copy.deepcopy(sched)
    older.update(eventTime="2026-03-02T10:30:02.000001Z", message="0/3 nodes are available: older")
    del m.pods[0]["status"]["conditions"][0]["message"]
    v = evaluate(m.deployment, m.pods, [sched, older], revision_hash=NEW)
    assert "Insufficient cpu" in v.message
    v = evaluate(m.deployment, m.pods, [older, sched], revision_hash=NEW)
    assert "Insufficient cpu" in v.message
    m = moment("failed_create")
    assert m.evaluate(since="2026-03-02T10:30:44+00:00").cause == "FailedCreate"
    assert m.evaluate(since="2026-03-02T10:30:44.000001+00:00").cause == "Progressing"
