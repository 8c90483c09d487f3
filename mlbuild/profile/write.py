"""``--write``: set ``models.NAME.resources`` in the manifest, keeping everything else.

A text edit at the positions PyYAML's composer reports, not a load and dump: comments,
key order, quoting, flow or block style and blank lines stay as they were. Only these
change, for each model:

    resources absent          a ``resources: {cpu: X, memory_gb: Y}`` entry is added
                              (a new line at the mapping's indent, or ``, resources:
                              {...}`` before the ``}`` of a flow mapping)
    resources: {...} / block  its ``cpu`` and ``memory_gb`` values are replaced or added
    resources: (null)         the value is filled in

The new text is loaded and validated (mlbuild.manifest) before it replaces the file,
atomically; an edit that would not load is refused, the file untouched.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode

from mlbuild.errors import InvalidInput

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _get(mapping: MappingNode, key: str) -> tuple[Node, Node] | None:
    for k, v in mapping.value:
        if isinstance(k, ScalarNode) and k.value == key:
            return k, v
    return None


def _line_end(text: str, index: int) -> int:
    """The index just after the line holding ``index`` (its newline included)."""
    nl = text.find("\n", index)
    return len(text) if nl < 0 else nl + 1


def _insert(text: str, mapping: MappingNode, key: str, value: str) -> tuple[int, int, str]:
    """The edit (start, end, replacement) that adds ``key: value`` to ``mapping``."""
    if mapping.flow_style or text[mapping.start_mark.index] == "{":
        close = text.rindex("}", mapping.start_mark.index, mapping.end_mark.index)
        inner = text[mapping.start_mark.index + 1:close].strip()
        return close, close, (", " if inner else "") + f"{key}: {value}"
    first_key = mapping.value[0][0]
    last_value = mapping.value[-1][1]
    # NOTE: the end mark of a block value is past its last line (or at its end for a
    # scalar): the new line goes after the line where the last value ends.
    end = last_value.end_mark.index
    at = _line_end(text, end - 1 if end and text[end - 1] == "\n" else end)
    line = " " * first_key.start_mark.column + f"{key}: {value}\n"
    if at == len(text) and not text.endswith("\n"):
        line = "\n" + line
    return at, at, line


def _edits_for_model(text: str, model: MappingNode, cpu, memory_gb) -> list[tuple[int, int, str]]:
    values = {k: v for k, v in (("cpu", cpu), ("memory_gb", memory_gb)) if v is not None}
    flow = "{" + ", ".join(f"{k}: {v:g}" for k, v in values.items()) + "}"
    found = _get(model, "resources")
    if found is None:
        return [_insert(text, model, "resources", flow)]
    _, node = found
    if isinstance(node, MappingNode) and node.value:
        edits = []
        for k, v in values.items():
            pair = _get(node, k)
            if pair is None:
                edits.append(_insert(text, node, k, f"{v:g}"))
            else:
                edits.append((pair[1].start_mark.index, pair[1].end_mark.index, f"{v:g}"))
        return edits
    if isinstance(node, ScalarNode) and node.value in ("", "~", "null", "Null", "NULL"):
        start, end = node.start_mark.index, node.end_mark.index
        return [(start, end, (" " if start == end else "") + flow)]
    if isinstance(node, MappingNode):  # resources: {}
        return [(node.start_mark.index, node.end_mark.index, flow)]
    raise InvalidInput("models.{name}.resources is not a mapping: cannot set it",
                       hint="set it by hand: resources: {cpu: N, memory_gb: N}")


def set_resources(manifest: Path, resources: Mapping[str, tuple[float | None, float | None]]
                  ) -> str:
    """Set ``models.NAME.resources`` for each NAME (cpu, memory_gb) in ``manifest``.

    Returns:
        The new text (already written).

    Raises:
        InvalidInput: a model is not in the manifest's own ``models`` mapping, its
            resources are not a mapping, or the edited manifest does not validate.
    """
    from mlbuild.manifest import load_project

    text = manifest.read_text(encoding="utf-8")
    root = yaml.compose(text, Loader=_Loader)
    models = _get(root, "models") if isinstance(root, MappingNode) else None
    if models is None or not isinstance(models[1], MappingNode):
        raise InvalidInput(f"{manifest.name}: no models mapping to write resources into")
    edits = []
    for name, (cpu, mem) in resources.items():
        pair = _get(models[1], name)
        if pair is None or not isinstance(pair[1], MappingNode):
            raise InvalidInput(f"{manifest.name}: models.{name} is not a mapping here",
                               hint="set its resources by hand")
        try:
            edits += _edits_for_model(text, pair[1], cpu, mem)
        except InvalidInput as e:
            e.message = e.message.replace("{name}", name)
            raise
    for start, end, new in sorted(edits, reverse=True):
        text = text[:start] + new + text[end:]
    fd, tmp = tempfile.mkstemp(prefix=f".{manifest.name}.", dir=manifest.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        try:
            load_project(Path(tmp))
        except InvalidInput as e:
            raise InvalidInput(f"{manifest.name}: the edited manifest would not be valid "
                               f"({e.message}); left unchanged",
                               hint="set models.NAME.resources by hand") from None
        os.chmod(tmp, os.stat(manifest).st_mode & 0o777)
        os.replace(tmp, manifest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return text
