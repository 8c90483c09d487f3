"""Finding model files under the model dir (``MLBUILD_MODEL_DIR`` / ``AZUREML_MODEL_DIR``).

Layouts, as mlbuild mounts or copies models::

    one model:       MODEL_DIR/<the model's file or files>
    several models:  MODEL_DIR/NAME/VERSION/<file or folder>
"""

from __future__ import annotations

import os

MODEL_DIR_VARS = ("MLBUILD_MODEL_DIR", "AZUREML_MODEL_DIR")


class ModelNotFoundError(FileNotFoundError):
    """No model with the requested name (and version) under the model dir."""


def model_dir() -> str | None:
    """The model dir exactly as configured (a relative path stays relative), or None."""
    for var in MODEL_DIR_VARS:
        value = os.environ.get(var)
        if value:
            return value
    return None


def _version_key(name: str):
    # NOTE: versions are registry integers ("1", "12"); numeric order, so 10 > 9.
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def _single_entry(folder: str) -> str:
    """``folder/<entry>`` when the folder holds exactly one entry, else the folder."""
    entries = [e for e in os.listdir(folder) if not e.startswith(".")]
    return os.path.join(folder, entries[0]) if len(entries) == 1 else folder


def _model_names(root: str) -> list[str]:
    """Names of the models when ``root`` has the several-models layout, else []."""
    names = []
    for entry in sorted(os.listdir(root)):
        path = os.path.join(root, entry)
        if entry.startswith("."):
            continue
        if not os.path.isdir(path):
            return []
        subdirs = [v for v in os.listdir(path) if os.path.isdir(os.path.join(path, v))]
        if not subdirs or not all(v.isdigit() for v in subdirs):
            return []
        names.append(entry)
    return names


def get_model_path(name: str, version: int | str | None = None) -> str:
    """Path of a model's file (or folder) under the model dir.

    Mirrors Azure ML v1's ``Model.get_model_path`` inside a deployed service: for a model
    registered as one file or folder, the path of that file or folder; otherwise the
    folder holding its files.

    Args:
        name: The model's name.
        version: A version to pick among several; default the highest present.

    Returns:
        The path, built on the model dir as configured (relative stays relative).

    Raises:
        ModelNotFoundError: No model dir is configured, or it has no such model/version.
    """
    root = model_dir()
    if root is None:
        raise ModelNotFoundError(
            f"model {name!r}: no model dir (set MLBUILD_MODEL_DIR or AZUREML_MODEL_DIR)"
        )
    if not os.path.isdir(root):
        raise ModelNotFoundError(f"model {name!r}: model dir {root!r} does not exist")
    named = os.path.join(root, name)
    if os.path.isdir(named):
        versions = sorted(
            (v for v in os.listdir(named) if os.path.isdir(os.path.join(named, v))),
            key=_version_key,
        )
        if version is not None:
            if str(version) not in versions:
                raise ModelNotFoundError(
                    f"model {name!r} version {version}: not in {named!r}"
                    f" (versions present: {', '.join(versions) or 'none'})"
                )
            return _single_entry(os.path.join(named, str(version)))
        if versions:
            return _single_entry(os.path.join(named, versions[-1]))
    present = _model_names(root)
    if present:
        raise ModelNotFoundError(
            f"model {name!r}: not in model dir {root!r} (models present: {', '.join(present)})"
        )
    # One model: the model dir holds its files directly (NAME/VERSION are the dir itself).
    parent, last = os.path.split(os.path.normpath(root))
    if version is not None and last != str(version) and os.path.basename(parent) == name:
        raise ModelNotFoundError(f"model {name!r} version {version}: model dir is {root!r}")
    return _single_entry(root)
