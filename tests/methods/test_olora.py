"""O-LoRA: the orthogonality penalty on known matrices, its gradient, frozen old slots, summed inference."""
import torch

from baselines_util import (
    assert_same_state, fresh, grads_only_on, logits_of, make_batch, make_cfg, model_inputs, roundtrip, run_task,
    snapshot,
)
from cram_ray.data.records import TaskInfo
from cram_ray.methods import make_method
from cram_ray.methods.olora import OLoRA, orthogonality_penalty



def test_penalty_equals_the_hand_computed_sum():
    A_new = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]], requires_grad=True)
    A_1 = torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0]], requires_grad=True)
    A_2 = torch.tensor([[3.0, 1.0, 1.0]], requires_grad=True)
    # A_new A_1^T = [[1, -2], [0, -1]] -> 4;  A_new A_2^T = [[5], [0]] -> 5
    loss = orthogonality_penalty(A_new, [A_1, A_2])
    assert loss.item() == 9.0
    loss.backward()
    assert A_1.grad is None and A_2.grad is None  # A_i detached
    # d/dA_new sum|A_new A_i^T| = sign(A_new A_i^T) A_i
    expected = torch.sign(torch.tensor([[1.0, -2.0], [0.0, -1.0]])) @ A_1.detach() \
        + torch.sign(torch.tensor([[5.0], [0.0]])) @ A_2.detach()
    assert torch.equal(A_new.grad, expected)
    assert orthogonality_penalty(A_new, []).item() == 0.0


def test_method_loss_is_lambda_times_the_sum_over_layers_and_old_slots():
    cfg = make_cfg("olora", lam=0.25)
    assert isinstance(make_method(cfg), OLoRA)
    model, m = fresh(cfg)
    g = torch.Generator().manual_seed(0)
    run_task(model, m, 0, g)
    run_task(model, m, 1, g)
    m.begin_task(TaskInfo(2, "t2", "exact"))
    m.begin_train()
    batch = make_batch(2, g)
    m.route(batch, training=True)
    out = model(**model_inputs(batch))
    loss = m.extra_losses(batch, out)["orth"]
    hand = sum((l.slot(2).A @ l.slot(i).A.T).abs().sum() for l in m.slots.layers.values() for i in (0, 1))
    torch.testing.assert_close(loss, 0.25 * hand)
    (out.loss + loss).backward()
    assert not grads_only_on(model, {id(p) for p in m.slots.params(2)})


def test_no_penalty_on_the_first_task_and_inference_sums_every_slot():
    model, m = fresh(make_cfg("olora"))
    g = torch.Generator().manual_seed(1)
    m.begin_task(TaskInfo(0, "t0", "exact"))
    m.begin_train()
    assert m.extra_losses(make_batch(0, g), None) == {}
    m.end_task()
    run_task(model, m, 1, g)
    m.route(make_batch(0, g, size=3), training=False)
    assert m.context.weights.tolist() == [[1.0, 1.0]] * 3
    assert m.routed_task() is None


def test_training_forward_uses_the_task_slot_alone_or_every_slot_with_train_sum():
    for train_sum, expected in ((False, [[0.0, 1.0]] * 3), (True, [[1.0, 1.0]] * 3)):
        model, m = fresh(make_cfg("olora", train_sum=train_sum))
        g = torch.Generator().manual_seed(3)
        run_task(model, m, 0, g)
        m.begin_task(TaskInfo(1, "t1", "exact"))
        m.begin_train()
        m.route(make_batch(1, g, size=3), training=True)
        assert m.context.weights.tolist() == expected


def test_old_slots_bit_identical_after_a_new_task():
    model, m = fresh(make_cfg("olora"))
    g = torch.Generator().manual_seed(2)
    run_task(model, m, 0, g)
    old = snapshot(m.slots.params(0))
    run_task(model, m, 1, g, steps=4)
    for a, b in zip(old, m.slots.params(0)):
        assert torch.equal(a, b)
    assert any(not torch.equal(p, torch.zeros_like(p)) for p in m.slots.params(1))  # B_1 moved off zero


def test_state_round_trips_exactly(tmp_path):
    cfg = make_cfg("olora")
    model, m = fresh(cfg)
    g = torch.Generator().manual_seed(3)
    run_task(model, m, 0, g)
    run_task(model, m, 1, g)
    model2, m2 = roundtrip(m, cfg, tmp_path)
    assert_same_state(m, m2)
    batch = make_batch(0, g)
    assert torch.equal(logits_of(model, m, batch), logits_of(model2, m2, batch))
