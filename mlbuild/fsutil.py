"""File-system helpers: hard links with a copy fallback, atomic writes, atomic
replacement of a whole folder.

Rule kept everywhere: a file that mlbuild wrote is never modified in place. A new
content is a new file, renamed over the old one. That is what makes it safe to
hard-link the same inode into the blob store, build contexts and packages.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_libc = None


def resolves_outside(root_real: str, path: Path | str) -> str | None:
    """The real path of ``path`` when it resolves outside ``root_real`` (an already
    ``realpath``-ed folder), else None."""
    real = os.path.realpath(path)
    return None if within(root_real, real) else real


def within(root_real: str, real: str) -> bool:
    """Whether ``real`` is ``root_real`` or lies below it (both already resolved)."""
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def link_or_copy(src: Path | str, dst: Path | str) -> bool:
    """Hard-link ``src`` to ``dst`` (copy across devices). Returns True if linked."""
    try:
        os.link(src, dst)
        return True
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
    shutil.copyfile(src, dst)
    return False


def clone_or_copy(src: Path | str, dst: Path | str) -> None:
    """Copy a file, as a copy-on-write clone (FICLONE) where the file system can."""
    try:
        import fcntl

        with open(src, "rb") as fi, open(dst, "wb") as fo:
            fcntl.ioctl(fo.fileno(), 0x40049409, fi.fileno())  # FICLONE
        return
    except OSError:
        pass
    shutil.copyfile(src, dst)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write a file through a temporary name and a rename."""
    if isinstance(data, str):
        data = data.encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE). False if unsupported."""
    global _libc
    import ctypes

    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        fn = _libc.renameat2
    except (OSError, AttributeError):
        return False
    res = fn(_AT_FDCWD, a.encode(), _AT_FDCWD, b.encode(), _RENAME_EXCHANGE)
    if res == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


def replace_dir(staging: Path, target: Path) -> None:
    """Put the folder ``staging`` in place of ``target`` atomically.

    Readers see either the old folder or the new one, never a mix: on Linux by
    exchanging the two names in one system call; elsewhere by two renames with a
    short window in which ``target`` does not exist (a later run redoes it).
    """
    if not target.exists():
        os.rename(staging, target)
        return
    if _exchange(str(staging), str(target)):
        shutil.rmtree(staging, ignore_errors=True)
        return
    trash = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.rename(target, trash)
    os.rename(staging, target)
    shutil.rmtree(trash, ignore_errors=True)


def staging_dir(target: Path) -> Path:
    """A new empty folder beside ``target`` to build its replacement in."""
    target.parent.mkdir(parents=True, exist_ok=True)
    p = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    os.chmod(p, 0o755)  # mkdtemp makes it private; the result is an ordinary folder
    return p


def remove_stale_staging(parent: Path) -> None:
    """Remove staging folders left behind by a killed run."""
    if not parent.is_dir():
        return
    for p in parent.iterdir():
        if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                try:
                    p.unlink()
                except OSError:
                    pass
