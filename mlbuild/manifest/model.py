"""The typed, immutable result of loading a manifest.

Everything here is frozen: mappings are ``MappingProxyType``, sequences are tuples.
Paths are relative POSIX paths as written in the manifest (relative to the manifest's
folder, normalised); ``Project.root`` is the absolute folder they are relative to and
never enters a fingerprint.

``config()`` methods return the canonical, JSON-able dict of the settings that
configure a step: defaults filled in, so writing a default explicitly or leaving it out
gives the same fingerprint; line numbers and the checkout path left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Iterable, Mapping

from mlbuild.kube.settings import KubeSettings

EMPTY: Mapping = MappingProxyType({})


def _empty() -> Mapping:
    # NOTE: dataclasses refuse an unhashable default (mappingproxy) on Python 3.11+.
    return EMPTY

TARGET_TYPES = ("process", "docker", "kubernetes", "package")
NO_CODE_FRAMEWORKS = ("scikit-learn", "onnx")
DEFAULT_BASE_IMAGE = "python:3.11-slim"
MIB = 1024 * 1024  # services.NAME.max_body_mb counts these, as the runtime's "10 MB" does
MAX_WORKERS = 64  # services.NAME.workers: more is a typo, or a job for auto
# Where an image's runtime writes collected model data (services.NAME.collect_model_data):
# made by the image's user; the docker target mounts a volume there.
MODEL_DATA_IN_IMAGE = "/var/mlbuild/model-data"
MODEL_DATA_STDOUT = "-"  # MLBUILD_MODEL_DATA_DIR: the records go to stdout


@dataclass(frozen=True)
class Resources:
    cpu: float | None = None
    memory_gb: float | None = None

    def config(self) -> dict:
        return {"cpu": self.cpu, "memory_gb": self.memory_gb}


def resources_hint(models: Iterable) -> Resources | None:
    """The resources hint of a service: the sum over its models' ``resources`` (each
    model is loaded by every replica), or None when no model has one. Targets without a
    ``cpu``/``memory_gb`` of their own use it (docker: as limits; kubernetes: as the floor
    of the requests).

    Args:
        models: objects with a ``resources`` attribute (manifest ``Model``s).
    """
    hints = [m.resources for m in models if getattr(m, "resources", None) is not None]
    if not hints:
        return None
    cpus = [h.cpu for h in hints if h.cpu is not None]
    mems = [h.memory_gb for h in hints if h.memory_gb is not None]
    return Resources(cpu=sum(cpus) if cpus else None, memory_gb=sum(mems) if mems else None)


@dataclass(frozen=True)
class Model:
    """A model declared in the manifest: a file or a folder to register."""

    name: str
    path: str
    framework: str | None = None
    framework_version: str | None = None
    description: str | None = None
    tags: Mapping[str, str] = field(default_factory=_empty)
    properties: Mapping[str, str] = field(default_factory=_empty)
    resources: Resources | None = None
    line: int | None = field(default=None, compare=False)

    def config(self) -> dict:
        return {
            "name": self.name,
            "path": self.path,
            "framework": self.framework,
            "framework_version": self.framework_version,
            "description": self.description,
            "tags": dict(self.tags),
            "properties": dict(self.properties),
            "resources": self.resources.config() if self.resources else None,
        }


@dataclass(frozen=True)
class Environment:
    """An environment: exactly one of a conda spec, a requirements file, or
    ``python`` + ``packages``.

    ``default_for`` names the framework of a no-code service's default environment,
    which the manifest does not declare (:mod:`mlbuild.manifest.nocode`); None for a
    declared one. Its packages and name say all it installs, so it stays out of
    ``config()``."""

    name: str
    conda: str | None = None
    requirements: str | None = None
    python: str | None = None
    packages: tuple[str, ...] = ()
    base_image: str | None = None
    platforms: tuple[str, ...] = ("linux-64",)  # conda: the subdirs locked
    solver: str | None = None  # conda: the solver conda-lock drives
    default_for: str | None = None
    line: int | None = field(default=None, compare=False)

    @property
    def kind(self) -> str:
        """``conda``, ``requirements`` or ``packages``."""
        if self.conda:
            return "conda"
        if self.requirements:
            return "requirements"
        return "packages"

    @property
    def spec_file(self) -> str | None:
        return self.conda or self.requirements

    def config(self) -> dict:
        return {
            "name": self.name,
            "conda": self.conda,
            "requirements": self.requirements,
            "python": self.python,
            "packages": list(self.packages),
            "base_image": self.base_image,
            **({"platforms": list(self.platforms), "solver": self.solver}
               if self.conda else {}),
        }


@dataclass(frozen=True)
class ModelRef:
    """A service's reference to a model: ``ridge`` (latest) or ``ridge@3`` (pinned)."""

    name: str
    version: int | None = None

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"

    @classmethod
    def parse(cls, text: str) -> "ModelRef":
        """Parse ``NAME`` or ``NAME@VERSION``. Raises ValueError on a bad version."""
        name, sep, ver = text.partition("@")
        if not sep:
            return cls(name)
        if not ver.isdigit() or int(ver) < 1:
            raise ValueError(f"version {ver!r} is not a positive whole number")
        return cls(name, int(ver))


@dataclass(frozen=True)
class Batching:
    """``services.NAME.batching``: adaptive micro-batching in the runtime (its
    ``MLBUILD_BATCH_MAX_SIZE`` and ``MLBUILD_BATCH_MAX_LATENCY_MS``)."""

    max_batch_size: int
    max_latency_ms: float | None = None  # None: the runtime's default (10 ms)

    def config(self) -> dict:
        return {"max_batch_size": self.max_batch_size, "max_latency_ms": self.max_latency_ms}

    def runtime_env(self) -> dict[str, str]:
        env = {"MLBUILD_BATCH_MAX_SIZE": str(self.max_batch_size)}
        if self.max_latency_ms is not None:
            env["MLBUILD_BATCH_MAX_LATENCY_MS"] = f"{self.max_latency_ms:g}"
        return env


@dataclass(frozen=True)
class ModelDataCollection:
    """``services.NAME.collect_model_data`` when on: where the runtime's model data
    collector writes its JSON lines (``MLBUILD_COLLECT_MODEL_DATA``,
    ``MLBUILD_MODEL_DATA_DIR``).

    Attributes:
        to: ``folder``, ``stdout``, or None (``true``): each target's default, a folder
            everywhere but on kubernetes, where it is stdout (see :meth:`destination`).
        path: with a folder, one on this machine (manifest-relative, normalised, or
            absolute) for the process target and the docker target's bind mount; None
            for the target's default place.
    """

    to: str | None = None
    path: str | None = None

    def config(self) -> dict:
        return {"to": self.to, "path": self.path}

    def destination(self, target_type: str) -> str:
        """``folder`` or ``stdout`` on a target of ``target_type``."""
        if self.to is not None:
            return self.to
        return "stdout" if target_type == "kubernetes" else "folder"

    def runtime_env(self, target_type: str | None = None) -> dict[str, str]:
        """The runtime's variables; the folder is the image's (the process target maps
        it onto its own). ``target_type`` None: what the image declares (a folder
        unless ``to: stdout``)."""
        to = (self.to or "folder") if target_type is None else self.destination(target_type)
        return {"MLBUILD_COLLECT_MODEL_DATA": "1",
                "MLBUILD_MODEL_DATA_DIR": MODEL_DATA_STDOUT if to == "stdout"
                else MODEL_DATA_IN_IMAGE}


@dataclass(frozen=True)
class Service:
    """A scoring service: an entry script (or a no-code model) in an environment (a
    no-code service's may be its framework's default one)."""

    name: str
    environment: str
    models: tuple[ModelRef, ...] = ()
    entry_script: str | None = None
    source_dir: str | None = None
    schema_input: str | None = None
    schema_output: str | None = None
    auth: str = "none"
    cors: tuple[str, ...] = ()
    max_body_mb: float | None = None  # None: the runtime's default (10 MiB)
    batching: Batching | None = None  # None: requests are scored one by one
    workers: int | str | None = None  # a number or "auto"; None: the runtime's 1
    collect_model_data: ModelDataCollection | None = None  # None: off
    tracing: bool = False
    line: int | None = field(default=None, compare=False)

    @property
    def no_code(self) -> bool:
        return self.entry_script is None

    @property
    def max_body_bytes(self) -> int | None:
        """``max_body_mb`` in bytes (MiB, rounded up: never below what was asked), or
        None for the runtime's default."""
        if self.max_body_mb is None:
            return None
        return max(1, math.ceil(self.max_body_mb * MIB))

    def runtime_env(self) -> dict[str, str]:
        """The runtime's variables for this service's own settings (the ones set): what
        the image declares, and what the process and kubernetes targets set too (paths
        are the image's: the process target maps them, see ``collect_model_data``)."""
        env = {}
        if self.max_body_mb is not None:
            env["MLBUILD_MAX_BODY_BYTES"] = str(self.max_body_bytes)
        if self.batching is not None:
            env.update(self.batching.runtime_env())
        env.update(self.observability_env())
        return env

    def observability_env(self, target_type: str | None = None) -> dict[str, str]:
        """The variables of ``workers``, ``collect_model_data`` and ``tracing`` (the ones
        set); ``target_type`` None: as the image declares them."""
        env = {}
        if self.workers is not None:
            env["MLBUILD_WORKERS"] = str(self.workers)
        if self.collect_model_data is not None:
            env.update(self.collect_model_data.runtime_env(target_type))
        if self.tracing:
            env["MLBUILD_TRACING"] = "1"
        return env

    def config(self) -> dict:
        return {
            "name": self.name,
            "environment": self.environment,
            "models": [str(m) for m in self.models],
            "entry_script": self.entry_script,
            "source_dir": self.source_dir,
            "schema": {"input": self.schema_input, "output": self.schema_output},
            "auth": self.auth,
            "cors": list(self.cors),
            # NOTE: only when set, so that the fingerprints of services written before
            # this setting existed do not change.
            **({"max_body_mb": self.max_body_mb} if self.max_body_mb is not None else {}),
            **({"batching": self.batching.config()} if self.batching is not None else {}),
            **({"workers": self.workers} if self.workers is not None else {}),
            **({"collect_model_data": self.collect_model_data.config()}
               if self.collect_model_data is not None else {}),
            **({"tracing": True} if self.tracing else {}),
        }


@dataclass(frozen=True)
class Target:
    """A deployment target. Keys that do not apply to its type are None."""

    name: str
    type: str
    port: int | None = None
    namespace: str | None = None
    replicas: int | None = None
    cpu: float | None = None
    memory_gb: float | None = None
    out: str | None = None
    offline: bool = False
    services: tuple[str, ...] | None = None  # None: every service
    # Runtime settings (process, docker, kubernetes): None leaves the runtime's default.
    scoring_timeout_ms: int | None = None
    max_concurrent_requests: int | None = None
    max_request_wait_ms: int | None = None
    kube: KubeSettings | None = None  # kubernetes: everything else it says
    line: int | None = field(default=None, compare=False)

    def config(self) -> dict:
        out = {
            "name": self.name,
            "type": self.type,
            "port": self.port,
            "namespace": self.namespace,
            "replicas": self.replicas,
            "cpu": self.cpu,
            "memory_gb": self.memory_gb,
            "out": self.out,
            "offline": self.offline,
            "services": list(self.services) if self.services is not None else None,
        }
        # NOTE: only when set, so that the fingerprints of targets written before these
        # settings existed do not change.
        for key in ("scoring_timeout_ms", "max_concurrent_requests", "max_request_wait_ms"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.kube is not None:
            out["kube"] = self.kube.config()
        return out

    def runtime_env(self) -> dict[str, str]:
        """The runtime's variables for this target's limits (the ones set)."""
        timeout = self.kube.scoring_timeout_ms if self.kube else self.scoring_timeout_ms
        cap = self.kube.max_concurrent_requests if self.kube else self.max_concurrent_requests
        wait = self.kube.max_request_wait_ms if self.kube else self.max_request_wait_ms
        env = {}
        if timeout is not None:
            env["SCORING_TIMEOUT_MS"] = str(timeout)
        if cap is not None:
            env["MLBUILD_MAX_CONCURRENT_REQUESTS"] = str(cap)
        if wait is not None:
            env["MLBUILD_MAX_REQUEST_WAIT_MS"] = str(wait)
        return env


# The target a project gets when it declares none: the runtime as a local process.
EMBEDDED_DEFAULT_TARGET = Target(name="dev", type="process", port=8890)


@dataclass(frozen=True)
class Project:
    """A loaded, validated manifest.

    Attributes:
        name: project name (a DNS label): prefixes images, containers, k8s objects.
        root: absolute folder of the manifest; never part of a fingerprint.
        manifest_path: absolute path of the manifest file.
        manifest_digest: sha256 of the manifest's bytes.
    """

    name: str
    root: Path
    manifest_path: Path
    manifest_digest: str
    registry: str | None = None
    models: Mapping[str, Model] = field(default_factory=_empty)
    environments: Mapping[str, Environment] = field(default_factory=_empty)
    services: Mapping[str, Service] = field(default_factory=_empty)
    targets: Mapping[str, Target] = field(default_factory=_empty)
    default_target: str | None = None

    def path(self, rel: str) -> Path:
        """Absolute path of a manifest-relative path."""
        return self.root / rel

    def target(self, name: str | None) -> Target:
        """The named target, or the default one. Raises InvalidInput."""
        from mlbuild.errors import InvalidInput
        from mlbuild.manifest.suggest import did_you_mean

        if name is None:
            name = self.default_target
            if name is None:
                raise InvalidInput(
                    f"{self.manifest_path.name}: no target given and no default_target",
                    hint="name a target (mlbuild deploy TARGET) or set default_target",
                )
        try:
            return self.targets[name]
        except KeyError:
            raise InvalidInput(
                f"no target {name!r} in {self.manifest_path.name}"
                + did_you_mean(name, self.targets),
                hint="targets: " + ", ".join(sorted(self.targets)),
            ) from None

    def services_for(self, target: Target) -> list[Service]:
        """The services deployed to a target, in manifest order."""
        if target.services is None:
            return list(self.services.values())
        return [self.services[s] for s in target.services]
