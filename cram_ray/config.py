"""One typed configuration tree for a stream, its YAML presets and dotted overrides.

Every knob of a run lives in a dataclass below, with a one-line comment. YAML presets in
``workflows/configs/`` are loaded through :func:`load_config`; ``--set a.b=value`` overrides are
applied with the same type checks. Any unknown key or ill-typed value raises :class:`ConfigError`
with one line naming the dotted key and what is expected.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message is one actionable line."""


def _at_least(section: str, obj: Any, minimum: float, *keys: str) -> None:
    for key in keys:
        value = getattr(obj, key)
        if value < minimum:
            raise ConfigError(f"{section}.{key}: expected >= {minimum:g}, got {value}")


def _positive_rate(section: str, obj: Any, *keys: str) -> None:
    """Learning rates: finite and > 0 (nan and inf pass every comparison-free check downstream)."""
    for key in keys:
        value = getattr(obj, key)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{section}.{key}: expected a finite number > 0, got {value}")


def _divides(section: str, obj: Any, hidden: str, heads: str) -> None:
    if getattr(obj, hidden) % getattr(obj, heads):
        raise ConfigError(f"{section}.{hidden}: expected a multiple of {section}.{heads}={getattr(obj, heads)}, "
                          f"got {getattr(obj, hidden)}")


@dataclass
class BuiltinBenchmarkConfig:
    """The built-in offline benchmark (docs/DESIGN.md §5)."""

    tasks: list[str] = field(
        default_factory=lambda: [
            "choice", "ocr", "classify", "compose", "unanswerable", "ground", "count", "chart",
        ]
    )  # stream order; names from cram_ray.data.builtin.TASKS
    train_per_task: int = 600  # training records per task
    test_per_task: int = 100  # test records per task
    image_size: int = 64  # square images, pixels
    instructions: Literal["distinct", "coin", "shared"] = "distinct"  # how tasks' instructions overlap (see data/builtin.py)
    seed: int = 0  # generator seed: same seed -> same bytes

    def __post_init__(self) -> None:
        if self.train_per_task < 1 or self.test_per_task < 1:
            raise ConfigError("data.builtin.train_per_task / test_per_task: expected >= 1")
        if self.image_size < 16:
            raise ConfigError(f"data.builtin.image_size: expected >= 16, got {self.image_size}")


@dataclass
class DataConfig:
    """Where the stream's tasks come from."""

    benchmark: Optional[str] = None  # manifest YAML path; None = the built-in benchmark
    builtin: BuiltinBenchmarkConfig = field(default_factory=BuiltinBenchmarkConfig)
    cache_dir: str = "~/.cache/cram_ray"  # generated benchmark, shards, base models
    max_text_len: int = 64  # text tokens per sample (instruction + answer), image tokens excluded
    max_answer_len: int = 12  # generation budget in tokens at evaluation

    def __post_init__(self) -> None:
        _at_least("data", self, 1, "max_text_len", "max_answer_len")
        if not self.builtin.tasks:
            raise ConfigError("data.builtin.tasks: expected at least one task name")


@dataclass
class BaseTrainConfig:
    """Stage 0: pretraining the tiny VLM on a generic caption/QA mix (cached by config hash)."""

    steps: int = 3000  # optimizer steps; 0 = use the randomly initialised model as is
    batch_size: int = 32
    lr: float = 2e-3
    samples: int = 40000  # distinct caption/QA records of the VLM stage (6000 let it overfit)
    vision_steps: int = 6000  # stage 0a: the vision tower alone answers the mix's short questions first
    vision_samples: int = 60000  # the first N mix records train stage 0a (the VLM stage's are the first `samples`; 6000 overfit: 0.02 train loss, 35% held-out)
    vision_lr: float = 1e-3
    text_samples: int = 6000  # text-only "Repeat after me" records added to the VLM stage: every vocabulary token is written at least once, a quarter spell rare words in bytes
    seed: int = 0

    def __post_init__(self) -> None:
        _at_least("model.base", self, 0, "steps", "vision_steps", "text_samples")
        _at_least("model.base", self, 1, "batch_size", "samples", "vision_samples")
        _positive_rate("model.base", self, "lr", "vision_lr")


@dataclass
class ModelConfig:
    """The vision-language model."""

    kind: Literal["tiny", "hf_llava"] = "tiny"  # tiny = built from config; hf_llava = local checkpoint dir
    path: Optional[str] = None  # local HF Llava checkpoint directory (kind=hf_llava, init=pretrained)
    init: Literal["pretrained", "random"] = "pretrained"  # hf_llava: random = a Llava-1.5-style model built from the sizes below (no checkpoint; system checks)
    vision_tower: Literal["clip", "siglip"] = "clip"
    image_size: int = 64  # must match data.builtin.image_size for the tiny model
    patch_size: int = 16  # (image_size / patch_size)^2 image tokens
    vision_hidden: int = 128
    vision_layers: int = 3
    conv_stem: bool = True  # tiny model: stride-2 conv stages instead of one patchify conv (learns shape from little data)
    vision_heads: int = 4
    text_hidden: int = 256
    text_layers: int = 4
    text_heads: int = 4
    text_intermediate: int = 512
    max_positions: int = 256
    vocab_size: int = 0  # hf_llava init=random: embedding rows (0 = the tokenizer's vocabulary)
    dtype: Literal["float32", "bfloat16"] = "float32"
    base: BaseTrainConfig = field(default_factory=BaseTrainConfig)
    text_encoder: str = "minilm"  # routing text encoder: "minilm" (packaged) or a local path
    routing_image_layers: Literal["last", "all"] = "all"  # vision layers pooled into routing features

    def __post_init__(self) -> None:
        if self.kind == "hf_llava" and self.init == "pretrained" and not self.path:
            raise ConfigError("model.path: expected a local Llava checkpoint directory when model.kind=hf_llava")
        _at_least("model", self, 1, "image_size", "patch_size", "vision_hidden", "vision_layers", "vision_heads",
                  "text_hidden", "text_layers", "text_heads", "text_intermediate", "max_positions")
        _at_least("model", self, 0, "vocab_size")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"model.image_size: expected a multiple of model.patch_size={self.patch_size}, got {self.image_size}"
            )
        _divides("model", self, "text_hidden", "text_heads")
        _divides("model", self, "vision_hidden", "vision_heads")


@dataclass
class CramConfig:
    """CRAM hyperparameters (docs/DESIGN.md §3). Defaults are scaled for the tiny model; see README."""

    buf_rank: int = 16  # probe buffer rank (48 at 7B)
    rank_min: int = 2  # rank floor per layer (4 at 7B)
    rank_max: int = 8  # rank cap per layer (9-10 at 7B)
    tau_alloc: float = 0.08  # absolute spectral threshold on singular values
    tau_rel: float = 0.0  # relative threshold: keep S_j > tau_rel * S_0 (0 = off)
    tau_novel: float = 0.5  # novelty: share of a direction outside the group's span (0.99 at 7B widths)
    probe_ratio: float = 0.05  # share of the task's steps spent probing the buffer
    join_sim: float = 0.8  # single-group rule: join when cosine > join_sim
    theta: float = 0.1  # multi-group rule: join the top group when s1 - s2 > theta
    max_groups: int = 8
    router: Literal["rbf", "lda"] = "lda"  # level-2 distance: reference RBF or shared-covariance LDA
    sigma: float = 0.0  # RBF width; 0 = from the data: 0.5 * sqrt(mean within-task squared distance)
    shrinkage: float = -1.0  # LDA covariance shrinkage; < 0 = Ledoit-Wolf estimate
    top_k: int = 0  # experts kept per sample at level 2; 0 = all of the group
    lambda_dec: float = 1.0  # decoupling penalty weight
    train_centroid: bool = False  # also fine-tune the new expert's centroid row during its task

    def __post_init__(self) -> None:
        if not 1 <= self.rank_min <= self.rank_max:
            raise ConfigError(
                f"method.cram.rank_min/rank_max: expected 1 <= rank_min <= rank_max, got {self.rank_min}/{self.rank_max}"
            )
        if not 0.0 <= self.probe_ratio < 1.0:
            raise ConfigError(f"method.cram.probe_ratio: expected in [0, 1), got {self.probe_ratio}")
        if self.buf_rank < self.rank_min:
            raise ConfigError("method.cram.buf_rank: expected >= rank_min")


@dataclass
class MoELoRAConfig:
    """MoELoRA (CoIN's baseline): E LoRA experts mixed per token, everything trainable."""

    experts: int = 8  # E; the reference uses one expert per task of the stream (8 on CoIN and built-in)
    expert_rank: int = 0  # rank of each expert; 0 = the method's rank (method.rank; at 7B: 8 x rank 8 = 64)

    def __post_init__(self) -> None:
        if self.experts < 1 or self.expert_rank < 0:
            raise ConfigError(f"method.moelora: expected experts >= 1 and expert_rank >= 0, "
                              f"got {self.experts} / {self.expert_rank}")


@dataclass
class OLoRAConfig:
    """O-LoRA: one slot per task, orthogonality penalty against the old slots."""

    lam: float = 0.5  # weight of sum |A_t A_i^T| (A_i detached)
    train_sum: bool = False  # training forward: the task's slot alone (toolbox) or every slot summed (O-LoRA's own code)

    def __post_init__(self) -> None:
        if not self.lam >= 0:
            raise ConfigError(f"method.olora.lam: expected >= 0, got {self.lam}")


@dataclass
class HiDeConfig:
    """HiDe-LLaVA: anchor-routed top block, fused lower blocks."""

    image_weight: float = 0.5  # anchor score = w cos_img + (1 - w) cos_txt
    fusion: Literal["sum", "mean"] = "sum"  # lower blocks at test: sum at weight 1 (toolbox) or mean (paper)

    def __post_init__(self) -> None:
        if not 0.0 <= self.image_weight <= 1.0:
            raise ConfigError(f"method.hide.image_weight: expected in [0, 1], got {self.image_weight}")


@dataclass
class SameConfig:
    """SAME: routed FFN experts with spectral-aware routing and curvature-aware scaling."""

    target_modules: list[str] = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])  # FFN, as the reference
    mu: float = 0.9  # curvature damping
    energy: float = 0.9  # cumulative energy kept by the spectral subspaces
    every: int = 20  # steps between sketches of the router inputs
    mask_threshold: float = 0.1  # adaptive activation score threshold
    start: int = 10  # first step of spectral-aware routing
    k: int = 64  # randomized range finder size
    windows: int = 3  # singular values averaged (each with the ones before it) before the spectral factor
    scale_min: float = 0.8  # clamp of the in-subspace router-gradient factor
    scale_max: float = 1.2  # the factor is normalised by its max, so it never exceeds 1 (as the reference)
    freeze_old: bool = False  # True: only the task's own expert trains (the reference trains every expert)
    ema: float = 0.95  # decay of the utility / importance averages
    prior_temperature: float = 28.0  # inference prior: softmax(temp * similarity)
    prior_image_weight: float = 0.2  # prior similarity = w cos_img + (1 - w) cos_txt
    top_k: int = 2  # inference: experts kept per sample

    def __post_init__(self) -> None:
        if self.k < 1 or self.windows < 1 or self.top_k < 1 or self.every < 1 or self.start < 0:
            raise ConfigError("method.same: expected k, windows, top_k, every >= 1 and start >= 0")
        for key in ("energy", "ema", "prior_image_weight"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"method.same.{key}: expected in [0, 1], got {getattr(self, key)}")
        if not self.mu > 0:
            raise ConfigError(f"method.same.mu: expected > 0, got {self.mu}")
        if not 0.0 < self.scale_min <= self.scale_max:
            raise ConfigError("method.same.scale_min/scale_max: expected 0 < scale_min <= scale_max")
        if not self.target_modules:
            raise ConfigError("method.same.target_modules: expected at least one module name")


@dataclass
class ModalPromptConfig:
    """ModalPrompt: a soft prompt and a prototype head per task, chosen at test time by image/text guidance."""

    prompt_len: int = 96  # soft-prompt tokens per task (the reference's prefix_len at 7B)
    image_weight: float = 0.5  # guide = w cos(img, proto) + (1 - w) cos(txt, proto) (the reference's lam)
    align_loss: bool = True  # add 1 - cos(feature, prototype) for image and text (the reference computes, then drops them)
    image_dim: int = 0  # width of the image routing features; 0 = read from the model's vision tower
    text_dim: int = 0  # width of the text routing features; 0 = read from model.text_encoder

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.image_dim < 0 or self.text_dim < 0:
            raise ConfigError("method.modalprompt: expected prompt_len >= 1 and image_dim, text_dim >= 0")
        if not 0.0 <= self.image_weight <= 1.0:
            raise ConfigError(f"method.modalprompt.image_weight: expected in [0, 1], got {self.image_weight}")


@dataclass
class MethodConfig:
    """Which continual-learning method, and where its adapters go."""

    name: str = "cram"  # cram | lora_ft | oracle | olora | moelora | hide | same | modalprompt
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    lora_rank: int = 8  # rank of a LoRA / one expert slot of the fixed-rank methods
    lora_ranks: dict[str, int] = field(default_factory=dict)  # method name -> its lora_rank, where it differs (7B reference ranks)
    cram: CramConfig = field(default_factory=CramConfig)
    moelora: MoELoRAConfig = field(default_factory=MoELoRAConfig)
    olora: OLoRAConfig = field(default_factory=OLoRAConfig)
    hide: HiDeConfig = field(default_factory=HiDeConfig)
    same: SameConfig = field(default_factory=SameConfig)
    modalprompt: ModalPromptConfig = field(default_factory=ModalPromptConfig)

    def __post_init__(self) -> None:
        _at_least("method", self, 1, "lora_rank")
        for name, rank in self.lora_ranks.items():
            if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
                raise ConfigError(f"method.lora_ranks.{name}: expected an integer >= 1, got {rank!r}")
        if not self.target_modules or not all(self.target_modules):
            raise ConfigError(f"method.target_modules: expected a non-empty list of linear names, got {self.target_modules}")

    @property
    def rank(self) -> int:
        """The LoRA / expert-slot rank of the method this config runs."""
        return self.lora_ranks.get(self.name, self.lora_rank)


@dataclass
class TrainConfig:
    """Optimisation and execution of every training stage."""

    steps_per_task: int = 200  # optimizer steps per task (probe steps included)
    batch_size: int = 16  # global batch of one optimizer step = num_workers x grad_accum x micro-batch
    grad_accum: int = 1  # micro-batches accumulated per optimizer step on each worker
    gradient_checkpointing: bool = False  # recompute each layer's activations in the backward pass
    lr: float = 2e-3
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    eval_batch_size: int = 64
    # MB of host memory a task's probe and train may fill with the frozen vision pass's outputs of
    # images they have seen (each image's tower pass then runs once per task, not once per epoch); 0 = off
    feature_cache_mb: int = 256
    seed: int = 0
    executor: Literal["local", "ray"] = "local"  # local = one process; ray = stages as Ray tasks / Train runs
    num_workers: Union[int, list[int]] = 1  # Ray Train workers; [min, max] = elastic (resumes at any size in range)
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    gpu: Union[float, str, None] = None  # the GPU the plan sizes for: a name (a100-80gb, h100-80gb, a10g-24gb, l4-24gb, ...) or its GiB; null = none
    zero_stage: int = 0  # DeepSpeed ZeRO stage (0-3); -1 = plain torch DDP without DeepSpeed
    checkpoint_every: int = 50  # steps between Train checkpoints
    max_failures: int = 2  # Ray Train FailureConfig(max_failures)
    stage_retries: int = 2  # Ray task retries per CPU stage
    ray_address: Optional[str] = None  # None = RAY_ADDRESS if set, else an embedded loopback cluster
    # Ray Train input: "stream" = streaming_split over the workers + a seeded per-epoch shuffle of each
    # worker's rows (docs/performance.md); "exact" = the in-process executor's batches (tests)
    ingest: Literal["stream", "exact"] = "stream"
    shuffle_buffer: int = 512  # rows a Train worker shuffles at a time ("stream" ingest)
    # Ray: aggregate and evaluate inside the task's Train run, on its warm workers (and their GPUs);
    # false = each as Ray Data batch inference on its own actor pool (the path a resumed stage takes)
    fuse_eval: bool = True
    # Ray: "stream" = one Train run for the rest of the stream (its workers, their runtime and the Train
    # set-up are paid once; the driver follows the stages as the run commits them); "task" = one
    # Train run per task. "stream" needs fuse_eval and the stream ingest; otherwise runs are per task
    run_span: Literal["stream", "task"] = "stream"

    def __post_init__(self) -> None:
        if self.zero_stage not in (-1, 0, 1, 2, 3):
            raise ConfigError(f"train.zero_stage: expected -1 or 0-3, got {self.zero_stage}")
        _at_least("train", self, 1, "steps_per_task", "batch_size", "grad_accum", "eval_batch_size",
                  "checkpoint_every", "shuffle_buffer")
        _at_least("train", self, 0, "cpus_per_worker", "stage_retries", "weight_decay", "feature_cache_mb")
        _at_least("train", self, -1, "max_failures")
        _positive_rate("train", self, "lr")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ConfigError(f"train.warmup_ratio: expected in [0, 1], got {self.warmup_ratio}")
        span = [self.num_workers] if isinstance(self.num_workers, int) else list(self.num_workers)
        if len(span) not in (1, 2) or not all(isinstance(w, int) for w in span) or not 1 <= span[0] <= span[-1]:
            raise ConfigError(f"train.num_workers: expected an integer >= 1 or [min, max] with 1 <= min <= max, "
                              f"got {self.num_workers}")
        for workers in range(span[0], span[-1] + 1):  # an elastic run may restart at any size in range
            split = workers * self.grad_accum
            if self.batch_size % split:
                raise ConfigError(
                    f"train.batch_size: expected a multiple of train.num_workers x train.grad_accum = "
                    f"{workers} x {self.grad_accum} = {split} (each worker takes equal micro-batches), "
                    f"got {self.batch_size}"
                )
        if isinstance(self.gpu, float) and not (math.isfinite(self.gpu) and self.gpu > 0):
            raise ConfigError(f"train.gpu: expected a GPU name or its memory in GB > 0, got {self.gpu}")

    @property
    def micro_batch(self) -> int:
        """Samples one worker forwards at once (at the most workers the run may have)."""
        return self.batch_size // (self.max_workers * self.grad_accum)

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[-1]

    @property
    def workers(self) -> Union[int, tuple[int, int]]:
        """A fixed count, or ``(min, max)``: Ray's form of an elastic size (Train, actor pools)."""
        return self.max_workers if self.min_workers == self.max_workers else (self.min_workers, self.max_workers)


@dataclass
class TuneConfig:
    """A Ray Tune study (workflows/tune.py)."""

    num_samples: int = 4
    searcher: Literal["optuna", "random"] = "optuna"
    scheduler: Literal["asha", "none"] = "asha"
    metric: str = "maa"  # objective reported after each task
    mode: Literal["max", "min"] = "max"
    param_budget: int = 0  # hard cap on parameters added (0 = none)
    max_concurrent_trials: int = 1
    cpus_per_trial: float = 1.0  # CPUs the trial's driver function reserves (its Train workers ask for their own)
    search_space: dict[str, Any] = field(default_factory=dict)  # dotted key -> {type, values|low/high}; {} = CRAM defaults
    seed: int = 0  # searcher seed
    grace_tasks: int = 1  # ASHA: tasks every trial runs before it can be stopped
    reduction_factor: int = 2  # ASHA: keep 1 / reduction_factor of the trials at each rung

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.max_concurrent_trials < 1:
            raise ConfigError("tune.num_samples / max_concurrent_trials: expected >= 1")
        if self.grace_tasks < 1 or self.reduction_factor < 2:
            raise ConfigError("tune.grace_tasks / reduction_factor: expected >= 1 / >= 2")
        if self.param_budget < 0 or self.cpus_per_trial < 0:
            raise ConfigError("tune.param_budget / cpus_per_trial: expected >= 0")


@dataclass
class TrackingConfig:
    """MLflow tracking, from the driver only."""

    enabled: bool = True
    uri: Optional[str] = None  # None = sqlite file under the run's storage
    experiment: str = "cram_ray"


@dataclass
class StreamConfig:
    """Everything one continual stream needs."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: str = ""  # root of <storage>/<run_id>/task_<t>/<stage>/ (local path or URI); "" = the --out dir

    def __post_init__(self) -> None:
        if self.model.kind == "tiny" and self.data.benchmark is None:
            if self.model.image_size != self.data.builtin.image_size:
                raise ConfigError(
                    f"model.image_size: expected to equal data.builtin.image_size={self.data.builtin.image_size}, "
                    f"got {self.model.image_size}"
                )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, for MLflow params and hashing."""
        return flatten(self.to_dict())

    def replace(self, **overrides: Any) -> "StreamConfig":
        """A copy with dotted-key overrides applied (values already typed or YAML strings)."""
        raw = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(raw, key, value)
        return from_dict(raw)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and key != "search_space":
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_hash(tree: Any) -> str:
    """A short stable hash of any JSON-able tree (cache keys)."""
    blob = json.dumps(tree, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently convert) one value against a dataclass field type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"config key '{key}': expected one of {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key + ".")
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    if tp is Any:
        return value
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def _build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            raise ConfigError(f"unknown config key '{prefix}{key}' (valid keys here: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as err:
        raise ConfigError(f"config section '{prefix.rstrip('.') or 'root'}': {err}") from None


def from_dict(raw: dict[str, Any]) -> StreamConfig:
    """Build and validate a StreamConfig from a (possibly partial) nested dict."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(raw).__name__}")
    return _build(StreamConfig, raw)


def _parse_scalar(text: str) -> Any:
    """A --set value is read as YAML, so 2, true, null and [a, b] mean what they look like."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if not isinstance(child, dict):
            raise ConfigError(f"unknown config key '{'.'.join(parts[: i + 1])}' in override '{key}'")
        node = child
    if parts[-1] not in node:
        raise ConfigError(
            f"unknown config key '{key}' (valid keys here: {', '.join(sorted(node))})"
        )
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['train.lr=1e-4', ...] -> {'train.lr': 1e-4, ...}."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key.path=value")
        key, text = item.split("=", 1)
        out[key.strip()] = _parse_scalar(text.strip())
    return out


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> StreamConfig:
    """Load a YAML preset (or the defaults) and apply dotted overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p}: not found")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {p}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {p}: expected a mapping at the top level")
    base = from_dict(raw).to_dict()
    for key, value in parse_overrides(overrides or []).items():
        _set_dotted(base, key, value)
    return from_dict(base)


def is_uri(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def embedded_driver(train: TrainConfig) -> bool:
    """Whether this process's own devices are the run's devices: the in-process executor, or a Ray
    run with no address to attach to and no ``ray start`` cluster on this machine (an embedded one)."""
    if train.executor == "local":
        return True
    if train.ray_address or os.environ.get("RAY_ADDRESS"):
        return False
    return not Path(os.environ.get("RAY_TMPDIR", "/tmp"), "ray", "ray_current_cluster").exists()


def environment_problems(cfg: StreamConfig) -> list[str]:
    """What the config names outside itself that is missing here, one line each (empty = all found).

    The config's own constraints are checked when it is built; these depend on the machine it is
    loaded on: files it names, a writable storage root, GPUs. A real run fails on the first one; a
    dry run lists them as warnings. A remote storage URI is only probed by the plan (a network call).
    """
    problems = []
    if cfg.model.kind == "hf_llava" and cfg.model.init == "pretrained":
        if not Path(str(cfg.model.path), "config.json").is_file():
            problems.append(f"model.path: expected a local Llava checkpoint directory with config.json, "
                            f"{cfg.model.path} has none")
    if cfg.data.benchmark is not None and not Path(cfg.data.benchmark).is_file():
        problems.append(f"data.benchmark: manifest file {cfg.data.benchmark} not found")
    if cfg.storage and not is_uri(cfg.storage):
        root = Path(cfg.storage.removeprefix("file://")).expanduser()
        existing = next(p for p in (root, *root.parents) if p.exists())
        if not existing.is_dir():
            problems.append(f"storage: expected a directory (or one that can be created), {existing} is a file; "
                            f"choose another --out or move the file away")
        elif not os.access(existing, os.W_OK | os.X_OK):
            problems.append(f"storage: expected a writable directory (or one that can be created), "
                            f"{existing} is not writable")
    if cfg.train.use_gpu and embedded_driver(cfg.train):
        import torch

        have = torch.cuda.device_count()
        need = 1 if cfg.train.executor == "local" else cfg.train.num_workers
        if have < need:
            problems.append(f"train.use_gpu: expected {need} GPU(s) on this machine (the run has no cluster to "
                            f"attach to), found {have}; set train.use_gpu=false or attach to a GPU cluster")
    return problems


def dump_config(cfg: StreamConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
