"""HiDe-LLaVA: task-specific expansion in the last block, task-general fusion below (docs/DESIGN.md §4;
Guo et al., ACL 2025).

Every task adds one expert slot on the target linears of every transformer block, and two anchors:
the mean image and the mean text routing feature of its training data. The blocks differ in how
they use the experts:

* the LAST block uses a single expert per sample: the true task's while training, at test time the
  task with the highest ``w cos(img, img_anchor) + (1 - w) cos(txt, txt_anchor)`` (w = 0.5);
* every other block sums all experts at weight 1 (while training task t: experts 0..t, the old
  ones frozen).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from cram_ray.config import StreamConfig
from cram_ray.data.records import TaskInfo
from cram_ray.experts.adapter import RoutingContext
from cram_ray.methods.base import Batch, ContinualMethod, Phase
from cram_ray.methods.common import TaskAnchors, TaskSlots, check_meta, freeze, one_hot, task_from_json, task_to_json

STATE_VERSION = 1


def pick_task(scores: torch.Tensor) -> torch.Tensor:
    """(B, K) anchor scores -> (B,) index of the best anchor (the first one on ties)."""
    return scores.argmax(dim=-1)


class HiDe(ContinualMethod):
    """One expert per task; anchor-routed top block, summed lower blocks."""

    name = "hide"
    needs_features = frozenset({"image", "text"})

    def __init__(self, cfg: StreamConfig) -> None:
        super().__init__(cfg)
        self.image_weight = cfg.method.baselines.hide_image_weight
        self.slots = TaskSlots(cfg.method.lora_rank, cfg.train.seed)
        self.anchors = TaskAnchors()
        self.contexts: dict[int, RoutingContext] = {}  # block index -> its routing context
        self.last_block = -1
        self.training = False
        self._choice: Optional[torch.Tensor] = None  # (B,) task of the last block's expert

    def attach(self, model: nn.Module) -> None:
        layers = self.slots.attach(model, self.cfg.method.target_modules, per_block_context=True)
        self.contexts = {}
        for layer in layers.values():
            self.contexts.setdefault(layer.block, layer.context)
        self.last_block = max(self.contexts)
        if len(self.contexts) < 2:
            raise ValueError("hide: expected adapted linears in at least two transformer blocks")

    def begin_task(self, task: TaskInfo) -> None:
        super().begin_task(task)
        self.training = False
        self.slots.open(task.index)

    def allocate(self) -> dict[str, Any]:
        return {"slot": self.task.index, **self.slots.ranks(self.task.index)}

    def begin_train(self) -> None:
        self.slots.train_only(self.task.index)
        self.training = True

    def observe(self, batch: Batch, phase: Phase) -> None:
        if phase == "aggregate":
            self.anchors.observe(batch)

    def end_task(self) -> dict[str, Any]:
        freeze(self.slots.all_params())
        self.training = False
        self.anchors.commit(self.task.index)
        return {"slot": self.task.index, "experts": len(self.slots), "anchors": len(self.anchors)}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.slots.params(self.task.index) if self.training else []

    def route(self, batch: Batch, *, training: bool) -> None:
        for ctx in self.contexts.values():
            ctx.clear()
        self._choice = None
        size = batch["input_ids"].shape[0]
        if training:
            if not self.training:
                raise RuntimeError("HiDe.route(training=True): call begin_train first")
            n = self.task.index + 1
            choice = torch.full((size,), self.task.index, dtype=torch.long)
        else:
            n = len(self.anchors)  # committed tasks only
            if n == 0:
                self._choice = torch.full((size,), -1, dtype=torch.long)
                return
            choice = pick_task(self.anchors.scores(batch, self.image_weight))
            self._choice = choice
        summed = torch.ones(size, n)
        for block, ctx in self.contexts.items():
            ctx.weights = one_hot(choice, n) if block == self.last_block else summed

    def routed_task(self) -> Optional[torch.Tensor]:
        return self._choice

    def params_added(self) -> int:
        return 0 if self.task is None else self.slots.numel(self.task.index)

    def ranks(self) -> dict[str, Any]:
        return {} if self.task is None else self.slots.ranks(self.task.index)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, ranks = self.slots.state()
        anchor_t, anchor_meta = self.anchors.state()
        tensors.update(anchor_t)
        return tensors, {"method": self.name, "version": STATE_VERSION, "expert_ranks": ranks,
                         "anchors": anchor_meta, "task": task_to_json(self.task)}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        check_meta(meta, self.name, STATE_VERSION)
        self.slots.load_state(tensors, meta["expert_ranks"])
        self.anchors.load_state(tensors, meta["anchors"])
        self.task = task_from_json(meta["task"])
        self.training = False
