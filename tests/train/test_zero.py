"""The DeepSpeed config builder: stages, batch split, precision, optimiser and schedule."""
import math

import pytest
import torch

from cram_ray.config import ConfigError, TrainConfig
from cram_ray.train.loop import cosine_lambda
from cram_ray.train.zero import (
    deepspeed_config,
    micro_batch_size,
    optimizer_factory,
    schedule_factory,
    uses_deepspeed,
)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_stage_and_batch_split(stage):
    cfg = deepspeed_config(TrainConfig(zero_stage=stage, batch_size=16), world_size=4)
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["train_batch_size"] == 16 == cfg["train_micro_batch_size_per_gpu"] * 4 * cfg["gradient_accumulation_steps"]
    assert "optimizer" not in cfg and "scheduler" not in cfg  # the loop's own AdamW + schedule are passed in
    assert cfg["gradient_clipping"] == 0.0  # the in-process loop does not clip


def test_precision_fp32_on_cpu_bf16_only_on_gpu():
    cpu = deepspeed_config(TrainConfig(zero_stage=2), world_size=1, dtype="bfloat16")
    assert cpu["fp16"]["enabled"] is False and cpu["bf16"]["enabled"] is False
    gpu = deepspeed_config(TrainConfig(zero_stage=2, use_gpu=True), world_size=1, dtype="bfloat16")
    assert gpu["bf16"]["enabled"] is True and gpu["fp16"]["enabled"] is False
    gpu32 = deepspeed_config(TrainConfig(zero_stage=2, use_gpu=True), world_size=1, dtype="float32")
    assert gpu32["bf16"]["enabled"] is False


def test_optional_config_optimizer_uses_torch_adam_and_clipping():
    cfg = deepspeed_config(TrainConfig(zero_stage=1, lr=3e-4, weight_decay=0.1), world_size=1,
                           gradient_clipping=1.0, optimizer_in_config=True)
    assert cfg["optimizer"] == {"type": "AdamW", "params": {"lr": 3e-4, "weight_decay": 0.1, "torch_adam": True}}
    assert cfg["gradient_clipping"] == 1.0
    with pytest.raises(ConfigError):
        deepspeed_config(TrainConfig(zero_stage=1), world_size=1, gradient_clipping=-1.0)


def test_ddp_stage_has_no_deepspeed_config():
    train = TrainConfig(zero_stage=-1)
    assert not uses_deepspeed(train) and uses_deepspeed(TrainConfig(zero_stage=0))
    with pytest.raises(ConfigError, match="zero_stage=-1"):
        deepspeed_config(train, world_size=1)


def test_batch_must_split_evenly_over_workers():
    assert micro_batch_size(TrainConfig(batch_size=8), 2) == 4
    with pytest.raises(ConfigError, match="train.batch_size"):
        micro_batch_size(TrainConfig(batch_size=9), 2)


def test_zero3_keeps_parameters_whole():
    zero = deepspeed_config(TrainConfig(zero_stage=3), world_size=2)["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] >= 10**11


def test_optimizer_and_schedule_match_the_loop():
    train = TrainConfig(lr=0.1, weight_decay=0.01, warmup_ratio=0.2)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = optimizer_factory(train)([p])
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["lr"] == 0.1 and opt.defaults["weight_decay"] == 0.01
    sched = schedule_factory(train, 10)(opt)
    factor = cosine_lambda(10, 0.2)
    lrs = []
    for step in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == [0.1 * factor(s) for s in range(10)]
    assert lrs[0] == pytest.approx(0.05) and lrs[1] == pytest.approx(0.1)
    assert lrs[-1] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
