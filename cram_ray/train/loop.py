"""The training step every executor shares: route, forward, CE + method losses, backward, surgery.

This module imports no Ray; the Ray Train worker (cram_ray/train/worker.py) wraps the same
functions around a DeepSpeed engine.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from cram_ray.methods.base import Batch, ContinualMethod
from cram_ray.models.vlm import answer_loss, model_inputs
from cram_ray.train.progress import StepProgress

def cosine_lambda(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """Linear warm-up then cosine decay to zero, as a LambdaLR factor."""
    warmup = max(1, int(math.ceil(warmup_ratio * total_steps))) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_optimizer(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if not params:
        raise ValueError("the method exposes no trainable parameters for this phase")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def compute_loss(model: nn.Module, method: ContinualMethod, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Forward one batch with the method's routing; CE plus the method's extra terms. The CE is
    the model's own causal LM loss, with the LM head run only at the answer positions
    (``vlm.answer_loss``); ``method.extra_losses`` sees the forward's output (the base model's,
    without logits, for a causal LM with an answer head)."""
    method.route(batch, training=True)
    loss, out = answer_loss(model, model_inputs(batch))
    logs = {"ce": float(loss.detach())}
    for name, term in method.extra_losses(batch, out).items():
        loss = loss + term
        logs[name] = float(term.detach())
    return loss, logs


def split_batch(batch: Batch, parts: int) -> list[Batch]:
    """``batch`` cut into ``parts`` consecutive micro-batches (sizes differ by at most one sample);
    every per-sample tensor or list is cut, anything else is shared."""
    n = len(batch["input_ids"])
    if parts <= 1 or n <= 1:
        return [batch]
    bounds = [round(i * n / min(parts, n)) for i in range(min(parts, n) + 1)]
    out = []
    for lo, hi in zip(bounds, bounds[1:]):
        out.append({k: v[lo:hi] if isinstance(v, (torch.Tensor, list, tuple)) and len(v) == n else v
                    for k, v in batch.items()})
    return out


def accumulate(forward: Callable[[Batch], tuple[torch.Tensor, dict[str, float]]], batch: Batch, parts: int,
               backward: Callable[[torch.Tensor, int], None]) -> dict[str, float]:
    """``forward`` (-> loss, logs) and ``backward(loss, parts)`` each micro-batch of ``batch``; the
    mean of their logs.

    The caller's ``backward`` divides by ``parts`` (or lets DeepSpeed do it), so the accumulated
    gradient is the mean over micro-batches: with equal micro-batches, the full batch's gradient up
    to how the per-token mean of the loss weighs samples of different answer lengths.
    """
    chunks = split_batch(batch, parts)
    totals: dict[str, float] = {}
    for chunk in chunks:
        loss, logs = forward(chunk)
        backward(loss, len(chunks))
        for k, v in logs.items():
            totals[k] = totals.get(k, 0.0) + v / len(chunks)
    return totals


def fit_steps(
    model: nn.Module,
    method: ContinualMethod,
    batches: Iterator[Batch],
    steps: int,
    *,
    lr: float,
    warmup_ratio: float = 0.0,
    weight_decay: float = 0.0,
    observe: Optional[Callable[[Batch], None]] = None,
    log_every: int = 50,
    log: Callable[[str], None] = print,
    start_step: int = 0,
    optimizer_state: Optional[dict[str, Any]] = None,
    on_step: Optional[Callable[[int, torch.optim.Optimizer], None]] = None,
    grad_accum: int = 1,
    reporter: Optional[StepProgress] = None,
) -> dict[str, float]:
    """Run ``steps`` optimizer steps over ``method.trainable_parameters()``; returns mean losses.

    ``observe`` sees every batch (e.g. the probe's feature statistics). ``start_step`` and
    ``optimizer_state`` resume a run from a checkpoint; ``on_step(step, optimizer)`` is called after
    every step (checkpointing). ``grad_accum``: each batch runs as that many micro-batches whose
    gradients add up before the step (activation memory of one micro-batch). ``reporter`` reports
    the steps and keeps the loss curve (the caller closes it); without one, lines go to ``log``
    every ``log_every`` steps.
    """
    own = reporter is None
    if own:
        reporter = StepProgress("step", steps, log=log, every_steps=log_every,
                                every_seconds=StepProgress.EVERY_SECONDS if log_every else 0, bar=False)
    params = method.trainable_parameters()
    optimizer = make_optimizer(params, lr, weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_lambda(steps, warmup_ratio))
    for _ in range(start_step):
        schedule.step()
    model.train()
    totals: dict[str, float] = {}
    count = 0
    reporter.begin(start_step)
    for step in range(start_step, steps):
        batch = next(batches)
        if observe is not None:
            with torch.no_grad():
                observe(batch)
        optimizer.zero_grad(set_to_none=True)
        logs = accumulate(lambda b: compute_loss(model, method, b), batch, grad_accum,
                          lambda loss, parts: (loss / parts).backward())
        method.before_optimizer_step(step)
        optimizer.step()
        schedule.step()
        for k, v in logs.items():
            totals[k] = totals.get(k, 0.0) + v
        count += 1
        reporter.update(step + 1, logs)
        if on_step is not None:
            on_step(step + 1, optimizer)
    if own:
        reporter.close()
    model.eval()
    return {k: v / max(1, count) for k, v in totals.items()}


def cycle(make_epoch: Callable[[int], Iterable[Batch]]) -> Iterator[Batch]:
    """Endless batches: epoch e is ``make_epoch(e)`` (reshuffled per epoch by the caller)."""
    epoch = 0
    while True:
        produced = False
        for batch in make_epoch(epoch):
            produced = True
            yield batch
        if not produced:
            raise ValueError("the training data produced no batch")
        epoch += 1
