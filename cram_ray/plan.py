"""The plan of a stream before it runs: what it will run where, and whether it fits in GPU memory.

:func:`estimate_memory` is a pure function of a config (no Ray, no model built): per-GPU bytes of
the frozen weights, the adapters and their training state as DeepSpeed ZeRO partitions it, the
activations of one micro-batch (with and without gradient checkpointing), the KV cache of one
evaluation batch, and a fixed runtime overhead. Every term is a formula of docs/sizing.md, and
:func:`make_plan` (behind ``--dry-run``) renders them with the run's layout next to the named GPU's
memory. ``tests/test_plan.py`` checks each term against its formula and the total against the
measured peak of one training step of a tiny model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from cram_ray.config import ConfigError, StreamConfig, embedded_driver, environment_problems, is_uri

GIB = 2 ** 30
STAGES = ("probe", "allocate", "train", "aggregate", "evaluate")

# name -> (memory in GiB as the driver reports it, dense bf16 tensor TFLOP/s)
GPUS: dict[str, tuple[float, float]] = {
    "h100-80gb": (79.6, 989.0),
    "h200-141gb": (139.8, 989.0),
    "a100-80gb": (80.0, 312.0),
    "a100-40gb": (40.0, 312.0),
    "l40s-48gb": (45.0, 362.0),
    "a6000-48gb": (48.0, 155.0),
    "a10g-24gb": (22.5, 70.0),
    "l4-24gb": (22.5, 121.0),
    "rtx4090-24gb": (23.6, 165.0),
    "v100-32gb": (32.0, 125.0),
    "t4-16gb": (15.0, 65.0),
}
GPU_OVERHEAD_GIB = 2.0  # CUDA context, cuBLAS workspaces, NCCL buffers, allocator slack
MFU = 0.35  # share of the dense bf16 peak a LoRA step sustains, for time estimates only
DS_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's default reduce_bucket_size


# -- the model's shape -------------------------------------------------------------------------
@dataclass(frozen=True)
class Arch:
    """The sizes the estimate needs, from the config or from a checkpoint's config.json."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    vision_hidden: int
    vision_layers: int
    vision_intermediate: int
    image_size: int
    patch_size: int
    image_tokens: int
    source: str = "config"

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads


TINY_VOCAB = 4096  # the packaged vocabulary of the tiny bases (cram_ray/assets/bases/vocabulary.json)


def arch_of(cfg: StreamConfig) -> Arch:
    """The architecture a stream will run: a pretrained checkpoint's config.json when it is on this
    machine, else the ``model`` section's sizes (the tiny model, a random-init Llava, or the
    checkpoint's sizes as the preset states them)."""
    m = cfg.model
    patches = (m.image_size // m.patch_size) ** 2
    base = Arch(hidden=m.text_hidden, layers=m.text_layers, heads=m.text_heads, kv_heads=m.text_heads,
                intermediate=m.text_intermediate, vocab=m.vocab_size or TINY_VOCAB, vision_hidden=m.vision_hidden,
                vision_layers=m.vision_layers, vision_intermediate=4 * m.vision_hidden, image_size=m.image_size,
                patch_size=m.patch_size, image_tokens=patches,
                source="model section" if m.kind == "hf_llava" else "tiny model")
    path = Path(str(m.path), "config.json") if m.kind == "hf_llava" and m.init == "pretrained" else None
    if path is None or not path.is_file():
        return base
    raw = json.loads(path.read_text())
    text, vision = raw.get("text_config", {}), raw.get("vision_config", {})
    heads = int(text.get("num_attention_heads", base.heads))
    image, patch = int(vision.get("image_size", base.image_size)), int(vision.get("patch_size", base.patch_size))
    full = raw.get("vision_feature_select_strategy", "default") == "full"
    return Arch(hidden=int(text.get("hidden_size", base.hidden)), layers=int(text.get("num_hidden_layers", base.layers)),
                heads=heads, kv_heads=int(text.get("num_key_value_heads", heads)),
                intermediate=int(text.get("intermediate_size", base.intermediate)),
                vocab=int(text.get("vocab_size", base.vocab)),
                vision_hidden=int(vision.get("hidden_size", base.vision_hidden)),
                vision_layers=int(vision.get("num_hidden_layers", base.vision_layers)),
                vision_intermediate=int(vision.get("intermediate_size", base.vision_intermediate)),
                image_size=image, patch_size=patch, image_tokens=(image // patch) ** 2 + int(full), source=str(path))


def text_params(a: Arch) -> int:
    """Llama: untied embedding + LM head, per layer q/k/v/o + gate/up/down + two RMSNorms, final norm."""
    per_layer = a.hidden * (a.hidden + 2 * a.kv_dim) + a.hidden * a.hidden + 3 * a.hidden * a.intermediate + 2 * a.hidden
    return 2 * a.vocab * a.hidden + a.layers * per_layer + a.hidden


def vision_params(a: Arch) -> int:
    """CLIP ViT: patch conv, class + position embeddings, pre/post LayerNorm, per layer attention
    (4 biased linears), MLP (2 biased linears) and two LayerNorms."""
    h, i = a.vision_hidden, a.vision_intermediate
    patches = (a.image_size // a.patch_size) ** 2
    per_layer = 4 * (h * h + h) + 2 * h * i + i + h + 4 * h
    return 3 * a.patch_size ** 2 * h + h + (patches + 1) * h + 4 * h + a.vision_layers * per_layer


def projector_params(a: Arch) -> int:
    """Llava's two-layer MLP projector, vision width -> text width -> text width."""
    return a.vision_hidden * a.hidden + a.hidden + a.hidden * a.hidden + a.hidden


def linear_shapes(a: Arch) -> dict[str, tuple[int, int]]:
    """(in, out) of every language-model linear a target name can pick, per layer."""
    h, kv, i = a.hidden, a.kv_dim, a.intermediate
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


# -- adapters ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterSizes:
    trainable: int  # parameters with gradients and optimizer state at the heaviest phase
    stored: int  # frozen adapter parameters of earlier tasks kept at the last task
    rank_per_target: int  # width of the A x activation each target saves


def method_ranks(cfg: StreamConfig) -> tuple[int, int, int]:
    """(trainable rank per target, frozen rank per target at the last of T tasks, gate rows per target)."""
    m, tasks = cfg.method, max(1, task_count(cfg) or 1)
    rank = m.rank
    if m.name == "cram":
        # the probe trains a buffer of buf_rank; each task keeps at most rank_max of it
        return max(m.cram.buf_rank, m.cram.rank_max), (tasks - 1) * m.cram.rank_max, 0
    if m.name == "lora_ft":
        return rank, 0, 0
    if m.name == "moelora":  # E experts of expert_rank, all trainable, and a gate row per expert
        return m.moelora.experts * (m.moelora.expert_rank or rank), 0, m.moelora.experts
    return rank, (tasks - 1) * rank, 0  # one slot per task: olora, hide, same, oracle


def adapter_sizes(cfg: StreamConfig, a: Arch) -> AdapterSizes:
    """LoRA of rank r on a (d_in, d_out) linear: r (d_in + d_out) parameters, on every target of every layer."""
    trainable_r, stored_r, gates = method_ranks(cfg)
    shapes = linear_shapes(a)
    targets = [shapes[t] for t in cfg.method.target_modules if t in shapes]
    per_layer = sum(d_in + d_out for d_in, d_out in targets)
    gate = gates * sum(d_in for d_in, _ in targets)
    return AdapterSizes(trainable=a.layers * (trainable_r * per_layer + gate), stored=a.layers * stored_r * per_layer,
                        rank_per_target=trainable_r * len(targets))


# -- the estimate ------------------------------------------------------------------------------
def sequence_length(cfg: StreamConfig, a: Arch) -> int:
    """Tokens of one training sample at most: <bos> + image tokens + the text budget."""
    return 1 + a.image_tokens + cfg.data.max_text_len


def zero_state_bytes(trainable: int, *, stage: int, world: int, param_bytes: int, mixed: bool,
                     params_partitioned: bool = False) -> dict[str, float]:
    """Adapter parameters, gradients and Adam state per GPU, as ZeRO partitions them over ``world`` ranks.

    Mixed precision (bf16): 16-bit parameters and gradients, an fp32 master copy and two fp32 Adam
    moments (12 bytes); full precision: 4-byte parameters and gradients, 8 bytes of moments.
    Stage 1 partitions the optimizer state, stage 2 also the gradients, stage 3 also the
    parameters (``params_partitioned``; this project keeps them whole, see cram_ray/train/zero.py).
    """
    grad_bytes = param_bytes
    optim_bytes = 12 if mixed else 8
    p, g, o = trainable * param_bytes, trainable * grad_bytes, trainable * optim_bytes
    stage = max(stage, 0)  # -1 (plain DDP) keeps everything on every rank, as stage 0
    n = max(1, world)
    if stage >= 1:
        o /= n
    if stage >= 2:
        g /= n
    if stage >= 3 and params_partitioned:
        p /= n
    return {"adapter_params": p, "adapter_grads": g, "optimizer_state": o}


def zero_bucket_bytes(trainable: int, *, stage: int, param_bytes: int) -> float:
    """ZeRO-1/2's contiguous gradient bucket: min(reduce_bucket_size, trainable) elements, fp32 at
    stage 1 (its accumulator) and the parameters' dtype at stage 2."""
    if stage not in (1, 2):
        return 0.0
    return min(DS_BUCKET_ELEMENTS, trainable) * (4 if stage == 1 else param_bytes)


def layer_activation_bytes(a: Arch, *, batch: int, seq: int, act_bytes: int, adapter_rank: int,
                           attention_scores: bool) -> float:
    """Saved tensors of one Llama decoder layer for the backward pass, per micro-batch.

    Per token: the two RMSNorm inputs and outputs (4h), the attention output and its copy into
    o_proj (2h), q, k, v for attention (h + 2 kv), the MLP's gate and up outputs, SiLU(gate) and the
    product fed to down_proj (4 I), and each adapter's A x (one rank-wide vector per target).
    ``attention_scores``: the math attention kernel also keeps the softmax (heads x seq^2), which
    fused kernels (flash / memory-efficient SDPA on GPU) recompute instead.
    """
    per_token = 4 * a.hidden + 2 * a.hidden + a.hidden + 2 * a.kv_dim + 4 * a.intermediate + adapter_rank
    scores = a.heads * seq * seq * batch if attention_scores else 0
    return act_bytes * (batch * seq * per_token + scores)


def logits_bytes(a: Arch, *, batch: int, scored: int, act_bytes: int) -> float:
    """The LM head's logits in the model dtype, the loss's fp32 copy of them (none when the model
    is fp32: the copy is the same tensor) and its fp32 log-softmax.

    The training loss projects onto the vocabulary only the positions whose next token is an
    answer token (``loop.compute_loss``); ``scored`` is the most such positions a sample can have:
    every text position (an answer never starts inside <bos> or the image tokens)."""
    return batch * scored * a.vocab * (act_bytes + (0 if act_bytes == 4 else 4) + 4)


def activation_bytes(a: Arch, *, batch: int, seq: int, scored: int, act_bytes: int, adapter_rank: int,
                     checkpointing: bool, attention_scores: bool) -> float:
    """Training activations of one micro-batch: every layer's saved tensors, or with checkpointing
    each layer's input plus one layer recomputed at a time; the logits either way. The frozen
    vision tower and projector keep nothing (no parameter before them needs a gradient)."""
    layer = layer_activation_bytes(a, batch=batch, seq=seq, act_bytes=act_bytes, adapter_rank=adapter_rank,
                                   attention_scores=attention_scores)
    inputs = batch * seq * a.hidden * act_bytes
    body = a.layers * inputs + layer if checkpointing else a.layers * layer + inputs
    return body + logits_bytes(a, batch=batch, scored=min(seq, scored), act_bytes=act_bytes)


def kv_cache_bytes(a: Arch, *, batch: int, seq: int, new_tokens: int, act_bytes: int) -> float:
    """Keys and values of every layer for ``batch`` prompts of ``seq`` tokens plus the generated ones."""
    return 2 * a.layers * batch * (seq + new_tokens) * a.kv_dim * act_bytes


@dataclass
class MemoryEstimate:
    """Per-GPU bytes of each term; ``peak`` is the larger of the training and evaluation peaks."""

    terms: dict[str, float]
    arch: Arch
    params: dict[str, int]
    seq: int
    micro_batch: int

    @property
    def train_peak(self) -> float:
        t = self.terms
        act = t["activations_checkpointed"] if t["checkpointing"] else t["activations"]
        return (t["overhead"] + t["weights"] + t["stored_adapters"] + t["adapter_params"] + t["adapter_grads"]
                + t["optimizer_state"] + t["zero_bucket"] + act)

    @property
    def eval_peak(self) -> float:
        t = self.terms
        return t["overhead"] + t["weights"] + t["stored_adapters"] + t["adapter_params"] + t["kv_cache"]

    @property
    def peak(self) -> float:
        return max(self.train_peak, self.eval_peak)


def estimate_memory(cfg: StreamConfig, *, arch: Optional[Arch] = None, attention_scores: Optional[bool] = None,
                    overhead_gib: Optional[float] = None) -> MemoryEstimate:
    """Per-GPU memory of the config's run (see docs/sizing.md for each formula)."""
    a = arch or arch_of(cfg)
    t = cfg.train
    on_gpu = t.use_gpu
    weight_bytes = 2 if cfg.model.dtype == "bfloat16" else 4
    mixed = on_gpu and cfg.model.dtype == "bfloat16"  # DeepSpeed's bf16 mode is GPU-only (cram_ray/train/zero.py)
    attention_scores = (not on_gpu) if attention_scores is None else attention_scores
    overhead = (GPU_OVERHEAD_GIB if on_gpu else 0.0) if overhead_gib is None else overhead_gib
    world = t.max_workers if t.executor == "ray" else 1
    micro = t.batch_size // (world * t.grad_accum)
    seq = sequence_length(cfg, a)
    params = {"text": text_params(a), "vision": vision_params(a), "projector": projector_params(a)}
    adapters = adapter_sizes(cfg, a)
    stage = t.zero_stage if t.executor == "ray" else 0
    state = zero_state_bytes(adapters.trainable, stage=stage, world=world, param_bytes=weight_bytes, mixed=mixed)
    kwargs = dict(batch=micro, seq=seq, act_bytes=weight_bytes, adapter_rank=adapters.rank_per_target,
                  attention_scores=attention_scores, scored=cfg.data.max_text_len)
    terms: dict[str, float] = {
        "overhead": overhead * GIB,
        "weights": sum(params.values()) * weight_bytes,
        "stored_adapters": adapters.stored * weight_bytes,
        **state,
        "zero_bucket": zero_bucket_bytes(adapters.trainable, stage=stage, param_bytes=weight_bytes),
        "activations": activation_bytes(a, checkpointing=False, **kwargs),
        "activations_checkpointed": activation_bytes(a, checkpointing=True, **kwargs),
        "kv_cache": kv_cache_bytes(a, batch=t.eval_batch_size, seq=seq, new_tokens=cfg.data.max_answer_len,
                                   act_bytes=weight_bytes),
        "checkpointing": float(t.gradient_checkpointing),
    }
    return MemoryEstimate(terms, a, {**params, "adapter_trainable": adapters.trainable,
                                     "adapter_stored": adapters.stored}, seq, micro)


# -- the GPU -----------------------------------------------------------------------------------
def gpu_spec(gpu: float | str | None) -> Optional[tuple[str, float, Optional[float]]]:
    """``train.gpu`` -> (label, GiB, dense bf16 TFLOP/s or None); None when unset."""
    if gpu == "" or gpu is None:
        return None
    if isinstance(gpu, (int, float)):
        return f"{gpu:g} GB", float(gpu), None
    name = gpu.strip().lower()
    if name in GPUS:
        gib, tflops = GPUS[name]
        return name, gib, tflops
    try:
        return f"{float(name.removesuffix('gb')):g} GB", float(name.removesuffix("gb")), None
    except ValueError:
        raise ConfigError(f"train.gpu: expected one of {', '.join(GPUS)} or a number of GB, got {gpu!r}") from None


def step_seconds(cfg: StreamConfig, est: MemoryEstimate, tflops: float) -> float:
    """An estimate of one optimizer step: 2 FLOPs per weight per token forward, as much again
    backward for the input gradients (frozen weights get none), once more forward when
    checkpointing recomputes, and the frozen vision tower forward once per image; at :data:`MFU`."""
    t = cfg.train
    tokens = t.batch_size * est.seq
    passes = 3 if t.gradient_checkpointing else 2
    lm = est.params["text"] + est.params["projector"] + est.params["adapter_trainable"]
    flops = 2 * lm * tokens * passes + 2 * est.params["vision"] * t.batch_size * est.arch.image_tokens
    world = t.max_workers if t.executor == "ray" else 1
    return flops / (world * tflops * 1e12 * MFU)


# -- the plan ----------------------------------------------------------------------------------
def task_count(cfg: StreamConfig) -> Optional[int]:
    names = task_names(cfg)
    return None if names is None else len(names)


def task_names(cfg: StreamConfig) -> Optional[list[str]]:
    """The stream's tasks when cheaply known: the built-in list, or a manifest's task names."""
    if cfg.data.benchmark is None:
        return list(cfg.data.builtin.tasks)
    path = Path(cfg.data.benchmark)
    if not path.is_file():
        return None
    from cram_ray.data.manifest import _read_manifest

    return [str(t.get("name", f"task_{i}")) if isinstance(t, dict) else f"task_{i}"
            for i, t in enumerate(_read_manifest(path)["tasks"])]


def probe_storage(uri: str) -> Optional[str]:
    """None when the storage URI answers, else one line saying why not (a network call)."""
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(uri)
        fs.get_file_info(root)
    except Exception as err:  # any failure to reach it is the answer
        return f"storage: {uri} is not reachable from here ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    return None


def gib(x: float) -> str:
    return f"{x / GIB:.2f} GiB"


@dataclass
class Plan:
    lines: list[str]
    warnings: list[str] = field(default_factory=list)
    error: Optional[str] = None
    estimate: Optional[MemoryEstimate] = None

    def render(self) -> str:
        out = list(self.lines)
        out += [f"warning: {w}" for w in self.warnings]
        out.append("plan: " + ("DOES NOT FIT / INVALID" if self.error else "ok"))
        return "\n".join(out)


def make_plan(cfg: StreamConfig, *, runs: int = 1) -> Plan:
    """Everything ``--dry-run`` prints; ``error`` set when the run cannot work as configured."""
    t, m = cfg.train, cfg.model
    warnings = environment_problems(cfg)
    if is_uri(cfg.storage):
        problem = probe_storage(cfg.storage)
        if problem:
            warnings.append(problem)
    names = task_names(cfg)
    world = t.max_workers if t.executor == "ray" else 1
    lines = [f"plan: {runs} stream(s) of method {cfg.method.name}, executor {t.executor}"]
    lines.append("tasks: " + (f"{len(names)} ({', '.join(names)})" if names is not None
                              else "unknown until the manifest is found"))
    lines.append(f"stages per task: {' -> '.join(STAGES)}; {t.steps_per_task} optimizer steps per task")
    gpus = f"{world} GPU(s)" if t.use_gpu else "no GPU"
    lines.append(f"workers: {world} x {t.cpus_per_worker:g} CPU, {gpus}"
                 + (f"; ZeRO stage {t.zero_stage}" if t.executor == "ray" and t.zero_stage >= 0
                    else "; plain data parallel" if t.executor == "ray" else "; in-process, no DeepSpeed"))
    micro = t.batch_size // (world * t.grad_accum)
    lines.append(f"batch: global {t.batch_size} = {world} worker(s) x {t.grad_accum} accumulation x micro-batch {micro}; "
                 f"gradient checkpointing {'on' if t.gradient_checkpointing else 'off'}; eval batch {t.eval_batch_size}")
    if t.use_gpu and not embedded_driver(t):
        lines.append(f"GPUs: the cluster must offer {world} GPU(s); checked when the run attaches")
    error = None
    if m.kind == "hf_llava" and m.init == "pretrained" and not Path(str(m.path), "config.json").is_file():
        lines.append(f"model: {m.path} not on this machine; sizes from the config's model section")
    else:
        from cram_ray.models.vlm import check_target_modules

        try:
            check_target_modules(cfg)
        except ConfigError as err:
            error = str(err)
    est = estimate_memory(cfg)
    a, p = est.arch, est.params
    lines.append(f"model: {sum(p[k] for k in ('text', 'vision', 'projector')) / 1e9:.3f} B parameters "
                 f"(text {p['text'] / 1e9:.3f} B, vision {p['vision'] / 1e6:.1f} M, projector {p['projector'] / 1e6:.1f} M; "
                 f"sizes from {a.source}), {m.dtype}; sequence {est.seq} tokens ({a.image_tokens} image)")
    lines.append(f"adapters: {p['adapter_trainable'] / 1e6:.2f} M trainable, {p['adapter_stored'] / 1e6:.2f} M stored "
                 f"at the last task{'' if names is not None else ' (task count unknown: 1 assumed)'} "
                 f"({len(cfg.method.target_modules)} target(s): {', '.join(cfg.method.target_modules)})")
    tm = est.terms
    act_on = "activations_checkpointed" if t.gradient_checkpointing else "activations"
    lines.append(f"memory per {'GPU' if t.use_gpu else 'worker process'} (estimate, docs/sizing.md):")
    rows = [("runtime overhead", tm["overhead"]), (f"weights ({m.dtype})", tm["weights"]),
            ("stored adapters", tm["stored_adapters"]), ("adapter params", tm["adapter_params"]),
            ("adapter grads", tm["adapter_grads"]), ("optimizer state", tm["optimizer_state"]),
            ("ZeRO gradient bucket", tm["zero_bucket"]),
            (f"activations, micro-batch {micro}, no checkpointing" + (" <" if act_on == "activations" else ""), tm["activations"]),
            ("activations, with checkpointing" + (" <" if act_on != "activations" else ""), tm["activations_checkpointed"]),
            (f"KV cache, eval batch {t.eval_batch_size}", tm["kv_cache"])]
    lines += [f"  {name:<48} {gib(value):>12}" for name, value in rows]
    lines.append(f"  {'training peak':<48} {gib(est.train_peak):>12}")
    lines.append(f"  {'evaluation peak':<48} {gib(est.eval_peak):>12}")
    spec = gpu_spec(t.gpu)
    if spec is None:
        lines.append(f"  {'per-GPU peak':<48} {gib(est.peak):>12}  (train.gpu not set: not compared)")
        if t.use_gpu:
            warnings.append("train.gpu: not set, so the estimate is not compared with a GPU's memory")
    else:
        label, capacity, tflops = spec
        fits = est.peak <= capacity * GIB
        lines.append(f"  {'per-GPU peak':<48} {gib(est.peak):>12}  of {capacity:g} GiB ({label}): "
                     + ("fits" if fits else "DOES NOT FIT"))
        if not fits and error is None:
            error = (f"train.gpu={label}: the per-GPU estimate {gib(est.peak)} exceeds {capacity:g} GiB; lower "
                     f"train.batch_size or raise train.grad_accum, set train.gradient_checkpointing=true, "
                     f"lower train.eval_batch_size, or choose a larger GPU (see --dry-run's terms)")
        if tflops:
            seconds = step_seconds(cfg, est, tflops) * t.steps_per_task
            lines.append(f"time per task (estimate at {MFU:.0%} of {tflops:g} TFLOP/s bf16, training only): "
                         f"{seconds / 60:.1f} min for {t.steps_per_task} steps")
    return Plan(lines, warnings, error, est)

