"""DeepSpeed settings from a :class:`~cram_ray.config.TrainConfig`, with the local loop's optimiser.

The Ray Train worker (cram_ray/train/worker.py) hands DeepSpeed the SAME optimiser and schedule
the in-process executor uses (``loop.make_optimizer`` = torch AdamW, ``loop.cosine_lambda`` =
linear warm-up then cosine decay, stepped once per optimizer step), as callables DeepSpeed invokes
on the parameters / the optimiser it wraps. The JSON config therefore carries no ``optimizer`` or
``scheduler`` section by default; :func:`deepspeed_config` can add an AdamW section (with
``torch_adam`` so DeepSpeed does not JIT-build FusedAdam) for callers that let DeepSpeed build
the optimiser itself.

``train.zero_stage``: 0-3 is the ZeRO stage; -1 means plain torch DDP without DeepSpeed, for which
:func:`deepspeed_config` must not be called (:func:`uses_deepspeed` tells the two apart).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from cram_ray.config import ConfigError, TrainConfig
from cram_ray.train.loop import cosine_lambda, make_optimizer

DDP_STAGE = -1  # train.zero_stage value that selects plain torch DDP
PERSIST_ALL = 10**11  # a ZeRO-3 persistence threshold no parameter reaches
DEFAULT_BUCKET = 500_000_000  # DeepSpeed's reduce_bucket_size


def uses_deepspeed(train: TrainConfig) -> bool:
    return train.zero_stage != DDP_STAGE


def micro_batch_size(train: TrainConfig, world_size: int) -> int:
    """Samples per rank per optimizer step: the global batch ``train.batch_size`` split over the
    ranks (each rank runs them as ``train.grad_accum`` micro-batches).

    Data-parallel ranks average their gradients, so the optimiser sees the same global batch size
    as the in-process loop whatever the number of workers.
    """
    if world_size < 1:
        raise ConfigError(f"train.num_workers: expected >= 1, got {world_size}")
    if train.batch_size % world_size:
        raise ConfigError(
            f"train.batch_size: expected a multiple of train.num_workers={world_size} "
            f"(each worker takes an equal share of a step's batch), got {train.batch_size}"
        )
    return train.batch_size // world_size


def deepspeed_config(
    train: TrainConfig,
    *,
    world_size: int,
    dtype: str = "float32",
    gradient_clipping: float = 0.0,
    optimizer_in_config: bool = False,
    bucket_elements: int = DEFAULT_BUCKET,
) -> dict[str, Any]:
    """The DeepSpeed JSON config of one training run.

    Args:
        train: the run's training settings (``zero_stage`` 0-3, ``batch_size``, ``lr``, ...).
        world_size: number of data-parallel ranks.
        dtype: the model's dtype (``model.dtype``); bfloat16 turns DeepSpeed's bf16 mode on, on GPU
            only (CPU runs stay fp32; fp16 is never used).
        gradient_clipping: max global gradient norm; 0 = off, as in the in-process loop.
        optimizer_in_config: add an AdamW ``optimizer`` section (``torch_adam``) for callers that
            pass no optimiser of their own. The worker passes ``loop.make_optimizer`` instead.
        bucket_elements: the trainable parameter count, to cap ZeRO's gradient buckets: stages 1-2
            allocate a whole ``reduce_bucket_size`` buffer (5e8 elements, 1-2 GB) even for an adapter
            of a few million parameters.

    Returns:
        A JSON-able dict for ``deepspeed.initialize(config=...)``.
    """
    stage = train.zero_stage
    if not uses_deepspeed(train):
        raise ConfigError("train.zero_stage=-1 selects plain torch DDP: there is no DeepSpeed config to build")
    per_rank = micro_batch_size(train, world_size)
    if per_rank % train.grad_accum:
        raise ConfigError(f"train.batch_size: expected a multiple of train.num_workers x train.grad_accum = "
                          f"{world_size * train.grad_accum}, got {train.batch_size}")
    micro = per_rank // train.grad_accum
    if gradient_clipping < 0:
        raise ConfigError(f"gradient clipping: expected >= 0, got {gradient_clipping}")
    bf16 = train.use_gpu and dtype == "bfloat16"
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        # contiguous buckets keep ZeRO's reduce/partition layout identical on every rank
        zero.update({"contiguous_gradients": True, "overlap_comm": False,
                     "reduce_bucket_size": max(1, min(DEFAULT_BUCKET, bucket_elements))})
    if stage == 3:
        # Methods read parameters outside module forwards (routing centroids, the decoupling
        # penalty's expert bases, state() after the fit). Every parameter is "persistent": fetched
        # once and kept whole, so ZeRO-3 partitions gradients and optimizer state (as ZeRO-2) but
        # not the parameters themselves; partitioning a 7B frozen base needs methods that gather
        # what they read (deepspeed.zero.GatheredParameters), which ours do not.
        zero.update({"stage3_param_persistence_threshold": PERSIST_ALL})
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": micro * world_size * train.grad_accum,
        "gradient_clipping": float(gradient_clipping),
        "zero_optimization": zero,
        "fp16": {"enabled": False},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # torch AdamW as a client optimiser under ZeRO
        "steps_per_print": 10**9,  # progress is logged by the worker, not DeepSpeed
        "wall_clock_breakdown": False,
    }
    if optimizer_in_config:
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": train.lr, "weight_decay": train.weight_decay, "torch_adam": True},
        }
    return config


def optimizer_factory(train: TrainConfig) -> Callable[[Any], torch.optim.Optimizer]:
    """``params -> optimizer``: the in-process loop's AdamW, for ``deepspeed.initialize(optimizer=...)``."""

    def build(params: Any) -> torch.optim.Optimizer:
        return make_optimizer(list(params), train.lr, train.weight_decay)

    return build


def schedule_factory(train: TrainConfig, total_steps: int) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]:
    """``optimizer -> LambdaLR`` with the loop's warm-up + cosine factor over ``total_steps``."""

    def build(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_lambda(total_steps, train.warmup_ratio))

    return build
