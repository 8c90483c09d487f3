"""Read YAML into plain Python data, remembering the line of every key.

PyYAML's ``safe_load`` loses line numbers and silently keeps the last of two
duplicate keys. We ``compose`` the node graph instead (with libyaml when it is
available) and convert the nodes ourselves, so that every problem can name its
line and duplicates are caught.

Decisions (YAML 1.1, as PyYAML reads it):

* Numbers, booleans and null are converted as YAML 1.1 gives them (``on``/``yes``
  are booleans, ``1:30`` is 90), but the source text of every such scalar is kept
  in ``Document.raw`` so that fields which are really text (``python: 3.10``,
  ``framework_version: 1.5``, tag values) can use what the user wrote.
* Timestamps (``2024-01-01``) stay text; ``!!binary``, ``!!set``, ``!!omap`` and
  custom tags are rejected.
* Anchors, aliases and merge keys (``<<: *base``) are supported; explicit keys win
  over merged ones. Recursive aliases and alias bombs are rejected.
* Keys must be text: ``on:``/``1:``/``null:`` keys are reported, not stringified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from mlbuild.errors import Problem

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_T = "tag:yaml.org,2002:"
STR, NULL, BOOL, INT, FLOAT = _T + "str", _T + "null", _T + "bool", _T + "int", _T + "float"
TIMESTAMP, VALUE, MERGE, MAP, SEQ = _T + "timestamp", _T + "value", _T + "merge", _T + "map", _T + "seq"

# Limits that keep hostile input (alias bombs, deep nesting) cheap to reject.
MAX_NODES = 100_000
MAX_DEPTH = 50

_YAML11_BOOLS = {"yes", "no", "on", "off", "true", "false"}



@dataclass
class Document:
    """A parsed manifest.

    Attributes:
        data: the plain data (dict/list/str/int/float/bool/None); None when the
            file could not be read as a mapping at all.
        lines: path tuple -> 1-based line (of the key for mapping entries, of the
            item for list items; ``()`` is the first line of the document).
        raw: path tuple -> source text, for scalars that YAML did not read as a
            string (numbers, booleans, null).
        problems: what was wrong; parsing goes on past everything but syntax errors.
    """

    data: Any = None
    lines: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)


class _TooBig(Exception):
    pass


def dotted(path: tuple) -> str:
    """``("services", "a", "models", 0)`` -> ``services.a.models[0]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def line_of(lines: dict, path: tuple) -> int | None:
    """Line of ``path`` or of its nearest ancestor that has one."""
    path = tuple(path)
    while True:
        if path in lines:
            return lines[path]
        if not path:
            return None
        path = path[:-1]


def parse(content: bytes | str, file: str) -> Document:
    """Parse manifest bytes. Never raises for bad input: problems are collected.

    Args:
        content: the file's bytes (UTF-8, an optional BOM) or text.
        file: the file name shown in problems.

    Returns:
        A Document; ``data`` is None when nothing usable could be read.
    """
    doc = Document()
    if isinstance(content, bytes):
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError as e:
            line = content[: e.start].count(b"\n") + 1
            doc.problems.append(Problem(file, line, "", "the manifest is not UTF-8 text"))
            return doc
    else:
        text = content
    text = text.removeprefix("\ufeff")
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        doc.problems.append(Problem(file, _mark_line(e.problem_mark), "", _yaml_message(e)))
        return doc
    except yaml.YAMLError as e:
        pos = getattr(e, "position", None)
        line = text[:pos].count("\n") + 1 if isinstance(pos, int) else None
        doc.problems.append(Problem(file, line, "", f"invalid YAML: {_one_line(str(e))}"))
        return doc
    except RecursionError:
        doc.problems.append(Problem(file, None, "", "invalid YAML: nested too deeply"))
        return doc
    if root is None or (isinstance(root, ScalarNode) and root.tag == NULL):
        doc.problems.append(
            Problem(file, None, "", "the manifest is empty (it needs at least 'name:')")
        )
        return doc
    if not isinstance(root, MappingNode):
        kind = "a list" if isinstance(root, SequenceNode) else "a single value"
        doc.problems.append(
            Problem(file, _mark_line(root.start_mark), "",
                    f"the manifest must be a mapping of keys (name:, models:, ...), not {kind}")
        )
        return doc
    conv = _Converter(file, doc)
    doc.lines[()] = _mark_line(root.start_mark)
    try:
        doc.data = conv.convert(root, (), 0)
    except _TooBig:
        doc.problems.append(
            Problem(file, None, "", f"the manifest expands to more than {MAX_NODES} values"
                    " (aliases repeated too often?)")
        )
        doc.data = None
    # A problem inside an anchored node is found once per alias: report it once.
    doc.problems = list(dict.fromkeys(doc.problems))
    return doc


def _mark_line(mark) -> int | None:
    return mark.line + 1 if mark is not None else None


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _yaml_message(e: yaml.MarkedYAMLError) -> str:
    msg = f"invalid YAML: {e.problem or e.context or 'syntax error'}"
    if e.problem and e.context:
        msg += f" ({e.context}"
        if e.context_mark is not None and e.problem_mark is not None \
                and e.context_mark.line != e.problem_mark.line:
            msg += f" at line {e.context_mark.line + 1}"
        msg += ")"
    return _one_line(msg)


class _Converter:
    """Turns composed nodes into plain data, filling a Document's lines and raw."""

    def __init__(self, file: str, doc: Document):
        self.file = file
        self.doc = doc
        self.budget = MAX_NODES
        self.active: set[int] = set()  # ids of the collections being converted
        self.ctor = yaml.constructor.SafeConstructor()

    def problem(self, line: int | None, path: tuple, message: str) -> None:
        self.doc.problems.append(Problem(self.file, line, dotted(path), message))

    def convert(self, node, path: tuple, depth: int) -> Any:
        self.budget -= 1
        if self.budget < 0:
            raise _TooBig()
        if isinstance(node, ScalarNode):
            return self.scalar(node, path)
        line = _mark_line(node.start_mark)
        if depth > MAX_DEPTH:
            self.problem(line, path, f"nested more than {MAX_DEPTH} levels deep")
            return None
        if id(node) in self.active:
            self.problem(line, path, "an alias refers to the node that contains it")
            return None
        self.active.add(id(node))
        try:
            if isinstance(node, MappingNode):
                return self.mapping(node, path, depth)
            return self.sequence(node, path, depth)
        finally:
            self.active.discard(id(node))

    def sequence(self, node: SequenceNode, path: tuple, depth: int) -> list | None:
        if node.tag != SEQ:
            self.problem(_mark_line(node.start_mark), path, f"unsupported YAML tag {node.tag!r}")
            return None
        out = []
        for i, item in enumerate(node.value):
            self.doc.lines[path + (i,)] = _mark_line(item.start_mark)
            out.append(self.convert(item, path + (i,), depth + 1))
        return out

    def mapping(self, node: MappingNode, path: tuple, depth: int, skip=None) -> dict | None:
        if node.tag != MAP:
            self.problem(_mark_line(node.start_mark), path, f"unsupported YAML tag {node.tag!r}")
            return None
        out: dict = {}
        first: dict[str, int] = {}
        merges = []
        for knode, vnode in node.value:
            kline = _mark_line(knode.start_mark)
            if isinstance(knode, ScalarNode) and knode.tag == MERGE:
                merges.append((kline, vnode))
                continue
            key = self.key(knode, path)
            if key is None:
                continue
            if key in first:
                self.problem(kline, path, f"duplicate key {key!r} (first at line {first[key]})")
                continue
            first[key] = kline
            if skip is not None and key in skip:
                continue  # a merged key that the merging mapping sets itself
            self.doc.lines[path + (key,)] = kline
            out[key] = self.convert(vnode, path + (key,), depth + 1)
        # NOTE: merges come after the explicit keys so that those keep their lines.
        for kline, vnode in merges:
            sources = vnode.value if isinstance(vnode, SequenceNode) else [vnode]
            for src in sources:
                if not isinstance(src, MappingNode):
                    self.problem(kline, path, "'<<' must merge a mapping or a list of mappings")
                    continue
                if id(src) in self.active:
                    self.problem(kline, path, "an alias refers to the node that contains it")
                    continue
                self.active.add(id(src))
                try:
                    merged = self.mapping(src, path, depth, skip=set(out))
                finally:
                    self.active.discard(id(src))
                for k, v in (merged or {}).items():
                    out.setdefault(k, v)
        return out

    def key(self, knode, path: tuple) -> str | None:
        line = _mark_line(knode.start_mark)
        if not isinstance(knode, ScalarNode):
            self.problem(line, path, "keys must be text, not a list or a mapping")
            return None
        if knode.tag == STR:
            return knode.value
        text = knode.value
        if knode.tag == BOOL and text.lower() in _YAML11_BOOLS:
            why = f"YAML reads {text!r} as a boolean"
        elif knode.tag == NULL:
            why = "YAML reads it as null"
        elif knode.tag in (INT, FLOAT):
            why = f"YAML reads {text!r} as a number"
        else:
            why = f"it has the tag {knode.tag!r}"
        self.problem(line, path, f"key {text!r} is not text ({why}); quote it")
        return None

    def scalar(self, node: ScalarNode, path: tuple) -> Any:
        tag = node.tag
        if tag == STR or tag == VALUE or tag == TIMESTAMP:
            return node.value  # NOTE: dates stay text: no field of ours is a date
        if tag in (NULL, BOOL, INT, FLOAT):
            self.doc.raw[path] = node.value
            try:
                if tag == NULL:
                    return None
                if tag == BOOL:
                    return self.ctor.bool_values[node.value.lower()]
                if tag == INT:
                    return self.ctor.construct_yaml_int(node)
                return self.ctor.construct_yaml_float(node)
            except (ValueError, KeyError, IndexError, yaml.YAMLError):
                kind = {NULL: "null", BOOL: "boolean", INT: "whole number", FLOAT: "number"}[tag]
                self.problem(_mark_line(node.start_mark), path,
                             f"{_short(node.value)!r} is not a valid {kind}")
                return node.value
        self.problem(_mark_line(node.start_mark), path, f"unsupported YAML tag {tag!r}")
        return node.value
