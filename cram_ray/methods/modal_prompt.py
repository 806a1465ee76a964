"""ModalPrompt (Zeng et al., 2024): a soft prompt per task, chosen at test time by image and text guidance.

Per task t: a soft prompt ``P_t`` (``method.modalprompt.prompt_len`` x hidden, N(0, 0.02)) and a head
``h_t`` = Linear(hidden, hidden) - SiLU - Linear(hidden, D_img + D_txt) that maps the prompt into the
routing-feature spaces; the task's prototype is ``mean_j h_t(P_t[j])``, split into an image part and
a text part. Nothing else is trained: no LoRA, the base model frozen.

* training task t: ``P_t`` is prepended to every sample (the reference's ``transfer_num = 1``: no
  earlier prompt joins it); only ``P_t`` and ``h_t`` get gradient; with ``align_loss`` the loss adds
  ``1 - mean cos(img, proto_img)`` and ``1 - mean cos(txt, proto_txt)`` (the reference computes
  these terms and then discards them);
* test: per sample, ``guide_k = w cos(img, proto_img_k) + (1 - w) cos(txt, proto_txt_k)`` over the
  finished tasks (the text term alone for a sample without an image) and the top-1 task's prompt is
  prepended.

The prompt goes in front of the language model's input embeddings through hooks on the decoder
(:class:`PromptPrefix`), so the same code serves a transformers Llava (tiny or 7B) and a bare Llama,
for the loss and for cached greedy generation. No Ray here.
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any, Optional

import torch
from torch import nn

from cram_ray.config import StreamConfig
from cram_ray.data.records import TaskInfo
from cram_ray.methods.base import Batch, ContinualMethod
from cram_ray.methods.common import check_meta, cosine, freeze, task_from_json, task_to_json
from cram_ray.models.vlm import register_attached_hooks

STATE_VERSION = 1
PROMPT_STD = 0.02


class PromptPrefix:
    """Prepends per-sample soft prompts (B, P, H) to a decoder's input embeddings.

    A forward pre-hook on the decoder puts the prompt in front of ``inputs_embeds`` on the first
    forward of a sequence (empty cache), and on every forward extends the 2-D attention mask by P
    ones and shifts given position ids by P; a forward hook drops the prompt's P positions from
    the decoder's output, so logits (and the loss) cover exactly the caller's tokens and the prompt
    positions carry no label. Later decoding steps find the prompt in the cache.

    Args:
        decoder: the language model's decoder (``model.get_decoder()``), whose forward takes
            ``inputs_embeds``, ``attention_mask``, ``position_ids`` and ``cache`` as keywords.
    """

    def __init__(self, decoder: nn.Module) -> None:
        self.decoder = decoder
        self.prompts: Optional[torch.Tensor] = None  # (B, P, H); None: the decoder runs unchanged
        self._strip = 0
        self._handles = [decoder.register_forward_pre_hook(self._before, with_kwargs=True),
                         decoder.register_forward_hook(self._after, with_kwargs=True)]
        register_attached_hooks(decoder, *self._handles)  # removed with the adapters between stages

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self._strip = 0
        if self.prompts is None:
            return args, kwargs
        if args:
            kwargs["input_ids"], args = args[0], args[1:]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        first = cache is None or cache.get_seq_length() == 0
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = module.get_input_embeddings()(kwargs["input_ids"])
        b = embeds.shape[0]
        prompts = self.prompts.to(embeds.device, embeds.dtype)
        if prompts.shape[0] != b:
            raise ValueError(f"PromptPrefix: prompts for {prompts.shape[0]} samples, the input has {b}")
        n = prompts.shape[1]
        if first:
            embeds = torch.cat([prompts, embeds], dim=1)  # (B, P + T, H)
            self._strip = n
        kwargs["inputs_embeds"], kwargs["input_ids"] = embeds, None
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError(f"PromptPrefix: expected a 2-D attention mask, got shape {tuple(mask.shape)}")
            kwargs["attention_mask"] = torch.cat([mask.new_ones(b, n), mask], dim=1)
        pos = kwargs.get("position_ids")
        if pos is not None:
            pos = pos + n
            if first:
                head = torch.arange(n, device=pos.device, dtype=pos.dtype).expand(pos.shape[0], n)
                pos = torch.cat([head, pos], dim=1)
            kwargs["position_ids"] = pos
        return args, kwargs

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self._strip:
            output.last_hidden_state = output.last_hidden_state[:, self._strip:]
            self._strip = 0
        return output


def make_head(hidden: int, out: int, generator: torch.Generator) -> nn.Sequential:
    """Linear(hidden, hidden) - SiLU - Linear(hidden, out), drawn as nn.Linear's default
    (uniform within 1/sqrt(fan_in)) from ``generator``, so a rerun starts identically."""
    head = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, out))
    with torch.no_grad():
        for layer in (head[0], head[2]):
            bound = 1.0 / math.sqrt(layer.in_features)
            for p in (layer.weight, layer.bias):
                p.copy_(torch.rand(p.shape, generator=generator) * 2 * bound - bound)
    return head


def guide_scores(img: Optional[torch.Tensor], txt: torch.Tensor, has_image: Optional[torch.Tensor],
                 proto_img: torch.Tensor, proto_txt: torch.Tensor, image_weight: float) -> torch.Tensor:
    """(B, K) ``w cos(img, proto_img) + (1 - w) cos(txt, proto_txt)``; the text term alone for a sample
    without an image (as the reference, which then drops the image term)."""
    score = (1.0 - image_weight) * cosine(txt, proto_txt)
    if img is not None and image_weight > 0.0:
        with_image = torch.ones(score.shape[0], dtype=torch.float64) if has_image is None else has_image.to(torch.float64)
        score = score + image_weight * with_image[:, None] * cosine(img, proto_img)
    return score


class ModalPrompt(ContinualMethod):
    """A soft prompt and a prototype head per task; see the module docstring."""

    name = "modalprompt"
    needs_features = frozenset({"image", "text"})

    def __init__(self, cfg: StreamConfig) -> None:
        super().__init__(cfg)
        self.hp = cfg.method.modalprompt
        # a child module of the model, so moving the model moves the prompts and heads with it
        self.store = nn.Module()
        self.store.prompts = nn.ParameterList()  # task t -> (P, H)
        self.store.heads = nn.ModuleList()  # task t -> hidden -> D_img + D_txt
        self.prefix: Optional[PromptPrefix] = None
        self._embedding: Optional[nn.Module] = None
        self.hidden = 0
        self.image_dim = self.hp.image_dim
        self.text_dim = self.hp.text_dim
        self.finished = 0  # tasks whose prompt the test-time guide chooses from
        self.training = False
        self._routed: Optional[torch.Tensor] = None

    # -- lifecycle ---------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        freeze(model.parameters())
        self.hidden = model.get_input_embeddings().embedding_dim
        self._embedding = model.get_input_embeddings()
        model.add_module("modal_prompt", self.store)
        self.prefix = PromptPrefix(model.get_decoder())
        if not self.image_dim:
            from cram_ray.models.features import ImageRoutingEncoder

            if getattr(getattr(model, "model", None), "vision_tower", None) is None:
                raise ValueError("method.modalprompt.image_dim: the model has no vision tower to read it from; set it")
            self.image_dim = ImageRoutingEncoder(SimpleNamespace(model=model), self.cfg.model.routing_image_layers).dim
        if not self.text_dim:
            from cram_ray.models.features import TextRoutingEncoder

            self.text_dim = TextRoutingEncoder(self.cfg.model.text_encoder).dim

    @property
    def prompts(self) -> nn.ParameterList:
        return self.store.prompts

    @property
    def heads(self) -> nn.ModuleList:
        return self.store.heads

    def _new_slot(self, task: int) -> tuple[nn.Parameter, nn.Module]:
        gen = torch.Generator().manual_seed(1_000_003 * (self.cfg.train.seed + 1) + task)
        prompt = nn.Parameter(torch.randn(self.hp.prompt_len, self.hidden, generator=gen) * PROMPT_STD,
                              requires_grad=False)
        if self._embedding is None:
            raise RuntimeError("ModalPrompt: call attach before the first task")
        head = make_head(self.hidden, self.image_dim + self.text_dim, gen)
        freeze(head.parameters())
        device = self._embedding.weight.device
        return prompt.to(device), head.to(device)

    def begin_task(self, task: TaskInfo) -> None:
        if task.index > len(self.prompts):
            raise ValueError(f"modalprompt: task {task.index} cannot start after {len(self.prompts)} prompts")
        super().begin_task(task)
        self.training = False
        prompt, head = self._new_slot(task.index)
        if task.index < len(self.prompts):  # a restarted task starts afresh
            self.prompts[task.index], self.heads[task.index] = prompt, head
        else:
            self.prompts.append(prompt)
            self.heads.append(head)
        self.finished = task.index

    def begin_train(self) -> None:
        for p in self._own():
            p.requires_grad_(True)
        self.training = True

    def end_task(self) -> dict[str, Any]:
        freeze(self._own())
        self.training = False
        self.finished = self.task.index + 1
        return {"prompts": len(self.prompts), "prompt_len": self.hp.prompt_len}

    # -- per step ----------------------------------------------------------------------------
    def _own(self) -> list[nn.Parameter]:
        t = self.task.index
        return [self.prompts[t], *self.heads[t].parameters()]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self._own() if self.training else []

    def prototype(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(D_img,), (D_txt,) parts of ``mean_j h_task(P_task[j])`` (with grad if those train)."""
        proto = self.heads[task](self.prompts[task]).mean(0)
        return proto[: self.image_dim], proto[self.image_dim:]

    def route(self, batch: Batch, *, training: bool) -> None:
        b = batch["input_ids"].shape[0]
        if training:
            if not self.training:
                raise RuntimeError("ModalPrompt.route(training=True): call begin_train first")
            self._routed = None
            self.prefix.prompts = self.prompts[self.task.index].unsqueeze(0).expand(b, -1, -1)
            return
        if self.finished == 0:
            self._routed = torch.full((b,), -1, dtype=torch.long)
            self.prefix.prompts = None
            return
        with torch.no_grad():
            protos = [[part.cpu() for part in self.prototype(k)] for k in range(self.finished)]
            scores = guide_scores(batch.get("img_feat"), batch["txt_feat"], batch.get("has_image"),
                                  torch.stack([p[0] for p in protos]), torch.stack([p[1] for p in protos]),
                                  self.hp.image_weight)
            self._routed = scores.argmax(-1).long()
            self.prefix.prompts = torch.stack([self.prompts[k] for k in self._routed.tolist()]).detach()

    def extra_losses(self, batch: Batch, outputs: Any) -> dict[str, torch.Tensor]:
        if not (self.training and self.hp.align_loss):
            return {}
        proto_img, proto_txt = self.prototype(self.task.index)
        txt = batch["txt_feat"].to(proto_txt.device, proto_txt.dtype)
        losses = {"align_txt": 1.0 - torch.cosine_similarity(txt, proto_txt[None], dim=-1).mean()}
        img = batch.get("img_feat")
        if img is not None:
            has = batch.get("has_image")
            img = img if has is None else img[has.to(torch.bool)]
            if img.shape[0]:
                losses["align_img"] = 1.0 - torch.cosine_similarity(img.to(proto_img.device, proto_img.dtype), proto_img[None], dim=-1).mean()
        return losses

    # -- reporting ---------------------------------------------------------------------------
    def routed_task(self) -> Optional[torch.Tensor]:
        return self._routed

    def params_added(self) -> int:
        if self.task is None or self.task.index >= len(self.prompts):
            return 0
        return sum(p.numel() for p in self._own())

    def ranks(self) -> dict[str, Any]:
        return {"prompt_len": self.hp.prompt_len}

    # -- state -------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {}
        for t, (prompt, head) in enumerate(zip(self.prompts, self.heads)):
            tensors[f"prompt.{t}"] = prompt.detach().clone()
            for key, p in head.state_dict().items():
                tensors[f"head.{t}.{key}"] = p.detach().clone()
        meta = {"method": self.name, "version": STATE_VERSION, "tasks": len(self.prompts), "finished": self.finished,
                "dims": [self.hidden, self.image_dim, self.text_dim, self.hp.prompt_len], "task": task_to_json(self.task)}
        return {k: v.contiguous() for k, v in tensors.items()}, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        check_meta(meta, self.name, STATE_VERSION)
        dims = [self.hidden, self.image_dim, self.text_dim, self.hp.prompt_len]
        if list(meta["dims"]) != dims:
            raise ValueError(f"modalprompt state: hidden, image, text widths and prompt length {meta['dims']}, "
                             f"this model and config give {dims}")
        self.store.prompts, self.store.heads = nn.ParameterList(), nn.ModuleList()
        for t in range(int(meta["tasks"])):
            prompt, head = self._new_slot(t)
            with torch.no_grad():
                prompt.copy_(tensors[f"prompt.{t}"])
                head.load_state_dict({k: tensors[f"head.{t}.{k}"] for k in head.state_dict()})
            self.prompts.append(prompt)
            self.heads.append(head)
        freeze(self.prompts.parameters())
        freeze(self.heads.parameters())
        self.finished = int(meta["finished"])
        self.task = task_from_json(meta["task"])
        self.training = False
