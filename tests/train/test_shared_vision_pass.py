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
