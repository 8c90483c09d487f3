"""The project lock: one mlbuild process at a time changes a project's state.

A second process waits (saying so once) and gives up with a clear error after a
timeout (``MLBUILD_LOCK_TIMEOUT`` seconds, default 600). The lock is an ``flock`` on
``.mlbuild/lock``: the kernel drops it when the holder exits or is killed, so a
crashed run never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Callable

from mlbuild.errors import LockTimeout

DEFAULT_TIMEOUT = 600.0


class ProjectLock:
    def __init__(self, state_dir: Path, timeout: float | None = None,
                 on_wait: Callable[[str], None] | None = None):
        self.path = Path(state_dir) / "lock"
        if timeout is None:
            raw = os.environ.get("MLBUILD_LOCK_TIMEOUT", str(DEFAULT_TIMEOUT))
            try:
                timeout = float(raw)
            except ValueError:
                from mlbuild.errors import InvalidInput

                raise InvalidInput(f"MLBUILD_LOCK_TIMEOUT={raw!r} is not a number of seconds") from None
        self.timeout = timeout
        self.on_wait = on_wait
        self.fd: int | None = None

    def _holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout
        said = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not said and self.on_wait:
                    self.on_wait(f"waiting for another mlbuild process on this project ({self._holder()})")
                    said = True
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise LockTimeout(
                        f"another mlbuild process ({self._holder()}) has held {self.path} "
                        f"for more than {self.timeout:g} s",
                        hint="wait for it to finish, or stop it; "
                        "MLBUILD_LOCK_TIMEOUT sets how long to wait",
                    ) from None
                time.sleep(0.05)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()}".encode())
        except OSError:
            pass  # who holds it is only told to a waiting process (a full disk has no room)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None

    def __enter__(self) -> "ProjectLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
