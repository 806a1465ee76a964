"""What every stage needs to find its inputs: the config, the run's storage, the task index.

A :class:`StageContext` is small and JSON-able (it crosses the Ray boundary as a dict and is rebuilt
on the worker). Heavy objects — the base VLM and the routing encoders — are built per process
by :func:`runtime` and cached there. The base is loaded once per process and every stage injects
its adapters into that same model (:meth:`Runtime.fresh_model` first removes the previous
stage's), so the routing encoder reads the model's own vision tower on whatever device the stage
moved the model to.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import random
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from cram_ray.config import StreamConfig, TrainConfig, from_dict
from cram_ray.data.records import Record, TaskInfo
from cram_ray.pipeline.ledger import Ledger, Storage


@dataclass(frozen=True)
class TaskMeta:
    name: str
    metric: str
    n_train: int
    n_test: int
    dataset: str  # the prepared benchmark under the storage root, datasets/<content hash>


@dataclass
class StageContext:
    cfg: StreamConfig
    run_id: str
    tasks: list[TaskMeta]

    @property
    def storage(self) -> Storage:
        return Storage(self.cfg.storage)

    @property
    def ledger(self) -> Ledger:
        return Ledger(self.storage, self.run_id)

    def info(self, task: int) -> TaskInfo:
        meta = self.tasks[task]
        return TaskInfo(index=task, name=meta.name, metric=meta.metric)

    def shard_rel(self, task: int, split: str) -> str:
        """The folder of a task's split's shards, relative to the storage root (shared by every run
        on the same benchmark content)."""
        meta = self.tasks[task]
        return f"{meta.dataset}/{meta.name}/{split}"

    def to_json(self) -> dict[str, Any]:
        return {"cfg": self.cfg.to_dict(), "run_id": self.run_id,
                "tasks": [dataclasses.asdict(t) for t in self.tasks]}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "StageContext":
        return cls(from_dict(raw["cfg"]), raw["run_id"], [TaskMeta(**t) for t in raw["tasks"]])


def seed_everything(*parts: Any) -> int:
    """Seed torch, numpy and random from a stable hash of ``parts``; returns the seed."""
    seed = zlib.crc32(json.dumps(parts, default=str).encode()) & 0x7FFFFFFF
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed


@dataclass
class Runtime:
    """Per-process heavy objects: the frozen base VLM and the routing feature encoders."""

    vlm: Any  # cram_ray.models.vlm.VLM
    image_encoder: Any
    text_encoder: Any
    # the frozen vision pass's cache of the task in training, and which (run, task) it serves
    _feature_cache: Any = dataclasses.field(default=None, repr=False)
    _feature_scope: Any = dataclasses.field(default=None, repr=False)

    def feature_cache(self, scope: Any, max_bytes: int) -> Any:
        """The :class:`~cram_ray.models.features.ImageFeatureCache` of one task of one run
        (``scope``): its probe and train stages share it, and the next task's first stage drops it.
        The tower and projector are the runtime's own, frozen, so a cached image's features hold
        for as long as the runtime lives; the scope only bounds the memory to the images in use."""
        from cram_ray.models.features import ImageFeatureCache

        if self._feature_cache is None or self._feature_scope != scope:
            self._feature_cache, self._feature_scope = ImageFeatureCache(max_bytes), scope
        self._feature_cache.max_bytes = int(max_bytes)  # no eviction: a smaller limit stops it growing
        return self._feature_cache

    def fresh_model(self, train: TrainConfig) -> torch.nn.Module:
        """The frozen base, without adapters, for one stage to inject its adapters into.

        The process's base itself, cleared of what the previous stage attached: copying a 7B base
        per stage would hold it twice in host memory and keep the routing encoder's vision tower
        on the CPU while the stage's copy trains on the GPU. ZeRO-3 is the exception: DeepSpeed
        converts every parameter of the module it wraps, frozen ones included, so that stage gets
        a private copy and the base stays untouched.
        """
        from cram_ray.models.vlm import freeze, set_gradient_checkpointing, strip_adapters

        if train.executor == "ray" and train.zero_stage == 3:
            model = copy.deepcopy(strip_adapters(self.vlm.model))
        else:
            model = strip_adapters(self.vlm.model)
        freeze(model)
        set_gradient_checkpointing(model, train.gradient_checkpointing)
        return model


@lru_cache(maxsize=2)
def _runtime_cached(cfg_json: str) -> Runtime:
    from cram_ray.models.base import build_vlm
    from cram_ray.models.features import ImageRoutingEncoder, TextRoutingEncoder

    cfg = from_dict(json.loads(cfg_json))
    vlm = build_vlm(cfg)
    image_enc = ImageRoutingEncoder(vlm, layers=cfg.model.routing_image_layers)
    text_enc = TextRoutingEncoder(cfg.model.text_encoder)
    return Runtime(vlm, image_enc, text_enc)


def runtime(ctx: StageContext) -> Runtime:
    """The process-wide runtime for this config (built once, then reused by every stage)."""
    # only the model/data parts of the config decide the base: other keys must not rebuild it
    base_cfg = StreamConfig(model=ctx.cfg.model, data=ctx.cfg.data).to_dict()
    return _runtime_cached(json.dumps(base_cfg, sort_keys=True))


def task_records(ctx: StageContext, task: int, split: str, scratch: Optional[Path] = None) -> list[Record]:
    from cram_ray.data.shards import read_shards

    rel = ctx.shard_rel(task, split)
    local = ctx.storage.get_dir(rel, (scratch or Path("/tmp")) / f"shards-{task}-{split}")
    return read_shards(local)
