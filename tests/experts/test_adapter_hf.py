"""Injection into real transformers models built from tiny configs (no weights downloaded)."""
import pytest
import torch

from cram_ray.experts.adapter import ATTENTION_TARGETS, FFN_TARGETS, contexts_of, inject_experts

transformers = pytest.importorskip("transformers")


def _tiny_llama():
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_llama_attention_and_ffn_targets_by_block():
    model = _tiny_llama()
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    layers = inject_experts(model, list(ATTENTION_TARGETS) + list(FFN_TARGETS), buf_rank=4, per_block_context=True)
    assert len(layers) == 2 * 7
    assert {l.block for l in layers.values()} == {0, 1}
    for layer in layers.values():
        layer.add_slot(0, rank=3)
        with torch.no_grad():
            layer.slot(0).B.normal_()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)  # nothing routed
        for ctx in contexts_of(layers):
            ctx.weights = torch.ones(2, 1)
        assert not torch.allclose(model(input_ids=ids).logits, before)
        for layer in layers.values():
            layer.enabled = False
        assert torch.equal(model(input_ids=ids).logits, before)


def test_llava_targets_only_the_language_model():
    vc = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=16, patch_size=8)
    tc = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=2, vocab_size=64)
    model = transformers.LlavaForConditionalGeneration(
        transformers.LlavaConfig(vision_config=vc, text_config=tc, image_token_id=63))
    layers = inject_experts(model)
    assert len(layers) == 8
    assert all(".language_model." in n for n in layers)
    assert {l.block for l in layers.values()} == {0, 1}
