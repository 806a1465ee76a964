"""Properties of the expert adapter layer and its injection / save / load."""
import json

import pytest
import torch
from torch import nn

from cram_ray.experts.adapter import (
    ExpertLinear,
    RoutingContext,
    block_index,
    contexts_of,
    export_slots,
    import_slots,
    inject_experts,
    load_slots,
    save_slots,
)


def _layer(d_in=6, d_out=5, buf_rank=3, seed=0):
    torch.manual_seed(seed)
    return ExpertLinear(nn.Linear(d_in, d_out), context=RoutingContext(), buf_rank=buf_rank)


class _Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))
        self.up_proj = nn.Linear(d, 2 * d)

    def forward(self, x):
        return x + self.o_proj(self.q_proj(x) * torch.sigmoid(self.k_proj(x)) + self.v_proj(x)) + self.up_proj(x)[..., : x.shape[-1]]


class _Toy(nn.Module):
    """Vision part and language part both with q_proj, so scoping matters."""

    def __init__(self, d=8, n=3):
        super().__init__()
        self.vision = nn.ModuleDict({"layers": nn.ModuleList([_Attn(d)])})
        self.language_model = nn.ModuleDict({"layers": nn.ModuleList([_Attn(d) for _ in range(n)])})

    def forward(self, x):
        for block in self.language_model["layers"]:
            x = block(x)
        return x


def test_disabled_or_unrouted_adapter_is_exactly_the_base():
    layer = _layer()
    layer.add_slot(0, torch.randn(2, 6), torch.randn(5, 2))
    layer.add_slot(1, torch.randn(4, 6), torch.randn(5, 4))
    x = torch.randn(3, 7, 6)
    base = layer.base_layer(x)
    assert torch.equal(layer(x), base)  # no weights set
    layer.context.weights = torch.zeros(3, 2)
    assert torch.equal(layer(x), base)  # all weights zero
    layer.context.weights = torch.rand(3, 2)
    layer.context.probe = True
    assert not torch.allclose(layer(x), base)
    layer.enabled = False
    assert torch.equal(layer(x), base)


def test_forward_matches_the_formula_with_per_sample_weights():
    layer = _layer()
    slots = {0: (torch.randn(2, 6), torch.randn(5, 2)), 1: (torch.randn(4, 6), torch.randn(5, 4))}
    for s, (A, B) in slots.items():
        layer.add_slot(s, A, B)
    with torch.no_grad():
        layer.buffer.B.normal_()
    x = torch.randn(3, 7, 6)
    pi = torch.tensor([[1.0, 0.0], [0.25, 0.75], [0.0, 1.0]])
    layer.context.weights = pi
    layer.context.probe = True
    expected = layer.base_layer(x)
    for s, (A, B) in slots.items():
        expected = expected + pi[:, s, None, None] * 2.0 * (x @ A.T @ B.T)
    expected = expected + 2.0 * (x @ layer.buffer.A.T @ layer.buffer.B.T)
    torch.testing.assert_close(layer(x), expected)


def test_slots_have_their_own_ranks_and_unrouted_slots_get_no_gradient():
    layer = _layer()
    layer.add_slot(0, rank=2)
    layer.add_slot(3, rank=5)
    assert layer.slot_ranks() == {0: 2, 3: 5}
    for p in layer.experts.parameters():
        p.requires_grad_(True)
    layer.context.weights = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    layer(torch.randn(1, 4, 6)).sum().backward()
    assert layer.slot(0).A.grad is None and layer.slot(0).B.grad is None
    assert layer.slot(3).B.grad is not None
    assert all(p.grad is None for p in layer.base_layer.parameters())
    with pytest.raises(ValueError):
        layer.add_slot(0, rank=1)


def test_routing_on_a_missing_slot_or_wrong_batch_raises():
    layer = _layer()
    layer.add_slot(0, rank=2)
    layer.context.weights = torch.tensor([[0.0, 1.0]])
    with pytest.raises(KeyError):
        layer(torch.randn(1, 2, 6))
    layer.context.weights = torch.ones(2, 1)
    with pytest.raises(ValueError):
        layer(torch.randn(3, 2, 6))


def test_capture_is_the_masked_mean_input():
    layer = _layer()
    x = torch.randn(2, 4, 6)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    layer.context.capture_mask = mask / mask.sum(1, keepdim=True).clamp_min(1)
    layer(x)
    torch.testing.assert_close(layer.captured[0], x[0, :2].mean(0))
    assert torch.equal(layer.captured[1], torch.zeros(6))


def test_reset_buffer_zeroes_its_update():
    layer = _layer()
    with torch.no_grad():
        layer.buffer.B.normal_()
    layer.reset_buffer()
    assert torch.equal(layer.buffer.B, torch.zeros_like(layer.buffer.B))
    assert layer.buffer.A.abs().sum() > 0


def test_inject_scopes_to_the_language_model_and_groups_blocks():
    model = _Toy()
    vision_q = model.vision["layers"][0].q_proj
    layers = inject_experts(model, ["q_proj", "k_proj", "v_proj", "o_proj"], buf_rank=2)
    assert len(layers) == 12
    assert all(n.startswith("language_model.") for n in layers)
    assert model.vision["layers"][0].q_proj is vision_q
    assert sorted({l.block for l in layers.values()}) == [0, 1, 2]
    assert len(contexts_of(layers)) == 1
    per_block = inject_experts(_Toy(), ["q_proj", "up_proj"], per_block_context=True)
    assert len(per_block) == 6 and len(contexts_of(per_block)) == 3
    everywhere = inject_experts(_Toy(), ["q_proj"], scope=None)
    assert len(everywhere) == 4
    with pytest.raises(ValueError):
        inject_experts(_Toy(), ["nope_proj"])


def test_injected_model_without_routing_equals_the_base_model():
    torch.manual_seed(0)
    model = _Toy()
    x = torch.randn(2, 5, 8)
    before = model(x)
    layers = inject_experts(model, buf_rank=2)
    for layer in layers.values():
        layer.add_slot(0, torch.randn(3, 8), torch.randn(8, 3))
    assert torch.equal(model(x), before)


def test_block_index():
    assert block_index("model.language_model.layers.12.self_attn.q_proj") == 12
    assert block_index("lm_head") == -1


def test_slots_round_trip_through_safetensors_and_json(tmp_path):
    torch.manual_seed(1)
    model = _Toy()
    layers = inject_experts(model)
    for i, layer in enumerate(layers.values()):
        layer.add_slot(0, rank=1 + i % 3)
        layer.add_slot(1, torch.randn(2 + i % 2, 8), torch.randn(8, 2 + i % 2))
    tensors, meta = export_slots(layers)
    assert json.loads(json.dumps(meta)) == meta
    save_slots(layers, str(tmp_path / "experts"))

    torch.manual_seed(1)
    fresh = _Toy()
    fresh_layers = inject_experts(fresh)
    load_slots(fresh_layers, str(tmp_path / "experts"))
    for name in layers:
        assert fresh_layers[name].slot_ranks() == layers[name].slot_ranks()
        for s in (0, 1):
            assert torch.equal(fresh_layers[name].slot(s).A, layers[name].slot(s).A)
            assert torch.equal(fresh_layers[name].slot(s).B, layers[name].slot(s).B)
    x = torch.randn(2, 5, 8)
    for ctx in contexts_of(layers) + contexts_of(fresh_layers):
        ctx.weights = torch.tensor([[0.3, 0.7], [1.0, 0.0]])
    assert torch.equal(fresh(x), model(x))

    only_one, meta_one = export_slots(layers, slots=[1])
    assert set(meta_one) == {"1"}
    other = inject_experts(_Toy())
    import_slots(other, only_one, meta_one)
    assert all(l.slot_ranks().keys() == {1} for l in other.values())
