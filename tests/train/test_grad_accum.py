"""Gradient accumulation: micro-batches that add up to the batch give the batch's update."""
import pytest
import torch

from cram_ray.config import TrainConfig
from cram_ray.train.fit import engine_fit
from cram_ray.train.loop import fit_steps, split_batch
from cram_ray.train.zero import deepspeed_config

from toys import SurgeryMethod, ToyMethod, batches, make

STEPS = 6


def _train(**kw) -> TrainConfig:
    return TrainConfig(batch_size=8, lr=5e-2, warmup_ratio=0.25, weight_decay=0.01, **kw)


def _local(cls, accum: int):
    model, method = make(cls)
    tc = _train()
    fit_steps(model, method, iter(batches(STEPS)), STEPS, lr=tc.lr, warmup_ratio=tc.warmup_ratio,
              weight_decay=tc.weight_decay, log_every=0, grad_accum=accum)
    return [p.detach().clone() for p in method.trainable_parameters()]


def test_split_batch_cuts_per_sample_values_only():
    batch = {"input_ids": torch.arange(5), "instruction": list("abcde"), "scale": 3.0}
    parts = split_batch(batch, 2)
    assert [p["input_ids"].tolist() for p in parts] == [[0, 1], [2, 3, 4]]
    assert [p["instruction"] for p in parts] == [["a", "b"], ["c", "d", "e"]]
    assert all(p["scale"] == 3.0 for p in parts)
    assert split_batch(batch, 1) == [batch]


@pytest.mark.parametrize("cls", [ToyMethod, SurgeryMethod], ids=["plain", "surgery"])
def test_local_accumulation_equals_the_whole_batch(cls):
    # the toy loss is a per-sample mean, so equal micro-batches give the same mean gradient
    for a, b in zip(_local(cls, 1), _local(cls, 4)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [ToyMethod, SurgeryMethod], ids=["plain", "surgery"])
@pytest.mark.parametrize("stage", [-1, 0, 2])
def test_engine_accumulation_equals_the_local_loop(process_group, stage, cls):
    expected = _local(cls, 2)
    model, method = make(cls)
    engine_fit(model, method, iter(batches(STEPS)), STEPS, _train(zero_stage=stage, grad_accum=2), log_every=0)
    for a, b in zip(expected, method.trainable_parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


def test_deepspeed_config_states_the_accumulation():
    cfg = deepspeed_config(_train(zero_stage=2, grad_accum=2, num_workers=2), world_size=2, bucket_elements=1000)
    assert cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == 2
    assert cfg["train_batch_size"] == 8
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 1000
