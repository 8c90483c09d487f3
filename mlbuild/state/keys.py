"""Auth keys of services with ``auth: key``: a primary and a secondary per service and
target, generated on first use and kept in the state database (never in an image, a
package or a log). Deployments receive them in a file of their own (mode 0600).

Two keys allow rotation without downtime, as in Azure ML: clients move to the
secondary, the primary is regenerated, the next deploy applies it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from mlbuild import fsutil
from mlbuild.errors import InvalidInput
from mlbuild.state.db import StateDB

WHICH = ("primary", "secondary")


def _new() -> str:
    return secrets.token_urlsafe(32)


def ensure(db: StateDB, target: str, service: str) -> tuple[str, str]:
    """The keys of ``service`` on ``target``, made when there are none yet."""
    keys = db.get_keys(target, service)
    if keys is None:
        keys = (_new(), _new())
        db.put_keys(target, service, *keys)
    return keys


def regenerate(db: StateDB, target: str, service: str, which: str) -> tuple[str, str]:
    if which not in WHICH:
        raise InvalidInput(f"--regenerate {which!r}: expected primary or secondary")
    primary, secondary = ensure(db, target, service)
    if which == "primary":
        primary = _new()
    else:
        secondary = _new()
    db.put_keys(target, service, primary, secondary)
    return primary, secondary


def write_file(path: Path, keys: tuple[str, str]) -> None:
    """The keys file a runtime reads (MLBUILD_AUTH_KEYS_FILE), readable by us alone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    old = os.umask(0o077)
    try:
        fsutil.write_atomic(path, "".join(k + "\n" for k in keys))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
