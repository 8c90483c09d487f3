"""``mlbuild serve SERVICE --reload`` and a port another program holds (issue 16, point 17).

The rule: with --reload, mlbuild serve ends only on Ctrl-C. What can change by itself
(a file, a port another program listens on) is waited for, saying so; what cannot (an
address this machine does not have, a port this user may not bind) is exit 1 at once.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from clitools import free_port

SAMPLE = Path("samples/input.json")


class Serve:
    """``mlbuild serve diabetes --port PORT --reload`` with its output collected as it
    comes (stdout and stderr together)."""

    def __init__(self, proj: Path, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "mlbuild", "serve", "diabetes",
                                      *args, "--reload"], cwd=proj, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_output(self, text: str, after: int = 0, timeout: float = 60) -> int:
        """Wait until ``text`` shows in the output at or after character ``after``;
        returns where it ends."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            at = self.output.find(text, after)
            if at >= 0:
                return at + len(text)
            assert self.proc.poll() is None, \
                f"mlbuild serve exited {self.proc.returncode}:\n{self.output}"
            time.sleep(0.1)
        raise AssertionError(f"no {text!r} in:\n{self.output}")

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=30)
        self._reader.join(timeout=10)
        return self.output


def answers(port: int, body: bytes, timeout: float = 60) -> list:
    """The service's answer to ``body``, once it serves (within ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/score", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=2) as r:
                return json.loads(r.read())
        except (OSError, urllib.error.HTTPError):
            assert time.monotonic() < deadline, "the service never answered"
            time.sleep(0.2)


def hold(port: int) -> socket.socket:
    """Another program's listener on 127.0.0.1:port (plain, as most servers bind)."""
    s = socket.socket()
    s.bind(("127.0.0.1", port))
    s.listen()
    return s


def test_port_taken_while_the_script_is_broken_is_waited_for(diabetes):
    """The issue's sequence: a syntax error stops the server, another program takes the
    port meanwhile, the script is fixed: serve says the port is taken, keeps waiting,
    and serves the fixed script as soon as the port is free."""
    port = free_port()
    score = diabetes / "src" / "score.py"
    good = score.read_text()
    score.write_text(good.replace("def init():", "def init(:"))
    serve = Serve(diabetes, "--port", str(port))
    other = None
    try:
        at = serve.wait_for_output("the server exited with status 3")
        other = hold(port)
        score.write_text(good)
        at = serve.wait_for_output("score.py changed", at)
        at = serve.wait_for_output(f"port {port} on 127.0.0.1 is taken by another program",
                                   at)
        time.sleep(2)  # several polls: it keeps waiting
        assert serve.proc.poll() is None, serve.output
        other.close()
        other = None
        assert len(answers(port, (diabetes / SAMPLE).read_bytes())) == 2
        assert f"port {port} is free" in serve.output[at:]
    finally:
        if other is not None:
            other.close()
        out = serve.stop()
    assert serve.proc.returncode == 0, out
    assert "Traceback" not in out.split("SyntaxError")[-1], out  # nothing of mlbuild's own


def test_port_taken_at_start_is_waited_for_too(diabetes):
    """The same rule when the script is fine: the port is taken when serve starts. The
    wait goes on watching files: an edit made meanwhile is what gets served."""
    port = free_port()
    other = hold(port)
    serve = Serve(diabetes, "--port", str(port))
    try:
        at = serve.wait_for_output(f"port {port} on 127.0.0.1 is taken by another program")
        score = diabetes / "src" / "score.py"
        score.write_text(score.read_text().replace(
            "return model.predict(data).tolist()", "return {'edited': True}"))
        serve.wait_for_output("score.py changed", at)
        assert serve.proc.poll() is None, serve.output
        other.close()
        other = None
        assert answers(port, (diabetes / SAMPLE).read_bytes()) == {"edited": True}
    finally:
        if other is not None:
            other.close()
        out = serve.stop()
    assert serve.proc.returncode == 0, out
    assert "cannot listen" not in out  # never started against the taken port


def test_an_address_no_wait_can_fix_is_exit_1(diabetes):
    """An address this machine does not have is not waited for: exit 1 saying why."""
    with socket.socket() as s:
        try:
            s.bind(("192.0.2.1", 0))  # TEST-NET-1: on no machine, unless ip_nonlocal_bind
            pytest.skip("this machine binds 192.0.2.1 (net.ipv4.ip_nonlocal_bind?)")
        except OSError:
            pass
    serve = Serve(diabetes, "--host", "192.0.2.1", "--port", str(free_port()))
    serve.proc.wait(timeout=60)
    out = serve.stop()
    assert serve.proc.returncode == 1, out
    assert "cannot listen on 192.0.2.1:" in out and "--host" in out, out
    assert "Traceback" not in out, out


def test_a_start_that_cannot_listen_on_a_free_port_is_retried_with_backoff(monkeypatch):
    """A server that exits 1 ("cannot listen") while the probe finds the port free (a race,
    or a cause the probe does not see) is started again, less and less often: no loop of
    failing starts, no exit."""
    from types import SimpleNamespace

    from mlbuild import devserver

    monkeypatch.setattr(devserver, "RETRY_SECONDS", 0.2)
    said: list[str] = []
    dev = SimpleNamespace(argv=[sys.executable, "-c", "raise SystemExit(1)", "--host",
                                "127.0.0.1", "--port", str(free_port())], env=None, cwd=None)
    server = devserver._Server(said.append)
    starts: list[float] = []
    deadline = time.monotonic() + 60
    try:
        server.start(dev)
        starts.append(time.monotonic())
        while len(said) < 3 or server.child is not None:
            assert time.monotonic() < deadline, said
            child = server.child
            server.poll(dev)
            if server.child is not None and server.child is not child:
                starts.append(time.monotonic())
            time.sleep(0.02)
    finally:
        server.stop()
    backoffs = (0.2, 0.4, 0.8)
    assert said[:3] == [f"the server could not listen (see its message above); "
                        f"trying again in {s:g} s" for s in backoffs], said
    assert len(starts) >= 3
    for (a, b), wait in zip(zip(starts, starts[1:]), backoffs):
        assert b - a >= wait, starts
