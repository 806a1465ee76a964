"""aggregate and evaluate split over Train ranks give the in-process stages' outputs (no Ray).

Two ranks are played in turn in this process: rank 1 computes its share and hands it to the
collective, then rank 0 computes its own and receives both in rank order, as ``gather_object``
delivers them.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cram_ray.config import load_config
from cram_ray.data.records import Record
from cram_ray.data.shards import read_shards, write_shards
from cram_ray.pipeline.context import StageContext, runtime
from cram_ray.pipeline.driver import execute_stage, prepare_data
from cram_ray.pipeline.ledger import STAGES, Storage
from cram_ray.pipeline.stages import batches_of, restore, save_state
from cram_ray.train import warm_eval
from cram_ray.train.ingest import read_rows, shard_paths

SMOKE = Path(__file__).resolve().parents[2] / "workflows/configs/smoke.yaml"


@pytest.mark.parametrize("sizes,bs", [([10], 4), ([16, 5, 3], 4), ([7, 8], 16)])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_shares_concatenate_to_the_in_process_batches(sizes, bs, world):
    spans = warm_eval.batch_spans(sizes, bs)
    assert [s for r in range(world) for s in warm_eval.share(spans, r, world)] == spans
    for k, n in enumerate(sizes):
        expected = [list(b) for b in batches_of(list(range(n)), bs, np.arange(n))]
        assert [list(range(a, b)) for split, a, b in spans if split == k] == expected


def test_read_rows_is_a_slice_of_read_shards(tmp_path):
    records = [Record(f"r{i}", "t", None, f"q{i}", f"a{i}", "exact") for i in range(10)]
    write_shards(records, tmp_path / "split", rows_per_shard=3)
    storage = Storage(str(tmp_path))
    paths = shard_paths(storage, "split")
    everything = read_shards(tmp_path / "split")
    for start, stop in [(0, 10), (2, 8), (3, 6), (9, 10), (4, 4)]:
        assert read_rows(storage, paths, start, stop) == everything[start:stop]


@pytest.fixture(scope="module")
def local_task(tmp_path_factory, cache_dir):
    """One smoke task run in process, every stage committed (the reference outputs)."""
    storage = tmp_path_factory.mktemp("warm")
    cfg = load_config(SMOKE, [f"storage={storage}", f"data.cache_dir={cache_dir}", "tracking.enabled=false",
                              "data.builtin.tasks=[count]", "train.eval_batch_size=5"])
    ctx = StageContext(cfg, "w", prepare_data(cfg, "w"))
    results = {stage: execute_stage(ctx, 0, stage) for stage in STAGES}
    return ctx, results


def _two_ranks(monkeypatch, run_rank):
    """run_rank(rank, world_size) for rank 1, then rank 0; rank 0's return value."""
    handed = []

    def gather_rank1(value):
        handed.append(value)
        return None

    monkeypatch.setattr(warm_eval, "gather_to_first", gather_rank1)
    assert run_rank(1, 2) is None
    monkeypatch.setattr(warm_eval, "gather_to_first", lambda value: [value, *handed])
    return run_rank(0, 2)


def test_aggregate_over_two_ranks_equals_the_in_process_stage(local_task, monkeypatch, tmp_path):
    ctx, results = local_task
    rt = runtime(ctx)

    def run_rank(rank, world):
        _, method = restore(ctx, 0, "aggregate", rt, tmp_path / f"r{rank}")
        report = warm_eval.aggregate_on_workers(ctx, 0, rt, method, rank=rank, world_size=world,
                                                threads=torch.get_num_threads())
        if report is not None:
            save_state(method, tmp_path)
        return report

    report = _two_ranks(monkeypatch, run_rank)
    reference = results["aggregate"].metrics
    assert report["params_added"] == reference["params_added"] and report["ranks"] == reference["ranks"]
    local = ctx.storage.local_path(ctx.ledger.rel(0, "aggregate"))
    assert json.loads((tmp_path / "state.json").read_text()) == json.loads((local / "state.json").read_text())
    ours, theirs = load_file(str(tmp_path / "state.safetensors")), load_file(str(local / "state.safetensors"))
    assert ours.keys() == theirs.keys()
    for k in ours:  # merged partial sums: equal up to float rounding
        assert torch.allclose(ours[k], theirs[k], rtol=1e-5, atol=1e-6), k


def test_evaluate_over_two_ranks_writes_the_in_process_predictions(local_task, monkeypatch, tmp_path):
    ctx, results = local_task
    rt = runtime(ctx)

    def run_rank(rank, world):
        model, method = restore(ctx, 0, "evaluate", rt, tmp_path / f"r{rank}")
        return warm_eval.evaluate_on_workers(ctx, 0, rt, model, method, rank=rank, world_size=world,
                                             device=torch.device("cpu"), workdir=tmp_path,
                                             before_batch=lambda k: None)

    report = _two_ranks(monkeypatch, run_rank)
    assert report == results["evaluate"].metrics
    local = ctx.storage.local_path(ctx.ledger.rel(0, "evaluate"))
    assert (tmp_path / "predictions.jsonl").read_bytes() == (local / "predictions.jsonl").read_bytes()
