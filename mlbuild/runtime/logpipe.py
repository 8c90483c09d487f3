"""The log writer of the ``process`` target: its input appended to a file rotated by size.

::

    python -I -S logpipe.py LOG_FILE MAX_BYTES KEEP   < a service's stdout and stderr

mlbuild's process backend (``mlbuild/backends/process.py``) starts a service as
``{ runtime; echo $? > exit; } 2>&1 | logpipe``: everything the runtime, its workers and
anything they start write to their inherited stdout and stderr (C-level writes included)
comes through one pipe, read by this separate process, so a long-running service's log
is rotated while it runs and never grows without bound.

Rotation: ``LOG_FILE`` never grows past ``MAX_BYTES``. Before a write would pass it,
``LOG_FILE.KEEP-1`` becomes ``LOG_FILE.KEEP`` (the oldest is dropped), ..., ``LOG_FILE``
becomes ``LOG_FILE.1``, and a new ``LOG_FILE`` is begun; a file ends at a line's end
unless one line is longer than ``MAX_BYTES`` (it is split). At most ``KEEP + 1`` files,
each at most ``MAX_BYTES``.

Several writers may share one file: an old and a new release during a replacement, and
mlbuild itself (the ``--- starting release`` line, through :class:`RotatingLog`). Each
appends (``O_APPEND``), notices when the path names another file than the one it holds
(another writer rotated) and reopens it; a rotation happens under an ``flock`` of the
log's folder, after checking again that it is still needed.

It never stops the service, never blocks it for long and loses nothing at exit:

- it ignores SIGTERM, SIGINT and SIGHUP (stopping a release signals its whole process
  group) and ends at end of input, once the runtime and every process that inherited
  its output have exited: the runtime's last lines, those of its graceful stop, reach
  the file, and the wrapper (which waits for this process) ends only after they did;
- one thread only ever reads the pipe, into a buffer of at most ``BUFFER_BYTES``;
  another writes the file. When the file cannot be written (disk full, a hung file
  system) the output beyond the buffer is dropped, counted, and said in the log once
  writing works again; the service's writes never wait for the disk. Only a writer
  stopped outright (SIGSTOP) or killed (SIGKILL; the service's writes then fail with
  EPIPE, which Python raises as BrokenPipeError) can get in its way.

Standard library only: it runs with the service environment's Python, from the release's
copy of the runtime (``-I -S``: nothing of the environment is imported).
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys
import threading
import time
import traceback

BUFFER_BYTES = 4 * 1024 * 1024  # read, not yet written: beyond it, output is dropped
READ_BYTES = 64 * 1024
RETRY_AFTER_S = 1.0  # after a failed write


class RotatingLog:
    """Appends to ``path``, rotating it by size (see the module docstring).

    Args:
        path: the log file; its folder must exist.
        max_bytes: the largest a file may grow (1 or more).
        keep: how many older files to keep, ``path.1`` (the newest) to ``path.KEEP``
            (1 or more).

    Raises:
        ValueError: ``max_bytes`` or ``keep`` below 1.
    """

    def __init__(self, path, max_bytes: int, keep: int):
        if max_bytes < 1 or keep < 1:
            raise ValueError(f"max_bytes {max_bytes} and keep {keep} must be 1 or more")
        self.path = os.fspath(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self._fd: int | None = None

    def write(self, data: bytes) -> None:
        """Append ``data``, rotating first whenever it would not fit.

        Raises:
            OSError: the file cannot be opened, written or rotated.
        """
        while data:
            size = self._current().st_size
            room = self.max_bytes - size
            if len(data) <= room:
                self._write_all(data)
                return
            cut = data.rfind(b"\n", 0, room) + 1 if room > 0 else 0
            if cut == 0:  # not even the first line fits
                if size > 0:
                    self._rotate()
                    continue
                cut = self.max_bytes  # a line longer than a whole file: split it
            self._write_all(data[:cut])
            data = data[cut:]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self) -> os.stat_result:
        self.close()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        return os.fstat(self._fd)

    def _is_ours(self) -> os.stat_result | None:
        """Our file's stat while the path still names it, else None."""
        if self._fd is None:
            return None
        mine = os.fstat(self._fd)
        try:
            there = os.stat(self.path)
        except FileNotFoundError:
            return None
        return mine if (there.st_ino, there.st_dev) == (mine.st_ino, mine.st_dev) else None

    def _current(self) -> os.stat_result:
        """The stat of the file the path names, reopened first if it is another."""
        return self._is_ours() or self._open()

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def _rotate(self) -> None:
        folder = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            ours = self._is_ours()
            if ours is not None and ours.st_size > 0:  # else: another writer just did it
                for i in range(self.keep - 1, 0, -1):
                    try:
                        os.replace(f"{self.path}.{i}", f"{self.path}.{i + 1}")
                    except FileNotFoundError:
                        pass
                os.replace(self.path, f"{self.path}.1")
            self._open()
        finally:
            os.close(folder)  # and with it the lock


class _Pump:
    """A reader thread that never waits for the disk, and a writer (the caller's)."""

    def __init__(self, log: RotatingLog, limit: int = BUFFER_BYTES):
        self.log = log
        self.limit = limit
        self._cond = threading.Condition()
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._dropped = 0
        self._eof = False

    def read(self, fd: int) -> None:
        """Read ``fd`` to its end (run in a thread of its own)."""
        while True:
            try:
                chunk = os.read(fd, READ_BYTES)
            except OSError:
                chunk = b""
            with self._cond:
                if not chunk:
                    self._eof = True
                elif self._buffered + len(chunk) > self.limit:
                    self._dropped += len(chunk)
                else:
                    self._chunks.append(chunk)
                    self._buffered += len(chunk)
                self._cond.notify()
            if not chunk:
                return

    def write(self) -> None:
        """Write what the reader buffers until its input ended and all is written."""
        while True:
            with self._cond:
                while not self._chunks and not self._eof:
                    self._cond.wait()
                data = b"".join(self._chunks)
                self._chunks, self._buffered = [], 0
                dropped, self._dropped = self._dropped, 0
                eof = self._eof
            if dropped:
                data += (f"[mlbuild logpipe: {dropped} bytes of output dropped: the log "
                         f"could not be written fast enough]\n").encode()
            try:
                self.log.write(data)
            except OSError:
                with self._cond:
                    self._dropped += len(data)
                if not eof:
                    time.sleep(RETRY_AFTER_S)  # the reader keeps draining meanwhile
            if eof:
                with self._cond:
                    if not self._chunks:
                        return

    def discard(self) -> None:
        """From now on, drop everything read (the writer failed for good)."""
        with self._cond:
            self.limit = -1
            self._chunks, self._buffered = [], 0


def main(argv: list[str] | None = None) -> int:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    args = sys.argv[1:] if argv is None else argv
    try:
        path, max_bytes, keep = args[0], int(args[1]), int(args[2])
        log = RotatingLog(path, max_bytes, keep)
    except (IndexError, ValueError) as exc:
        print(f"usage: logpipe.py LOG_FILE MAX_BYTES KEEP ({exc})", file=sys.stderr)
        return 2
    # NOTE: our own stdout and stderr (opened on the log by the wrapper) would keep a
    # rotated-away file allocated for as long as the service runs; our problems go to
    # the log itself.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    pump = _Pump(log)
    reader = threading.Thread(target=pump.read, args=(0,), name="logpipe-read", daemon=True)
    reader.start()
    try:
        pump.write()
    except Exception:  # noqa: BLE001 - a bug here must not break the service's output
        pump.discard()
        try:
            log.write(("[mlbuild logpipe: failed, the rest of the output is dropped]\n"
                       + traceback.format_exc()).encode())
        except OSError:
            pass
        reader.join()  # keep the pipe open (drained) while the service runs
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
