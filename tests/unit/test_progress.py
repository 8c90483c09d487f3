"""mlbuild.progress (issue 16, point 18): builds, pushes and pulls show a live line on a
terminal and a few plain lines otherwise, driven here by a fake clock and a fake
terminal; and mlbuild.backends.docker's reading of the engine's push/pull streams."""

from __future__ import annotations

import io
import re
import sys

import pytest

from mlbuild import progress
from mlbuild.backends.docker import layer_update
from mlbuild.progress import CLEAR, Display

# `docker push` of a 3 MB layer on a python:3.11-slim base already in the registry,
# as Docker 20.10 streamed it to the SDK (push(stream=True, decode=True)).
PUSH = [
    {"status": "The push refers to repository [127.0.0.1:5000/mlbuild-rec/rec]"},
    {"status": "Preparing", "progressDetail": {}, "id": "8c65de7add45"},
    {"status": "Preparing", "progressDetail": {}, "id": "5b8eeacf66ac"},
    {"status": "Pushing", "progressDetail": {"current": 33280, "total": 3000000},
     "progress": "[>          ]  33.28kB/3MB", "id": "8c65de7add45"},
    {"status": "Mounted from k-33331958/k33331958-second", "progressDetail": {},
     "id": "5b8eeacf66ac"},
    {"status": "Pushing", "progressDetail": {"current": 3001856, "total": 3000000},
     "progress": "[==========>]  3.002MB", "id": "8c65de7add45"},
    {"status": "Pushed", "progressDetail": {}, "id": "8c65de7add45"},
    {"status": "v1: digest: sha256:fc0c17fc73a0b0c9da97110bcf2c34d2d9fce65a6aff8fad2b426f69864cab70 size: 740"},
    {"progressDetail": {}, "aux": {"Tag": "v1", "Size": 740, "Digest":
                                   "sha256:fc0c17fc73a0b0c9da97110bcf2c34d2d9fce65a6aff8fad2b426f69864cab70"}},
]

# `docker pull` of one new layer beside one the engine has (the engine's statuses).
PULL = [
    {"status": "Pulling from ml/rec", "id": "v1"},
    {"status": "Already exists", "progressDetail": {}, "id": "5c1255c2fe8c"},
    {"status": "Pulling fs layer", "progressDetail": {}, "id": "d0c576e0b926"},
    {"status": "Downloading", "progressDetail": {"current": 1000000, "total": 4000000},
     "id": "d0c576e0b926"},
    {"status": "Verifying Checksum", "progressDetail": {}, "id": "d0c576e0b926"},
    {"status": "Download complete", "progressDetail": {}, "id": "d0c576e0b926"},
    {"status": "Extracting", "progressDetail": {"current": 9000000, "total": 9000000},
     "id": "d0c576e0b926"},
    {"status": "Pull complete", "progressDetail": {}, "id": "d0c576e0b926"},
    {"status": "Digest: sha256:ff3040a1d85f41237a3bd8240d7993c3839660934af8f6f8db894ec9bad2c286"},
]


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def screen(raw: str) -> list[str]:
    """What a terminal shows: \\r returns to the line's start, ESC[K erases the rest."""
    lines, cur = [], ""
    for part in re.split(r"(\r\x1b\[K|\r|\n)", raw):
        if part in ("\r\x1b[K", "\r"):
            cur = ""
        elif part == "\n":
            lines.append(cur)
            cur = ""
        else:
            cur += part
    return lines + ([cur] if cur else [])


def feed(task: progress.Task, stream: list[dict], clock: Clock | None = None, dt: float = 0.0):
    for msg in stream:
        update = layer_update(msg)
        if update:
            task.layer(*update)
        if clock:
            clock.now += dt


def test_layer_update_reads_push_and_pull_streams():
    assert [layer_update(m) for m in PUSH] == [
        None,
        ("8c65de7add45", "waiting", 0, 0),
        ("5b8eeacf66ac", "waiting", 0, 0),
        ("8c65de7add45", "moving", 33280, 3000000),
        ("5b8eeacf66ac", "present", 0, 0),
        ("8c65de7add45", "moving", 3001856, 3000000),
        ("8c65de7add45", "done", 0, 0),
        None, None]
    assert [u[1] for u in map(layer_update, PULL) if u] == [
        "present", "waiting", "moving", "done", "done"]


def test_terminal_push_is_one_line_redrawn_in_place():
    clock, out = Clock(), Terminal()
    d = Display(out, clock=clock, width=100)
    assert d.tty
    with progress.shown(d):
        with progress.task("pushing", "rec:v1") as t:
            feed(t, PUSH[:4], clock, dt=1)
            assert screen(out.getvalue()) == [  # two layers to push, as far as known
                "  pushing     rec:v1  [------------]  0.0/3.0 MB  0/2 layers"]
            feed(t, PUSH[4:], clock, dt=1)
            assert screen(out.getvalue()) == [
                "  pushing     rec:v1  [############]  3.0/3.0 MB  1/1 layers"]
            assert "\n" not in out.getvalue()  # never a new line: redrawn in place
    assert out.getvalue().endswith(CLEAR)  # and taken off the screen at the end
    assert screen(out.getvalue()) == []


def test_terminal_redraws_at_a_bounded_rate():
    clock, out = Clock(), Terminal()
    d = Display(out, clock=clock, width=100, redraw_every=0.1)
    t = d.begin("pushing", "big:1")
    t.layer("a", "waiting")
    for i in range(1000):  # 1000 messages in one second
        t.layer("a", "moving", i * 1000, 10**6)
        clock.now += 0.001
    assert out.getvalue().count("\r") <= 12


def test_terminal_lines_of_others_go_above_the_live_line(monkeypatch):
    clock, out = Clock(), Terminal()
    monkeypatch.setattr(sys, "stderr", out)
    d = Display(out, clock=clock, width=100)
    stderr = sys.stderr
    with progress.shown(d):
        assert sys.stderr is not stderr
        t = progress.task("pulling", "rec:v1")
        feed(t, PULL[:4])
        print("  run         image:diabetes  (new)", file=sys.stderr)
        assert screen(out.getvalue()) == [
            "  run         image:diabetes  (new)",
            "  pulling     rec:v1  [###---------]  1.0/4.0 MB  0/1 layers"]
        t.close()
    assert sys.stderr is stderr


def test_terminal_build_shows_the_step_and_a_base_image_pull():
    clock, out = Clock(), Terminal()
    d = Display(out, clock=clock, width=100)
    t = d.begin("building", "diabetes:0123")
    t.layer("base", "waiting")
    clock.now += 1
    t.layer("base", "moving", 2 * 10**6, 8 * 10**6)
    assert screen(out.getvalue())[-1] == (
        "  building    diabetes:0123  base image [###---------]  2.0/8.0 MB  0/1 layers")
    t.layer("base", "done")
    t.step(2, 7, "RUN pip install -r requirements.lock.txt")
    clock.now += 42
    t.tick()
    assert screen(out.getvalue())[-1] == (
        "  building    diabetes:0123  [2/7] 42 s  RUN pip install -r requirements.lock.txt")


def test_terminal_line_fits_the_width_and_counts_other_tasks():
    clock, out = Clock(), Terminal()
    d = Display(out, clock=clock, width=40)
    a = d.begin("building", "a:1")
    b = d.begin("building", "b:1")
    a.step(1, 3, "COPY " + "x" * 80)
    last = screen(out.getvalue())[-1]
    assert len(last) == 39 and last.startswith("  building    a:1  [1/3] 0 s  COPY xxx")
    b.close()
    a.step(2, 3, "RUN true")
    assert "more" not in screen(out.getvalue())[-1]
    d.write("(+1 more) was shown\n")
    a.close()
    assert screen(out.getvalue()) == ["(+1 more) was shown"]


def test_terminal_shortens_a_long_name_so_the_numbers_show():
    clock, out = Clock(), Terminal()
    d = Display(out, clock=clock, width=100)
    d.begin("building", "other:1")
    t = d.begin("pushing", "a-project-with-a-long-name-and-its-service:0123456789abcdef")
    t.layer("l", "moving", 10**6, 2 * 10**6)
    last = screen(out.getvalue())[-1]
    assert last == ("  pushing     a-project-with-a-long-name-and-it…  [######------]  "
                    "1.0/2.0 MB  0/1 layers  (+1 more)")
    assert len(last) == 99


def test_plain_push_says_one_line_when_done():
    clock, out = Clock(), io.StringIO()
    d = Display(out, clock=clock)
    assert not d.tty
    with progress.shown(d):
        assert progress._current is d
        with progress.task("pushing", "rec:v1") as t:
            feed(t, PUSH, clock, dt=0.25)
    assert out.getvalue() == (
        "  pushed      rec:v1  3.0 MB, 2 layers (1 already there) in 2.2 s\n")
    assert progress._current is None


def test_plain_long_transfer_prints_at_a_bounded_rate():
    clock, out = Clock(), io.StringIO()
    d = Display(out, clock=clock, every=5.0)
    t = d.begin("pulling", "big:1")
    t.layer("a", "waiting")
    total = 600 * 10**6
    for i in range(6000):  # one minute, ten messages a second
        t.layer("a", "moving", i * 10**5, total)
        clock.now += 0.01
    t.layer("a", "done")
    t.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert 10 <= len(lines) <= 13, lines
    assert lines[0] == "  pulling     big:1  50.0/600.0 MB  0/1 layers"
    assert lines[-1] == "  pulled      big:1  600.0 MB, 1 layer in 60.0 s"


def test_plain_build_is_quiet_but_for_a_heartbeat():
    # The build's finished steps are printed by the image step; the display adds a
    # line only when a step has been running long.
    clock, out = Clock(), io.StringIO()
    d = Display(out, clock=clock, quiet_every=30.0)
    t = d.begin("building", "diabetes:0123")
    for n in range(1, 4):
        t.step(n, 7, f"RUN step {n}")
        clock.now += 1
    assert out.getvalue() == ""
    for _ in range(100):  # output of a long RUN, 100 s
        clock.now += 1
        t.tick()
    t.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "  building    diabetes:0123  [3/7] 28 s  RUN step 3"
    assert len(lines) == 3


def test_failed_transfer_has_no_summary():
    clock, out = Clock(), io.StringIO()
    d = Display(out, clock=clock)
    with pytest.raises(RuntimeError), progress.shown(d), progress.task("pushing", "x:1") as t:
        feed(t, PUSH[:4])
        raise RuntimeError("registry went away")
    assert out.getvalue() == ""


def test_without_a_display_tasks_go_nowhere(capsys):
    assert progress._current is None
    with progress.task("pushing", "x:1") as t:
        feed(t, PUSH)
        t.step(1, 2, "RUN x")
        t.tick()
    assert capsys.readouterr() == ("", "")


def test_dumb_terminal_gets_plain_lines(monkeypatch):
    monkeypatch.setenv("TERM", "dumb")
    assert not Display(Terminal()).tty
    monkeypatch.setenv("TERM", "xterm")
    assert Display(Terminal()).tty
