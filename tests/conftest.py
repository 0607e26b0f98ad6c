"""Shared fixtures: a temporary towerflow project (git + DVC) running on a small synthetic dataset."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from flows.environment import configure_environment

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

from datagen import make_contract_dataset  # noqa: E402

@pytest.fixture(scope="session", autouse=True)
def _environment(tmp_path_factory):
    configure_environment(tmp_path_factory.mktemp("prefect_home"))


@pytest.fixture(scope="session")
def contract_source(tmp_path_factory) -> Path:
    return make_contract_dataset(tmp_path_factory.mktemp("source"), n_users=300, n_items=200, seed=3)
