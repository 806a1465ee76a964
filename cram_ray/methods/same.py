"""SAME (seed system, ICML 2026): a routed expert per task on the FFN, with spectral-aware routing,
curvature-aware expert updates and adaptive expert activation (docs/DESIGN.md §4).

Adapter: on the gate/up/down projections of the language model's MLP, a :class:`SameLinear` wraps
an :class:`~cram_ray.experts.adapter.ExpertLinear` (one rank-r slot per task) and owns a linear
router on the layer input: one row per expert; the router's logits are averaged over the
sample's prompt tokens, so a sample gets one weight vector per layer.

Training task t (as the reference, every expert 0..t and the router rows train; with
``method.same.freeze_old`` only expert t and the router rows):

* routing: ``softmax`` of the averaged logits over experts 0..t, minus the experts the adaptive
  activation masks; the experts' factors are mixed with cross terms, ``(sum_i w_i B_i)(sum_i w_i A_i) x``
  (:func:`mixed_delta`);
* sketch (from the task's first step, refreshed every ``method.same.every`` steps): a randomized range
  finder (k = ``method.same.k``) on the centred router inputs of the step gives directions V and the
  standard deviations S of the inputs along them;
* spectral-aware routing (from step ``method.same.start``): the directions up to ``method.same.energy``
  of ``sum S^2`` are kept; the router gradient's component along V is scaled per direction by
  ``clamp(inv / max(inv), scale_min, scale_max)``, ``inv = 1 / (S_smooth + 1e-6)``, S_smooth the
  mean of each singular value and the ``method.same.windows - 1`` before it; the rest of the
  gradient is unchanged (:func:`spectral_factors`, :func:`project_router_grad`);
* curvature-aware scaling (tasks >= 1): with U, S the previous task's last sketch (up to
  ``method.same.energy``), every trained expert's A gradient is
  ``g <- U diag(1 / (S + mu)) U^T g + (1 / mu) (I - U U^T) g`` on the input dimension
  (:func:`curvature_transform`);
* adaptive activation: per layer, util = EMA(0.95) of the mean routing probability and
  importance = EMA(0.95) of mean(pi * ||x||^2); experts with
  ``minmax(util) - minmax(importance) < method.same.mask_threshold`` are masked from the next step
  on, never the current task's (:func:`activation_mask`).

Inference: per layer ``softmax(logits / E) * prior``, top-2, renormalised, with the prior
``softmax(28 (0.2 cos_img + 0.8 cos_txt))`` over the committed tasks' mean features (anchors).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from cram_ray.config import StreamConfig
from cram_ray.data.records import TaskInfo
from cram_ray.experts.adapter import ExpertLinear, RoutingContext
from cram_ray.methods.base import Batch, ContinualMethod, Phase
from cram_ray.methods.common import (
    EXPERT_SCALE, TaskAnchors, TaskSlots, check_meta, freeze, task_from_json, task_to_json,
)
from cram_ray.methods.layers import replace_linears

STATE_VERSION = 2


# -- the math, on plain tensors ---------------------------------------------------------------
def energy_rank(variances: torch.Tensor, energy: float) -> int:
    """Smallest r with ``sum(v[:r]) >= energy * sum(v)`` for descending non-negative ``v`` (>= 1)."""
    v = variances.clamp_min(0).to(torch.float64)
    total = float(v.sum())
    if total <= 0.0:
        return 1
    share = torch.cumsum(v, 0) / total
    return int(min(len(v), int((share < energy - 1e-12).sum()) + 1))


def randomized_range_finder(X: torch.Tensor, k: int, *, oversample: int = 8, power_iters: int = 2,
                            generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k principal directions of the rows of X (N, d) by a randomized range finder (Halko et al.).

    Returns ``V`` (d, k') with orthonormal columns (the right singular vectors) and ``S`` (k',)
    the singular values of X, descending, k' = min(k, N, d). Exact when rank(X) <= k' + oversample.
    """
    X = X.to(torch.float64)
    n, d = X.shape
    k = min(k, n, d)
    width = min(k + oversample, n, d)
    omega = torch.randn(n, width, generator=generator, dtype=torch.float64)
    Q, _ = torch.linalg.qr(X.T @ omega)  # (d, width): a basis of the row space's dominant part
    for _ in range(power_iters):
        Q, _ = torch.linalg.qr(X.T @ (X @ Q))
    U_small, S, Wh = torch.linalg.svd(X @ Q, full_matrices=False)  # X Q = U S W^T -> X ~ U S (Q W)^T
    V = Q @ Wh.T  # (d, width)
    return V[:, :k], S[:k]


def sketch(X: torch.Tensor, k: int, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal directions V (d, k') of the rows of X (N, d) and the standard deviation S (k',) of the
    centred rows along each, descending (the reference's scale: the curvature damping ``mu`` is
    added to S, so S must be a standard deviation, not a singular value of X)."""
    Xc = X.to(torch.float64) - X.to(torch.float64).mean(0)
    V, sv = randomized_range_finder(Xc, k, generator=generator)
    return V, sv / max(X.shape[0] - 1, 1) ** 0.5


def spectral_factors(S: torch.Tensor, window: int, lo: float, hi: float) -> torch.Tensor:
    """Per-direction router-gradient factors, (r,): ``clamp(inv / max(inv), lo, hi)`` with
    ``inv[j] = 1 / (mean(S[max(0, j - window + 1) .. j]) + 1e-6)``.

    S is descending, so ``inv`` grows with j and its max is the last entry: the factors lie in
    ``[lo, 1]`` whatever ``hi`` is (the reference's ``[0.8, 1.2]`` acts as ``[0.8, 1.0]``).
    """
    S = S.to(torch.float64)
    csum = torch.cat([S.new_zeros(1), torch.cumsum(S, 0)])
    j = torch.arange(S.numel())
    start = (j - window + 1).clamp_min(0)
    smooth = (csum[j + 1] - csum[start]) / (j + 1 - start)
    inv = 1.0 / (smooth + 1e-6)
    return (inv / inv.max()).clamp(lo, hi)


def project_router_grad(G: torch.Tensor, V: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Scale the component of each row of G (E, d) along the columns of V (d, r) by ``factors``.

    ``G <- G (I - V V^T) + G V diag(f) V^T``: the out-of-subspace part is left as it was.
    """
    V = V.to(G.dtype)
    coef = G @ V  # (E, r)
    return G + (coef * (factors.to(G.dtype) - 1.0)) @ V.T


def curvature_transform(G: torch.Tensor, U: torch.Tensor, S: torch.Tensor, mu: float) -> torch.Tensor:
    """``G <- G U diag(1/(S+mu)) U^T + (1/mu) G (I - U U^T)`` for G (r, d) acting on the input dim.

    Row by row this is docs/DESIGN.md's ``g <- U diag(1/(S+mu)) U^T g + (1/mu)(I - U U^T) g``.
    """
    U = U.to(G.dtype)
    coef = G @ U  # (r, k)
    inside = (coef / (S.to(G.dtype) + mu)) @ U.T
    outside = (G - coef @ U.T) / mu
    return inside + outside


def mixed_delta(x: torch.Tensor, weights: torch.Tensor, experts: Sequence[Any]) -> torch.Tensor:
    """``(sum_i w_i B_i)(sum_i w_i A_i) x`` per sample, the reference's mixing (cross terms included).

    Args:
        x: (B, T, d_in) layer input.
        weights: (B, n) routing weights of experts 0..n-1.
        experts: n :class:`~cram_ray.experts.adapter.LowRank` of one rank r.
    """
    w = weights.to(x.dtype)
    A = torch.stack([e.A for e in experts])  # (n, r, d_in)
    B = torch.stack([e.B for e in experts])  # (n, d_out, r)
    h = torch.einsum("btd,nrd,bn->btr", x, A, w)  # (B, T, r)
    return torch.einsum("btr,nor,bn->bto", h, B, w)  # (B, T, d_out)


def minmax(v: torch.Tensor) -> torch.Tensor:
    """(v - min) / (max - min); zeros when all entries are equal."""
    span = v.max() - v.min()
    return torch.zeros_like(v) if float(span) <= 0.0 else (v - v.min()) / span


def activation_mask(util: torch.Tensor, importance: torch.Tensor, threshold: float, current: int) -> torch.Tensor:
    """(E,) bool, True = masked: ``minmax(util) - minmax(importance) < threshold``, never ``current``."""
    score = minmax(util.to(torch.float64)) - minmax(importance.to(torch.float64))
    mask = score < threshold
    mask[current] = False
    return mask


def training_weights(logits: torch.Tensor, masked: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, E) averaged router logits -> softmax over the experts not masked."""
    if masked is not None and bool(masked.any()):
        logits = logits.masked_fill(masked.to(logits.device)[None, :], float("-inf"))
    return torch.softmax(logits, dim=-1)


def inference_weights(logits: torch.Tensor, prior: torch.Tensor, top_k: int) -> torch.Tensor:
    """``softmax(logits / E) * prior``, the top-k kept per sample, renormalised; (B, E)."""
    n = logits.shape[-1]
    p = torch.softmax(logits / n, dim=-1) * prior.to(logits.dtype)
    k = min(top_k, n)
    idx = p.topk(k, dim=-1).indices
    kept = torch.zeros_like(p).scatter(-1, idx, p.gather(-1, idx))
    return kept / kept.sum(-1, keepdim=True).clamp_min(1e-30)


# -- the adapter layer ------------------------------------------------------------------------
@dataclass
class SameRouting:
    """What every SameLinear reads; set by the method's ``route`` before each forward pass."""

    active: bool = False  # False: no expert contributes
    training: bool = False
    n_experts: int = 0  # experts 0..n-1 are routed over
    token_mask: Optional[torch.Tensor] = None  # (B, T) averaging weights over the prompt tokens
    prior: Optional[torch.Tensor] = None  # (B, n) inference prior over tasks
    top_k: int = 2
    version: int = 0  # bumped by every route(): a layer computes its weights once per version


class SameLinear(nn.Module):
    """An ExpertLinear whose per-sample routing weights come from its own token-averaged router.

    Args:
        inner: the expert layer (its routing context is private to this wrapper).
        routing: the shared routing settings of the current batch.

    The weights are computed at the first forward after ``route`` and reused until the next
    ``route``: during generation that is the prompt's forward, later decoding steps keep them.
    """

    def __init__(self, inner: ExpertLinear, routing: SameRouting) -> None:
        super().__init__()
        self.inner = inner
        self.routing = routing
        self.router = nn.ParameterDict()  # str(slot) -> (d_in,) router row of that expert
        self.mask: Optional[torch.Tensor] = None  # (n,) bool experts masked while training
        self.last_input: Optional[torch.Tensor] = None  # (B, T, d_in) input of the routing forward
        self.weights: Optional[torch.Tensor] = None  # (B, n) routing weights of the current version
        self._version = -1

    @property
    def base_layer(self) -> nn.Module:
        """The wrapped layer, as every adapter names it (so a reused base can be stripped of it)."""
        return self.inner

    def add_row(self, slot: int, row: Optional[torch.Tensor] = None) -> None:
        value = torch.zeros(self.inner.in_features) if row is None else row
        self.router[str(slot)] = nn.Parameter(value.detach().clone().to(torch.float32), requires_grad=False)

    def rows(self, n: int) -> torch.Tensor:
        return torch.stack([self.router[str(s)] for s in range(n)])  # (n, d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.routing
        if not r.active or r.n_experts == 0:
            self.inner.context.weights = None
            return self.inner(x)
        if self._version != r.version:
            if r.token_mask is None or r.token_mask.shape != x.shape[:2]:
                raise ValueError(f"SameLinear: token mask {None if r.token_mask is None else tuple(r.token_mask.shape)}"
                                 f" does not match the routed input {tuple(x.shape[:2])}")
            W = self.rows(r.n_experts)
            logits = torch.einsum("bt,btd,ed->be", r.token_mask.to(W.dtype), x.to(W.dtype), W)  # (B, n)
            if r.training:
                self.weights = training_weights(logits, self.mask)
            else:
                self.weights = inference_weights(logits, r.prior, r.top_k)
            self.last_input = x.detach()
            self._version = r.version
        self.inner.context.weights = None
        out = self.inner(x)
        experts = [self.inner.slot(s) for s in range(r.n_experts)]
        delta = mixed_delta(x.to(experts[0].A.dtype), self.weights, experts) * self.inner.scale
        return out + delta.to(out.dtype)


# -- the method -------------------------------------------------------------------------------
def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over data-parallel ranks (itself on one rank): every rank masks alike."""
    if _world() == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / _world()


def _from_rank0(V: torch.Tensor, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 0's range-finder result on every rank, so every rank edits the router gradient alike."""
    if _world() == 1:
        return V, S
    shape = torch.tensor(list(V.shape), dtype=torch.long)
    dist.broadcast(shape, 0)
    if dist.get_rank() != 0:
        V = torch.empty(*shape.tolist(), dtype=torch.float64)
        S = torch.empty(int(shape[1]), dtype=torch.float64)
    V, S = V.contiguous(), S.contiguous()
    dist.broadcast(V, 0)
    dist.broadcast(S, 0)
    return V, S


def _token_masks(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) averaging weights over the prompt tokens, and (B, T) bool of every real token."""
    valid = batch["attention_mask"].to(torch.bool)
    prompt = valid & (batch["labels"] == -100) if "labels" in batch else valid
    w = prompt.to(torch.float32)
    return w / w.sum(1, keepdim=True).clamp_min(1.0), valid


class LayerStats:
    """One layer's statistics of the task in training: utility/importance EMAs and the last sketch
    of the router's inputs (directions, standard deviations, router-gradient factors)."""

    def __init__(self) -> None:
        self.util: Optional[torch.Tensor] = None  # (E,)
        self.imp: Optional[torch.Tensor] = None  # (E,)
        self.V: Optional[torch.Tensor] = None  # (d, k) sketch directions
        self.S: Optional[torch.Tensor] = None  # (k,) standard deviations along them
        self.factors: Optional[torch.Tensor] = None  # (r,) router-gradient factors, r <= k

    def update_ema(self, util: torch.Tensor, imp: torch.Tensor, decay: float) -> None:
        if self.util is None or self.util.shape != util.shape:
            self.util, self.imp = util.clone(), imp.clone()
        else:
            self.util = decay * self.util + (1 - decay) * util
            self.imp = decay * self.imp + (1 - decay) * imp

    _TENSORS = ("util", "imp", "V", "S", "factors")

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{k}": getattr(self, k).clone() for k in self._TENSORS if getattr(self, k) is not None}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], prefix: str) -> "LayerStats":
        out = cls()
        for k in cls._TENSORS:
            if f"{prefix}.{k}" in tensors:
                setattr(out, k, tensors[f"{prefix}.{k}"].clone())
        return out


class Same(ContinualMethod):
    """One FFN expert per task behind token-averaged routers; see the module docstring."""

    name = "same"
    needs_features = frozenset({"image", "text"})

    def __init__(self, cfg: StreamConfig) -> None:
        super().__init__(cfg)
        self.hp = cfg.method.same
        self.slots = TaskSlots(cfg.method.rank, cfg.train.seed)
        self.routing = SameRouting(top_k=self.hp.top_k)
        self.layers: dict[str, SameLinear] = {}
        self.anchors = TaskAnchors()
        self.stats: dict[str, LayerStats] = {}
        self.curvature: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> previous task's (U, S)
        self.training = False
        self._gen = torch.Generator().manual_seed(cfg.train.seed)

    # -- lifecycle ---------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        freeze(model.parameters())

        def build(name: str, linear: nn.Linear, block: int) -> SameLinear:
            inner = ExpertLinear(linear, context=RoutingContext(), scale=EXPERT_SCALE, block=block)
            return SameLinear(inner, self.routing)

        self.layers = replace_linears(model, self.hp.target_modules, build)
        self.slots.layers = {name: layer.inner for name, layer in self.layers.items()}
        self.stats = {name: LayerStats() for name in self.layers}

    def begin_task(self, task: TaskInfo) -> None:
        super().begin_task(task)
        self.training = False
        self.slots.open(task.index)
        for layer in self.layers.values():
            layer.add_row(task.index)
        self.stats = {name: LayerStats() for name in self.layers}

    def allocate(self) -> dict[str, Any]:
        return {"slot": self.task.index, **self.slots.ranks(self.task.index)}

    def _expert_params(self) -> list[nn.Parameter]:
        """The experts the current task trains: all so far (the reference), or its own (freeze_old)."""
        if self.hp.freeze_old:
            return self.slots.params(self.task.index)
        return [p for t in range(self.task.index + 1) for p in self.slots.params(t)]

    def begin_train(self) -> None:
        freeze(self.slots.all_params())
        for p in self._expert_params() + self._router_params():
            p.requires_grad_(True)
        self.training = True

    def observe(self, batch: Batch, phase: Phase) -> None:
        if phase == "aggregate":
            self.anchors.observe(batch)

    def take_aggregate_statistics(self) -> dict[str, torch.Tensor]:
        return self.anchors.take()

    def merge_aggregate_statistics(self, parts: list[dict[str, torch.Tensor]]) -> None:
        self.anchors.merge(parts)

    def end_task(self) -> dict[str, Any]:
        freeze(self.slots.all_params())
        freeze(self._router_params())
        self.training = False
        self.anchors.commit(self.task.index)
        ranks = {}
        for name, st in self.stats.items():
            if st.V is not None:
                r = energy_rank(st.S.pow(2), self.hp.energy)
                self.curvature[name] = (st.V[:, :r].to(torch.float32), st.S[:r].to(torch.float32))
                ranks[name] = r
        masked = {n: int(l.mask.sum()) for n, l in self.layers.items() if l.mask is not None}
        self.stats = {name: LayerStats() for name in self.layers}
        for layer in self.layers.values():
            layer.mask = None
        return {"slot": self.task.index, "experts": len(self.slots),
                "curvature_rank_mean": sum(ranks.values()) / max(1, len(ranks)),
                "masked_experts_mean": sum(masked.values()) / max(1, len(masked))}

    # -- per step ----------------------------------------------------------------------------
    def _router_params(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in layer.router.values()]

    def trainable_parameters(self) -> list[nn.Parameter]:
        if not self.training:
            return []
        return self._expert_params() + self._router_params()

    def route(self, batch: Batch, *, training: bool) -> None:
        r = self.routing
        r.version += 1
        r.prior = None
        if training:
            if not self.training:
                raise RuntimeError("Same.route(training=True): call begin_train first")
            r.token_mask, _ = _token_masks(batch)
            r.active, r.training, r.n_experts = True, True, self.task.index + 1
            return
        n = len(self.anchors)
        r.training, r.n_experts, r.active = False, n, n > 0
        r.token_mask, _ = _token_masks(batch)
        if n:
            sim = self.anchors.scores(batch, self.hp.prior_image_weight)
            r.prior = torch.softmax(self.hp.prior_temperature * sim, dim=-1).to(torch.float32)

    def before_optimizer_step(self, step: int) -> None:
        """Statistics, adaptive mask, sketch, spectral router projection and curvature scaling (see the
        module docstring). Under data parallelism the gradients are already averaged; the masks'
        statistics are averaged over ranks and the sketch is rank 0's, so every rank edits alike."""
        if not self.training:
            return
        hp = self.hp
        mask = self.routing.token_mask  # (B, T) prompt-token averaging weights
        trained = range(self.task.index + 1) if not hp.freeze_old else [self.task.index]
        for name, layer in self.layers.items():
            st = self.stats[name]
            x, pi = layer.last_input, layer.weights
            if x is None or pi is None:
                continue
            pi = pi.detach().to(torch.float64)
            xsq = torch.einsum("bt,bt->b", mask.to(torch.float64), x.to(torch.float64).pow(2).sum(-1))  # (B,)
            util, imp = _mean_over_ranks(torch.stack([pi.mean(0), (pi * xsq[:, None]).mean(0)]))
            st.update_ema(util, imp, hp.ema)
            layer.mask = activation_mask(st.util, st.imp, hp.mask_threshold, self.task.index)
            if st.V is None or step % hp.every == 0:
                st.V, st.S = _from_rank0(*sketch(x[mask > 0], hp.k, generator=self._gen))
                r = energy_rank(st.S.pow(2), hp.energy)
                st.factors = spectral_factors(st.S[:r], hp.windows, hp.scale_min, hp.scale_max)
            if step >= hp.start:
                V = st.V[:, :st.factors.numel()]
                rows = [layer.router[str(s)] for s in range(self.task.index + 1)]
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in rows]
                new = project_router_grad(torch.stack(grads).to(torch.float64), V, st.factors)
                for p, g in zip(rows, new):
                    p.grad = g.to(p.dtype)
            if name in self.curvature:
                U, S = self.curvature[name]
                for t in trained:
                    A = layer.inner.slot(t).A
                    if A.grad is not None:
                        A.grad = curvature_transform(A.grad.to(torch.float64), U, S, hp.mu).to(A.dtype)

    # -- reporting ---------------------------------------------------------------------------
    def routed_task(self) -> Optional[torch.Tensor]:
        r = self.routing
        if r.training:
            return None
        if not r.active:
            return None if r.token_mask is None else torch.full((r.token_mask.shape[0],), -1, dtype=torch.long)
        current = [l.weights for l in self.layers.values() if l._version == r.version and l.weights is not None]
        votes = torch.stack(current).mean(0) if current else r.prior  # (B, n)
        return votes.argmax(-1).long()

    def params_added(self) -> int:
        if self.task is None:
            return 0
        rows = sum(l.router[str(self.task.index)].numel() for l in self.layers.values()
                   if str(self.task.index) in l.router)
        return self.slots.numel(self.task.index) + rows

    def ranks(self) -> dict[str, Any]:
        return {} if self.task is None else self.slots.ranks(self.task.index)

    # -- state -------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, expert_ranks = self.slots.state()
        for name, layer in self.layers.items():
            for slot, row in layer.router.items():
                tensors[f"router.{name}.{slot}"] = row.detach().clone()
            if layer.mask is not None:
                tensors[f"mask.{name}"] = layer.mask.clone()
        for name, (U, S) in self.curvature.items():
            tensors[f"curvature.{name}.U"] = U.clone()
            tensors[f"curvature.{name}.S"] = S.clone()
        for name, st in self.stats.items():
            tensors.update(st.state(f"stats.{name}"))
        anchor_t, anchor_meta = self.anchors.state()
        tensors.update(anchor_t)
        meta = {
            "method": self.name, "version": STATE_VERSION, "expert_ranks": expert_ranks,
            "router_rows": {name: len(layer.router) for name, layer in self.layers.items()},
            "curvature": sorted(self.curvature), "anchors": anchor_meta,
            "task": task_to_json(self.task),
        }
        tensors["generator"] = self._gen.get_state()
        return {k: v.detach().contiguous() for k, v in tensors.items()}, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        check_meta(meta, self.name, STATE_VERSION)
        self.slots.load_state(tensors, meta["expert_ranks"])
        for name, layer in self.layers.items():
            layer.router = nn.ParameterDict()
            for slot in range(int(meta["router_rows"].get(name, 0))):
                layer.add_row(slot, tensors[f"router.{name}.{slot}"])
            layer.mask = tensors[f"mask.{name}"].clone() if f"mask.{name}" in tensors else None
        self.curvature = {name: (tensors[f"curvature.{name}.U"].clone(), tensors[f"curvature.{name}.S"].clone())
                          for name in meta["curvature"]}
        self.stats = {name: LayerStats.from_state(tensors, f"stats.{name}") for name in self.layers}
        self.anchors.load_state(tensors, meta["anchors"])
        self.task = task_from_json(meta["task"])
        self._gen.set_state(tensors["generator"].clone())
        self.training = False
