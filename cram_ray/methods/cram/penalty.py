"""The decoupling (orthogonality) penalty L_dec of CRAM (docs/DESIGN.md §3).

Per adapted layer ``l``, with ``h_l`` (B, d_in) the layer's mean input over a sample's image-token
positions, the new expert's output on it is ``z_l = scale * B_new A_new h_l`` (B, d_out). With
``Q_l`` an orthonormal basis of the output space spanned by the B columns of the group's earlier
experts at that layer, the energy of ``z_l`` inside that space is ``||Q_l^T z_l||^2``. Weighted by
``gamma`` (B,), the routing mass the sample puts on those earlier experts (with gradient, so a
trained centroid is pushed as well), the penalty is

    L_dec = mean_{l, b} gamma_b * ||Q_l^T z_{l,b}||^2,

zero for a task that opened a new group (no earlier experts). ``h_l`` is taken as a constant
(detached): the penalty shapes the new expert's map, not the activations feeding it.
"""
from __future__ import annotations

from typing import Sequence

import torch

from cram_ray.methods.cram.rank import orthonormal_basis


def image_token_mask(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """(B, T) averaging weights over each sample's image-token positions (rows sum to 1, or 0)."""
    mask = (input_ids == image_token_id).to(torch.float32)  # (B, T)
    return mask / mask.sum(dim=1, keepdim=True).clamp_min(1.0)


def output_basis(B_hist: Sequence[torch.Tensor]) -> torch.Tensor:
    """Orthonormal basis (d_out, k) of the concatenated B columns of earlier experts."""
    cols = [b.detach().to(torch.float64) for b in B_hist if b.numel()]
    if not cols:
        raise ValueError("output_basis: no earlier expert")
    return orthonormal_basis(torch.cat(cols, dim=1))


def layer_energy(h: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, Q: torch.Tensor) -> torch.Tensor:
    """(B,) ``||Q^T (scale * B A h)||^2`` for h (B, d_in), A (r, d_in), B (d_out, r), Q (d_out, k)."""
    z = scale * ((h.detach().to(A.dtype) @ A.T) @ B.T)  # (B, d_out)
    proj = z @ Q.to(z.dtype)  # (B, k)
    return (proj * proj).sum(dim=1)


def decoupling_penalty(
    captured: Sequence[torch.Tensor],
    new_factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
    bases: Sequence[torch.Tensor],
    gamma: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """L_dec over the adapted layers.

    Args:
        captured: per layer, (B, d_in) mean input over image tokens (zeros for a sample without).
        new_factors: per layer, the new expert's (A, B).
        bases: per layer, the (d_out, k) output basis of the group's earlier experts.
        gamma: (B,) routing mass on the earlier experts.
        scale: the expert scale.

    Returns:
        A scalar; 0 when there is no layer (a new group).
    """
    if not bases:
        return gamma.new_zeros(())
    energies = torch.stack([
        layer_energy(h, A, B, scale, Q) for h, (A, B), Q in zip(captured, new_factors, bases)
    ])  # (L, B)
    return (gamma.to(energies.dtype)[None, :] * energies).mean()
