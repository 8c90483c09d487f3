"""The record of the files mlbuild wrote into a folder it shares with the user.

Some outputs land in a folder that may hold the user's files too: a kubernetes
target's ``out`` (one YAML file per object and ``kustomization.yaml``), a package
target's ``out`` (``<service>.image.tar`` beside the package folders, which carry a
record of their own: graph/steps/package.py). There mlbuild overwrites and removes
only what it wrote itself, and ``<folder>/mlbuild-written.json`` says what that is:

    {"format": 1, "files": {"<name>": "sha256:<hex>", ...}}

plain file names directly in the folder (null: being written by a run that stopped).

    a name mlbuild is about to write is     the deploy
    absent                                  writes it (recorded first)
    in the record, and a plain file         overwrites it (edited or not: an output)
    anything else: a file the record does   stops before changing anything, naming
    not list, a folder, a symlink           the file: the user moves it, deploys again

    a recorded name it writes no longer     removed when still a plain file (a folder
    (a service left the target)             or link there now is the user's: left)
    any other file of the folder            never read, never touched

An unreadable record (not JSON, a symlink, a name with a slash or ``..``) stops the
deploy too: mlbuild cannot tell its files from the user's. Deleting it is safe: the
next deploy then names each file it would overwrite (unless the step's own state
shows mlbuild wrote exactly that file, see ``adopt`` below).

NOTE: the record is written before the files it claims, and trimmed after the files
it no longer claims are gone, each time through a temporary file and a rename: a run
stopped at any point (Ctrl-C, a kill, a full disk) leaves every file mlbuild wrote
listed, and never lists a file of the user. Steps writing one folder run one after
another (graph/executor.py runs only image steps in threads; the project lock keeps
other runs out), so the record needs no lock of its own.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Callable, Iterable

from mlbuild.errors import StepFailed
from mlbuild.fsutil import write_atomic

RECORD = "mlbuild-written.json"
FORMAT = 1


def _is_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..", RECORD) \
        and "/" not in name and os.sep not in name and "\x00" not in name


def read_record(folder: Path) -> tuple[dict[str, str | None], str | None]:
    """The files ``folder``'s record lists ({} without a record), and why the record
    cannot be trusted (None when it can)."""
    path = folder / RECORD
    if path.is_symlink():
        return {}, "is a symbolic link"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}, None
    except (OSError, ValueError):
        return {}, "is unreadable"
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        return {}, "is unreadable"
    if data.get("format") != FORMAT:
        return {}, f"is of format {data.get('format')!r}, which this mlbuild does not read"
    for name, digest in files.items():
        if not _is_name(name):
            return {}, f"lists {name!r}, not a file name in its folder"
        if digest is not None and not isinstance(digest, str):
            return {}, "is unreadable"
    return files, None


def _plain_file(path: Path) -> bool | None:
    """True for a regular file (not a link), False for anything else, None if absent."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return None
    except OSError:
        return False  # cannot even look at it: not known to be ours


class Written:
    """The record of one folder, as a step writing into it uses it: :meth:`open`,
    :meth:`check` the names to write, :meth:`begin`, write each file and say so with
    :meth:`wrote`, :meth:`remove_stale`, :meth:`save`."""

    def __init__(self, folder: Path, shown: str, who: str, files: dict[str, str | None]):
        self.folder = folder
        self.shown = shown
        self.who = who
        self.files = dict(files)
        self._saved = dict(files)

    @classmethod
    def open(cls, folder: Path, shown: str, who: str) -> "Written":
        """Read ``folder``'s record (``shown``: the folder as the user names it; ``who``:
        the step, for errors).

        Raises:
            StepFailed: ``folder`` is not a folder, or its record cannot be trusted.
        """
        if os.path.lexists(folder) and not folder.is_dir():
            raise StepFailed(who, f"{shown} is not a folder, where mlbuild writes its files",
                             hint="move it elsewhere, or choose another out folder")
        files, why = read_record(folder)
        if why is not None:
            raise StepFailed(who, f"{shown}/{RECORD} {why}: mlbuild cannot tell the files it "
                                  f"wrote in {shown} from yours; nothing was changed",
                             hint=f"delete {shown}/{RECORD} and deploy again: the deploy then "
                                  "names each file it would overwrite")
        return cls(folder, shown, who, files)

    def check(self, names: Iterable[str], hint: str = "",
              adopt: Callable[[str, Path], bool] | None = None) -> None:
        """Make sure each of ``names`` may be written: absent, or a plain file the record
        lists, or one ``adopt(name, path)`` says mlbuild wrote (before it kept this
        record; from the step's own state). Changes nothing on disk. ``hint``: more
        advice for the error (a sentence, with a leading space).

        Raises:
            StepFailed: naming the first file that is not mlbuild's (and how many more).
        """
        strangers = []
        for name in names:
            plain = _plain_file(self.folder / name)
            if plain is None or plain and name in self.files:
                continue
            if plain and adopt is not None and adopt(name, self.folder / name):
                self.files[name] = None  # claimed; its digest comes with wrote()
                continue
            strangers.append(name)
        if strangers:
            more = f" (and {len(strangers) - 1} more)" if len(strangers) > 1 else ""
            raise StepFailed(
                self.who, f"{self.shown}/{strangers[0]} was not written by mlbuild (its record, "
                          f"{self.shown}/{RECORD}, does not list it){more}; nothing was changed",
                hint=f"move it elsewhere, then deploy again: mlbuild writes {strangers[0]} in "
                     f"{self.shown}.{hint} If an older mlbuild wrote it (before it kept the "
                     "record), delete it.")

    def begin(self, names: Iterable[str]) -> None:
        """Record ``names`` as mlbuild's before writing them."""
        for name in names:
            self.files.setdefault(name, None)
        self.save()

    def wrote(self, name: str, digest: str) -> None:
        self.files[name] = digest

    def remove_stale(self, keep: Iterable[str]) -> tuple[list[str], list[str]]:
        """Remove the recorded files not in ``keep`` (record them no more: call
        :meth:`save` next). Returns the names removed and those that could not be."""
        keep = set(keep)
        removed, failed = [], []
        for name in sorted(set(self.files) - keep):
            path = self.folder / name
            if _plain_file(path):
                try:
                    os.unlink(path)
                except OSError:
                    failed.append(name)  # still recorded: tried again next time
                    continue
                removed.append(name)
            del self.files[name]  # gone, or a folder or link now: the user's
        return removed, failed

    def save(self) -> None:
        """Write the record (atomically; removed when it lists nothing)."""
        if self.files == self._saved and (self.files or not os.path.lexists(
                self.folder / RECORD)):
            return
        if not self.files:
            try:
                os.unlink(self.folder / RECORD)
            except FileNotFoundError:
                pass
        else:
            write_atomic(self.folder / RECORD, json.dumps(
                {"format": FORMAT, "files": dict(sorted(self.files.items()))},
                indent=2) + "\n")
        self._saved = dict(self.files)


def remove_written(folder: Path) -> tuple[list[str], str | None]:
    """Remove the plain files ``folder``'s record lists, then the record (``mlbuild
    clean``). Returns the names removed, and why the record cannot be trusted (then
    nothing is removed)."""
    files, why = read_record(folder)
    if why is not None:
        return [], why
    rec = Written(folder, str(folder), "clean", files)
    removed, _ = rec.remove_stale(())
    rec.save()
    return removed, None
