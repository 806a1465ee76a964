"""O-LoRA: orthogonal subspaces, one LoRA per task, all of them summed (docs/DESIGN.md §4; Wang et al. 2023).

Task ``t`` opens a rank-``r`` slot; only it trains, every earlier slot is frozen. The training
forward uses slot t alone, as the reference toolbox (``method.olora.train_sum: true``: every slot
0..t at weight 1, as O-LoRA's own code); at test time every slot is summed at weight 1 (there is
no routing). The loss adds

    L_orth = lambda * sum_layers sum_{i<t} sum_jk |(A_t A_i^T)_jk|

which pushes the new slot's input subspace (rows of ``A_t``) away from the earlier ones; ``A_i``
is detached.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from cram_ray.config import StreamConfig
from cram_ray.experts.adapter import RoutingContext
from cram_ray.methods.base import Batch
from cram_ray.methods.common import SlotPerTask, one_hot


def orthogonality_penalty(A_new: torch.Tensor, A_old: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_i sum |A_new A_i^T|`` for A_new (r, d_in) and each A_i (r_i, d_in); A_i gets no gradient."""
    total = A_new.new_zeros(())
    for A in A_old:
        total = total + (A_new @ A.detach().to(A_new.dtype).T).abs().sum()  # (r, r_i)
    return total


class OLoRA(SlotPerTask):
    """One slot per task; the new one trains under the orthogonality penalty; inference sums all."""

    name = "olora"

    def __init__(self, cfg: StreamConfig) -> None:
        super().__init__(cfg)
        self.lam = cfg.method.olora.lam
        self.train_sum = cfg.method.olora.train_sum
        self.context = RoutingContext()

    def attach(self, model: nn.Module) -> None:
        self.slots.attach(model, self.cfg.method.target_modules, context=self.context)

    def route(self, batch: Batch, *, training: bool) -> None:
        """Every slot at weight 1, or while training (unless ``train_sum``) the task's slot alone."""
        self.context.clear()
        n = len(self.slots)
        size = batch["input_ids"].shape[0]
        if training and not self.train_sum:
            self.context.weights = one_hot(torch.full((size,), self.task.index), n)
        elif n:
            self.context.weights = torch.ones(size, n)

    def penalty(self) -> torch.Tensor:
        """Unweighted L_orth of the current task's slot against every earlier slot, over all layers."""
        t = self.task.index
        terms = [orthogonality_penalty(layer.slot(t).A, [layer.slot(i).A for i in range(t)])
                 for layer in self.slots.layers.values()]
        return torch.stack(terms).sum()

    def extra_losses(self, batch: Batch, outputs: Any) -> dict[str, torch.Tensor]:
        if not self.training or self.lam == 0 or self.task.index == 0:
            return {}
        return {"orth": self.lam * self.penalty()}

    def routed_task(self) -> Optional[torch.Tensor]:
        return None  # no routing decision: every slot serves every sample
