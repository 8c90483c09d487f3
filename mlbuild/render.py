"""Rendering templates: sandboxed Jinja, strict about undefined names.

Templates are data shipped in the wheel (``templates/``). Anything that reaches a
shell goes through the ``shquote`` filter; exec-form instructions use ``tojson``.
"""

from __future__ import annotations

from functools import lru_cache

from mlbuild.resources import templates_dir
from mlbuild.state.digest import hash_bytes


@lru_cache(maxsize=None)
def _env():
    import shlex

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters["shquote"] = lambda v: shlex.quote(str(v))
    return env


def render(template: str, **values) -> str:
    """Render ``templates/<name>``. Raises jinja2 errors for template bugs."""
    return _env().get_template(template).render(**values)


@lru_cache(maxsize=None)
def template_digest(name: str) -> str:
    """Digest of a template's source (part of the fingerprint of steps using it)."""
    return hash_bytes((templates_dir() / name).read_bytes())
