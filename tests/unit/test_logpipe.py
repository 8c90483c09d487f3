"""The process target's log writer (mlbuild/runtime/logpipe.py): rotation by size, several
writers on one file, a stuck disk that must not block the service, the stop signal it
ignores, and the readers of a rotated log (mlbuild/backends/process.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mlbuild.backends.process import follow_log, read_log, tail
from mlbuild.runtime import logpipe
from mlbuild.runtime.logpipe import RotatingLog

LOGPIPE = Path(logpipe.__file__)


def files(log: Path) -> list[Path]:
    """The log's files, oldest first."""
    older = sorted(log.parent.glob(log.name + ".*"), key=lambda p: -int(p.suffix[1:]))
    return [*older, log] if log.exists() else older


def lines(n: int, tag: str = "line") -> list[bytes]:
    return [f"{tag} {i:04d} {'x' * (i % 37)}\n".encode() for i in range(n)]


def test_rotates_by_size_at_line_ends_keeping_the_newest(tmp_path):
    log = tmp_path / "svc.log"
    w = RotatingLog(log, max_bytes=1000, keep=2)
    written = lines(300)
    for line in written:
        w.write(line)
    w.close()
    kept = files(log)
    assert [p.name for p in kept] == ["svc.log.2", "svc.log.1", "svc.log"]
    assert all(p.stat().st_size <= 1000 for p in kept)
    assert all(p.read_bytes().endswith(b"\n") for p in kept)  # cut at a line's end
    content = b"".join(p.read_bytes() for p in kept)
    assert b"".join(written).endswith(content)  # the newest lines, in order
    assert len(content) > 2000  # the older files are full ones


def test_a_write_of_many_lines_is_spread_over_files(tmp_path):
    log = tmp_path / "svc.log"
    w = RotatingLog(log, max_bytes=500, keep=3)
    data = b"".join(lines(40))
    w.write(data)
    w.close()
    assert all(p.stat().st_size <= 500 for p in files(log))
    assert data.endswith(b"".join(p.read_bytes() for p in files(log)))


def test_a_line_longer_than_a_file_is_split(tmp_path):
    log = tmp_path / "svc.log"
    w = RotatingLog(log, max_bytes=100, keep=5)
    w.write(b"short\n")
    w.write(b"y" * 250 + b"\n")
    w.close()
    assert [p.read_bytes() for p in files(log)] == [b"short\n", b"y" * 100, b"y" * 100,
                                                     b"y" * 50 + b"\n"]


def test_writers_sharing_a_file_follow_each_others_rotations(tmp_path):
    # An old and a new release during a replacement, and mlbuild's own start line.
    log = tmp_path / "svc.log"
    a, b = RotatingLog(log, 800, 2), RotatingLog(log, 800, 2)
    for i in range(600):
        (a if i % 3 else b).write(f"{'ab'[i % 3 == 0]} {i:04d}\n".encode())
    a.close()
    b.close()
    kept = files(log)
    assert len(kept) == 3 and all(p.stat().st_size <= 800 for p in kept)
    got = b"".join(p.read_bytes() for p in kept).decode().splitlines()
    numbers = [int(x.split()[1]) for x in got]
    # None was written to a file another writer had rotated away: no gap, no disorder.
    assert numbers == list(range(numbers[0], 600))


def test_bad_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError):
        RotatingLog(tmp_path / "x.log", 0, 1)
    with pytest.raises(ValueError):
        RotatingLog(tmp_path / "x.log", 10, 0)


class StuckLog:
    """A log whose writes hang until released (a hung file system)."""

    def __init__(self):
        self.release = threading.Event()
        self.data = b""

    def write(self, data: bytes) -> None:
        self.release.wait()
        self.data += data


def test_a_stuck_disk_never_blocks_the_writers_of_the_pipe():
    r, w = os.pipe()
    log = StuckLog()
    pump = logpipe._Pump(log, limit=64 * 1024)
    reader = threading.Thread(target=pump.read, args=(r,), daemon=True)
    reader.start()
    writer = threading.Thread(target=pump.write, daemon=True)
    writer.start()
    chunk = b"z" * 4095 + b"\n"
    done = threading.Event()

    def service():  # writes ~10x what a pipe and the buffer hold together
        for _ in range(400):
            os.write(w, chunk)
        done.set()

    threading.Thread(target=service, daemon=True).start()
    assert done.wait(10), "the service's writes blocked on a stuck log"
    os.write(w, b"the last line\n")
    os.close(w)
    time.sleep(0.2)
    log.release.set()
    writer.join(10)
    reader.join(10)
    os.close(r)
    assert not writer.is_alive()
    assert b"bytes of output dropped" in log.data
    assert len(log.data) < 400 * 4096


def test_failed_writes_are_counted_and_said_once_it_works_again(tmp_path, monkeypatch):
    monkeypatch.setattr(logpipe, "RETRY_AFTER_S", 0.01)
    fails = {"n": 1}
    written: list[bytes] = []

    class Flaky:
        def write(self, data):
            if fails["n"]:
                fails["n"] -= 1
                raise OSError(28, "No space left on device")
            written.append(data)

    r, w = os.pipe()
    pump = logpipe._Pump(Flaky())
    reader = threading.Thread(target=pump.read, args=(r,), daemon=True)
    reader.start()
    writer = threading.Thread(target=pump.write, daemon=True)
    writer.start()
    os.write(w, b"lost\n")
    deadline = time.monotonic() + 5
    while fails["n"] and time.monotonic() < deadline:  # the disk is full
        time.sleep(0.01)
    os.write(w, b"kept\n")
    os.close(w)
    writer.join(5)
    reader.join(5)
    os.close(r)
    text = b"".join(written)
    assert b"kept\n" in text and b"bytes of output dropped" in text


def test_the_writer_outlives_the_stop_signal_and_loses_nothing(tmp_path):
    log = tmp_path / "svc.log"
    p = subprocess.Popen([sys.executable, "-I", "-S", str(LOGPIPE), str(log), "300", "2"],
                         stdin=subprocess.PIPE)
    p.stdin.write(b"before the stop\n")
    p.stdin.flush()
    deadline = time.monotonic() + 10
    while not (log.exists() and log.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.01)  # it has started (and ignores the signals from its first line on)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        p.send_signal(sig)
    time.sleep(0.1)
    assert p.poll() is None
    p.stdin.write(b"".join(lines(50, "graceful stop")))  # the runtime's last words
    p.stdin.close()
    assert p.wait(10) == 0
    text = b"".join(f.read_bytes() for f in files(log)).decode()
    assert text.rstrip().endswith("graceful stop 0049 " + "x" * 12)
    assert all(f.stat().st_size <= 300 for f in files(log))


def test_bad_arguments_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-I", "-S", str(LOGPIPE), str(tmp_path / "x"), "many"],
                       input=b"", capture_output=True)
    assert r.returncode == 2 and b"usage" in r.stderr


# -- reading a rotated log (mlbuild logs) -----------------------------------------------

def test_tail_and_read_log_reach_into_the_older_files(tmp_path):
    log = tmp_path / "svc.log"
    w = RotatingLog(log, 200, 3)
    for i in range(40):
        w.write(f"n {i:03d}\n".encode())
    w.close()
    everything = list(read_log(log))
    assert everything == [f"n {i:03d}" for i in range(40)][-len(everything):]
    assert len(everything) > 40 // 2
    current = log.read_text().splitlines()
    assert tail(log, 3) == everything[-3:]
    assert tail(log, len(current) + 5) == everything[-(len(current) + 5):]


def test_follow_log_continues_into_the_new_file_after_a_rotation(tmp_path):
    log = tmp_path / "svc.log"
    w = RotatingLog(log, 100, 2)
    w.write(b"old\n")
    seen: list[str] = []
    it = follow_log(log, poll=0.01)

    def consume():
        for line in it:
            seen.append(line)
            if line == "n 029":
                return

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    time.sleep(0.1)  # following from the end: "old" is not shown
    for i in range(30):  # several rotations
        w.write(f"n {i:03d}\n".encode())
        time.sleep(0.01)
    t.join(10)
    w.close()
    assert not t.is_alive(), seen
    assert seen == [f"n {i:03d}" for i in range(30)]


def test_follow_log_skips_no_file_when_several_rotations_come_between_two_polls(tmp_path):
    log = tmp_path / "svc.log"
    w = RotatingLog(log, 30, 20)
    w.write(b"old\n")
    it = follow_log(log, poll=0.5)
    seen: list[str] = []

    def consume():
        for line in it:
            seen.append(line)
            if line == "n 039":
                return

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    time.sleep(0.2)  # it waits at the end of "old"
    for i in range(40):  # ~13 files at once
        w.write(f"n {i:03d}\n".encode())
    t.join(10)
    w.close()
    assert seen == [f"n {i:03d}" for i in range(40)]
