"""The adapter layer of every expert method: a frozen linear plus routed low-rank expert slots.

For a target linear ``W0`` (``self.base_layer``) and routing weights ``pi`` (one row per sample):

    y = W0 x + sum_s pi_s * scale * B_s A_s x   (+ buf_scale * B_buf A_buf x while probing)

Each expert slot ``s`` is a :class:`LowRank` pair with its own rank (ranks may differ per layer
and per slot). The optional probe buffer is one more :class:`LowRank` used only while probing.
Routing weights come from a :class:`RoutingContext` that the method sets before each forward
pass; every adapted linear of a transformer block reads the same context (and, when routing is
per sample only, every block shares one). A slot whose routing column is zero for the whole
batch is skipped, so unrouted experts cost nothing and contribute exactly nothing.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

# attention projections of Llama-style language models (the default targets, docs/DESIGN.md §3)
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# feed-forward projections of Llama-style language models (optional targets)
FFN_TARGETS = ("gate_proj", "up_proj", "down_proj")


@dataclass
class RoutingContext:
    """What the adapted linears of one transformer block read at every forward pass.

    Attributes:
        weights: (B, n_slots) routing weights; column ``s`` weighs expert slot ``s``. None: no
            expert contributes.
        probe: add the probe buffer's update (scaled by ``buf_scale``) to every sample.
        capture_mask: (B, T) averaging weights over token positions (each row sums to 1, or is 0
            for a sample without such positions). When set, every adapted linear stores
            ``captured = sum_t mask[b, t] * x[b, t]`` (B, d_in), the mean input over the masked
            positions, for losses computed after the forward pass.
    """

    weights: Optional[torch.Tensor] = None
    probe: bool = False
    capture_mask: Optional[torch.Tensor] = None

    def clear(self) -> None:
        self.weights = None
        self.probe = False
        self.capture_mask = None


class LowRank(nn.Module):
    """One low-rank update ``B A`` with ``A`` (r, d_in) and ``B`` (d_out, r)."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor) -> None:
        super().__init__()
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(
                f"LowRank: expected A (r, d_in) and B (d_out, r), got {tuple(A.shape)} and {tuple(B.shape)}"
            )
        self.A = nn.Parameter(A.detach().clone(), requires_grad=False)
        self.B = nn.Parameter(B.detach().clone(), requires_grad=False)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def numel(self) -> int:
        return self.A.numel() + self.B.numel()

    def delta(self, x: torch.Tensor, weight: float | torch.Tensor = 1.0) -> torch.Tensor:
        """``weight * B A x`` for x (..., d_in) -> (..., d_out). The weight (a number, or one per
        sample broadcasting against ``A x``) multiplies the rank-r activations, not the d_out-wide
        output: the same update for a fraction of the elementwise work, forward and backward."""
        low = x @ self.A.T
        if not (isinstance(weight, float) and weight == 1.0):
            low = low * weight
        return low @ self.B.T


def lora_init(rank: int, d_in: int, d_out: int, *, generator: Optional[torch.Generator] = None,
              dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The usual LoRA start: A Kaiming-uniform (a = sqrt(5), as nn.Linear), B zero, so B A = 0."""
    bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)) on a (rank, d_in) weight
    A = (torch.rand(rank, d_in, generator=generator, dtype=dtype) * 2.0 - 1.0) * bound
    return A, torch.zeros(d_out, rank, dtype=dtype)


class ExpertLinear(nn.Module):
    """A frozen linear with routed expert slots and an optional probe buffer.

    Args:
        base_layer: the target ``nn.Linear``; frozen, its output is returned unchanged when the
            adapter is disabled or nothing is routed.
        context: the routing context of this layer's transformer block.
        buf_rank: rank of the probe buffer (0: no buffer).
        scale: factor of every expert slot's update (alpha / r = 2 in CRAM).
        buf_scale: factor of the probe buffer's update.
        block: transformer block index of this layer (-1 when it sits outside a block).
    """

    def __init__(self, base_layer: nn.Linear, *, context: RoutingContext, buf_rank: int = 0,
                 scale: float = 2.0, buf_scale: float = 2.0, block: int = -1) -> None:
        super().__init__()
        self.base_layer = base_layer
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.context = context
        self.scale = float(scale)
        self.buf_scale = float(buf_scale)
        self.block = block
        self.enabled = True
        self.experts = nn.ModuleDict()
        self.buffer: Optional[LowRank] = None
        if buf_rank > 0:
            self.buffer = LowRank(*lora_init(buf_rank, self.in_features, self.out_features))
        self.captured: Optional[torch.Tensor] = None  # (B, d_in) mean input over the captured positions

    # -- slots -----------------------------------------------------------------------------
    def _param_dtype(self) -> torch.dtype:
        dtype = self.base_layer.weight.dtype
        return dtype if dtype.is_floating_point and dtype != torch.float16 else torch.float32

    def add_slot(self, slot: int, A: Optional[torch.Tensor] = None, B: Optional[torch.Tensor] = None, *,
                 rank: Optional[int] = None, generator: Optional[torch.Generator] = None) -> LowRank:
        """Create expert slot ``slot`` from given factors, or LoRA-initialised with ``rank``.

        The new slot is frozen (``requires_grad=False``); the method decides what trains.
        """
        key = str(slot)
        if key in self.experts:
            raise ValueError(f"ExpertLinear: slot {slot} already exists")
        if A is None or B is None:
            if rank is None:
                raise ValueError("ExpertLinear.add_slot: give A and B, or a rank")
            A, B = lora_init(rank, self.in_features, self.out_features, generator=generator)
        if A.shape[1] != self.in_features or B.shape[0] != self.out_features:
            raise ValueError(
                f"ExpertLinear.add_slot: expected A (r, {self.in_features}) and B ({self.out_features}, r), "
                f"got {tuple(A.shape)} and {tuple(B.shape)}"
            )
        dtype = self._param_dtype()
        device = self.base_layer.weight.device
        self.experts[key] = LowRank(A.to(device=device, dtype=dtype), B.to(device=device, dtype=dtype))
        return self.experts[key]

    def slot(self, slot: int) -> LowRank:
        return self.experts[str(slot)]

    def has_slot(self, slot: int) -> bool:
        return str(slot) in self.experts

    def remove_slot(self, slot: int) -> None:
        del self.experts[str(slot)]

    def slot_ranks(self) -> dict[int, int]:
        return {int(k): m.rank for k, m in self.experts.items()}

    def reset_buffer(self, generator: Optional[torch.Generator] = None) -> None:
        """Re-initialise the probe buffer LoRA-style (B = 0), keeping its rank."""
        if self.buffer is None:
            return
        A, B = lora_init(self.buffer.rank, self.in_features, self.out_features, generator=generator)
        with torch.no_grad():
            self.buffer.A.copy_(A)
            self.buffer.B.copy_(B)

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        ctx = self.context
        if not self.enabled:
            return out
        if ctx.capture_mask is not None:
            self._capture(x, ctx.capture_mask)
        if ctx.weights is None and not ctx.probe:
            return out
        xa = x.to(self._param_dtype())
        delta: Optional[torch.Tensor] = None
        if ctx.weights is not None:
            weights = ctx.weights
            if weights.shape[0] != x.shape[0]:
                raise ValueError(
                    f"ExpertLinear: routing weights for {weights.shape[0]} samples, input has {x.shape[0]}"
                )
            active = (weights != 0).any(dim=0).nonzero().flatten().tolist()
            for s in active:
                key = str(s)
                if key not in self.experts:
                    raise KeyError(f"ExpertLinear: routing weight on slot {s}, which this layer does not hold")
                w = weights[:, s].to(xa.dtype).reshape((-1,) + (1,) * (x.dim() - 1))  # (B, 1, ..., 1)
                term = self.experts[key].delta(xa, w * self.scale)
                delta = term if delta is None else delta + term
        if ctx.probe and self.buffer is not None:
            term = self.buffer.delta(xa, self.buf_scale)
            delta = term if delta is None else delta + term
        if delta is None:
            return out
        return out + delta.to(out.dtype)

    def _capture(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        if x.dim() != 3 or mask.shape != x.shape[:2]:
            raise ValueError(
                f"ExpertLinear: capture mask of shape {tuple(mask.shape)} does not match input {tuple(x.shape[:-1])}"
            )
        self.captured = torch.einsum("bt,btd->bd", mask.to(x.dtype), x)  # (B, d_in)


# -- injection -------------------------------------------------------------------------------
_BLOCK_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def block_index(name: str) -> int:
    """The transformer block index of a module name: its first numeric path component (-1: none)."""
    match = _BLOCK_RE.search(name)
    return int(match.group(1)) if match else -1


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def _resolve_scope(model: nn.Module, scope: Optional[str]) -> Optional[str]:
    if scope != "auto":
        return scope
    names = (n for n, _ in model.named_modules())
    return "language_model" if any("language_model" in n.split(".") for n in names) else None


def inject_experts(
    model: nn.Module,
    patterns: Iterable[str] = ATTENTION_TARGETS,
    *,
    buf_rank: int = 0,
    scale: float = 2.0,
    buf_scale: float = 2.0,
    scope: Optional[str] = "auto",
    context: Optional[RoutingContext] = None,
    per_block_context: bool = False,
) -> dict[str, ExpertLinear]:
    """Replace the target linears of ``model`` by :class:`ExpertLinear` wrappers, in place.

    Args:
        model: the model; its own parameters are not touched (wrapped linears are frozen).
        patterns: module-name suffixes, e.g. ``"q_proj"`` or ``"mlp.down_proj"``; a linear is a
            target when its qualified name equals a pattern or ends with ``"." + pattern``.
        buf_rank, scale, buf_scale: see :class:`ExpertLinear`.
        scope: only modules under a path component of this name are targets (e.g.
            ``"language_model"``, so the vision tower's own ``q_proj`` stay untouched); None =
            the whole model; ``"auto"`` = ``"language_model"`` when the model has one, else None.
        context: the routing context every layer shares (created when None); ignored with
            ``per_block_context``.
        per_block_context: one fresh context per transformer block instead of a shared one.

    Returns:
        qualified module name -> the injected layer, in module order.
    """
    patterns = list(patterns)
    scope = _resolve_scope(model, scope)
    shared = context if context is not None else RoutingContext()
    per_block: dict[int, RoutingContext] = {}
    targets = [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and _matches(name, patterns)
        and (scope is None or scope in name.split("."))
    ]
    if not targets:
        raise ValueError(f"inject_experts: no nn.Linear named {patterns} (scope {scope!r}) in the model")
    layers: dict[str, ExpertLinear] = {}
    for name, module in targets:
        block = block_index(name[name.index(scope) + len(scope):] if scope else name)
        ctx = per_block.setdefault(block, RoutingContext()) if per_block_context else shared
        layer = ExpertLinear(module, context=ctx, buf_rank=buf_rank, scale=scale, buf_scale=buf_scale, block=block)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
        layers[name] = layer
    return layers


def contexts_of(layers: dict[str, ExpertLinear]) -> list[RoutingContext]:
    """The distinct routing contexts of the layers, in block order."""
    seen: dict[int, RoutingContext] = {}
    for layer in layers.values():
        seen.setdefault(id(layer.context), layer.context)
    return list(seen.values())


# -- save / load -----------------------------------------------------------------------------
def export_slots(layers: dict[str, ExpertLinear], slots: Optional[Iterable[int]] = None,
                 prefix: str = "experts") -> tuple[dict[str, torch.Tensor], dict[str, dict[str, int]]]:
    """Expert slots as (safetensors-ready tensors, JSON meta).

    Tensors are named ``{prefix}.{layer}.{slot}.A`` / ``.B``; meta maps slot (as a string) ->
    layer -> rank, which is all :func:`import_slots` needs to rebuild them.
    """
    wanted = None if slots is None else {int(s) for s in slots}
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, dict[str, int]] = {}
    for name, layer in layers.items():
        for slot, rank in sorted(layer.slot_ranks().items()):
            if wanted is not None and slot not in wanted:
                continue
            low = layer.slot(slot)
            tensors[f"{prefix}.{name}.{slot}.A"] = low.A.detach().contiguous().clone()
            tensors[f"{prefix}.{name}.{slot}.B"] = low.B.detach().contiguous().clone()
            meta.setdefault(str(slot), {})[name] = rank
    return tensors, meta


def import_slots(layers: dict[str, ExpertLinear], tensors: dict[str, torch.Tensor],
                 meta: dict[str, dict[str, int]], prefix: str = "experts") -> None:
    """Create (or overwrite) the slots described by :func:`export_slots` output."""
    for slot_key, ranks in meta.items():
        slot = int(slot_key)
        for name, rank in ranks.items():
            if name not in layers:
                raise ValueError(f"expert state: layer {name} is not an adapted layer of this model")
            A = tensors[f"{prefix}.{name}.{slot}.A"]
            B = tensors[f"{prefix}.{name}.{slot}.B"]
            if A.shape[0] != rank:
                raise ValueError(f"expert state: slot {slot} of {name} has rank {A.shape[0]}, meta says {rank}")
            layer = layers[name]
            if layer.has_slot(slot):
                layer.remove_slot(slot)
            layer.add_slot(slot, A, B)


def save_slots(layers: dict[str, ExpertLinear], path_prefix: str, slots: Optional[Iterable[int]] = None) -> None:
    """Write ``{path_prefix}.safetensors`` and ``{path_prefix}.json``."""
    tensors, meta = export_slots(layers, slots)
    save_file(tensors, f"{path_prefix}.safetensors")
    with open(f"{path_prefix}.json", "w") as fh:
        json.dump({"ranks": meta}, fh, indent=1, sort_keys=True)


def load_slots(layers: dict[str, ExpertLinear], path_prefix: str) -> None:
    """Read what :func:`save_slots` wrote into the (freshly injected) layers."""
    with open(f"{path_prefix}.json") as fh:
        meta = json.load(fh)["ranks"]
    import_slots(layers, load_file(f"{path_prefix}.safetensors"), meta)
