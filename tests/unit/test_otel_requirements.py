"""The ``otel`` extra of pyproject.toml and mlbuild/runtime/requirements-otel.txt (what
images install for ``tracing: true``) list the same requirements; the ``test`` extra has
them too, so CI runs tests/runtime/test_tracing.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[2]


def _extras() -> dict[str, list[str]]:
    with open(REPO / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["project"]["optional-dependencies"]


def _canonical(lines) -> set[tuple]:
    out = set()
    for line in lines:
        req = Requirement(line)
        out.add((req.name.lower().replace("_", "-"), str(req.specifier), str(req.marker or "")))
    return out


def _file_requirements() -> list[str]:
    text = (REPO / "mlbuild/runtime/requirements-otel.txt").read_text(encoding="utf-8")
    return [s for s in (line.split("#", 1)[0].strip() for line in text.splitlines()) if s]


def test_otel_extra_and_requirements_file_agree():
    extra = _canonical(_extras()["otel"])
    listed = _canonical(_file_requirements())
    assert extra == listed
    assert {name for name, _, _ in extra} == {
        "opentelemetry-api", "opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-http"}


def test_test_extra_has_the_otel_requirements():
    assert _canonical(_extras()["otel"]) <= _canonical(_extras()["test"])


def test_requirements_file_ships_in_the_wheel():
    with open(REPO / "pyproject.toml", "rb") as fh:
        data = tomllib.load(fh)
    assert "requirements-otel.txt" in data["tool"]["setuptools"]["package-data"]["mlbuild.runtime"]
