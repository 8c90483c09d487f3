"""How a pip environment is split into image layers, so that a lock edit rebuilds little.

An image's environment is two layers (BuildKit builds, the docker and kubernetes
targets; see templates/Dockerfile.j2):

    base   the lock as it was when the layer was last made in full, installed with the
           serving runtime's requirements, then the bytecode of what a start imports;
    delta  the lock's entries that are not in the base as written (packages added,
           versions changed), installed on top, after uninstalling what the base has
           that the lock no longer wants (removed, or at another version).

Docker layers are cached by their prefix: an edit in a lower layer rebuilds everything
above it. So the base is *sticky*: an edit of the lock keeps the base as it was, and only
the small delta layer (and the layers above it: models, source) is built again; the uv
cache mount means the delta's packages alone are fetched and unpacked. BuildKit's
``COPY --link``, which would let independent layers be rebuilt alone, needs a newer
Dockerfile frontend than the engines mlbuild supports bring (Docker 20.10: BuildKit 0.8).

What the image holds is exactly the lock either way (the delta's uninstalls make the
base's stale packages invisible); a clean clone builds the same installed distributions
in one base layer. The split is *history*, remembered in the build context
(``env/base.lock.txt`` and ``env/base.key``), not part of the project.

The base is made in full again (the delta folded into it) when:
* there is no previous base, or the previous context was made for other inputs of the
  base layer (its key: the runtime's requirements, the base image, the installer, the
  slimming script); the base layer rebuilds then anyway, so folding costs nothing;
* the delta has grown past ``max(MIN_DELTA, FRACTION * entries)`` entries (added,
  changed and removed counted together): from then on each edit would reinstall a large
  delta, and removed packages' files hidden in the base make the image bigger;
* the build is offline (a ``package``: its wheels folder is one input of every layer;
  and a package should build the same for everyone).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mlbuild.state.digest import hash_json

MIN_DELTA = 8
FRACTION = 0.25

_NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)")


def normalize(name: str) -> str:
    """PEP 503 normalization of a distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_entries(text: str) -> dict[str, str]:
    """The entries of a pip lock (``name==version \\`` and its ``--hash`` lines) by
    normalized name, each entry's text as written (comment lines dropped)."""
    entries: dict[str, str] = {}
    current: list[str] | None = None
    name = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[:1].isspace() and current is not None:
            current.append(line)
            continue
        if current is not None:
            entries[name] = "\n".join(current) + "\n"
            current = None
        m = _NAME.match(stripped)
        if m is None:  # an option line (--index-url ...): not an entry
            continue
        name, current = normalize(m.group(1)), [line]
    if current is not None:
        entries[name] = "\n".join(current) + "\n"
    return entries


@dataclass(frozen=True)
class Layers:
    base: str             # the base layer's lock text
    delta: str            # the delta's lock text ("" when none)
    remove: tuple[str, ...]  # distributions the base has that the lock does not want
    folded: str           # why the base was made in full now ("" when kept)

    @property
    def has_delta(self) -> bool:
        return bool(self.delta or self.remove)


def base_key(**parts) -> str:
    """The digest of what the base layer depends on besides its lock."""
    return hash_json(sorted(parts.items()))


def split(lock_text: str, key: str, previous_base: str | None, previous_key: str | None,
          *, offline: bool = False) -> Layers:
    """The layers for ``lock_text`` given the previous context's base (None: none)."""
    lock = lock_entries(lock_text)
    full = "".join(lock[n] for n in sorted(lock))
    if offline:
        return Layers(full, "", (), "offline")
    if previous_base is None:
        return Layers(full, "", (), "first build")
    if previous_key != key:
        return Layers(full, "", (), "the base layer's other inputs changed")
    base = lock_entries(previous_base)
    delta = {n: e for n, e in lock.items() if base.get(n) != e}
    remove = tuple(sorted(n for n, e in base.items() if lock.get(n) != e))
    if not delta and not remove:
        return Layers(full, "", (), "")
    limit = max(MIN_DELTA, int(FRACTION * len(lock)))
    if len(delta) + len(remove) > limit:
        return Layers(full, "", (), f"{len(delta) + len(remove)} entries changed since the "
                                   f"base was made (more than {limit})")
    return Layers("".join(base[n] for n in sorted(base)),
                  "".join(delta[n] for n in sorted(delta)), remove, "")
