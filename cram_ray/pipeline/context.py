"""What every stage needs to find its inputs: the config, the run's storage, the task index.

A :class:`StageContext` is small and JSON-able (it crosses the Ray boundary as a dict and is rebuilt
on the worker). Heavy objects — the base VLM and the routing encoders — are built per process
by :func:`runtime` and cached there.
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

from cram_ray.config import StreamConfig, config_hash, from_dict
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

    @property
    def corpus_rel(self) -> str:
        return f"{self.tasks[0].dataset}/corpus.json"

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

    def fresh_model(self) -> torch.nn.Module:
        """A private copy of the frozen base for one stage to inject adapters into."""
        return copy.deepcopy(self.vlm.model)


@lru_cache(maxsize=2)
def _runtime_cached(cfg_json: str, corpus_path: str) -> Runtime:
    from cram_ray.models.base import build_vlm
    from cram_ray.models.features import ImageRoutingEncoder, TextRoutingEncoder

    cfg = from_dict(json.loads(cfg_json))
    corpus = json.loads(Path(corpus_path).read_text()) if corpus_path else []
    vlm = build_vlm(cfg, corpus)
    image_enc = ImageRoutingEncoder(vlm, layers=cfg.model.routing_image_layers)
    text_enc = TextRoutingEncoder(cfg.model.text_encoder)
    return Runtime(vlm, image_enc, text_enc)


def runtime(ctx: StageContext) -> Runtime:
    """The process-wide runtime for this config (built once, then reused by every stage)."""
    model_part = {"model": dataclasses.asdict(ctx.cfg.model), "data": dataclasses.asdict(ctx.cfg.data)}
    storage = ctx.storage
    corpus = storage.local_path(ctx.corpus_rel)
    if corpus is None:  # remote storage: fetch the small corpus file once per process
        local = Path(ctx.cfg.data.cache_dir).expanduser() / "corpus" / config_hash(model_part)
        local.mkdir(parents=True, exist_ok=True)
        (local / "corpus.json").write_bytes(storage.read_bytes(ctx.corpus_rel))
        corpus = local / "corpus.json"
    # only the model/data parts of the config decide the base: other keys must not rebuild it
    base_cfg = StreamConfig(model=ctx.cfg.model, data=ctx.cfg.data).to_dict()
    return _runtime_cached(json.dumps(base_cfg, sort_keys=True), str(corpus) if corpus.exists() else "")


def task_records(ctx: StageContext, task: int, split: str, scratch: Optional[Path] = None) -> list[Record]:
    from cram_ray.data.shards import read_shards

    rel = ctx.shard_rel(task, split)
    local = ctx.storage.get_dir(rel, (scratch or Path("/tmp")) / f"shards-{task}-{split}")
    return read_shards(local)
