"""HiDe-LLaVA: task-specific expansion in the last block, task-general fusion below (Guo et al.,
ACL 2025), as the reference toolbox implements it.

Every task adds one expert slot on the target linears of every transformer block, and two anchors:
the mean image and the mean text routing feature of its training data.

* Training task t uses expert t alone in every block (the old experts frozen and unused).
* At test time the LAST block uses a single expert per sample: the task with the highest
  ``w cos(img, img_anchor) + (1 - w) cos(txt, txt_anchor)`` (w = 0.5); every other block fuses all
  experts: ``method.hide.fusion: sum`` adds them at weight 1 (the reference toolbox), ``mean`` at
  weight 1/T (the paper's uniform merge; a named variant, ``hide@fusion=mean``).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from cram_ray.config import StreamConfig
from cram_ray.experts.adapter import RoutingContext
from cram_ray.methods.base import Batch, Phase
from cram_ray.methods.common import SlotPerTask, TaskAnchors, one_hot


def pick_task(scores: torch.Tensor) -> torch.Tensor:
    """(B, K) anchor scores -> (B,) index of the best anchor (the first one on ties)."""
    return scores.argmax(dim=-1)


class HiDe(SlotPerTask):
    """One expert per task; anchor-routed top block, summed lower blocks."""

    name = "hide"
    needs_features = frozenset({"image", "text"})

    def __init__(self, cfg: StreamConfig) -> None:
        super().__init__(cfg)
        self.image_weight = cfg.method.hide.image_weight
        self.fusion = cfg.method.hide.fusion
        self.anchors = TaskAnchors()
        self.contexts: dict[int, RoutingContext] = {}  # block index -> its routing context
        self.last_block = -1
        self._choice: Optional[torch.Tensor] = None  # (B,) task of the last block's expert

    def attach(self, model: nn.Module) -> None:
        layers = self.slots.attach(model, self.cfg.method.target_modules, per_block_context=True)
        self.contexts = {}
        for layer in layers.values():
            self.contexts.setdefault(layer.block, layer.context)
        self.last_block = max(self.contexts)
        if len(self.contexts) < 2:
            raise ValueError("hide: expected adapted linears in at least two transformer blocks")

    def observe(self, batch: Batch, phase: Phase) -> None:
        if phase == "aggregate":
            self.anchors.observe(batch)

    def take_aggregate_statistics(self) -> dict[str, torch.Tensor]:
        return self.anchors.take()

    def merge_aggregate_statistics(self, parts: list[dict[str, torch.Tensor]]) -> None:
        self.anchors.merge(parts)

    def end_task(self) -> dict[str, Any]:
        report = super().end_task()
        self.anchors.commit(self.task.index)
        return {**report, "anchors": len(self.anchors)}

    def route(self, batch: Batch, *, training: bool) -> None:
        for ctx in self.contexts.values():
            ctx.clear()
        self._choice = None
        size = batch["input_ids"].shape[0]
        if training:
            if not self.training:
                raise RuntimeError("HiDe.route(training=True): call begin_train first")
            own = one_hot(torch.full((size,), self.task.index, dtype=torch.long), self.task.index + 1)
            for ctx in self.contexts.values():
                ctx.weights = own
            return
        n = len(self.anchors)  # committed tasks only
        if n == 0:
            self._choice = torch.full((size,), -1, dtype=torch.long)
            return
        choice = pick_task(self.anchors.scores(batch, self.image_weight))
        self._choice = choice
        fused = torch.full((size, n), 1.0 if self.fusion == "sum" else 1.0 / n)
        for block, ctx in self.contexts.items():
            ctx.weights = one_hot(choice, n) if block == self.last_block else fused

    def routed_task(self) -> Optional[torch.Tensor]:
        return self._choice

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = super().state()
        anchor_t, meta["anchors"] = self.anchors.state()
        tensors.update(anchor_t)
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        super().load_state(tensors, meta)
        self.anchors.load_state(tensors, meta["anchors"])
