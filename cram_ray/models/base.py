"""Stage 0: the tiny VLM's base, pretrained once on a generic caption/QA mix and cached on disk.

The stream's experts learn task skills and answer formats on top of a frozen base, so the base must
already see the visual concepts the tasks ask about (colours, shapes, counts, digits, words,
positions; docs/DESIGN.md §6). :func:`get_base_vlm` builds the compact tokenizer, then looks for
``<cache_dir>/base/<key>/`` where ``key`` hashes everything that decides the weights (architecture,
base-training settings, text budget, vocabulary, the mix). When absent it pretrains every parameter
with AdamW (linear warm-up, cosine decay), measures greedy exact match on held-out mix records, and
publishes the result atomically: written to a temporary directory, then renamed, under a file lock
so concurrent processes train it once. :func:`build_vlm` is what the pipeline calls.
"""
from __future__ import annotations

import dataclasses
import fcntl
import math
import os
import shutil
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from cram_ray.config import BaseTrainConfig, StreamConfig, config_hash
from cram_ray.data.records import Record
from cram_ray.models.tokenizer import CompactTokenizer
from cram_ray.models.vision_warmup import warm_up_vision
from cram_ray.models.vlm import (
    IGNORE_INDEX,
    META_FILE,
    VLM,
    WEIGHTS_FILE,
    build_tiny_llava,
    compact_processor,
    freeze,
    load_hf_llava,
    load_vlm,
    save_vlm,
)

BASE_VERSION = 5  # bump when the training recipe changes, so stale caches are not reused
WARMUP_RATIO = 0.05
WEIGHT_DECAY = 0.01
GRAD_CLIP = 1.0
VISION_LR_MULT = 0.25  # the warmed-up vision tower moves slower than the fresh projector and language model
VISION_PREFIXES = ("model.vision_tower.",)
HELDOUT_RECORDS = 256
HELDOUT_SEED_OFFSET = 1_000_003  # held-out records come from a different seed than training ones
LOG_EVERY = 100
TEXT_PROMPT = "Repeat after me:"
TEXT_TASK = "pretrain-text"

MixFn = Callable[[int, int, int], list[Record]]  # (n, image_size, seed) -> records
Log = Callable[[str], None]


def _default_mix() -> tuple[MixFn, list[str]]:
    from cram_ray.data.pretrain_mix import pretrain_records, pretrain_vocabulary_texts

    return pretrain_records, list(pretrain_vocabulary_texts())


def text_records(tok: CompactTokenizer, n: int, seed: int) -> list[Record]:
    """``n`` text-only records (no image): repeat 1-4 random vocabulary tokens.

    A real MLLM's language model has written every token of its vocabulary before it sees a
    stream; the tiny one only writes what its mix answers use, so a task answering in tokens the
    mix never emits (brackets, bare digits, rare words) would start from untrained output rows that
    no language-model adapter can reach. These records give every printable token its turn as a
    target, and they say nothing about any image or task. Record ``i`` depends on ``(tok, seed, i)`` only.
    """
    def writable(i: int) -> bool:
        piece = tok.decode([i])
        return i not in tok.special_ids and bool(piece.strip()) and piece.isprintable() and "\ufffd" not in piece

    ids = [i for i in range(len(tok)) if writable(i)]
    records = []
    for i in range(n):
        rng = np.random.default_rng([seed, 0x7E47, i])
        first = ids[i % len(ids)]  # cycling through the vocabulary: every token leads some record
        rest = [ids[int(k)] for k in rng.integers(len(ids), size=int(rng.integers(0, 4)))]
        text = tok.decode([first, *rest]).strip()
        records.append(Record(id=f"{TEXT_TASK}-{seed}-{i:06d}", task=TEXT_TASK, image=None,
                              instruction=f"{TEXT_PROMPT} {text}", answer=text, metric="exact"))
    return records


def _print(msg: str) -> None:
    print(msg, flush=True)


def base_key(cfg: StreamConfig, tok: CompactTokenizer, mix_name: str) -> str:
    """Hash of everything that decides the base's weights (routing and checkpoint keys excluded)."""
    model = dataclasses.asdict(cfg.model)
    for irrelevant in ("kind", "path", "text_encoder", "routing_image_layers"):
        model.pop(irrelevant)
    return config_hash({
        "version": BASE_VERSION,
        "model": model,
        "text": [cfg.data.max_text_len, cfg.data.max_answer_len],
        "vocab": tok.to_json(),
        "mix": mix_name,
    })


def base_root(cfg: StreamConfig) -> Path:
    return Path(os.path.expanduser(cfg.data.cache_dir)) / "base"


def is_complete(directory: Path) -> bool:
    return (directory / META_FILE).is_file() and (directory / WEIGHTS_FILE).is_file()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (released by the OS if the holder dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# -- training ----------------------------------------------------------------------------------
def warmup_cosine(step: int, total: int) -> float:
    """LR factor: linear warm-up over WARMUP_RATIO of the steps, then cosine decay to 0."""
    warmup = max(1, int(math.ceil(WARMUP_RATIO * total)))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def answer_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (answer) positions, equal to the model's
    own ``out.loss``, but the output layer runs only where a label is, not on every prompt token."""
    hidden = model.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
    ).last_hidden_state  # (B, T, H)
    targets = batch["labels"][:, 1:]  # position t predicts token t + 1
    keep = targets != IGNORE_INDEX
    logits = model.lm_head(hidden[:, :-1][keep])  # (N, V)
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def pretrain(vlm: VLM, records: Sequence[Record], base: BaseTrainConfig, log: Log = _print) -> list[float]:
    """Train every parameter of ``vlm.model`` on ``records``; returns the loss of every step."""
    model = vlm.model
    for p in model.parameters():
        p.requires_grad_(True)
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        vision = name.startswith(VISION_PREFIXES)
        decays = p.ndim >= 2 and "embed" not in name
        groups.setdefault((vision, decays), []).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": ps, "lr": base.lr * (VISION_LR_MULT if vision else 1.0), "weight_decay": WEIGHT_DECAY if decays else 0.0}
         for (vision, decays), ps in groups.items()],
        lr=base.lr, betas=(0.9, 0.98),
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, base.steps))
    rng = np.random.default_rng(base.seed)
    bs = min(base.batch_size, len(records))
    order = rng.permutation(len(records))
    cursor = 0
    losses: list[float] = []
    t0 = time.time()
    model.train()
    for step in range(base.steps):
        if cursor + bs > len(order):
            order, cursor = rng.permutation(len(records)), 0
        recs = [records[i] for i in order[cursor:cursor + bs]]
        cursor += bs
        batch = vlm.processor.train_batch(recs, [0] * len(recs))
        loss = answer_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if (step + 1) % LOG_EVERY == 0 or step + 1 == base.steps:
            recent = losses[-LOG_EVERY:]
            log(f"[base] step {step + 1}/{base.steps} loss={sum(recent) / len(recent):.4f} "
                f"lr={schedule.get_last_lr()[0]:.2e} {time.time() - t0:.0f}s")
    model.eval()
    return losses


def greedy_answers(vlm: VLM, records: Sequence[Record], max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """``vlm``'s greedy answer to every record, in order."""
    answers: list[str] = []
    for start in range(0, len(records), batch_size):
        recs = list(records[start:start + batch_size])
        with torch.no_grad():
            answers += vlm.generate(vlm.processor.prompt_batch(recs, [0] * len(recs)), max_new_tokens)
    return answers


def exact_match(vlm: VLM, records: Sequence[Record], max_new_tokens: int, batch_size: int = 64) -> float:
    """Share of ``records`` whose greedy answer equals the reference exactly (after strip)."""
    if not records:
        return 0.0
    preds = greedy_answers(vlm, records, max_new_tokens, batch_size)
    return sum(p == r.answer.strip() for p, r in zip(preds, records)) / len(records)


# -- the cache ---------------------------------------------------------------------------------
def get_base_vlm(
    cfg: StreamConfig,
    corpus_texts: Sequence[str],
    *,
    mix: Optional[MixFn] = None,
    vocabulary: Optional[Sequence[str]] = None,
    log: Log = _print,
) -> VLM:
    """The frozen pretrained tiny base for ``cfg``, from the cache or trained now (then cached).

    Args:
        cfg: the stream config (``model`` and ``data`` sections are read).
        corpus_texts: the stream's instructions and answers; their tokens join the vocabulary.
        mix: ``(n, image_size, seed) -> records`` of the base mix; default
            ``cram_ray.data.pretrain_mix.pretrain_records``.
        vocabulary: texts of the mix's vocabulary; default ``pretrain_vocabulary_texts()``.
        log: progress lines.

    Returns:
        A VLM in eval mode with every parameter frozen; ``meta["base_dir"]`` is its cache directory
        and ``meta["source"]`` is ``"trained"`` or ``"cache"``.
    """
    if mix is None or vocabulary is None:
        default_mix, default_vocab = _default_mix()
        mix = mix or default_mix
        vocabulary = default_vocab if vocabulary is None else vocabulary
    module = getattr(mix, "__module__", "?")
    mix_version = getattr(sys.modules.get(module), "MIX_VERSION", 0)
    mix_name = f"{module}.{getattr(mix, '__qualname__', repr(mix))}@{mix_version}"
    tok = CompactTokenizer.build([TEXT_PROMPT, *vocabulary, *corpus_texts])
    key = base_key(cfg, tok, mix_name)
    root = base_root(cfg)
    final = root / key
    with _locked(root / f"{key}.lock"):
        if not is_complete(final):
            _train_and_publish(cfg, tok, mix, final, log)
            source = "trained"
        else:
            source = "cache"
    vlm = load_vlm(final)
    vlm.meta.update({"base_dir": str(final), "source": source})
    freeze(vlm.model)
    return vlm


def _train_and_publish(cfg: StreamConfig, tok: CompactTokenizer, mix: MixFn, final: Path, log: Log) -> None:
    base = cfg.model.base
    train_cfg = dataclasses.replace(cfg.model, dtype="float32")  # optimise in fp32 whatever the serving dtype
    with torch.random.fork_rng():
        torch.manual_seed(base.seed)
        model = build_tiny_llava(train_cfg, tok)
    vlm = VLM(model, compact_processor(train_cfg, cfg.data, tok), cfg.model)
    n_params = vlm.num_parameters()
    log(f"[base] no cached base at {final}; pretraining {n_params / 1e6:.2f}M parameters for {base.steps} steps "
        f"(batch {base.batch_size}, lr {base.lr:g}, {torch.get_num_threads()} threads)")
    t0 = time.time()
    losses: list[float] = []
    heldout = float("nan")
    if base.steps > 0:
        mixed = mix(max(base.samples, base.vision_samples), cfg.model.image_size, base.seed)  # a longer mix extends a shorter one
        records = mixed[:base.samples] + text_records(tok, base.text_samples, base.seed)
        gen_seconds = time.time() - t0
        warm = warm_up_vision(vlm, mixed[:base.vision_samples], base.vision_steps, base.batch_size, base.vision_lr, base.seed, log)
        losses = pretrain(vlm, records, base, log)
        train_seconds = time.time() - t0 - gen_seconds
        held = mix(min(HELDOUT_RECORDS, base.samples), cfg.model.image_size, base.seed + HELDOUT_SEED_OFFSET)
        heldout = exact_match(vlm, held, cfg.data.max_answer_len)
        log(f"[base] trained in {train_seconds:.0f}s ({train_seconds / base.steps:.3f} s/step); "
            f"held-out exact match {100 * heldout:.1f}% on {len(held)} mix records")
    else:
        gen_seconds = train_seconds = 0.0
        warm = {}
    vlm.model.to(dict(float32=torch.float32, bfloat16=torch.bfloat16)[cfg.model.dtype])
    vlm.processor = compact_processor(cfg.model, cfg.data, tok)
    vlm.meta = {
        "parameters": n_params,
        "steps": base.steps,
        "final_loss": float(np.mean(losses[-LOG_EVERY:])) if losses else None,
        **warm,
        "heldout_exact": None if math.isnan(heldout) else heldout,
        "mix_seconds": round(gen_seconds, 2),
        "train_seconds": round(train_seconds, 2),
        "threads": torch.get_num_threads(),
    }
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        save_vlm(vlm, tmp)
        if final.exists():  # an incomplete leftover of a crashed writer (complete ones are never replaced)
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# -- what the pipeline calls -------------------------------------------------------------------
def build_vlm(cfg: StreamConfig, corpus_texts: Sequence[str]) -> VLM:
    """The frozen base VLM of a stream: the cached tiny base (kind=tiny) or a local Llava checkpoint."""
    if cfg.model.kind == "tiny":
        return get_base_vlm(cfg, corpus_texts)
    vlm = load_hf_llava(str(cfg.model.path), cfg)
    freeze(vlm.model)
    return vlm
