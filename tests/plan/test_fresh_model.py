"""Stages share the process's base: adapters are removed, never copied; checkpointing keeps gradients."""
import pytest
import torch

from cram_ray.config import load_config
from cram_ray.methods import make_method
from cram_ray.models.vlm import load_hf_llava, set_gradient_checkpointing, strip_adapters
from cram_ray.pipeline.context import Runtime
from cram_ray.train.loop import compute_loss
from cram_ray.data.records import Record

TINY = ["model.kind=hf_llava", "model.init=random", "model.image_size=28", "model.patch_size=14",
        "model.vision_hidden=32", "model.vision_layers=1", "model.vision_heads=2", "model.text_hidden=64",
        "model.text_heads=4", "model.text_layers=2", "model.text_intermediate=128", "model.max_positions=512",
        "data.max_text_len=24", "method.lora_rank=4",
        "method.target_modules=[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]"]


@pytest.fixture(scope="module")
def vlm():
    return load_hf_llava(None, load_config(None, TINY))


def _batch(vlm):
    recs = [Record(str(i), "t", None, "what colour is the square", "red" if i % 2 else "blue", "exact") for i in range(4)]
    return vlm.processor.train_batch(recs, [0] * 4)


@pytest.mark.parametrize("method", ["lora_ft", "moelora", "olora", "cram", "same", "modalprompt", "hide"])
def test_fresh_model_removes_the_previous_stage_adapters_in_place(vlm, method):
    cfg = load_config(None, TINY + [f"method.name={method}"])
    before = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    hooks = lambda m: sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules())  # noqa: E731
    base_hooks = hooks(vlm.model)  # transformers' own
    rt = Runtime(vlm, None, None)
    for _ in range(2):
        model = rt.fresh_model(cfg.train)
        assert model is vlm.model  # no copy of the base
        make_method(cfg).attach(model)
    model = rt.fresh_model(cfg.train)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in model.parameters())
    assert hooks(model) == base_hooks  # no hook a stage's method attached is left


def test_routing_reads_the_trained_model_own_vision_tower(vlm):
    from cram_ray.models.features import ImageRoutingEncoder

    cfg = load_config(None, TINY)
    model = Runtime(vlm, None, None).fresh_model(cfg.train)
    assert ImageRoutingEncoder(vlm).tower is model.model.vision_tower  # moved with the model, never a CPU copy


def test_zero3_stages_get_a_private_copy(vlm):
    cfg = load_config(None, TINY + ["train.executor=ray", "train.zero_stage=3"])
    assert Runtime(vlm, None, None).fresh_model(cfg.train) is not vlm.model


def test_checkpointing_gives_the_same_loss_and_gradients(vlm):
    cfg = load_config(None, TINY + ["method.name=lora_ft"])
    model = strip_adapters(vlm.model)
    method = make_method(cfg)
    torch.manual_seed(0)
    method.attach(model)
    for p in method.trainable_parameters():  # B starts at zero: give it values so every gradient flows
        torch.nn.init.normal_(p, std=0.02)
    model.train()
    grads = []
    for on in (False, True):
        set_gradient_checkpointing(model, on)
        loss, _ = compute_loss(model, method, _batch(vlm))
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in method.trainable_parameters()]))
        for p in method.trainable_parameters():
            p.grad = None
    set_gradient_checkpointing(model, False)
    model.eval()
    strip_adapters(model)
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
