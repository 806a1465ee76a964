"""A toy model + method behind the real interfaces, for the training mechanics (no VLM needed)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from cram_ray.config import StreamConfig
from cram_ray.methods.base import ContinualMethod

DIM = 12


class ToyModel(nn.Module):
    """A frozen linear "base" with a low-rank adapter; loss = MSE of a scalar head to the labels."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, 1)
        self.A = nn.Parameter(torch.randn(3, DIM) * 0.1)
        self.B = nn.Parameter(torch.full((DIM, 3), 0.01))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, **_: Any) -> CausalLMOutput:
        x = input_ids.float()  # (B, DIM)
        h = torch.relu(self.base(x) + (x @ self.A.T) @ self.B.T)
        return CausalLMOutput(loss=((self.head(h).squeeze(-1) - labels.float()) ** 2).mean())


class ToyMethod(ContinualMethod):
    """Trains A, B and an extra "centroid" held outside the model (it shifts the loss)."""

    name = "toy"

    def attach(self, model: nn.Module) -> None:
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.centroid = nn.Parameter(torch.zeros(DIM))
        for p in (model.A, model.B, self.centroid):
            p.requires_grad_(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.model.A, self.model.B, self.centroid]

    def route(self, batch, *, training: bool) -> None:
        self.last = batch["input_ids"].float()

    def extra_losses(self, batch, outputs):
        return {"pull": 0.01 * ((self.last - self.centroid) ** 2).mean()}

    def state(self):
        return {"A": self.model.A.detach(), "B": self.model.B.detach(), "centroid": self.centroid.detach()}, {}

    def load_state(self, tensors, meta) -> None:
        with torch.no_grad():
            self.model.A.copy_(tensors["A"])
            self.model.B.copy_(tensors["B"])
            self.centroid.copy_(tensors["centroid"])


class SurgeryMethod(ToyMethod):
    """Edits gradients before the step (halves B's, removes the centroid's first coordinate)."""

    name = "toy_surgery"

    def before_optimizer_step(self, step: int) -> None:
        self.model.B.grad.mul_(0.5)
        self.centroid.grad[0] = 0.0


def make(cls=ToyMethod, seed: int = 0) -> tuple[ToyModel, ToyMethod]:
    torch.manual_seed(seed)
    model = ToyModel()
    method = cls(StreamConfig())
    method.attach(model)
    return model, method


def batches(n: int, size: int = 8, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randn(size, DIM, generator=gen), "labels": torch.randn(size, generator=gen)}
            for _ in range(n)]
