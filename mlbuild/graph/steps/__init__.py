"""Step kinds, one module each. ``STEP_KINDS`` maps a kind name to its class.

The modules are imported on first use of their kind: a no-op deploy of a process
target never imports the docker steps (nor http.client, the docker SDK ...), which
was a measurable part of its time.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping, MutableMapping

_WHERE = {
    "model": "model:ModelStep",
    "context": "context:ContextStep",
    "package": "package:PackageStep",
    "venv": "venv:VenvStep",
    "process": "process:ProcessStep",
    "image": "image:ImageStep",
    "push": "image:PushStep",
    "container": "container:ContainerStep",
    "k8s": "kube:KubeStep",
    "imagetar": "image:ImageTarStep",
    "lock": "lock:LockStep",
    "wheels": "wheels:WheelsStep",
}


class _Kinds(MutableMapping):
    """kind -> Step class, importing the class's module when it is first asked for.
    (Settable, so a test can put a stand-in step class in place of a kind.)"""

    def __init__(self, where: dict[str, str]):
        self._where = where
        self._loaded: dict[str, type] = {}

    def __getitem__(self, kind: str) -> type:
        cls = self._loaded.get(kind)
        if cls is None:
            module, _, name = self._where[kind].partition(":")
            cls = getattr(importlib.import_module(f"{__name__}.{module}"), name)
            if cls.kind != kind:  # pragma: no cover - a wrong entry in _WHERE
                raise KeyError(f"{self._where[kind]} is of kind {cls.kind}, not {kind}")
            self._loaded[kind] = cls
        return cls

    def __setitem__(self, kind: str, cls: type) -> None:
        self._loaded[kind] = cls
        self._where.setdefault(kind, "")

    def __delitem__(self, kind: str) -> None:
        self._loaded.pop(kind, None)
        if kind not in _WHERE:  # a kind only ever set, never one of mlbuild's own
            del self._where[kind]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


STEP_KINDS: Mapping[str, type] = _Kinds(dict(_WHERE))
