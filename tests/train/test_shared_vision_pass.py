"""A training batch's routing pass of the vision tower also feeds the model's forward: the tower
runs once per step, and the loss and gradients are those of the model run on the pixels."""
import torch

from cram_ray.config import load_config
from cram_ray.data.records import Record
from cram_ray.models.features import ImageRoutingEncoder, add_routing_features
from cram_ray.models.vlm import IMAGE_FEATURES, load_hf_llava, model_inputs
from cram_ray.train.loop import compute_loss

from test_answer_logits import TINY, _Plain


def _image(seed: int) -> bytes:
    import io

    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(28, 28, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _grads(model, loss):
    params = list(model.model.language_model.parameters())[:4] + list(model.lm_head.parameters())
    for p in params:
        p.requires_grad_(True)
    return torch.autograd.grad(loss, params)


def test_one_tower_pass_gives_the_same_loss_and_gradients():
    vlm = load_hf_llava(None, load_config(None, TINY))
    model = vlm.model
    encoder = ImageRoutingEncoder(vlm, layers="all")
    assert encoder.shares_pass
    recs = [Record(str(i), "t", _image(i), "what shape is drawn" + " here" * i, a, "exact")
            for i, a in enumerate(["circle", "square", "a red triangle"])]
    calls = []
    model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))

    plain = vlm.processor.train_batch(recs, [0] * len(recs))
    add_routing_features(plain, frozenset({"image"}), encoder, None)
    assert IMAGE_FEATURES not in plain
    loss_plain, _ = compute_loss(model, _Plain(), plain)
    grads_plain = _grads(model, loss_plain)
    assert len(calls) == 2  # routing, then the model's own forward

    calls.clear()
    shared = vlm.processor.train_batch(recs, [0] * len(recs))
    add_routing_features(shared, frozenset({"image"}), encoder, None, for_model=True)
    assert "pixel_values" not in model_inputs(shared) and "mm_encoder_outputs" in model_inputs(shared)
    loss_shared, _ = compute_loss(model, _Plain(), shared)
    grads_shared = _grads(model, loss_shared)
    assert len(calls) == 1  # the routing pass only
    assert torch.equal(shared["img_feat"], plain["img_feat"])
    assert torch.equal(loss_shared, loss_plain)
    for a, b in zip(grads_shared, grads_plain):
        assert torch.equal(a, b)


def test_feature_cache_runs_the_tower_once_per_image_and_serves_its_own_outputs():
    from cram_ray.models.features import ImageFeatureCache

    vlm = load_hf_llava(None, load_config(None, TINY))
    encoder = ImageRoutingEncoder(vlm, layers="all")
    recs = [Record(str(i), "t", _image(i), "what shape is drawn", "circle", "exact") for i in range(5)]
    seen = []
    vlm.model.model.vision_tower.register_forward_hook(lambda m, args, out: seen.append(len(args[0])))

    def batch(idx):
        return vlm.processor.train_batch([recs[i] for i in idx], [0] * len(idx))

    cache = ImageFeatureCache(max_bytes=2 ** 20)
    first = add_routing_features(batch([0, 1, 2]), frozenset({"image"}), encoder, None, for_model=True, cache=cache)
    assert seen == [1, 1, 1] and (cache.hits, cache.misses, len(cache)) == (0, 3, 3)  # one image per pass
    # a later epoch's batch: two images seen before, one new and one repeated inside the batch
    again = add_routing_features(batch([2, 3, 0, 3]), frozenset({"image"}), encoder, None, for_model=True, cache=cache)
    assert seen == [1, 1, 1, 1]  # only image 3, once
    assert (cache.hits, cache.misses, len(cache)) == (2 + 1, 3 + 1, 4)  # 2, 0 and the second 3 are hits
    assert torch.equal(again["img_feat"][0], first["img_feat"][2])
    assert torch.equal(again[IMAGE_FEATURES][2], first[IMAGE_FEATURES][0])
    assert torch.equal(again["img_feat"][1], again["img_feat"][3])
    # every row is what the uncached shared pass computes for that image (up to the batch's rounding)
    plain = add_routing_features(batch([2, 3, 0, 3]), frozenset({"image"}), encoder, None, for_model=True)
    torch.testing.assert_close(again["img_feat"], plain["img_feat"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again[IMAGE_FEATURES], plain[IMAGE_FEATURES], rtol=1e-5, atol=1e-6)
    # an image's features do not depend on the batch that brought it first: a cache filled in
    # another order (a run restarted from a checkpoint starts with an empty one) serves the same bits
    other = ImageFeatureCache(max_bytes=2 ** 20)
    add_routing_features(batch([3, 0]), frozenset({"image"}), encoder, None, for_model=True, cache=other)
    replay = add_routing_features(batch([2, 3, 0, 3]), frozenset({"image"}), encoder, None, for_model=True,
                                  cache=other)
    assert torch.equal(replay["img_feat"], again["img_feat"])
    assert torch.equal(replay[IMAGE_FEATURES], again[IMAGE_FEATURES])
    # images that are not the same pixels never share an entry
    assert len(set(ImageFeatureCache.keys(batch([0, 1, 2, 3, 4])["pixel_values"]))) == 5


def test_feature_cache_stops_keeping_at_its_size_and_zero_turns_it_off():
    from cram_ray.models.features import ImageFeatureCache

    vlm = load_hf_llava(None, load_config(None, TINY))
    encoder = ImageRoutingEncoder(vlm, layers="all")
    recs = [Record(str(i), "t", _image(i), "what shape is drawn", "circle", "exact") for i in range(4)]
    b = vlm.processor.train_batch(recs, [0] * 4)
    routing, model_features = encoder.with_model_features(b["pixel_values"][:1])
    per_image = routing[0].numel() * 4 + model_features[0].numel() * 4

    small = ImageFeatureCache(max_bytes=2 * per_image + 1)
    add_routing_features(dict(b), frozenset({"image"}), encoder, None, for_model=True, cache=small)
    assert len(small) == 2 and small.bytes == 2 * per_image
    out = add_routing_features(dict(b), frozenset({"image"}), encoder, None, for_model=True, cache=small)
    assert (small.hits, small.misses) == (2, 6)  # the two kept images hit; the others are computed again
    assert out["img_feat"].shape[0] == 4

    calls = []
    vlm.model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    off = ImageFeatureCache(max_bytes=0)
    for _ in range(2):
        add_routing_features(dict(b), frozenset({"image"}), encoder, None, for_model=True, cache=off)
    assert len(calls) == 2 and len(off) == 0  # off: the tower runs every time, nothing kept
