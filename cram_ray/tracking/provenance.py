"""Which code made a run: the git revision of the checkout, or the installed package's version.

No MLflow and no Ray here: the tracker records what these functions return.
"""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Optional

import cram_ray

PACKAGE_DIR = Path(cram_ray.__file__).resolve().parent


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(PACKAGE_DIR.parent), *args], capture_output=True, text=True,
                             timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def code_revision() -> dict[str, Any]:
    """``{"version", "git_commit", "git_dirty"}``; the git fields are None outside a git checkout
    (an installed wheel), where the package version is what identifies the code."""
    commit = None
    top = _git("rev-parse", "--show-toplevel")
    # only the checkout that holds this package counts, not a repository it happens to be installed in
    if top is not None and (PACKAGE_DIR.parent == Path(top).resolve()):
        commit = _git("rev-parse", "HEAD")
    dirty = None
    if commit:
        status = _git("status", "--porcelain", "--untracked-files=no")
        dirty = bool(status) if status is not None else None
    return {"version": cram_ray.__version__, "git_commit": commit, "git_dirty": dirty}
