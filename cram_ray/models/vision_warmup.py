"""Stage 0a of the tiny base: teach the vision tower to see before the language model learns to read it.

Trained jointly from scratch, a small Llava learns the answers' text prior within a few hundred
steps and then ignores its image tokens: on the pretraining mix, shuffling the images changed 0%
of the greedy answers after 400 steps, and after 1500 steps shape naming was still at chance
(README, "The tiny base"). A Llava built from pretrained parts never meets this, because its vision
tower already encodes the image. Having no pretrained vision weights offline, we give the tower a
short direct task first: answer each short question of the mix (colour, shape, position, count,
digit, word, ...) from the image alone, through a question-conditioned attention pooling over the
patch tokens and a linear classifier over the mix's short answers. Captions (long compositional
answers) are left to the full VLM stage. The head is discarded afterwards; only the tower's
weights carry over.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import numpy as np
import torch

from cram_ray.data.records import Record

CAPTION_WORDS = 4  # answers with more words than this are captions: not classes of the warm-up


class QuestionHead(torch.nn.Module):
    """Per-question attention pooling of the patch tokens, then a classifier over that question's answers.

    The classifier sees the pooled tokens, their mean and the question's embedding, and its logits
    are masked to the answers the question was seen with: measured on the mix, a classifier over
    every answer of every question, told the question only through the pooling, reached 11% on
    held-out records after 600 steps; with the question and the mask, 18-25%, and colour questions
    went from 33% to 95-100%.
    """

    def __init__(self, width: int, allowed: torch.Tensor) -> None:
        super().__init__()
        n_questions, n_answers = allowed.shape
        self.norm = torch.nn.LayerNorm(width)
        self.query = torch.nn.Embedding(n_questions, width)
        self.question = torch.nn.Embedding(n_questions, width)
        self.classify = torch.nn.Sequential(torch.nn.Linear(3 * width, 2 * width), torch.nn.GELU(),
                                            torch.nn.Linear(2 * width, n_answers))
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, tokens: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        x = self.norm(tokens)  # (B, N, D)
        q = self.query(question)  # (B, D)
        attn = torch.softmax(torch.einsum("bnd,bd->bn", x, q) / math.sqrt(x.shape[-1]), dim=-1)
        pooled = torch.einsum("bn,bnd->bd", attn, x)
        features = torch.cat([pooled, x.mean(dim=1), self.question(question)], dim=-1)
        return self.classify(features) + self.mask.to(x.dtype)[question]


def short_qa(records: Sequence[Record]) -> tuple[list[Record], dict[str, int], dict[str, int]]:
    """The records with short answers, and the question / answer vocabularies they use."""
    kept = [r for r in records if r.image is not None and len(r.answer.split()) <= CAPTION_WORDS]
    questions = {q: i for i, q in enumerate(sorted({r.instruction for r in kept}))}
    answers = {a: i for i, a in enumerate(sorted({r.answer.strip() for r in kept}))}
    return kept, questions, answers


def allowed_answers(records: Sequence[Record], questions: dict[str, int], answers: dict[str, int]) -> torch.Tensor:
    """(questions, answers) bool: which answers each question was seen with in ``records``."""
    allowed = torch.zeros(len(questions), len(answers), dtype=torch.bool)
    for r in records:
        allowed[questions[r.instruction], answers[r.answer.strip()]] = True
    return allowed


def patch_tokens(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The vision tower's tokens as Llava's projector reads them: the configured feature layer,
    without CLIP's CLS token under the "default" selection strategy."""
    config = model.config
    hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[config.vision_feature_layer]
    return hidden[:, 1:] if config.vision_feature_select_strategy == "default" else hidden


def warm_up_vision(vlm, records: Sequence[Record], steps: int, batch_size: int, lr: float, seed: int,
                   log: Callable[[str], None] = print) -> dict[str, float]:
    """Train ``vlm``'s vision tower (in place) on the short questions of ``records``.

    Returns the classifier's accuracy on the last 10% of steps' batches (training data) and the
    number of classes, for the base's metadata.
    """
    from cram_ray.models.base import GRAD_CLIP, WEIGHT_DECAY, progress, warmup_cosine  # base imports this module

    kept, questions, answers = short_qa(records)
    if steps <= 0 or not kept:
        return {}
    model = vlm.model
    tower = model.model.vision_tower
    width = model.config.vision_config.hidden_size
    head = QuestionHead(width, allowed_answers(kept, questions, answers)).to(next(tower.parameters()).dtype)
    params = list(tower.parameters()) + list(head.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, steps))
    rng = np.random.default_rng([seed, 0xA11])
    bs = min(batch_size, len(kept))
    tower.train()
    head.train()
    hits = seen = 0
    t0 = time.time()
    order, cursor = rng.permutation(len(kept)), 0
    for step in range(steps):
        if cursor + bs > len(order):
            order, cursor = rng.permutation(len(kept)), 0
        recs = [kept[i] for i in order[cursor:cursor + bs]]
        cursor += bs
        pixels = vlm.processor.pixel_values([r.image for r in recs])
        q = torch.tensor([questions[r.instruction] for r in recs])
        y = torch.tensor([answers[r.answer.strip()] for r in recs])
        logits = head(patch_tokens(model, pixels), q)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        schedule.step()
        if step >= steps - max(1, steps // 10):
            hits += int((logits.argmax(-1) == y).sum())
            seen += len(recs)
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"[base] vision warm-up step {step + 1}/{steps} loss={float(loss.detach()):.3f} "
                f"{progress(step + 1, steps, time.time() - t0)}")
    tower.eval()
    for p in tower.parameters():
        p.requires_grad_(False)
    acc = hits / max(1, seen)
    log(f"[base] vision warm-up: {len(questions)} questions, {len(answers)} answers, "
        f"train accuracy {100 * acc:.1f}% over the last {seen} samples")
    return {"vision_warmup_accuracy": acc, "vision_warmup_classes": float(len(answers))}
