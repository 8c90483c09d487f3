"""The one error root of mlbuild and the exit codes it maps to.

Every expected failure is an :class:`MlbuildError` carrying a message and, where one
exists, a hint of what to do next. ``mlbuild.cli.main`` is the only place that turns
them into exit codes; a traceback is shown only with ``--verbose``.

Exit codes (doit-style: input vs. task vs. tool):
    0  ok
    1  a step failed (build, deploy, health)
    2  mlbuild or a backend broke (state, engine, lock timeout)
    3  invalid input (manifest, arguments, references)
    130 interrupted
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_STEP_FAILED = 1
EXIT_BROKEN = 2
EXIT_INVALID = 3
EXIT_INTERRUPTED = 130


class MlbuildError(Exception):
    """Base class of every expected mlbuild failure.

    Args:
        message: what went wrong, naming the file, line or field.
        hint: what the user can do about it (optional).
    """

    exit_code = EXIT_BROKEN

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class InvalidInput(MlbuildError):
    """The user's input is wrong: an argument, a reference, a file."""

    exit_code = EXIT_INVALID


class Problem:
    """One problem found in a manifest.

    Attributes:
        file: manifest file name as shown to the user.
        line: 1-based line number, or None when unknown.
        path: dotted field path (``services.diabetes.environment``), or "" for the root.
        message: what is wrong, with a "did you mean" where one helps.
    """

    __slots__ = ("file", "line", "path", "message")

    def __init__(self, file: str, line: int | None, path: str, message: str):
        self.file = file
        self.line = line
        self.path = path
        self.message = message

    def __str__(self) -> str:
        loc = f"{self.file}:{self.line}" if self.line else self.file
        return f"{loc}: {self.path}: {self.message}" if self.path else f"{loc}: {self.message}"

    def __repr__(self) -> str:
        return f"Problem({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Problem) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))


class ManifestError(InvalidInput):
    """The manifest is invalid. Carries every problem found, sorted by line."""

    def __init__(self, problems: list[Problem], hint: str | None = None):
        self.problems = sorted(problems, key=lambda p: (p.line or 0, p.path, p.message))
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} in the manifest:"
        body = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{head}\n{body}", hint)


class StepFailed(MlbuildError):
    """A step of the graph failed (build, package, deploy, health)."""

    exit_code = EXIT_STEP_FAILED

    def __init__(self, step_id: str, message: str, hint: str | None = None):
        super().__init__(f"step {step_id} failed: {message}", hint)
        self.step_id = step_id


class StateError(MlbuildError):
    """The state in .mlbuild/ is unreadable, corrupt or of an unknown format."""

    exit_code = EXIT_BROKEN


class StateCorrupt(StateError):
    """The state database is damaged: SQLite cannot read it as a database."""


class StateLost(StateError):
    """The state database is missing, empty or without tables where the project had
    one (its sidecar ``state.id``, its -wal file, blobs, keys or releases remain)."""


class DiskFull(StateError):
    """A write did not fit: the file system is full (or over quota). What did not fit
    was not recorded; the state is as it was before."""


class LockTimeout(MlbuildError):
    """Another mlbuild process holds the project lock for longer than we wait."""

    exit_code = EXIT_BROKEN


class NotSupported(InvalidInput):
    """The manifest asks for something this version of mlbuild cannot do yet."""


class Interrupted(MlbuildError):
    """The run was interrupted (Ctrl-C, SIGTERM)."""

    exit_code = EXIT_INTERRUPTED
