"""The ledger is the only truth about progress: markers verify checksums and are written last."""
import json

import pytest

from cram_ray.pipeline.ledger import MARKER, Ledger, StageResult, Storage


def _stage_dir(tmp_path, files):
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    for name, data in files.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_bytes(data)
    return work


def test_commit_then_verify_roundtrips_result(tmp_path):
    ledger = Ledger(Storage(str(tmp_path / "store")), "run1")
    work = _stage_dir(tmp_path, {"state.safetensors": b"abc", "sub/p.jsonl": b"{}\n"})
    result = StageResult("train", 3, {"loss": {"ce": 0.5}}, seconds=2.0, startup_seconds=0.5)
    ledger.commit(result, work)
    assert (tmp_path / "store/run1/task_3/train/sub/p.jsonl").read_bytes() == b"{}\n"
    assert ledger.verify(3, "train") == result
    assert ledger.verify(3, "evaluate") is None


def test_corrupted_or_missing_output_invalidates(tmp_path):
    ledger = Ledger(Storage(str(tmp_path / "store")), "run1")
    ledger.commit(StageResult("probe", 0), _stage_dir(tmp_path, {"a.bin": b"123"}))
    target = tmp_path / "store/run1/task_0/probe/a.bin"
    target.write_bytes(b"124")
    assert ledger.verify(0, "probe") is None
    target.unlink()
    assert ledger.verify(0, "probe") is None


def test_truncated_marker_is_not_done(tmp_path):
    ledger = Ledger(Storage(str(tmp_path / "store")), "run1")
    ledger.commit(StageResult("probe", 0), _stage_dir(tmp_path, {"a.bin": b"1"}))
    marker = tmp_path / "store/run1/task_0/probe" / MARKER
    marker.write_text(marker.read_text()[:10])
    assert ledger.verify(0, "probe") is None


def test_invalidate_removes_only_the_marker(tmp_path):
    ledger = Ledger(Storage(str(tmp_path / "store")), "r")
    ledger.commit(StageResult("allocate", 1), _stage_dir(tmp_path, {"a.bin": b"1"}))
    ledger.invalidate(1, "allocate")
    assert ledger.verify(1, "allocate") is None
    assert (tmp_path / "store/r/task_1/allocate/a.bin").exists()


def test_run_wide_stage_lives_at_run_root(tmp_path):
    ledger = Ledger(Storage(str(tmp_path / "store")), "r")
    ledger.commit(StageResult("data", -1, {"tasks": []}), _stage_dir(tmp_path, {"index.json": b"[]"}))
    marker = json.loads((tmp_path / "store/r/data" / MARKER).read_text())
    assert marker["files"] and ledger.verify(-1, "data").metrics == {"tasks": []}


def test_storage_accepts_file_uri(tmp_path):
    storage = Storage(f"file://{tmp_path}/s")
    storage.write_bytes_atomic("x/y.txt", b"hi")
    assert storage.read_bytes("x/y.txt") == b"hi" and storage.exists("x")


def test_default_run_id_follows_the_config_and_the_base_version(monkeypatch):
    import cram_ray.models.base as base_module
    from cram_ray.config import StreamConfig
    from cram_ray.pipeline.driver import default_run_id

    cfg = StreamConfig()
    first = default_run_id(cfg)
    assert first == default_run_id(StreamConfig()) and first.startswith(cfg.method.name + "-")
    assert default_run_id(cfg.replace(**{"train.lr": cfg.train.lr * 2})) != first
    # where and how a stream runs is not what it computes: the same run, resumable on either
    elsewhere = {"storage": "s3://bucket/runs", "train.executor": "ray", "train.run_span": "task",
                 "train.max_failures": 5, "tracking.enabled": False}
    assert default_run_id(cfg.replace(**elsewhere)) == first
    monkeypatch.setattr(base_module, "BASE_VERSION", base_module.BASE_VERSION + 1)
    assert default_run_id(cfg) != first  # a stream on a retrained base is a new run, never a resume


def _committed(tmp_path):
    ledger = Ledger(Storage(str(tmp_path / "store")), "r")
    ledger.commit(StageResult("evaluate", 2, {"row": [50.0, 60.0]}), _stage_dir(tmp_path, {"p.jsonl": b"{}\n"}))
    return ledger, tmp_path / "store/r/task_2/evaluate" / MARKER


def test_an_edited_result_in_a_marker_is_detected(tmp_path):
    ledger, path = _committed(tmp_path)
    marker = json.loads(path.read_text())
    marker["result"]["metrics"]["row"] = [50.0, 99.0]  # a forged score, valid JSON
    path.write_text(json.dumps(marker))
    assert ledger.verify(2, "evaluate") is None


def test_an_edited_file_list_in_a_marker_is_detected(tmp_path):
    ledger, path = _committed(tmp_path)
    marker = json.loads(path.read_text())
    marker["files"] = {}  # drop the checksum of p.jsonl so a changed file would pass
    path.write_text(json.dumps(marker))
    assert ledger.verify(2, "evaluate") is None


@pytest.mark.parametrize("content", [
    "[]", "null", "1", '"done"', '{"files": [], "result": {}}',
    '{"files": {}, "result": {"stage": "evaluate", "task": 2}}',  # no digest
    '{"files": {"a": 1}, "result": {"stage": "evaluate", "task": 2}, "digest": "x"}',
    "[" * 100_000 + "]" * 100_000,  # nested deeper than the JSON parser recurses
])
def test_a_marker_of_the_wrong_shape_means_not_done(tmp_path, content):
    ledger, path = _committed(tmp_path)
    path.write_text(content)
    assert ledger.verify(2, "evaluate") is None


def test_a_marker_moved_to_another_stage_is_not_taken(tmp_path):
    ledger, path = _committed(tmp_path)
    other = tmp_path / "store/r/task_1/evaluate"
    other.mkdir(parents=True)
    (other / MARKER).write_text(path.read_text())
    assert ledger.verify(1, "evaluate") is None
