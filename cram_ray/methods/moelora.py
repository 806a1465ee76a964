"""MoELoRA (CoIN's baseline): E LoRA experts of rank r/E per target linear, mixed per token by a
softmax gate, all trained on every task in turn (docs/DESIGN.md §4).

Like LoRA-FT the adapters are shared by the whole stream and added once, with the first task; the
gate decides per token, not per task, so there is no routing decision to score.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cram_ray.config import StreamConfig
from cram_ray.methods.base import Batch, ContinualMethod
from cram_ray.methods.common import EXPERT_SCALE, check_meta, freeze, task_from_json, task_to_json
from cram_ray.methods.layers import MoELoRALinear, replace_linears

STATE_VERSION = 1


class MoELoRA(ContinualMethod):
    """E experts of rank max(1, r // E) and a per-layer token gate, everything trainable."""

    name = "moelora"

    def __init__(self, cfg: StreamConfig) -> None:
        super().__init__(cfg)
        self.experts = cfg.method.baselines.moelora_experts
        self.expert_rank = max(1, cfg.method.lora_rank // self.experts)
        self.layers: dict[str, MoELoRALinear] = {}
        self.training = False

    def attach(self, model: nn.Module) -> None:
        freeze(model.parameters())
        gen = torch.Generator().manual_seed(1_000_003 * (self.cfg.train.seed + 1))

        def build(name: str, linear: nn.Linear, block: int) -> MoELoRALinear:
            return MoELoRALinear(linear, experts=self.experts, rank=self.expert_rank, scale=EXPERT_SCALE,
                                 generator=gen)

        self.layers = replace_linears(model, self.cfg.method.target_modules, build)

    def _params(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in layer.adapter_parameters()]

    def begin_train(self) -> None:
        for p in self._params():
            p.requires_grad_(True)
        self.training = True

    def end_task(self) -> dict[str, Any]:
        freeze(self._params())
        self.training = False
        return {"experts": self.experts, "expert_rank": self.expert_rank}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self._params() if self.training else []

    def route(self, batch: Batch, *, training: bool) -> None:
        """The gates route every token inside the forward pass: nothing to set."""

    def params_added(self) -> int:
        # the experts and gates are added with the first task; later tasks only update them
        return sum(p.numel() for p in self._params()) if self.task is not None and self.task.index == 0 else 0

    def ranks(self) -> dict[str, Any]:
        return {"experts": self.experts, "expert_rank": self.expert_rank}

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {}
        for name, layer in self.layers.items():
            for key, p in (("A", layer.A), ("B", layer.B), ("gate", layer.gate)):
                tensors[f"moelora.{name}.{key}"] = p.detach().contiguous().clone()
        return tensors, {"method": self.name, "version": STATE_VERSION, "experts": self.experts,
                         "expert_rank": self.expert_rank, "task": task_to_json(self.task)}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        check_meta(meta, self.name, STATE_VERSION)
        if (meta["experts"], meta["expert_rank"]) != (self.experts, self.expert_rank):
            raise ValueError(f"moelora state: {meta['experts']} experts of rank {meta['expert_rank']}, "
                             f"the config asks for {self.experts} of rank {self.expert_rank}")
        with torch.no_grad():
            for name, layer in self.layers.items():
                for key, p in (("A", layer.A), ("B", layer.B), ("gate", layer.gate)):
                    value = tensors.get(f"moelora.{name}.{key}")
                    if value is None or value.shape != p.shape:
                        raise ValueError(f"moelora state: no tensor of shape {tuple(p.shape)} for {name}.{key}")
                    p.copy_(value)
        freeze(self._params())
        self.task = task_from_json(meta["task"])
        self.training = False
