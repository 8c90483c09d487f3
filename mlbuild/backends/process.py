"""Local processes: the serving runtime as a background process (the ``process`` target).

One deployed service is one release folder and one process::

    .mlbuild/run/<target>/<service>/<release>/   hard links of the build context
        runtime/ models/ app/ samples/
        ready.json   written by the runtime once init() returned and it listens
        exit         written by the wrapper with the runtime's exit status
    .mlbuild/logs/<target>/<service>.log         stdout and stderr, appended
    .mlbuild/secrets/<target>/<service>.keys     the auth keys, mode 0600

A process is started through a one-line ``sh`` wrapper in a session of its own (the
wrapper's pid is the process group, which ``stop`` signals as a whole, workers
included); the wrapper writes the runtime's exit status when the runtime ends by
itself, so ``status`` can say "exited 3" long after ``deploy`` returned.

Replacement without downtime: the runtime is started with ``MLBUILD_REUSE_PORT=1``,
so it binds the port with SO_REUSEPORT beside the old release, and only after its
init() returned; once its ready file appears the old release is stopped (SIGTERM:
in-flight requests finish). A port held by another program (one that did not set
SO_REUSEPORT) is found before anything starts: the state is Unschedulable.

Linux only (``/proc`` tells a live runtime from a reused pid).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HEALTHY = "Healthy"
TRANSITIONING = "Transitioning"
UNHEALTHY = "Unhealthy"
UNSCHEDULABLE = "Unschedulable"
FAILED = "Failed"

READY_FILE = "ready.json"
EXIT_FILE = "exit"
PGID_FILE = "pgid"
LOG_ROTATE_BYTES = 10 * 1024 * 1024
_WRAPPER = '"$@"; echo $? > "$0"'


def port_available(host: str, port: int) -> bool:
    """Can a runtime with SO_REUSEPORT bind ``host:port``?

    True when the port is free or held by listeners that set SO_REUSEPORT (an earlier
    release of ours); False when another program holds it.

    Raises:
        OSError: the port cannot be bound for another reason (a privileged port).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def listening(host: str, port: int) -> bool:
    """Does anything accept connections on ``host:port``?"""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


@dataclass
class Started:
    """A process just started by this mlbuild process."""

    popen: subprocess.Popen
    release: Path

    @property
    def pgid(self) -> int:
        return self.popen.pid


def start(release: Path, argv: list[str], env: dict[str, str], log_path: Path,
          cwd: Path) -> Started:
    """Start ``argv`` in the background, in its own session, logging to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (READY_FILE, EXIT_FILE, PGID_FILE):
        (release / stale).unlink(missing_ok=True)
    try:  # one older log is kept: the log does not grow without end
        if log_path.stat().st_size > LOG_ROTATE_BYTES:
            os.replace(log_path, log_path.with_name(log_path.name + ".1"))
    except FileNotFoundError:
        pass
    with open(log_path, "ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting release "
                  f"{release.name}\n".encode())
        log.flush()
        popen = subprocess.Popen(
            ["sh", "-c", _WRAPPER, str(release / EXIT_FILE), *argv],
            cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True)
    # Written at once, so a release can be found and stopped even before it is ready
    # (a deploy killed while init() runs).
    (release / PGID_FILE).write_text(str(popen.pid))
    return Started(popen, release)


def release_group(release: Path) -> int | None:
    """The process group started for ``release``, while any of it still runs."""
    try:
        pgid = int((release / PGID_FILE).read_text())
    except (OSError, ValueError):
        pgid = None
    if pgid is not None:
        try:
            args = Path(f"/proc/{pgid}/cmdline").read_bytes().split(b"\0")
            if str(release / EXIT_FILE).encode() in args and _group_alive(pgid, None):
                return pgid
        except OSError:
            pass
    # The wrapper is gone (it was killed alone): find the group through the runtime.
    ready = read_ready(release)
    if ready and ready.get("pid") and is_runtime(ready["pid"], ready.get("port")):
        try:
            return os.getpgid(ready["pid"])
        except ProcessLookupError:
            return None
    if pgid is not None and _group_alive(pgid, None):
        # The wrapper exited (its runtime was killed), a worker may linger: check that
        # the group's members belong to this release before signalling them.
        for member in _members(pgid):
            try:
                if os.readlink(f"/proc/{member}/cwd").startswith(str(release)):
                    return pgid
            except OSError:
                continue
    return None


def read_ready(release: Path) -> dict | None:
    """The ready file the runtime wrote (pid, port, health_port), or None."""
    try:
        return json.loads((release / READY_FILE).read_text())
    except (OSError, ValueError):
        return None


def read_exit(release: Path) -> int | None:
    """The exit status the wrapper recorded, or None while the runtime runs (or when
    it was killed together with its wrapper)."""
    try:
        return int((release / EXIT_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def wait_ready(proc: Started, timeout: float, tick: Callable[[float], None] | None = None,
               ) -> tuple[str, dict | int | None]:
    """Wait until the runtime is ready or gone.

    Returns:
        (HEALTHY, ready-file data), (FAILED, exit status or None), or
        (TRANSITIONING, None) when ``timeout`` passed first.
    """
    started = time.monotonic()
    delay = 0.02
    next_tick = started + 5
    while True:
        ready = read_ready(proc.release)
        if ready is not None:
            return HEALTHY, ready
        rc = proc.popen.poll()
        if rc is not None:
            status = read_exit(proc.release)
            return FAILED, rc if status is None else status
        now = time.monotonic()
        if now - started > timeout:
            return TRANSITIONING, None
        if tick and now >= next_tick:
            tick(now - started)
            next_tick = now + 5
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)


def _members(pgid: int) -> list[int]:
    """Pids of the group's processes that still run (zombies do not count)."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(entry.name))
    return out


def _group_alive(pgid: int, popen: subprocess.Popen | None) -> bool:
    """Does any process of the group still run? Zombies do not count: a wrapper whose
    parent (an earlier mlbuild) is gone waits for the system to reap it."""
    if popen is not None:
        popen.poll()  # reap our own child
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return bool(_members(pgid))


def stop(pgid: int, timeout: float = 10.0, popen: subprocess.Popen | None = None) -> None:
    """Stop a process group: SIGTERM (graceful), SIGKILL after ``timeout`` seconds."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _group_alive(pgid, popen):
            return
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for _ in range(100):
        if not _group_alive(pgid, popen):
            return
        time.sleep(0.02)


def is_runtime(pid: int, port: int) -> bool:
    """Is ``pid`` a live mlbuild runtime serving ``port`` (not a reused pid)?"""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":  # a zombie is not alive
        return False
    args = raw.split(b"\0")
    return b"mlbuild.runtime" in args and str(port).encode() in args


def probe(url: str, timeout: float = 2.0) -> int | None:
    """HTTP status of GET ``url`` (``http://HOST:PORT/PATH``), or None when nothing
    answers. A bare request on a socket: importing http.client took longer than the
    probe itself, and a no-op deploy probes every running service.

    HTTP/1.1 (keep-alive), so that this side closes first: an HTTP/1.0 answer ends
    with the server closing, which leaves a TIME_WAIT on the service's port and keeps
    a plain bind() of that port failing for a minute after the service stopped.
    """
    hostport, _, path = url.split("://", 1)[-1].partition("/")
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as s:
            s.sendall(f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\n\r\n".encode())
            head = b""
            while b"\r\n" not in head and len(head) < 1024:
                chunk = s.recv(1024)
                if not chunk:
                    break
                head += chunk
    except (OSError, ValueError):
        return None
    parts = head.split(b"\r\n", 1)[0].split()
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return int(parts[1])
    return None


def observe(dep: dict) -> tuple[str, str]:
    """The state of a recorded deployment and a few words of detail."""
    pid, port = dep.get("pid"), dep["port"]
    release = Path(dep["release"])
    if pid and is_runtime(pid, port):
        code = probe(f"{dep['url']}/healthz/ready")
        if code == 200:
            return HEALTHY, ""
        if code == 503:
            return TRANSITIONING, "init() still running"
        return UNHEALTHY, "does not answer health checks" if code is None \
            else f"answers health checks with {code}"
    rc = read_exit(release)
    if rc is not None:
        return FAILED, f"exited with status {rc}"
    return FAILED, f"process {pid} is gone (killed, or the machine restarted)"


def tail(path: Path, lines: int = 20) -> list[str]:
    """The last ``lines`` lines of a log file (reads at most its last 64 KiB)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 65536))
            data = fh.read()
    except OSError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-lines:]
