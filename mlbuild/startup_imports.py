"""The modules a service imports when it starts, read from its files without running them.

An image carries compiled bytecode (``__pycache__``) only for these (and for what they
import in turn): ``mlbuild/slim.py`` removes the environment's caches, and the image's
warm-up layer (``python -m mlbuild.runtime.warm``) imports this list to compile them.
What is missing here still works, compiled in memory when first imported.

Sources of names, all read statically (nothing of the project is executed on this
machine):

- the ``import`` statements of every Python file of the app (entry script and source
  dir), at any depth: ``init()`` often imports inside the function. Modules of the app
  itself are left out.
- the classes a pickled model names (plain pickle and joblib files, also joblib's
  zlib/gzip/bz2/xz compression): unpickling imports their modules (a scikit-learn
  ``Ridge`` pulls ``sklearn.linear_model``).
- the frameworks of the service's models (what no-code serving imports).

The result depends only on the files' bytes (no look-up in this machine's Python), so
every checkout of a commit writes the same list: it enters the build context and the
image's fingerprint.
"""

from __future__ import annotations

import ast
import bz2
import gzip
import lzma
import os
import re
import zlib
from pathlib import Path

# At most this much of each model file is read (decompressed) for class names.
MODEL_SCAN_BYTES = 64 * 1024 * 1024
MAX_MODEL_NAMES = 200

FRAMEWORK_MODULES = {
    "scikit-learn": ("joblib", "sklearn"),
    "onnx": ("numpy", "onnxruntime"),
}

_NAME = rb"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
# Protocol 4/5: SHORT_BINUNICODE module, MEMOIZE, SHORT_BINUNICODE name, MEMOIZE,
# STACK_GLOBAL. (A module used again comes from the memo: it was seen the first time.)
_STACK_GLOBAL = re.compile(rb"\x8c([\x01-\xff])(" + _NAME + rb")\x94?\x8c[\x01-\xff]"
                           + _NAME + rb"\x94?\x93")
# Protocols 0-3: GLOBAL 'module\nname\n'.
_GLOBAL = re.compile(rb"c(" + _NAME + rb")\n" + _NAME + rb"\n")
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")


def service_imports(app: list[tuple[str, Path]], model_modules: set[str],
                    frameworks: list[str]) -> list[str]:
    """The sorted module names a service imports at start (see the module docstring).

    Args:
        app: ``(path relative to the app folder, file)`` for every file of the app.
        model_modules: what :func:`pickle_modules` found in the model files.
        frameworks: the declared frameworks of the service's models.
    """
    local = {rel.split("/", 1)[0].removesuffix(".py") for rel, _ in app}
    names: set[str] = set(model_modules)
    for rel, path in app:
        if rel.endswith(".py"):
            names |= source_imports(path.read_bytes())
    for fw in frameworks:
        names.update(FRAMEWORK_MODULES.get(fw, ()))
    return sorted(n for n in names
                  if n.split(".", 1)[0] not in local and n != "__future__")


def source_imports(source: bytes) -> set[str]:
    """Absolute module names a Python source imports anywhere (none if it does not
    parse). ``from a import b`` gives ``a`` and ``a.b`` (``b`` may be a submodule)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return set()
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names if a.name != "*")
    return out


def cached_pickle_modules(path: Path, digest: str, cache_dir: Path) -> set[str]:
    """:func:`pickle_modules` of a file whose content digest is ``digest``, remembered in
    ``cache_dir`` (a large model is read once, not at every edit of the entry script)."""
    memo = cache_dir / f"{digest.replace(':', '-')}.txt"
    try:
        return set(memo.read_text(encoding="utf-8").split())
    except OSError:
        pass
    found = pickle_modules(path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text("".join(f"{n}\n" for n in sorted(found)), encoding="utf-8")
    os.replace(tmp, memo)
    return found


def pickle_modules(path: Path) -> set[str]:
    """Modules whose classes a pickle (or joblib) file names; none for other files."""
    data = _model_bytes(path)
    if data is None:
        return set()
    found: set[str] = set()
    for m in _STACK_GLOBAL.finditer(data):
        if m.group(1)[0] == len(m.group(2)):
            found.add(m.group(2).decode())
    for m in _GLOBAL.finditer(data):
        found.add(m.group(1).decode())
    return set(sorted(n for n in found if _MODULE.match(n))[:MAX_MODEL_NAMES])


def _model_bytes(path: Path) -> bytes | None:
    """The first MODEL_SCAN_BYTES of a pickle, decompressed; None if it is not one."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(MODEL_SCAN_BYTES)
    except OSError:
        return None
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return head
    opener = None
    if head[:2] == b"\x1f\x8b":
        opener = gzip.open
    elif head[:3] == b"BZh":
        opener = bz2.open
    elif head[:6] == b"\xfd7zXZ\x00" or head[:3] == b"\x5d\x00\x00":
        opener = lzma.open
    elif head[:1] == b"\x78" and head[1:2] in (b"\x01", b"\x5e", b"\x9c", b"\xda"):
        try:
            data = zlib.decompressobj().decompress(head, MODEL_SCAN_BYTES)
        except zlib.error:
            return None
        return data if data[:1] == b"\x80" else None
    if opener is None:
        return None
    try:
        with opener(path, "rb") as fh:
            data = fh.read(MODEL_SCAN_BYTES)
    except (OSError, EOFError, lzma.LZMAError):
        return None
    return data if data[:1] == b"\x80" else None
