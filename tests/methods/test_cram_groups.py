"""Level-1 semantic groups: the join/open rule on constructed queries."""
import math

import pytest
import torch

from cram_ray.methods.cram.groups import GroupDecision, SemanticGroups, text_query

D = 8


def _e(i):
    v = torch.zeros(D)
    v[i] = 1.0
    return v


def _at(cos, base=0, other=7):
    """A unit vector with cosine ``cos`` to e_base (rest along e_other)."""
    return cos * _e(base) + math.sqrt(1 - cos * cos) * _e(other)


def _groups_with(*prototypes, join_sim=0.8, theta=0.1, max_groups=8):
    g = SemanticGroups(join_sim, theta, max_groups)
    for p in prototypes:
        g.commit(g.decide(p) if len(g) == 0 else GroupDecision(len(g), True), p, 1)
    return g


def test_first_task_opens_group_zero():
    g = SemanticGroups()
    d = g.decide(_e(0))
    assert (d.group, d.new) == (0, True)


def test_single_group_rule_uses_join_sim():
    g = _groups_with(_e(0))
    assert g.decide(_at(0.9)).new is False
    d = g.decide(_at(0.7))
    assert (d.group, d.new) == (1, True)
    assert d.similarities == pytest.approx([0.7], abs=1e-6)


def test_multi_group_rule_needs_margin_theta_and_join_sim():
    g = _groups_with(_e(0), _e(1))
    joins = g.decide(_at(0.9, base=0, other=2))  # s1 = 0.9, s2 = 0: margin and similarity
    assert (joins.group, joins.new) == (0, False)
    q = (0.85 * _e(0) + 0.8 * _e(1))  # s1 - s2 < theta
    assert g.decide(q / q.norm()).new
    far = _at(0.5, base=1, other=3)  # margin 0.5 > theta but s1 = 0.5 < join_sim: our extension opens
    d = g.decide(far)
    assert (d.group, d.new) == (2, True)
    loose = _groups_with(_e(0), _e(1), join_sim=0.3)
    assert loose.decide(far).group == 1 and not loose.decide(far).new


def test_max_groups_forces_a_join_with_the_most_similar():
    g = _groups_with(_e(0), _e(1), max_groups=2)
    d = g.decide(_at(0.3, base=1, other=4))
    assert (d.group, d.new, d.forced) == (1, False, True)


def test_prototypes_are_count_weighted_running_means():
    g = _groups_with(_e(0))
    g.commit(GroupDecision(0, False), 3 * _e(1), 3)  # three samples at e1
    torch.testing.assert_close(g.prototypes()[0], 0.25 * _e(0) + 0.75 * _e(1))
    with pytest.raises(ValueError):
        g.commit(GroupDecision(5, True), _e(2), 1)


def test_assign_is_argmax_cosine_and_state_round_trips():
    g = _groups_with(_e(0), _e(1), _e(2))
    q = torch.stack([_at(0.6, 2, 5), 3 * _e(1), _at(0.9, 0, 6)])
    assert g.assign(q).tolist() == [2, 1, 0]
    fresh = SemanticGroups()
    fresh.load_state(g.state())
    assert torch.equal(fresh.assign(q), g.assign(q))
    assert torch.equal(fresh.prototypes(), g.prototypes())


def test_text_query_is_layernorm_without_affine():
    x = torch.randn(4, 16) * 5 + 3
    q = text_query(x)
    torch.testing.assert_close(q.mean(-1), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(q.var(-1, unbiased=False), torch.ones(4), atol=1e-3, rtol=0)
