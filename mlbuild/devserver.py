"""``mlbuild serve SERVICE --reload``: run the runtime in a child process and restart it
when a watched file changes.

Polling (stat every 0.5 s) rather than inotify: no extra dependency, works on every
file system (network mounts, containers' bind mounts), and a service's source is a
handful of files. A change re-runs ``prepare`` first (registering a changed model,
rebuilding the context: both cached), so the new process sees everything new.
A change that breaks the script (a syntax error) leaves the failed process's output
on the terminal and waits for the next change.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

from mlbuild.errors import MlbuildError

POLL_SECONDS = 0.5


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


def run_with_reload(dev, prepare: Callable[[], object], say: Callable[[str], None]) -> None:
    """Serve until Ctrl-C (a normal end: returns), restarting after every change of
    ``dev.watch``.

    Raises:
        StepFailed: the server cannot listen (its port is taken): no edit fixes that.
    """
    from mlbuild.errors import StepFailed

    seen = snapshot(dev.watch)
    child = _start(dev)
    reported_exit = False
    try:
        while True:
            time.sleep(POLL_SECONDS)
            if child is not None and child.poll() is not None and not reported_exit:
                if child.returncode == 1:  # the runtime's "cannot listen"
                    raise StepFailed("serve", "the server cannot listen (see its message "
                                              "above)", hint="choose another --port")
                say(f"the server exited with status {child.returncode}; "
                    "waiting for a change to restart it")
                reported_exit = True
            now = snapshot(dev.watch)
            changed = _changed(seen, now)
            if not changed:
                continue
            seen = now
            shown = ", ".join(os.path.relpath(c) for c in changed[:3])
            say(f"reloading: {shown}{' ...' if len(changed) > 3 else ''} changed")
            _stop(child)
            child = None
            try:
                dev = prepare()
            except MlbuildError as e:
                say(f"error: {e.message}" + (f"\nhint: {e.hint}" if e.hint else ""))
                continue
            seen = snapshot(dev.watch)
            child = _start(dev)
            reported_exit = False
    except KeyboardInterrupt:
        say("stopped")
    finally:
        _stop(child)
