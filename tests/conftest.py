"""Shared test setup: deterministic seeds, few threads (CI has 2 cores), fixture paths."""
from __future__ import annotations

import os
import pathlib

import pytest
import torch
from hypothesis import settings

# no per-example deadline (CI machines are shared and slow); on CI, a fixed example sequence so a
# green run stays green (locally hypothesis keeps exploring new examples)
ON_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")
settings.register_profile("binarize", deadline=None, derandomize=ON_CI, print_blob=True)
settings.load_profile("binarize")

FIXTURES = pathlib.Path(__file__).parent / "fixtures"

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def fixtures_dir() -> pathlib.Path:
    return FIXTURES
