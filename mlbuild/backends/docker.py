"""The Docker engine and the image registry, behind a small interface of plain arguments.

This module knows images, containers and registries; it knows nothing of manifests,
steps or fingerprints. The graph steps (``image``, ``push``, ``deploy``) call it with
tags, labels and paths they computed themselves.

    connect() ──▶ DockerEngine
                    ├─ images:      image_exists, image_info, build, remove_image, save_image
                    ├─ registry:    registry_has, pull, push   (retried with backoff)
                    └─ containers:  run_container, container_state, container_logs,
                                    follow_logs, remove_container, list_containers

The Docker SDK for Python (``pip install 'mlbuild[docker]'``) is imported lazily, so
the rest of mlbuild works without it. ``DOCKER_HOST`` (and ``DOCKER_TLS_VERIFY``,
``DOCKER_CERT_PATH``) is honoured. Registry questions go through the engine, not from
this process: with a remote ``DOCKER_HOST`` the engine is the one that pulls and pushes,
so it is also the one whose view of "is the tag in the registry" matters.

Errors: every expected failure is an :class:`~mlbuild.errors.MlbuildError`:
:class:`EngineUnavailable` when the engine cannot be reached,
:class:`~mlbuild.errors.StepFailed` when an action fails (a build step, a push),
:class:`Unschedulable` when a container cannot be placed (port taken, CPU or memory
beyond the machine), :class:`~mlbuild.errors.NotSupported` when the SDK is missing.

Builds: the classic builder by default (what the SDK speaks); ``builder="buildkit"``
asks the engine for BuildKit (the same ``POST /build``, with ``version=2``) and reads its
binary status stream. The context is the same tar, sent in the request body: no BuildKit
session (``/session``, gRPC) is opened. Without one, BuildKit still runs cache and bind
mounts (``RUN --mount=type=cache``, ``type=bind`` from the context or another stage) and
``--network none``, but not ``type=secret`` or ``type=ssh``; a ``# syntax=`` line
would make it pull the named frontend image. :meth:`DockerEngine.buildkit_available`
says whether to try, :class:`BuildkitUnavailable` when the engine refused.

One DockerEngine may be shared by threads building independent images: the SDK keeps
a pool of connections (10 by default).
"""

from __future__ import annotations

import base64
import os
import random
import re
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlbuild import progress
from mlbuild.errors import InvalidInput, MlbuildError, NotSupported, StepFailed

if TYPE_CHECKING:  # pragma: no cover
    import docker as docker_sdk

INSTALL_HINT = "pip install 'mlbuild[docker]'"
TAIL_LINES = 20          # lines of build output shown when a build fails
CONNECT_TIMEOUT = 10.0   # seconds to wait for the engine to answer its version
OP_TIMEOUT = 900.0       # seconds a build/push/pull stream may stay silent
# NOTE: the engine's default log driver, json-file, keeps a container's whole output:
# containers started here rotate it as a process target's log is rotated (10 MiB, two
# older files). Other drivers (local, journald, ...) bound their own and are left alone.
CONTAINER_LOG_ROTATION = {"max-size": "10m", "max-file": "3"}

# Registry errors worth another try, and those that are final. The engine reports
# registry failures as message text (inside a stream or an HTTP 500), so these match
# on the text; the final ones are checked first.
_FINAL = re.compile(
    r"denied|unauthori[sz]ed|forbidden|manifest unknown|name unknown|not found|"
    r"invalid reference|repository name must|does not exist|no such image", re.IGNORECASE)
_TRANSIENT = re.compile(
    r"connection refused|connection reset|broken pipe|i/o timeout|timeout|timed out|"
    r"temporary failure|try again|\bEOF\b|TLS handshake|too many requests|\b429\b|"
    r"\b50[0234]\b|bad gateway|service unavailable|gateway timeout|"
    r"unexpected HTTP status: 5\d\d|no route to host|network is unreachable", re.IGNORECASE)
# A container that cannot be placed, as opposed to one that fails.
_UNSCHEDULABLE = re.compile(
    r"port is already allocated|address already in use|bind for .* failed|"
    r"range of cpus|cannot allocate memory|minimum memory limit|not enough memory|"
    r"insufficient memory", re.IGNORECASE)

_CLASSIC_STEP = re.compile(r"^(?:Step|STEP) (\d+)/(\d+) ?: ?(.*)$")  # docker; podman/buildah
_CLASSIC_CACHED = re.compile(r"^-+> Using cache\b")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # the classic builder colours stderr red
# "[2/5] RUN ..", "[stage 2/5] .."; BuildKit pads the number to the total's width:
# "[stage-1  3/10] COPY ..", "[ 3/10] RUN ..".
_BUILDKIT_STEP = re.compile(r"^\[(?:(\S+) +)? *(\d+)/(\d+)\] (.*)$")
# BuildKit behind the API with RUN --mount, cache and bind mounts: Docker 20.10 (API 1.41)
# and newer. The classic builder below that.
BUILDKIT_MIN_API = (1, 41)
# An engine without BuildKit behind its API (refusing version=2), or whose BuildKit
# frontend predates RUN --mount (Docker 18.09/19.03 without a `# syntax=` line).
_NO_BUILDKIT = re.compile(
    r"buildkit (is )?not (supported|enabled)|not supported by (the )?daemon|invalid version|"
    r"unsupported builder version|unknown flag: mount", re.IGNORECASE)
# A layer's status in a push or pull stream (and a build pulling its base image), as
# mlbuild.progress names the states; other statuses ("Extracting", "Verifying
# Checksum", "Pulling from ...") tell nothing about bytes moved.
_LAYER_STATES = {
    "Preparing": progress.WAITING, "Waiting": progress.WAITING,
    "Pulling fs layer": progress.WAITING,
    "Pushing": progress.MOVING, "Downloading": progress.MOVING,
    "Pushed": progress.DONE, "Download complete": progress.DONE, "Pull complete": progress.DONE,
    "Layer already exists": progress.PRESENT, "Already exists": progress.PRESENT,
}


class EngineUnavailable(MlbuildError):
    """The Docker engine cannot be reached (not running, no permission, wrong DOCKER_HOST)."""


class BuildkitUnavailable(MlbuildError):
    """The engine does not build this Dockerfile with BuildKit through its API (it
    refused ``version=2``, or its BuildKit has no ``RUN --mount``): use the classic
    builder."""


class Unschedulable(StepFailed):
    """A container cannot be placed: its port is taken, or it asks for more CPU or
    memory than the engine has. Not a failure of the service itself."""


# --------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class BuildEvent:
    """Progress of a build, one event per change of a Dockerfile step.

    Attributes:
        step: 1-based number of the step across all stages.
        total: number of steps known so far (final for the classic builder).
        instruction: the Dockerfile instruction, e.g. ``RUN pip install ...``.
        status: ``running`` (started), ``cached`` (a cache hit: done without running)
            or ``done`` (ran and finished).
    """

    step: int
    total: int
    instruction: str
    status: str


@dataclass(frozen=True)
class BuildResult:
    """What a build did.

    Attributes:
        image_id: ``sha256:...`` of the built image.
        tag: the tag it was given.
        steps: Dockerfile steps in all (``FROM`` included).
        built: steps that ran.
        cached: steps served from the build cache.
        log_path: the full build log, when one was asked for.
        seconds: wall time of the build.
    """

    image_id: str
    tag: str
    steps: int
    built: int
    cached: int
    log_path: Path | None
    seconds: float


@dataclass(frozen=True)
class ImageInfo:
    """An image in the engine."""

    id: str
    tags: list[str]
    labels: dict[str, str]
    size: int
    created: datetime | None
    repo_digests: list[str]


@dataclass(frozen=True)
class ContainerState:
    """What the engine says about a container.

    Attributes:
        status: the engine's word: ``created``, ``running``, ``paused``, ``restarting``,
            ``removing``, ``exited`` or ``dead``.
        running: True while the process runs (also while restarting or paused).
        exit_code: the last exit code; None while it never exited.
        health: ``starting``, ``healthy`` or ``unhealthy``; None without a HEALTHCHECK.
        health_output: output of the last health probe ("" when none).
        ports: published ports, ``{"8080/tcp": [("127.0.0.1", 6789)]}``.
        error: the engine's error when starting failed ("" otherwise).
    """

    name: str
    id: str
    image: str
    image_id: str
    status: str
    running: bool
    exit_code: int | None
    health: str | None
    health_output: str
    labels: dict[str, str]
    started_at: datetime | None
    finished_at: datetime | None
    restart_count: int
    oom_killed: bool
    error: str
    ports: dict[str, list[tuple[str, int]]] = field(default_factory=dict)


# --------------------------------------------------------------------------------------
# connecting


def _sdk():
    """The ``docker`` package, imported on first use."""
    try:
        import docker
    except ImportError:
        raise NotSupported(
            f"Docker targets need the Docker SDK for Python, which is not installed: {INSTALL_HINT}",
            hint=f"run {INSTALL_HINT} in the environment mlbuild runs in",
        ) from None
    return docker


def connect(base_url: str | None = None, *, timeout: float = OP_TIMEOUT,
            connect_timeout: float = CONNECT_TIMEOUT) -> DockerEngine:
    """Connect to the Docker engine and check that it answers.

    Args:
        base_url: the engine's address (``unix:///var/run/docker.sock``,
            ``tcp://host:2376``); default: the environment (``DOCKER_HOST``, TLS
            variables), else the local socket.
        timeout: seconds an operation's stream may stay silent before it is abandoned.
        connect_timeout: seconds to wait for the engine's first answer.

    Returns:
        A connected :class:`DockerEngine`.

    Raises:
        NotSupported: the Docker SDK is not installed.
        EngineUnavailable: no engine answers at that address, or it refuses us.
    """
    docker = _sdk()
    where = base_url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        if base_url:
            client = docker.DockerClient(base_url=base_url, timeout=connect_timeout)
        else:
            client = docker.from_env(timeout=connect_timeout)
        client.ping()
    except docker.errors.DockerException as e:  # also wraps requests' errors
        raise _unavailable(where, e) from None
    except Exception as e:  # noqa: BLE001  requests/urllib3 errors escaping the SDK
        raise _unavailable(where, e) from None
    client.api.timeout = timeout
    return DockerEngine(client, where)


def _unavailable(where: str, err: BaseException) -> EngineUnavailable:
    text = str(err)
    if "Permission denied" in text or "PermissionError" in text:
        hint = "add your user to the 'docker' group (then log in again), or run as root"
    elif where.startswith("unix://"):
        hint = ("start the engine (`sudo systemctl start docker`, or `sudo dockerd &`), "
                "or point DOCKER_HOST at one")
    else:
        hint = "check that the engine at DOCKER_HOST runs and is reachable from here"
    return EngineUnavailable(f"cannot reach the Docker engine at {where}: {text}", hint=hint)


# --------------------------------------------------------------------------------------
# the engine


class DockerEngine:
    """One Docker engine (and, through it, registries). Make it with :func:`connect`.

    Attributes:
        client: the Docker SDK's ``DockerClient``, for what this interface lacks.
        address: where the engine was found, for messages.
    """

    def __init__(self, client: docker_sdk.DockerClient, address: str = ""):
        self.client = client
        self.api = client.api
        self.address = address
        self._errors = _sdk().errors
        self._buildkit: bool | None = None
        self._cleanups: list = []  # threads started by builds (finish() waits for them)

    def __repr__(self) -> str:
        return f"DockerEngine({self.address!r})"

    # -- images -----------------------------------------------------------------------

    def image_exists(self, tag: str) -> bool:
        """True when the engine has an image of that tag (or id).

        Raises:
            EngineUnavailable: the engine stopped answering.
        """
        return self.image_info(tag) is not None

    def image_info(self, tag: str) -> ImageInfo | None:
        """The image of that tag (or id), or None when the engine has none.

        Raises:
            EngineUnavailable: the engine stopped answering.
        """
        try:
            with self._engine_errors():
                d = self.api.inspect_image(tag)
        except self._errors.NotFound:  # ImageNotFound too
            return None
        cfg = d.get("Config") or {}
        return ImageInfo(
            id=d["Id"],
            tags=list(d.get("RepoTags") or []),
            labels=dict(cfg.get("Labels") or {}),
            size=int(d.get("Size") or 0),
            created=_parse_time(d.get("Created")),
            repo_digests=list(d.get("RepoDigests") or []),
        )

    def remove_image(self, tag: str, *, force: bool = False) -> bool:
        """Remove a tag (and the image when no other tag holds it).

        Returns:
            True when it was removed, False when there was no such image.

        Raises:
            StepFailed: the engine refused (a container still uses it; pass ``force``).
            EngineUnavailable: the engine stopped answering.
        """
        try:
            with self._engine_errors():
                self.api.remove_image(tag, force=force, noprune=False)
            return True
        except self._errors.NotFound:
            return False
        except self._errors.APIError as e:
            raise StepFailed(f"remove image {tag}", _api_message(e)) from None

    def list_images(self, labels: Mapping[str, str] | None = None) -> list[ImageInfo]:
        """Images carrying all of these labels, newest first.

        Raises:
            EngineUnavailable: the engine stopped answering.
        """
        filters = {"label": [f"{k}={v}" for k, v in (labels or {}).items()]} if labels else None
        with self._engine_errors():
            rows = self.api.images(filters=filters)
        out = [
            ImageInfo(
                id=r["Id"], tags=[t for t in (r.get("RepoTags") or []) if t != "<none>:<none>"],
                labels=dict(r.get("Labels") or {}), size=int(r.get("Size") or 0),
                created=datetime.fromtimestamp(r["Created"], timezone.utc) if r.get("Created") else None,
                repo_digests=list(r.get("RepoDigests") or []),
            )
            for r in rows
        ]
        out.sort(key=lambda i: i.created or datetime.min.replace(tzinfo=timezone.utc), reverse=True)
        return out

    def buildkit_available(self) -> bool:
        """Whether to build with BuildKit: the engine is a Linux Docker engine of API 1.41
        (Docker 20.10) or newer, whose BuildKit runs ``RUN --mount`` through the API.

        Podman answers the same endpoint with its own builder (and ignores
        ``version=2``); Windows engines have no BuildKit. Asked once per engine
        (``GET /version``); False from the first build the engine refused with BuildKit
        (:class:`BuildkitUnavailable`) on.

        Raises:
            EngineUnavailable: the engine stopped answering.
        """
        if self._buildkit is None:
            try:
                with self._engine_errors():
                    v = self.api.version()
            except self._errors.APIError:
                v = {}
            try:
                api = tuple(int(x) for x in str(v.get("ApiVersion", "0.0")).split(".")[:2])
            except ValueError:
                api = (0, 0)
            names = {str(c.get("Name", "")) for c in v.get("Components") or [] if isinstance(c, dict)}
            self._buildkit = (api >= BUILDKIT_MIN_API and str(v.get("Os", "")).lower() == "linux"
                              and not any("podman" in n.lower() for n in names))
        return self._buildkit

    def build(
        self,
        context_dir: Path | str,
        tag: str,
        *,
        labels: Mapping[str, str] | None = None,
        log_path: Path | str | None = None,
        progress_cb: Callable[[BuildEvent], None] | None = None,
        dockerfile: str = "Dockerfile",
        buildargs: Mapping[str, str] | None = None,
        builder: str = "classic",
        nocache: bool = False,
        pull: bool = False,
        network_mode: str | None = None,
        step_id: str | None = None,
    ) -> BuildResult:
        """Build an image from a context folder, streaming progress.

        The context is sent as a tar made on the fly (``.dockerignore`` honoured); it
        is never copied to a temporary file, so GB-sized models cost one read.

        Args:
            context_dir: the folder holding the Dockerfile and what it copies.
            tag: the tag to give the image.
            labels: labels added to the image.
            log_path: where the full build output goes (folders made as needed).
            progress_cb: called with a :class:`BuildEvent` whenever a step starts,
                hits the cache or finishes.
            dockerfile: the Dockerfile's path inside the context.
            buildargs: ``ARG`` values.
            builder: ``classic`` or ``buildkit`` (see :meth:`buildkit_available`).
            nocache: build every step.
            pull: try to pull a newer base image first.
            network_mode: network for ``RUN`` steps (the engine's default otherwise).
            step_id: how a failure names the action (default ``docker build TAG``).

        Returns:
            A :class:`BuildResult` with the image id and how many steps were built and
            how many came from the cache.

        Raises:
            StepFailed: a step failed; the message names the Dockerfile step and carries
                the last lines of the output.
            InvalidInput: the context folder or its Dockerfile does not exist, or
                ``builder`` is unknown.
            BuildkitUnavailable: ``builder="buildkit"`` and the engine refused it (no
                image was built: build again with the classic builder).
            EngineUnavailable: the engine stopped answering.
        """
        context_dir = Path(context_dir)
        step_id = step_id or f"docker build {tag}"
        if builder not in ("classic", "buildkit"):
            raise InvalidInput(f"unknown builder {builder!r} (classic or buildkit)")
        if not (context_dir / dockerfile).is_file():
            raise InvalidInput(f"no {dockerfile} in the build context {context_dir}")
        log = _BuildLog(log_path)
        started = time.monotonic()
        shown = progress.task("building", _short(tag))

        def report(ev: BuildEvent) -> None:
            shown.step(ev.step, ev.total, ev.instruction)
            if progress_cb:
                progress_cb(ev)

        try:
            reader = _ClassicStream(report, log) if builder == "classic" else _BuildkitStream(report, log)
            body = _context_tar(context_dir, dockerfile)
            try:
                with self._engine_errors():
                    for msg in self._build_stream(body, tag, labels, dockerfile, buildargs,
                                                  builder, nocache, pull, network_mode):
                        reader.feed(msg)
                        _report_layer(shown, msg)
                        shown.tick()
            except self._errors.APIError as e:  # refused before streaming: bad params, ...
                reader.fail(_api_message(e))
            finally:
                body.close()
                if builder == "buildkit":
                    self._drop_build_context_later(reader.started, log.path)
            if reader.error is not None and builder == "buildkit" and _NO_BUILDKIT.search(reader.error):
                self._buildkit = False
                raise BuildkitUnavailable(f"the engine at {self.address} does not build with "
                                          f"BuildKit: {reader.error}")
            if reader.error is not None:
                where = reader.failed_step()
                tail = reader.tail()
                msg = f"Dockerfile step {where}: {reader.error}" if where else reader.error
                if tail:
                    msg += "\n  last lines of the build output:\n" + "\n".join(f"    {line}" for line in tail)
                hint = f"full log: {log.path}" if log.path else None
                raise StepFailed(step_id, msg, hint=hint)
            image_id = reader.image_id or self._image_id_of(tag)
            shown.close()
        finally:
            shown.close(ok=False)  # (no-op after the close above)
            log.close()
        steps, built, cached = reader.counts()
        return BuildResult(image_id=image_id, tag=tag, steps=steps, built=built, cached=cached,
                           log_path=log.path, seconds=time.monotonic() - started)

    def _build_stream(self, body, tag, labels, dockerfile, buildargs, builder, nocache, pull,
                      network_mode) -> Iterator[dict]:
        if builder == "classic":
            return self.api.build(
                fileobj=body, custom_context=True, tag=tag, labels=dict(labels or {}) or None,
                dockerfile=dockerfile, buildargs=dict(buildargs or {}) or None, rm=True, forcerm=True,
                nocache=nocache, pull=pull, network_mode=network_mode, decode=True,
            )
        # NOTE: the SDK has no switch for BuildKit; the endpoint is the same with
        # version=2, so this path speaks to it directly through the SDK's transport.
        import json

        params: dict[str, Any] = {
            "t": tag, "dockerfile": dockerfile, "version": "2", "rm": "1", "forcerm": "1",
            "nocache": "1" if nocache else "0", "pull": "1" if pull else "0",
        }
        if labels:
            params["labels"] = json.dumps(dict(labels))
        if buildargs:
            params["buildargs"] = json.dumps(dict(buildargs))
        if network_mode:
            params["networkmode"] = network_mode
        headers = {"Content-Type": "application/x-tar"}
        self.api._set_auth_headers(headers)
        response = self.api._post(self.api._url("/build"), params=params, data=body,
                                  headers=headers, stream=True)
        self.api._raise_for_status(response)
        return self.api._stream_helper(response, decode=True)

    def _drop_build_context_later(self, started: float | None, log_path: Path | None) -> None:
        """:meth:`_drop_build_context` in a thread of its own: listing the build cache
        takes the engine 0.2-0.6 s, which a deploy spends starting the container instead.
        :meth:`finish` (the end of a run) and the interpreter's exit (a thread that is not
        a daemon) wait for it. (The SDK's connection pool is shared; urllib3's pools are
        thread-safe.)"""
        import threading

        def drop() -> None:
            self._drop_build_context(started, _AppendLog(log_path))

        t = threading.Thread(target=drop, name="mlbuild-drop-build-context")
        t.start()
        self._cleanups.append(t)

    def finish(self, timeout: float = 60) -> None:
        """Wait for the clean-ups started by builds (:meth:`_drop_build_context_later`)."""
        while self._cleanups:
            self._cleanups.pop().join(timeout)

    def _drop_build_context(self, started: float | None, log) -> None:
        """Remove from the engine's build cache what a BuildKit build through the API
        leaves there for nothing: its context, once as uploaded (a record "http url
        http://build-context-ID", ID random, so never asked for again) and once unpacked
        (a "fileop target" on no parent, made while the build ran). Each is the size of
        the whole context, models included, and an engine whose BuildKit has no garbage
        collection (Docker 20.10's default) would keep them all. The steps' own cache is
        untouched (a COPY is keyed by its files' checksums, not by these records).

        NOTE: a record is the engine's, not this build's: only context uploads not in
        use (by construction, never used again) are taken, and unpacked contexts made
        since this build's first step started (the engine's clock). A failure here is
        written to the build log and otherwise ignored.
        """
        api = self.api
        try:
            with self._engine_errors():
                resp = api._get(api._url("/system/df"), params={"type": "build-cache"})
                records = api._result(resp, True).get("BuildCache") or []
                for r in records:
                    desc, created = r.get("Description") or "", _parse_time(r.get("CreatedAt"))
                    if r.get("InUse"):
                        continue
                    upload = desc.startswith("http url http://build-context-")
                    unpacked = (desc == "fileop target" and not r.get("Parent") and started
                                and created is not None and created.timestamp() >= started - 1)
                    if upload or unpacked:
                        api.prune_builds(filters={"id": [r["ID"]]})
        except Exception as e:  # noqa: BLE001  clean-up only: the build itself is done
            log.write(f"(the build context left in the engine's build cache was not removed: {e})\n")

    def _image_id_of(self, tag: str) -> str:
        info = self.image_info(tag)
        return info.id if info else ""

    def save_image(self, tag: str, path: Path | str) -> int:
        """Write ``docker save`` output of one image to a tar file, atomically: the file
        appears complete or not at all.

        Returns:
            The size of the tar in bytes.

        Raises:
            StepFailed: no such image, or the engine failed while exporting.
            EngineUnavailable: the engine stopped answering.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                try:
                    # NOTE: by name, not Image.save(named=True): that names the tar
                    # after the image's first tag, which may be another one.
                    with self._engine_errors():
                        for chunk in self.api.get_image(tag, chunk_size=1 << 20):
                            f.write(chunk)
                except self._errors.NotFound:
                    raise StepFailed(f"docker save {tag}", f"no image {tag} in the engine") from None
                except self._errors.APIError as e:
                    raise StepFailed(f"docker save {tag}", _api_message(e)) from None
            os.chmod(tmp, 0o644)  # mkstemp makes it private; the result is an ordinary file
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return path.stat().st_size

    # -- registries -------------------------------------------------------------------

    def registry_has(self, tag: str, *, retries: int = 2, backoff: float = 0.5) -> bool:
        """True when the registry named in ``tag`` holds a manifest for it.

        Asked through the engine (its registry settings and credentials apply),
        without pulling anything.

        Returns:
            True when the manifest exists; False when the registry says it does not.

        Raises:
            StepFailed: the registry cannot be asked (unreachable after the retries,
                or it refuses us); not the same as "not there".
            EngineUnavailable: the engine stopped answering.
        """
        what = f"registry lookup {tag}"

        def ask() -> bool:
            try:
                with self._engine_errors():
                    self.api.inspect_distribution(tag)
                return True
            except self._errors.NotFound:
                return False

        return self._retry(what, ask, retries, backoff)

    def pull(self, tag: str, *, retries: int = 3, backoff: float = 1.0) -> str:
        """Pull an image from its registry, retrying transient failures.

        Returns:
            The id (``sha256:...``) of the pulled image.

        Raises:
            StepFailed: the image is not in the registry, access is denied, or the
                registry stayed unreachable through the retries.
            EngineUnavailable: the engine stopped answering.
        """
        repo, ref = _split_ref(tag)
        what = f"docker pull {tag}"

        def once() -> str:
            with self._engine_errors(), progress.task("pulling", _short(tag)) as shown:
                for msg in self.api.pull(repo, tag=ref, stream=True, decode=True):
                    if msg.get("error") or msg.get("errorDetail"):
                        raise _StreamError(_stream_error(msg))
                    _report_layer(shown, msg)
            return self._image_id_of(tag)

        return self._retry(what, once, retries, backoff)

    def push(self, tag: str, *, retries: int = 3, backoff: float = 1.0) -> str:
        """Push an image to the registry named in its tag, retrying transient failures
        (connection errors, 5xx answers) with exponential backoff.

        Returns:
            The manifest digest (``sha256:...``) the registry now holds for the tag.

        Raises:
            StepFailed: no such local image, access denied, or the registry stayed
                unreachable through the retries.
            EngineUnavailable: the engine stopped answering.
        """
        repo, ref = _split_ref(tag)
        what = f"docker push {tag}"
        if not self.image_exists(tag):
            raise StepFailed(what, f"no image {tag} in the engine to push")

        def once() -> str:
            digest = ""
            with self._engine_errors(), progress.task("pushing", _short(tag)) as shown:
                for msg in self.api.push(repo, tag=ref, stream=True, decode=True):
                    if msg.get("error") or msg.get("errorDetail"):
                        raise _StreamError(_stream_error(msg))
                    _report_layer(shown, msg)
                    aux = msg.get("aux") or {}
                    if aux.get("Digest"):
                        digest = aux["Digest"]
                    elif not digest:
                        m = re.search(r"digest: (sha256:[0-9a-f]{64})", msg.get("status") or "")
                        if m:
                            digest = m.group(1)
            if not digest:
                raise _StreamError("the engine reported no digest for the pushed image")
            return digest

        return self._retry(what, once, retries, backoff)

    # -- containers -------------------------------------------------------------------

    def run_container(
        self,
        name: str,
        image: str,
        *,
        ports: Mapping[int | str, int | tuple[str, int] | None] | None = None,
        env: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        cpus: float | None = None,
        memory: int | str | None = None,
        restart: str = "no",
        mounts: Mapping[str, str] | None = None,
        volumes: Mapping[str, str] | None = None,
        command: list[str] | None = None,
        host_ip: str = "127.0.0.1",
        network_mode: str | None = None,
        step_id: str | None = None,
    ) -> ContainerState:
        """Create and start a container (never pulls: the image must be in the engine).

        Args:
            name: the container's name; must be free.
            image: tag or id of a local image.
            ports: container port (``8080`` or ``"8080/tcp"``) to the host port to
                publish it on: a number (bound on ``host_ip``), ``(ip, port)``, or None
                for a free port the engine picks (see ``ContainerState.ports``).
            env: environment variables (secrets go here, never into the image).
            labels: container labels.
            cpus: CPU limit, e.g. ``0.5``.
            memory: memory limit in bytes, or the engine's notation (``"512m"``).
            restart: ``no``, ``always``, ``unless-stopped``, ``on-failure`` or
                ``on-failure:N``.
            mounts: host path to container path, mounted read-only.
            volumes: a volume's name (created by the engine when missing, starting as a
                copy of what the image holds at the container path, owner included) or
                a host path (absolute) to container path, mounted read-write.
            command: overrides the image's ``CMD``.
            host_ip: address published ports bind to when given as a bare number.
            network_mode: ``host`` to share the engine host's network (no ``ports``).
            step_id: how a failure names the action (default ``docker run NAME``).

        Returns:
            The container's state right after it started.

        Raises:
            Unschedulable: the port is taken, or the CPU/memory limit exceeds the engine.
            StepFailed: the image does not exist, the name is taken, or the engine
                refused to start it for another reason.
            InvalidInput: a malformed restart policy or port.
            EngineUnavailable: the engine stopped answering.
        """
        step_id = step_id or f"docker run {name}"
        bindings: dict[str, Any] = {}
        for cport, host in (ports or {}).items():
            key = str(cport) if "/" in str(cport) else f"{int(cport)}/tcp"
            if host is None:
                bindings[key] = (host_ip,)
            elif isinstance(host, tuple):
                bindings[key] = (host[0], int(host[1]))
            else:
                bindings[key] = (host_ip, int(host))
        kwargs: dict[str, Any] = {
            "name": name, "environment": dict(env or {}), "labels": dict(labels or {}),
            "ports": bindings, "detach": True, "restart_policy": _restart_policy(restart),
        }
        if cpus is not None:
            kwargs["nano_cpus"] = round(float(cpus) * 1e9)
        if memory is not None:
            kwargs["mem_limit"] = memory
        if mounts or volumes:
            kwargs["volumes"] = {
                **{host: {"bind": ctr, "mode": "ro"} for host, ctr in (mounts or {}).items()},
                **{src: {"bind": ctr, "mode": "rw"} for src, ctr in (volumes or {}).items()}}
        if command is not None:
            kwargs["command"] = list(command)
        if network_mode is not None:
            kwargs["network_mode"] = network_mode
            if network_mode == "host":
                kwargs.pop("ports")
        if self._default_log_driver() == "json-file":
            kwargs["log_config"] = {"Type": "json-file", "Config": CONTAINER_LOG_ROTATION}
        container = None
        try:
            with self._engine_errors():
                container = self.client.containers.create(image, **kwargs)
                container.start()
        except self._errors.ImageNotFound:
            raise StepFailed(step_id, f"no image {image} in the engine") from None
        except self._errors.APIError as e:
            text = _api_message(e)
            if container is not None:  # created but not started: leave nothing behind
                try:
                    container.remove(force=True)
                except self._errors.APIError:
                    pass
            if getattr(e, "status_code", None) == 409:
                raise StepFailed(step_id, f"a container named {name} already exists",
                                 hint="remove it first, or pick another name") from None
            if _UNSCHEDULABLE.search(text):
                raise Unschedulable(step_id, text) from None
            raise StepFailed(step_id, text) from None
        state = self.container_state(name)
        if state is None:  # removed by someone between start and inspect
            raise StepFailed(step_id, f"container {name} vanished right after it started")
        return state

    def _default_log_driver(self) -> str | None:
        """The engine's default log driver (asked once)."""
        if not hasattr(self, "_log_driver"):
            with self._engine_errors():
                self._log_driver = self.api.info().get("LoggingDriver")
        return self._log_driver

    def container_state(self, name: str) -> ContainerState | None:
        """The state of a container, or None when there is none of that name (or id).

        Raises:
            EngineUnavailable: the engine stopped answering.
        """
        try:
            with self._engine_errors():
                d = self.api.inspect_container(name)
        except self._errors.NotFound:
            return None
        st = d.get("State") or {}
        health = st.get("Health") or {}
        probes = health.get("Log") or []
        status = st.get("Status") or "unknown"
        started = _parse_time(st.get("StartedAt"))
        finished = _parse_time(st.get("FinishedAt"))
        ports: dict[str, list[tuple[str, int]]] = {}
        for key, binds in ((d.get("NetworkSettings") or {}).get("Ports") or {}).items():
            if binds:
                ports[key] = [(b.get("HostIp") or "", int(b["HostPort"])) for b in binds if b.get("HostPort")]
        return ContainerState(
            name=(d.get("Name") or "").lstrip("/"),
            id=d["Id"],
            image=(d.get("Config") or {}).get("Image") or "",
            image_id=d.get("Image") or "",
            status=status,
            running=bool(st.get("Running")),
            exit_code=st.get("ExitCode") if finished is not None else None,
            health=health.get("Status") or None,
            health_output=(probes[-1].get("Output") or "").strip() if probes else "",
            labels=dict((d.get("Config") or {}).get("Labels") or {}),
            started_at=started,
            finished_at=finished,
            restart_count=int(d.get("RestartCount") or 0),
            oom_killed=bool(st.get("OOMKilled")),
            error=st.get("Error") or "",
            ports=ports,
        )

    def list_containers(self, labels: Mapping[str, str] | None = None) -> list[str]:
        """Names of the containers (running or not) carrying all of these labels.

        Raises:
            EngineUnavailable: the engine stopped answering.
        """
        filters = {"label": [f"{k}={v}" for k, v in (labels or {}).items()]} if labels else None
        with self._engine_errors():
            rows = self.api.containers(all=True, filters=filters)
        return sorted(n.lstrip("/") for r in rows for n in (r.get("Names") or [])[:1])

    def container_logs(self, name: str, *, tail: int | None = 100) -> str:
        """The container's output so far (stdout and stderr interleaved).

        Args:
            tail: how many last lines; None for all.

        Raises:
            InvalidInput: there is no container of that name.
            EngineUnavailable: the engine stopped answering.
        """
        try:
            with self._engine_errors():
                data = self.api.logs(name, stdout=True, stderr=True, tail="all" if tail is None else int(tail))
        except self._errors.NotFound:
            raise _no_container(name) from None
        return data.decode("utf-8", errors="replace")

    def follow_logs(self, name: str, *, tail: int | None = 100) -> Iterator[str]:
        """The container's output, then new output as it comes, until it stops.

        Raises:
            InvalidInput: there is no container of that name.
            EngineUnavailable: the engine stopped answering.
        """
        try:
            with self._engine_errors():
                stream = self.api.logs(name, stdout=True, stderr=True, stream=True, follow=True,
                                       tail="all" if tail is None else int(tail))
        except self._errors.NotFound:
            raise _no_container(name) from None
        # NOTE: the stream yields chunks as the engine frames them, not lines.
        for chunk in stream:
            yield chunk.decode("utf-8", errors="replace")

    def remove_container(self, name: str, *, stop_timeout: int = 10) -> bool:
        """Stop a container (SIGTERM, then SIGKILL after ``stop_timeout`` s) and remove it.

        Returns:
            True when it was removed, False when there was none of that name.

        Raises:
            StepFailed: the engine refused to remove it.
            EngineUnavailable: the engine stopped answering.
        """
        try:
            with self._engine_errors():
                try:
                    self.api.stop(name, timeout=stop_timeout)
                except self._errors.NotFound:
                    return False
                except self._errors.APIError:
                    pass  # not running, or dead: removal below still applies
                self.api.remove_container(name, force=True)
            return True
        except self._errors.NotFound:
            return False
        except self._errors.APIError as e:
            if "is already in progress" in _api_message(e):
                return True
            raise StepFailed(f"docker rm {name}", _api_message(e)) from None

    def rename_container(self, name: str, new_name: str) -> None:
        """Give a container (running or not) another name.

        Raises:
            StepFailed: the engine refused (e.g. the new name is taken).
            EngineUnavailable: the engine stopped answering.
        """
        try:
            with self._engine_errors():
                self.api.rename(name, new_name)
        except self._errors.APIError as e:
            raise StepFailed(f"docker rename {name}", _api_message(e)) from None

    def retire_container(self, name: str, new_name: str) -> None:
        """Let a container go without waiting for it to stop.

        It is renamed ``new_name``, will not be restarted (restart policy ``no``), and
        gets SIGTERM: it stops by itself once its in-flight requests finished. Removing
        it afterwards is the caller's (``remove_container``); one that is not running is
        only renamed.

        Raises:
            StepFailed: the engine refused (e.g. ``new_name`` is taken).
            EngineUnavailable: the engine stopped answering.
        """
        try:
            with self._engine_errors():
                self.api.update_container(name, restart_policy={"Name": "no"})
                self.api.rename(name, new_name)
                try:
                    self.api.kill(new_name, signal="SIGTERM")
                except self._errors.APIError as e:
                    if "is not running" not in _api_message(e):
                        raise
        except self._errors.APIError as e:
            raise StepFailed(f"docker rename {name}", _api_message(e)) from None

    def stop_and_rename(self, name: str, new_name: str, *, stop_timeout: int = 10) -> None:
        """Stop a container (kept, not removed) and give it another name.

        Raises:
            StepFailed: the engine refused.
            EngineUnavailable: the engine stopped answering.
        """
        try:
            with self._engine_errors():
                self.api.stop(name, timeout=stop_timeout)
                self.api.rename(name, new_name)
        except self._errors.APIError as e:
            raise StepFailed(f"docker rename {name}", _api_message(e)) from None

    def rename_and_start(self, name: str, new_name: str) -> None:
        """Give a stopped container another name and start it again.

        Raises:
            StepFailed: the engine refused.
            EngineUnavailable: the engine stopped answering.
        """
        try:
            with self._engine_errors():
                self.api.rename(name, new_name)
                self.api.start(new_name)
        except self._errors.APIError as e:
            raise StepFailed(f"docker start {new_name}", _api_message(e)) from None

    # -- plumbing ---------------------------------------------------------------------

    def _engine_errors(self):
        return _EngineErrors(self)

    def _retry(self, what: str, fn: Callable[[], Any], retries: int, backoff: float,
               sleep: Callable[[float], None] = time.sleep) -> Any:
        """Run ``fn``; on a transient registry error wait (backoff·2^n, ±25%) and try
        again, at most ``retries`` more times. Final errors are raised at once."""
        attempt = 0
        while True:
            try:
                return fn()
            except (self._errors.APIError, _StreamError) as e:
                text = _api_message(e) if isinstance(e, self._errors.APIError) else str(e)
                status = getattr(e, "status_code", None)
                transient = not _FINAL.search(text) and (
                    bool(_TRANSIENT.search(text)) or (status is not None and status >= 500))
                if not transient or attempt >= retries:
                    tries = f" (after {attempt + 1} attempts)" if attempt else ""
                    hint = ("check that the registry runs and is reachable from the engine"
                            if transient else None)
                    raise StepFailed(what, f"{text}{tries}", hint=hint) from None
            delay = backoff * (2 ** attempt) * random.uniform(0.75, 1.25)
            attempt += 1
            sleep(delay)


class _EngineErrors:
    """Turns a lost engine (connection refused, socket gone, read timeout) into
    EngineUnavailable; the SDK's API errors pass through for the caller to judge."""

    def __init__(self, engine: DockerEngine):
        self.engine = engine

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if exc is None:
            return False
        import requests

        errors = self.engine._errors
        if isinstance(exc, errors.APIError):
            return False
        lost = isinstance(exc, requests.exceptions.RequestException) and not isinstance(
            exc, requests.exceptions.HTTPError)
        if isinstance(exc, errors.DockerException):  # the SDK wraps some transport errors
            lost = isinstance(exc.__cause__ or exc.__context__, requests.exceptions.RequestException)
        if lost:
            raise _unavailable(self.engine.address, exc) from None
        return False


class _StreamError(Exception):
    """An error the engine reported inside a pull or push stream."""


# --------------------------------------------------------------------------------------
# build output


class _AppendLog:
    """Appends to a build log once the build is over (opened for each line)."""

    def __init__(self, path: Path | None):
        self.path = path

    def write(self, text: str) -> None:
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(text)


class _BuildLog:
    """The full build output, written as it comes (so it can be followed)."""

    def __init__(self, path: Path | str | None):
        self.path = Path(path) if path else None
        self._f = None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "w", encoding="utf-8")  # noqa: SIM115  closed by close()

    def write(self, text: str) -> None:
        if self._f:
            self._f.write(text)
            self._f.flush()

    def close(self) -> None:
        if self._f:
            self._f.close()
            self._f = None


class _Step:
    __slots__ = ("instruction", "is_from", "number", "status")

    def __init__(self, number: int, instruction: str):
        self.number = number
        self.instruction = instruction
        self.status = "running"
        self.is_from = instruction.split(None, 1)[0].upper() == "FROM" if instruction else False


class _StreamReader:
    """What both builders' readers share: steps, tail of output, the error."""

    def __init__(self, progress_cb, log: _BuildLog):
        self.progress_cb = progress_cb
        self.log = log
        self.steps: dict[Any, _Step] = {}
        self.total = 0
        self.lines: list[str] = []
        self.error: str | None = None
        self.image_id = ""

    def _line(self, text: str) -> None:
        self.lines.append(_ANSI.sub("", text))
        if len(self.lines) > 200:
            del self.lines[:-TAIL_LINES]

    def _emit(self, step: _Step) -> None:
        if self.progress_cb and not step.is_from:
            self.progress_cb(BuildEvent(step.number, self.total, step.instruction, step.status))

    def fail(self, message: str) -> None:
        self.error = message
        self.log.write(f"ERROR: {message}\n")

    def counts(self) -> tuple[int, int, int]:
        steps = list(self.steps.values())
        cached = sum(1 for s in steps if not s.is_from and s.status == "cached")
        built = sum(1 for s in steps if not s.is_from and s.status == "done")
        return max(self.total, len(steps)), built, cached

    def tail(self) -> list[str]:
        return [line for line in self.lines if line.strip()][-TAIL_LINES:]

    def failed_step(self) -> str:
        return ""


class _ClassicStream(_StreamReader):
    """The classic builder's JSON stream: ``{"stream": "Step 2/7 : RUN ..."}``,
    ``{"stream": " ---> Using cache"}``, ``{"aux": {"ID": ...}}``, ``{"error": ...}``."""

    def __init__(self, progress_cb, log):
        super().__init__(progress_cb, log)
        self.current: _Step | None = None
        self._partial = ""

    def feed(self, msg: dict) -> None:
        if "stream" in msg:
            text = self._partial + msg["stream"]
            self.log.write(msg["stream"])
            *complete, self._partial = text.split("\n")
            for line in complete:
                self._on_line(line.rstrip("\r"))
        elif "status" in msg:  # pulling the base image
            self.log.write(f"{msg.get('id', '')} {msg['status']}\n".lstrip())
        if msg.get("aux", {}).get("ID"):
            self.image_id = msg["aux"]["ID"]
        if msg.get("error") or msg.get("errorDetail"):
            if self._partial:
                self._on_line(self._partial)
                self._partial = ""
            self.fail(_stream_error(msg))

    def _on_line(self, line: str) -> None:
        self._line(line)
        m = _CLASSIC_STEP.match(line)
        if m:
            self._finish_current()
            number, self.total = int(m.group(1)), int(m.group(2))
            self.current = self.steps[number] = _Step(number, m.group(3).strip())
            self._emit(self.current)
        elif self.current and _CLASSIC_CACHED.match(line.strip()):
            self.current.status = "cached"
            self._emit(self.current)

    def _finish_current(self) -> None:
        if self.current and self.current.status == "running":
            self.current.status = "done"
            self._emit(self.current)

    def counts(self) -> tuple[int, int, int]:
        if self.error is None:
            self._finish_current()
        return super().counts()

    def failed_step(self) -> str:
        s = self.current
        return f"{s.number}/{self.total} `{s.instruction}`" if s else ""


class _BuildkitStream(_StreamReader):
    """BuildKit's stream through the engine API: ``{"id": "moby.buildkit.trace",
    "aux": base64(protobuf StatusResponse)}``; the image id in ``moby.image.id``.

    Only the few protobuf fields needed are read (moby/buildkit
    api/services/control/control.proto): StatusResponse.vertexes=1, .logs=3;
    Vertex.digest=1, .name=3, .cached=4, .started=5, .completed=6, .error=7;
    VertexLog.vertex=1, .msg=4; Timestamp.seconds=1, .nanos=2.
    """

    def __init__(self, progress_cb, log):
        super().__init__(progress_cb, log)
        self.vertex_step: dict[str, _Step | None] = {}  # digest → step (None: internal)
        self.vertex_no: dict[str, int] = {}
        self.vertex_lines: dict[str, list[str]] = {}
        self.stage_totals: dict[str, int] = {}
        self.stage_order: list[str] = []
        self.failed_digest = ""
        self.started: float | None = None  # the engine's clock, when the first vertex started
        self._partial: dict[str, str] = {}
        self._announced: set[_Step] = set()

    def feed(self, msg: dict) -> None:
        if msg.get("id") == "moby.buildkit.trace" and msg.get("aux"):
            try:
                raw = base64.b64decode(msg["aux"])
                self._status(raw)
            except (ValueError, IndexError):
                self.log.write("(unreadable BuildKit status message)\n")
        elif msg.get("id") == "moby.image.id" and isinstance(msg.get("aux"), dict):
            self.image_id = msg["aux"].get("ID", "")
        elif "stream" in msg:
            self.log.write(msg["stream"])
            for line in msg["stream"].splitlines():
                self._line(line)
        if msg.get("error") or msg.get("errorDetail"):
            self.fail(_stream_error(msg))

    def _status(self, raw: bytes) -> None:
        for num, _wt, val in _pb_fields(raw):
            if num == 1:
                self._vertex(val)
            elif num == 3:
                self._vertex_log(val)

    def _vertex(self, raw: bytes) -> None:
        digest = name = error = ""
        cached = started = completed = False
        began = ended = None
        for num, _wt, val in _pb_fields(raw):
            if num == 1:
                digest = val.decode()
            elif num == 3:
                name = val.decode("utf-8", errors="replace")
            elif num == 4:
                cached = bool(val)
            elif num == 5:
                started = True
                when = began = _pb_timestamp(val)
                if when is not None and (self.started is None or when < self.started):
                    self.started = when
            elif num == 6:
                completed = True
                ended = _pb_timestamp(val)
            elif num == 7:
                error = val.decode("utf-8", errors="replace")
        if digest not in self.vertex_no:
            self.vertex_no[digest] = len(self.vertex_no) + 1
            self.log.write(f"#{self.vertex_no[digest]} {name}\n")
            self.vertex_step[digest] = self._step_of(name)
        n = self.vertex_no[digest]
        step = self.vertex_step[digest]
        if began is not None and ended is not None and not cached:
            # Every vertex's time in the build log, internal ones (exporting) too: where
            # a build spends its time.
            self.log.write(f"#{n} took {ended - began:.2f} s\n")
        if error:
            self.log.write(f"#{n} ERROR: {error}\n")
            if step is not None or not self.failed_digest:
                self.failed_digest = digest
        if step is None:
            return
        if cached and step.status != "cached":
            step.status = "cached"
            self.log.write(f"#{n} CACHED\n")
            self._emit(step)
        elif completed and not error and step.status == "running":
            step.status = "done"
            self.log.write(f"#{n} DONE\n")
            self._emit(step)
        elif started and step.status == "running" and step not in self._announced:
            self._announced.add(step)
            self._emit(step)

    def _step_of(self, name: str) -> _Step | None:
        m = _BUILDKIT_STEP.match(name)
        if not m:
            return None  # [internal] load ..., transferring context, exporting ...
        stage = m.group(1) or ""
        if stage not in self.stage_totals:
            self.stage_order.append(stage)
        self.stage_totals[stage] = int(m.group(3))
        # Number steps across stages, in the order stages show up.
        offset = sum(self.stage_totals[s] for s in self.stage_order[: self.stage_order.index(stage)])
        self.total = sum(self.stage_totals.values())
        number = offset + int(m.group(2))
        step = self.steps.get((stage, number))
        if step is None:
            step = self.steps[(stage, number)] = _Step(number, m.group(4).strip())
        return step

    def _vertex_log(self, raw: bytes) -> None:
        digest, data = "", b""
        for num, _wt, val in _pb_fields(raw):
            if num == 1:
                digest = val.decode()
            elif num == 4:
                data = val
        text = self._partial.pop(digest, "") + data.decode("utf-8", errors="replace")
        *complete, rest = text.split("\n")
        if rest:
            self._partial[digest] = rest
        n = self.vertex_no.get(digest, 0)
        for line in complete:
            line = line.rstrip("\r")
            self.log.write(f"#{n} {line}\n")
            self._line(line)
            self.vertex_lines.setdefault(digest, []).append(line)
            del self.vertex_lines[digest][:-TAIL_LINES]

    def tail(self) -> list[str]:
        if self.failed_digest in self.vertex_lines:
            return [line for line in self.vertex_lines[self.failed_digest] if line.strip()][-TAIL_LINES:]
        return super().tail()

    def failed_step(self) -> str:
        step = self.vertex_step.get(self.failed_digest)
        if step is None:
            return ""
        return f"{step.number}/{self.total} `{step.instruction}`"


def _pb_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _pb_timestamp(buf: bytes) -> float | None:
    """A google.protobuf.Timestamp as seconds since the epoch."""
    try:
        fields = {num: val for num, _wt, val in _pb_fields(buf)}
    except (ValueError, IndexError):
        return None
    seconds, nanos = fields.get(1, 0), fields.get(2, 0)
    if not isinstance(seconds, int) or not isinstance(nanos, int):
        return None
    return seconds + nanos / 1e9


def _pb_fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of each field of a protobuf message: an int
    for varints, bytes for everything else."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _pb_varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            val, i = _pb_varint(buf, i)
        elif wt == 1:
            val, i = buf[i:i + 8], i + 8
        elif wt == 2:
            size, i = _pb_varint(buf, i)
            val, i = buf[i:i + size], i + size
        elif wt == 5:
            val, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"protobuf wire type {wt} not handled")
        yield num, wt, val


# --------------------------------------------------------------------------------------
# helpers


class _ContextTar:
    """The build context as a tar stream, written by a thread into a pipe and read by
    the HTTP request as chunks: nothing is staged on disk or held in memory.

    GNU tar format: BuildKit takes a PAX-format body (Python's default) for a plain
    Dockerfile instead of a context.
    """

    CHUNK = 1 << 20

    def __init__(self, root: Path, files: list[str]):
        self.root = root
        self.files = files
        self.error: BaseException | None = None
        r, w = os.pipe()
        self._r = os.fdopen(r, "rb")
        self._thread = threading.Thread(target=self._write, args=(w,), daemon=True,
                                        name="mlbuild-context-tar")
        self._thread.start()

    def _write(self, fd: int) -> None:
        try:
            with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w|",
                                                        format=tarfile.GNU_FORMAT) as tar:
                for rel in self.files:
                    tar.add(self.root / rel, arcname=rel, recursive=False)
        except BrokenPipeError:
            pass  # the engine stopped reading (it failed early); its error tells why
        except BaseException as e:  # noqa: BLE001  reported by __iter__
            self.error = e

    def __iter__(self) -> Iterator[bytes]:
        while True:
            chunk = self._r.read(self.CHUNK)
            if not chunk:
                break
            yield chunk
        self._thread.join()
        if self.error is not None:
            raise InvalidInput(f"cannot read the build context {self.root}: {self.error}")

    def close(self) -> None:
        self._r.close()
        self._thread.join(timeout=5)


def _context_tar(root: Path, dockerfile: str) -> _ContextTar:
    from docker.utils.build import exclude_paths

    patterns: list[str] = []
    ignore = root / ".dockerignore"
    if ignore.is_file():
        for line in ignore.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                patterns.append(line)
    files = sorted(exclude_paths(str(root), patterns, dockerfile=dockerfile))
    return _ContextTar(root, files)


def _short(tag: str) -> str:
    """How progress names an image: ``host:5000/ml/proj-svc:0123`` → ``proj-svc:0123``."""
    return tag.rsplit("/", 1)[-1]


def layer_update(msg: dict) -> tuple[str, str, int, int] | None:
    """A push or pull stream message as news of one layer: (layer id, state, bytes
    done, bytes in all), or None when it is no such news. ``Mounted from REPO`` (a
    cross-repository mount) is a layer the registry already had."""
    layer_id, status = msg.get("id"), msg.get("status") or ""
    if not layer_id or "progressDetail" not in msg:
        return None
    state = _LAYER_STATES.get(status) or (
        progress.PRESENT if status.startswith("Mounted from") else None)
    if state is None:
        return None
    detail = msg.get("progressDetail") or {}
    return layer_id, state, int(detail.get("current") or 0), int(detail.get("total") or 0)


def _report_layer(shown: progress.Task, msg: dict) -> None:
    update = layer_update(msg)
    if update:
        shown.layer(*update)


def _split_ref(tag: str) -> tuple[str, str]:
    """``host:5000/ns/name:tag`` → (``host:5000/ns/name``, ``tag``); no tag → latest."""
    from docker.utils import parse_repository_tag

    repo, ref = parse_repository_tag(tag)
    return repo, ref or "latest"


def _restart_policy(restart: str) -> dict:
    name, _, count = restart.partition(":")
    if name not in ("no", "always", "unless-stopped", "on-failure") or (count and name != "on-failure"):
        raise InvalidInput(f"restart policy {restart!r}: use no, always, unless-stopped, on-failure[:N]")
    if count and not count.isdigit():
        raise InvalidInput(f"restart policy {restart!r}: the retry count must be a number")
    policy: dict[str, Any] = {"Name": "" if name == "no" else name}
    if count:
        policy["MaximumRetryCount"] = int(count)
    return policy


def _parse_time(value: str | None) -> datetime | None:
    """The engine's RFC 3339 times (nanoseconds, ``Z``); its zero time means never."""
    if not value or value.startswith("0001-01-01"):
        return None
    m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)?$", value)
    if not m:
        return None
    base, frac, zone = m.groups()
    text = base + (f".{(frac or '0')[:6].ljust(6, '0')}") + ("+00:00" if zone in (None, "Z") else zone)
    return datetime.fromisoformat(text)


def _api_message(e: BaseException) -> str:
    explanation = getattr(e, "explanation", None)
    if explanation:
        return explanation.decode() if isinstance(explanation, bytes) else str(explanation)
    return str(e)


def _stream_error(msg: dict) -> str:
    detail = msg.get("errorDetail") or {}
    return (detail.get("message") or msg.get("error") or "unknown error").strip()


def _no_container(name: str) -> InvalidInput:
    return InvalidInput(f"no container named {name!r}",
                        hint="`mlbuild status` lists the services and their containers")
