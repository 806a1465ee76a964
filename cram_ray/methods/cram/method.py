"""CRAM behind the ContinualMethod interface: groups, centroid routing, adaptive rank, L_dec.

Per task (docs/DESIGN.md §2, §3), and what this class does in each call:

* ``begin_task`` / ``begin_probe``: the probe buffer is re-initialised and is the only trainable
  part; every sample's routing mass is on it.
* ``observe(batch, "probe")``: the task's text queries (for its group) and image features (its
  provisional centroid) are accumulated.
* ``end_probe``: the task joins or opens a semantic group and is locked to it.
* ``allocate``: per adapted layer, the new expert slot is instantiated from the buffer by
  :func:`~cram_ray.methods.cram.rank.allocate` against the group's earlier experts; the buffer
  is re-initialised.
* ``begin_train``: only the new slot's A/B (and, with ``train_centroid``, its centroid) train.
  Routing while training (as the reference does): level 1 is the task's locked group; level 2
  is the centroid softmax over the group's committed experts *plus the new one*, whose centroid is
  the mean image feature seen while probing (or the trained row). The new expert thus learns under
  the same mixture it will be used with at test time; in a new group it gets all the mass.
* ``extra_losses``: ``{"dec": lambda_dec * L_dec}``.
* ``observe(batch, "aggregate")``: per-expert feature sums, count and within-task scatter, and the
  task's text queries over its whole training set.
* ``end_task``: commits the slot (centroid, covariance, group prototype) and freezes it.
* inference ``route``: group = argmax cosine to the prototypes; centroid softmax over the group's
  committed experts; the buffer is unused.

The model is expected to expose the image placeholder id as ``config.image_token_id`` (transformers
Llava v5) or ``config.image_token_index``; L_dec averages each adapted layer's input over those
positions of ``input_ids``.

Without a probe (``probe_ratio = 0``) the first training batch stands in for the probe's
statistics (group and provisional centroid are decided from it) and the new slot starts
LoRA-style with rank ``rank_min``.
"""
from __future__ import annotations

import math
from enum import Enum
from typing import Any, Optional

import torch
from torch import nn

from cram_ray.config import StreamConfig
from cram_ray.data.records import TaskInfo
from cram_ray.experts.adapter import ExpertLinear, RoutingContext, export_slots, import_slots, inject_experts
from cram_ray.methods.base import Batch, ContinualMethod, Phase
from cram_ray.methods.cram.groups import GroupDecision, SemanticGroups, text_query
from cram_ray.methods.cram.penalty import decoupling_penalty, image_token_mask, output_basis
from cram_ray.methods.cram.rank import allocate as allocate_rank
from cram_ray.methods.cram.rank import history_basis
from cram_ray.methods.cram.router import CentroidRouter, FeatureMoments

EXPERT_SCALE = 2.0  # alpha = 2r for every expert slot (docs/DESIGN.md §3)
BUFFER_SCALE = 2.0  # alpha = 2r for the probe buffer
STATE_VERSION = 1


class Stage(str, Enum):
    """Where the current task is; survives a save/load between pipeline stages."""

    IDLE = "idle"  # no task in progress (before the first, or after end_task)
    PROBING = "probing"  # begin_task done
    PROBED = "probed"  # end_probe done: group decided (unless deferred), buffer trained
    ALLOCATED = "allocated"  # the new slot exists
    TRAINING = "training"  # begin_train done


class Cram(ContinualMethod):
    """Centroid-Routing and Adaptive-rank MoE (arXiv 2606.02502), with our LDA routing option."""

    name = "cram"
    needs_features = frozenset({"image", "text"})

    def __init__(self, cfg: StreamConfig) -> None:
        super().__init__(cfg)
        self.hp = cfg.method.cram
        self.train_centroid = self.hp.train_centroid
        self.groups = SemanticGroups(self.hp.join_sim, self.hp.theta, self.hp.max_groups)
        self.router = CentroidRouter(self.hp.router, self.hp.sigma, self.hp.shrinkage, self.hp.top_k)
        self.layers: dict[str, ExpertLinear] = {}
        self.context = RoutingContext()
        self.image_token_id: Optional[int] = None
        # committed experts, in commit order: {"slot", "task", "name", "group"}
        self.slots: list[dict[str, Any]] = []
        # the task in progress
        self.stage = Stage.IDLE
        self.mode: Optional[str] = None  # "probe" | "train": what route(training=True) does (per process)
        self.decision: Optional[GroupDecision] = None
        self.new_slot: Optional[int] = None  # the current (or, after end_task, the last) task's slot
        self._reset_moments()  # probe_txt / probe_img / agg_txt / agg_img: the task's feature statistics
        self.centroid: Optional[nn.Parameter] = None  # (D,) trainable centroid of the new slot
        self._bases: Optional[dict[str, torch.Tensor]] = None  # layer -> (d_out, k) output basis for L_dec
        self._gamma: Optional[torch.Tensor] = None  # (B,) mass on the group's earlier experts
        self._choice: Optional[torch.Tensor] = None  # (B,) argmax slot of the last routed batch
        self._groups: Optional[torch.Tensor] = None  # (B,) semantic group of the last batch routed for inference

    # -- lifecycle ---------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        for p in model.parameters():
            p.requires_grad_(False)
        self.layers = inject_experts(
            model, self.cfg.method.target_modules, buf_rank=self.hp.buf_rank,
            scale=EXPERT_SCALE, buf_scale=BUFFER_SCALE, context=self.context,
        )
        config = getattr(model, "config", None)
        token = getattr(config, "image_token_id", None)
        if token is None:
            token = getattr(config, "image_token_index", None)
        self.image_token_id = None if token is None else int(token)

    def begin_task(self, task: TaskInfo) -> None:
        super().begin_task(task)
        if self.stage != Stage.IDLE and self.new_slot is not None:
            self._drop_new_slot()  # a task restarted from its beginning
        self.stage = Stage.PROBING
        self.mode = None
        self.decision = None
        self.new_slot = None
        self._reset_moments()
        self.centroid = None
        self._bases = None

    def probe_steps(self, total_steps: int) -> int:
        if self.hp.probe_ratio <= 0:
            return 0
        steps = max(1, math.ceil(self.hp.probe_ratio * total_steps - 1e-9))  # 0.07 * 100 is 7.000000000000001
        return min(steps, total_steps - 1) if total_steps > 1 else steps

    def begin_probe(self) -> None:
        self._require(Stage.PROBING, "begin_probe")
        self._freeze_all()
        for layer in self.layers.values():
            layer.reset_buffer()
            layer.buffer.requires_grad_(True)
        self.mode = "probe"

    def observe(self, batch: Batch, phase: Phase) -> None:
        if phase == "probe":
            self._observe_into(batch, self.probe_txt, self.probe_img)
        elif phase == "aggregate":
            self._observe_into(batch, self.agg_txt, self.agg_img)
        else:
            raise ValueError(f"Cram.observe: unknown phase {phase!r}")

    def take_aggregate_statistics(self) -> dict[str, torch.Tensor]:
        out = {**self.agg_txt.to_tensors("agg_txt"), **self.agg_img.to_tensors("agg_img")}
        self.agg_txt, self.agg_img = FeatureMoments(full=self.agg_txt.full), FeatureMoments(full=self.agg_img.full)
        return out

    def merge_aggregate_statistics(self, parts: list[dict[str, torch.Tensor]]) -> None:
        for part in parts:
            for key, mom in (("agg_txt", self.agg_txt), ("agg_img", self.agg_img)):
                mom.merge(FeatureMoments.from_tensors(part, key, mom.full))

    def end_probe(self) -> dict[str, Any]:
        self._require(Stage.PROBING, "end_probe")
        self.mode = None
        self._freeze_all()
        self.stage = Stage.PROBED
        if self.probe_txt.n == 0:
            return {"group": None, "group_deferred": True}
        self.decision = self.groups.decide(self.probe_txt.mean())
        return self._decision_report()

    def allocate(self) -> dict[str, Any]:
        if self.stage == Stage.PROBING:  # no probe stage ran (probe_ratio = 0)
            self.stage = Stage.PROBED
        self._require(Stage.PROBED, "allocate")
        slot = len(self.slots)
        history = self._group_slots() if self.decision is not None else []
        gen = torch.Generator().manual_seed(1_000_003 * (slot + 1))
        probed = 0
        for layer in self.layers.values():
            A_hist = [layer.slot(s).A.detach() for s in history]
            A_buf, B_buf = layer.buffer.A.detach(), layer.buffer.B.detach()
            if bool(B_buf.any()):  # the probe moved this layer's buffer away from its B = 0 start
                A, B = allocate_rank(
                    A_buf, B_buf, BUFFER_SCALE, A_hist, self.hp.tau_alloc, self.hp.tau_novel,
                    self.hp.rank_min, self.hp.rank_max, tau_rel=self.hp.tau_rel, expert_scale=EXPERT_SCALE,
                )
                layer.add_slot(slot, A, B)
                probed += 1
            else:  # nothing to decompose: a LoRA start of rank_min, rows orthogonal to the group's experts
                low = layer.add_slot(slot, rank=self.hp.rank_min, generator=gen)
                with torch.no_grad():
                    Q = history_basis(A_hist, layer.in_features).to(low.A.dtype)  # (d_in, k)
                    low.A.sub_((low.A @ Q) @ Q.T)
            layer.reset_buffer()
        self.new_slot = slot
        self.stage = Stage.ALLOCATED
        report = {"slot": slot, "layers_from_probe": probed}
        report.update(self.ranks())
        return report

    def begin_train(self) -> None:
        if self.stage not in (Stage.ALLOCATED, Stage.TRAINING):
            raise RuntimeError(f"Cram.begin_train: expected an allocated slot, the task is {self.stage.value}")
        self._freeze_all()
        for layer in self.layers.values():
            layer.slot(self.new_slot).requires_grad_(True)
        if self.train_centroid and self.centroid is None and self.probe_img.n > 0:
            self.centroid = nn.Parameter(self.probe_img.mean().to(torch.float32))
        self.stage = Stage.TRAINING
        self.mode = "train"

    def end_task(self) -> dict[str, Any]:
        if self.stage not in (Stage.ALLOCATED, Stage.TRAINING):
            raise RuntimeError(f"Cram.end_task: expected a trained slot, the task is {self.stage.value}")
        if self.decision is None:
            source = self.agg_txt if self.agg_txt.n > 0 else self.probe_txt
            if source.n == 0:
                raise ValueError("Cram.end_task: the task produced no text features (batch key 'txt_feat')")
            self.decision = self.groups.decide(source.mean())
        txt = self.agg_txt if self.agg_txt.n > 0 else self.probe_txt
        img = self.agg_img if self.agg_img.n > 0 else self.probe_img
        trained = self.centroid.detach() if self.centroid is not None else None
        self.router.commit(self.new_slot, img, trained)
        if txt.n > 0:
            self.groups.commit(self.decision, txt.mean() * txt.n, txt.n)
        elif self.decision.new:
            raise ValueError("Cram.end_task: a new group needs the task's text features (batch key 'txt_feat')")
        self.slots.append({
            "slot": self.new_slot, "task": self.task.index, "name": self.task.name, "group": self.decision.group,
        })
        self._freeze_all()
        self.stage = Stage.IDLE
        self.mode = None
        self.centroid = None
        self._bases = None
        self._reset_moments()  # folded into the router and the groups; keeps the saved state small
        report = self._decision_report()
        report.update({
            "slot": self.new_slot, "experts": len(self.slots), "groups": len(self.groups),
            "sigma": math.sqrt(self.router.sigma2()), "shrinkage": self.router.alpha,
        })
        return report

    # -- per step ----------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        if self.mode == "probe":
            return [p for layer in self.layers.values() for p in (layer.buffer.A, layer.buffer.B)]
        if self.mode == "train":
            params = [p for layer in self.layers.values() for p in layer.slot(self.new_slot).parameters()]
            if self.centroid is not None:
                params.append(self.centroid)
            return params
        return []

    def route(self, batch: Batch, *, training: bool) -> None:
        ctx = self.context
        ctx.clear()
        self._gamma = self._choice = self._groups = None
        if training and self.mode == "probe":
            ctx.probe = True
            return
        if training and self.mode == "train":
            self._route_training(batch)
            return
        if training:
            raise RuntimeError("Cram.route(training=True): call begin_probe or begin_train first")
        self._route_inference(batch)

    def extra_losses(self, batch: Batch, outputs: Any) -> dict[str, torch.Tensor]:
        if self.mode != "train" or self.hp.lambda_dec == 0:
            return {}
        if self._gamma is None or self.context.capture_mask is None:  # no earlier expert in the group
            return {"dec": torch.zeros(())}
        names = list(self.layers)
        bases = self._dec_bases()
        captured = [self.layers[n].captured for n in names]
        factors = [(self.layers[n].slot(self.new_slot).A, self.layers[n].slot(self.new_slot).B) for n in names]
        loss = decoupling_penalty(captured, factors, [bases[n] for n in names], self._gamma, EXPERT_SCALE)
        for layer in self.layers.values():
            layer.captured = None
        return {"dec": self.hp.lambda_dec * loss}

    # -- reporting ---------------------------------------------------------------------------
    def routed_task(self) -> Optional[torch.Tensor]:
        if self._choice is None:
            return None
        task_of = {rec["slot"]: rec["task"] for rec in self.slots}
        if self.new_slot is not None and self.task is not None:
            task_of.setdefault(self.new_slot, self.task.index)
        return torch.tensor([task_of.get(int(s), -1) for s in self._choice], dtype=torch.long)

    def routing_decisions(self) -> list[dict[str, Any]]:
        rows = super().routing_decisions()
        pi = self.context.weights
        if self._groups is None or pi is None:
            return rows
        name_of = {rec["slot"]: rec["name"] for rec in self.slots}
        for row, group, weights in zip(rows, self._groups.tolist(), pi.tolist()):
            row["group"] = int(group)
            row["weights"] = {name_of[s]: w for s, w in enumerate(weights) if w > 0 and s in name_of}
        return rows

    def params_added(self) -> int:
        if self.new_slot is None:
            return 0
        return sum(layer.slot(self.new_slot).numel() for layer in self.layers.values() if layer.has_slot(self.new_slot))

    def ranks(self) -> dict[str, Any]:
        if self.new_slot is None:
            return {}
        per_layer = {n: l.slot(self.new_slot).rank for n, l in self.layers.items() if l.has_slot(self.new_slot)}
        values = list(per_layer.values())
        return {
            "per_layer": per_layer, "rank_max": max(values), "rank_sum": sum(values),
            "rank_mean": sum(values) / len(values),
        }

    # -- state -------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, expert_ranks = export_slots(self.layers)
        router_t, router_meta = self.router.state()
        tensors.update(router_t)
        tensors.update(self.groups.state())
        moments_meta = {}
        for key, mom in self._moments().items():
            t, m = mom.state(f"current.{key}")
            tensors.update(t)
            moments_meta[key] = m
        if self.stage in (Stage.PROBING, Stage.PROBED):
            for name, layer in self.layers.items():
                tensors[f"buffer.{name}.A"] = layer.buffer.A.detach().clone()
                tensors[f"buffer.{name}.B"] = layer.buffer.B.detach().clone()
        if self.centroid is not None:
            tensors["current.centroid"] = self.centroid.detach().clone()
        meta = {
            "method": self.name,
            "version": STATE_VERSION,
            "slots": self.slots,
            "expert_ranks": expert_ranks,
            "router": router_meta,
            "current": {
                "stage": self.stage.value,
                "task": None if self.task is None else
                {"index": self.task.index, "name": self.task.name, "metric": self.task.metric},
                "decision": None if self.decision is None else self.decision.to_json(),
                "new_slot": self.new_slot,
                "moments": moments_meta,
            },
        }
        return {k: v.detach().contiguous() for k, v in tensors.items()}, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if meta.get("method") != self.name:
            raise ValueError(f"cram state: written by method {meta.get('method')!r}")
        if meta.get("version") != STATE_VERSION:
            raise ValueError(f"cram state: version {meta.get('version')}, this code reads {STATE_VERSION}")
        for layer in self.layers.values():
            for slot in list(layer.slot_ranks()):
                layer.remove_slot(slot)
        import_slots(self.layers, tensors, meta["expert_ranks"])
        self.router.load_state(tensors, meta["router"])
        self.groups.load_state(tensors)
        self.slots = [dict(rec) for rec in meta["slots"]]
        cur = meta["current"]
        self.stage = Stage(cur["stage"])
        self.task = None if cur["task"] is None else TaskInfo(**cur["task"])
        self.decision = None if cur["decision"] is None else GroupDecision.from_json(cur["decision"])
        self.new_slot = cur["new_slot"]
        for key, m in cur["moments"].items():
            setattr(self, key, FeatureMoments.from_state(tensors, m, f"current.{key}"))
        with torch.no_grad():
            for name, layer in self.layers.items():
                if f"buffer.{name}.A" in tensors:
                    layer.buffer.A.copy_(tensors[f"buffer.{name}.A"])
                    layer.buffer.B.copy_(tensors[f"buffer.{name}.B"])
        c = tensors.get("current.centroid")
        self.centroid = None if c is None else nn.Parameter(c.clone())
        self.mode = None
        self._bases = None
        self._freeze_all()

    # -- internals ---------------------------------------------------------------------------
    def _require(self, stage: Stage, call: str) -> None:
        if self.stage != stage:
            raise RuntimeError(f"Cram.{call}: expected the task to be {stage.value}, it is {self.stage.value}")

    def _reset_moments(self) -> None:
        self.probe_txt = FeatureMoments(full=False)
        self.probe_img = FeatureMoments(full=False)
        self.agg_txt = FeatureMoments(full=False)
        self.agg_img = FeatureMoments(full=True)

    def _moments(self) -> dict[str, FeatureMoments]:
        return {"probe_txt": self.probe_txt, "probe_img": self.probe_img,
                "agg_txt": self.agg_txt, "agg_img": self.agg_img}

    def _freeze_all(self) -> None:
        """Nothing trains; stale gradients of the previous phase are dropped with it."""
        for layer in self.layers.values():
            params = list(layer.experts.parameters())
            if layer.buffer is not None:
                params += list(layer.buffer.parameters())
            for p in params:
                p.requires_grad_(False)
                p.grad = None

    def _drop_new_slot(self) -> None:
        for layer in self.layers.values():
            if layer.has_slot(self.new_slot):
                layer.remove_slot(self.new_slot)

    @staticmethod
    def _observe_into(batch: Batch, txt: FeatureMoments, img: FeatureMoments) -> None:
        if "txt_feat" in batch:
            txt.add(text_query(batch["txt_feat"]))
        if "img_feat" in batch:
            feats = batch["img_feat"]
            has_image = batch.get("has_image")
            if has_image is not None:
                feats = feats[has_image.to(torch.bool)]
            img.add(feats)

    def _decision_report(self) -> dict[str, Any]:
        if self.decision is None:
            return {"group": None}
        sims = self.decision.similarities
        top = sorted(sims, reverse=True)
        return {
            "group": self.decision.group, "new_group": self.decision.new, "forced_join": self.decision.forced,
            "similarities": sims, "s1": top[0] if top else None, "s2": top[1] if len(top) > 1 else None,
        }

    def _group_slots(self, group: Optional[int] = None) -> list[int]:
        """Committed slots of a group (default: the current task's), in commit order."""
        g = self.decision.group if group is None else group
        return [rec["slot"] for rec in self.slots if rec["group"] == g]

    def _committed_centroids(self, n_slots: int, dim: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, D) centroid rows (zeros where missing) and (S,) bool mask of slots that have one."""
        rows = [self.router.centroid(s) for s in range(n_slots)]
        if dim is None:
            dim = next((r.shape[0] for r in rows if r is not None), 1)
        has = torch.tensor([r is not None and r.shape[0] == dim for r in rows], dtype=torch.bool)
        zero = torch.zeros(dim, dtype=torch.float64)
        if not rows:
            return torch.zeros(0, dim, dtype=torch.float64), has
        mat = torch.stack([r if ok else zero for r, ok in zip(rows, has.tolist())])
        return mat, has

    def _batch_images(self, batch: Batch, size: int) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        feats = batch.get("img_feat")
        if feats is None:
            return None, torch.zeros(size, dtype=torch.bool)
        has_image = batch.get("has_image")
        has_image = torch.ones(size, dtype=torch.bool) if has_image is None else has_image.to(torch.bool)
        return feats, has_image

    def _route_training(self, batch: Batch) -> None:
        size = batch["input_ids"].shape[0]
        if self.decision is None:  # no probe: this batch stands in for the probe's statistics
            self._observe_into(batch, self.probe_txt, self.probe_img)
            if self.probe_txt.n == 0:
                raise ValueError("Cram.route: the task needs text features (batch key 'txt_feat') to pick its group")
            self.decision = self.groups.decide(self.probe_txt.mean())
        history = self._group_slots()
        n_slots = self.new_slot + 1
        feats, has_image = self._batch_images(batch, size)
        if not history:
            pi = torch.zeros(size, n_slots)
            pi[:, self.new_slot] = 1.0
            self.context.weights = pi
            self._choice = torch.full((size,), self.new_slot, dtype=torch.long)
            return
        new_row = self.centroid if self.centroid is not None else (
            self.probe_img.mean() if self.probe_img.n > 0 else None)
        dim = feats.shape[1] if feats is not None else (None if new_row is None else new_row.shape[0])
        mat, has = self._committed_centroids(self.new_slot, dim)  # (S-1, D)
        dim = mat.shape[1]
        new_ok = new_row is not None and new_row.shape[0] == dim
        new_row = new_row if new_ok else torch.zeros(dim, dtype=torch.float64)
        centroids = torch.cat([mat, new_row.to(torch.float64)[None]], dim=0)  # (S, D)
        member = torch.zeros(n_slots, dtype=torch.bool)
        member[history] = True
        member[self.new_slot] = new_ok
        member[:-1] &= has
        candidates = member[None].expand(size, n_slots)
        # a sample without an image trains the task's own expert (it cannot be placed by image)
        first = torch.full((size,), self.new_slot, dtype=torch.long)
        q = feats if feats is not None else torch.zeros(size, dim)
        pi, choice = self.router.weights(q, centroids, candidates, first, has_image,
                                         fallback_sq_dist=self._probe_sq_dist())
        self.context.weights = pi
        self._choice = choice
        self._gamma = pi[:, history].sum(dim=1)  # (B,)
        if self.hp.lambda_dec > 0:
            if self.image_token_id is None:
                raise ValueError("Cram: L_dec needs the model's image token id (config.image_token_id)")
            self.context.capture_mask = image_token_mask(batch["input_ids"], self.image_token_id)

    def _route_inference(self, batch: Batch) -> None:
        size = batch["input_ids"].shape[0]
        if not self.slots:
            self._choice = torch.full((size,), -1, dtype=torch.long)
            return
        n_slots = max(rec["slot"] for rec in self.slots) + 1
        if len(self.groups) == 1:
            groups = torch.zeros(size, dtype=torch.long)
        else:
            if "txt_feat" not in batch:
                raise ValueError("Cram.route: batch lacks 'txt_feat' (text routing features)")
            groups = self.groups.assign(text_query(batch["txt_feat"]))  # (B,)
        feats, has_image = self._batch_images(batch, size)
        mat, has = self._committed_centroids(n_slots, None if feats is None else feats.shape[1])
        members = torch.zeros(len(self.groups), n_slots, dtype=torch.bool)  # (G, S)
        first_of = torch.zeros(len(self.groups), dtype=torch.long)
        for rec in reversed(self.slots):
            members[rec["group"], rec["slot"]] = True
            first_of[rec["group"]] = rec["slot"]
        candidates = members[groups] & has[None]  # (B, S)
        q = feats if feats is not None else torch.zeros(size, mat.shape[1])
        with torch.no_grad():
            pi, choice = self.router.weights(q, mat, candidates, first_of[groups], has_image)
        self.context.weights = pi
        self._choice = choice
        self._groups = groups

    def _probe_sq_dist(self) -> Optional[float]:
        if self.probe_img.n < 2:
            return None
        return self.probe_img.sum_sq_dev() / self.probe_img.n

    def _dec_bases(self) -> dict[str, torch.Tensor]:
        if self._bases is None:
            history = self._group_slots()
            self._bases = {n: output_basis([l.slot(s).B for s in history]) for n, l in self.layers.items()}
        return self._bases
