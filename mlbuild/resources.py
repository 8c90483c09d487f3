"""Files shipped inside the wheel: Jinja templates and the JSON Schema.

They live at the top of the repository (``templates/``, ``schemas/``) and are
installed as the data packages ``mlbuild._templates`` and ``mlbuild._schemas``
(see pyproject.toml), so ``importlib.resources`` finds them in a wheel and in an
editable install alike.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path


@lru_cache(maxsize=None)
def templates_dir() -> Path:
    """Folder of the Jinja templates."""
    return Path(str(resources.files("mlbuild._templates")))


@lru_cache(maxsize=None)
def schemas_dir() -> Path:
    """Folder of the JSON Schemas."""
    return Path(str(resources.files("mlbuild._schemas")))


def schema_path() -> Path:
    """Path of ``mlproject.schema.json``."""
    return schemas_dir() / "mlproject.schema.json"
