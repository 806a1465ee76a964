"""ModalPrompt: prompt prepending (loss and cached generation), what trains, test-time choice, state."""
import pytest
import torch

from baselines_util import (
    D_IMG, D_TXT, assert_same_state, fresh, grads_only_on, logits_of, make_batch, make_cfg, mixed_batch,
    model_inputs, roundtrip, run_task, snapshot, train_steps,
)
from cram_ray.data.records import TaskInfo
from cram_ray.methods import make_method
from cram_ray.methods.modal_prompt import ModalPrompt, PromptPrefix, guide_scores

transformers = pytest.importorskip("transformers")
P = 3



def _cfg(**settings):
    return make_cfg("modalprompt", prompt_len=P, image_dim=D_IMG, text_dim=D_TXT, **settings)


def test_prefix_equals_the_prompt_in_front_of_the_embeddings_and_drops_its_positions():
    model, m = fresh(_cfg())
    assert isinstance(m, ModalPrompt) and isinstance(make_method(_cfg()), ModalPrompt)
    g = torch.Generator().manual_seed(0)
    batch = make_batch(0, g)
    prompts = torch.randn(4, P, 16, generator=g)
    with torch.no_grad():
        embeds = torch.cat([prompts, model.get_input_embeddings()(batch["input_ids"])], 1)
        mask = torch.cat([torch.ones(4, P, dtype=torch.long), batch["attention_mask"]], 1)
        direct = model(inputs_embeds=embeds, attention_mask=mask).logits[:, P:]
        m.prefix.prompts = prompts
        out = model(**model_inputs(batch))
    assert out.logits.shape == (4, 7, 48)
    torch.testing.assert_close(out.logits, direct)
    # the loss covers the caller's answer tokens only: the prompt positions carry no label
    ce = torch.nn.functional.cross_entropy(out.logits[:, -2], batch["labels"][:, -1])
    torch.testing.assert_close(out.loss, ce)
    m.prefix.prompts = None
    with torch.no_grad():
        assert not torch.allclose(model(**model_inputs(batch)).logits, out.logits)


def test_cached_greedy_generation_on_a_llava_equals_uncached():
    vc = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=16, patch_size=8)
    tc = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(
        transformers.LlavaConfig(vision_config=vc, text_config=tc, image_token_id=63)).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.full((2, 1), 1), torch.full((2, 4), 63), torch.randint(5, 40, (2, 3), generator=g)], 1)
    ids[0, :1] = 0
    mask = torch.ones_like(ids)
    mask[0, :1] = 0  # left padding
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    prefix = PromptPrefix(model.get_decoder())
    prefix.prompts = torch.randn(2, P, 32, generator=g)
    kw = dict(max_new_tokens=5, do_sample=False, num_beams=1, pad_token_id=0, suppress_tokens=[63])  # no image token
    cached = model.generate(**inputs, **kw)
    uncached = model.generate(**inputs, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    prefix.prompts = None
    assert not torch.equal(model.generate(**inputs, **kw)[:, ids.shape[1]:], cached[:, ids.shape[1]:])


def test_only_the_task_prompt_and_head_train_and_old_prompts_stay_bit_identical():
    model, m = fresh(_cfg())
    g = torch.Generator().manual_seed(2)
    run_task(model, m, 0, g)
    old = snapshot(list(m.prompts[0:1]) + list(m.heads[0].parameters()))
    m.begin_task(TaskInfo(1, "t1", "exact"))
    m.begin_train()
    own = {id(p) for p in [m.prompts[1], *m.heads[1].parameters()]}
    assert {id(p) for p in m.trainable_parameters()} == own
    batch = make_batch(1, g)
    m.route(batch, training=True)
    out = model(**model_inputs(batch))
    losses = m.extra_losses(batch, out)
    assert set(losses) == {"align_img", "align_txt"}
    (out.loss + sum(losses.values())).backward()
    assert not grads_only_on(model, own)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.trainable_parameters())
    model.zero_grad(set_to_none=True)
    train_steps(model, m, [make_batch(1, g) for _ in range(3)])
    m.end_task()
    for a, b in zip(old, list(m.prompts[0:1]) + list(m.heads[0].parameters())):
        assert torch.equal(a, b)
    assert make_cfg("modalprompt").method.modalprompt.prompt_len == 96


def test_reference_variant_drops_the_alignment_losses():
    model, m = fresh(_cfg(align_loss=False))
    m.begin_task(TaskInfo(0, "t0", "exact"))
    m.begin_train()
    batch = make_batch(0, torch.Generator().manual_seed(3))
    m.route(batch, training=True)
    assert m.extra_losses(batch, model(**model_inputs(batch))) == {}


def test_guide_score_formula_and_text_alone_without_an_image():
    proto_img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    proto_txt = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    txt = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])  # cos 1/sqrt(2) to both text prototypes
    s = guide_scores(img, txt, torch.tensor([True, False]), proto_img, proto_txt, 0.5)
    c = 0.5 / 2 ** 0.5
    torch.testing.assert_close(s, torch.tensor([[0.5 + c, c], [c, c]], dtype=torch.float64))


def test_the_top1_prompt_is_the_guide_scores_argmax():
    model, m = fresh(_cfg())
    g = torch.Generator().manual_seed(4)
    for t in range(3):
        run_task(model, m, t, g)
    truth = torch.tensor([2, 0, 1, 1, 0, 2])
    batch = mixed_batch(truth, g)
    batch["has_image"][1] = False
    m.route(batch, training=False)
    with torch.no_grad():
        protos = [m.prototype(k) for k in range(3)]
    expected = guide_scores(batch["img_feat"], batch["txt_feat"], batch["has_image"], torch.stack([p[0] for p in protos]),
                            torch.stack([p[1] for p in protos]), 0.5).argmax(-1)
    assert torch.equal(m.routed_task(), expected)
    for b, k in enumerate(expected.tolist()):
        assert torch.equal(m.prefix.prompts[b], m.prompts[k].detach())


def test_state_round_trips_exactly(tmp_path):
    cfg = _cfg()
    model, m = fresh(cfg)
    g = torch.Generator().manual_seed(5)
    for t in range(2):
        run_task(model, m, t, g)
    model2, m2 = roundtrip(m, cfg, tmp_path)
    assert_same_state(m, m2)
    batch = make_batch(1, g)
    assert torch.equal(logits_of(model, m, batch), logits_of(model2, m2, batch))
    assert torch.equal(m.routed_task(), m2.routed_task())
