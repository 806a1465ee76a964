"""Adapter layers of the baselines that route *inside* the forward pass (no Ray here).

:class:`~cram_ray.experts.adapter.ExpertLinear` takes its routing weights from a context the
method fills before the forward pass, one row per sample. MoELoRA routes every token by a gate on
the layer's own input, which that layer cannot express; :class:`MoELoRALinear` does it, and
:func:`replace_linears` puts any such wrapper in place of the target linears.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from cram_ray.experts.adapter import block_index


def _matches(name: str, patterns: list[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def replace_linears(model: nn.Module, patterns: Iterable[str], build: Callable[[str, nn.Linear, int], nn.Module],
                    *, scope: Optional[str] = "auto") -> dict[str, nn.Module]:
    """Replace every target ``nn.Linear`` of ``model`` by ``build(name, linear, block)``, in place.

    Targets are chosen as :func:`~cram_ray.experts.adapter.inject_experts` chooses them: the
    qualified name equals a pattern or ends with ``"." + pattern``, under a path component named
    ``scope`` (``"auto"``: ``"language_model"`` when the model has one, else the whole model).
    ``block`` is the transformer block index counted inside the scope (-1: none).
    """
    patterns = list(patterns)
    if scope == "auto":
        scope = "language_model" if any("language_model" in n.split(".") for n, _ in model.named_modules()) else None
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and _matches(n, patterns) and (scope is None or scope in n.split("."))]
    if not targets:
        raise ValueError(f"no nn.Linear named {patterns} (scope {scope!r}) in the model")
    out: dict[str, nn.Module] = {}
    for name, linear in targets:
        block = block_index(name[name.index(scope) + len(scope):] if scope else name)
        wrapped = build(name, linear, block)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapped)
        out[name] = wrapped
    return out


class MoELoRALinear(nn.Module):
    """A frozen linear plus E LoRA experts mixed per token by a softmax gate on the layer input.

    ``y_t = W0 x_t + scale * (sum_e g_e B_e) (sum_e g_e A_e) x_t`` with ``g = softmax(W_g x_t)``:
    the gate mixes the experts' factors, not their outputs, so the cross terms ``g_e g_f B_e A_f``
    are part of the update (as the reference MoELoRA computes it); two tokens of one sample can weigh
    the experts differently. The E experts are stored stacked: ``A`` (E * r, d_in) and ``B``
    (d_out, E * r), expert e owning rows / columns e*r .. e*r + r - 1.

    Args:
        base_layer: the target linear (frozen).
        experts: E.
        rank: r, the rank of each expert.
        scale: factor of the experts' sum (alpha / r).
        generator: seeds the gate and the A matrices (B starts at 0, so the layer starts as the base).
    """

    def __init__(self, base_layer: nn.Linear, *, experts: int, rank: int, scale: float = 2.0,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.experts, self.rank, self.scale = experts, rank, float(scale)
        dtype = base_layer.weight.dtype
        dtype = dtype if dtype.is_floating_point and dtype != torch.float16 else torch.float32
        device = base_layer.weight.device
        bound = 1.0 / math.sqrt(self.in_features)  # nn.Linear's default (kaiming_uniform, a = sqrt(5))
        A = (torch.rand(experts * rank, self.in_features, generator=generator) * 2 - 1) * bound
        gate = (torch.rand(experts, self.in_features, generator=generator) * 2 - 1) * bound
        self.A = nn.Parameter(A.to(device=device, dtype=dtype), requires_grad=False)
        self.B = nn.Parameter(torch.zeros(self.out_features, experts * rank, device=device, dtype=dtype),
                              requires_grad=False)
        self.gate = nn.Parameter(gate.to(device=device, dtype=dtype), requires_grad=False)
        self.last_gate: Optional[torch.Tensor] = None  # (..., E) gate of the last forward, detached

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [self.A, self.B, self.gate]

    def gate_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (..., E) per-token softmax gate."""
        return torch.softmax(x @ self.gate.T, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        xa = x.to(self.A.dtype)
        g = self.gate_weights(xa)  # (..., E)
        self.last_gate = g.detach()
        h = (xa @ self.A.T).unflatten(-1, (self.experts, self.rank))  # (..., E, r): A_e x
        mixed_down = (h * g.unsqueeze(-1)).sum(-2)  # (..., r): (sum_e g_e A_e) x
        up_in = (g.unsqueeze(-1) * mixed_down.unsqueeze(-2)).flatten(-2)  # (..., E * r): g_e times it
        return out + (self.scale * (up_in @ self.B.T)).to(out.dtype)  # (sum_e g_e B_e) (...)
