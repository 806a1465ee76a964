"""What the reliability tests share: the smoke stream run in this process, file-tree digests, and
a disk that fails at its Nth write."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pathlib
import shutil
import sys
from pathlib import Path
from typing import Optional

import pytest

from cram_ray.pipeline.ledger import Storage

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "workflows/configs/smoke.yaml")
RUN_ID = "r"
# the smoke stream cut to what still runs every stage of every task (each fault costs one stream)
TINY = ["--set", "train.steps_per_task=2", "--set", "train.checkpoint_every=1",
        "--set", "data.builtin.train_per_task=16", "--set", "data.builtin.test_per_task=4"]
sys.path.insert(0, str(ROOT / "workflows"))

import stream  # noqa: E402


def tiny_builtin():
    """The built-in benchmark the reliability streams run on, to be written as a user's benchmark."""
    from cram_ray.config import load_config

    return load_config(SMOKE, [s for s in TINY if s != "--set"]).data.builtin


def stream_argv(out: Path, cache_dir: str, *extra: str, run_id: Optional[str] = RUN_ID) -> list[str]:
    argv = ["--config", SMOKE, "--executor", "local", "--out", str(out), *TINY,
            "--set", f"data.cache_dir={cache_dir}", "--set", "tracking.enabled=false", *extra]
    return argv + (["--run-id", run_id] if run_id is not None and "--run-id" not in extra else [])


def run_stream(out: Path, cache_dir: str, *extra: str, run_id: Optional[str] = RUN_ID) -> int:
    return stream.main(stream_argv(out, cache_dir, *extra, run_id=run_id))


def tree_digest(folder: Path, skip: tuple[Path, ...] = ()) -> dict[str, str]:
    """Every entry under ``folder`` (files by content, folders and links by name) except those
    under ``skip``: what "untouched" means."""
    digest = {}
    for p in sorted(folder.rglob("*")):
        if any(p == s or s in p.parents for s in skip):
            continue
        content = p.read_bytes() if p.is_file() and not p.is_symlink() else b"<dir or link>"
        digest[p.relative_to(folder).as_posix()] = hashlib.sha256(content).hexdigest()
    return digest


def run_outputs(out: Path) -> dict[str, str]:
    """The digest of what a run computed: every state tensor file, state description and prediction."""
    run = out / RUN_ID
    return {p.relative_to(run).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.name in ("state.safetensors", "state.json", "predictions.jsonl")}


def done_stages(out: Path) -> list[str]:
    """``task_<t>/<stage>`` of every stage whose marker the ledger accepts, in stream order."""
    from cram_ray.pipeline.ledger import STAGES, Ledger

    ledger = Ledger(Storage(str(out)), RUN_ID)
    return [f"task_{t}/{s}" for t in range(3) for s in STAGES if ledger.verify(t, s) is not None]


def one_error_line(err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err and "\x1b" not in err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def probe_chmod_blocks(folder: Path) -> bool:
    """Whether taking the write bit off ``folder`` stops this user writing in it (not for root)."""
    folder.chmod(0o555)
    try:
        (folder / ".probe").write_bytes(b"")
    except PermissionError:
        return True
    finally:
        folder.chmod(0o755)
    (folder / ".probe").unlink()
    return False


class FailingDisk:
    """From its ``at``-th write under ``root`` on (counted over copies, atomic writes and Path writes),
    every write and removal raises ``OSError(code)`` -- a disk that filled up or went read-only
    mid-run -- or, with ``code=None``, the ``at``-th write is interrupted (Ctrl-C). The interrupted
    copy leaves half a file behind, as a real one does."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, root: Path, at: int, code: Optional[int]) -> None:
        self.root, self.at, self.code, self.writes = root, at, code, 0
        real_copy2, real_fsync = shutil.copy2, os.fsync
        real_write_text, real_remove = pathlib.Path.write_text, Storage.remove

        def copy2(src, dst, **kw):
            self._tick(dst, lambda: Path(dst).write_bytes(Path(src).read_bytes()[:100]))
            return real_copy2(src, dst, **kw)

        def fsync(fd):
            self._tick(os.readlink(f"/proc/self/fd/{fd}"))
            return real_fsync(fd)

        def write_text(path, *args, **kw):
            self._tick(path)
            return real_write_text(path, *args, **kw)

        def remove(storage, rel):
            if self.failed and self.code is not None:
                raise OSError(self.code, os.strerror(self.code), storage.path(rel))
            return real_remove(storage, rel)

        monkeypatch.setattr(shutil, "copy2", copy2)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(pathlib.Path, "write_text", write_text)
        monkeypatch.setattr(Storage, "remove", remove)

    @property
    def failed(self) -> bool:
        return self.writes >= self.at

    def _tick(self, path, partial=None) -> None:
        if self.root not in Path(path).parents:
            return
        self.writes += 1
        if not self.failed or (self.code is None and self.writes > self.at):
            return
        if partial is not None:
            partial()
        if self.code is None:
            raise KeyboardInterrupt
        raise OSError(self.code, os.strerror(self.code), str(path))


ENOSPC, EROFS, EACCES = errno.ENOSPC, errno.EROFS, errno.EACCES


def summary_of(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())
