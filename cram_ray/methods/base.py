"""The one small interface every continual-learning method implements.

The pipeline (cram_ray/pipeline) drives every method through the same calls and never branches
on a method's name. Per task ``t`` of the stream, in stage order:

* process start (any stage): ``m = make_method(cfg)``; ``m.attach(model)`` injects the method's
  adapters into the frozen base; ``m.load_state(tensors, meta)`` restores the stream state the
  previous stage saved (absent before the first stage of the stream).
* probe:     ``m.begin_task(task)``; ``n = m.probe_steps(total)``; if ``n``: ``m.begin_probe()``, then
             ``n`` optimizer steps (below); every probe batch is also passed to
             ``m.observe(batch, "probe")``; ``report = m.end_probe()``.
* allocate:  ``report = m.allocate()``.
* train:     ``m.begin_train()``, then ``total - n`` optimizer steps.
* aggregate: ``m.observe(batch, "aggregate")`` over the task's training data (no grad);
             ``report = m.end_task()``. On Ray, processes observe parts of the data and the stage
             merges their ``take_aggregate_statistics()`` with ``merge_aggregate_statistics``.
* evaluate:  per test batch of every seen task: ``m.route(batch, training=False)``, greedy
             generation, and ``m.routed_task()`` for routing accuracy.

One optimizer step: ``m.route(batch, training=True)``; ``out = model(**model_inputs)``;
``loss = out.loss + sum(m.extra_losses(batch, out).values())``; backward;
``m.before_optimizer_step(step)``; optimizer step over ``m.trainable_parameters()`` only.

Batch keys (built by the VLM processor in cram_ray/models): ``input_ids``, ``attention_mask``,
``labels``, ``pixel_values`` (the model's inputs), ``task_index`` (B,) true stream index of each
sample, ``has_image`` (B,) bool, and, when the method lists them in ``needs_features``,
``img_feat`` (B, D_img) frozen image routing features and ``txt_feat`` (B, D_txt) frozen text
features of the instruction.

State is plain tensors (saved as safetensors) plus a JSON-able dict; nothing is pickled.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal, Optional

import torch
from torch import nn

from cram_ray.config import StreamConfig
from cram_ray.data.records import TaskInfo

Batch = dict[str, Any]
Phase = Literal["probe", "aggregate"]


class ContinualMethod(ABC):
    """Base class of every method: defaults are the no-op of a method without that phase."""

    name: ClassVar[str] = "base"
    needs_features: ClassVar[frozenset[str]] = frozenset()  # subset of {"image", "text"}
    needs_task_id: ClassVar[bool] = False  # routes by the batch's true ``task_index`` (an oracle)

    def __init__(self, cfg: StreamConfig) -> None:
        self.cfg = cfg
        self.task: Optional[TaskInfo] = None

    # -- lifecycle -------------------------------------------------------------------------
    @abstractmethod
    def attach(self, model: nn.Module) -> None:
        """Inject the method's adapters into ``model`` (whose base weights stay frozen)."""

    def begin_task(self, task: TaskInfo) -> None:
        self.task = task

    def probe_steps(self, total_steps: int) -> int:
        """How many of the task's ``total_steps`` the probe stage trains (0: no probe)."""
        return 0

    def begin_probe(self) -> None:
        """Switch to probing: only the probe's parameters train."""

    def observe(self, batch: Batch, phase: Phase) -> None:
        """Accumulate statistics of a batch of the current task's training data (no grad)."""

    def take_aggregate_statistics(self) -> dict[str, torch.Tensor]:
        """What ``observe(batch, "aggregate")`` accumulated since the last call, as tensors, and
        forget it: a partial sum that another process merges (a method whose observe accumulates
        must override this and :meth:`merge_aggregate_statistics`)."""
        return {}

    def merge_aggregate_statistics(self, parts: list[dict[str, torch.Tensor]]) -> None:
        """Add partial statistics from :meth:`take_aggregate_statistics` of other processes, as if
        their batches had been observed here (exact up to float rounding)."""

    def end_probe(self) -> dict[str, Any]:
        return {}

    def allocate(self) -> dict[str, Any]:
        """Turn what the probe learned into the task's new parameters; returns a report."""
        return {}

    def begin_train(self) -> None:
        """Switch to the task's main training."""

    def end_task(self) -> dict[str, Any]:
        """Finish the task (statistics -> routing state); returns a report."""
        return {}

    # -- per step --------------------------------------------------------------------------
    @abstractmethod
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer of the current phase updates (nothing else may change)."""

    @abstractmethod
    def route(self, batch: Batch, *, training: bool) -> None:
        """Set the adapters' routing for ``batch`` before the forward pass."""

    def extra_losses(self, batch: Batch, outputs: Any) -> dict[str, torch.Tensor]:
        """Named loss terms added to the cross-entropy (e.g. ``{"dec": ...}``)."""
        return {}

    def before_optimizer_step(self, step: int) -> None:
        """Gradient surgery after backward, before the optimizer step."""

    # -- reporting -------------------------------------------------------------------------
    def routed_task(self) -> Optional[torch.Tensor]:
        """(B,) stream index of the task whose expert each sample of the last routed batch used,
        or None for a method without routing."""
        return None

    def routing_decisions(self) -> list[dict[str, Any]]:
        """Per sample of the last routed batch, the routing decision as JSON-able values:
        ``routed_task`` (stream index) and whatever else the method decides (e.g. ``group`` and
        ``weights``); empty for a method without routing."""
        choice = self.routed_task()
        return [] if choice is None else [{"routed_task": int(c)} for c in choice]

    def params_added(self) -> int:
        """Parameters the current task added to the deployed model (temporary buffers excluded)."""
        return 0

    def ranks(self) -> dict[str, Any]:
        """Per-layer ranks of the current task's new parameters, for reports (may be empty)."""
        return {}

    # -- state -----------------------------------------------------------------------------
    @abstractmethod
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON metadata) that rebuild the stream state in a fresh process."""

    @abstractmethod
    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore what :meth:`state` returned (after :meth:`attach` on a fresh base model)."""
