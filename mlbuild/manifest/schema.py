"""Check manifest data against ``schemas/mlproject.schema.json`` and turn every
jsonschema error into a short :class:`Problem` with a line and a field path.

jsonschema is imported inside :func:`validate` only: its import costs ~0.1 s, and a
no-op run whose manifest was validated before never calls it (see the schema
cache in :func:`mlbuild.manifest.load_project`).
"""

from __future__ import annotations

import json
from functools import lru_cache

from mlbuild.errors import Problem
from mlbuild.manifest.suggest import did_you_mean
from mlbuild.manifest.yamlload import dotted, line_of
from mlbuild.resources import schema_path

_TYPE_WORDS = {
    "string": "text",
    "number": "a number",
    "integer": "a whole number",
    "boolean": "true or false",
    "object": "a mapping (key: value)",
    "array": "a list",
    "null": "nothing",
}

# What a name under each top-level mapping is called in messages.
_NAME_OF = {"models": "model", "environments": "environment", "services": "service",
            "targets": "target"}


@lru_cache(maxsize=None)
def schema_bytes() -> bytes:
    """The schema file's bytes (part of the schema-cache key)."""
    return schema_path().read_bytes()


@lru_cache(maxsize=None)
def _validator():
    from jsonschema import Draft202012Validator  # NOTE: lazy, see the module docstring

    return Draft202012Validator(json.loads(schema_bytes()))


def validate(data: dict, lines: dict, raw: dict, file: str) -> list[Problem]:
    """All schema problems of ``data``, one Problem per distinct finding.

    Args:
        data: the manifest as plain data.
        lines: path tuple -> line, from :mod:`mlbuild.manifest.yamlload`.
        raw: path tuple -> source text of non-string scalars.
        file: the manifest name shown in problems.
    """
    tr = _Translator(lines, raw, file)
    for error in _validator().iter_errors(data):
        tr.translate(error)
    return list(dict.fromkeys(tr.problems))


class _Translator:
    def __init__(self, lines: dict, raw: dict, file: str):
        self.lines, self.raw, self.file = lines, raw, file
        self.problems: list[Problem] = []

    def add(self, path: tuple, message: str, line_path: tuple | None = None) -> None:
        line = line_of(self.lines, line_path if line_path is not None else path)
        self.problems.append(Problem(self.file, line, dotted(path), message))

    def show(self, value, path: tuple) -> str:
        """A value as the user wrote it, for messages."""
        if isinstance(value, bool) or value is None or isinstance(value, (int, float)):
            text = self.raw.get(path)
            if text is None:
                text = {True: "true", False: "false"}.get(value) if isinstance(value, bool) \
                    else "null" if value is None else _number_text(value)
            if len(text) > 60:
                text = text[:57] + "..."
            return text or "nothing"
        if isinstance(value, str):
            return repr(value if len(value) <= 60 else value[:57] + "...")
        if isinstance(value, dict):
            return "a mapping"
        if isinstance(value, list):
            return "a list"
        return repr(value)

    def yaml11_note(self, value, path: tuple) -> str:
        text = self.raw.get(path, "")
        if isinstance(value, bool) and text.lower() in ("yes", "no", "on", "off"):
            return f" (YAML reads {text} as a boolean: quote it to mean the text)"
        return ""

    def translate(self, err) -> None:
        path = tuple(err.absolute_path)
        kw = err.validator
        schema = err.schema if isinstance(err.schema, dict) else {}
        inst = err.instance

        if "propertyNames" in err.relative_schema_path:
            self.property_name(err, path, inst)
        elif kw == "additionalProperties" and err.validator_value is False:
            known = schema.get("properties", {})
            for key in inst:
                if key not in known:
                    self.add(path, f"unknown key {key!r}" + did_you_mean(key, known),
                             line_path=path + (key,))
        elif kw == "required":
            for key in err.validator_value:
                if isinstance(inst, dict) and key not in inst:
                    self.add(path, f"missing required key {key!r}")
        elif kw == "type":
            want = err.validator_value
            want = [want] if isinstance(want, str) else list(want)
            words = " or ".join(_TYPE_WORDS.get(w, w) for w in want)
            self.add(path, f"expected {words}, got {self.show(inst, path)}"
                     + self.yaml11_note(inst, path))
        elif kw == "enum":
            options = [str(o) for o in err.validator_value]
            msg = f"{self.show(inst, path)} is not one of {', '.join(options)}"
            if isinstance(inst, str):
                msg += did_you_mean(inst, options)
            self.add(path, msg + self.yaml11_note(inst, path))
        elif kw == "pattern":
            how = schema.get("patternErrorMessage") or f"must match {err.validator_value}"
            self.add(path, f"{self.show(inst, path)} {how}")
        elif kw == "maxLength":
            self.add(path, f"{self.show(inst, path)} is longer than {err.validator_value} characters")
        elif kw == "minLength":
            self.add(path, "must not be empty")
        elif kw == "minimum":
            self.add(path, f"must be at least {err.validator_value}, got {self.show(inst, path)}")
        elif kw == "maximum":
            self.add(path, f"must be at most {err.validator_value}, got {self.show(inst, path)}")
        elif kw == "exclusiveMinimum":
            self.add(path, f"must be greater than {err.validator_value}, "
                           f"got {self.show(inst, path)}")
        elif kw == "uniqueItems":
            seen, dup = [], None
            for item in inst:
                if item in seen:
                    dup = item
                    break
                seen.append(item)
            self.add(path, f"lists {self.show(dup, ())} more than once")
        elif kw in ("oneOf", "anyOf"):
            self.alternatives(err, path, inst)
        elif kw == "const":
            self.add(path, f"must be {err.validator_value!r}")
        else:
            self.add(path, err.message)

    def property_name(self, err, path: tuple, key) -> None:
        """A key refused by ``propertyNames``: a bad name, or a key that does not
        apply to this target type."""
        key_path = path + (key,)
        if "then" in err.relative_schema_path:
            # NOTE: a key unknown to every type is already reported as unknown.
            if key not in _target_keys():
                return
            owner = _type_from_schema_path(err)
            for_types = [t for t, keys in _keys_by_type().items() if key in keys]
            msg = f"key {key!r} does not apply to a target of type {owner!r}"
            if for_types:
                msg += f" (only to {', '.join(for_types)})"
            self.add(path, msg, line_path=key_path)
            return
        kind = _NAME_OF.get(path[-1], "name") if path else "name"
        how = err.schema.get("patternErrorMessage") if isinstance(err.schema, dict) else None
        if err.validator == "pattern" and how:
            self.add(path, f"{kind} name {key!r} {how}", line_path=key_path)
        elif err.validator == "maxLength":
            self.add(path, f"{kind} name {key!r} is longer than {err.validator_value} characters",
                     line_path=key_path)
        elif err.validator == "minLength":
            self.add(path, f"{kind} name must not be empty", line_path=key_path)
        else:
            self.add(path, f"{kind} name {key!r}: {err.message}", line_path=key_path)

    def alternatives(self, err, path: tuple, inst) -> None:
        subs = err.validator_value
        if all(isinstance(s, dict) and set(s) == {"required"} for s in subs):
            keys = [k for s in subs for k in s["required"]]
            present = [k for k in keys if isinstance(inst, dict) and k in inst]
            if not present:
                self.add(path, f"needs one of {', '.join(keys)}")
            else:
                self.add(path, f"takes only one of {', '.join(keys)}; found "
                               f"{' and '.join(present)}")
            return
        from jsonschema.exceptions import best_match

        best = best_match(err.context) if err.context else None
        if best is None:
            self.add(path, err.message)
        else:
            self.translate(best)


def _number_text(value) -> str:
    try:
        return repr(value)
    except ValueError:  # an int beyond Python's digit limit
        return "a very large number"


@lru_cache(maxsize=None)
def _keys_by_type() -> dict:
    """target type -> keys that apply to it, read from the schema's if/then blocks."""
    target = json.loads(schema_bytes())["$defs"]["target"]
    out = {}
    for block in target.get("allOf", []):
        ttype = block["if"]["properties"]["type"]["const"]
        out[ttype] = tuple(block["then"]["propertyNames"]["enum"])
    return out


@lru_cache(maxsize=None)
def _target_keys() -> frozenset:
    target = json.loads(schema_bytes())["$defs"]["target"]
    return frozenset(target["properties"])


def _type_from_schema_path(err) -> str:
    """The target type whose if/then block raised ``err`` (``allOf[i]``)."""
    sp = list(err.schema_path)
    try:
        idx = sp[sp.index("allOf") + 1]
    except (ValueError, IndexError):
        return "?"
    return list(_keys_by_type())[idx] if isinstance(idx, int) else "?"
