"""Fixtures for functional tests: the CLI run as a subprocess on copies of examples/."""

from __future__ import annotations

from pathlib import Path

import pytest

from clitools import CLI, copy_example, train_examples


@pytest.fixture(scope="session")
def trained_models(tmp_path_factory) -> dict[str, Path]:
    return train_examples(tmp_path_factory.mktemp("trained"))


@pytest.fixture
def diabetes(tmp_path, trained_models) -> Path:
    return copy_example("diabetes", tmp_path, trained_models)


@pytest.fixture
def multi(tmp_path, trained_models) -> Path:
    return copy_example("multi-model", tmp_path, trained_models)


@pytest.fixture
def cli(diabetes) -> CLI:
    return CLI(diabetes)
