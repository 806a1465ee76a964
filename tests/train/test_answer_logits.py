"""The training loss projects only the answer positions onto the vocabulary, and equals the model's own loss."""
import pytest
import torch

from cram_ray.config import load_config
from cram_ray.data.records import Record
from cram_ray.models.vlm import load_hf_llava
from cram_ray.models.vlm import answer_head, model_inputs
from cram_ray.train.loop import compute_loss

TINY = ["model.kind=hf_llava", "model.init=random", "model.image_size=28", "model.patch_size=14",
        "model.vision_hidden=32", "model.vision_layers=1", "model.vision_heads=2", "model.text_hidden=64",
        "model.text_heads=4", "model.text_layers=2", "model.text_intermediate=128", "model.max_positions=512",
        "data.max_text_len=24"]


class _Plain:
    """No routing, no extra loss: the model's forward as it is."""

    def route(self, batch, *, training):
        pass

    def extra_losses(self, batch, out):
        return {}


@pytest.mark.parametrize("answers", [["red", "blue", "dark green", "a"], ["yes", "no", "yes", "no"]])
def test_answer_only_logits_give_the_models_own_loss_and_gradient(answers):
    vlm = load_hf_llava(None, load_config(None, TINY))
    model = vlm.model
    assert answer_head(model) is not None
    recs = [Record(str(i), "t", None, "what colour is the square" + " please" * i, a, "exact")
            for i, a in enumerate(answers)]  # prompts of different lengths: answers at different positions
    batch = vlm.processor.train_batch(recs, [0] * len(recs))
    weight = model.get_output_embeddings().weight
    weight.requires_grad_(True)
    loss, logs = compute_loss(model, _Plain(), batch)
    (grad,) = torch.autograd.grad(loss, weight)
    full = model(**model_inputs(batch)).loss
    (full_grad,) = torch.autograd.grad(full, weight)
    torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, full_grad, rtol=1e-4, atol=1e-7)
    assert logs["ce"] == pytest.approx(float(full), rel=1e-5)
