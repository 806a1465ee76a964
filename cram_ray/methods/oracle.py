"""Oracle: one LoRA per task, chosen by the TRUE task id at training and test time (docs/DESIGN.md §4).

The upper bound of every routed method: it forgets nothing (each task keeps its own frozen
expert) and its routing is right by construction, so its routing accuracy is 100%.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from cram_ray.config import StreamConfig
from cram_ray.data.records import TaskInfo
from cram_ray.experts.adapter import RoutingContext
from cram_ray.methods.base import Batch, ContinualMethod
from cram_ray.methods.common import TaskSlots, check_meta, freeze, one_hot, task_from_json, task_to_json

STATE_VERSION = 1


class Oracle(ContinualMethod):
    """One expert slot per task (rank ``method.lora_rank``) routed by ``batch["task_index"]``."""

    name = "oracle"

    def __init__(self, cfg: StreamConfig) -> None:
        super().__init__(cfg)
        self.slots = TaskSlots(cfg.method.rank, cfg.train.seed)
        self.context = RoutingContext()
        self.training = False  # begin_train ran in this process
        self._routed: Optional[torch.Tensor] = None

    def attach(self, model: nn.Module) -> None:
        self.slots.attach(model, self.cfg.method.target_modules, context=self.context)

    def begin_task(self, task: TaskInfo) -> None:
        super().begin_task(task)
        self.training = False
        self.slots.open(task.index)

    def allocate(self) -> dict[str, Any]:
        return {"slot": self.task.index, **self.slots.ranks(self.task.index)}

    def begin_train(self) -> None:
        self.slots.train_only(self.task.index)
        self.training = True

    def end_task(self) -> dict[str, Any]:
        freeze(self.slots.all_params())
        self.training = False
        return {"slot": self.task.index, "experts": len(self.slots)}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.slots.params(self.task.index) if self.training else []

    def route(self, batch: Batch, *, training: bool) -> None:
        truth = batch["task_index"].long().reshape(-1).cpu()
        self.context.clear()
        self.context.weights = one_hot(truth, len(self.slots))
        self._routed = truth.clone()

    def routed_task(self) -> Optional[torch.Tensor]:
        return self._routed

    def params_added(self) -> int:
        return 0 if self.task is None else self.slots.numel(self.task.index)

    def ranks(self) -> dict[str, Any]:
        return {} if self.task is None else self.slots.ranks(self.task.index)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, ranks = self.slots.state()
        return tensors, {"method": self.name, "version": STATE_VERSION, "expert_ranks": ranks,
                         "task": task_to_json(self.task)}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        check_meta(meta, self.name, STATE_VERSION)
        self.slots.load_state(tensors, meta["expert_ranks"])
        self.task = task_from_json(meta["task"])
        self.training = False

