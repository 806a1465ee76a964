"""The stream ingest on a real streaming_split: equal batches per rank, the task's data once per epoch,
the same sequence on a second run."""
import threading

import numpy as np
import pytest

from cram_ray.train.ingest import Phase, ShardStream, StreamPlan

pytestmark = pytest.mark.ray

N, WORLD, BATCH, STEPS = 29, 2, 6, 11


def _rows():
    return [{"prompt_ids": np.arange(1 + i % 4), "target_ids": np.array([i]), "pixel_values": np.zeros((3, 2, 2), np.float32),
             "task_index": 0, "has_image": True, "instruction": f"r{i}"} for i in range(N)]


def _draw(ray):
    """Every rank's instruction ids, step by step, as two Train workers would draw them."""
    from ray.data import ExecutionOptions

    plan = StreamPlan.build(n=N, batch_size=BATCH, world_size=WORLD, seed=3, task=0, mode="stream",
                            phases=[Phase("probe", 2, "probe"), Phase("train", STEPS - 2, "train")])
    ds = ray.data.from_items(_rows(), override_num_blocks=5)
    ds.context.execution_options = ExecutionOptions(preserve_order=True)
    splits = ds.streaming_split(WORLD, equal=True)
    drawn = [[] for _ in range(WORLD)]

    def consume(rank):
        stream = ShardStream(splits[rank], plan, rank, pad_id=0, pixel_dtype=None)
        for phase, steps in ((0, 2), (1, STEPS - 2)):
            for step in range(steps):
                (batch,) = stream.take(phase, step)
                drawn[rank].append(batch["instruction"])

    threads = [threading.Thread(target=consume, args=(r,)) for r in range(WORLD)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return plan, drawn


def test_each_epoch_splits_the_data_equally_without_repeats_and_reruns_identically(ray_cluster):
    plan, drawn = _draw(ray_cluster)
    per_epoch = plan.batches_per_epoch(plan.world_size)
    assert per_epoch == 4 and all(len(d) == STEPS for d in drawn)
    for epoch in range(2):
        got = [s for rank in drawn for batch in rank[epoch * per_epoch:(epoch + 1) * per_epoch] for s in batch]
        assert len(got) == len(set(got)) == WORLD * per_epoch * plan.micro(WORLD)  # N - 5 rows: full batches only
        assert set(got) <= {f"r{i}" for i in range(N)}
        # each rank draws from its own share of the rows
        assert not set(sum(drawn[0][:per_epoch], [])) & set(sum(drawn[1][:per_epoch], []))
    assert drawn[0][:per_epoch] != drawn[0][per_epoch:2 * per_epoch]  # reshuffled per epoch
    _, again = _draw(ray_cluster)
    assert again == drawn
