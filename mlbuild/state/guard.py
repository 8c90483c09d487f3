"""What mlbuild never reads as a project's input: its own state.

``.mlbuild/`` holds every service's keys (``state.db`` and its ``-wal``/``-shm``,
``secrets/``). A manifest path, a file of a source folder or a registered model that
leads into it would carry the keys into a build context, an image and a package. The
path as written says little: a symlink (``src/x -> ../.mlbuild/state.db``, a folder
``.MLBUILD -> .mlbuild``) or a hard link (``src/x.db``, the same inode as state.db)
reaches the state under another name. So :class:`StateGuard` judges where a path
really is:

* its real location (``os.path.realpath``) is the state folder or lies inside it;
  the top folder below the project is compared by identity (``st_dev``, ``st_ino``),
  not by name, so ``.MLBUILD/state.db`` on a case-insensitive file system counts too;
* or the file is one of the state's private files under any name: the same
  ``(st_dev, st_ino)`` as a regular file directly in ``.mlbuild`` (``state.db``, its
  ``-wal``/``-shm``, ``state.id``, the lock, a database moved aside by ``state
  reset``) or below ``secrets/``. That set is read once per guard (once per command),
  the first time it is asked; each check is then a set lookup on a ``stat`` the
  caller has anyway.

A hard link to a file outside the project is not refused: it is a copy the user
could have made. Only the state's own files are.

This module imports no more than ``os`` and the errors: the manifest checks use it
before any state is opened.
"""

from __future__ import annotations

import os
import stat as stat_mod
from typing import NoReturn

from mlbuild.errors import InvalidInput

STATE_DIR = ".mlbuild"
SECRETS = "secrets"
WHY = "mlbuild's state, which holds the services' keys"


class StateGuard:
    """Says whether a path leads into one project's state.

    Args:
        state_dir: the project's ``.mlbuild`` folder (it need not exist).
    """

    def __init__(self, state_dir):
        self.state_dir = os.path.abspath(state_dir)
        self.name = os.path.basename(self.state_dir)  # (.mlbuild)
        self.real = os.path.realpath(self.state_dir)
        self._inside = self.real.rstrip(os.sep) + os.sep
        self.root_real = os.path.realpath(os.path.dirname(self.state_dir))
        self._below_root = self.root_real.rstrip(os.sep) + os.sep
        self._tops: dict[str, bool] = {}  # a top folder's name -> is the state folder
        self._dir_id: tuple | None = None  # the state folder's (st_dev, st_ino), once needed
        self._files: dict[tuple[int, int], str] | None = None  # (dev, ino) -> shown name

    # -- where a path really is -----------------------------------------------------

    def holds(self, real: str) -> bool:
        """Whether ``real`` (a path already resolved with ``os.path.realpath``) is the
        state folder or lies inside it. Costs a ``stat`` per distinct top folder below
        the project, once."""
        if real == self.real or real.startswith(self._inside):
            return True
        if not real.startswith(self._below_root):
            return False
        top = real[len(self._below_root):].split(os.sep, 1)[0]
        found = self._tops.get(top)
        if found is None:
            # NOTE: by identity, not by name: on a case-insensitive file system (macOS,
            # Windows) '.MLBUILD' is the state folder, and realpath keeps the case as
            # written.
            if self._dir_id is None:
                try:
                    st = os.stat(self.real)
                    self._dir_id = (st.st_dev, st.st_ino)
                except OSError:
                    self._dir_id = ()  # no state folder (yet): nothing is it
            try:
                st = os.stat(os.path.join(self.root_real, top))
                found = (st.st_dev, st.st_ino) == self._dir_id
            except (OSError, ValueError):
                found = False
            self._tops[top] = found
        return found

    def private_file(self, st: os.stat_result) -> str | None:
        """Which of the state's private files ``st`` (``os.stat`` of a file) is, shown
        relative to the project (``.mlbuild/state.db``); None when it is none of them."""
        if not stat_mod.S_ISREG(st.st_mode):
            return None
        if self._files is None:
            self._files = self._private_files()
        return self._files.get((st.st_dev, st.st_ino))

    def _private_files(self) -> dict[tuple[int, int], str]:
        found: dict[tuple[int, int], str] = {}

        def add(path: str, st: os.stat_result) -> None:
            if stat_mod.S_ISREG(st.st_mode):
                shown = os.path.relpath(path, self.real).replace(os.sep, "/")
                found.setdefault((st.st_dev, st.st_ino), f"{self.name}/{shown}")

        try:
            with os.scandir(self.real) as entries:
                for e in entries:
                    try:
                        add(e.path, e.stat(follow_symlinks=False))
                    except OSError:
                        pass
        except OSError:
            return found  # no state yet: nothing to protect
        for dirpath, _, filenames in os.walk(os.path.join(self.real, SECRETS)):
            for name in filenames:
                path = os.path.join(dirpath, name)
                try:
                    add(path, os.lstat(path))
                except OSError:
                    pass
        return found

    # -- the verdict ----------------------------------------------------------------

    def why(self, path, *, real: str | None = None, st: os.stat_result | None = None,
            links: bool = True) -> str | None:
        """Why mlbuild must not read ``path``, as the end of a sentence about it
        (``"resolves to '.mlbuild/state.db', inside .mlbuild/ (...)"``); None when
        it may.

        Args:
            real: ``os.path.realpath(path)``, when the caller has it.
            st: ``os.stat(path)``, when the caller has it (else one ``stat``).
            links: also look for a link to a private file by its inode; a caller that
                checked ``real`` already may pass False for a file with a single link.
        """
        real = os.path.realpath(path) if real is None else real
        if self.holds(real):
            inside = f"{self.name}/, the folder of {WHY}"
            # As written (before any link is resolved), is it in the state folder?
            written = os.path.abspath(path)
            linked = written != self.state_dir and \
                not written.startswith(self.state_dir.rstrip(os.sep) + os.sep)
            rest = self._within(real)
            if not rest:
                return f"{'resolves to' if linked else 'is'} {inside}"
            if linked:
                return f"resolves to {self.name + '/' + rest!r}, inside {inside}"
            return f"is inside {inside}"
        if not links:
            return None
        if st is None:
            try:
                st = os.stat(real)
            except OSError:
                return None
        private = self.private_file(st)
        if private is None:
            return None
        # (A symlink to the state itself resolved into it above: this is another name
        # of the same inode, wherever a symlink may have led first.)
        return f"is a hard link to {private}, {WHY}"

    def _within(self, real: str) -> str:
        """The part of ``real`` (which the guard :meth:`holds`) below the state folder,
        as a POSIX path ('' for the folder itself), whatever the folder is named in it."""
        if real.startswith(self._inside):
            rest = real[len(self._inside):]
        elif real.startswith(self._below_root):  # the folder under another spelling
            rest = real[len(self._below_root):].partition(os.sep)[2]
        else:
            rest = ""
        return rest.replace(os.sep, "/")

    def refuse(self, field: str, shown: str, path, real: str) -> NoReturn:
        """Raise the InvalidInput of ``path`` (named ``shown``, from the manifest's
        ``field``), whose real path ``real`` the guard :meth:`holds`."""
        raise InvalidInput(f"{field}: {shown} {self.why(path, real=real, links=False)}",
                           hint="remove the link: mlbuild's state never goes into a build "
                           "context or a package")

    def shown(self, path: str) -> str:
        """``path`` relative to the project when it lies below it, else as it is."""
        if path.startswith(self._below_root):
            return os.path.relpath(path, self.root_real).replace(os.sep, "/")
        return path
