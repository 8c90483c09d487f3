"""Progress of long work (image builds, pushes, pulls), shown on stderr.

    docker backend ── task.layer() / .step() / .tick() ──▶ Display ──▶ stderr
                                         terminal:  one line, redrawn in place
                                         otherwise: plain lines, at a bounded rate

A backend asks :func:`task` for a handle and reports to it; the reports go nowhere
unless a command installed a :class:`Display` with :func:`shown` (the CLI does for
build, deploy and push, not with ``--json``). A Display touches nothing but the
stream and the clock it is given, so tests drive it with a fake clock and a
``StringIO`` that says it is a terminal (or not).

On a terminal the live line looks like::

      pushing     ml-diabetes:fcda67a7cb0e291e  [######------]  12.3/45.6 MB  3/5 layers

Anything else written to stderr meanwhile (the step lines of the CLI) goes through
:meth:`Display.write`, which clears the live line first and redraws it after, so the
two never mix on one line. Without a terminal (CI logs), a task prints a line when
bytes moved and ``every`` seconds passed since its last line, or when ``quiet_every``
seconds passed without one (a heartbeat, at the next event: a silent build step shows
nothing until it ends), and a transfer ends with one summary line::

      pushed      ml-diabetes:fcda67a7cb0e291e  45.6 MB, 5 layers (3 already there) in 4.2 s
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, TextIO

MB = 1e6
CLEAR = "\r\x1b[K"  # back to the start of the line, erase it
BAR = 12            # characters of the terminal's bar
NAME_MIN = 16       # a name is shortened to make room, down to this many characters

# a layer's states, as backends report them
WAITING, MOVING, DONE, PRESENT = "waiting", "moving", "done", "present"
_FINISHED = {"pushing": "pushed", "pulling": "pulled"}


@dataclass
class _Layer:
    state: str = WAITING
    current: int = 0
    total: int = 0


@dataclass
class _TaskState:
    verb: str
    name: str
    started: float
    touched: int                     # when it was last heard from, in Display._heard
    last_line: float                 # when plain mode last printed a line of it
    layers: dict[str, _Layer] = field(default_factory=dict)
    step: tuple[int, int, str] | None = None
    step_since: float = 0.0
    moved: bool = False              # bytes moved since the last plain line
    room: int = 1 << 30              # characters its name got on the live line so far

    def transfer(self) -> tuple[int, int, int, int, int]:
        """Bytes done and in all, layers done and in all, layers already there."""
        current = total = done = count = present = 0
        for layer in self.layers.values():
            if layer.state == PRESENT:
                present += 1
                continue
            count += 1
            done += layer.state == DONE
            total += layer.total
            current += min(layer.current, layer.total) if layer.total else layer.current
        return current, total, done, count, present

    def transferring(self) -> bool:
        return any(x.state in (WAITING, MOVING) for x in self.layers.values()) or (
            self.step is None and bool(self.layers))


def _seconds(sec: float) -> str:
    sec = int(sec)
    return f"{sec} s" if sec < 60 else f"{sec // 60}m{sec % 60:02d}s"


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


class Display:
    """Renders the tasks' progress on ``stream``: a redrawn line on a terminal, plain
    lines at a bounded rate otherwise. Thread-safe: ``build -j N`` builds in threads.

    Args:
        stream: where to write (stderr).
        tty: draw in place; default: whether ``stream`` is a terminal (not TERM=dumb).
        clock: seconds, monotonic.
        width: of the terminal (the live line is cut to fit); default: asked.
        every: plain mode: seconds between two lines of a task while bytes move.
        quiet_every: plain mode: seconds after which a task says it is still at work.
        redraw_every: terminal: seconds between two redraws (a new build step redraws
            at once).
    """

    def __init__(self, stream: TextIO, *, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic, width: int | None = None,
                 every: float = 5.0, quiet_every: float = 30.0, redraw_every: float = 0.1):
        self.stream = stream
        self.tty = _is_terminal(stream) if tty is None else tty
        self.clock = clock
        self.width = width or shutil.get_terminal_size((80, 24)).columns
        self.every = every
        self.quiet_every = quiet_every
        self.redraw_every = redraw_every
        self._lock = threading.RLock()
        self._tasks: dict[int, _TaskState] = {}
        self._next = 0
        self._heard = 0                   # events so far: orders the tasks' news
        self._shown = False               # the live line is on the screen
        self._last_draw = float("-inf")
        self._at_line_start = True        # of output written through write()

    # -- what tasks report ----------------------------------------------------------

    def begin(self, verb: str, name: str) -> "Task":
        with self._lock:
            now = self.clock()
            key = self._next
            self._next += 1
            self._heard += 1
            self._tasks[key] = _TaskState(verb, name, now, self._heard, now)
            return Task(self, key)

    def layer(self, key: int, layer_id: str, state: str, current: int = 0,
              total: int = 0) -> None:
        with self._lock:
            t = self._tasks.get(key)
            if t is None:
                return
            x = t.layers.setdefault(layer_id, _Layer())
            if x.state in (DONE, PRESENT) and state in (WAITING, MOVING):
                return  # a late message of a layer already finished
            if state == MOVING:
                t.moved = t.moved or current != x.current
                x.current, x.total = current, max(x.total, total)
            elif state == DONE and x.total:
                x.current = x.total
            x.state = state
            # NOTE: not forced even when the state changed: an image of many layers
            # changes state many times in a burst, and the line is cleared at the end.
            self._touch(t, force=False)

    def step(self, key: int, number: int, total: int, text: str) -> None:
        with self._lock:
            t = self._tasks.get(key)
            if t is None:
                return
            changed = t.step is None or t.step[0] != number
            if changed:
                t.step_since = self.clock()
            t.step = (number, total, text)
            self._touch(t, force=changed)

    def tick(self, key: int) -> None:
        """Something happened (a line of build output): a chance to redraw."""
        with self._lock:
            t = self._tasks.get(key)
            if t is not None:
                self._touch(t, force=False)

    def end(self, key: int, ok: bool = True) -> None:
        with self._lock:
            t = self._tasks.pop(key, None)
            if t is None:
                return
            if self.tty:
                self._clear()
                if self._tasks:
                    self._draw()
            elif ok and t.verb in _FINISHED and t.layers:
                self._line(self._summary(t))

    # -- other output on the same stream ---------------------------------------------

    def write(self, text: str) -> int:
        """Write ``text`` to the stream without mixing it into the live line."""
        if not isinstance(text, str):  # click probes streams with write(b"")
            return self.stream.write(text)
        with self._lock:
            if self._shown:
                self._clear()
            n = self.stream.write(text)
            if text:
                self._at_line_start = text.endswith("\n")
            if self._at_line_start and self._tasks and self.tty:
                self._draw()
            return n

    def close(self) -> None:
        """Take the live line off the screen (tasks still open are forgotten)."""
        with self._lock:
            self._tasks.clear()
            self._clear()

    # -- rendering -------------------------------------------------------------------

    def _touch(self, t: _TaskState, force: bool) -> None:
        now = self.clock()
        self._heard += 1
        t.touched = self._heard
        if self.tty:
            if force or now - self._last_draw >= self.redraw_every:
                self._draw()
            return
        since = now - t.last_line
        if (t.moved and since >= self.every) or since >= self.quiet_every:
            self._line(self._text(t, now, bar=False))
            t.last_line, t.moved = now, False

    def _text(self, t: _TaskState, now: float, bar: bool, width: int = 0) -> str:
        """The task's line; with ``width``, its name shortened so the line fits."""
        detail = self._detail(t, now, bar)
        name = t.name
        if width:  # the numbers matter more than a whole name
            # (never longer than before: a name that changes length as numbers do jitters)
            t.room = room = min(t.room, max(width - len(f"  {t.verb:<10}  {detail}") - 2,
                                            NAME_MIN))
            if len(name) > room:
                name = name[:room - 1] + "…"
        return f"  {t.verb:<10}  {name}  {detail}"

    def _detail(self, t: _TaskState, now: float, bar: bool) -> str:
        if t.layers and t.transferring():
            current, total, done, count, _ = t.transfer()
            amount = f"{current / MB:.1f}/{total / MB:.1f} MB" if total else \
                f"{current / MB:.1f} MB"
            if bar and total:
                filled = round(BAR * current / total)
                amount = f"[{'#' * filled}{'-' * (BAR - filled)}]  {amount}"
            what = "base image " if t.verb not in _FINISHED else ""  # a build pulls
            return f"{what}{amount}  {done}/{count} layers"
        if t.step is not None:
            number, total, text = t.step
            return f"[{number}/{total}] {_seconds(now - t.step_since)}  {text}"  # text is cut
        return _seconds(now - t.started)

    def _summary(self, t: _TaskState) -> str:
        current, _, _, count, present = t.transfer()
        there = f" ({present} already there)" if present else ""
        layers = f"{count + present} layer{'s' if count + present != 1 else ''}"
        return (f"  {_FINISHED[t.verb]:<10}  {t.name}  {current / MB:.1f} MB, {layers}{there} "
                f"in {self.clock() - t.started:.1f} s")

    def _draw(self) -> None:
        if not self._tasks or not self._at_line_start:
            return
        now = self.clock()
        t = max(self._tasks.values(), key=lambda x: x.touched)  # the one heard from last
        more = f"  (+{len(self._tasks) - 1} more)" if len(self._tasks) > 1 else ""
        text = self._text(t, now, bar=True, width=self.width - 1 - len(more)) + more
        self.stream.write(CLEAR + text[:max(self.width - 1, 10)])
        self.stream.flush()
        self._shown = True
        self._last_draw = now

    def _clear(self) -> None:
        if self._shown:
            self.stream.write(CLEAR)
            self.stream.flush()
            self._shown = False

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()


class Task:
    """What a backend reports one piece of long work to; a no-op without a Display.
    A context manager: leaving it ends the task (a failure shows no summary)."""

    def __init__(self, display: Display | None, key: int = -1):
        self._display = display
        self._key = key

    def layer(self, layer_id: str, state: str, current: int = 0, total: int = 0) -> None:
        """News of one layer of a push or pull: ``state`` is waiting, moving (with
        bytes ``current`` of ``total``), done, or present (already there)."""
        if self._display:
            self._display.layer(self._key, layer_id, state, current, total)

    def step(self, number: int, total: int, text: str) -> None:
        """A build is at step ``number`` of ``total``: ``text``."""
        if self._display:
            self._display.step(self._key, number, total, text)

    def tick(self) -> None:
        if self._display:
            self._display.tick(self._key)

    def close(self, ok: bool = True) -> None:
        if self._display:
            self._display.end(self._key, ok)
            self._display = None

    def __enter__(self) -> "Task":
        return self

    def __exit__(self, typ, exc, tb) -> None:
        self.close(ok=exc is None)


_current: Display | None = None


def task(verb: str, name: str) -> Task:
    """A handle for one piece of long work (``verb``: building, pushing, pulling)."""
    display = _current
    return display.begin(verb, name) if display is not None else Task(None)


class _Through:
    """Stands in for sys.stderr while a terminal Display draws: writes go through
    :meth:`Display.write`; everything else is the real stream's."""

    def __init__(self, display: Display):
        self._display = display

    def write(self, text: str) -> int:
        return self._display.write(text)

    def __getattr__(self, name):
        return getattr(self._display.stream, name)


@contextlib.contextmanager
def shown(display: Display | None) -> Iterator[Display | None]:
    """Show the tasks' progress on ``display`` while the block runs (None: nowhere).

    On a terminal, ``sys.stderr`` writes go through the display meanwhile, so lines
    printed by anyone (``print(..., file=sys.stderr)``, ``click.echo(err=True)``) land
    above the live line instead of in it.
    """
    global _current
    if display is None:
        yield None
        return
    previous, stderr = _current, sys.stderr
    _current = display
    if display.tty and display.stream is stderr:
        sys.stderr = _Through(display)
    try:
        yield display
    finally:
        sys.stderr = stderr
        _current = previous
        display.close()
