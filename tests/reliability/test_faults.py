"""Faults during a stream: each ends in one line (or an interrupt), leaves no stage marked done that
is not, and the rerun of the same command continues where it stopped and ends bit-identical to
an undisturbed run (state tensors, their descriptions, predictions)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from reliability_util import (EACCES, ENOSPC, EROFS, RUN_ID, FailingDisk, done_stages, one_error_line,
                              probe_chmod_blocks, run_outputs, run_stream, summary_of, tree_digest)

import cram_ray.config as config

ALL_STAGES = [f"task_{t}/{s}" for t in range(3) for s in ("probe", "allocate", "train", "aggregate", "evaluate")]

# (at which write the disk fails, errno or None for Ctrl-C, what that write is in the smoke stream)
DISK_FAULTS = {
    "disk full at the run's data marker": (4, ENOSPC),
    "disk full copying task_0/train's state": (12, ENOSPC),
    "disk goes read-only at task_1/allocate's marker": (24, EROFS),
    "permission lost copying task_2's predictions": (45, EACCES),
    "disk full writing summary.json": (47, ENOSPC),
    "interrupted (Ctrl-C) copying task_1/train's state": (26, None),
}
ADVICE = {ENOSPC: "no space left on the device", EROFS: "read-only file system", EACCES: "permission denied"}


def _resume_matches_reference(out: Path, reference: Path, cache_dir: str, capsys, before: list[str]) -> None:
    """Rerun the same command: exit 0, only the stages after ``before`` (those kept) run, outputs
    as the reference's."""
    assert before == ALL_STAGES[:len(before)], "the stages kept are a prefix of the stream"
    capsys.readouterr()
    assert run_stream(out, cache_dir) == 0, capsys.readouterr().err
    summary = summary_of(out)
    assert summary["stages_run"] == ALL_STAGES[len(before):]
    assert summary["accuracy_matrix"] == summary_of(reference)["accuracy_matrix"]
    assert run_outputs(out) == run_outputs(reference)
    assert not list(out.rglob(".tmp-*")), "a half-written file was left behind"


@pytest.mark.parametrize("case", list(DISK_FAULTS))
def test_a_failing_disk_stops_in_one_line_and_the_rerun_continues(case, reference, cache_dir, tmp_path,
                                                                   monkeypatch, capsys):
    at, code = DISK_FAULTS[case]
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        disk = FailingDisk(patch, out, at, code)
        if code is None:
            with pytest.raises(KeyboardInterrupt):
                run_stream(out, cache_dir)
        else:
            assert run_stream(out, cache_dir) == 2
            line = one_error_line(capsys.readouterr().err, ADVICE[code], "rerun the same command")
            assert str(out) in line, "the line names a path under --out"
        assert disk.failed
    before = done_stages(out)
    _resume_matches_reference(out, reference, cache_dir, capsys, before)


def test_a_read_only_out_found_at_the_start_is_one_line(finished_run, cache_dir, monkeypatch, capsys):
    """chmod takes the write bit off --out; as root (which chmod does not stop) os.access is told so."""
    before = tree_digest(finished_run.parent)
    if not probe_chmod_blocks(finished_run):
        real = config.os.access
        monkeypatch.setattr(config.os, "access",
                            lambda p, mode, *a, **k: False if Path(p) == finished_run else real(p, mode, *a, **k))
    finished_run.chmod(0o555)
    try:
        assert run_stream(finished_run, cache_dir) == 2
    finally:
        finished_run.chmod(0o755)
    one_error_line(capsys.readouterr().err, "storage", str(finished_run), "not writable")
    assert tree_digest(finished_run.parent) == before


@pytest.mark.parametrize("where, kept", [("summary.json", ALL_STAGES),
                                         (f"{RUN_ID}/task_2/train/_DONE.json", ALL_STAGES[:12])])
def test_a_directory_where_a_file_belongs_is_one_line_then_resumes(where, kept, reference, cache_dir, tmp_path,
                                                                    capsys):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / where).unlink()
    (out / where / "x").mkdir(parents=True)
    assert run_stream(out, cache_dir) == 2
    one_error_line(capsys.readouterr().err, str(out / where), "a directory stands where a file is expected")
    shutil.rmtree(out / where)
    _resume_matches_reference(out, reference, cache_dir, capsys, kept)


def _wrong_shape(marker: Path) -> None:
    marker.write_text(json.dumps([json.loads(marker.read_text())]))


def _edited_metric(marker: Path) -> None:
    content = json.loads(marker.read_text())
    content["result"]["metrics"]["row"] = [100.0, 100.0]
    marker.write_text(json.dumps(content))


def _truncated_state(marker: Path) -> None:
    state = marker.parent / "state.safetensors"
    state.write_bytes(state.read_bytes()[:-7])


def _deep_json(marker: Path) -> None:
    marker.write_text("[" * 100_000 + "]" * 100_000)


LEDGER_FAULTS = {
    # name: (stage whose marker is hit, edit); late in the stream, so the rerun is short
    "a _DONE.json of the wrong shape": ("task_2/train", _wrong_shape),
    "a metric edited inside _DONE.json": ("task_2/evaluate", _edited_metric),
    "a _DONE.json nested 100,000 deep": ("task_2/aggregate", _deep_json),
    "a truncated state file": ("task_2/probe", _truncated_state),
}


@pytest.mark.parametrize("case", list(LEDGER_FAULTS))
def test_a_damaged_ledger_reruns_from_the_damage_on(case, reference, cache_dir, tmp_path, capsys):
    stage, edit = LEDGER_FAULTS[case]
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    edit(out / RUN_ID / stage / "_DONE.json")
    before = ALL_STAGES[:ALL_STAGES.index(stage)]
    assert done_stages(out) == [s for s in ALL_STAGES if s != stage]
    _resume_matches_reference(out, reference, cache_dir, capsys, before)


def test_a_run_stores_nothing_a_resume_would_unpickle(reference):
    """A resume reads back only safetensors, JSON and parquet: no file of the run is a pickle or a
    torch.save archive (zip), whatever its name."""
    kinds = {p.suffix or p.name for p in reference.rglob("*") if p.is_file()}
    assert kinds <= {".safetensors", ".json", ".jsonl", ".parquet", ".png", ".lock"}, kinds
    for path in reference.rglob("*"):
        if path.is_file():
            head = path.read_bytes()[:2]
            assert head[:1] != b"\x80" and head != b"PK", path
