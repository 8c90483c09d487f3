"""The contract mlbuild's ``process`` target relies on to replace a release without downtime:
MLBUILD_REUSE_PORT / --reuse-port, MLBUILD_READY_FILE / --ready-file, SIGTERM -> exit 0.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time

import pytest
from conftest import START_TIMEOUT, free_port, write_script

RELEASE_SCRIPT = """
    import os
    import time

    def init():
        time.sleep(float(os.environ.get("INIT_SECONDS", "0")))

    def run(raw_data):
        if raw_data.startswith("sleep "):
            time.sleep(float(raw_data.split()[1]))
        return {"release": os.environ["RELEASE"], "pid": os.getpid()}
"""

RETRYABLE = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError,
             http.client.RemoteDisconnected)


def post(port: int, body: bytes = b"x", timeout: float = 10.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/score", body=body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_file(path, server, timeout: float = START_TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        if server.proc.poll() is not None:
            raise AssertionError(f"exited {server.proc.returncode}:\n{server.output()}")
        time.sleep(0.02)
    raise AssertionError(f"no ready file after {timeout}s:\n{server.output()}")


class Load:
    """Requests back to back from a thread: every answer, and the retried resets."""

    def __init__(self, port: int):
        self.port = port
        self.answers: list[tuple[float, int, dict | bytes]] = []
        self.resets: list[str] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=30)

    def _loop(self):
        while not self._stop.is_set():
            for attempt in (1, 2):  # one retry: a reset at the very moment of the switch
                try:
                    status, body = post(self.port)
                except RETRYABLE as exc:
                    self.resets.append(repr(exc))
                    if attempt == 2:
                        self.failures.append(repr(exc))
                    continue
                except OSError as exc:  # refused, timed out: never acceptable
                    self.failures.append(repr(exc))
                    break
                try:
                    body = json.loads(body)
                except ValueError:
                    pass
                self.answers.append((time.monotonic(), status, body))
                break
            time.sleep(0.005)

    def releases_since(self, t: float) -> list[str]:
        return [b["release"] for when, s, b in self.answers if when >= t and s == 200]


@pytest.mark.slow
def test_zero_downtime_replacement(start_server, tmp_path):
    script = write_script(tmp_path, RELEASE_SCRIPT)
    port = free_port()
    old_ready, new_ready = tmp_path / "old.json", tmp_path / "new.json"
    old = start_server(["--entry-script", str(script), "--ready-file", str(old_ready)],
                       port=port, env={"MLBUILD_REUSE_PORT": "1", "RELEASE": "old"})
    assert json.loads(old_ready.read_text()) == {"pid": old.proc.pid, "port": port,
                                                 "health_port": None}
    with Load(port) as load:
        time.sleep(0.3)
        new = start_server(["--entry-script", str(script), "--reuse-port"], port=port,
                           wait=None, env={"RELEASE": "new", "INIT_SECONDS": "2",
                                           "MLBUILD_READY_FILE": str(new_ready)})
        during_init = time.monotonic()
        info = wait_file(new_ready, new)
        ready_at = time.monotonic()
        assert ready_at - during_init > 1.5  # it waited for init()
        assert info == {"pid": new.proc.pid, "port": port, "health_port": None}
        # While the new release ran init(), the old one answered everything. (It listens
        # a moment before its ready file appears, and the file is polled: leave a margin.)
        before = [b["release"] for when, s, b in load.answers
                  if when < ready_at - 0.25 and s == 200]
        assert set(before) == {"old"}
        assert len([1 for when, _, _ in load.answers
                    if during_init < when < ready_at - 0.25]) > 10
        old.proc.send_signal(signal.SIGTERM)
        assert old.wait_exit(timeout=15) == 0
        assert not old_ready.exists()  # removed by the old release on its way out
        switched = time.monotonic()
        time.sleep(1.0)
    assert load.failures == [], (load.failures, new.output())
    statuses = {s for _, s, _ in load.answers}
    assert statuses == {200}, [a for a in load.answers if a[1] != 200][:5]
    after = load.releases_since(switched + 0.2)
    assert after and set(after) == {"new"}
    assert len(load.resets) <= 3, load.resets
    assert new.post(body="x").json()["release"] == "new"


def test_nothing_listens_before_init_returned(start_server, tmp_path):
    script = write_script(tmp_path, RELEASE_SCRIPT)
    ready = tmp_path / "ready.json"
    health_port = free_port()
    server = start_server(["--entry-script", str(script), "--health-port", str(health_port)],
                          wait=None, env={"MLBUILD_REUSE_PORT": "1", "RELEASE": "r",
                                          "INIT_SECONDS": "2",
                                          "MLBUILD_READY_FILE": str(ready)})
    deadline = time.monotonic() + 10
    while True:  # the health port is up from the start...
        try:
            conn = http.client.HTTPConnection("127.0.0.1", health_port, timeout=2)
            conn.request("GET", "/healthz/ready")
            status = conn.getresponse().status
            conn.close()
            break
        except OSError:
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.05)
    assert status == 503
    assert not ready.exists()
    with pytest.raises(ConnectionRefusedError):  # ...the main port is not
        post(server.port)
    # A probe that gives up (its connection reset mid-request) is not the service's error.
    import struct

    with socket.create_connection(("127.0.0.1", health_port), timeout=2) as rude:
        rude.sendall(b"GET /healthz/re")
        rude.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    info = wait_file(ready, server)
    assert info == {"pid": server.proc.pid, "port": server.port, "health_port": health_port}
    assert post(server.port)[0] == 200
    assert "Traceback" not in server.output() and "ConnectionResetError" not in server.output()


def test_foreign_listener_without_reuseport_is_port_in_use(start_server, tmp_path):
    script = write_script(tmp_path, RELEASE_SCRIPT)
    with socket.socket() as foreign:
        foreign.bind(("127.0.0.1", 0))
        foreign.listen(8)
        port = foreign.getsockname()[1]
        started = time.monotonic()
        server = start_server(["--entry-script", str(script)], port=port, wait=None,
                              env={"MLBUILD_REUSE_PORT": "1", "RELEASE": "r",
                                   "INIT_SECONDS": "30"})
        assert server.wait_exit(timeout=START_TIMEOUT) == 1
        assert time.monotonic() - started < 10  # found before the 30 s init()
        assert "port in use" in server.output()
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # the foreign listener is untouched
        accepted, _ = foreign.accept()
        accepted.close()


def test_sigterm_lets_in_flight_requests_finish_then_exits_0(start_server, tmp_path):
    script = write_script(tmp_path, RELEASE_SCRIPT)
    ready = tmp_path / "ready.json"
    server = start_server(["--entry-script", str(script), "--ready-file", str(ready)],
                          env={"RELEASE": "r"})
    assert wait_file(ready, server)["pid"] == server.proc.pid
    result = {}

    def slow():
        result["answer"] = post(server.port, b"sleep 1.5")

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.4)  # the request is in run() now
    server.proc.send_signal(signal.SIGTERM)
    thread.join(timeout=15)
    assert result["answer"][0] == 200
    assert json.loads(result["answer"][1])["release"] == "r"
    assert server.wait_exit(timeout=15) == 0
    assert not ready.exists()


def test_sigterm_during_init_in_reuse_port_mode_exits_0_at_once(start_server, tmp_path):
    script = write_script(tmp_path, RELEASE_SCRIPT)
    server = start_server(["--entry-script", str(script), "--reuse-port"], wait=None,
                          env={"RELEASE": "r", "INIT_SECONDS": "30"})
    time.sleep(1.5)  # started, in init()
    assert server.proc.poll() is None
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait_exit(timeout=10) == 0
    assert time.monotonic() - started < 5


def test_ready_file_folder_must_exist(start_server, tmp_path):
    script = write_script(tmp_path, RELEASE_SCRIPT)
    server = start_server(["--entry-script", str(script), "--ready-file",
                           str(tmp_path / "missing" / "ready.json")], wait=None)
    assert server.wait_exit() == 2
    assert "ready file" in server.output()


@pytest.mark.slow
def test_workers_with_reuse_port_write_the_ready_file_once_all_are_ready(start_server,
                                                                          tmp_path):
    script = write_script(tmp_path, RELEASE_SCRIPT)
    ready = tmp_path / "ready.json"
    health_port = free_port()
    server = start_server(["--entry-script", str(script), "--workers", "2", "--reuse-port",
                           "--ready-file", str(ready), "--health-port", str(health_port)],
                          wait=None, env={"RELEASE": "w", "INIT_SECONDS": "1"})
    info = wait_file(ready, server, timeout=30)
    assert info == {"pid": server.proc.pid, "port": server.port, "health_port": health_port}
    assert server.output().count("ready: init() took") == 2  # both, before the file
    conn = http.client.HTTPConnection("127.0.0.1", health_port, timeout=5)
    conn.request("GET", "/healthz/ready")
    assert conn.getresponse().status == 200  # the supervisor answers for all workers
    conn.close()
    pids = {json.loads(post(server.port)[1])["pid"] for _ in range(30)}
    assert pids and server.proc.pid not in pids  # workers answer, not the supervisor
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait_exit(timeout=20) == 0
    assert not ready.exists()


ATEXIT_SCRIPT = """
    import atexit
    import os

    LOG = None

    def init():
        global LOG
        atexit.register(lambda: open(os.environ["ATEXIT_FILE"], "a").write(f"{os.getpid()}\\n"))
        LOG = open(os.environ["ATEXIT_FILE"] + f".{os.getpid()}.log", "a")  # never flushed

    def run(raw_data):
        LOG.write("scored\\n")
        return {"pid": os.getpid()}
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_stop_runs_the_services_atexit_handlers(start_server, tmp_path, workers):
    """The runtime ends without tearing the interpreter down (a faster stop), but what
    the service registered with atexit still runs, in each worker."""
    script = write_script(tmp_path, ATEXIT_SCRIPT)
    marker = tmp_path / "atexit.txt"
    ready = tmp_path / "ready.json"
    server = start_server(["--entry-script", str(script), "--workers", str(workers),
                           "--ready-file", str(ready)], wait=None,
                          env={"ATEXIT_FILE": str(marker)})
    wait_file(ready, server, timeout=30)  # every worker's init() returned
    assert post(server.port)[0] == 200
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait_exit(timeout=20) == 0
    pids = marker.read_text().split()
    assert len(pids) == workers
    # What the script wrote and never flushed reached its file.
    logged = "".join((tmp_path / f"atexit.txt.{pid}.log").read_text() for pid in pids)
    assert logged == "scored\n"
