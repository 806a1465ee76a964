"""Continual-learning methods behind one interface (see base.py). No Ray imports here."""
from __future__ import annotations

import importlib

from cram_ray.config import ConfigError, StreamConfig
from cram_ray.methods.base import ContinualMethod

# name -> "module:Class"; imported lazily so a method's dependencies load only when used
REGISTRY = {
    "lora_ft": "cram_ray.methods.lora_ft:LoraFT",
    "cram": "cram_ray.methods.cram.method:Cram",
    "oracle": "cram_ray.methods.oracle:Oracle",
    "olora": "cram_ray.methods.olora:OLoRA",
    "moelora": "cram_ray.methods.moelora:MoELoRA",
    "hide": "cram_ray.methods.hide:HiDe",
    "same": "cram_ray.methods.same:Same",
    "modalprompt": "cram_ray.methods.modal_prompt:ModalPrompt",
}


def make_method(cfg: StreamConfig) -> ContinualMethod:
    target = REGISTRY.get(cfg.method.name)
    if target is None:
        raise ConfigError(f"method.name: expected one of {', '.join(sorted(REGISTRY))}, got {cfg.method.name!r}")
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)(cfg)
