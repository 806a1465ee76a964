"""Level-2 centroid routing: RBF and shared-covariance LDA, statistics, temperature, state."""
import math

import numpy as np
import pytest
import torch

from cram_ray.methods.cram.router import CentroidRouter, FeatureMoments, ledoit_wolf_shrinkage


def _samples(mean, n, cov_sqrt=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, len(mean), generator=g, dtype=torch.float64)
    if cov_sqrt is not None:
        z = z @ cov_sqrt.T
    return z + torch.as_tensor(mean, dtype=torch.float64)


def _fit(router, tasks):
    for slot, x in enumerate(tasks):
        m = FeatureMoments()
        for chunk in x.split(37):
            m.add(chunk)
        router.commit(slot, m)


def _centroids(router, n):
    return torch.stack([router.centroid(s) for s in range(n)])


def _accuracy(router, tasks):
    n = len(tasks)
    q = torch.cat(tasks)
    truth = torch.cat([torch.full((len(x),), s) for s, x in enumerate(tasks)])
    cand = torch.ones(len(q), n, dtype=torch.bool)
    _, choice = router.weights(q, _centroids(router, n), cand, torch.zeros(len(q), dtype=torch.long))
    return float((choice == truth).double().mean())


def test_moments_match_direct_computation_despite_a_large_offset():
    x = _samples([1e3] * 5, 200, seed=1) * torch.tensor([1.0, 2, 3, 4, 5], dtype=torch.float64)
    m = FeatureMoments()
    for chunk in x.split(23):
        m.add(chunk)
    dev = x - x.mean(0)
    torch.testing.assert_close(m.mean(), x.mean(0))
    torch.testing.assert_close(m.scatter(), dev.T @ dev)
    assert m.sum_sq_dev() == pytest.approx(float((dev ** 2).sum()), rel=1e-9)
    assert m.sum_fourth_dev() == pytest.approx(float(((dev ** 2).sum(1) ** 2).sum()), rel=1e-8)


def test_ledoit_wolf_matches_sklearn_on_within_task_centred_data():
    sk = pytest.importorskip("sklearn.covariance")
    a = _samples([0, 0, 0, 0, 0, 0], 40, torch.diag(torch.tensor([3.0, 1, 1, 0.5, 0.2, 0.1], dtype=torch.float64)), seed=2)
    b = _samples([4, 1, 0, 0, 0, 2], 25, torch.diag(torch.tensor([3.0, 1, 1, 0.5, 0.2, 0.1], dtype=torch.float64)), seed=3)
    router = CentroidRouter("lda")
    _fit(router, [a, b])
    centred = torch.cat([a - a.mean(0), b - b.mean(0)]).numpy()
    _, expected = sk.ledoit_wolf(centred, assume_centered=True)
    assert router.alpha == pytest.approx(expected, rel=1e-7)
    cov = router.scatter / router.n_within
    assert ledoit_wolf_shrinkage(cov, router.fourth_within, router.n_within) == pytest.approx(expected, rel=1e-7)


def test_well_separated_centroids_route_right_with_rbf_and_lda():
    tasks = [_samples(10 * np.eye(4)[i], 50, seed=i) for i in range(3)]
    for kind in ("rbf", "lda"):
        router = CentroidRouter(kind)
        _fit(router, tasks)
        assert _accuracy(router, tasks) == 1.0


def test_lda_beats_rbf_where_euclidean_distance_fails():
    # means differ by (1, 1) but the within-task spread is large along x and tiny along y:
    # Euclidean distance is dominated by the spread, Mahalanobis by the separation along y
    d = 6
    spread = torch.diag(torch.tensor([5.0, 0.1, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    mean_b = [1.0, 1.0, 0, 0, 0, 0]
    train = [_samples([0.0] * d, 400, spread, seed=10), _samples(mean_b, 400, spread, seed=11)]
    test = [_samples([0.0] * d, 300, spread, seed=12), _samples(mean_b, 300, spread, seed=13)]
    rbf, lda = CentroidRouter("rbf"), CentroidRouter("lda")
    _fit(rbf, train)
    _fit(lda, train)
    acc_rbf, acc_lda = _accuracy(rbf, test), _accuracy(lda, test)
    assert acc_lda > 0.95
    assert acc_rbf < 0.75


def test_data_sigma_is_half_the_rms_within_task_distance():
    tasks = [_samples([0, 0, 0], 100, seed=4), _samples([6, 0, 0], 100, seed=5)]
    rbf = CentroidRouter("rbf")
    _fit(rbf, tasks)
    mean_sq = sum(float(((x - x.mean(0)) ** 2).sum()) for x in tasks) / 200
    assert math.sqrt(rbf.sigma2()) == pytest.approx(0.5 * math.sqrt(mean_sq))
    lda = CentroidRouter("lda", shrinkage=0.0)
    _fit(lda, tasks)
    assert lda.sigma2() == pytest.approx(0.25 * 3, rel=1e-6)  # mean squared Mahalanobis = d without shrinkage
    fixed = CentroidRouter("rbf", sigma=2.0)
    assert fixed.sigma2() == 4.0
    empty = CentroidRouter("rbf")
    assert empty.sigma2(fallback_sq_dist=16.0) == 4.0


def test_weights_follow_the_rbf_formula_and_masks():
    router = CentroidRouter("rbf", sigma=1.5)
    cents = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    q = torch.tensor([[1.0, 0.5], [0.2, 0.1], [5.0, 5.0]])
    cand = torch.tensor([[True, True, True], [True, True, False], [True, True, True]])
    has_image = torch.tensor([True, True, False])
    first = torch.tensor([0, 0, 2])
    pi, choice = router.weights(q, cents, cand, first, has_image)
    d2 = ((q[0, None].double() - cents) ** 2).sum(1)
    torch.testing.assert_close(pi[0], torch.softmax(-d2 / (2 * 1.5 ** 2), 0).float())
    assert pi[1, 2] == 0 and pi[1].sum() == pytest.approx(1.0)
    assert pi[2].tolist() == [0.0, 0.0, 1.0] and choice[2] == 2  # no image: the group's first expert


def test_top_k_keeps_the_k_largest():
    router = CentroidRouter("rbf", sigma=3.0, top_k=1)
    cents = torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64)
    pi, choice = router.weights(torch.tensor([[0.9]]), cents, torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, dtype=torch.long))
    assert pi.tolist() == [[0.0, 1.0, 0.0]] and choice.tolist() == [1]


def test_gradient_reaches_a_trainable_centroid_row_only():
    router = CentroidRouter("rbf", sigma=1.0)
    fixed = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    row = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    cents = torch.cat([fixed, row.double()[None]])
    pi, _ = router.weights(torch.tensor([[0.5, 0.2]]), cents, torch.ones(1, 2, dtype=torch.bool), torch.zeros(1, dtype=torch.long))
    pi[0, 0].backward()
    assert row.grad is not None and row.grad.abs().sum() > 0


def test_incremental_commits_equal_the_pooled_statistics_and_state_round_trips():
    tasks = [_samples([i, -i, 2 * i, 0], 30 + 10 * i, seed=20 + i) for i in range(3)]
    router = CentroidRouter("lda")
    _fit(router, tasks)
    pooled = sum((x - x.mean(0)).T @ (x - x.mean(0)) for x in tasks)
    torch.testing.assert_close(router.scatter, pooled)
    router.commit(3, FeatureMoments(), trained=torch.tensor([9.0, 9, 9, 9]))  # a trained centroid, no images
    tensors, meta = router.state()
    fresh = CentroidRouter("lda")
    fresh.load_state(tensors, meta)
    q = torch.cat(tasks)
    cand = torch.ones(len(q), 4, dtype=torch.bool)
    first = torch.zeros(len(q), dtype=torch.long)
    a = router.weights(q, _centroids(router, 4), cand, first)
    b = fresh.weights(q, _centroids(fresh, 4), cand, first)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert fresh.centroid(3).tolist() == [9.0] * 4
