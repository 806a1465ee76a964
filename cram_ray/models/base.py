"""Stage 0: the tiny VLM's base, pretrained on a generic caption/QA mix, shipped or cached on disk.

The stream's experts learn task skills and answer formats on top of a frozen base, so the base must
already see the visual concepts the tasks ask about (colours, shapes, counts, digits, words,
positions; docs/DESIGN.md §6). Every tiny base shares one packaged vocabulary (:func:`base_tokenizer`), so
no benchmark decides a base. :func:`get_base_vlm` hashes everything that decides the weights
(recipe version, architecture, base-training settings, text budget, vocabulary, the mix) into a key,
then serves the base shipped under ``cram_ray/assets/bases/`` with that key (its SHA-256 checked),
else ``<cache_dir>/base/<key>/``; when neither exists it pretrains every parameter with AdamW
(linear warm-up, cosine decay), measures greedy exact match on held-out mix records, and publishes
the result atomically: written to a temporary directory, then renamed, under a file lock so
concurrent processes train it once. :func:`retrain` writes a new shipped base; :func:`build_vlm`
is what the pipeline calls.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import time
import uuid
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cram_ray.config import BaseTrainConfig, StreamConfig, config_hash
from cram_ray.data.records import DataError, Record
from cram_ray.models.tokenizer import BYTE_TO_CHAR, CompactTokenizer, gpt2_tokenizer
from cram_ray.models.vision_warmup import warm_up_vision
from cram_ray.models.vlm import (
    DTYPES,
    META_FILE,
    VLM,
    WEIGHTS_FILE,
    answer_loss,
    build_tiny_llava,
    compact_processor,
    freeze,
    load_hf_llava,
    load_vlm,
    model_inputs,
    save_vlm,
)

BASE_VERSION = 6  # bump when the training recipe changes, so stale caches are not reused
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
RARE_EVERY = 4  # every 4th text record spells a word outside the vocabulary (in byte tokens)
RARE_WORDS = 20_000  # the GPT-2 words beyond the vocabulary those records draw from, most frequent first
VOCABULARY_SIZE = 4096  # ids of the one vocabulary every tiny base shares (embedding + LM head: 2 x 4096 x width)
ASSETS = Path(__file__).resolve().parents[1] / "assets" / "bases"
VOCABULARY_FILE = ASSETS / "vocabulary.json"

SPACE = BYTE_TO_CHAR[ord(" ")]  # how GPT-2's byte-level tokens spell a leading space
MixFn = Callable[[int, int, int], list[Record]]  # (n, image_size, seed) -> records
Log = Callable[[str], None]


def build_base_vocabulary() -> CompactTokenizer:
    """The vocabulary of every tiny base: the mix's and the built-in benchmark's tokens, the 256
    bytes, and GPT-2's most frequent printable tokens up to VOCABULARY_SIZE ids.

    Built once and packaged (:data:`VOCABULARY_FILE`): a base is trained with it, so it stays
    fixed whatever benchmark a stream runs; any other text encodes too, rarer words in byte tokens.
    """
    from cram_ray.data.builtin import vocabulary_texts
    from cram_ray.data.pretrain_mix import pretrain_vocabulary_texts

    return CompactTokenizer.build([TEXT_PROMPT, *pretrain_vocabulary_texts(), *vocabulary_texts()],
                                  fill_to=VOCABULARY_SIZE)


@lru_cache(maxsize=1)
def base_tokenizer() -> CompactTokenizer:
    """The packaged vocabulary every tiny base is trained with."""
    return CompactTokenizer.from_json(VOCABULARY_FILE.read_text())


def _rare_words(tok: CompactTokenizer) -> list[str]:
    """Lower-case GPT-2 words (4-10 letters) that ``tok`` spells in byte tokens, most frequent first."""
    vocab = set(tok.tokens)
    gpt2 = gpt2_tokenizer()
    words = []
    for i in range(gpt2.get_vocab_size()):
        token = gpt2.id_to_token(i)
        word = token[1:] if token.startswith(SPACE) else ""
        if 4 <= len(word) <= 10 and word.isascii() and word.isalpha() and word.islower() and token not in vocab:
            words.append(word)
            if len(words) == RARE_WORDS:
                break
    return words


def text_records(tok: CompactTokenizer, n: int, seed: int) -> list[Record]:
    """``n`` text-only records (no image): repeat 1-4 random vocabulary tokens, or (every
    RARE_EVERY-th record) one word outside the vocabulary.

    A real MLLM's language model has written every token of its vocabulary before it sees a
    stream; the tiny one only writes what its mix answers use, so a task answering in tokens the
    mix never emits (brackets, bare digits, rare words) would start from untrained output rows that
    no language-model adapter can reach. These records give every printable token its turn as a
    target, and the rare words teach it to copy byte tokens, which is how any benchmark's words
    outside the vocabulary are written; they say nothing about any image or task. Record ``i``
    depends on ``(tok, seed, i)`` only.
    """
    def writable(i: int) -> bool:
        piece = tok.decode([i])
        return i not in tok.special_ids and bool(piece.strip()) and piece.isprintable() and "\ufffd" not in piece

    ids = [i for i in range(len(tok)) if writable(i)]
    rare = _rare_words(tok)
    records = []
    for i in range(n):
        rng = np.random.default_rng([seed, 0x7E47, i])
        if rare and i % RARE_EVERY == RARE_EVERY - 1:
            text = rare[int(rng.integers(len(rare)))]
        else:
            first = ids[(i - i // RARE_EVERY) % len(ids)]  # cycling through the vocabulary: every token leads some record
            rest = [ids[int(k)] for k in rng.integers(len(ids), size=int(rng.integers(0, 4)))]
            text = tok.decode([first, *rest]).strip()
        records.append(Record(id=f"{TEXT_TASK}-{seed}-{i:06d}", task=TEXT_TASK, image=None,
                              instruction=f"{TEXT_PROMPT} {text}", answer=text, metric="exact"))
    return records


def _print(msg: str) -> None:
    print(msg, flush=True)


def progress(done: int, total: int, seconds: float) -> str:
    """``"12s, ETA 1m 48s"``: elapsed time and the rest at the rate so far."""
    def fmt(t: float) -> str:
        t = int(round(t))
        return f"{t // 60}m {t % 60:02d}s" if t >= 60 else f"{t}s"

    return f"{fmt(seconds)}, ETA {fmt(seconds / max(1, done) * (total - done))}"


def base_fields(cfg: StreamConfig) -> dict:
    """The config fields that decide a tiny base's weights (routing and serving dtype excluded)."""
    model = dataclasses.asdict(cfg.model)
    # init and vocab_size only size a random-init hf_llava
    for irrelevant in ("kind", "path", "init", "vocab_size", "text_encoder", "routing_image_layers", "dtype"):
        model.pop(irrelevant)
    return {"model": model, "text": [cfg.data.max_text_len, cfg.data.max_answer_len]}


def mix_name(mix: MixFn) -> str:
    module = getattr(mix, "__module__", "?")
    version = getattr(sys.modules.get(module), "MIX_VERSION", 0)
    return f"{module}.{getattr(mix, '__qualname__', repr(mix))}@{version}"


def base_key(cfg: StreamConfig, tok: CompactTokenizer, mix: str) -> str:
    """Hash of everything that decides the base's weights: recipe version, config fields, vocabulary, mix."""
    return config_hash({"version": BASE_VERSION, **base_fields(cfg), "vocab": tok.to_json(), "mix": mix})


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
        loss, _ = answer_loss(model, model_inputs(batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if (step + 1) % LOG_EVERY == 0 or step + 1 == base.steps:
            recent = losses[-LOG_EVERY:]
            log(f"[base] VLM step {step + 1}/{base.steps} loss={sum(recent) / len(recent):.4f} "
                f"lr={schedule.get_last_lr()[0]:.2e} {progress(step + 1, base.steps, time.time() - t0)}")
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
    *,
    mix: Optional[MixFn] = None,
    tok: Optional[CompactTokenizer] = None,
    log: Log = _print,
) -> VLM:
    """The frozen pretrained tiny base for ``cfg``: shipped with the package, cached, or trained now.

    Args:
        cfg: the stream config (``model`` and ``data`` sections are read).
        mix: ``(n, image_size, seed) -> records`` of the base mix; default
            ``cram_ray.data.pretrain_mix.pretrain_records``.
        tok: the vocabulary; default the packaged one (:func:`base_tokenizer`).
        log: progress lines.

    Returns:
        A VLM in ``cfg.model.dtype``, eval mode, every parameter frozen; ``meta["base_dir"]`` is
        where it was read from and ``meta["source"]`` is ``"shipped"``, ``"cache"`` or ``"trained"``.
    """
    if mix is None:
        from cram_ray.data.pretrain_mix import pretrain_records as mix
    tok = tok or base_tokenizer()
    key = base_key(cfg, tok, mix_name(mix))
    shipped = find_shipped(key)
    if shipped is not None:
        vlm, source = load_shipped(shipped, cfg), "shipped"
        final = shipped
    else:
        root = base_root(cfg)
        final = root / key
        with _locked(root / f"{key}.lock"):
            if not is_complete(final):
                _train_and_publish(cfg, tok, mix, final, log)
                source = "trained"
            else:
                source = "cache"
        vlm = load_vlm(final)
    vlm.model.to(DTYPES[cfg.model.dtype])
    vlm.cfg = cfg.model
    vlm.meta.update({"base_dir": str(final), "source": source})
    freeze(vlm.model)
    return vlm


@contextmanager
def _all_cores(log: Log) -> Iterator[int]:
    """Torch threads = the cores this process may use (a Ray task starts at one), restored after."""
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(cores)
    try:
        yield cores
    finally:
        torch.set_num_threads(before)


def train_base(cfg: StreamConfig, tok: CompactTokenizer, mix: MixFn, log: Log = _print) -> VLM:
    """Pretrain a float32 tiny base for ``cfg`` (stage 0a, then the VLM stage) with every core."""
    base = cfg.model.base
    train_cfg = dataclasses.replace(cfg.model, dtype="float32")  # optimise in fp32 whatever the serving dtype
    with torch.random.fork_rng():
        torch.manual_seed(base.seed)
        model = build_tiny_llava(train_cfg, tok)
    vlm = VLM(model, compact_processor(train_cfg, cfg.data, tok), train_cfg)
    n_params = vlm.num_parameters()
    losses: list[float] = []
    heldout = float("nan")
    with _all_cores(log) as cores:
        log(f"[base] pretraining {n_params / 1e6:.2f}M parameters: {base.vision_steps} vision warm-up steps, then "
            f"{base.steps} VLM steps (batch {base.batch_size}, lr {base.lr:g}, {cores} threads)")
        t0 = time.time()
        if base.steps > 0:
            mixed = mix(max(base.samples, base.vision_samples), cfg.model.image_size, base.seed)  # a longer mix extends a shorter one
            records = mixed[:base.samples] + text_records(tok, base.text_samples, base.seed)
            gen_seconds = time.time() - t0
            log(f"[base] drew {len(mixed)} mix records and {base.text_samples} text records in {gen_seconds:.0f}s")
            warm = warm_up_vision(vlm, mixed[:base.vision_samples], base.vision_steps, base.batch_size, base.vision_lr,
                                  base.seed, log)
            losses = pretrain(vlm, records, base, log)
            train_seconds = time.time() - t0 - gen_seconds
            held = mix(min(HELDOUT_RECORDS, base.samples), cfg.model.image_size, base.seed + HELDOUT_SEED_OFFSET)
            heldout = exact_match(vlm, held, cfg.data.max_answer_len)
            log(f"[base] trained in {train_seconds:.0f}s ({train_seconds / base.steps:.3f} s/step); "
                f"held-out exact match {100 * heldout:.1f}% on {len(held)} mix records")
        else:
            gen_seconds = train_seconds = 0.0
            warm = {}
    vlm.meta = {
        "parameters": n_params,
        "steps": base.steps,
        "final_loss": float(np.mean(losses[-LOG_EVERY:])) if losses else None,
        **warm,
        "heldout_exact": None if math.isnan(heldout) else heldout,
        "mix_seconds": round(gen_seconds, 2),
        "train_seconds": round(train_seconds, 2),
        "threads": cores,
    }
    return vlm


def _train_and_publish(cfg: StreamConfig, tok: CompactTokenizer, mix: MixFn, final: Path, log: Log) -> None:
    log(f"[base] no shipped or cached base for this config; training one into {final}")
    _publish(train_base(cfg, tok, mix, log), final)


def _publish(vlm: VLM, final: Path) -> None:
    """Write ``vlm`` to ``final`` atomically: a temporary directory, then a rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        save_vlm(vlm, tmp)
        if final.exists():  # a crashed writer's leftover, or the base a retrain replaces
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# -- the bases shipped with the package ------------------------------------------------------------
SHIPPED_META = "meta.json"
SHIPPED_FORMAT = "cram_ray.shipped_base/1"
SHIPPED_DTYPE = torch.float16  # half the bytes of float32 (bench.py base compares the two)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shipped_bases(root: Path = ASSETS) -> dict[str, Path]:
    """Key -> directory of every base shipped under ``root``."""
    found = {}
    for meta in sorted(root.glob(f"*/{SHIPPED_META}")):
        found[json.loads(meta.read_text())["key"]] = meta.parent
    return found


def find_shipped(key: str) -> Optional[Path]:
    return shipped_bases().get(key)


def verify_shipped(directory: Path) -> dict:
    """The base's meta.json, once its weights match the SHA-256 it records; else DataError (one line)."""
    meta = json.loads((directory / SHIPPED_META).read_text())
    weights = directory / WEIGHTS_FILE
    digest = sha256(weights)
    if digest != meta["sha256"]:
        raise DataError(f"{weights}: SHA-256 {digest[:16]}... differs from {meta['sha256'][:16]}... in its "
                        f"{SHIPPED_META}; reinstall cram_ray or retrain this base")
    return meta


def load_shipped(directory: Path, cfg: StreamConfig) -> VLM:
    """A shipped base (float32, eval mode) for ``cfg``, whose base fields it was trained with."""
    meta = verify_shipped(directory)
    tok = CompactTokenizer.from_json(json.dumps(meta["vocabulary"]))
    train_cfg = dataclasses.replace(cfg.model, dtype="float32")
    model = build_tiny_llava(train_cfg, tok)
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)  # copies cast to float32
    model.eval()
    return VLM(model, compact_processor(train_cfg, cfg.data, tok), train_cfg, dict(meta["training"]))


def ship(vlm: VLM, cfg: StreamConfig, tok: CompactTokenizer, mix: MixFn, out: Path) -> Path:
    """Write ``vlm`` as a shipped base into ``out``: 16-bit weights and a meta.json naming their
    SHA-256, the key and base fields it answers, the vocabulary and its training figures."""
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_FILE
    state = {k: v.detach().to(SHIPPED_DTYPE).contiguous().cpu() for k, v in vlm.model.state_dict().items()}
    save_file(state, str(weights))
    meta = {
        "format": SHIPPED_FORMAT,
        "key": base_key(cfg, tok, mix_name(mix)),
        "sha256": sha256(weights),
        "dtype": str(SHIPPED_DTYPE).removeprefix("torch."),
        "base_version": BASE_VERSION,
        "mix": mix_name(mix),
        **base_fields(cfg),
        "training": {k: v for k, v in vlm.meta.items() if k not in ("base_dir", "source")},
        "vocabulary": json.loads(tok.to_json()),
    }
    (out / SHIPPED_META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return out


def retrain(cfg: StreamConfig, out: Path, log: Log = _print) -> VLM:
    """Pretrain ``cfg``'s base anew with the packaged vocabulary and mix, ship it (16-bit) into
    ``out`` and keep the float32 weights in the cache; returns the float32 base."""
    from cram_ray.data.pretrain_mix import pretrain_records

    tok = base_tokenizer()
    vlm = train_base(cfg, tok, pretrain_records, log)
    final = base_root(cfg) / base_key(cfg, tok, mix_name(pretrain_records))
    with _locked(final.parent / f"{final.name}.lock"):
        _publish(vlm, final)
    ship(vlm, cfg, tok, pretrain_records, out)
    log(f"[base] shipped {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.1f} MB); float32 copy in {final}")
    vlm.meta["base_dir"] = str(final)
    return vlm


# -- what the pipeline calls -------------------------------------------------------------------
def build_vlm(cfg: StreamConfig) -> VLM:
    """The frozen base VLM of a stream: the tiny base (kind=tiny) or a local Llava checkpoint."""
    if cfg.model.kind == "tiny":
        return get_base_vlm(cfg)
    vlm = load_hf_llava(cfg.model.path, cfg)
    freeze(vlm.model)
    return vlm
