"""The vision-language model: a transformers Llava, the batches it eats, and its persistence.

* :func:`build_tiny_llava` builds a small ``LlavaForConditionalGeneration`` from a
  :class:`~cram_ray.config.ModelConfig` alone (CLIP or SigLIP vision tower, Llama text model).
* :class:`VLMProcessor` turns :class:`~cram_ray.data.records.Record` lists into the batch dicts every
  method sees (cram_ray/methods/base.py): ``input_ids``, ``attention_mask``, ``labels``,
  ``pixel_values``, ``task_index``, ``has_image``, ``instruction``. It is assembled from a text codec
  (the compact tokenizer or a checkpoint's own tokenizer) and an image codec, so the tiny model and
  a local HF Llava checkpoint share one batch API.
* :class:`VLM` bundles model + processor + config, with greedy batched generation.
* :func:`save_vlm` / :func:`load_vlm` persist a tiny VLM as safetensors + JSON (never pickle);
  :func:`load_hf_llava` opens a local llava-1.5-hf style checkpoint directory.

Sequence layout (one sample)::

    [<bos>] prefix <image> x N  "\\n" instruction "\\nAnswer:"  " " answer <eos>
    |<------------------------- prompt ------------------------->|<- target ->|

``labels`` are -100 on the prompt and on padding, the token ids on the target.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipVisionConfig,
)

from cram_ray.config import BaseTrainConfig, DataConfig, ModelConfig, StreamConfig
from cram_ray.data.records import Record
from cram_ray.models.tokenizer import CompactTokenizer

IGNORE_INDEX = -100
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values")
IMAGE_FEATURES = "image_features"  # (B, image tokens, text width): the projector's output for the batch's pixels
SAVE_FORMAT = "cram_ray.vlm/1"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "vlm.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# -- the model ---------------------------------------------------------------------------------
def num_patches(cfg: ModelConfig) -> int:
    """Image tokens of the tiny model: one per patch (CLIP's CLS token is dropped)."""
    return (cfg.image_size // cfg.patch_size) ** 2


def llava_config(cfg: ModelConfig, text: TextCodec, vocab_size: int, *, llava15: bool = False) -> LlavaConfig:
    """The Llava architecture ``cfg``'s sizes describe, with ``text``'s special ids.

    ``llava15``: LLaVA-1.5's conventions (CLIP ViT's quick-GELU, features read from the
    second-to-last vision layer, Llama-2's 4096 positions and RMSNorm epsilon); otherwise the tiny
    model's (last vision layer: trained from scratch, it is the one to read).
    """
    vision_kwargs = dict(
        hidden_size=cfg.vision_hidden,
        intermediate_size=4 * cfg.vision_hidden,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_channels=3,
    )
    if llava15:
        vision_kwargs["hidden_act"] = "quick_gelu"
    if cfg.vision_tower == "clip":
        vision = CLIPVisionConfig(**vision_kwargs)
        strategy = "default"  # drop CLS: one image token per patch
    else:
        vision = SiglipVisionConfig(**vision_kwargs, vision_use_head=False)
        strategy = "full"  # SigLIP has no CLS token
    language = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_positions,
        rms_norm_eps=1e-5 if llava15 else 1e-6,
        pad_token_id=text.pad_id,
        bos_token_id=text.bos_id,
        eos_token_id=text.eos_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=language,
        image_token_index=text.image_token_id,
        image_seq_length=num_patches(cfg),
        vision_feature_select_strategy=strategy,
        vision_feature_layer=-2 if llava15 else -1,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    return config


def build_tiny_llava(cfg: ModelConfig, tok: CompactTokenizer) -> LlavaForConditionalGeneration:
    """A randomly initialised small Llava built from ``cfg`` only (a few million parameters).

    The projector is Llava's own two-layer GELU MLP from the last vision layer's patch tokens.
    """
    seq_needed = 1 + num_patches(cfg)
    if seq_needed >= cfg.max_positions:
        raise ValueError(
            f"model.max_positions: expected more than 1 + {num_patches(cfg)} image tokens + text, got {cfg.max_positions}"
        )
    model = normalise_projector_input(LlavaForConditionalGeneration(llava_config(cfg, tok, tok.vocab_size)))
    if cfg.conv_stem:
        model = use_conv_stem(model)
    return model.to(DTYPES[cfg.dtype])


STEM_SUFFIX = "embeddings.patch_embedding.stages.0.weight"  # a saved tower with a ConvStem has this key


class ConvStem(torch.nn.Module):
    """A patch embedding made of stride-2 3x3 convolutions (same output grid as the patchify conv).

    A vision transformer trained from scratch on a few thousand small images learns colour (a
    per-patch mean) but not shape, digits or words when its only local operator is one linear map
    per patch (measured on the tiny base: shape naming at chance after 1500 steps). A convolutional
    stem gives the tower locality from the start, the usual remedy for small-data ViTs.
    """

    def __init__(self, hidden: int, patch: int) -> None:
        super().__init__()
        if patch < 2 or patch & (patch - 1):
            raise ValueError(f"model.patch_size: a convolutional stem needs a power of two >= 2, got {patch}")
        n = patch.bit_length() - 1  # stride-2 stages
        widths = [min(hidden, 32 * 2 ** i) for i in range(n)]
        stages, cin = [], 3
        for w in widths:
            stages.append(torch.nn.Conv2d(cin, w, 3, stride=2, padding=1))
            cin = w
        self.stages = torch.nn.ModuleList(stages)
        self.norms = torch.nn.ModuleList(torch.nn.GroupNorm(1, w) for w in widths)
        self.out = torch.nn.Conv2d(cin, hidden, 1)

    @property
    def weight(self) -> torch.Tensor:  # CLIP reads the patch embedding's weight for the input dtype
        return self.out.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.stages, self.norms):
            x = torch.nn.functional.gelu(norm(conv(x)))
        return self.out(x)


def use_conv_stem(model: LlavaForConditionalGeneration) -> LlavaForConditionalGeneration:
    """Replace the vision tower's patchify convolution with a :class:`ConvStem` (tiny models only)."""
    tower = model.model.vision_tower
    embeddings = getattr(tower, "vision_model", tower).embeddings  # the embeddings sit at either depth by version
    old = embeddings.patch_embedding
    embeddings.patch_embedding = ConvStem(old.out_channels, old.kernel_size[0])
    return model


PROJECTOR_NORM_KEY = "model.multi_modal_projector.linear_1.0.weight"


def normalise_projector_input(model: LlavaForConditionalGeneration) -> LlavaForConditionalGeneration:
    """Put a LayerNorm in front of the projector (tiny models trained from scratch only).

    Llava reads the last vision layer *before* the tower's own final LayerNorm. Trained from
    scratch, that residual stream grows without bound (measured: projected image tokens with norm
    ~2000 against text embeddings of ~0.5), so the language model's per-token RMSNorm divides
    every gradient into the vision pathway by that norm and the model learns to ignore the image.
    Normalising the projector's input keeps both modalities on one scale.
    """
    projector = model.model.multi_modal_projector
    width = projector.linear_1.in_features
    projector.linear_1 = torch.nn.Sequential(torch.nn.LayerNorm(width), projector.linear_1)
    return model


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """All parameters frozen (requires_grad False), eval mode."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


# -- codecs ------------------------------------------------------------------------------------
class TextCodec(Protocol):
    """What the processor needs of a tokenizer (CompactTokenizer satisfies it as is)."""

    pad_id: int
    bos_id: Optional[int]
    eos_id: int
    image_token_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str: ...


class ImageCodec(Protocol):
    def pixel_values(self, images: Sequence[Optional[bytes]]) -> torch.Tensor: ...


def decode_image(data: Optional[bytes], size: int) -> Image.Image:
    """PNG/JPEG bytes -> RGB image; None -> a blank (black) image of ``size`` x ``size``."""
    if data is None:
        return Image.new("RGB", (size, size))
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


@dataclass
class ResizeNormalize:
    """Image codec of the tiny model: resize to ``size`` (bilinear), scale to [-1, 1]."""

    size: int
    mean: float = 0.5
    std: float = 0.5
    dtype: str = "float32"

    def pixel_values(self, images: Sequence[Optional[bytes]]) -> torch.Tensor:
        arrays = []
        for data in images:
            img = decode_image(data, self.size)
            if img.size != (self.size, self.size):
                img = img.resize((self.size, self.size), Image.BILINEAR)
            arrays.append(np.asarray(img, dtype=np.float32))
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0  # (B, 3, H, W)
        return ((x - self.mean) / self.std).to(DTYPES[self.dtype])


@dataclass(frozen=True)
class PromptFormat:
    """How one sample is spelled around the image tokens (see the module docstring)."""

    prefix: str = ""  # text between <bos> and the image tokens
    template: str = "\n{instruction}\nAnswer:"  # text after the image tokens
    answer: str = " {answer}"  # target text (followed by <eos>)

    def split_template(self) -> tuple[str, str]:
        head, tail = self.template.split("{instruction}")
        return head, tail


@dataclass(frozen=True)
class Encoded:
    prompt: list[int]  # <bos>, prefix, image tokens, instruction text
    target: list[int]  # answer tokens and <eos> (empty for a prompt batch)


class VLMProcessor:
    """Records -> batch dicts for training (right-padded) and generation (left-padded).

    Text budget: ``max_text_len`` counts every text token (prefix, instruction, answer, <eos>;
    image tokens and <bos> excluded). The instruction is cut first, always leaving room for
    ``min(max_answer_len + 1, max_text_len // 2)`` target tokens, so a sample's prompt is the same
    in training and at generation whatever its answer.
    """

    def __init__(
        self,
        *,
        text: TextCodec,
        images: ImageCodec,
        num_image_tokens: int,
        max_text_len: int,
        max_answer_len: int,
        prompt: PromptFormat = PromptFormat(),
    ) -> None:
        self.text = text
        self.images = images
        self.num_image_tokens = num_image_tokens
        self.max_text_len = max_text_len
        self.max_answer_len = max_answer_len
        self.prompt = prompt
        head, tail = prompt.split_template()
        self._prefix_ids = text.encode(prompt.prefix) if prompt.prefix else []
        self._tail_ids = text.encode(tail) if tail else []
        self._head = head
        self._reserve = min(max_answer_len + 1, max_text_len // 2)

    # -- token sequences -------------------------------------------------------------------
    def encode(self, rec: Record, with_answer: bool) -> Encoded:
        instruction = rec.instruction
        if "<image>" in instruction:  # LLaVA-style text marks the image; the layout places it
            instruction = instruction.replace("<image>", "").strip()
        head = self.text.encode(self._head + instruction)
        room = self.max_text_len - len(self._prefix_ids) - len(self._tail_ids) - self._reserve
        head = head[: max(0, room)]
        bos = [] if self.text.bos_id is None else [self.text.bos_id]
        prompt = bos + self._prefix_ids + [self.text.image_token_id] * self.num_image_tokens + head + self._tail_ids
        target: list[int] = []
        if with_answer:
            target = self.text.encode(self.prompt.answer.format(answer=rec.answer)) + [self.text.eos_id]
            used = len(self._prefix_ids) + len(head) + len(self._tail_ids)
            target = target[: max(1, self.max_text_len - used)]
        return Encoded(prompt, target)

    def pixel_values(self, images: Sequence[Optional[bytes]]) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels at the model's size; None -> a blank image."""
        return self.images.pixel_values(images)

    def _common(self, records: Sequence[Record], task_index: Sequence[int]) -> dict[str, Any]:
        if len(records) != len(task_index):
            raise ValueError(f"task_index: expected {len(records)} entries, got {len(task_index)}")
        return {
            "pixel_values": self.pixel_values([r.image for r in records]),
            "task_index": torch.tensor(list(task_index), dtype=torch.long),
            "has_image": torch.tensor([r.image is not None for r in records], dtype=torch.bool),
            "instruction": [r.instruction for r in records],
        }

    def train_batch(self, records: Sequence[Record], task_index: Sequence[int]) -> dict[str, Any]:
        """Teacher-forcing batch, right-padded; loss only on the answer tokens and <eos>."""
        encoded = [self.encode(r, with_answer=True) for r in records]
        length = max(len(e.prompt) + len(e.target) for e in encoded)
        ids = torch.full((len(records), length), self.text.pad_id, dtype=torch.long)
        mask = torch.zeros((len(records), length), dtype=torch.long)
        labels = torch.full((len(records), length), IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(encoded):
            seq = e.prompt + e.target
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
            labels[i, len(e.prompt): len(seq)] = torch.tensor(e.target)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, **self._common(records, task_index)}

    def prompt_batch(self, records: Sequence[Record], task_index: Sequence[int]) -> dict[str, Any]:
        """Prompts only, LEFT-padded so every sample's next token is generated at the last column."""
        encoded = [self.encode(r, with_answer=False) for r in records]
        length = max(len(e.prompt) for e in encoded)
        ids = torch.full((len(records), length), self.text.pad_id, dtype=torch.long)
        mask = torch.zeros((len(records), length), dtype=torch.long)
        for i, e in enumerate(encoded):
            ids[i, length - len(e.prompt):] = torch.tensor(e.prompt)
            mask[i, length - len(e.prompt):] = 1
        return {"input_ids": ids, "attention_mask": mask, **self._common(records, task_index)}

    def decode_answers(self, generated_ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        """Generated continuations (prompt excluded) -> answers: cut at <eos>, specials dropped, stripped."""
        out = []
        for row in generated_ids:
            row = [int(t) for t in row]
            if self.text.eos_id in row:
                row = row[: row.index(self.text.eos_id)]
            out.append(self.text.decode(row, skip_special=True).strip())
        return out

    # -- persistence (tiny model only) -----------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """JSON settings that rebuild this processor with :func:`compact_processor_from_settings`."""
        if not isinstance(self.text, CompactTokenizer) or not isinstance(self.images, ResizeNormalize):
            raise TypeError("only a processor of the compact tokenizer and ResizeNormalize images is saved as JSON")
        return {
            "tokenizer": self.text.to_json(),
            "images": dataclasses.asdict(self.images),
            "num_image_tokens": self.num_image_tokens,
            "max_text_len": self.max_text_len,
            "max_answer_len": self.max_answer_len,
            "prompt": dataclasses.asdict(self.prompt),
        }


def compact_processor(cfg: ModelConfig, data: DataConfig, tok: CompactTokenizer) -> VLMProcessor:
    """The processor of a tiny model built by :func:`build_tiny_llava`."""
    return VLMProcessor(
        text=tok,
        images=ResizeNormalize(cfg.image_size, dtype=cfg.dtype),
        num_image_tokens=num_patches(cfg),
        max_text_len=data.max_text_len,
        max_answer_len=data.max_answer_len,
    )


def compact_processor_from_settings(settings: dict[str, Any]) -> VLMProcessor:
    return VLMProcessor(
        text=CompactTokenizer.from_json(settings["tokenizer"]),
        images=ResizeNormalize(**settings["images"]),
        num_image_tokens=int(settings["num_image_tokens"]),
        max_text_len=int(settings["max_text_len"]),
        max_answer_len=int(settings["max_answer_len"]),
        prompt=PromptFormat(**settings["prompt"]),
    )


# -- the bundle --------------------------------------------------------------------------------
def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The part of a batch the VLM's forward takes. A batch that carries the projected image
    features (``IMAGE_FEATURES``, computed with its routing features in one pass of the vision
    tower) hands them to the forward as transformers' ``mm_encoder_outputs`` instead of the pixels."""
    inputs = {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}
    if IMAGE_FEATURES in batch:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        inputs.pop("pixel_values", None)
        inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=list(batch[IMAGE_FEATURES]))}
    return inputs


def answer_head(model: torch.nn.Module) -> Optional[tuple[torch.nn.Module, torch.nn.Module]]:
    """(base model, LM head) of a transformers causal LM whose base model returns the last hidden
    state (Llava: ``model.model`` and ``lm_head``); None for any other model."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "model", None)
    return (base, head) if isinstance(head, torch.nn.Module) and isinstance(base, torch.nn.Module) else None


def answer_loss(model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
    """Mean next-token cross-entropy over the labelled (answer) positions of ``inputs`` (a train
    batch's :func:`model_inputs`), equal to the model's own ``out.loss``, but the LM head projects
    onto the vocabulary only the hidden states whose next token is labelled: at every prompt and
    image position it would be a large part of a small model's step, and its logits the largest
    activation of a large one. The base model runs as the causal LM's own forward runs it (hooks
    and adapters included). Returns (loss, the base model's output, which has no logits); a model
    without an :func:`answer_head` computes its own loss, and its own output is returned."""
    parts = answer_head(model)
    if parts is None:
        out = model(**inputs)
        return out.loss, out
    base, head = parts
    inputs = dict(inputs)
    targets = inputs.pop("labels")[:, 1:]  # position t predicts token t + 1
    keep = targets != IGNORE_INDEX
    out = base(**inputs)
    logits = head(out.last_hidden_state[:, :-1][keep])  # (N, V)
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep]), out


@dataclass
class VLM:
    """A Llava, the processor that feeds it, and the config it was built from."""

    model: LlavaForConditionalGeneration
    processor: VLMProcessor
    cfg: ModelConfig
    meta: dict[str, Any] = field(default_factory=dict)  # provenance, e.g. the base cache directory

    def loss(self, batch: dict[str, Any]) -> Any:
        """The model's output (``.loss`` = mean CE over answer tokens) on a train batch."""
        return self.model(**model_inputs(batch))

    @torch.no_grad()
    def generate(self, batch: dict[str, Any], max_new_tokens: int) -> list[str]:
        """Greedy answers for a left-padded prompt batch (only its model inputs are read)."""
        device = next(self.model.parameters()).device
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "pixel_values")}
        text = self.processor.text
        was_training = self.model.training
        self.model.eval()
        out = self.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=text.eos_id,
            pad_token_id=text.pad_id,
        )
        self.model.train(was_training)
        return self.processor.decode_answers(out[:, inputs["input_ids"].shape[1]:])

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


# -- persistence -------------------------------------------------------------------------------
def save_vlm(vlm: VLM, directory: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` + ``vlm.json`` (Llava config, ModelConfig, processor) into ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in vlm.model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": SAVE_FORMAT})
    meta = {
        "format": SAVE_FORMAT,
        "model_config": dataclasses.asdict(vlm.cfg),
        "llava_config": vlm.model.config.to_dict(),
        "processor": vlm.processor.settings(),
        "meta": vlm.meta,
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
    return out


def model_config_from_dict(raw: dict[str, Any]) -> ModelConfig:
    return ModelConfig(**{**raw, "base": BaseTrainConfig(**raw["base"])})


def load_vlm(directory: str | os.PathLike) -> VLM:
    """Rebuild what :func:`save_vlm` wrote; the model comes back in eval mode."""
    src = Path(directory)
    meta_path = src / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: not found (expected a directory written by save_vlm)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != SAVE_FORMAT:
        raise ValueError(f"{meta_path}: expected format {SAVE_FORMAT!r}, got {meta.get('format')!r}")
    cfg = model_config_from_dict(meta["model_config"])
    config = LlavaConfig.from_dict(meta["llava_config"])
    config._attn_implementation = "sdpa"
    model = LlavaForConditionalGeneration(config)
    weights = load_file(str(src / WEIGHTS_FILE))
    if PROJECTOR_NORM_KEY in weights:
        model = normalise_projector_input(model)
    if any(k.startswith("model.vision_tower.") and k.endswith(STEM_SUFFIX) for k in weights):
        model = use_conv_stem(model)
    model = model.to(DTYPES[cfg.dtype])
    model.load_state_dict(weights, strict=True)
    model.eval()
    return VLM(model, compact_processor_from_settings(meta["processor"]), cfg, dict(meta.get("meta", {})))


# -- a local Hugging Face Llava checkpoint -------------------------------------------------------
class HFTokenizerCodec:
    """A checkpoint's own tokenizer behind the :class:`TextCodec` interface."""

    def __init__(self, tokenizer: Any, image_token_id: int) -> None:
        self.tokenizer = tokenizer
        self.image_token_id = int(image_token_id)
        self.eos_id = int(tokenizer.eos_token_id)
        self.bos_id = None if tokenizer.bos_token_id is None else int(tokenizer.bos_token_id)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special)


class HFImageCodec:
    """A checkpoint's own image processor behind the :class:`ImageCodec` interface."""

    BLANK_SIZE = 64  # missing images: a black square, resized by the image processor like any image

    def __init__(self, image_processor: Any, dtype: torch.dtype) -> None:
        self.image_processor = image_processor
        self.dtype = dtype

    def pixel_values(self, images: Sequence[Optional[bytes]]) -> torch.Tensor:
        pil = [decode_image(data, self.BLANK_SIZE) for data in images]
        out = self.image_processor(images=pil, return_tensors="pt")
        return out["pixel_values"].to(self.dtype)


HF_LLAVA_PROMPT = PromptFormat(prefix="USER:", template="\n{instruction} ASSISTANT:", answer=" {answer}")


def random_llava(cfg: ModelConfig, tok: CompactTokenizer, seed: int) -> tuple[LlavaForConditionalGeneration, CompactTokenizer, Any]:
    """A randomly initialised Llava-1.5-style model of ``cfg``'s sizes, with the compact tokenizer
    ``tok`` and a CLIP image processor at ``cfg.image_size`` (no file is read).

    For system checks at real widths on a machine without the checkpoint. Every process building it
    from the same config and seed gets the same weights (data-parallel ranks must agree).
    """
    import transformers
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    # the PIL implementation where transformers has one (its default needs torchvision)
    image_processor_cls = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)

    config = llava_config(cfg, tok, max(cfg.vocab_size, tok.vocab_size), llava15=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    size = cfg.image_size
    image_processor = image_processor_cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                         image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
    return model.to(DTYPES[cfg.dtype]), tok, image_processor


def load_hf_llava(path: Optional[str], cfg: StreamConfig) -> VLM:
    """A local llava-1.5-hf style checkpoint directory, with its own tokenizer and image processor;
    or, with ``model.init=random``, :func:`random_llava` of the config's sizes (``path`` unused).

    Only local files are read (``local_files_only=True``). The prompt follows Llava-1.5's
    ``USER: <image>\\n... ASSISTANT:`` layout.
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    dtype = DTYPES[cfg.model.dtype]
    if cfg.model.init == "random":
        from cram_ray.models.base import base_tokenizer  # the packaged vocabulary of the tiny bases

        model, text, image_processor = random_llava(cfg.model, base_tokenizer(), cfg.train.seed)
        source = "random init"
    else:
        if not Path(str(path), "config.json").is_file():
            raise FileNotFoundError(f"model.path={path}: expected a local Llava checkpoint directory with config.json")
        model = LlavaForConditionalGeneration.from_pretrained(path, local_files_only=True, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        text = HFTokenizerCodec(tokenizer, model.config.image_token_id)
        source = str(path)
    model.eval()
    images = HFImageCodec(image_processor, dtype)
    with torch.no_grad():  # count the image tokens the model really produces per image
        probe = images.pixel_values([None])
        feats = model.get_image_features(pixel_values=probe).pooler_output
    n_tokens = int(feats[0].shape[0])
    processor = VLMProcessor(
        text=text,
        images=images,
        num_image_tokens=n_tokens,
        max_text_len=cfg.data.max_text_len,
        max_answer_len=cfg.data.max_answer_len,
        prompt=HF_LLAVA_PROMPT,
    )
    return VLM(model, processor, cfg.model, {"source": source})


# -- what the pipeline does to the model ----------------------------------------------------------
def language_linear_names(cfg: StreamConfig) -> Optional[set[str]]:
    """Leaf names of the language model's linears (``q_proj``, ...), from the architecture built on
    the meta device (no weights allocated); None when a pretrained checkpoint is not on this machine."""
    if cfg.model.kind == "hf_llava" and cfg.model.init == "pretrained":
        if not Path(str(cfg.model.path), "config.json").is_file():
            return None
        config = LlavaConfig.from_pretrained(cfg.model.path, local_files_only=True)
    else:
        ids = CompactTokenizer([])  # special ids only: the names do not depend on the vocabulary
        config = llava_config(cfg.model, ids, ids.vocab_size, llava15=cfg.model.kind == "hf_llava")
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and "language_model" in name.split(".")}


def check_target_modules(cfg: StreamConfig) -> None:
    """Every ``method.target_modules`` name must pick at least one language-model linear; checked
    on the driver before any data is prepared or any model loaded."""
    from cram_ray.config import ConfigError

    names = language_linear_names(cfg)
    if names is None:
        return
    missing = [t for t in cfg.method.target_modules if t.rsplit(".", 1)[-1] not in names]
    if missing:
        raise ConfigError(f"method.target_modules: {', '.join(missing)} name(s) no linear of the language model "
                          f"(expected some of {', '.join(sorted(names))})")


ATTACHED_HOOKS = "_cram_attached_hooks"  # a module attribute: hook handles a method attached


def register_attached_hooks(module: torch.nn.Module, *handles: Any) -> None:
    """Record hooks a method attached to ``module`` for one stage: :func:`strip_adapters` removes
    them with the adapters, so a base reused by the next stage runs none of them."""
    module.__dict__.setdefault(ATTACHED_HOOKS, []).extend(handles)


def strip_adapters(model: torch.nn.Module) -> torch.nn.Module:
    """Put every adapter-wrapped linear back (each wrapper keeps its linear as ``base_layer``, as
    peft's LoRA layers, ExpertLinear and MoELoRALinear do), remove the hooks methods attached
    (:func:`register_attached_hooks`) and drop peft's bookkeeping; in place."""
    for module in model.modules():
        for handle in module.__dict__.pop(ATTACHED_HOOKS, []):
            handle.remove()
    wrapped = [(name, module) for name, module in model.named_modules()
               if not isinstance(module, torch.nn.Linear) and isinstance(getattr(module, "base_layer", None), torch.nn.Module)]
    outer = [(n, m) for n, m in wrapped if not any(n.startswith(o + ".") for o, _ in wrapped)]
    for name, module in outer:
        base = module.base_layer
        while not isinstance(base, torch.nn.Linear) and hasattr(base, "base_layer"):
            base = base.base_layer
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, base)
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


def set_gradient_checkpointing(model: LlavaForConditionalGeneration, enabled: bool) -> None:
    """Turn transformers' activation checkpointing on (non-reentrant: the frozen base's inputs need
    no gradient for the adapters inside a layer to get theirs) or off."""
    if enabled:  # activation_checkpointing_enable is the name transformers 5 gives gradient_checkpointing_enable
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif getattr(model, "is_activation_checkpointing", None) or (
            not hasattr(model, "is_activation_checkpointing") and model.is_gradient_checkpointing):
        getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
