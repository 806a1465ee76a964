"""What the fixed-rank baseline methods share: one expert slot per task, task anchors, freezing.

* :class:`TaskSlots` keeps one LoRA-initialised expert slot of rank ``r`` per task on
  :class:`~cram_ray.experts.adapter.ExpertLinear` layers, slot index = task index (oracle, O-LoRA,
  HiDe-LLaVA, SAME).
* :class:`SlotPerTask` is the lifecycle of the methods whose task t trains its own slot t alone
  (oracle, O-LoRA, HiDe-LLaVA): they add only their routing and losses.
* :class:`FeatureMean` / :class:`TaskAnchors` turn a task's routing features into per-task mean
  vectors and score samples against them by cosine similarity (HiDe-LLaVA, SAME).

No Ray here.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from cram_ray.config import StreamConfig
from cram_ray.data.records import TaskInfo
from cram_ray.methods.base import ContinualMethod
from cram_ray.experts.adapter import ExpertLinear, RoutingContext, export_slots, import_slots, inject_experts

EXPERT_SCALE = 2.0  # alpha = 2r, as LoRA-FT and CRAM


def freeze(params: Iterable[nn.Parameter]) -> None:
    """No gradient, and stale gradients of an earlier phase dropped."""
    for p in params:
        p.requires_grad_(False)
        p.grad = None


def task_to_json(task: Optional[TaskInfo]) -> Optional[dict[str, Any]]:
    return None if task is None else {"index": task.index, "name": task.name, "metric": task.metric}


def task_from_json(raw: Optional[dict[str, Any]]) -> Optional[TaskInfo]:
    return None if raw is None else TaskInfo(**raw)


def check_meta(meta: dict[str, Any], name: str, version: int) -> None:
    """A state written by another method or version is refused with a clear message."""
    if meta.get("method") != name:
        raise ValueError(f"{name} state: written by method {meta.get('method')!r}")
    if meta.get("version") != version:
        raise ValueError(f"{name} state: version {meta.get('version')}, this code reads {version}")


def one_hot(index: torch.Tensor, n: int) -> torch.Tensor:
    """(B,) slot indices -> (B, n) float routing weights with a single 1 per row."""
    index = index.long().reshape(-1)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
        raise ValueError(f"routing: slot index out of range 0..{n - 1}: {sorted(set(index.tolist()))}")
    return torch.nn.functional.one_hot(index, n).to(torch.float32)


def cosine(q: torch.Tensor, anchors: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(B, D) queries x (K, D) anchors -> (B, K) cosine similarities (0 for a zero vector)."""
    q = q.to(torch.float64)
    a = anchors.to(torch.float64)
    qn = q / q.norm(dim=-1, keepdim=True).clamp_min(eps)
    an = a / a.norm(dim=-1, keepdim=True).clamp_min(eps)
    return qn @ an.T


class TaskSlots:
    """One rank-``rank`` expert slot per task on the target linears; slot ``t`` belongs to task ``t``.

    Args:
        rank: rank of every slot.
        seed: seeds each slot's LoRA start (with the task index), so a rerun starts identically.
    """

    def __init__(self, rank: int, seed: int = 0) -> None:
        self.rank = rank
        self.seed = seed
        self.layers: dict[str, ExpertLinear] = {}

    def attach(self, model: nn.Module, patterns: Iterable[str], *, context: Optional[RoutingContext] = None,
               per_block_context: bool = False) -> dict[str, ExpertLinear]:
        freeze(model.parameters())
        self.layers = inject_experts(model, list(patterns), scale=EXPERT_SCALE, context=context,
                                     per_block_context=per_block_context)
        return self.layers

    def __len__(self) -> int:
        """Number of slots (they are 0..n-1)."""
        first = next(iter(self.layers.values()), None)
        return 0 if first is None else len(first.experts)

    def has(self, task: int) -> bool:
        return all(layer.has_slot(task) for layer in self.layers.values())

    def open(self, task: int) -> None:
        """A fresh LoRA start (B = 0) for ``task``'s slot; an existing one is replaced (task restarted)."""
        if task != len(self) and not self.has(task):
            raise ValueError(f"expert slots: task {task} cannot open a slot after {len(self)} existing ones")
        gen = torch.Generator().manual_seed(1_000_003 * (self.seed + 1) + task)
        for layer in self.layers.values():
            if layer.has_slot(task):
                layer.remove_slot(task)
            layer.add_slot(task, rank=self.rank, generator=gen)

    def params(self, task: int) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in layer.slot(task).parameters()]

    def all_params(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in layer.experts.parameters()]

    def train_only(self, task: int) -> list[nn.Parameter]:
        """Freeze every slot but ``task``'s, which is made trainable; returns its parameters."""
        freeze(self.all_params())
        params = self.params(task)
        for p in params:
            p.requires_grad_(True)
        return params

    def numel(self, task: int) -> int:
        return sum(layer.slot(task).numel() for layer in self.layers.values() if layer.has_slot(task))

    def ranks(self, task: int) -> dict[str, Any]:
        per_layer = {n: l.slot(task).rank for n, l in self.layers.items() if l.has_slot(task)}
        if not per_layer:
            return {}
        values = list(per_layer.values())
        return {"per_layer": per_layer, "rank_max": max(values), "rank_sum": sum(values),
                "rank_mean": sum(values) / len(values)}

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return export_slots(self.layers)

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        for layer in self.layers.values():
            for slot in list(layer.slot_ranks()):
                layer.remove_slot(slot)
        import_slots(self.layers, tensors, meta)
        freeze(self.all_params())


class SlotPerTask(ContinualMethod):
    """Task t opens slot t (rank ``method.rank``) and trains it alone; every other slot stays
    frozen. Subclasses attach the slots and route; their state extends this one's."""

    state_version = 1

    def __init__(self, cfg: StreamConfig) -> None:
        super().__init__(cfg)
        self.slots = TaskSlots(cfg.method.rank, cfg.train.seed)
        self.training = False  # begin_train ran in this process

    def begin_task(self, task: TaskInfo) -> None:
        super().begin_task(task)
        self.training = False
        self.slots.open(task.index)

    def allocate(self) -> dict[str, Any]:
        return {"slot": self.task.index, **self.slots.ranks(self.task.index)}

    def begin_train(self) -> None:
        self.slots.train_only(self.task.index)
        self.training = True

    def end_task(self) -> dict[str, Any]:
        freeze(self.slots.all_params())
        self.training = False
        return {"slot": self.task.index, "experts": len(self.slots)}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.slots.params(self.task.index) if self.training else []

    def params_added(self) -> int:
        return 0 if self.task is None else self.slots.numel(self.task.index)

    def ranks(self) -> dict[str, Any]:
        return {} if self.task is None else self.slots.ranks(self.task.index)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, ranks = self.slots.state()
        return tensors, {"method": self.name, "version": self.state_version, "expert_ranks": ranks,
                         "task": task_to_json(self.task)}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        check_meta(meta, self.name, self.state_version)
        self.slots.load_state(tensors, meta["expert_ranks"])
        self.task = task_from_json(meta["task"])
        self.training = False


class FeatureMean:
    """Running sum and count of feature rows (float64), for a mean that does not depend on batching order
    beyond float rounding."""

    def __init__(self) -> None:
        self.sum: Optional[torch.Tensor] = None
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        x = x.detach().to(torch.float64).reshape(x.shape[0], -1)
        self.sum = x.sum(0) if self.sum is None else self.sum + x.sum(0)
        self.n += x.shape[0]

    def mean(self) -> Optional[torch.Tensor]:
        return None if self.sum is None or self.n == 0 else self.sum / self.n

    def merge(self, other: "FeatureMean") -> None:
        if other.n:
            self.sum = other.sum.clone() if self.sum is None else self.sum + other.sum
            self.n += other.n

    def state(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return ({key: self.sum.clone()} if self.sum is not None else {}), {"n": self.n}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any], key: str) -> "FeatureMean":
        out = cls()
        out.n = int(meta["n"])
        if key in tensors:
            out.sum = tensors[key].to(torch.float64).clone()
        return out


class TaskAnchors:
    """Per-task mean image and text routing features, scored by a weighted cosine similarity.

    ``score[b, k] = w * cos(img_b, img_k) + (1 - w) * cos(txt_b, txt_k)``; for a sample without an
    image (``has_image`` False) or a task that saw no image, the text term alone.
    """

    def __init__(self) -> None:
        self.img: list[Optional[torch.Tensor]] = []  # per task (D_img,) or None
        self.txt: list[torch.Tensor] = []  # per task (D_txt,)
        self.current_img = FeatureMean()
        self.current_txt = FeatureMean()

    def __len__(self) -> int:
        return len(self.txt)

    def observe(self, batch: dict[str, Any]) -> None:
        """Accumulate the current task's features (``txt_feat``; ``img_feat`` of samples with an image)."""
        if "txt_feat" not in batch:
            raise ValueError("task anchors: the batch has no 'txt_feat' (the method needs text features)")
        self.current_txt.add(batch["txt_feat"])
        if "img_feat" in batch:
            feats = batch["img_feat"]
            has = batch.get("has_image")
            if has is not None:
                feats = feats[has.to(torch.bool)]
            self.current_img.add(feats)

    def take(self) -> dict[str, torch.Tensor]:
        """The current task's sums and counts so far (see ContinualMethod.take_aggregate_statistics)."""
        out: dict[str, torch.Tensor] = {}
        for key, mean in (("img", self.current_img), ("txt", self.current_txt)):
            out.update(mean.state(f"{key}.sum")[0])
            out[f"{key}.n"] = torch.tensor(mean.n, dtype=torch.int64)
        self.current_img, self.current_txt = FeatureMean(), FeatureMean()
        return out

    def merge(self, parts: list[dict[str, torch.Tensor]]) -> None:
        for part in parts:
            for key, mean in (("img", self.current_img), ("txt", self.current_txt)):
                mean.merge(FeatureMean.from_state(part, {"n": int(part[f"{key}.n"])}, f"{key}.sum"))

    def commit(self, task: int) -> None:
        """The current task's means become anchor ``task`` (anchors are 0..n-1 in task order)."""
        if task != len(self):
            raise ValueError(f"task anchors: expected task {len(self)} next, got {task}")
        txt = self.current_txt.mean()
        if txt is None:
            raise ValueError(f"task anchors: task {task} produced no text features (batch key 'txt_feat')")
        self.txt.append(txt)
        self.img.append(self.current_img.mean())
        self.current_img, self.current_txt = FeatureMean(), FeatureMean()

    def scores(self, batch: dict[str, Any], image_weight: float) -> torch.Tensor:
        """(B, K) weighted cosine similarity of every sample to every committed task."""
        if not self.txt:
            raise ValueError("task anchors: no task committed yet")
        s_txt = cosine(batch["txt_feat"], torch.stack(self.txt))  # (B, K)
        if "img_feat" not in batch or image_weight == 0.0:
            return s_txt
        dim = batch["img_feat"].shape[-1]
        rows = [a if a is not None and a.shape[0] == dim else torch.zeros(dim, dtype=torch.float64) for a in self.img]
        has_task = torch.tensor([a is not None for a in self.img], dtype=torch.float64)  # (K,)
        s_img = cosine(batch["img_feat"], torch.stack(rows))  # (B, K)
        has = batch.get("has_image")
        has_sample = torch.ones(s_txt.shape[0], dtype=torch.float64) if has is None else has.to(torch.float64)
        w_img = image_weight * has_sample[:, None] * has_task[None, :]  # (B, K)
        w_txt = 1.0 - image_weight
        return (w_img * s_img + w_txt * s_txt) / (w_img + w_txt).clamp_min(1e-12)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        for k, t in enumerate(self.txt):
            tensors[f"anchors.txt.{k}"] = t.clone()
            if self.img[k] is not None:
                tensors[f"anchors.img.{k}"] = self.img[k].clone()
        t_img, m_img = self.current_img.state("anchors.current.img")
        t_txt, m_txt = self.current_txt.state("anchors.current.txt")
        tensors.update(t_img)
        tensors.update(t_txt)
        return tensors, {"n": len(self.txt), "current_img": m_img, "current_txt": m_txt}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        n = int(meta["n"])
        self.txt = [tensors[f"anchors.txt.{k}"].to(torch.float64).clone() for k in range(n)]
        self.img = [tensors[f"anchors.img.{k}"].to(torch.float64).clone() if f"anchors.img.{k}" in tensors else None
                    for k in range(n)]
        self.current_img = FeatureMean.from_state(tensors, meta["current_img"], "anchors.current.img")
        self.current_txt = FeatureMean.from_state(tensors, meta["current_txt"], "anchors.current.txt")
