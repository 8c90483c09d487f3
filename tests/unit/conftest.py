"""Fixtures of the unit tests (helpers live in unittools.py: two conftest modules
of the same name would shadow each other when imported by name)."""

from unittools import basic  # noqa: F401  (a fixture)
