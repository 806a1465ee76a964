"""SAME: the math pieces on known matrices, then the method's routing, surgery and state."""
import torch

from baselines_util import (
    assert_same_state, fresh, grads_only_on, logits_of, make_batch, make_cfg, mixed_batch, model_inputs,
    roundtrip, run_task, snapshot, train_steps,
)
from cram_ray.data.records import TaskInfo
from cram_ray.methods import make_method
from cram_ray.methods.same import (
    Same, activation_mask, curvature_transform, energy_rank, inference_weights, minmax, mixed_delta,
    project_router_grad, randomized_range_finder, sketch, spectral_factors, training_weights,
)



def _orthonormal(d, k, seed):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q[:, :k]


# -- math -------------------------------------------------------------------------------------
def test_energy_rank_keeps_directions_up_to_the_energy():
    v = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.5])
    assert energy_rank(v, 0.9) == 3  # 0.5, 0.8, 0.9
    assert energy_rank(v, 0.5) == 1 and energy_rank(v, 0.91) == 4 and energy_rank(v, 1.0) == 5
    assert energy_rank(torch.zeros(3), 0.9) == 1


def test_curvature_scaling_uses_the_sketch_std_and_equals_the_formula():
    n, d, mu = 400, 6, 0.9
    Q = _orthonormal(d, d, 0)
    std = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.3, 0.2], dtype=torch.float64)
    Z = torch.randn(n, d, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    Z = Z - Z.mean(0)
    Z = Z @ torch.linalg.inv(torch.linalg.cholesky(Z.T @ Z / (n - 1))).T  # sample covariance exactly I
    X = 3.0 + Z @ torch.diag(std) @ Q.T  # std[j] along Q[:, j], offset removed by the centring
    V, S = sketch(X, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(S, std)  # a standard deviation, not a singular value of X
    torch.testing.assert_close((V.T @ Q).abs(), torch.eye(d, dtype=torch.float64))
    r = energy_rank(S.pow(2), 0.9)  # energies 16, 4, 1, ...: 16 / 21.38 < 0.9, 20 / 21.38 >= 0.9 -> 2
    assert r == 2
    U, S = V[:, :r], S[:r]
    G = torch.randn(3, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # A gradient (r, d_in)
    Uk = Q[:, :2]
    M = Uk @ torch.diag(1.0 / (std[:2] + mu)) @ Uk.T + (torch.eye(d, dtype=torch.float64) - Uk @ Uk.T) / mu
    torch.testing.assert_close(curvature_transform(G, U, S, mu), G @ M)
    torch.testing.assert_close(curvature_transform(G, U, S, mu)[0], M @ G[0])  # row by row: M g


def test_range_finder_recovers_a_known_spectrum_and_directions():
    n, d = 40, 12
    P = _orthonormal(n, 5, 2)
    V = _orthonormal(d, 5, 3)
    s = torch.tensor([9.0, 5.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    X = P @ torch.diag(s) @ V.T  # rank 5
    V_hat, S_hat = randomized_range_finder(X, 3, generator=torch.Generator().manual_seed(0))
    assert V_hat.shape == (d, 3)
    torch.testing.assert_close(S_hat, s[:3])
    torch.testing.assert_close((V_hat.T @ V[:, :3]).abs(), torch.eye(3, dtype=torch.float64))
    V_all, S_all = randomized_range_finder(X, 64, generator=torch.Generator().manual_seed(0))  # k capped at d
    assert V_all.shape == (d, d) and S_all.shape == (d,)
    torch.testing.assert_close(S_all[:5], s)


def test_router_gradient_projection_scales_inside_and_keeps_outside():
    d = 8
    V = _orthonormal(d, 3, 4)
    f = torch.tensor([0.8, 1.0, 1.2], dtype=torch.float64)
    G = torch.randn(4, d, generator=torch.Generator().manual_seed(5), dtype=torch.float64)  # (E, d)
    out = project_router_grad(G, V, f)
    P = V @ V.T
    outside = torch.eye(d, dtype=torch.float64) - P
    torch.testing.assert_close(out @ outside, G @ outside)  # out-of-subspace component untouched
    torch.testing.assert_close(out @ V, (G @ V) * f)  # each in-subspace coordinate scaled by its factor
    torch.testing.assert_close(project_router_grad(G, V, torch.ones(3, dtype=torch.float64)), G)


def test_spectral_factors_smooth_adjacent_values_and_normalise_by_the_max():
    S = torch.tensor([8.0, 4.0, 2.0, 1.0, 1.0])
    # window 2: smooth = (8, 6, 3, 1.5, 1); inv / max(inv) = (1/8, 1/6, 1/3, 2/3, 1)
    f = spectral_factors(S, 2, 0.0, 10.0)
    torch.testing.assert_close(f, torch.tensor([1 / 8, 1 / 6, 1 / 3, 2 / 3, 1.0], dtype=torch.float64), rtol=1e-5, atol=0)
    f = spectral_factors(S, 2, 0.8, 1.2)
    assert f.tolist()[:3] == [0.8, 0.8, 0.8] and float(f.max()) <= 1.0 and f[-1] == 1.0  # [0.8, 1.2] acts as [0.8, 1]
    # window 3: smooth = (8, 6, 14/3, 7/3, 4/3)
    smooth = torch.tensor([8.0, 6.0, 14 / 3, 7 / 3, 4 / 3], dtype=torch.float64)
    inv = 1 / (smooth + 1e-6)
    torch.testing.assert_close(spectral_factors(S, 3, 0.0, 10.0), inv / inv.max())


def test_mixing_has_the_cross_terms():
    from cram_ray.experts.adapter import LowRank
    g = torch.Generator().manual_seed(8)
    experts = [LowRank(torch.randn(2, 5, generator=g), torch.randn(4, 2, generator=g)) for _ in range(3)]
    x = torch.randn(2, 3, 5, generator=g)
    w = torch.tensor([[0.5, 0.3, 0.2], [0.0, 1.0, 0.0]])
    for b in range(2):
        A = sum(w[b, i] * experts[i].A for i in range(3))
        B = sum(w[b, i] * experts[i].B for i in range(3))
        torch.testing.assert_close(mixed_delta(x, w, experts)[b], x[b] @ A.T @ B.T)
    # one-hot weights: exactly that expert's own update
    torch.testing.assert_close(mixed_delta(x, w, experts)[1], experts[1].delta(x[1]))


def test_activation_mask_is_exactly_the_low_scores_and_never_the_current_expert():
    util = torch.tensor([0.1, 0.5, 0.3, 0.1])  # minmax: 0, 1, .5, 0
    imp = torch.tensor([1.0, 3.0, 1.0, 5.0])  # minmax: 0, .5, 0, 1
    # scores: 0, .5, .5, -1 -> below 0.1: experts 0 and 3; 3 is the current task's
    assert activation_mask(util, imp, 0.1, current=3).tolist() == [True, False, False, False]
    assert activation_mask(util, imp, 0.1, current=1).tolist() == [True, False, False, True]
    assert activation_mask(util, imp, 0.6, current=0).tolist() == [False, True, True, True]
    assert minmax(torch.ones(3)).tolist() == [0.0, 0.0, 0.0]


def test_inference_weights_top2_of_prior_times_softmax_over_e():
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    prior = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])
    p = torch.softmax(logits / 3, -1) * prior
    w = inference_weights(logits, prior, top_k=2)
    keep0 = p[0].topk(2).indices
    expected = torch.zeros(2, 3)
    expected[0, keep0] = p[0, keep0] / p[0, keep0].sum()
    expected[1, [0, 2]] = p[1, [0, 2]] / p[1, [0, 2]].sum()
    torch.testing.assert_close(w, expected)
    assert ((w > 0).sum(-1) == 2).all()
    masked = training_weights(torch.zeros(1, 3), torch.tensor([False, True, False]))
    assert masked.tolist() == [[0.5, 0.0, 0.5]]


# -- the method -------------------------------------------------------------------------------
def test_ffn_targets_and_training_routes_softly_over_the_tasks_so_far():
    cfg = make_cfg("same")
    assert isinstance(make_method(cfg), Same)
    model, m = fresh(cfg)
    assert sorted({n.rsplit(".", 1)[1] for n in m.layers}) == ["down_proj", "gate_proj", "up_proj"]
    assert len(m.layers) == 6
    g = torch.Generator().manual_seed(0)
    run_task(model, m, 0, g)
    assert m.params_added() == m.slots.numel(0) + sum(l.inner.in_features for l in m.layers.values())
    m.begin_task(TaskInfo(1, "t1", "exact"))
    m.begin_train()
    batch = make_batch(1, g)
    m.route(batch, training=True)
    model(**model_inputs(batch)).loss.backward()
    for layer in m.layers.values():
        assert layer.weights.shape == (4, 2)
        torch.testing.assert_close(layer.weights.sum(-1), torch.ones(4))
    trainable = {id(p) for p in m.trainable_parameters()}
    routers = {id(p) for l in m.layers.values() for p in l.router.values()}
    assert trainable == {id(p) for t in (0, 1) for p in m.slots.params(t)} | routers
    assert not grads_only_on(model, trainable)


def test_the_router_averages_its_logits_over_the_prompt_tokens_only():
    model, m = fresh(make_cfg("same"))
    g = torch.Generator().manual_seed(1)
    run_task(model, m, 0, g)
    m.begin_task(TaskInfo(1, "t1", "exact"))
    m.begin_train()
    with torch.no_grad():
        for layer in m.layers.values():
            for row in layer.router.values():
                row.normal_()
    batch = make_batch(1, g)
    m.route(batch, training=True)
    model(**model_inputs(batch))
    layer = next(iter(m.layers.values()))
    prompt = (batch["attention_mask"].bool() & (batch["labels"] == -100)).float()
    x = layer.last_input
    mean_x = (prompt[..., None] * x).sum(1) / prompt.sum(1, keepdim=True)
    torch.testing.assert_close(layer.weights, torch.softmax(mean_x @ layer.rows(2).T, -1), rtol=1e-5, atol=1e-6)


def test_surgery_curvature_on_expert_A_and_spectral_projection_on_the_router():
    cfg = make_cfg("same", start=0, every=1)
    model, m = fresh(cfg)
    g = torch.Generator().manual_seed(2)
    run_task(model, m, 0, g)
    assert set(m.curvature) == set(m.layers)  # the previous task's input subspace, per layer
    m.begin_task(TaskInfo(1, "t1", "exact"))
    m.begin_train()
    batch = make_batch(1, g)
    m.route(batch, training=True)
    model(**model_inputs(batch)).loss.backward()
    raw_A = {n: [l.inner.slot(t).A.grad.clone() for t in (0, 1)] for n, l in m.layers.items()}
    raw_router = {n: torch.stack([l.router["0"].grad, l.router["1"].grad]).clone() for n, l in m.layers.items()}
    m.before_optimizer_step(0)
    for name, layer in m.layers.items():
        U, S = m.curvature[name]
        for t in (0, 1):  # every trained expert, the old one included
            expected = curvature_transform(raw_A[name][t].double(), U, S, 0.9).float()
            torch.testing.assert_close(layer.inner.slot(t).A.grad, expected)
        st = m.stats[name]
        r = st.factors.shape[0]
        assert st.V is not None and st.S.shape[0] == st.V.shape[1] >= r
        assert ((st.factors >= 0.8) & (st.factors <= 1.0)).all() and st.factors[-1] == 1.0
        new = torch.stack([layer.router["0"].grad, layer.router["1"].grad])
        expected = project_router_grad(raw_router[name].double(), st.V[:, :r], st.factors).float()
        torch.testing.assert_close(new, expected)
        # the adaptive mask now follows the statistics of this step, and spares the current expert
        assert layer.mask.tolist() == activation_mask(st.util, st.imp, 0.1, 1).tolist()
        assert not layer.mask[1]


def test_no_curvature_scaling_on_the_first_task_and_before_the_spectral_start():
    model, m = fresh(make_cfg("same"))  # start = 10
    g = torch.Generator().manual_seed(3)
    m.begin_task(TaskInfo(0, "t0", "exact"))
    m.begin_train()
    batch = make_batch(0, g)
    m.route(batch, training=True)
    model(**model_inputs(batch)).loss.backward()
    raw = {n: l.inner.slot(0).A.grad.clone() for n, l in m.layers.items()}
    m.before_optimizer_step(3)
    for n, l in m.layers.items():
        assert torch.equal(l.inner.slot(0).A.grad, raw[n])
        assert m.stats[n].V is not None  # the first step sketches; the projection waits for the start


def test_masked_experts_get_no_routing_weight():
    model, m = fresh(make_cfg("same"))
    g = torch.Generator().manual_seed(4)
    for t in range(2):
        run_task(model, m, t, g)
    m.begin_task(TaskInfo(2, "t2", "exact"))
    m.begin_train()
    for layer in m.layers.values():
        layer.mask = torch.tensor([True, False, False])
    m.route(make_batch(2, g), training=True)
    model(**model_inputs(make_batch(2, g)))
    for layer in m.layers.values():
        assert (layer.weights[:, 0] == 0).all() and (layer.weights[:, 1:] > 0).all()


def test_old_experts_move_on_a_new_task_and_stay_bit_identical_with_freeze_old():
    for freeze_old in (False, True):
        model, m = fresh(make_cfg("same", start=1, every=2, freeze_old=freeze_old))
        g = torch.Generator().manual_seed(5)
        run_task(model, m, 0, g)
        old = snapshot(m.slots.params(0))
        run_task(model, m, 1, g, steps=4)
        same = [torch.equal(a, b) for a, b in zip(old, m.slots.params(0))]
        assert all(same) if freeze_old else not any(same)


def test_inference_prior_top2_and_routed_task():
    model, m = fresh(make_cfg("same"))
    g = torch.Generator().manual_seed(6)
    for t in range(3):
        run_task(model, m, t, g)
    truth = torch.tensor([2, 0, 1, 1, 0, 2])
    batch = mixed_batch(truth, g)
    del batch["labels"]  # an evaluation prompt
    logits_of(model, m, batch)
    prior = torch.softmax(28 * m.anchors.scores(batch, 0.2), -1).float()
    torch.testing.assert_close(m.routing.prior, prior)
    for layer in m.layers.values():
        mask = batch["attention_mask"].float()
        mask = mask / mask.sum(1, keepdim=True)
        logits = torch.einsum("bt,btd,ed->be", mask, layer.last_input, layer.rows(3))
        torch.testing.assert_close(layer.weights, inference_weights(logits, prior, 2))
        assert ((layer.weights > 0).sum(-1) <= 2).all()
    assert m.routed_task().tolist() == truth.tolist()


def test_state_round_trips_exactly_mid_task_and_after(tmp_path):
    cfg = make_cfg("same", start=1, every=1)
    model, m = fresh(cfg)
    g = torch.Generator().manual_seed(7)
    run_task(model, m, 0, g)
    m.begin_task(TaskInfo(1, "t1", "exact"))
    m.begin_train()
    train_steps(model, m, [make_batch(1, g) for _ in range(3)])  # statistics, sketches and masks in flight
    model2, m2 = roundtrip(m, cfg, tmp_path / "mid")
    assert_same_state(m, m2)
    with torch.no_grad():
        m.observe(make_batch(1, g, size=8), "aggregate")
    m.end_task()
    model3, m3 = roundtrip(m, cfg, tmp_path / "end")
    assert_same_state(m, m3)
    batch = make_batch(1, g)
    assert torch.equal(logits_of(model, m, batch), logits_of(model3, m3, batch))
    assert torch.equal(m.routed_task(), m3.routed_task())
