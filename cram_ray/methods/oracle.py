"""Oracle: one LoRA per task, chosen by the TRUE task id at training and test time (docs/DESIGN.md §4).

The upper bound of every routed method: it forgets nothing (each task keeps its own frozen
expert) and its routing is right by construction, so its routing accuracy is 100%.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from cram_ray.config import StreamConfig
from cram_ray.experts.adapter import RoutingContext
from cram_ray.methods.base import Batch
from cram_ray.methods.common import SlotPerTask, one_hot


class Oracle(SlotPerTask):
    """One expert slot per task (rank ``method.lora_rank``) routed by ``batch["task_index"]``."""

    name = "oracle"
    needs_task_id = True

    def __init__(self, cfg: StreamConfig) -> None:
        super().__init__(cfg)
        self.context = RoutingContext()
        self._routed: Optional[torch.Tensor] = None

    def attach(self, model: nn.Module) -> None:
        self.slots.attach(model, self.cfg.method.target_modules, context=self.context)

    def route(self, batch: Batch, *, training: bool) -> None:
        truth = batch["task_index"].long().reshape(-1).cpu()
        self.context.clear()
        self.context.weights = one_hot(truth, len(self.slots))
        self._routed = truth.clone()

    def routed_task(self) -> Optional[torch.Tensor]:
        return self._routed
