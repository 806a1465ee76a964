"""HiDe-LLaVA: the argmax anchor picks the last block's expert; lower blocks sum every expert."""
import pytest
import torch

from baselines_util import (
    assert_same_state, fresh, grads_only_on, logits_of, make_batch, make_cfg, mixed_batch, model_inputs,
    roundtrip, run_task, snapshot,
)
from cram_ray.data.records import TaskInfo
from cram_ray.methods import make_method
from cram_ray.methods.common import TaskAnchors
from cram_ray.methods.hide import HiDe



def _anchors(img, txt):
    a = TaskAnchors()
    for k, (i, t) in enumerate(zip(img, txt)):
        a.observe({"img_feat": i[None], "txt_feat": t[None]})
        a.commit(k)
    return a


def test_anchor_score_is_the_weighted_cosine_and_the_argmax_wins():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    anchors = _anchors(img, txt)
    # image says task 0 (cos 1 / 0 / .707), text leans to task 1 (cos .6 / .8 / 0)
    q = {"img_feat": torch.tensor([[2.0, 0.0]]), "txt_feat": torch.tensor([[3.0, 4.0, 0.0]]),
         "has_image": torch.tensor([True])}
    s = anchors.scores(q, 0.5)
    torch.testing.assert_close(s, torch.tensor([[0.8, 0.4, 0.5 * 2 ** -0.5]], dtype=torch.float64))
    assert s.argmax(-1).item() == 0
    q["has_image"] = torch.tensor([False])  # no image: the text term alone
    torch.testing.assert_close(anchors.scores(q, 0.5), torch.tensor([[0.6, 0.8, 0.0]], dtype=torch.float64))


def test_inference_picks_the_argmax_anchor_for_the_last_block_only():
    cfg = make_cfg("hide")
    assert isinstance(make_method(cfg), HiDe)
    model, m = fresh(cfg)
    assert sorted(m.contexts) == [0, 1] and m.last_block == 1
    g = torch.Generator().manual_seed(0)
    for t in range(3):
        run_task(model, m, t, g)
    truth = torch.tensor([2, 0, 1, 1, 0, 2])
    batch = mixed_batch(truth, g)
    m.route(batch, training=False)
    expected = m.anchors.scores(batch, 0.5).argmax(-1)
    assert torch.equal(m.routed_task(), expected) and torch.equal(expected, truth)
    assert m.contexts[1].weights.tolist() == torch.nn.functional.one_hot(truth, 3).float().tolist()
    assert m.contexts[0].weights.tolist() == [[1.0, 1.0, 1.0]] * 6  # the toolbox's fusion: a sum


def test_mean_fusion_merges_the_lower_blocks_uniformly():
    model, m = fresh(make_cfg("hide", fusion="mean"))
    g = torch.Generator().manual_seed(4)
    for t in range(2):
        run_task(model, m, t, g)
    m.route(make_batch(0, g, size=3), training=False)
    assert m.contexts[0].weights.tolist() == [[0.5] * 2] * 3
    assert m.contexts[1].weights.sum(1).tolist() == [1.0] * 3


def test_training_uses_the_new_expert_alone_in_every_block():
    model, m = fresh(make_cfg("hide"))
    g = torch.Generator().manual_seed(1)
    run_task(model, m, 0, g)
    m.begin_task(TaskInfo(1, "t1", "exact"))
    m.begin_train()
    batch = make_batch(1, g)
    m.route(batch, training=True)
    assert m.contexts[1].weights.tolist() == [[0.0, 1.0]] * 4
    assert m.contexts[0].weights.tolist() == [[0.0, 1.0]] * 4
    model(**model_inputs(batch)).loss.backward()
    assert not grads_only_on(model, {id(p) for p in m.slots.params(1)})
    with pytest.raises(ValueError, match="txt_feat"):
        m.end_task()  # no aggregate pass: the task has no anchor


def test_old_experts_bit_identical_after_a_new_task():
    model, m = fresh(make_cfg("hide"))
    g = torch.Generator().manual_seed(2)
    run_task(model, m, 0, g)
    old = snapshot(m.slots.params(0))
    run_task(model, m, 1, g, steps=4)
    for a, b in zip(old, m.slots.params(0)):
        assert torch.equal(a, b)


def test_state_round_trips_exactly(tmp_path):
    cfg = make_cfg("hide")
    model, m = fresh(cfg)
    g = torch.Generator().manual_seed(3)
    run_task(model, m, 0, g)
    run_task(model, m, 1, g)
    m.begin_task(TaskInfo(2, "t2", "exact"))
    m.observe(make_batch(2, g), "aggregate")  # a task in progress: its partial anchor sums travel too
    model2, m2 = roundtrip(m, cfg, tmp_path)
    assert_same_state(m, m2)
    batch = make_batch(1, g)
    assert torch.equal(logits_of(model, m, batch), logits_of(model2, m2, batch))
    assert torch.equal(m.routed_task(), m2.routed_task())
