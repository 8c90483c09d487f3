"""``mlbuild init``: a small project that deploys as it is, with no packages to install."""

from __future__ import annotations

import json
import re
from pathlib import Path

from mlbuild.errors import InvalidInput

SCHEMA_URL = "https://mlbuild.dev/schemas/mlproject.schema.json"


def _name_from(folder: Path) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", folder.resolve().name.lower()).strip("-")
    return name[:40].strip("-") or "project"


def scaffold(directory: Path, name: str | None, force: bool) -> list[str]:
    from mlbuild.render import render

    name = name or _name_from(directory)
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 40:
        raise InvalidInput(f"project name {name!r} must be lower-case letters, digits and '-' "
                           "(a DNS label of at most 40 characters)", hint="pass --name")
    coef = [0.5, -1.25, 2.0]
    files = {
        "mlproject.yaml": render("init/mlproject.yaml.j2", name=name, schema_url=SCHEMA_URL),
        "src/score.py": render("init/score.py.j2"),
        "models/linear.json": json.dumps({"coef": coef, "intercept": 1.0}, indent=2) + "\n",
        "envs/requirements.txt": "# Packages the scoring script needs, one per line.\n",
        "samples/input.json": json.dumps({"data": [[1.0, 2.0, 3.0]]}) + "\n",
        "samples/output.json": json.dumps([1.0 + 0.5 - 2.5 + 6.0]) + "\n",
    }
    if not force:
        existing = [f for f in files if (directory / f).exists()]
        if existing:
            raise InvalidInput(f"{directory / existing[0]} already exists",
                               hint="use --force to overwrite, or init in an empty folder")
    for rel, text in files.items():
        p = directory / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    gi = directory / ".gitignore"
    lines = gi.read_text().splitlines() if gi.exists() else []
    if ".mlbuild/" not in lines:
        gi.write_text("\n".join(lines + [".mlbuild/", "dist/"]) + "\n")
        files[".gitignore"] = ""
    return list(files)
