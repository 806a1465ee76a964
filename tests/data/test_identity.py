"""Content identity and the stream's data stage: prepared once per content, shared by runs; a
resumed run refuses a changed benchmark or config with one line."""
from __future__ import annotations

import shutil

import pytest
from data_testutil import turn

import cram_ray.data.identity as identity_mod
from cram_ray.config import ConfigError, StreamConfig
from cram_ray.data.identity import identify
from cram_ray.data.manifest import load_benchmark
from cram_ray.data.records import DataError
from cram_ray.pipeline.context import StageContext, task_records
from cram_ray.pipeline.driver import default_run_id, prepare_data


def _cfg(manifest, tmp_path, **extra) -> StreamConfig:
    return StreamConfig().replace(**{"data.benchmark": str(manifest), "storage": str(tmp_path / "storage"),
                                     "data.cache_dir": str(tmp_path / "cache"), **extra})


def test_hash_follows_content_not_location(bench, tmp_path):
    first = identify(load_benchmark(bench.write()), None)
    moved = shutil.copytree(bench.root, tmp_path / "elsewhere")
    assert identify(load_benchmark(moved / "bench.yaml"), None).hash == first.hash
    (moved / "imgs" / "c.png").write_bytes(bench.images["a.png"])  # one image changes
    changed = identify(load_benchmark(moved / "bench.yaml"), None)
    assert changed.hash != first.hash
    assert changed.first_difference(first.files) == str((moved / "imgs" / "c.png").resolve())


def test_the_index_rehashes_only_changed_files(bench, tmp_path, monkeypatch):
    bench_data = load_benchmark(bench.write())
    index = tmp_path / "index"
    hashed: list[str] = []
    real = identity_mod.sha256_file
    monkeypatch.setattr(identity_mod, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    first = identify(bench_data, index)
    assert len(hashed) == 1 + 4 + 3  # manifest, four JSON files, three images
    hashed.clear()
    assert identify(bench_data, index) == first and hashed == []
    (bench.root / "imgs" / "a.png").write_bytes(bench.images["c.png"] + b"\0")
    assert identify(bench_data, index).hash != first.hash and hashed == ["a.png"]


def test_runs_on_the_same_content_share_one_prepared_dataset(bench, tmp_path, capsys):
    cfg = _cfg(bench.write(), tmp_path)
    metas = prepare_data(cfg, "run-a")
    assert "records prepared as shards" in capsys.readouterr().out
    dataset = tmp_path / "storage" / metas[0].dataset
    files = {p: p.stat().st_mtime_ns for p in dataset.rglob("*")}
    again = prepare_data(cfg.replace(**{"method.name": "lora_ft"}), "run-b")
    assert again == metas
    assert f"shards {metas[0].dataset.rsplit('/', 1)[1]} found, nothing to prepare" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in dataset.rglob("*")} == files
    assert sorted(p.name for p in (tmp_path / "storage").iterdir()) == ["datasets", "run-a", "run-b"]
    ctx = StageContext(cfg, "run-b", again)
    assert ctx.shard_rel(1, "test") == f"{metas[0].dataset}/letter/test"
    assert task_records(ctx, 0, "train") == load_benchmark(cfg.data.benchmark).tasks[0].records("train")


def test_a_changed_benchmark_under_the_same_run_id_fails_naming_the_file(bench, tmp_path):
    cfg = _cfg(bench.write(), tmp_path)
    first = default_run_id(cfg)
    before = prepare_data(cfg, "run-a")
    bench.json["json/letter_test.json"][0]["conversations"] = turn("Pick one. (A) red (B) blue", "A")
    bench.write()
    with pytest.raises(DataError) as info:
        prepare_data(cfg, "run-a")
    assert str(info.value) == (f"benchmark changed since this run started: {bench.root / 'json/letter_test.json'}; "
                               "use a new --run-id or --restart")
    assert default_run_id(cfg) != first  # the default run id follows the content: a new run, never a stale one
    restarted = prepare_data(cfg, "run-a", restart=True)
    assert restarted[0].dataset != before[0].dataset
    assert prepare_data(cfg, "run-a") == restarted  # the restart recorded the new content


def test_an_added_task_is_a_changed_benchmark(bench, tmp_path):
    cfg = _cfg(bench.write(), tmp_path)
    prepare_data(cfg, "run-a")
    bench.manifest["tasks"].append({"name": "again", "train": "json/letter_train.json",
                                    "test": "json/letter_test.json", "metric": "exact"})
    bench.write()
    with pytest.raises(DataError, match="benchmark changed since this run started: .*bench.yaml; use a new"):
        prepare_data(cfg, "run-a")


def test_a_changed_config_under_the_same_run_id_names_the_key(bench, tmp_path):
    cfg = _cfg(bench.write(), tmp_path)
    prepare_data(cfg, "run-a")
    with pytest.raises(ConfigError, match=r"config changed since this run started: train.lr was 0.002, now 0.004"):
        prepare_data(cfg.replace(**{"train.lr": 0.004}), "run-a")
    prepare_data(cfg.replace(**{"train.executor": "local", "tracking.enabled": False}), "run-a")  # where, not what
