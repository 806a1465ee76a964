"""A Train worker's view of its rows (no Ray): steps addressed in order, resumable, shared probe batches."""
import numpy as np
import pytest

from cram_ray.config import TrainConfig
from cram_ray.pipeline.ray_cluster import local_cpus
from cram_ray.train.worker import PhaseBatches, RowStream


def _micro(phase, step, rows, start):
    return {"phase": np.full(rows, phase), "step": np.full(rows, step), "x": np.arange(start, start + rows)}


def _stream(shared_steps=2, train_steps=3, world=2, micro=2, rank=0):
    """What rank ``rank`` receives: whole global batches while shared, then its own share."""
    out, start = [], 0
    for step in range(shared_steps):
        for r in range(world):
            out.append(_micro(0, step, micro, start))
            start += micro
    for step in range(train_steps):
        out.append(_micro(1, step, micro, 100 + 10 * step + rank))
    return out


def test_phase_batches_train_on_the_ranks_share_and_observe_the_whole_batch():
    seen = []
    stream = RowStream(iter(_stream(rank=1)))
    probe = PhaseBatches(stream, 0, rank=1, shared=True, start=0, collate=lambda rows: {"x": rows["x"].tolist()},
                         features=lambda b: b)
    probe.observer = lambda b: seen.append(b["x"])
    assert [next(probe)["x"] for _ in range(2)] == [[2, 3], [6, 7]]
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7]]
    train = PhaseBatches(stream, 1, rank=1, shared=False, start=0, collate=lambda rows: {"x": rows["x"].tolist()},
                         features=lambda b: b)
    assert [next(train)["x"][0] for _ in range(3)] == [101, 111, 121]


def test_a_resumed_phase_skips_what_was_trained_and_earlier_phases():
    stream = RowStream(iter(_stream(world=1, rank=0)))
    train = PhaseBatches(stream, 1, rank=0, shared=False, start=2, collate=lambda rows: rows, features=lambda b: b)
    assert next(train)["x"][0] == 120
    with pytest.raises(RuntimeError, match="no rows for phase 1 step 3"):
        next(train)


def test_a_micro_batch_straddling_two_steps_is_an_error():
    bad = {"phase": np.array([0, 0]), "step": np.array([0, 1]), "x": np.arange(2)}
    with pytest.raises(RuntimeError, match="straddles"):
        RowStream(iter([bad])).take(0, 0)


def test_data_errors_surface_in_the_training_thread():
    def broken():
        yield _micro(0, 0, 2, 0)
        raise OSError("shard vanished")

    with pytest.raises(RuntimeError, match="reading the training data failed") as info:
        RowStream(broken()).take(0, 0)  # looking past step 0's rows meets the failure
    assert isinstance(info.value.__cause__, OSError)


def test_embedded_cluster_oversubscribes_logical_cpus():
    assert local_cpus(TrainConfig(num_workers=2, cpus_per_worker=1.0)) >= 4
    assert local_cpus(TrainConfig(num_workers=8, cpus_per_worker=1.0)) >= 10
