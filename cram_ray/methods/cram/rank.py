"""Adaptive-rank instantiation of a new expert from the probe buffer (docs/DESIGN.md §3 and §8).

Per target linear, the probe buffer's update ``scale * B_buf A_buf`` (d_out x d_in, rank r) is
decomposed without ever forming it: ``B_buf = Q_B R_B`` (thin QR), then the small SVD
``scale * R_B A_buf = U' S V^T`` gives ``U = Q_B U'``. Directions whose singular value passes the
spectral threshold(s), capped at ``rank_max``, are kept when they are *novel* with respect to the
row space of the group's earlier experts; the set is topped up to ``rank_min`` with the largest
remaining directions. The kept right vectors are orthogonalised against the earlier experts'
row space and renormalised, and the new expert starts as

    B_new = U sqrt(S),   A_new = sqrt(S) V_orth.

Scale convention: the caller passes ``scale = scale_buf / scale_expert``, so that without history
``scale_expert * B_new A_new`` equals the rank-truncated probe update ``scale_buf * B_buf A_buf``.
"""
from __future__ import annotations

from typing import Sequence

import torch


def orthonormal_basis(M: torch.Tensor, rtol: float = 1e-10) -> torch.Tensor:
    """Orthonormal basis (n, k) of the column space of ``M`` (n, m); numerically null directions dropped.

    Computed in float64 by SVD, so a rank-deficient ``M`` gives exactly its rank's worth of columns.
    """
    if M.numel() == 0:
        return M.new_zeros((M.shape[0], 0), dtype=torch.float64)
    U, S, _ = torch.linalg.svd(M.to(torch.float64), full_matrices=False)  # (n, m'), (m',)
    if S.numel() == 0 or S[0] <= 0:
        return U[:, :0]
    return U[:, S > rtol * S[0]]


def history_basis(A_hist: Sequence[torch.Tensor], d_in: int) -> torch.Tensor:
    """Orthonormal basis (d_in, k) of the concatenated rows of the earlier experts' A factors."""
    rows = [a.to(torch.float64) for a in A_hist if a.numel()]
    if not rows:
        return torch.zeros(d_in, 0, dtype=torch.float64)
    return orthonormal_basis(torch.cat(rows, dim=0).T)  # (d_in, k)


def _project_out(V: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Rows of V (k, d) minus their component in span(Q) (d, m), projected twice for accuracy."""
    if Q.shape[1] == 0:
        return V
    for _ in range(2):
        V = V - (V @ Q) @ Q.T
    return V


def buffer_svd(
    A_buf: torch.Tensor, B_buf: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of ``scale * B_buf A_buf`` without forming it: (U (d_out, r), S (r,), V (r, d_in)), float64."""
    Qb, Rb = torch.linalg.qr(B_buf.to(torch.float64))  # (d_out, r), (r, r)
    small = scale * (Rb @ A_buf.to(torch.float64))  # (r, d_in)
    Us, S, V = torch.linalg.svd(small, full_matrices=False)  # (r, r), (r,), (r, d_in)
    return Qb @ Us, S, V


def allocate(
    A_buf: torch.Tensor,
    B_buf: torch.Tensor,
    scale: float,
    A_hist: Sequence[torch.Tensor],
    tau_alloc: float,
    tau_novel: float,
    rank_min: int,
    rank_max: int,
    *,
    tau_rel: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial factors of a new expert from a trained probe buffer.

    Args:
        A_buf: (r, d_in) buffer down-projection.
        B_buf: (d_out, r) buffer up-projection.
        scale: factor applied to ``B_buf A_buf`` before the SVD (``scale_buf / scale_expert``).
        A_hist: A factors (r_i, d_in) of the group's earlier experts at this layer; may be empty.
        tau_alloc: absolute spectral threshold: candidates have ``S_j > tau_alloc``.
        tau_novel: keep a candidate only if the share of its norm outside the span of ``A_hist``
            rows, ``||V_j - Q Q^T V_j|| / ||V_j||``, exceeds this.
        rank_min: floor: top up with the largest remaining directions.
        rank_max: cap on the candidates.
        tau_rel: relative threshold (0 = off): candidates also need ``S_j > tau_rel * S_0``.

    Returns:
        (A_new (k, d_in), B_new (d_out, k)) in ``A_buf``'s dtype, ``rank_min <= k`` (unless the
        buffer has fewer directions), ``k <= max(rank_min, rank_max)``.
    """
    if A_buf.dim() != 2 or B_buf.dim() != 2 or A_buf.shape[0] != B_buf.shape[1]:
        raise ValueError(
            f"allocate: expected A_buf (r, d_in), B_buf (d_out, r); got {tuple(A_buf.shape)}, {tuple(B_buf.shape)}"
        )
    d_in = A_buf.shape[1]
    U, S, V = buffer_svd(A_buf, B_buf, scale)  # S sorted descending
    r = S.shape[0]

    passes = S > tau_alloc
    if tau_rel > 0:
        passes &= S > tau_rel * S[0]
    candidates = passes.nonzero().flatten().tolist()[:rank_max]

    Q = history_basis(A_hist, d_in)  # (d_in, k_hist)
    residual = _project_out(V, Q)  # (r, d_in)
    novelty = residual.norm(dim=1) / V.norm(dim=1).clamp_min(1e-300)  # (r,)
    kept = [j for j in candidates if novelty[j] > tau_novel]
    for j in range(r):  # top up with the largest remaining directions
        if len(kept) >= rank_min:
            break
        if j not in kept:
            kept.append(j)
    kept.sort()  # descending singular value

    idx = torch.tensor(kept, dtype=torch.long)
    V_orth = residual[idx]  # (k, d_in)
    V_orth = V_orth / V_orth.norm(dim=1, keepdim=True).clamp_min(1e-300)
    root = S[idx].sqrt()  # (k,)
    B_new = U[:, idx] * root  # (d_out, k)
    A_new = root[:, None] * V_orth  # (k, d_in)
    return A_new.to(A_buf.dtype), B_new.to(B_buf.dtype)
