"""Frozen routing features: image features from the vision tower, text features from MiniLM."""
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from cram_ray.models.features import ImageRoutingEncoder, TextRoutingEncoder, add_routing_features
from cram_ray.models.vlm import VLM, build_tiny_llava, compact_processor, freeze
from models_testdata import scene_records


@pytest.fixture(scope="module")
def vlm(tiny_cfg, tok):
    torch.manual_seed(0)
    model = freeze(build_tiny_llava(tiny_cfg.model, tok))
    return VLM(model, compact_processor(tiny_cfg.model, tiny_cfg.data, tok), tiny_cfg.model)


@pytest.fixture(scope="module")
def text_enc():
    os.environ["HF_HUB_OFFLINE"] = "1"
    return TextRoutingEncoder("minilm")


def noise_png(seed: int, size: int = 32) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("layers", ["last", "all"])
def test_image_features_have_the_documented_dim(vlm, tiny_cfg, layers):
    enc = ImageRoutingEncoder(vlm, layers=layers)
    n_states = tiny_cfg.model.vision_layers + 1 if layers == "all" else 1
    assert enc.dim == 3 * tiny_cfg.model.vision_hidden * n_states
    px = vlm.processor.pixel_values([noise_png(0), noise_png(1), noise_png(0), None])
    feats = enc(px)
    assert feats.shape == (4, enc.dim) and feats.dtype == torch.float32 and not feats.requires_grad
    assert torch.equal(feats[0], feats[2])
    assert (feats[0] - feats[1]).norm() > 1e-3 * feats[0].norm()
    assert (feats[0] - feats[3]).norm() > 1e-3 * feats[0].norm()


def test_image_features_pool_mean_std_max_of_patches(vlm, tiny_cfg):
    enc = ImageRoutingEncoder(vlm, layers="last")
    px = vlm.processor.pixel_values([noise_png(5)])
    with torch.no_grad():
        last = vlm.model.model.vision_tower(px, output_hidden_states=True).hidden_states[-1][:, 1:]  # drop CLS
    h = tiny_cfg.model.vision_hidden
    feats = enc(px)
    assert torch.allclose(feats[:, :h], last.mean(1), atol=1e-6)
    assert torch.allclose(feats[:, 2 * h:], last.amax(1), atol=1e-6)


def test_image_features_separate_kinds_of_scene(vlm, tiny_cfg):
    """Even a random tower maps two visually different scene kinds to distinct centroids."""
    enc = ImageRoutingEncoder(vlm, layers="all")
    recs = scene_records(80, tiny_cfg.model.image_size, seed=0)
    shapes = [r for r in recs if r.answer in ("circle", "square", "triangle", "red", "green", "blue", "yellow")]
    texts = [r for r in recs if r.instruction == "What is written?"]
    fa = enc(vlm.processor.pixel_values([r.image for r in shapes]))
    fb = enc(vlm.processor.pixel_values([r.image for r in texts]))
    between = (fa.mean(0) - fb.mean(0)).norm()
    assert between > 0.1 * (fa - fa.mean(0)).norm(dim=1).mean()


def test_text_encoder_runs_offline_and_ranks_similarity(text_enc):
    assert text_enc.dim == 384
    emb = text_enc.encode(["What colour is the shape?", "Which colour does the object have?",
                           "Read the value of the bar for 2019 in the chart."])
    assert emb.shape == (3, 384)
    cos = torch.nn.functional.cosine_similarity
    assert cos(emb[0], emb[1], dim=0) > cos(emb[0], emb[2], dim=0) + 0.2
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-4)  # the model's own normalisation


def test_text_encoder_caches_and_truncates(text_enc):
    long = "word " * 500
    a = text_enc.encode(["same instruction", long, "same instruction"])
    assert torch.equal(a[0], a[2]) and "same instruction" in text_enc._cache
    b = text_enc.encode([long + "tail that is cut off"])
    assert torch.allclose(a[1], b[0], atol=1e-5)  # beyond 77 tokens nothing changes
    assert text_enc.encode([]).shape == (0, 384)


def test_add_routing_features(vlm, text_enc, tiny_cfg):
    img = ImageRoutingEncoder(vlm, layers="last")
    recs = scene_records(3, tiny_cfg.model.image_size, seed=1)
    batch = vlm.processor.prompt_batch(recs, [0, 0, 0])
    add_routing_features(batch, frozenset({"image", "text"}), img, text_enc)
    assert batch["img_feat"].shape == (3, img.dim) and batch["txt_feat"].shape == (3, 384)
    plain = vlm.processor.prompt_batch(recs, [0, 0, 0])
    add_routing_features(plain, frozenset(), img, text_enc)
    assert "img_feat" not in plain and "txt_feat" not in plain
    with pytest.raises(ValueError, match="subset"):
        add_routing_features(plain, frozenset({"audio"}), img, text_enc)
