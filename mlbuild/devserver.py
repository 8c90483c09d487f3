"""``mlbuild serve SERVICE --reload``: run the runtime in a child process and restart it
when a watched file changes.

Polling (stat every 0.5 s) rather than inotify: no extra dependency, works on every
file system (network mounts, containers' bind mounts), and a service's source is a
handful of files. A change re-runs ``prepare`` first (registering a changed model,
rebuilding the context: both cached), so the new process sees everything new.

With --reload, serve ends only on Ctrl-C: whatever an edit or time can fix is waited
for, saying so. A change that breaks the script (a syntax error) leaves the failed
process's output on the terminal and waits for the next change. A port another program
listens on (at start, or taken while the server was down for a broken script) is probed
at every poll, files still watched, and the server starts once the port is free. Only
what no wait fixes (an address this machine does not have, a port this user may not
bind) ends serve: exit 1, saying which.

    start: port free? ──no──▶ "port P is taken": probe every poll ──free──▶ start
       │ yes
       ▼
    child runs ──exits 3 (script) or other──▶ wait for a change ──change──▶ start
       │      └──exits 1 (could not listen)──▶ probe: taken? wait as above; free? retry
       └──a change──▶ stop it, prepare ──▶ start
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

from mlbuild.errors import MlbuildError, StepFailed

POLL_SECONDS = 0.5
# After a start that could not listen although the port looked free (a race, or a socket
# state the probe does not see), the next try waits this long, doubling up to the cap.
RETRY_SECONDS, RETRY_CAP_SECONDS = 1.0, 30.0


def snapshot(paths: list[str]) -> dict[str, tuple[int, int]]:
    """``{file: (mtime_ns, size)}`` of every file at or below ``paths``."""
    out: dict[str, tuple[int, int]] = {}
    for root in paths:
        p = Path(root)
        files = [p]
        if p.is_dir():
            files = []
            for d, dirs, names in os.walk(p):
                dirs[:] = [x for x in dirs if x not in ("__pycache__", ".git", ".mlbuild")]
                files += [Path(d) / f for f in names if not f.endswith((".pyc", ".swp", "~"))]
        for f in files:
            try:
                st = f.stat()
            except OSError:
                continue
            out[str(f)] = (st.st_mtime_ns, st.st_size)
    return out


def _changed(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _address(argv: list) -> tuple[str, int] | None:
    """The ``--host`` and ``--port`` the runtime is started with (``api.prepare_serve``
    always gives both); None when ``argv`` lacks them (then nothing is probed)."""
    try:
        return argv[argv.index("--host") + 1], int(argv[argv.index("--port") + 1])
    except (ValueError, IndexError):
        return None


def port_taken(host: str, port: int) -> bool:
    """Whether another program listens on ``host:port``, tried the way the runtime binds
    (SO_REUSEADDR, so a port in TIME_WAIT is free); nothing stays bound.

    Raises:
        StepFailed: the address cannot be bound for a reason no wait fixes (this machine
            has no such address, the port needs privileges).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return True
        raise StepFailed("serve", f"cannot listen on {host}:{port}: {e.strerror or e}",
                         hint="choose another --host (an address of this machine, e.g. "
                              "127.0.0.1) or --port (above 1023 without privileges)") from e
    return False


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the server gets SIGTERM when ``mlbuild serve`` dies (even by kill -9)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _start(dev) -> subprocess.Popen:
    return subprocess.Popen(dev.argv, env=dev.env, cwd=dev.cwd, preexec_fn=_die_with_parent)


def _stop(child: subprocess.Popen | None) -> None:
    if child is None or child.poll() is not None:
        return
    child.send_signal(signal.SIGTERM)
    try:
        child.wait(timeout=10)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


class _Server:
    """The child server, and whether a start waits for the port (another program holds
    it, or the last start could not listen)."""

    def __init__(self, say: Callable[[str], None]):
        self.say = say
        self.child: subprocess.Popen | None = None
        self.retry_pending = False  # start again at the first poll after next_try
        self.said_taken = False     # "port P is taken" was said since the last start
        self.next_try = 0.0         # time.monotonic()
        self.backoff = RETRY_SECONDS

    def start(self, dev, after_change: bool = False) -> None:
        """Start ``dev`` if its port is free, else say so (once) and wait for it."""
        if after_change:
            self.backoff, self.next_try = RETRY_SECONDS, 0.0
        address = _address(dev.argv)
        if address and port_taken(*address):
            self._wait_for_port(address)
            return
        if self.said_taken:
            self.say(f"port {address[1]} is free: starting the server")
        self.retry_pending = self.said_taken = False
        self.child = _start(dev)

    def _wait_for_port(self, address: tuple[str, int]) -> None:
        if not self.said_taken:
            host, port = address
            self.say(f"port {port} on {host} is taken by another program: waiting for it "
                     "to be free, still watching for changes (stop that program, or Ctrl-C "
                     "and choose another --port)")
        self.retry_pending = self.said_taken = True

    def poll(self, dev) -> None:
        """Notice an exit of the child; retry a start that waits for the port."""
        if self.child is not None and self.child.poll() is not None:
            code, self.child = self.child.returncode, None
            address = _address(dev.argv)
            if code == 1 and address:  # the runtime's "cannot listen"
                if port_taken(*address):  # taken between the probe and the bind
                    self._wait_for_port(address)
                    return
                # NOTE: free again already, or a cause the probe does not see: retry,
                # backing off so that the second case is no loop of failing starts.
                self.say(f"the server could not listen (see its message above); "
                         f"trying again in {self.backoff:g} s")
                self.retry_pending, self.next_try = True, time.monotonic() + self.backoff
                self.backoff = min(self.backoff * 2, RETRY_CAP_SECONDS)
                return
            self.say(f"the server exited with status {code}; "
                     "waiting for a change to restart it")
        elif self.retry_pending and time.monotonic() >= self.next_try:
            self.start(dev)

    def stop(self) -> None:
        _stop(self.child)
        self.child = None
        self.retry_pending = self.said_taken = False


def run_with_reload(dev, prepare: Callable[[], object], say: Callable[[str], None]) -> None:
    """Serve until Ctrl-C (a normal end: returns), restarting after every change of
    ``dev.watch``, and waiting (saying so) while another program holds the port.

    Raises:
        StepFailed: the server's address cannot be bound for a reason no wait fixes.
    """
    seen = snapshot(dev.watch)
    server = _Server(say)
    try:
        server.start(dev)
        while True:
            time.sleep(POLL_SECONDS)
            server.poll(dev)
            now = snapshot(dev.watch)
            changed = _changed(seen, now)
            if not changed:
                continue
            seen = now
            shown = ", ".join(os.path.relpath(c) for c in changed[:3])
            say(f"reloading: {shown}{' ...' if len(changed) > 3 else ''} changed")
            server.stop()
            try:
                dev = prepare()
            except MlbuildError as e:
                say(f"error: {e.message}" + (f"\nhint: {e.hint}" if e.hint else ""))
                continue
            seen = snapshot(dev.watch)
            server.start(dev, after_change=True)
    except KeyboardInterrupt:
        say("stopped")
    finally:
        server.stop()
