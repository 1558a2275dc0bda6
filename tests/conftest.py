"""Shared test setup: deterministic seeds, few threads (CI has 2 cores), fixture paths."""
from __future__ import annotations

import pathlib

import pytest
import torch

FIXTURES = pathlib.Path(__file__).parent / "fixtures"

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def fixtures_dir() -> pathlib.Path:
    return FIXTURES
