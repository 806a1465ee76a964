"""MoELoRA: a per-token gate mixing the factors of E experts, all trainable and shared by the stream."""
import torch
from torch import nn

from baselines_util import (
    assert_same_state, fresh, logits_of, make_batch, make_cfg, model_inputs, roundtrip, run_task, snapshot,
)
from cram_ray.methods import make_method
from cram_ray.methods.layers import MoELoRALinear
from cram_ray.methods.moelora import MoELoRA



def test_gate_is_per_token_and_the_layer_matches_the_formula():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = MoELoRALinear(base, experts=3, rank=2, scale=2.0, generator=torch.Generator().manual_seed(0))
    x = torch.randn(1, 2, 6)  # one sample, two different tokens
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))  # B = 0: the base layer
        layer.B.normal_()
        y = layer(x)
    g = layer.last_gate  # (1, 2, 3)
    assert g.shape == (1, 2, 3)
    torch.testing.assert_close(g.sum(-1), torch.ones(1, 2))
    assert not torch.allclose(g[0, 0], g[0, 1])  # two tokens of one sample weigh the experts differently
    for t in range(2):
        gate = torch.softmax(layer.gate @ x[0, t], -1)
        B_mix = sum(gate[e] * layer.B[:, 2 * e:2 * e + 2] for e in range(3))  # (sum_e g_e B_e)
        A_mix = sum(gate[e] * layer.A[2 * e:2 * e + 2] for e in range(3))  # (sum_e g_e A_e)
        torch.testing.assert_close(y[0, t], base(x[0, t]) + 2.0 * B_mix @ (A_mix @ x[0, t]), rtol=1e-5, atol=1e-6)
        separate = sum(gate[e] * layer.B[:, 2 * e:2 * e + 2] @ (layer.A[2 * e:2 * e + 2] @ x[0, t]) for e in range(3))
        assert not torch.allclose(y[0, t], base(x[0, t]) + 2.0 * separate)  # the cross terms are there


def test_everything_trains_and_parameters_are_added_once():
    cfg = make_cfg("moelora", rank=2, experts=2)
    assert isinstance(make_method(cfg), MoELoRA)
    model, m = fresh(cfg)
    assert m.expert_rank == 2 and len(m.layers) == 8  # each expert has the method's LoRA rank
    g = torch.Generator().manual_seed(1)
    run_task(model, m, 0, g)
    # per layer: A (E r, 16) + B (16, E r) + gate (E, 16), E = 2, r = 2; eight layers
    assert m.params_added() == 8 * (4 * 16 + 16 * 4 + 2 * 16)
    before = snapshot(p for l in m.layers.values() for p in l.adapter_parameters())
    run_task(model, m, 1, g)
    assert m.params_added() == 0
    after = [p for l in m.layers.values() for p in l.adapter_parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(before, after))  # shared: the second task moved them all
    m.begin_train()
    batch = make_batch(1, g)
    m.route(batch, training=True)
    model(**model_inputs(batch)).loss.backward()
    trainable = {id(p) for p in m.trainable_parameters()}
    assert trainable == {id(p) for p in after}
    assert all((p.grad is not None) == (id(p) in trainable) for p in model.parameters())


def test_state_round_trips_exactly(tmp_path):
    cfg = make_cfg("moelora")
    model, m = fresh(cfg)
    g = torch.Generator().manual_seed(3)
    run_task(model, m, 0, g)
    model2, m2 = roundtrip(m, cfg, tmp_path)
    assert_same_state(m, m2)
    batch = make_batch(0, g)
    assert torch.equal(logits_of(model, m, batch), logits_of(model2, m2, batch))


def test_one_expert_per_task_at_the_lora_rank_by_default():
    m = make_method(make_cfg("moelora", rank=8))
    assert (m.experts, m.expert_rank) == (8, 8)  # the reference at 7B: 8 experts x rank 8 = total rank 64
    assert make_method(make_cfg("moelora", rank=8, expert_rank=2)).expert_rank == 2
