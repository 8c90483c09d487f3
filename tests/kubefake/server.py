"""A fake Kubernetes API server: exactly the part of the REST API that mlbuild uses, over
real HTTP on 127.0.0.1, so a client library (lightkube) talks to it unchanged.

    with KubeFake() as kube:
        kube.write_kubeconfig(tmp_path / "kubeconfig")   # server, context, bearer token
        client = lightkube.Client(KubeConfig.from_file(...))
        ...
        kube.requests                                    # what the client sent

Contract (what a client sees; tests/kubefake/test_kubefake.py runs the same tests here
and, with MLBUILD_TEST_KUBECONFIG, against a real cluster):

* Kinds (``KINDS``): Deployment, ReplicaSet, Pod, Service, Secret,
  HorizontalPodAutoscaler (autoscaling/v2), PodDisruptionBudget (policy/v1), Ingress
  (networking.k8s.io/v1), Event, Namespace. ReplicaSets and Events are
  written by the controller stand-in (controller.py), never by clients: a client write
  is 403 Forbidden, as from a role without those verbs.
* Verbs: GET item; GET list (``labelSelector`` with =, ==, !=, exists, !exists, in,
  notin; ``fieldSelector`` =, ==, != on metadata.name/namespace, and per kind
  ``FIELD_SELECTORS``; ``limit``/``continue``); watch (``?watch=true``, from
  ``resourceVersion`` or with synthetic ADDED events without one, ``timeoutSeconds``,
  410 Expired as an ERROR event for a compacted version); POST; PUT (with the
  resourceVersion precondition); PATCH as server-side apply
  (``application/apply-patch+yaml``, fieldManager required, ``force``), merge, strategic
  merge and JSON patch; DELETE (propagationPolicy: dependents go at once, or are
  orphaned); the status subresource (GET/PUT/PATCH); pod logs (``container``,
  ``tailLines``, ``sinceSeconds``, ``timestamps``, ``limitBytes``, ``previous``,
  ``follow``); the pod proxy for GET (``pods/[SCHEME:]NAME[:PORT]/proxy/PATH``,
  forwarded to the backend a test registered with ``pod_backend()``); ``dryRun=All`` on
  writes. Discovery: /version, /api, /apis, /api/v1, /apis/GROUP/VERSION.
* Objects carry uid, resourceVersion (one counter for the server), creationTimestamp,
  generation (Deployment, ReplicaSet, Pod, HPA, PDB, Ingress; +1 on a spec change),
  managedFields (fieldmanager.py), and the apiserver's defaults for the fields a
  rollout reads (Deployment replicas/strategy/progressDeadlineSeconds/...; pod spec
  policies, container imagePullPolicy/terminationMessage*, ports' protocol; Service
  type/clusterIP/targetPort; Secret type, stringData folded into data).
* Errors are ``Status`` objects with the apiserver's code, reason, message and details.
  401 without the server's bearer token; 403 for what ``forbid()`` denies, with RBAC's
  message; 422 Invalid for the checks of ``_validate`` (names, labels, a Deployment's
  selector and containers, an immutable selector); 409 for apply conflicts, stale
  resourceVersions, and existing names; 404 for missing objects and namespaces. The pod
  proxy answers as upstream's (pkg/registry/core/pod/strategy.go ResourceLocation,
  apimachinery's proxy transport): 404 for a missing pod, 400 "address not allowed" for
  a pod without an IP, 503 "error trying to reach service: dial tcp IP:PORT: connect:
  connection refused" when nothing listens; else the backend's own answer.
* Every response with a JSON body says exactly ``Content-Type: application/json``
  (lightkube only turns such an error into ``ApiError``).

Known differences from a real apiserver are listed in tests/kubefake/README.md.
"""

from __future__ import annotations

import base64
import bisect
import copy
import http.client
import ipaddress
import json
import re
import select
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import parse_qs, urlencode, urlsplit

import yaml

from . import fieldmanager as fm

# --------------------------------------------------------------------------- kinds


@dataclass(frozen=True)
class Kind:
    kind: str
    group: str
    version: str
    plural: str
    singular: str
    namespaced: bool = True
    client_writable: bool = True
    has_status: bool = True  # a status subresource: main-resource writes keep status
    has_generation: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def prefix(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"

    @property
    def qualified(self) -> str:
        """``deployments.apps``, ``pods``: how the apiserver names a resource in messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def group_kind(self) -> str:
        """``Deployment.apps``, ``Service``: how validation errors name a kind."""
        return f"{self.kind}.{self.group}" if self.group else self.kind


KINDS: dict[str, Kind] = {k.kind: k for k in [
    Kind("Namespace", "", "v1", "namespaces", "namespace", namespaced=False),
    Kind("Deployment", "apps", "v1", "deployments", "deployment", has_generation=True),
    Kind("ReplicaSet", "apps", "v1", "replicasets", "replicaset", client_writable=False, has_generation=True),
    Kind("Pod", "", "v1", "pods", "pod", has_generation=True),
    Kind("Service", "", "v1", "services", "service"),
    Kind("Secret", "", "v1", "secrets", "secret", has_status=False),
    Kind("HorizontalPodAutoscaler", "autoscaling", "v2", "horizontalpodautoscalers",
         "horizontalpodautoscaler", has_generation=True),
    Kind("PodDisruptionBudget", "policy", "v1", "poddisruptionbudgets", "poddisruptionbudget",
         has_generation=True),
    Kind("Ingress", "networking.k8s.io", "v1", "ingresses", "ingress", has_generation=True),
    Kind("Event", "", "v1", "events", "event", client_writable=False, has_status=False),
]}
_BY_PATH = {(k.prefix, k.plural): k for k in KINDS.values()}

# Field selectors the apiserver accepts beyond metadata.name / metadata.namespace.
FIELD_SELECTORS: dict[str, set[str]] = {
    "Event": {"involvedObject.kind", "involvedObject.namespace", "involvedObject.name",
              "involvedObject.uid", "involvedObject.apiVersion", "involvedObject.resourceVersion",
              "involvedObject.fieldPath", "reason", "reportingComponent", "source", "type"},
    "Pod": {"spec.nodeName", "spec.restartPolicy", "spec.schedulerName", "spec.serviceAccountName",
            "status.phase", "status.podIP", "status.nominatedNodeName"},
    "Secret": {"type"},
    "ReplicaSet": {"status.replicas"},
    "Namespace": {"status.phase"},
}

PATCH_TYPES = {
    "application/apply-patch+yaml": "apply",
    "application/merge-patch+json": "merge",
    "application/strategic-merge-patch+json": "strategic",
    "application/json-patch+json": "json",
}

WATCH_HISTORY = 10_000  # events kept for watches that resume from a resourceVersion
PROXY_TIMEOUT = 30.0  # seconds the pod proxy waits for a backend (then 503)
# Not passed on by the pod proxy (hop-by-hop, or recomputed).
_HOP_HEADERS = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                          "te", "trailer", "transfer-encoding", "upgrade", "content-length"})


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339_nano(t: float) -> str:
    d = datetime.fromtimestamp(t, timezone.utc)
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond:06d}000Z"


# --------------------------------------------------------------------------- errors


class ApiStatus(Exception):
    """A failure answered as a ``Status`` object."""

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def body(self) -> dict:
        out = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": self.message, "reason": self.reason}
        if self.details is not None:
            out["details"] = self.details
        out["code"] = self.code
        return out


def _details(kind: Kind, name: str | None = None, **extra) -> dict:
    out: dict[str, Any] = {}
    if name:
        out["name"] = name
    if kind.group:
        out["group"] = kind.group
    out["kind"] = kind.plural
    out.update(extra)
    return out


def not_found(kind: Kind, name: str) -> ApiStatus:
    return ApiStatus(404, "NotFound", f'{kind.qualified} "{name}" not found', _details(kind, name))


def already_exists(kind: Kind, name: str) -> ApiStatus:
    return ApiStatus(409, "AlreadyExists", f'{kind.qualified} "{name}" already exists', _details(kind, name))


def stale(kind: Kind, name: str) -> ApiStatus:
    return ApiStatus(409, "Conflict",
                     f'Operation cannot be fulfilled on {kind.qualified} "{name}": the object has been '
                     "modified; please apply your changes to the latest version and try again",
                     _details(kind, name))


def bad_request(message: str) -> ApiStatus:
    return ApiStatus(400, "BadRequest", message)


def invalid(kind: Kind, name: str, errors: list[tuple[str, str, str]]) -> ApiStatus:
    """``errors``: (field, reason, detail) as field.Error: ("spec.selector",
    "FieldValueRequired", "Required value")."""
    texts = [f"{f}: {d}" for f, _, d in errors]
    summary = texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]"
    details = {"name": name}
    if kind.group:
        details["group"] = kind.group
    details["kind"] = kind.kind
    details["causes"] = [{"reason": r, "message": d, "field": f} for f, r, d in errors]
    return ApiStatus(422, "Invalid", f'{kind.group_kind} "{name}" is invalid: {summary}', details)


def apply_conflict(conflicts: list[fm.Conflict]) -> ApiStatus:
    # metav1.StatusCause's Type is "reason" in JSON
    causes = [{"reason": "FieldManagerConflict", "message": f"conflict with {c.manager.describe()}",
               "field": fm.path_str(c.path)} for c in conflicts]
    return ApiStatus(409, "Conflict", fm.conflict_message(conflicts), {"causes": causes})


NOT_FOUND_PATH = ApiStatus(404, "NotFound", "the server could not find the requested resource", {})
UNAUTHORIZED = ApiStatus(401, "Unauthorized", "Unauthorized")


# --------------------------------------------------------------------------- selectors

_REQ_SET = re.compile(r"^\s*([A-Za-z0-9./_-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
_REQ_CMP = re.compile(r"^\s*([A-Za-z0-9./_-]+)\s*(==|=|!=)\s*([A-Za-z0-9._-]*)\s*$")
_REQ_EXISTS = re.compile(r"^\s*(!?)\s*([A-Za-z0-9./_-]+)\s*$")


def _split_outside_parens(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p for p in parts if p.strip()]


def label_matcher(selector: str | None) -> Callable[[dict], bool]:
    """A predicate on an object's labels, for a ``labelSelector`` string.

    Raises:
        ApiStatus: 400 for a selector the apiserver would not parse.
    """
    if not selector:
        return lambda obj: True
    tests: list[Callable[[dict], bool]] = []
    for req in _split_outside_parens(selector):
        if m := _REQ_SET.match(req):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",") if v.strip()}
            if op == "in":
                tests.append(lambda l, k=key, vs=values: l.get(k) in vs)
            else:
                tests.append(lambda l, k=key, vs=values: l.get(k) not in vs)
        elif m := _REQ_CMP.match(req):
            key, op, value = m.groups()
            if op == "!=":
                tests.append(lambda l, k=key, v=value: l.get(k) != v)
            else:
                tests.append(lambda l, k=key, v=value: k in l and l[k] == v)
        elif m := _REQ_EXISTS.match(req):
            neg, key = m.groups()
            tests.append((lambda l, k=key: k not in l) if neg else (lambda l, k=key: k in l))
        else:
            raise bad_request(f"unable to parse requirement: found '{req.strip()}', "
                              "expected: in, notin, =, ==, !=, gt, lt")
    return lambda obj: all(t((obj.get("metadata") or {}).get("labels") or {}) for t in tests)


def _dotted(obj: dict, path: str) -> str:
    cur: Any = obj
    for part in path.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    if isinstance(cur, dict) and path == "source":
        cur = cur.get("component")
    return "" if cur is None else str(cur)


def field_matcher(kind: Kind, selector: str | None) -> Callable[[dict], bool]:
    if not selector:
        return lambda obj: True
    allowed = {"metadata.name", "metadata.namespace"} | FIELD_SELECTORS.get(kind.kind, set())
    tests = []
    for req in selector.split(","):
        m = re.match(r"^\s*([A-Za-z.]+)\s*(==|=|!=)\s*(.*?)\s*$", req)
        if not m:
            raise bad_request(f"invalid selector: '{selector}'; can't understand '{req}'")
        key, op, value = m.groups()
        if key not in allowed:
            raise bad_request(f'"{key}" is not a known field selector: only "metadata.name", "metadata.namespace"')
        if op == "!=":
            tests.append(lambda o, k=key, v=value: _dotted(o, k) != v)
        else:
            tests.append(lambda o, k=key, v=value: _dotted(o, k) == v)
    return lambda obj: all(t(obj) for t in tests)


# --------------------------------------------------------------------------- defaults and validation

_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


def _go_map(m: dict) -> str:
    return "map[string]string{" + ", ".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in sorted(m.items())) + "}"


def _go_selector(sel: dict) -> str:
    ml = sel.get("matchLabels")
    me = sel.get("matchExpressions")
    return ("v1.LabelSelector{MatchLabels:" + (_go_map(ml) if ml else "map[string]string(nil)")
            + ", MatchExpressions:" + ("[]v1.LabelSelectorRequirement{...}" if me else "[]v1.LabelSelectorRequirement(nil)")
            + "}")


def _selector_matches(sel: dict, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in (sel.get("matchLabels") or {}).items()):
        return False
    for req in sel.get("matchExpressions") or []:
        k, op, vals = req.get("key"), req.get("operator"), req.get("values") or []
        if (op == "In" and labels.get(k) not in vals) or (op == "NotIn" and labels.get(k) in vals) \
                or (op == "Exists" and k not in labels) or (op == "DoesNotExist" and k in labels):
            return False
    return True


def _image_pull_policy(image: str) -> str:
    if "@" in image:
        return "IfNotPresent"
    last = image.rsplit("/", 1)[-1]
    tag = last.split(":", 1)[1] if ":" in last else "latest"
    return "Always" if tag == "latest" else "IfNotPresent"


def default_pod_spec(spec: dict | None) -> None:
    if not isinstance(spec, dict):
        return
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("securityContext", {})
    spec.setdefault("schedulerName", "default-scheduler")
    for c in (spec.get("containers") or []) + (spec.get("initContainers") or []):
        if not isinstance(c, dict):
            continue
        if isinstance(c.get("image"), str):
            c.setdefault("imagePullPolicy", _image_pull_policy(c["image"]))
        c.setdefault("terminationMessagePath", "/dev/termination-log")
        c.setdefault("terminationMessagePolicy", "File")
        c.setdefault("resources", {})
        for p in c.get("ports") or []:
            if isinstance(p, dict):
                p.setdefault("protocol", "TCP")
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            pr = c.get(probe)
            if isinstance(pr, dict):
                pr.setdefault("timeoutSeconds", 1)
                pr.setdefault("periodSeconds", 10)
                pr.setdefault("successThreshold", 1)
                pr.setdefault("failureThreshold", 3)
                if isinstance(pr.get("httpGet"), dict):
                    pr["httpGet"].setdefault("scheme", "HTTP")


def apply_defaults(kind: Kind, obj: dict, allocate_ip: Callable[[], str]) -> None:
    """The apiserver's defaulting for the fields a client or the controller reads."""
    spec = obj.get("spec")
    if kind.kind == "Namespace":
        obj.setdefault("metadata", {}).setdefault("labels", {})["kubernetes.io/metadata.name"] = obj["metadata"]["name"]
        obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
        obj.setdefault("status", {"phase": "Active"})
    elif kind.kind == "Deployment" and isinstance(spec, dict):
        spec.setdefault("replicas", 1)
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("progressDeadlineSeconds", 600)
        strategy = spec.setdefault("strategy", {})
        strategy.setdefault("type", "RollingUpdate")
        if strategy["type"] == "RollingUpdate":
            ru = strategy.setdefault("rollingUpdate", {})
            ru.setdefault("maxUnavailable", "25%")
            ru.setdefault("maxSurge", "25%")
        default_pod_spec((spec.get("template") or {}).get("spec"))
    elif kind.kind == "ReplicaSet" and isinstance(spec, dict):
        spec.setdefault("replicas", 1)
        default_pod_spec((spec.get("template") or {}).get("spec"))
    elif kind.kind == "Pod":
        default_pod_spec(spec)
        if isinstance(spec, dict):
            spec.setdefault("serviceAccountName", "default")
            spec.setdefault("enableServiceLinks", True)
            spec.setdefault("priority", 0)
    elif kind.kind == "Service" and isinstance(spec, dict):
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        if spec["type"] != "ExternalName":
            if "clusterIP" not in spec:
                spec["clusterIP"] = allocate_ip()
            spec.setdefault("clusterIPs", [spec["clusterIP"]])
            spec.setdefault("ipFamilies", ["IPv4"])
            spec.setdefault("ipFamilyPolicy", "SingleStack")
            spec.setdefault("internalTrafficPolicy", "Cluster")
        for p in spec.get("ports") or []:
            if isinstance(p, dict):
                p.setdefault("protocol", "TCP")
                if "port" in p:
                    p.setdefault("targetPort", p["port"])
        obj.setdefault("status", {"loadBalancer": {}})
    elif kind.kind == "Secret":
        obj.setdefault("type", "Opaque")
        string_data = obj.pop("stringData", None)
        if isinstance(string_data, dict):
            data = obj.setdefault("data", {})
            for k, v in string_data.items():
                data[k] = base64.b64encode(str(v).encode()).decode()


def _validate(kind: Kind, obj: dict, old: dict | None) -> None:
    """The apiserver's validation, for the mistakes a renderer can make. Raises 422."""
    meta = obj.get("metadata") or {}
    name = meta.get("name", "")
    errors: list[tuple[str, str, str]] = []
    if kind.kind == "Service":
        if not _DNS1035_LABEL.match(name) or len(name) > 63:
            errors.append(("metadata.name", "FieldValueInvalid",
                           f'Invalid value: {json.dumps(name)}: a DNS-1035 label must consist of lower case '
                           "alphanumeric characters or '-', start with an alphabetic character, and end with an "
                           "alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is "
                           "'[a-z]([-a-z0-9]*[a-z0-9])?')"))
    elif not _DNS1123_SUBDOMAIN.match(name) or len(name) > 253:
        errors.append(("metadata.name", "FieldValueInvalid",
                       f'Invalid value: {json.dumps(name)}: a lowercase RFC 1123 subdomain must consist of lower '
                       "case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric "
                       "character (e.g. 'example.com', regex used for validation is "
                       r"'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"))

    def check_labels(labels: Any, where: str) -> None:
        for k, v in (labels or {}).items():
            key_name = k.rsplit("/", 1)[-1]
            if not _LABEL_NAME.match(key_name) or len(key_name) > 63:
                errors.append((where, "FieldValueInvalid",
                               f"Invalid value: {json.dumps(k)}: name part must consist of alphanumeric "
                               "characters, '-', '_' or '.', and must start and end with an alphanumeric "
                               "character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for "
                               "validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"))
            if not isinstance(v, str) or len(v) > 63:
                errors.append((where, "FieldValueInvalid",
                               f"Invalid value: {json.dumps(v)}: must be no more than 63 characters"))
            elif not _LABEL_VALUE.match(v):
                errors.append((where, "FieldValueInvalid",
                               f"Invalid value: {json.dumps(v)}: a valid label must be an empty string or consist "
                               "of alphanumeric characters, '-', '_' or '.', and must start and end with an "
                               "alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used "
                               "for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"))

    check_labels(meta.get("labels"), "metadata.labels")

    def check_containers(pod_spec: Any, where: str) -> None:
        containers = (pod_spec or {}).get("containers") if isinstance(pod_spec, dict) else None
        if not containers:
            errors.append((f"{where}.containers", "FieldValueRequired", "Required value"))
            return
        for i, c in enumerate(containers):
            if not (c or {}).get("name"):
                errors.append((f"{where}.containers[{i}].name", "FieldValueRequired", "Required value"))
            if not (c or {}).get("image"):
                errors.append((f"{where}.containers[{i}].image", "FieldValueRequired", "Required value"))

    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    if kind.kind == "Deployment":
        selector = spec.get("selector")
        template = spec.get("template") or {}
        tlabels = (template.get("metadata") or {}).get("labels") or {}
        check_labels(tlabels, "spec.template.metadata.labels")
        if not selector:
            errors.append(("spec.selector", "FieldValueRequired", "Required value"))
        elif not (selector.get("matchLabels") or selector.get("matchExpressions")):
            errors.append(("spec.selector", "FieldValueInvalid",
                           f"Invalid value: {_go_selector(selector)}: empty selector is invalid for deployment"))
        elif not _selector_matches(selector, tlabels):
            errors.append(("spec.template.metadata.labels", "FieldValueInvalid",
                           f"Invalid value: {_go_map(tlabels)}: `selector` does not match template `labels`"))
        if old is not None and selector and (old.get("spec") or {}).get("selector") != selector:
            errors.append(("spec.selector", "FieldValueInvalid",
                           f"Invalid value: {_go_selector(selector)}: field is immutable"))
        check_containers(template.get("spec"), "spec.template.spec")
        if isinstance(spec.get("replicas"), int) and spec["replicas"] < 0:
            errors.append(("spec.replicas", "FieldValueInvalid",
                           f"Invalid value: {spec['replicas']}: must be greater than or equal to 0"))
    elif kind.kind == "Pod":
        check_containers(spec, "spec")
    elif kind.kind == "Service":
        if spec.get("type", "ClusterIP") != "ExternalName" and spec.get("clusterIP") != "None" and not spec.get("ports"):
            errors.append(("spec.ports", "FieldValueRequired", "Required value"))
    if errors:
        raise invalid(kind, name, errors)


# --------------------------------------------------------------------------- store


@dataclass
class Stored:
    obj: dict  # without managedFields
    managers: fm.Managers = field(default_factory=dict)


@dataclass
class WatchEvent:
    rv: int
    kind: Kind
    namespace: str
    type: str
    obj: dict
    old: dict | None


@dataclass
class RecordedRequest:
    """One request as the client sent it (``requests`` of :class:`KubeFake`)."""

    method: str
    path: str
    query: dict[str, str]
    content_type: str
    body: str
    headers: dict[str, str]

    def json(self) -> Any:
        if "yaml" in self.content_type:
            return yaml.safe_load(self.body)
        return json.loads(self.body)


@dataclass(frozen=True)
class Forbid:
    verb: str  # get list watch create update patch delete, or *
    resource: str  # plural, "pods/log", "deployments/status", or *
    namespace: str | None


class Store:
    """Objects in memory, per namespace; one lock and one resourceVersion counter.

    Every method is thread-safe; objects handed out are copies."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.cond = threading.Condition(threading.RLock())
        self.rv = 0
        self.objects: dict[tuple[str, str, str], Stored] = {}  # (kind, namespace, name)
        self.history: list[WatchEvent] = []
        self.compacted_rv = 0  # watches from below this get 410 Expired
        self.logs: dict[tuple[str, str, str], list[tuple[float, str]]] = {}  # (ns, pod, containerID)
        self.closing = False
        self._ip = 0

    # -- helpers

    def now(self) -> str:
        return rfc3339(self.clock())

    def _allocate_ip(self) -> str:
        self._ip += 1
        return f"10.96.{self._ip // 250}.{self._ip % 250 + 1}"

    def render(self, kind: Kind, stored: Stored, *, with_kind: bool = True) -> dict:
        obj = copy.deepcopy(stored.obj)
        if stored.managers:
            obj.setdefault("metadata", {})["managedFields"] = fm.managed_fields(stored.managers)
        if not with_kind:
            obj.pop("apiVersion", None)
            obj.pop("kind", None)
        return obj

    def _commit(self, kind: Kind, ns: str, name: str, stored: Stored | None, type_: str) -> dict:
        key = (kind.kind, ns, name)
        old = self.objects.get(key)
        self.rv += 1
        if stored is None:
            assert old is not None
            del self.objects[key]
            old.obj["metadata"]["resourceVersion"] = str(self.rv)
            final = old
        else:
            stored.obj["metadata"]["resourceVersion"] = str(self.rv)
            self.objects[key] = stored
            final = stored
        rendered = self.render(kind, final)
        old_rendered = self.render(kind, old) if old is not None and stored is not None else None
        self.history.append(WatchEvent(self.rv, kind, ns, type_, rendered, old_rendered))
        if len(self.history) > WATCH_HISTORY:
            dropped = self.history[: len(self.history) - WATCH_HISTORY]
            self.compacted_rv = dropped[-1].rv
            del self.history[: len(dropped)]
        if kind.kind == "Pod" and stored is None:
            for k in [k for k in self.logs if k[0] == ns and k[1] == name]:
                del self.logs[k]
        self.cond.notify_all()
        return copy.deepcopy(rendered)

    def require_namespace(self, ns: str) -> None:
        if ("Namespace", "", ns) not in self.objects:
            raise not_found(KINDS["Namespace"], ns)

    def _key(self, kind: Kind, ns: str | None, name: str) -> tuple[str, str, str]:
        return (kind.kind, ns if kind.namespaced else "", name)

    def lookup(self, kind: Kind, ns: str | None, name: str) -> Stored | None:
        return self.objects.get(self._key(kind, ns, name))

    def _finish(self, kind: Kind, obj: dict, old: dict | None, validate: bool) -> None:
        if kind.has_status and old is not None:
            if "status" in old:
                obj["status"] = copy.deepcopy(old["status"])
            else:
                obj.pop("status", None)
        apply_defaults(kind, obj, self._allocate_ip)
        if validate:
            _validate(kind, obj, old)
        meta = obj["metadata"]
        if old is not None:
            for k in ("uid", "creationTimestamp", "generation", "resourceVersion", "deletionTimestamp"):
                if k in old["metadata"]:
                    meta[k] = old["metadata"][k]
            if kind.has_generation and _spec_of(obj) != _spec_of(old):
                meta["generation"] = old["metadata"].get("generation", 1) + 1
        else:
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = self.now()
            meta.pop("resourceVersion", None)
            if kind.has_generation:
                meta["generation"] = 1

    # -- reads

    def get(self, kind: Kind, ns: str | None, name: str) -> dict:
        with self.cond:
            stored = self.lookup(kind, ns, name)
            if stored is None:
                raise not_found(kind, name)
            return self.render(kind, stored)

    def list(self, kind: Kind, ns: str | None, labels: str | None = None,
             fields: str | None = None) -> tuple[list[dict], str]:
        match_l, match_f = label_matcher(labels), field_matcher(kind, fields)
        with self.cond:
            items = []
            for (k, ons, _), stored in sorted(self.objects.items()):
                if k != kind.kind or (ns is not None and kind.namespaced and ons != ns):
                    continue
                if match_l(stored.obj) and match_f(stored.obj):
                    items.append(self.render(kind, stored, with_kind=False))
            return items, str(self.rv)

    # -- writes

    def create(self, kind: Kind, ns: str | None, body: dict, manager: str, *,
               validate: bool = True, dry_run: bool = False) -> dict:
        with self.cond:
            if kind.namespaced:
                self.require_namespace(ns)
            obj = copy.deepcopy(body)
            meta = obj.setdefault("metadata", {})
            if meta.get("managedFields"):
                raise bad_request("metadata.managedFields must be nil")
            if kind.namespaced:
                if meta.get("namespace") not in (None, ns):
                    raise bad_request("the namespace of the provided object does not match the namespace sent on the request")
                meta["namespace"] = ns
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + _random_suffix()
            name = meta.get("name") or ""
            if not name:
                raise invalid(kind, "", [("metadata.name", "FieldValueRequired", "Required value: name or generateName is required")])
            if self.lookup(kind, ns, name) is not None:
                raise already_exists(kind, name)
            obj["apiVersion"], obj["kind"] = kind.api_version, kind.kind
            if kind.has_status and validate:
                obj.pop("status", None)  # a client's create never writes status (the controller's may)
            self._finish(kind, obj, None, validate)
            managers = fm.update({}, obj, {}, manager, kind.api_version, self.now())
            stored = Stored(obj, managers)
            if dry_run:
                return self.render(kind, stored)
            return self._commit(kind, ns if kind.namespaced else "", name, stored, "ADDED")

    def apply(self, kind: Kind, ns: str | None, name: str, body: Any, manager: str, force: bool,
              *, dry_run: bool = False) -> tuple[int, dict]:
        """Server-side apply; (201, obj) when it created the object, else (200, obj)."""
        with self.cond:
            if kind.namespaced:
                self.require_namespace(ns)
            if not isinstance(body, dict):
                raise bad_request("the object provided is unrecognized (must be of type %s)" % kind.kind)
            config = fm.strip_nulls(body)
            meta = config.get("metadata") or {}
            if config.get("apiVersion") != kind.api_version or config.get("kind") != kind.kind:
                raise bad_request(f"the API version in the data ({config.get('apiVersion')}) does not match "
                                  f"the expected API version ({kind.api_version})"
                                  if config.get("apiVersion") != kind.api_version else
                                  f"the kind in the data ({config.get('kind')}) does not match the expected kind "
                                  f"({kind.kind})")
            if meta.get("name") != name:
                raise bad_request(f"the name of the object ({meta.get('name')}) does not match the name on the URL ({name})")
            if kind.namespaced and meta.get("namespace") not in (None, ns):
                raise bad_request("the namespace of the provided object does not match the namespace sent on the request")
            if meta.get("managedFields"):
                raise bad_request("metadata.managedFields must be nil")
            config.pop("status", None)  # apply to the main resource never writes status
            stored = self.lookup(kind, ns, name)
            if stored is not None and meta.get("resourceVersion") not in (None, stored.obj["metadata"]["resourceVersion"]):
                raise stale(kind, name)
            meta = {k: v for k, v in meta.items() if k not in ("resourceVersion", "uid", "creationTimestamp", "generation")}
            config["metadata"] = meta
            live = stored.obj if stored else {"apiVersion": kind.api_version, "kind": kind.kind,
                                              "metadata": {"name": name, **({"namespace": ns} if kind.namespaced else {})}}
            try:
                obj, managers = fm.apply(live, stored.managers if stored else {}, config, manager,
                                         kind.api_version, force, self.now())
            except fm.ApplyConflict as e:
                raise apply_conflict(e.conflicts) from None
            if kind.namespaced:
                obj["metadata"]["namespace"] = ns
            self._finish(kind, obj, stored.obj if stored else None, True)
            new = Stored(obj, managers)
            if stored is not None and obj == stored.obj and fm.same_ownership(managers, stored.managers):
                return 200, self.render(kind, stored)  # a no-op apply changes nothing, not even rv
            if dry_run:
                return (200 if stored else 201), self.render(kind, new)
            return (200 if stored else 201), self._commit(kind, ns or "", name, new, "MODIFIED" if stored else "ADDED")

    def update(self, kind: Kind, ns: str | None, name: str, change: Callable[[dict], dict], manager: str,
               *, subresource: str | None = None, validate: bool = True, dry_run: bool = False,
               expect_rv: str | None = None) -> dict:
        """A non-apply write: ``change`` gets a copy of the live object and returns the new one."""
        with self.cond:
            stored = self.lookup(kind, ns, name)
            if stored is None:
                raise not_found(kind, name)
            if expect_rv and expect_rv != stored.obj["metadata"]["resourceVersion"]:
                raise stale(kind, name)
            old = stored.obj
            new = change(copy.deepcopy(old))
            if not isinstance(new, dict):
                raise bad_request("the object provided is unrecognized")
            new.get("metadata", {}).pop("managedFields", None)
            if subresource == "status":
                status = new.get("status")
                new = copy.deepcopy(old)
                if status is None:
                    new.pop("status", None)
                else:
                    new["status"] = status
            else:
                meta = new.setdefault("metadata", {})
                if meta.get("name", name) != name:
                    raise bad_request(f"the name of the object ({meta.get('name')}) does not match the name on the URL ({name})")
                meta["name"] = name
                if kind.namespaced:
                    meta["namespace"] = ns
                new["apiVersion"], new["kind"] = kind.api_version, kind.kind
            if subresource != "status":
                self._finish(kind, new, old, validate)
            else:
                new["metadata"] = copy.deepcopy(old["metadata"])
            managers = fm.update(old, new, stored.managers, manager, kind.api_version, self.now(), subresource)
            if new == old:
                return self.render(kind, stored)
            result = Stored(new, managers)
            if dry_run:
                return self.render(kind, result)
            return self._commit(kind, ns or "", name, result, "MODIFIED")

    def delete(self, kind: Kind, ns: str | None, name: str, propagation: str | None = None,
               *, dry_run: bool = False) -> dict:
        """Deletes at once (no graceful termination, no finalizers, a namespace with
        everything in it); dependents (by ownerReferences) go too, or are orphaned with
        ``Orphan``."""
        with self.cond:
            stored = self.lookup(kind, ns, name)
            if stored is None:
                raise not_found(kind, name)
            if dry_run:
                return self.render(kind, stored)
            uid = stored.obj["metadata"]["uid"]
            final = self._commit(kind, ns or "", name, None, "DELETED")
            if kind.kind == "Namespace":
                for (k, ons, oname) in [key for key in self.objects if key[1] == name and key[0] != "Namespace"]:
                    if (k, ons, oname) in self.objects:
                        self._commit(KINDS[k], ons, oname, None, "DELETED")
                return final
            for (k, ons, oname), dep in list(self.objects.items()):
                refs = dep.obj["metadata"].get("ownerReferences") or []
                if ons == (ns or "") and any(r.get("uid") == uid for r in refs):
                    dkind = KINDS[k]
                    if propagation == "Orphan":
                        self.update(dkind, ons, oname, _drop_owner(uid), "garbage-collector", validate=False)
                    elif self.lookup(dkind, ons, oname) is not None:
                        self.delete(dkind, ons, oname, propagation)
            return final

    # -- logs

    def append_log(self, ns: str, pod: str, container_id: str, line: str) -> None:
        with self.cond:
            self.logs.setdefault((ns, pod, container_id), []).append((self.clock(), line))
            self.cond.notify_all()


def _rv(event: WatchEvent) -> int:
    return event.rv


def _spec_of(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


def _drop_owner(uid: str) -> Callable[[dict], dict]:
    def change(obj: dict) -> dict:
        refs = [r for r in obj["metadata"].get("ownerReferences") or [] if r.get("uid") != uid]
        if refs:
            obj["metadata"]["ownerReferences"] = refs
        else:
            obj["metadata"].pop("ownerReferences", None)
        return obj
    return change


_ALNUM = "bcdfghjklmnpqrstvwxz2456789"  # k8s.io/apimachinery/pkg/util/rand


def _random_suffix(n: int = 5) -> str:
    import random
    return "".join(random.choice(_ALNUM) for _ in range(n))


# --------------------------------------------------------------------------- patches


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def strategic_merge_patch(target: Any, patch: Any, name: str | None = None) -> Any:
    """A strategic merge patch without directives: maps merge (null deletes), the lists of
    fieldmanager.LIST_KEYS merge by key, other lists are replaced."""
    if isinstance(patch, dict) and isinstance(target, dict):
        out = dict(target)
        for k, v in patch.items():
            if k.startswith("$"):
                continue
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = strategic_merge_patch(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(patch, list) and isinstance(target, list):
        keys = fm._list_keys(name, patch)
        if keys and (not target or fm._list_keys(name, target) == keys):
            out_list = [copy.deepcopy(e) for e in target]
            for entry in patch:
                item = fm._item(entry, keys)
                idx = next((i for i, e in enumerate(out_list) if item.matches(e)), None)
                if entry.get("$patch") == "delete":
                    if idx is not None:
                        del out_list[idx]
                elif idx is None:
                    out_list.append(copy.deepcopy(entry))
                else:
                    out_list[idx] = strategic_merge_patch(out_list[idx], entry)
            return out_list
    return copy.deepcopy(patch)


def json_patch(target: Any, ops: Any) -> Any:
    """RFC 6902 (add, remove, replace, test, move, copy)."""
    if not isinstance(ops, list):
        raise bad_request("the server rejected our request due to an error in our request")
    doc = copy.deepcopy(target)

    def walk(pointer: str) -> tuple[Any, str]:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]
        cur = doc
        for p in parts[:-1]:
            cur = cur[int(p)] if isinstance(cur, list) else cur[p]
        return cur, parts[-1]

    def read(pointer: str) -> Any:
        parent, last = walk(pointer)
        return parent[int(last)] if isinstance(parent, list) else parent[last]

    try:
        for op in ops:
            kind, path = op["op"], op["path"]
            if kind == "test":
                if read(path) != op.get("value"):
                    raise ApiStatus(422, "Invalid", f"the server rejected our request due to an error in our request")
                continue
            if kind in ("move", "copy"):
                value = copy.deepcopy(read(op["from"]))
                if kind == "move":
                    parent, last = walk(op["from"])
                    del parent[int(last) if isinstance(parent, list) else last]
                kind, op = "add", {"value": value}
            parent, last = walk(path)
            if kind == "add":
                if isinstance(parent, list):
                    parent.insert(len(parent) if last == "-" else int(last), copy.deepcopy(op["value"]))
                else:
                    parent[last] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del parent[int(last) if isinstance(parent, list) else last]
            elif kind == "replace":
                idx = int(last) if isinstance(parent, list) else last
                if not isinstance(parent, list) and idx not in parent:
                    raise KeyError(last)
                parent[idx] = copy.deepcopy(op["value"])
            else:
                raise bad_request(f"Unexpected kind: {kind}")
    except (KeyError, IndexError, ValueError, TypeError) as e:
        raise ApiStatus(422, "Invalid", f"the server rejected our request due to an error in our request: {e}") from None
    return doc


# --------------------------------------------------------------------------- routing


@dataclass
class Route:
    kind: Kind
    namespace: str | None  # None: all namespaces (list/watch), or cluster-scoped
    name: str | None = None
    subresource: str | None = None
    proxy_path: str = "/"  # the path a pod proxy request forwards (subresource "proxy")

    @property
    def resource(self) -> str:
        return self.kind.plural + (f"/{self.subresource}" if self.subresource else "")


def parse_route(path: str) -> Route | str:
    """A Route for a resource path, or the discovery document's name."""
    parts = [p for p in path.split("/") if p]
    if path in ("/version", "/api", "/apis"):
        return path
    if parts[:1] == ["api"] and len(parts) >= 2:
        prefix, rest = f"/api/{parts[1]}", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        prefix, rest = f"/apis/{parts[1]}/{parts[2]}", parts[3:]
    else:
        raise NOT_FOUND_PATH
    if not rest:
        if any(k.prefix == prefix for k in KINDS.values()):
            return prefix
        raise NOT_FOUND_PATH
    ns = None
    if rest[0] == "namespaces":
        if len(rest) <= 2:
            if prefix != "/api/v1":
                raise NOT_FOUND_PATH
            return Route(KINDS["Namespace"], None, rest[1] if len(rest) == 2 else None)
        ns, rest = rest[1], rest[2:]
    kind = _BY_PATH.get((prefix, rest[0]))
    if kind is not None and kind.kind == "Pod" and ns is not None and len(rest) >= 3 \
            and rest[2] == "proxy":
        tail = "/".join(rest[3:])
        return Route(kind, ns, rest[1], "proxy",
                     "/" + tail + ("/" if tail and path.endswith("/") else ""))
    if kind is None or len(rest) > 3 or (ns is None and len(rest) > 1 and kind.namespaced):
        raise NOT_FOUND_PATH
    route = Route(kind, ns, rest[1] if len(rest) > 1 else None, rest[2] if len(rest) > 2 else None)
    if route.subresource not in (None, "status", "log") or (route.subresource == "log" and kind.kind != "Pod") \
            or (route.subresource == "status" and not kind.has_status):
        raise NOT_FOUND_PATH
    return route


def _discovery(doc: str, host: str) -> dict:
    if doc == "/version":
        return {"major": "1", "minor": "34", "gitVersion": "v1.34.0-kubefake", "gitCommit": "kubefake",
                "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24.0",
                "compiler": "gc", "platform": "linux/amd64"}
    if doc == "/api":
        return {"kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": host}]}
    if doc == "/apis":
        groups: dict[str, str] = {}
        for k in KINDS.values():
            if k.group:
                groups.setdefault(k.group, k.version)
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
            {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
             "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v}} for g, v in groups.items()]}
    resources = []
    for k in KINDS.values():
        if k.prefix != doc:
            continue
        verbs = ["get", "list", "watch"] + (["create", "update", "patch", "delete"] if k.client_writable else [])
        resources.append({"name": k.plural, "singularName": k.singular, "namespaced": k.namespaced,
                          "kind": k.kind, "verbs": verbs})
        if k.has_status:
            resources.append({"name": f"{k.plural}/status", "singularName": "", "namespaced": k.namespaced,
                              "kind": k.kind, "verbs": ["get", "patch", "update"]})
        if k.kind == "Pod":
            resources.append({"name": "pods/log", "singularName": "", "namespaced": True, "kind": "Pod",
                              "verbs": ["get"]})
            resources.append({"name": "pods/proxy", "singularName": "", "namespaced": True, "kind": "Pod",
                              "verbs": ["get"]})
    group_version = doc.removeprefix("/api/").removeprefix("/apis/")
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}


# --------------------------------------------------------------------------- HTTP


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_HTTPServer"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def setup(self) -> None:
        super().setup()
        # headers and body go out in two writes: without this, Nagle's algorithm and the
        # client's delayed ACK hold every response back by ~40 ms
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.fake._connections.add(self.connection)

    def finish(self) -> None:
        self.server.fake._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # -- plumbing

    def _send_json(self, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _start_stream(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _end_stream(self) -> None:
        try:
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass

    def _client_gone(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _dispatch(self, method: str) -> None:
        fake = self.server.fake
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        fake._record(RecordedRequest(method, url.path, query, content_type, raw.decode("utf-8", "replace"),
                                     {k.lower(): v for k, v in self.headers.items()}))
        try:
            if url.path not in ("/version", "/healthz", "/livez", "/readyz"):
                if self.headers.get("Authorization") != f"Bearer {fake.token}":
                    raise UNAUTHORIZED
            if url.path in ("/healthz", "/livez", "/readyz"):
                data = b"ok"
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(data)
                return
            route = parse_route(url.path)
            if isinstance(route, str):
                if method != "GET":
                    raise ApiStatus(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
                self._send_json(200, _discovery(route, f"127.0.0.1:{fake.port}"))
                return
            self._resource(method, route, query, content_type, raw)
        except ApiStatus as e:
            self._send_json(e.code, e.body())
        except (BrokenPipeError, ConnectionResetError):
            pass

    # -- resources

    def _verb(self, method: str, route: Route, query: dict) -> str:
        if method == "GET":
            if route.name is None:
                return "watch" if query.get("watch") in ("true", "1") else "list"
            return "get"
        return {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[method]

    def _manager(self, query: dict) -> str:
        if query.get("fieldManager"):
            return query["fieldManager"]
        agent = self.headers.get("User-Agent") or "unknown"
        return agent.split("/", 1)[0]  # the apiserver's default: the User-Agent's prefix

    def _resource(self, method: str, route: Route, query: dict, content_type: str, raw: bytes) -> None:
        fake = self.server.fake
        store = fake.store
        kind = route.kind
        verb = self._verb(method, route, query)
        fake._authorize(verb, route)
        dry_run = query.get("dryRun") == "All"
        if route.subresource == "proxy":
            if method != "GET":
                raise ApiStatus(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
            self._proxy(route, query)
            return
        if method != "GET" and route.subresource == "log":
            raise ApiStatus(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        if method != "GET" and not kind.client_writable:
            raise fake._forbidden(verb, route)  # only the controller stand-in (or a test) writes these
        if route.name is None:
            if method == "GET":
                if verb == "watch":
                    self._watch(route, query)
                else:
                    self._list(route, query)
                return
            if method == "POST" and (route.namespace is not None or not kind.namespaced):
                body = self._json_body(raw)
                obj = store.create(kind, route.namespace, body, self._manager(query), dry_run=dry_run)
                self._send_json(201, obj)
                return
            raise ApiStatus(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

        if route.subresource == "log":
            self._log(route, query)
            return
        if method == "GET":
            self._send_json(200, store.get(kind, route.namespace, route.name))
        elif method == "PATCH":
            self._patch(route, query, content_type, raw, dry_run)
        elif method == "PUT":
            body = self._json_body(raw)
            expect = (body.get("metadata") or {}).get("resourceVersion")
            manager = self._manager(query)
            obj = store.update(kind, route.namespace, route.name, lambda old: copy.deepcopy(body), manager,
                               subresource=route.subresource, dry_run=dry_run, expect_rv=expect)
            self._send_json(200, obj)
        elif method == "DELETE":
            if route.subresource:
                raise ApiStatus(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
            options = self._json_body(raw) if raw else {}
            propagation = query.get("propagationPolicy") or options.get("propagationPolicy")
            obj = store.delete(kind, route.namespace, route.name, propagation, dry_run=dry_run)
            if kind.kind == "Pod":
                self._send_json(200, obj)
            else:
                self._send_json(200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                                      "details": _details(kind, route.name, uid=obj["metadata"]["uid"])})
        else:
            raise ApiStatus(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    def _json_body(self, raw: bytes) -> Any:
        try:
            body = json.loads(raw or b"null")
        except ValueError as e:
            raise bad_request(f"the object provided is unrecognized: {e}") from None
        if not isinstance(body, dict):
            raise bad_request("the object provided is unrecognized (must be an object)")
        return body

    def _patch(self, route: Route, query: dict, content_type: str, raw: bytes, dry_run: bool) -> None:
        store = self.server.fake.store
        patch_type = PATCH_TYPES.get(content_type)
        if patch_type is None:
            raise ApiStatus(415, "UnsupportedMediaType",
                            f"the body of the request was in an unknown format - accepted media types include: "
                            + ", ".join(PATCH_TYPES))
        if patch_type == "apply":
            if not query.get("fieldManager"):
                raise ApiStatus(422, "Invalid",
                                'PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required value: is required for apply patch',
                                {"group": "meta.k8s.io", "kind": "PatchOptions", "causes": [
                                    {"reason": "FieldValueRequired", "message": "Required value: is required for apply patch",
                                     "field": "fieldManager"}]})
            if route.subresource:
                raise ApiStatus(405, "MethodNotAllowed", "the fake applies to the main resource only")
            try:
                body = yaml.safe_load(raw.decode() or "null")
            except yaml.YAMLError as e:
                raise bad_request(f"error decoding YAML: {e}") from None
            exists = store.lookup(route.kind, route.namespace, route.name) is not None
            if not exists:
                self.server.fake._authorize("create", route)  # creating through apply needs create too
            code, obj = store.apply(route.kind, route.namespace, route.name, body, query["fieldManager"],
                                    query.get("force") == "true", dry_run=dry_run)
            self._send_json(code, obj)
            return
        if "force" in query:
            raise ApiStatus(422, "Invalid",
                            'PatchOptions.meta.k8s.io "" is invalid: force: Forbidden: may not be specified for non-apply patch',
                            {"group": "meta.k8s.io", "kind": "PatchOptions", "causes": [
                                {"reason": "FieldValueForbidden", "message": "Forbidden: may not be specified for non-apply patch",
                                 "field": "force"}]})
        try:
            patch = json.loads(raw or b"null")
        except ValueError as e:
            raise bad_request(f"error decoding patch: {e}") from None
        if patch_type == "merge":
            change = lambda old: merge_patch(old, patch)  # noqa: E731
        elif patch_type == "strategic":
            change = lambda old: strategic_merge_patch(old, patch)  # noqa: E731
        else:
            change = lambda old: json_patch(old, patch)  # noqa: E731
        obj = store.update(route.kind, route.namespace, route.name, change, self._manager(query),
                           subresource=route.subresource, dry_run=dry_run)
        self._send_json(200, obj)

    def _list(self, route: Route, query: dict) -> None:
        store = self.server.fake.store
        if route.namespace is not None and route.kind.namespaced:
            pass  # the apiserver lists an absent namespace as empty
        items, rv = store.list(route.kind, route.namespace, query.get("labelSelector"), query.get("fieldSelector"))
        start = 0
        if query.get("continue"):
            try:
                token = json.loads(base64.b64decode(query["continue"]))
                start, rv = token["start"], token["rv"]
            except (ValueError, KeyError):
                raise bad_request("continue key is not valid: illegal base64 data") from None
        meta: dict[str, Any] = {"resourceVersion": rv}
        limit = int(query.get("limit") or 0)
        if limit > 0 and start + limit < len(items):
            meta["continue"] = base64.b64encode(json.dumps({"start": start + limit, "rv": rv}).encode()).decode()
            meta["remainingItemCount"] = len(items) - start - limit
            items = items[start:start + limit]
        else:
            items = items[start:]
        self._send_json(200, {"kind": f"{route.kind.kind}List", "apiVersion": route.kind.api_version,
                              "metadata": meta, "items": items})

    def _watch(self, route: Route, query: dict) -> None:
        fake = self.server.fake
        store = fake.store
        kind = route.kind
        match_l = label_matcher(query.get("labelSelector"))
        match_f = field_matcher(kind, query.get("fieldSelector"))

        def matches(obj: dict | None) -> bool:
            return obj is not None and match_l(obj) and match_f(obj)

        deadline = time.monotonic() + float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
        rv_param = query.get("resourceVersion")
        initial: list[dict] = []
        with store.cond:
            if rv_param in (None, "", "0"):
                for (k, ons, _), stored in sorted(store.objects.items()):
                    if k == kind.kind and (route.namespace is None or ons == route.namespace) and matches(stored.obj):
                        initial.append({"type": "ADDED", "object": store.render(kind, stored)})
                since = store.rv
            else:
                try:
                    since = int(rv_param)
                except ValueError:
                    raise bad_request(f'invalid resource version "{rv_param}"') from None
                if since < store.compacted_rv:
                    initial.append({"type": "ERROR", "object": ApiStatus(
                        410, "Expired", f"too old resource version: {since} ({store.compacted_rv + 1})").body()})
        self._start_stream("application/json")
        try:
            for event in initial:
                self._chunk(json.dumps(event).encode() + b"\n")
            if initial and initial[-1]["type"] == "ERROR":
                self._end_stream()
                return
            while True:
                with store.cond:
                    pending = store.history[bisect.bisect_right(store.history, since, key=_rv):]
                    if not pending:
                        store.cond.wait(0.1)
                        pending = store.history[bisect.bisect_right(store.history, since, key=_rv):]
                    closing = store.closing
                for e in pending:
                    since = e.rv
                    if e.kind is not kind or (route.namespace is not None and kind.namespaced and e.namespace != route.namespace):
                        continue
                    now_m, was_m = matches(e.obj), matches(e.old)
                    if e.type == "MODIFIED" and now_m and not was_m:
                        type_ = "ADDED"
                    elif e.type == "MODIFIED" and was_m and not now_m:
                        type_ = "DELETED"
                    elif (e.type == "MODIFIED" and now_m) or (e.type != "MODIFIED" and now_m):
                        type_ = e.type
                    else:
                        continue
                    self._chunk(json.dumps({"type": type_, "object": e.obj}).encode() + b"\n")
                if closing or (deadline is not None and time.monotonic() >= deadline):
                    break
                if not pending and self._client_gone():
                    return
            self._end_stream()
        except OSError:
            pass

    def _log(self, route: Route, query: dict) -> None:
        fake = self.server.fake
        store = fake.store
        with store.cond:
            pod = store.get(route.kind, route.namespace, route.name)
            container = _log_container(pod, query.get("container"))
            if not (pod.get("spec") or {}).get("nodeName"):
                lines: list[tuple[float, str]] = []  # not scheduled: the apiserver answers empty
                container_id = None
            else:
                container_id = _log_container_id(pod, container, query.get("previous") == "true")
                lines = list(store.logs.get((route.namespace, route.name, container_id), []))
        tail = int(query["tailLines"]) if query.get("tailLines") else None
        since = float(query["sinceSeconds"]) if query.get("sinceSeconds") else None
        stamps = query.get("timestamps") == "true"
        limit = int(query["limitBytes"]) if query.get("limitBytes") else None

        def pick(entries: list[tuple[float, str]]) -> list[tuple[float, str]]:
            if since is not None:
                cutoff = store.clock() - since
                entries = [e for e in entries if e[0] >= cutoff]
            if tail is not None:
                entries = entries[-tail:] if tail > 0 else []
            return entries

        def render(entries: Iterable[tuple[float, str]]) -> bytes:
            return b"".join(((rfc3339_nano(t) + " ") if stamps else "").encode() + line.encode() + b"\n"
                            for t, line in entries)

        first = pick(lines)
        if query.get("follow") != "true" or container_id is None:
            data = render(first)
            if limit is not None:
                data = data[:limit]
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self._start_stream("text/plain")
        sent_bytes = 0
        try:
            data = render(first)
            self._chunk(data)
            sent_bytes += len(data)
            seen = len(lines)
            key = (route.namespace, route.name, container_id)
            while limit is None or sent_bytes < limit:
                with store.cond:
                    current = store.logs.get(key, [])
                    if len(current) <= seen:
                        store.cond.wait(0.1)
                        current = store.logs.get(key, [])
                    new = current[seen:]
                    seen = len(current)
                    live = store.lookup(route.kind, route.namespace, route.name)
                    running = live is not None and _running_container_id(live.obj, container) == container_id
                    closing = store.closing
                if new:
                    data = render(new)
                    self._chunk(data)
                    sent_bytes += len(data)
                if not running or closing:
                    break  # the container ended (or the pod went): the stream ends
                if not new and self._client_gone():
                    return
            self._end_stream()
        except OSError:
            pass

    def _proxy(self, route: Route, query: dict) -> None:
        """GET through the pod proxy: upstream's ResourceLocation picks the pod's address,
        then the request goes to the backend registered for that pod and port."""
        fake = self.server.fake
        name, port = _split_proxy_name(route.name or "")
        target, port = _proxy_location(fake.store.get(KINDS["Pod"], route.namespace, name), port)
        backend = fake._backend(route.namespace, name, port)
        unreachable = f"error trying to reach service: dial tcp {target}: connect: connection refused"
        if backend is None:
            raise ApiStatus(503, "ServiceUnavailable", unreachable)
        where = urlsplit(backend)
        conn = http.client.HTTPConnection(where.hostname, where.port or 80, timeout=PROXY_TIMEOUT)
        try:
            conn.request("GET", where.path.rstrip("/") + route.proxy_path
                         + (f"?{urlencode(query)}" if query else ""))
            resp = conn.getresponse()
            body = resp.read()
            headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_HEADERS]
        except ConnectionRefusedError:
            raise ApiStatus(503, "ServiceUnavailable", unreachable) from None
        except TimeoutError:
            raise ApiStatus(503, "ServiceUnavailable",
                            f"error trying to reach service: dial tcp {target}: i/o timeout") from None
        except (OSError, http.client.HTTPException) as e:
            raise ApiStatus(503, "ServiceUnavailable", f"error trying to reach service: {e}") from None
        finally:
            conn.close()
        self.send_response(resp.status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _split_proxy_name(name: str) -> tuple[str, str]:
    """``(pod, port)`` of a proxy request's ``[SCHEME:]NAME[:PORT]`` (port "" when not
    given), as upstream's SplitSchemeNamePort."""
    parts = name.split(":")
    if len(parts) == 3 and parts[0] in ("", "http", "https"):
        parts = parts[1:]  # the scheme: the fake's backends speak plain HTTP
    if len(parts) > 2 or not parts[0]:
        raise bad_request(f'invalid pod request "{name}"')
    return parts[0], parts[1] if len(parts) == 2 else ""


def _proxy_location(pod: dict, port: str) -> tuple[str, int]:
    """``("IP:PORT", PORT)`` a pod proxy request goes to: upstream's ResourceLocation
    (no port: the pod's first container port; the IP must be a unicast one)."""
    if not port:
        ports = [p.get("containerPort") for c in (pod.get("spec") or {}).get("containers") or []
                 for p in c.get("ports") or []]
        port = str(ports[0]) if ports else "80"
    ip = (pod.get("status") or {}).get("podIP") or ""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        addr = None
    if addr is None or addr.is_loopback or addr.is_link_local or addr.is_multicast or addr.is_unspecified:
        raise bad_request("address not allowed")
    if not port.isdigit():
        raise ApiStatus(503, "ServiceUnavailable",
                        f"error trying to reach service: dial tcp: address {ip}:{port}: unknown port")
    return f"{ip}:{port}", int(port)


def _log_container(pod: dict, container: str | None) -> str:
    """upstream's ValidateContainer (pkg/registry/core/pod/strategy.go)."""
    name = pod["metadata"]["name"]
    names = [c.get("name") for c in (pod.get("spec") or {}).get("containers") or []]
    init = [c.get("name") for c in (pod.get("spec") or {}).get("initContainers") or []]
    if not container:
        if len(names) == 1:
            return names[0]
        if not names:
            raise bad_request(f"no containers in pod {name}")
        msg = f"a container name must be specified for pod {name}, choose one of: [{' '.join(names)}]"
        if init:
            msg += f" or one of the init containers: [{' '.join(init)}]"
        raise bad_request(msg)
    if container not in names + init:
        raise bad_request(f"container {container} is not valid for pod {name}")
    return container


def _container_status(pod: dict, container: str) -> dict | None:
    status = pod.get("status") or {}
    for cs in (status.get("containerStatuses") or []) + (status.get("initContainerStatuses") or []):
        if cs.get("name") == container:
            return cs
    return None


def _running_container_id(pod: dict, container: str) -> str | None:
    cs = _container_status(pod, container)
    if cs and "running" in (cs.get("state") or {}):
        return cs.get("containerID")
    return None


def _log_container_id(pod: dict, container: str, previous: bool) -> str:
    """The kubelet's validateContainerLogStatus: which run of the container to read."""
    name = pod["metadata"]["name"]
    cs = _container_status(pod, container)
    if cs is None:
        raise bad_request(f'container "{container}" in pod "{name}" is waiting to start: ContainerCreating')
    state = cs.get("state") or {}
    last = (cs.get("lastState") or {}).get("terminated")
    if previous:
        if not last or not last.get("containerID"):
            raise bad_request(f'previous terminated container "{container}" in pod "{name}" not found')
        return last["containerID"]
    if "running" in state:
        return cs["containerID"]
    if "terminated" in state:
        cid = state["terminated"].get("containerID") or (last or {}).get("containerID")
        if cid:
            return cid
    if last:
        if not last.get("containerID"):
            raise bad_request(f'container "{container}" in pod "{name}" is terminated')
        return last["containerID"]
    reason = (state.get("waiting") or {}).get("reason")
    if reason == "ErrImagePull":
        raise bad_request(f'container "{container}" in pod "{name}" is waiting to start: image can\'t be pulled')
    if reason == "ImagePullBackOff":
        raise bad_request(f'container "{container}" in pod "{name}" is waiting to start: trying and failing to pull image')
    if reason:
        raise bad_request(f'container "{container}" in pod "{name}" is waiting to start: {reason}')
    raise bad_request(f'container "{container}" in pod "{name}" is waiting to start - no logs yet')


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    fake: "KubeFake"


# --------------------------------------------------------------------------- facade


class KubeFake:
    """The fake apiserver: start it (or use it as a context manager), point a kubeconfig
    at it, drive the world with controller.Controller, read what the client sent.

    Args:
        token: the bearer token every request must carry (else 401).
        user: the user name RBAC messages (403) name.
        clock: seconds since the epoch, for timestamps (default ``time.time``).
    """

    def __init__(self, *, token: str = "kubefake-token", user: str = "system:serviceaccount:default:mlbuild",
                 clock: Callable[[], float] = time.time):
        self.token = token
        self.user = user
        self.store = Store(clock)
        self.requests: list[RecordedRequest] = []
        self._forbidden_rules: list[Forbid] = []
        self._backends: dict[tuple[str, str, int], str] = {}  # (namespace, pod, port) -> URL
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.add_namespace("default")

    # -- lifecycle

    def start(self) -> "KubeFake":
        httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        httpd.fake = self
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="kubefake", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self.store.cond:
            self.store.closing = True
            self.store.cond.notify_all()
        if self._httpd is not None:
            self._httpd.shutdown()
            for conn in list(self._connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "KubeFake":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "not started"
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_kubeconfig(self, path: str | Path, *, context: str = "kubefake", namespace: str | None = None,
                         token: str | None = None) -> Path:
        """Write a kubeconfig whose current context points at this server with a bearer
        token (``token`` overrides the right one, to test a 401)."""
        ctx: dict[str, Any] = {"cluster": "kubefake", "user": "kubefake-user"}
        if namespace:
            ctx["namespace"] = namespace
        config = {
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": "kubefake", "cluster": {"server": self.url}}],
            "users": [{"name": "kubefake-user", "user": {"token": token or self.token}}],
            "contexts": [{"name": context, "context": ctx}],
            "current-context": context,
        }
        path = Path(path)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    # -- what the client sent

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def requests_to(self, method: str | None = None, path: str | None = None) -> list[RecordedRequest]:
        """The recorded requests with this method and/or path (exact), oldest first."""
        with self._lock:
            return [r for r in self.requests
                    if (method is None or r.method == method) and (path is None or r.path == path)]

    # -- what listens in pods (the pod proxy's backends)

    def pod_backend(self, namespace: str, pod: str, port: int, url: str | None) -> None:
        """Make ``url`` (``http://127.0.0.1:PORT``) what listens on ``port`` of ``pod``:
        the pod proxy (``pods/NAME:PORT/proxy/PATH``) forwards ``GET PATH`` there. None:
        nothing listens on it (503, as for a port no process listens on). The pod itself
        must exist (else 404) and have an IP (else 400): the controller gives one from
        its second state on."""
        with self._lock:
            if url is None:
                self._backends.pop((namespace, pod, int(port)), None)
            else:
                self._backends[(namespace, pod, int(port))] = url

    def _backend(self, namespace: str, pod: str, port: int) -> str | None:
        with self._lock:
            return self._backends.get((namespace, pod, port))

    # -- authorization

    def forbid(self, resource: str = "*", verbs: Iterable[str] = ("*",), namespace: str | None = None) -> None:
        """Answer 403 to these verbs on this resource (``deployments``, ``pods/log``, ``*``)."""
        for verb in verbs:
            self._forbidden_rules.append(Forbid(verb, resource, namespace))

    def allow_all(self) -> None:
        self._forbidden_rules.clear()

    def _forbidden(self, verb: str, route: Route) -> ApiStatus:
        kind = route.kind
        where = (f'in the namespace "{route.namespace}"' if route.namespace and kind.namespaced
                 else "at the cluster scope")
        reason = (f'User "{self.user}" cannot {verb} resource "{route.resource}" in API group "{kind.group}" {where}')
        subject = f'{kind.qualified} "{route.name}"' if route.name else kind.qualified
        return ApiStatus(403, "Forbidden", f"{subject} is forbidden: {reason}", _details(kind, route.name))

    def _authorize(self, verb: str, route: Route) -> None:
        for rule in self._forbidden_rules:
            if rule.verb in ("*", verb) and rule.resource in ("*", route.resource) \
                    and rule.namespace in (None, route.namespace):
                raise self._forbidden(verb, route)

    # -- the world, from Python (tests and the controller)

    def add_namespace(self, name: str) -> None:
        ns_kind = KINDS["Namespace"]
        with self.store.cond:
            if self.store.lookup(ns_kind, None, name) is None:
                self.store.create(ns_kind, None, {
                    "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}},
                    "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}},
                    "kube-apiserver", validate=False)

    def get(self, kind: str, namespace: str | None, name: str) -> dict | None:
        """The object as a client would GET it, or None."""
        try:
            return self.store.get(KINDS[kind], namespace, name)
        except ApiStatus:
            return None

    def list(self, kind: str, namespace: str | None = None, labels: str | None = None,
             fields: str | None = None) -> list[dict]:
        return self.store.list(KINDS[kind], namespace, labels, fields)[0]

    def create(self, obj: dict, *, manager: str = "kube-controller-manager") -> dict:
        """Create an object as a component of the cluster would (no validation; status kept).

        Raises:
            ApiStatus: 404 when its namespace is missing, 409 AlreadyExists.
        """
        kind = KINDS[obj["kind"]]
        return self.store.create(kind, obj["metadata"].get("namespace"), obj, manager, validate=False)

    def update(self, kind: str, namespace: str | None, name: str, change: Callable[[dict], dict | None], *,
               manager: str = "kube-controller-manager", subresource: str | None = None) -> dict:
        """Change an object as a component would: ``change`` edits (or returns) a copy.

        Raises:
            ApiStatus: 404 when it does not exist.
        """
        def run(obj: dict) -> dict:
            out = change(obj)
            return obj if out is None else out
        return self.store.update(KINDS[kind], namespace, name, run, manager, subresource=subresource,
                                 validate=False)

    def set_status(self, kind: str, namespace: str | None, name: str, status: dict, *,
                   manager: str = "kube-controller-manager") -> dict:
        """Replace ``.status``, as a PUT to the status subresource.

        Raises:
            ApiStatus: 404 when it does not exist.
        """
        def change(obj: dict) -> dict:
            obj["status"] = copy.deepcopy(status)
            return obj
        return self.store.update(KINDS[kind], namespace, name, change, manager, subresource="status")

    def delete(self, kind: str, namespace: str | None, name: str, propagation: str | None = None) -> dict:
        """Delete at once, with dependents unless ``propagation`` is "Orphan".

        Raises:
            ApiStatus: 404 when it does not exist.
        """
        return self.store.delete(KINDS[kind], namespace, name, propagation)

    def compact(self) -> None:
        """Forget the watch history: a watch from an older resourceVersion gets 410 Expired."""
        with self.store.cond:
            self.store.compacted_rv = self.store.rv
            self.store.history.clear()
