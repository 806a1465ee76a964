"""Fixtures of the reliability tests: one undisturbed reference run per session, and copies of it."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from reliability_util import run_stream


@pytest.fixture(scope="session")
def reference(tmp_path_factory, cache_dir) -> Path:
    """One undisturbed smoke stream (run id ``r``); every fault is compared with it."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert run_stream(out, cache_dir) == 0
    return out


@pytest.fixture
def finished_run(reference, tmp_path) -> Path:
    """A copy of the reference run, as a user's earlier run in ``--out`` (its parent holds nothing else)."""
    out = tmp_path / "runs" / "out"
    shutil.copytree(reference, out, symlinks=True)
    return out
