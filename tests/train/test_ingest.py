"""The Ray Data ingest transforms, without Ray: same batch order and same batches as the local stages."""
import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from cram_ray.config import ModelConfig, StreamConfig
from cram_ray.data.records import DataError, Record
from cram_ray.data.shards import records_table
from cram_ray.models.tokenizer import CompactTokenizer
from cram_ray.models.vlm import compact_processor
from cram_ray.train.ingest import (
    Phase,
    StreamPlan,
    collate_train,
    encode_rows,
    expand_rows,
    positions_of,
    records_of,
    select_rank,
)


def _records(n):
    rng = np.random.default_rng(0)
    from io import BytesIO

    from PIL import Image

    out = []
    for i in range(n):
        buf = BytesIO()
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
        image = None if i % 5 == 4 else buf.getvalue()
        out.append(Record(f"r{i}", "toy", image, f"what is {i % 3} plus {'one ' * (i % 4)}?", f"{i % 7}", "exact"))
    return out


def _processor():
    from cram_ray.config import BuiltinBenchmarkConfig, DataConfig

    cfg = StreamConfig(model=ModelConfig(image_size=16, patch_size=8, vision_hidden=16, vision_heads=2,
                                         text_hidden=16, text_heads=2),
                       data=DataConfig(builtin=BuiltinBenchmarkConfig(image_size=16)))
    recs = _records(20)
    tok = CompactTokenizer.build([f"{r.instruction} {r.answer}" for r in recs])
    return compact_processor(cfg.model, cfg.data, tok)


def _local_order(plan, phase):
    """What stages.train_stream yields: epoch after epoch of epoch_order (the function both
    executors draw from), cut to the phase's steps."""
    from cram_ray.train.ingest import epoch_order

    bs = plan.batch_size
    out = []
    epoch = 0
    while len(out) < phase.steps * bs:
        order = epoch_order(plan.seed, plan.task, epoch, plan.n, bs, phase.salt)
        assert len(order) % bs == 0 and len(set(order.tolist())) == len(order)  # full batches, no repeats
        out.extend(order.tolist())
        epoch += 1
    return out[: phase.steps * bs]


def test_probe_and_train_draw_different_orders():
    from cram_ray.train.ingest import epoch_order

    probe, train = epoch_order(0, 1, 0, 50, 5, "probe"), epoch_order(0, 1, 0, 50, 5, "train")
    assert sorted(probe.tolist()) == sorted(train.tolist()) and probe.tolist() != train.tolist()
    assert epoch_order(0, 1, 0, 50, 5, "probe").tolist() == probe.tolist()  # seeded: same inputs, same order


def test_plan_reproduces_the_local_stream_for_each_phase():
    phases = [Phase("probe", 3, "probe"), Phase("train", 9, "train")]
    plan = StreamPlan.build(n=21, batch_size=4, world_size=2, seed=7, task=2, phases=phases)
    pos, seq = plan.assignments()
    by_seq = pos[np.argsort(seq)].tolist()
    assert by_seq == _local_order(plan, phases[0]) + _local_order(plan, phases[1])
    cols = plan.columns_for(np.arange(len(seq)))
    assert cols["phase"].tolist() == [0] * 12 + [1] * 36
    assert cols["step"].tolist()[:12] == [0] * 4 + [1] * 4 + [2] * 4
    assert cols["slot"].tolist()[:8] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert cols["shared"].tolist() == [0] * 48


def test_batch_is_capped_at_the_split_size_and_must_split_over_workers():
    assert StreamPlan.build(n=6, batch_size=8, world_size=1, seed=0, task=0, phases=[]).batch_size == 6
    with pytest.raises(DataError, match="does not split"):
        StreamPlan.build(n=50, batch_size=6, world_size=4, seed=0, task=0, phases=[])


def test_expand_then_sort_then_rank_split_gives_each_rank_its_share_of_every_batch():
    recs = _records(13)
    plan = StreamPlan.build(n=13, batch_size=4, world_size=2, seed=1, task=0,
                            phases=[Phase("probe", 2, "probe"), Phase("train", 5, "train")])
    positions = positions_of([r.id for r in recs], "test")
    table = records_table(recs)
    parts = [expand_rows(table.slice(0, 6), plan.to_json(), positions),
             expand_rows(table.slice(6), plan.to_json(), positions)]  # two read blocks
    rows = pa.concat_tables(parts).sort_by("seq")
    assert rows.column("seq").to_pylist() == list(range(7 * 4))
    pos, seq = plan.assignments()
    expected_ids = [recs[p].id for p in pos[np.argsort(seq)]]
    assert rows.column("id").to_pylist() == expected_ids
    r0, r1 = select_rank(rows, 0, plan.micro(2)), select_rank(rows, 1, plan.micro(2))
    assert r0.num_rows == r1.num_rows == 14
    # rank 0 holds the first half of every global batch, rank 1 the second
    assert r0.column("id").to_pylist()[:2] + r1.column("id").to_pylist()[:2] == expected_ids[:4]
    # an elastic restart on one worker: the same rows, the whole batch on rank 0, in stream order
    assert select_rank(rows, 0, plan.micro(1)).column("id").to_pylist() == expected_ids


def test_shared_phase_rows_reach_every_rank():
    recs = _records(9)
    plan = StreamPlan.build(n=9, batch_size=4, world_size=2, seed=1, task=0,
                            phases=[Phase("probe", 2, "probe", shared=True), Phase("train", 3, "train")])
    rows = expand_rows(records_table(recs), plan.to_json(), positions_of([r.id for r in recs], "t")).sort_by("seq")
    r0, r1 = select_rank(rows, 0, plan.micro(2)), select_rank(rows, 1, plan.micro(2))
    assert r0.column("seq").to_pylist()[:8] == r1.column("seq").to_pylist()[:8] == list(range(8))
    assert r0.num_rows == r1.num_rows == 8 + 6


def test_duplicate_ids_are_refused_with_the_id():
    with pytest.raises(DataError, match="'a'"):
        positions_of(["a", "b", "a"], "task x")


def test_encode_then_collate_equals_the_processor_train_batch():
    proc = _processor()
    recs = _records(7)
    table = records_table(recs)
    batch = {k: np.array(table.column(k).to_pylist(), dtype=object) for k in table.column_names}
    source = json.dumps({"settings": proc.settings()}, sort_keys=True)
    encoded = encode_rows(batch, source, task=3)
    got = collate_train(encoded, pad_id=proc.text.pad_id)
    want = proc.train_batch(recs, [3] * len(recs))
    assert set(got) == set(want)
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == got[key].dtype and torch.equal(value, got[key]), key
        else:
            assert value == got[key], key
    # a micro-batch of the same rows pads to its own longest sample, as a smaller local batch would
    part = {k: v[2:5] for k, v in encoded.items()}
    assert torch.equal(collate_train(part, pad_id=proc.text.pad_id)["input_ids"],
                       proc.train_batch(recs[2:5], [3] * 3)["input_ids"])


def test_stream_plan_addresses_steps_across_epochs_and_phases():
    plan = StreamPlan.build(n=29, batch_size=6, world_size=2, seed=0, task=1, mode="stream",
                            phases=[Phase("probe", 2, "probe"), Phase("train", 9, "train")])
    assert plan.micro(2) == 3 and plan.batches_per_epoch(2) == 14 // 3  # each rank holds 29 // 2 rows
    assert [plan.step_index(0, s) for s in range(2)] + [plan.step_index(1, s) for s in range(9)] == list(range(11))
    assert plan.shuffle_rows() == 14  # unbounded buffer: the rank's whole share
    assert StreamPlan.from_json(plan.to_json()) == plan
    seeds = {plan.shuffle_seed(e, r) for e in range(3) for r in range(2)}
    assert len(seeds) == 6 and plan.shuffle_seed(2, 1) == StreamPlan.from_json(plan.to_json()).shuffle_seed(2, 1)


def test_merged_micro_batches_equal_the_collated_rows_of_the_whole_batch():
    from cram_ray.train.ingest import merge_collated

    proc = _processor()
    recs = _records(9)
    table = records_table(recs)
    batch = {k: np.array(table.column(k).to_pylist(), dtype=object) for k in table.column_names}
    encoded = encode_rows(batch, json.dumps({"settings": proc.settings()}, sort_keys=True), task=0)
    parts = [collate_train({k: v[a:b] for k, v in encoded.items()}, pad_id=proc.text.pad_id)
             for a, b in ((0, 3), (3, 6), (6, 9))]
    assert len({p["input_ids"].shape[1] for p in parts}) > 1  # the parts were padded differently
    got, want = merge_collated(parts, pad_id=proc.text.pad_id), collate_train(encoded, pad_id=proc.text.pad_id)
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.equal(value, got[key]) if isinstance(value, torch.Tensor) else value == got[key], key


def test_null_cells_of_any_float_width_read_as_missing():
    """An all-null column reaches a numpy batch as NaNs; Ray Data gives float32 ones, which are
    not Python floats."""
    batch = {"id": np.array(["a", "b"], dtype=object), "task": np.array(["t", "t"], dtype=object),
             "image": np.array([np.float32("nan"), b"\x89PNG"], dtype=object),
             "instruction": np.array(["q", "q"], dtype=object), "answer": np.array(["x", "y"], dtype=object),
             "metric": np.array(["exact", "exact"], dtype=object),
             "answers": np.array([np.float32("nan"), np.array(["y", "z"], dtype=object)], dtype=object)}
    first, second = records_of(batch)
    assert first.image is None and first.answers is None
    assert second.image == b"\x89PNG" and second.answers == ("y", "z")
