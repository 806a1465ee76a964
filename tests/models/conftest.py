"""Fixtures of the model tests: a tiny config, the scene record generator, a tokenizer."""
from __future__ import annotations

import pytest
import torch

from cram_ray.config import StreamConfig
from models_testdata import scene_records, scene_vocabulary


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is as fast and much faster on a shared, busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_cfg(tmp_path_factory) -> StreamConfig:
    """A very small model (32x32 images, 16 image tokens) with a private cache directory."""
    cache = tmp_path_factory.mktemp("models_cache")
    return StreamConfig().replace(**{
        "data.cache_dir": str(cache),
        "data.builtin.image_size": 32,
        "model.image_size": 32,
        "model.patch_size": 8,
        "model.vision_hidden": 32,
        "model.vision_layers": 2,
        "model.vision_heads": 2,
        "model.text_hidden": 64,
        "model.text_layers": 2,
        "model.text_heads": 2,
        "model.text_intermediate": 128,
        "model.max_positions": 128,
        "model.base.steps": 5,
        "model.base.batch_size": 8,
        "model.base.samples": 32,
        "model.base.vision_steps": 5,
        "model.base.vision_samples": 32,
        "model.base.text_samples": 8,
    })


@pytest.fixture(scope="session")
def tok():
    from cram_ray.models.tokenizer import CompactTokenizer

    return CompactTokenizer.build(scene_vocabulary())
