"""Level-2 routing: centroid-guided softmax over a group's experts from image features (docs/DESIGN.md §3).

Each expert slot ``s`` has a centroid ``c_s``: the running mean of the frozen image features of its
task's training data (or, when trained, the learned row). A sample's weights over the candidate
slots (its group's experts) are ``softmax(-dist(q, c_s) / (2 sigma^2))`` with

* ``kind="rbf"`` (the reference): ``dist = ||q - c_s||^2``;
* ``kind="lda"`` (ours): ``dist = (q - c_s)^T Sigma^-1 (q - c_s)`` with ``Sigma`` the pooled
  within-task covariance of all committed tasks, shrunk towards ``mu I`` (Ledoit-Wolf, or a fixed
  shrinkage). Only per-task counts and means plus one shared within-task scatter matrix are kept,
  so it is incremental; ``Sigma`` is refactored once per committed task.

``sigma`` is fixed (> 0) or set from the data: ``sigma^2 = 0.25 * mean within-task dist``, i.e.
``0.5 * sqrt(mean within-task squared distance)`` in the distance actually used. For LDA that mean
is ``tr(Sigma^-1 S_w) / n``, about the feature dimension ``d``, so the temperature follows the
~d scale of squared Mahalanobis distances by construction.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

import torch

DEFAULT_SIGMA = 2.0  # the reference's fixed width, used before any within-task statistics exist


class FeatureMoments:
    """Streaming moments of feature vectors, about a shift point fixed at the first batch.

    The shift keeps the centred moments accurate when features share a large offset.
    ``full=False`` keeps only what a mean and the mean squared deviation need.
    """

    def __init__(self, full: bool = True) -> None:
        self.full = full
        self.n = 0.0
        self.shift: Optional[torch.Tensor] = None  # (D,)
        self.s1: Optional[torch.Tensor] = None  # (D,) sum y
        self.sq = 0.0  # sum ||y||^2
        self.s2: Optional[torch.Tensor] = None  # (D, D) sum y y^T           (full)
        self.s3: Optional[torch.Tensor] = None  # (D,) sum ||y||^2 y         (full)
        self.s4 = 0.0  # sum ||y||^4                                         (full)

    def add(self, x: torch.Tensor) -> None:
        """Accumulate rows of x (B, D)."""
        if x.shape[0] == 0:
            return
        x = x.detach().to(torch.float64)
        if self.shift is None:
            self.shift = x.mean(dim=0)
            self.s1 = torch.zeros_like(self.shift)
            if self.full:
                d = x.shape[1]
                self.s2 = torch.zeros(d, d, dtype=torch.float64)
                self.s3 = torch.zeros(d, dtype=torch.float64)
        y = x - self.shift  # (B, D)
        a = (y * y).sum(dim=1)  # (B,) ||y||^2
        self.n += float(x.shape[0])
        self.s1 += y.sum(dim=0)
        self.sq += float(a.sum())
        if self.full:
            self.s2 += y.T @ y
            self.s3 += a @ y
            self.s4 += float((a * a).sum())

    def mean(self) -> torch.Tensor:
        return self.shift + self.s1 / self.n

    def sum_sq_dev(self) -> float:
        """sum_k ||x_k - mean||^2."""
        m = self.s1 / self.n
        return self.sq - self.n * float(m @ m)

    def scatter(self) -> torch.Tensor:
        """(D, D) sum_k (x_k - mean)(x_k - mean)^T."""
        m = self.s1 / self.n
        return self.s2 - self.n * torch.outer(m, m)

    def sum_fourth_dev(self) -> float:
        """sum_k ||x_k - mean||^4, expanded in the raw moments of y = x - shift."""
        m = self.s1 / self.n
        c = float(m @ m)
        sum_b = float(m @ self.s1)  # sum y.m
        sum_b2 = float(m @ self.s2 @ m)  # sum (y.m)^2
        sum_ab = float(m @ self.s3)  # sum ||y||^2 y.m
        return self.s4 + 4 * sum_b2 + self.n * c * c - 4 * sum_ab + 2 * c * self.sq - 4 * c * sum_b

    def merge(self, other: "FeatureMoments") -> None:
        """Add the rows ``other`` accumulated, as if :meth:`add` had seen them here.

        ``other``'s raw moments are about its own shift; with ``d = other.shift - self.shift`` the
        rows are ``y + d`` about ours, and each sum expands in ``other``'s sums.
        """
        if other.n == 0:
            return
        if self.shift is None:
            self.shift, self.s1 = other.shift.clone(), torch.zeros_like(other.shift)
            if self.full:
                self.s2 = torch.zeros_like(other.s2)
                self.s3 = torch.zeros_like(other.s3)
        d = other.shift - self.shift
        c = float(d @ d)
        d_s1 = float(d @ other.s1)
        sq = other.sq + 2 * d_s1 + other.n * c  # sum ||y + d||^2
        if self.full:
            s2d = other.s2 @ d
            self.s2 += other.s2 + torch.outer(other.s1, d) + torch.outer(d, other.s1) + other.n * torch.outer(d, d)
            self.s3 += other.s3 + 2 * s2d + c * other.s1 + sq * d
            self.s4 += (other.s4 + 4 * float(d @ s2d) + other.n * c * c + 4 * float(d @ other.s3)
                        + 2 * c * other.sq + 4 * c * d_s1)
        self.s1 += other.s1 + other.n * d
        self.sq += sq
        self.n += other.n

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The moments as tensors only (scalars 0-d): partial statistics that cross processes."""
        t, meta = self.state(prefix)
        t.update({f"{prefix}.{k}": torch.tensor(float(meta.get(k, 0.0)), dtype=torch.float64) for k in ("n", "sq", "s4")})
        return t

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str, full: bool) -> "FeatureMoments":
        meta = {k: float(tensors[f"{prefix}.{k}"]) for k in ("n", "sq", "s4")}
        return cls.from_state(tensors, {**meta, "full": full}, prefix)

    def state(self, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if self.shift is None:
            return {}, {"n": 0.0, "full": self.full}
        t = {f"{prefix}.shift": self.shift, f"{prefix}.s1": self.s1}
        if self.full:
            t.update({f"{prefix}.s2": self.s2, f"{prefix}.s3": self.s3})
        return {k: v.clone() for k, v in t.items()}, {"n": self.n, "sq": self.sq, "s4": self.s4, "full": self.full}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any], prefix: str) -> "FeatureMoments":
        out = cls(full=bool(meta["full"]))
        if meta["n"] > 0:
            out.n, out.sq, out.s4 = float(meta["n"]), float(meta["sq"]), float(meta["s4"])
            out.shift = tensors[f"{prefix}.shift"].to(torch.float64).clone()
            out.s1 = tensors[f"{prefix}.s1"].to(torch.float64).clone()
            if out.full:
                out.s2 = tensors[f"{prefix}.s2"].to(torch.float64).clone()
                out.s3 = tensors[f"{prefix}.s3"].to(torch.float64).clone()
        return out


def ledoit_wolf_shrinkage(cov: torch.Tensor, sum_fourth: float, n: float) -> float:
    """Ledoit-Wolf shrinkage of a covariance towards ``mu I`` from centred-sample moments.

    Args:
        cov: (D, D) covariance ``S_w / n`` of the (within-task centred) samples.
        sum_fourth: ``sum_k ||x_k - mean||^4`` over the same samples.
        n: number of samples.
    """
    d = cov.shape[0]
    mu = float(torch.trace(cov)) / d
    frob2 = float((cov * cov).sum())
    delta = (frob2 - 2 * mu * float(torch.trace(cov)) + d * mu * mu) / d  # ||cov - mu I||_F^2 / d
    beta = (sum_fourth / n - frob2) / (d * n)
    if delta <= 0:
        return 0.0
    return min(max(beta, 0.0), delta) / delta


class CentroidRouter:
    """Per-slot centroids, the shared within-task covariance and the softmax over candidates.

    Args:
        kind: ``"rbf"`` (Euclidean) or ``"lda"`` (shared-covariance Mahalanobis).
        sigma: softmax width; 0 = from the data (see module docstring).
        shrinkage: LDA shrinkage in [0, 1]; < 0 = Ledoit-Wolf estimate.
        top_k: keep the k largest weights per sample (renormalised); 0 = all candidates.
    """

    def __init__(self, kind: Literal["rbf", "lda"] = "rbf", sigma: float = 0.0, shrinkage: float = -1.0,
                 top_k: int = 0) -> None:
        if kind not in ("rbf", "lda"):
            raise ValueError(f"CentroidRouter: kind must be 'rbf' or 'lda', got {kind!r}")
        self.kind = kind
        self.sigma = sigma
        self.shrinkage = shrinkage
        self.top_k = top_k
        self.sums: dict[int, torch.Tensor] = {}  # slot -> (D,) float64 feature sum
        self.counts: dict[int, float] = {}  # slot -> samples
        self.trained: dict[int, torch.Tensor] = {}  # slot -> (D,) learned centroid, replaces the mean
        self.scatter: Optional[torch.Tensor] = None  # (D, D) float64 pooled within-task scatter
        self.n_within = 0.0  # samples behind the scatter
        self.sq_within = 0.0  # sum of squared Euclidean deviations from own task mean
        self.fourth_within = 0.0  # sum of fourth powers of those deviations
        self._whiten: Optional[torch.Tensor] = None  # (D, D) float64, L^-1 with Sigma = L L^T
        self._alpha = 0.0  # shrinkage in use
        self._within_dist = 0.0  # mean within-task squared distance in the metric in use (0: unknown)

    # -- statistics --------------------------------------------------------------------------
    def commit(self, slot: int, moments: FeatureMoments, trained: Optional[torch.Tensor] = None) -> None:
        """Add a finished task's slot: its mean (from ``moments``) and its within-task scatter."""
        if moments.n > 0:
            self.sums[slot] = moments.mean() * moments.n
            self.counts[slot] = moments.n
            if moments.full and moments.n > 1:
                scatter = moments.scatter()
                self.scatter = scatter if self.scatter is None else self.scatter + scatter
                self.n_within += moments.n
                self.sq_within += moments.sum_sq_dev()
                self.fourth_within += moments.sum_fourth_dev()
        if trained is not None:
            self.trained[slot] = trained.detach().to(torch.float64).clone()
        self.refactor()

    def refactor(self) -> None:
        """Recompute the shrunk covariance's whitening (once per committed task, or after loading)."""
        self._whiten = None
        self._alpha = 0.0
        self._within_dist = self.sq_within / self.n_within if self.n_within > 0 else 0.0
        if self.kind != "lda" or self.scatter is None or self.n_within <= 0:
            return
        d = self.scatter.shape[0]
        cov = self.scatter / self.n_within
        if self.shrinkage >= 0:
            alpha = self.shrinkage
        else:
            alpha = ledoit_wolf_shrinkage(cov, self.fourth_within, self.n_within)
        mu = float(torch.trace(cov)) / d
        shrunk = (1 - alpha) * cov + alpha * mu * torch.eye(d, dtype=torch.float64)
        jitter = 1e-10 * max(mu, 1e-30)
        L, info = torch.linalg.cholesky_ex(shrunk + jitter * torch.eye(d, dtype=torch.float64))
        if int(info) != 0:  # singular even after shrinkage (alpha = 0 on rank-deficient data)
            shrunk = shrunk + 1e-6 * max(mu, 1e-30) * torch.eye(d, dtype=torch.float64)
            L = torch.linalg.cholesky(shrunk)
        W = torch.linalg.solve_triangular(L, torch.eye(d, dtype=torch.float64), upper=False)
        self._whiten = W
        self._alpha = alpha
        self._within_dist = float(((W @ self.scatter) * W).sum()) / self.n_within  # tr(W S W^T) / n

    @property
    def alpha(self) -> float:
        """The LDA shrinkage in use (0 for RBF)."""
        return self._alpha

    def centroid(self, slot: int) -> Optional[torch.Tensor]:
        """(D,) float64 centroid of a committed slot (None: it saw no image)."""
        if slot in self.trained:
            return self.trained[slot]
        if self.counts.get(slot, 0.0) > 0:
            return self.sums[slot] / self.counts[slot]
        return None

    def sigma2(self, fallback_sq_dist: Optional[float] = None) -> float:
        """Squared softmax width in the units of the distance in use.

        ``fallback_sq_dist``: a mean within-task squared Euclidean distance to use while no task
        is committed (e.g. the current task's probe statistics).
        """
        if self.sigma > 0:
            return self.sigma ** 2
        if self._within_dist > 0:
            return 0.25 * self._within_dist
        if fallback_sq_dist is not None and fallback_sq_dist > 0:
            return 0.25 * fallback_sq_dist
        return DEFAULT_SIGMA ** 2

    # -- routing -----------------------------------------------------------------------------
    def distances(self, q: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
        """(B, D) queries, (S, D) centroids -> (B, S) squared distances (Mahalanobis for LDA)."""
        q = q.to(torch.float64)
        c = centroids.to(torch.float64)
        if self._whiten is not None:
            q = q @ self._whiten.T
            c = c @ self._whiten.T
        diff = q[:, None, :] - c[None, :, :]  # (B, S, D)
        return (diff * diff).sum(dim=-1)

    def weights(
        self,
        q: torch.Tensor,
        centroids: torch.Tensor,
        candidates: torch.Tensor,
        first: torch.Tensor,
        has_image: Optional[torch.Tensor] = None,
        *,
        fallback_sq_dist: Optional[float] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights over all slots.

        Args:
            q: (B, D) image features.
            centroids: (S, D) one row per slot (rows of non-routable slots are ignored); may
                carry gradient (a trained centroid row).
            candidates: (B, S) bool: the slots each sample may use (its group's experts that
                have a centroid).
            first: (B,) slot each sample uses without an image (its group's first expert).
            has_image: (B,) bool; None = every sample has one.
            fallback_sq_dist: see :meth:`sigma2`.

        Returns:
            (weights (B, S) float32 rows summing to 1, choice (B,) argmax slot).
        """
        B, S = candidates.shape
        logits = -self.distances(q, centroids) / (2.0 * self.sigma2(fallback_sq_dist))  # (B, S)
        logits = logits.masked_fill(~candidates, float("-inf"))
        if self.top_k > 0 and self.top_k < S:
            kth = logits.topk(self.top_k, dim=1).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        routable = candidates.any(dim=1)
        if has_image is not None:
            routable &= has_image.to(torch.bool)
        safe = torch.where(routable[:, None], logits, torch.zeros_like(logits))
        soft = torch.softmax(safe, dim=1)
        onehot = torch.zeros(B, S, dtype=soft.dtype)
        onehot[torch.arange(B), first.long()] = 1.0
        pi = torch.where(routable[:, None], soft, onehot).to(torch.float32)
        return pi, pi.detach().argmax(dim=1)

    # -- state -------------------------------------------------------------------------------
    def state(self, prefix: str = "router") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        for slot, s in self.sums.items():
            tensors[f"{prefix}.sum.{slot}"] = s.clone()
        for slot, c in self.trained.items():
            tensors[f"{prefix}.trained.{slot}"] = c.clone()
        if self.scatter is not None:
            tensors[f"{prefix}.scatter"] = self.scatter.clone()
        meta = {
            "counts": {str(k): v for k, v in self.counts.items()},
            "trained": sorted(self.trained),
            "n_within": self.n_within,
            "sq_within": self.sq_within,
            "fourth_within": self.fourth_within,
        }
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], prefix: str = "router") -> None:
        self.counts = {int(k): float(v) for k, v in meta["counts"].items()}
        self.sums = {s: tensors[f"{prefix}.sum.{s}"].to(torch.float64).clone() for s in self.counts}
        self.trained = {int(s): tensors[f"{prefix}.trained.{s}"].to(torch.float64).clone() for s in meta["trained"]}
        scatter = tensors.get(f"{prefix}.scatter")
        self.scatter = None if scatter is None else scatter.to(torch.float64).clone()
        self.n_within = float(meta["n_within"])
        self.sq_within = float(meta["sq_within"])
        self.fourth_within = float(meta["fourth_within"])
        self.refactor()
