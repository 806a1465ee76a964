"""Fixtures of the data tests."""
from __future__ import annotations

import pytest
from data_testutil import BenchWriter


@pytest.fixture
def bench(tmp_path) -> BenchWriter:
    return BenchWriter(tmp_path / "bench")
