"""LoRA-FT: one peft LoRA trained on every task in turn — the forgetting floor (docs/DESIGN.md §4)."""
from __future__ import annotations

import re
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from cram_ray.config import StreamConfig
from cram_ray.methods.base import Batch, ContinualMethod


def language_target_regex(names: list[str]) -> str:
    """A peft target regex matching the given linear names inside the language model only."""
    alternatives = "|".join(re.escape(n) for n in names)
    return rf".*language_model\..*\.({alternatives})$"


class LoraFT(ContinualMethod):
    """A single LoRA (alpha = 2r) on the target linears, trained sequentially without protection."""

    name = "lora_ft"

    def __init__(self, cfg: StreamConfig) -> None:
        super().__init__(cfg)
        self.rank = cfg.method.rank
        self._params: dict[str, nn.Parameter] = {}
        self._tasks_seen = 0

    def attach(self, model: nn.Module) -> None:
        config = LoraConfig(
            r=self.rank,
            lora_alpha=2 * self.rank,
            lora_dropout=0.0,
            target_modules=language_target_regex(self.cfg.method.target_modules),
        )
        inject_adapter_in_model(config, model)
        self._params = {n: p for n, p in model.named_parameters() if "lora_" in n}
        if not self._params:
            raise ValueError(
                f"method.target_modules: no linear named {self.cfg.method.target_modules} in the language model"
            )
        for name, param in model.named_parameters():
            param.requires_grad_(name in self._params)

    def begin_task(self, task) -> None:
        super().begin_task(task)
        self._tasks_seen = task.index + 1

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self._params.values())

    def route(self, batch: Batch, *, training: bool) -> None:
        """One adapter serves every sample: nothing to route."""

    def params_added(self) -> int:
        # the one LoRA is added with the first task; later tasks overwrite it
        return sum(p.numel() for p in self._params.values()) if self._tasks_seen == 1 else 0

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {name: p.detach().contiguous().clone() for name, p in self._params.items()}
        return tensors, {"method": self.name, "rank": self.rank, "tasks_seen": self._tasks_seen}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        missing = set(self._params) ^ set(tensors)
        if missing:
            raise ValueError(f"lora_ft state: parameter names differ from the attached model: {sorted(missing)[:3]}")
        with torch.no_grad():
            for name, value in tensors.items():
                self._params[name].copy_(value)
        self._tasks_seen = int(meta.get("tasks_seen", 0))
