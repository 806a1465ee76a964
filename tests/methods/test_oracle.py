"""Oracle: the true task id picks the expert at training and test time; old experts never move."""
import torch

from baselines_util import (
    assert_same_state, fresh, grads_only_on, logits_of, make_batch, make_cfg, model_inputs, roundtrip, run_task,
    snapshot,
)
from cram_ray.data.records import TaskInfo
from cram_ray.methods import make_method
from cram_ray.methods.oracle import Oracle



def test_registered_and_one_slot_of_lora_rank_per_task():
    cfg = make_cfg("oracle", rank=3)
    assert isinstance(make_method(cfg), Oracle)
    model, m = fresh(cfg)
    g = torch.Generator().manual_seed(0)
    run_task(model, m, 0, g)
    assert len(m.slots.layers) == 8  # q/k/v/o of two blocks
    assert m.params_added() == sum(3 * (l.in_features + l.out_features) for l in m.slots.layers.values())
    assert m.ranks()["rank_max"] == 3


def test_the_true_task_routes_training_and_inference():
    model, m = fresh(make_cfg("oracle"))
    g = torch.Generator().manual_seed(1)
    for t in range(3):
        run_task(model, m, t, g)
    batch = make_batch(0, g, size=5)
    batch["task_index"] = torch.tensor([2, 0, 1, 1, 0])
    m.route(batch, training=False)
    assert m.context.weights.tolist() == torch.nn.functional.one_hot(batch["task_index"], 3).float().tolist()
    assert m.routed_task().tolist() == [2, 0, 1, 1, 0]
    # each sample's output is the model with its own expert alone
    with torch.no_grad():
        mixed = model(**model_inputs(batch)).logits
        for t in range(3):
            alone = dict(batch, task_index=torch.full((5,), t))
            m.route(alone, training=False)
            out = model(**model_inputs(alone)).logits
            rows = batch["task_index"] == t
            torch.testing.assert_close(mixed[rows], out[rows], rtol=1e-5, atol=1e-6)


def test_old_experts_bit_identical_and_only_the_new_slot_trains():
    model, m = fresh(make_cfg("oracle"))
    g = torch.Generator().manual_seed(2)
    run_task(model, m, 0, g)
    old = snapshot(m.slots.params(0))
    base = {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." not in n}
    m.begin_task(TaskInfo(1, "t1", "exact"))
    m.begin_train()
    batch = make_batch(1, g)
    m.route(batch, training=True)
    model(**model_inputs(batch)).loss.backward()
    assert not grads_only_on(model, {id(p) for p in m.slots.params(1)})
    assert {id(p) for p in m.trainable_parameters()} == {id(p) for p in m.slots.params(1)}
    model.zero_grad(set_to_none=True)
    m.end_task()
    run_task(model, m, 2, g)
    for a, b in zip(old, m.slots.params(0)):
        assert torch.equal(a, b)
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n


def test_state_round_trips_exactly(tmp_path):
    cfg = make_cfg("oracle")
    model, m = fresh(cfg)
    g = torch.Generator().manual_seed(3)
    run_task(model, m, 0, g)
    run_task(model, m, 1, g)
    model2, m2 = roundtrip(m, cfg, tmp_path)
    assert_same_state(m, m2)
    batch = make_batch(1, g)
    assert torch.equal(logits_of(model, m, batch), logits_of(model2, m2, batch))
    assert m2.params_added() == m.params_added()
