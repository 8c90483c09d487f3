"""A process target's log is rotated by size while the service runs (not only when a
release starts): a real service with a tiny limit (MLBUILD_LOG_MAX_BYTES), fed requests
whose run() prints through Python and writes to fd 2 directly; the files stay bounded,
nothing in the kept files is missing, `mlbuild logs` reads across the rotation, `logs
-f` follows it into the new file, the service keeps answering, and its last lines at a
stop reach the log."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from clitools import CLI, free_port

MAX = 32 * 1024  # more than a burst of access lines (the runtime writes them in batches)
N = 150


def post(url: str, body: bytes, key: str) -> int:
    req = urllib.request.Request(url + "/score", data=body, method="POST", headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def log_files(log: Path) -> list[Path]:
    older = sorted(log.parent.glob(log.name + ".*"), key=lambda p: -int(p.suffix[1:]))
    return [*older, log]


def logged(log: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in log_files(log) if p.exists())


def wait_for(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def settle(log: Path, quiet: float = 1.5) -> None:
    """Wait until the log stops changing for ``quiet`` seconds (at most 30 s)."""
    deadline, before = time.monotonic() + 30, None
    while time.monotonic() < deadline:
        now = logged(log)
        if now == before:
            return
        before = now
        time.sleep(quiet)


def test_process_log_rotates_by_size_while_the_service_runs(diabetes):
    port = free_port()
    m = diabetes / "mlproject.yaml"
    m.write_text(re.sub(r"dev:\s*\{type: process, port: \d+\}",
                        f"dev: {{type: process, port: {port}}}", m.read_text()))
    score = diabetes / "src" / "score.py"
    score.write_text(score.read_text().replace("def run(raw_data):\n", (
        "def run(raw_data):\n"
        "    tag = json.loads(raw_data)['tag']\n"
        "    print('scored', tag, 'x' * 1000)\n"
        "    os.write(2, ('fd-level %d\\n' % tag).encode())  # as a C library writes\n")))
    cli = CLI(diabetes)
    url = f"http://127.0.0.1:{port}"
    log = diabetes / ".mlbuild" / "logs" / "dev" / "diabetes.log"
    follower = None
    try:
        cli("deploy", env={"MLBUILD_LOG_MAX_BYTES": str(MAX)}, timeout=300)
        key = cli.json("keys", "diabetes")["primary"]
        sample = json.loads((diabetes / "samples" / "input.json").read_text())

        follower = subprocess.Popen([sys.executable, "-m", "mlbuild", "logs", "diabetes",
                                     "-f", "-n", "1"], cwd=diabetes, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        followed: list[str] = []
        seen_last = threading.Event()

        def read_follower():
            for line in follower.stdout:
                followed.append(line.rstrip("\n"))
                if line.startswith(f"fd-level {N - 1}"):
                    seen_last.set()

        threading.Thread(target=read_follower, daemon=True).start()
        deadline = time.monotonic() + 30
        while not followed and time.monotonic() < deadline:  # it has opened the log
            time.sleep(0.05)
        assert followed, "mlbuild logs -f printed nothing"

        for tag in range(N):
            assert post(url, json.dumps({**sample, "tag": tag}).encode(), key) == 200
            if tag % 10 == 9:  # a rotation at most between two looks of the follower
                wait_for(lambda: any(f" - scored {tag} " in ln for ln in followed[-40:]))
        deadline = time.monotonic() + 30
        while f"fd-level {N - 1}\n" not in logged(log) and time.monotonic() < deadline:
            time.sleep(0.1)
        settle(log)  # the access lines come in batches, after the requests

        # Bounded: at most MAX bytes a file, two older files kept.
        files = log_files(log)
        assert [p.name for p in files] == ["diabetes.log.2", "diabetes.log.1", "diabetes.log"]
        assert all(p.stat().st_size <= MAX for p in files), [p.stat().st_size for p in files]
        # Nothing missing from what is kept: the newest requests, every one of them.
        text = logged(log)
        printed = [int(t) for t in re.findall(r" - scored (\d+) x+$", text, re.M)]
        direct = [int(t) for t in re.findall(r"^fd-level (\d+)$", text, re.M)]
        assert printed and printed == list(range(printed[0], N)) and printed[0] > 0, text
        assert direct[-1] == N - 1 and len(direct) >= len(printed) - 1

        # `mlbuild logs -n` shows the newest lines, from the older file too when the
        # current one holds fewer; `-f` followed into each new file.
        newest = text.splitlines()
        n = len(log.read_text().splitlines()) + 10
        assert cli("logs", "diabetes", "-n", str(n)).stdout.splitlines() == newest[-n:]
        assert seen_last.wait(30), followed[-5:]
        followed_tags = [int(t) for t in re.findall(r" - scored (\d+) ", "\n".join(followed))]
        assert followed_tags == list(range(N)), followed_tags[:10]

        # The service kept answering, and its last words at a stop reach the log.
        assert post(url, json.dumps({**sample, "tag": N}).encode(), key) == 200
        pid = cli.json("status", "dev")[0]["pid"]
    finally:
        if follower is not None:
            follower.kill()
            follower.wait(10)
        cli("down", "dev", check=None)
    assert f"Finished server process [{pid}]" in "\n".join(
        cli("logs", "diabetes", "-n", "5").stdout.splitlines())
    assert all(p.stat().st_size <= MAX for p in log_files(log))
