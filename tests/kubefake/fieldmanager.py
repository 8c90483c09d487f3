"""Server-side apply field ownership, simplified: which manager owns which field.

Pure functions over plain dicts; the store (server.py) keeps one ``Managers`` per object.

A *field set* maps each owned path to its value. A path is a tuple of elements: a str
is a map key (``("spec", "replicas")``), an :class:`Item` is one entry of an associative
list (``("spec", "template", "spec", "containers", Item((("name", "app"),)), "image")``).
Besides the leaves the set holds *members* (value :data:`MEMBER`): list items and
string maps such as labels, as the ``.: {}`` entries of the real managedFields.

What follows the real structured-merge-diff, and what is simpler:

* Conflicts, as the apiserver: applying a field that another manager owns, with a
  different value than the live one, is a conflict unless ``force``; with force the
  applier takes it over. Equal values are shared.
* Fields the applier owned before and omits now are removed when no other manager owns
  them (for a list item: when nobody owns anything inside it).
* An Update (merge/strategic/JSON patch, PUT, the controller's writes) takes every field
  it changed from the others, and never conflicts.
* Lists are associative only for the known keys of ``LIST_KEYS`` (containers by name,
  ports by port and protocol, ...), checked by field name rather than by the OpenAPI
  schema; every other list is atomic. ``LabelSelector`` is atomic (as upstream), every
  other map is granular.
* Not modelled: ``x-kubernetes-list-type: set`` (finalizers are atomic here), unions,
  defaulting of list keys other than ``protocol``, reordering of list items.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any, Iterable


class _Member:
    def __repr__(self) -> str:
        return "MEMBER"


MEMBER = _Member()
MISSING = object()

# Associative lists: field name -> merge keys (upstream's listMapKeys / patchMergeKey).
LIST_KEYS: dict[str, tuple[str, ...]] = {
    "containers": ("name",),
    "initContainers": ("name",),
    "ephemeralContainers": ("name",),
    "env": ("name",),
    "volumes": ("name",),
    "volumeMounts": ("mountPath",),
    "volumeDevices": ("devicePath",),
    "imagePullSecrets": ("name",),
    "conditions": ("type",),
    "ownerReferences": ("uid",),
    "hostAliases": ("ip",),
    "topologySpreadConstraints": ("topologyKey", "whenUnsatisfiable"),
    "resourceClaims": ("name",),
    "containerStatuses": ("name",),
    "initContainerStatuses": ("name",),
}
# A key that the apiserver defaults, so an item without it still matches.
KEY_DEFAULTS = {"protocol": "TCP"}
# Maps whose keys are data (real managedFields mark them with ".").
STRING_MAPS = {"labels", "annotations", "data", "stringData", "nodeSelector", "requests", "limits"}
# Not owned by anyone (the apiserver strips them from managedFields).
IGNORED_TOP = {"apiVersion", "kind", "status"}
IGNORED_METADATA = {
    "name", "namespace", "uid", "resourceVersion", "generation", "creationTimestamp",
    "managedFields", "selfLink", "deletionTimestamp", "deletionGracePeriodSeconds",
}


@dataclass(frozen=True)
class Item:
    """One entry of an associative list, named by its key fields (sorted by name)."""

    keys: tuple[tuple[str, Any], ...]

    def matches(self, entry: Any) -> bool:
        return isinstance(entry, dict) and all(
            entry.get(k, KEY_DEFAULTS.get(k, MISSING)) == v for k, v in self.keys
        )

    def __str__(self) -> str:  # fieldpath.PathElement.String: [name="app"]
        return "[" + ",".join(f"{k}={json.dumps(v)}" for k, v in self.keys) + "]"

    def fields_v1_key(self) -> str:  # k:{"containerPort":5001,"protocol":"TCP"}
        return "k:" + json.dumps(dict(self.keys), separators=(",", ":"), sort_keys=True)


Path = tuple  # of str | Item


def path_str(path: Path) -> str:
    """``.spec.template.spec.containers[name="app"].image``, as the apiserver prints it."""
    return "".join(str(el) if isinstance(el, Item) else "." + el for el in path)


def _list_keys(name: str | None, value: list) -> tuple[str, ...] | None:
    if name == "ports":
        first = next((e for e in value if isinstance(e, dict)), {})
        keys: tuple[str, ...] | None = ("containerPort", "protocol") if "containerPort" in first else ("port", "protocol")
    else:
        keys = LIST_KEYS.get(name or "")
    if keys is None:
        return None
    for entry in value:
        if not isinstance(entry, dict) or any(k not in entry and k not in KEY_DEFAULTS for k in keys):
            return None  # malformed for a keyed list: own it whole
    return keys


def _item(entry: dict, keys: tuple[str, ...]) -> Item:
    return Item(tuple(sorted((k, entry.get(k, KEY_DEFAULTS.get(k))) for k in keys)))


def _atomic_map(name: str | None, value: dict) -> bool:
    # metav1.LabelSelector is +structType=atomic; a Service's spec.selector is a plain map.
    return name == "selector" and ("matchLabels" in value or "matchExpressions" in value)


def field_set(obj: dict, subresource: str | None = None) -> dict[Path, Any]:
    """The owned paths of ``obj`` with their values (status only, for ``status``)."""
    out: dict[Path, Any] = {}
    if subresource == "status":
        if isinstance(obj.get("status"), dict):
            _walk(obj["status"], ("status",), "status", out)
        return out
    for k, v in obj.items():
        if k in IGNORED_TOP:
            continue
        if k == "metadata" and isinstance(v, dict):
            for mk, mv in v.items():
                if mk not in IGNORED_METADATA:
                    _walk(mv, ("metadata", mk), mk, out)
            continue
        _walk(v, (k,), k, out)
    return out


def _walk(value: Any, path: Path, name: str | None, out: dict) -> None:
    if isinstance(value, dict) and value and not _atomic_map(name, value):
        if name in STRING_MAPS:
            out[path] = MEMBER
        for k, v in value.items():
            _walk(v, path + (k,), k, out)
        return
    if isinstance(value, list) and value:
        keys = _list_keys(name, value)
        if keys:
            for entry in value:
                p = path + (_item(entry, keys),)
                out[p] = MEMBER
                for k, v in entry.items():
                    _walk(v, p + (k,), k, out)
            return
    out[path] = value


def get(obj: Any, path: Path) -> Any:
    """The value at ``path``, or :data:`MISSING`."""
    cur = obj
    for el in path:
        if isinstance(el, Item):
            if not isinstance(cur, list):
                return MISSING
            cur = next((e for e in cur if el.matches(e)), MISSING)
            if cur is MISSING:
                return MISSING
        else:
            if not isinstance(cur, dict) or el not in cur:
                return MISSING
            cur = cur[el]
    return cur


def remove(obj: dict, path: Path) -> None:
    """Delete the value at ``path`` (a list item when it ends with an Item) and the maps
    left empty by it, up to but not including the top-level field (``spec`` stays)."""
    trail: list[tuple[Any, Any]] = []  # (container, key or index)
    cur: Any = obj
    for el in path:
        if isinstance(el, Item):
            if not isinstance(cur, list):
                return
            idx = next((i for i, e in enumerate(cur) if el.matches(e)), None)
            if idx is None:
                return
            trail.append((cur, idx))
            cur = cur[idx]
        else:
            if not isinstance(cur, dict) or el not in cur:
                return
            trail.append((cur, el))
            cur = cur[el]
    container, key = trail.pop()
    del container[key]
    while len(trail) > 1:
        parent, key = trail.pop()
        child = parent[key]
        if isinstance(child, dict) and not child and not isinstance(key, int):
            del parent[key]
        else:
            break


def strip_nulls(value: Any) -> Any:
    """An applied configuration without its null fields (they say nothing in an apply)."""
    if isinstance(value, dict):
        return {k: strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [strip_nulls(v) for v in value]
    return value


def merge(live: Any, config: Any, name: str | None = None) -> Any:
    """``config`` merged over ``live``: maps key by key, associative lists item by item
    (new items appended), everything else replaced."""
    if isinstance(config, dict) and isinstance(live, dict) and not _atomic_map(name, config):
        out = dict(live)
        for k, v in config.items():
            out[k] = merge(live[k], v, k) if k in live else copy.deepcopy(v)
        return out
    if isinstance(config, list) and isinstance(live, list):
        keys = _list_keys(name, config)
        if keys and (not live or _list_keys(name, live) == keys):
            out_list = [copy.deepcopy(e) for e in live]
            for entry in config:
                item = _item(entry, keys)
                idx = next((i for i, e in enumerate(out_list) if item.matches(e)), None)
                if idx is None:
                    out_list.append(copy.deepcopy(entry))
                else:
                    out_list[idx] = merge(out_list[idx], entry)
            return out_list
    return copy.deepcopy(config)


@dataclass(frozen=True)
class ManagerKey:
    """A manager's identity, as upstream's BuildManagerIdentifier: appliers are one
    manager whatever version they apply; updaters are one per apiVersion."""

    manager: str
    operation: str  # "Apply" or "Update"
    api_version: str | None  # None for Apply
    subresource: str = ""

    def describe(self) -> str:
        """How a conflict message names it: ``"kubectl-edit" using apps/v1``."""
        out = json.dumps(self.manager)
        if self.subresource:
            out += f" with subresource {json.dumps(self.subresource)}"
        if self.operation == "Update":
            out += f" using {self.api_version}"
        return out


@dataclass
class ManagerEntry:
    paths: dict[Path, Any] = field(default_factory=dict)  # path -> MEMBER (only the keys matter)
    api_version: str = ""
    time: str = ""


Managers = dict  # ManagerKey -> ManagerEntry


@dataclass(frozen=True)
class Conflict:
    manager: ManagerKey
    path: Path


class ApplyConflict(Exception):
    def __init__(self, conflicts: list[Conflict]):
        super().__init__(conflict_message(conflicts))
        self.conflicts = conflicts


def conflict_message(conflicts: list[Conflict]) -> str:
    """Upstream's getConflictMessage, word for word."""
    if len(conflicts) == 1:
        c = conflicts[0]
        return f"Apply failed with 1 conflict: conflict with {c.manager.describe()}: {path_str(c.path)}"
    by_manager: dict[str, list[str]] = {}
    for c in conflicts:
        by_manager.setdefault(c.manager.describe(), []).append(path_str(c.path))
    lines = []
    for manager in sorted(by_manager):
        lines.append(f"conflicts with {manager}:")
        lines.extend(f"- {p}" for p in by_manager[manager])
    return f"Apply failed with {len(conflicts)} conflicts: " + "\n".join(lines)


def _owned_under(managers: Managers, prefix: Path, but: ManagerKey) -> bool:
    n = len(prefix)
    return any(
        key != but and any(p[:n] == prefix for p in entry.paths)
        for key, entry in managers.items()
    )


def apply(live: dict, managers: Managers, config: dict, manager: str, api_version: str,
          force: bool, now: str) -> tuple[dict, Managers]:
    """Server-side apply of ``config`` by ``manager`` onto ``live``.

    Returns the new object and managers (the inputs are not changed).

    Raises:
        ApplyConflict: another manager owns a field that ``config`` sets to another
            value, and ``force`` is False.
    """
    me = ManagerKey(manager, "Apply", None)
    applied = field_set(config)
    managers = {k: ManagerEntry(dict(v.paths), v.api_version, v.time) for k, v in managers.items()}
    conflicts = []
    for path, value in applied.items():
        if value is MEMBER:
            continue
        current = get(live, path)
        if current == value:
            continue
        for key, entry in managers.items():
            if key != me and path in entry.paths:
                conflicts.append(Conflict(key, path))
    if conflicts and not force:
        raise ApplyConflict(sorted(conflicts, key=lambda c: (c.manager.describe(), path_str(c.path))))
    for c in conflicts:
        managers[c.manager].paths.pop(c.path, None)

    previous = managers.get(me, ManagerEntry()).paths
    obj = merge(copy.deepcopy(live), config)
    dropped = [p for p in previous if p not in applied]
    # Deepest first, so a list item's fields go before the item itself.
    for path in sorted(dropped, key=len, reverse=True):
        if _owned_under(managers, path, me):
            continue
        parent = path[-2] if len(path) > 1 else None
        if isinstance(parent, Item) and any(k == path[-1] for k, _ in parent.keys):
            continue  # a key field goes with its item, not alone
        if isinstance(path[-1], Item) or get(obj, path) is not MISSING:
            remove(obj, path)
    managers[me] = ManagerEntry({p: MEMBER for p in applied}, api_version, now)
    return obj, {k: v for k, v in managers.items() if v.paths}


def update(old: dict, new: dict, managers: Managers, manager: str, api_version: str,
           now: str, subresource: str | None = None) -> Managers:
    """The managers after a non-apply write by ``manager`` turned ``old`` into ``new``:
    the writer takes every changed field, removed fields lose their owners."""
    before = field_set(old, subresource)
    after = field_set(new, subresource)
    changed = {p for p, v in after.items() if p not in before or (v is not MEMBER and before[p] != v)}
    removed = set(before) - set(after)
    me = ManagerKey(manager, "Update", api_version, subresource or "")
    out = {}
    for key, entry in managers.items():
        if (key.subresource == "status") != (subresource == "status"):
            out[key] = ManagerEntry(dict(entry.paths), entry.api_version, entry.time)
            continue
        paths = {p: MEMBER for p in entry.paths if p not in changed and p not in removed}
        out[key] = ManagerEntry(paths, entry.api_version, entry.time)
    mine = out.get(me, ManagerEntry(api_version=api_version))
    if changed:
        mine.paths.update({p: MEMBER for p in changed})
        mine.time = now
    out[me] = mine
    return {k: v for k, v in out.items() if v.paths}


def fields_v1(paths: Iterable[Path]) -> dict:
    """The FieldsV1 tree of a field set: ``{"f:spec": {"f:replicas": {}}}``."""
    paths = list(paths)
    root: dict = {}
    prefixes = {p[:i] for p in paths for i in range(1, len(p))}
    for path in paths:
        node = root
        for el in path:
            node = node.setdefault(el.fields_v1_key() if isinstance(el, Item) else "f:" + el, {})
        if path in prefixes:
            node["."] = {}
    return root


def managed_fields(managers: Managers) -> list[dict]:
    """The ``metadata.managedFields`` entries, in the real shape."""
    out = []
    for key, entry in managers.items():
        item = {
            "manager": key.manager,
            "operation": key.operation,
            "apiVersion": entry.api_version,
            "time": entry.time,
            "fieldsType": "FieldsV1",
            "fieldsV1": fields_v1(entry.paths),
        }
        if key.subresource:
            item["subresource"] = key.subresource
        out.append(item)
    return out


def same_ownership(a: Managers, b: Managers) -> bool:
    """Equal but for the timestamps (a no-op write leaves managedFields alone)."""
    return a.keys() == b.keys() and all(a[k].paths.keys() == b[k].paths.keys() for k in a)
