"""Local processes: the serving runtime as a background process (the ``process`` target).

One deployed service is one release folder and one process::

    .mlbuild/run/<target>/<service>/<release>/   hard links of the build context
        runtime/ models/ app/ samples/
        ready.json   written by the runtime once init() returned and it listens
        exit         written by the wrapper with the runtime's exit status
    .mlbuild/logs/<target>/<service>.log         stdout and stderr, appended, rotated
                                 by size into <service>.log.1 .. .log.LOG_KEEP
    .mlbuild/secrets/<target>/<service>.keys     the auth keys, mode 0600

A process is started through a small ``sh`` wrapper in a session of its own (the
wrapper's pid is the process group, which ``stop`` signals as a whole, workers
included); the wrapper writes the runtime's exit status when the runtime ends by
itself, so ``status`` can say "exited 3" long after ``deploy`` returned::

    sh ─┬─ { runtime; echo $? > exit; } 2>&1 ──pipe──▶ logpipe ──▶ <service>.log
        │    (stdout and stderr of the runtime, its workers and their children)

Logs: the runtime's output goes through a pipe to a log writer of its own,
``mlbuild/runtime/logpipe.py`` (run by the release's Python from the release's
``runtime/``), which rotates the log by size while the service runs (``LOG_ROTATE_BYTES``,
``MLBUILD_LOG_MAX_BYTES``; ``LOG_KEEP`` older files). A separate process, not a thread of
the runtime: a C extension writing while it holds the GIL cannot stall it, and it
outlives the runtime until the last line is written (it ignores the stop signal and ends
at the end of its input); the wrapper ends only after it, so a failed start's last lines
are in the file when ``wait_ready`` sees the failure. The old and the new release of a
replacement share the file; logpipe's docstring says how.

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
from typing import BinaryIO, Callable, Iterator

HEALTHY = "Healthy"
TRANSITIONING = "Transitioning"
UNHEALTHY = "Unhealthy"
UNSCHEDULABLE = "Unschedulable"
FAILED = "Failed"

READY_FILE = "ready.json"
EXIT_FILE = "exit"
PGID_FILE = "pgid"

def _env_int(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ[name]))
    except (KeyError, ValueError):
        return default


LOG_ROTATE_BYTES = _env_int("MLBUILD_LOG_MAX_BYTES", 10 * 1024 * 1024)  # per file
LOG_KEEP = 2  # older files: <log>.1 (the newest) .. <log>.LOG_KEEP
LOGPIPE = "runtime/mlbuild/runtime/logpipe.py"  # in a release
# $0: the exit file; $1 $2: the Python and logpipe.py; $3 $4 $5: its arguments (the log,
# its size, how many to keep); then the runtime's command. The log writer ignores the
# signals a stop sends (a trap of '' is inherited by the exec'd program), and writes its
# own start-up errors to the log.
_WRAPPER = (
    'py=$1 pipe=$2 log=$3 max=$4 keep=$5; shift 5; '
    '{ "$@"; echo $? > "$0"; } 2>&1 | '
    '{ trap "" TERM INT HUP; exec "$py" -I -S "$pipe" "$log" "$max" "$keep" 2>>"$log"; }')


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
    """Start ``argv`` in the background, in its own session, logging to ``log_path``
    through ``release``'s log writer (see the module docstring).

    ``argv[0]`` is the release's Python: it runs the log writer too.
    """
    from mlbuild.runtime.logpipe import RotatingLog

    log_path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (READY_FILE, EXIT_FILE, PGID_FILE):
        (release / stale).unlink(missing_ok=True)
    log = RotatingLog(log_path, LOG_ROTATE_BYTES, LOG_KEEP)
    try:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting release "
                  f"{release.name}\n".encode())
    finally:
        log.close()
    popen = subprocess.Popen(
        ["sh", "-c", _WRAPPER, str(release / EXIT_FILE), argv[0], str(release / LOGPIPE),
         str(log_path), str(LOG_ROTATE_BYTES), str(LOG_KEEP), *argv],
        cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
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


def _rotated(path: Path) -> list[Path]:
    """A log's older files that exist, newest first (``LOG.1``, ``LOG.2``, ...)."""
    out = []
    for i in range(1, 100):
        older = path.with_name(f"{path.name}.{i}")
        if not older.is_file():
            break
        out.append(older)
    return out


def tail(path: Path, lines: int = 20) -> list[str]:
    """The last ``lines`` lines of a log, from its older files too when the log holds
    fewer (it was just rotated). Reads at most the last 64 KiB of each file."""
    out: list[str] = []
    for p in [path, *_rotated(path)]:
        try:
            with open(p, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - 65536))
                found = fh.read().decode("utf-8", "replace").splitlines()
        except OSError:
            break
        if size > 65536:
            found = found[1:]  # begins inside a line
        out = found + out
        if len(out) >= lines or size > 65536:
            break
    return out[-lines:]


def read_log(path: Path) -> Iterator[str]:
    """Every line of a log, its older files first."""
    for p in [*reversed(_rotated(path)), path]:
        try:
            with open(p, "rb") as fh:
                for line in fh:
                    yield line.decode("utf-8", "replace").rstrip("\n")
        except FileNotFoundError:  # rotated away while we read
            continue


def _names(path: Path, st: os.stat_result) -> bool:
    """Does ``path`` name the file of stat ``st``?"""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    return (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev)


def _newer_than(path: Path, fh: BinaryIO) -> BinaryIO | None:
    """The file of ``path``'s rotation written after the one ``fh`` reads (no longer
    ``path`` itself), opened; None when there is none yet.

    The files are ``path``, ``path.1``, ... newest first: the one after ``path.I`` is
    ``path.I-1``. The name is checked again after the open, since a rotation meanwhile
    shifts every name; when the file read was dropped already (rotated past the ones
    kept), the oldest one left comes next.
    """
    mine = os.fstat(fh.fileno())
    for _ in range(100):
        names = [path, *_rotated(path)]
        at = next((i for i, p in enumerate(names) if i and _names(p, mine)), None)
        try:
            new = open(names[at - 1] if at is not None else names[-1], "rb")
        except FileNotFoundError:
            return None
        if at is None or _names(names[at], mine):
            return new
        new.close()
    return None


def follow_log(path: Path, poll: float = 0.2) -> Iterator[str]:
    """The lines appended to a log from now on, as they come, without end (the caller
    stops). Follows the log across rotations: once the file it reads is no longer the
    one ``path`` names, the rest of it is read, then the file written after it (see
    :func:`_newer_than`), from its start: however many rotations came between two
    polls, no line of a kept file is skipped."""
    fh = open(path, "rb")
    try:
        fh.seek(0, os.SEEK_END)
        partial = b""
        while True:
            chunk = fh.readline()
            if chunk.endswith(b"\n"):
                yield (partial + chunk).decode("utf-8", "replace").rstrip("\n")
                partial = b""
                continue
            partial += chunk  # nothing, or a line still being written
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None  # between a rotation's rename and the new file: wait
            mine = os.fstat(fh.fileno())
            if now is not None and (now.st_ino, now.st_dev) != (mine.st_ino, mine.st_dev):
                rest = partial + fh.read()  # written to it before its writers noticed
                for line in rest.splitlines():
                    yield line.decode("utf-8", "replace")
                partial = b""
                new = _newer_than(path, fh)
                if new is not None:
                    fh.close()
                    fh = new
                    continue
            time.sleep(poll)
    finally:
        fh.close()
