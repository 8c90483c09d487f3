"""What to say when the file system refuses a write: it is full, read-only, or not
ours to write.

A full disk must never look like a corrupt state: the advice for a corrupt state
(move the database aside) would lose the registry and the keys, when all that is
needed is room. So each refusal gets its own error, naming the file system, how much
is free on it and, where it is known, how much the write needed.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from mlbuild.errors import DiskFull, StateError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def human(n: float) -> str:
    """``12.3 MB`` (powers of 1024, as ``df -h`` counts)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def _existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (a write may fail to create it)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def mount_point(path: Path | str) -> Path:
    p = Path(os.path.realpath(_existing(Path(path))))
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def free_space(path: Path | str) -> tuple[int, int] | None:
    """(free, total) bytes of the file system holding ``path``, as an unprivileged
    user sees them; None when it cannot be asked."""
    try:
        u = shutil.disk_usage(_existing(Path(path)))
    except OSError:
        return None
    return u.free, u.total


def is_full(path: Path | str, below: int = 1 << 20) -> bool:
    """Less than ``below`` bytes (1 MB) free where ``path`` lives."""
    space = free_space(path)
    return space is not None and space[0] < below


def disk_full(path: Path | str, state_dir: Path | None = None,
              needed: int | str | None = None, what: str | None = None) -> DiskFull:
    """The error for a write to ``path`` that did not fit.

    Args:
        path: the file (or folder) being written.
        state_dir: the project's ``.mlbuild``, to say what in it may be deleted.
        needed: bytes the write needed, when known (or how much, said in words).
        what: what was being written (``"the model file x.pkl"``), for the message.
    """
    mp = mount_point(path)
    room = free_space(path)
    figure = f"{human(room[0])} free of {human(room[1])}" if room else "no figure available"
    message = f"no space left on the file system holding {path} (mounted on {mp}: {figure})"
    if what:
        message = f"cannot write {what}: {message}"
    if isinstance(needed, int):
        message += f"; it needs {human(needed)}"
        todo = f"free at least {human(max(needed - (room[0] if room else 0), 1))} on {mp}"
    elif needed:
        todo = f"free {needed} on {mp}"
    else:
        todo = f"free some space on {mp}"
    look = f"df -h {mp} shows it"
    if state_dir is not None and mount_point(state_dir) == mp:
        look += (f"; du -sh {state_dir}/* what mlbuild keeps there: contexts/ can go, the "
                 "next deploy remakes it; never delete state.db or blobs/")
    return DiskFull(message, hint=f"{todo} ({look}). Then run again: nothing is lost, what "
                                  "did not fit was not recorded")


def read_only(path: Path | str) -> bool:
    """The file system holding ``path`` is mounted read-only."""
    try:
        return bool(os.statvfs(_existing(Path(path))).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def not_writable(path: Path | str, detail: str = "") -> StateError:
    """The error for a write refused by a read-only mount or by permissions."""
    where = _existing(Path(path))
    detail = f" ({detail})" if detail else ""
    if read_only(where):
        mp = mount_point(where)
        return StateError(f"cannot write {path}: the file system mounted on {mp} is "
                          f"read-only{detail}",
                          hint=f"remount it read-write (findmnt -T {where} shows how it is "
                               "mounted) or run the project from a writable copy")
    return StateError(f"cannot write {path}: permission denied{detail}",
                      hint=f"check who owns {where} and its mode (ls -ld {where}); run "
                           "mlbuild as that user, or give yourself write access")


def from_os_error(e: OSError, state_dir: Path | None = None) -> StateError | None:
    """The error to show for an OSError of a write, or None when it is neither a full
    nor a read-only file system (a permission error may as well be a read's)."""
    path = e.filename2 or e.filename or state_dir or "."  # (a copy's target is filename2)
    if e.errno in NO_SPACE:
        return disk_full(path, state_dir)
    if e.errno == errno.EROFS:
        return not_writable(path)
    return None
