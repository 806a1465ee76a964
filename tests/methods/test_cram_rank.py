"""Adaptive-rank allocation (docs/DESIGN.md §3, §8): equals a truncated SVD, floors, caps, novelty."""
import time

import torch

from cram_ray.methods.cram.rank import allocate, buffer_svd, history_basis, orthonormal_basis

SCALE_BUF, SCALE_EXPERT = 2.0, 2.0


def _buffer(d_out, d_in, r, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, d_in, generator=g, dtype=dtype) / d_in ** 0.5, torch.randn(d_out, r, generator=g, dtype=dtype)


def _designed_buffer(S, V, d_out, seed=0):
    """A buffer whose update scale_buf * B A has singular values S and right vectors V (rows)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(d_out, len(S), generator=g, dtype=torch.float64))
    B = U * torch.as_tensor(S, dtype=torch.float64) / SCALE_BUF
    return V.clone(), B


def _truncated(M, k):
    U, S, Vh = torch.linalg.svd(M)
    return U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]


def test_no_history_equals_the_truncated_svd_of_the_probe_update():
    A, B = _buffer(24, 20, 8)
    for k in (1, 3, 8):
        A_new, B_new = allocate(A, B, SCALE_BUF / SCALE_EXPERT, [], 0.0, 0.5, k, k)
        assert A_new.shape == (k, 20) and B_new.shape == (24, k)
        torch.testing.assert_close(SCALE_EXPERT * B_new @ A_new, _truncated(SCALE_BUF * B @ A, k))


def test_expert_scale_differs_from_buffer_scale():
    A, B = _buffer(12, 10, 6, seed=3)
    scale_buf, scale_expert = 3.0, 0.5
    A_new, B_new = allocate(A, B, scale_buf / scale_expert, [], 0.0, 0.5, 4, 4)
    torch.testing.assert_close(scale_expert * B_new @ A_new, _truncated(scale_buf * B @ A, 4))


def test_buffer_svd_matches_the_dense_svd():
    A, B = _buffer(30, 18, 5, seed=1)
    U, S, V = buffer_svd(A, B, 2.0)
    torch.testing.assert_close(S, torch.linalg.svdvals(2.0 * B @ A)[:5])
    torch.testing.assert_close(U @ torch.diag(S) @ V, 2.0 * B @ A)


def test_thresholds_cap_and_floor():
    d = 16
    V = torch.eye(d, dtype=torch.float64)[:6]
    S = [3.0, 2.0, 1.0, 0.5, 0.05, 0.01]
    A, B = _designed_buffer(S, V, d_out=12)
    rank = lambda **kw: allocate(A, B, SCALE_BUF, [], **kw)[0].shape[0]  # noqa: E731
    assert rank(tau_alloc=0.08, tau_novel=0.5, rank_min=1, rank_max=10) == 4  # S_j > 0.08
    assert rank(tau_alloc=0.08, tau_novel=0.5, rank_min=1, rank_max=2) == 2  # cap
    assert rank(tau_alloc=10.0, tau_novel=0.5, rank_min=3, rank_max=4) == 3  # floor
    assert rank(tau_alloc=0.0, tau_novel=0.5, rank_min=1, rank_max=10) == 6
    A_rel, _ = allocate(A, B, SCALE_BUF, [], 0.0, 0.5, 1, 10, tau_rel=0.4)  # S_j > 1.2
    assert A_rel.shape[0] == 2
    # the floor tops up with the largest remaining directions, in order
    A_new, B_new = allocate(A, B, SCALE_BUF, [], 10.0, 0.5, 3, 4)
    torch.testing.assert_close(B_new.norm(dim=0) ** 2, torch.tensor(S[:3], dtype=torch.float64))


def test_directions_inside_the_historical_span_are_dropped():
    d = 32
    g = torch.Generator().manual_seed(7)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    V = basis[:, :5].T  # (5, d) orthonormal right vectors
    S = [5.0, 4.0, 3.0, 2.0, 1.0]
    A, B = _designed_buffer(S, V, d_out=20)
    mix = torch.randn(2, 2, generator=g, dtype=torch.float64)
    A_hist = [mix @ V[:2], torch.zeros(0, d, dtype=torch.float64)]  # old expert spans the top-2 directions
    A_new, B_new = allocate(A, B, SCALE_BUF, A_hist, 0.08, 0.5, 2, 5)
    assert A_new.shape[0] == 3  # directions 2, 3, 4 survive
    torch.testing.assert_close(A_new @ A_hist[0].T, torch.zeros(3, 2, dtype=torch.float64), atol=1e-10, rtol=0)
    kept_S = B_new.norm(dim=0) * A_new.norm(dim=1)  # ||b_j|| ||a_j|| = S_j
    torch.testing.assert_close(kept_S, torch.tensor(S[2:], dtype=torch.float64))
    # the cap applies before the novelty filter: of the top 4 candidates, 2 are novel
    assert allocate(A, B, SCALE_BUF, A_hist, 0.08, 0.5, 1, 4)[0].shape[0] == 2
    # the floor tops up with the largest remaining directions, orthogonalised against history
    A_floor, _ = allocate(A, B, SCALE_BUF, A_hist, 3.5, 0.5, 2, 4)
    assert A_floor.shape[0] == 2
    torch.testing.assert_close(A_floor @ A_hist[0].T, torch.zeros(2, 2, dtype=torch.float64), atol=1e-8, rtol=0)


def test_partially_novel_directions_are_orthogonalised_and_normalised():
    A, B = _buffer(16, 24, 6, seed=5)
    A_hist = [torch.randn(3, 24, dtype=torch.float64)]
    A_new, B_new = allocate(A, B, 1.0, A_hist, 0.0, 0.1, 1, 6)
    Q = history_basis(A_hist, 24)
    torch.testing.assert_close(A_new @ Q, torch.zeros(A_new.shape[0], Q.shape[1], dtype=torch.float64), atol=1e-10, rtol=0)
    _, S, _ = buffer_svd(A, B, 1.0)
    k = A_new.shape[0]
    torch.testing.assert_close(A_new.norm(dim=1), S[:k].sqrt())  # rows are sqrt(S) * unit vectors
    torch.testing.assert_close(B_new.norm(dim=0), S[:k].sqrt())


def test_novelty_threshold_one_rejects_everything_but_the_floor():
    A, B = _buffer(10, 12, 5, seed=2)
    A_new, _ = allocate(A, B, 1.0, [torch.randn(2, 12, dtype=torch.float64)], 0.0, 1.0, 2, 5)
    assert A_new.shape[0] == 2


def test_dtype_is_preserved():
    A, B = _buffer(8, 8, 4, dtype=torch.float32)
    A_new, B_new = allocate(A, B, 1.0, [], 0.0, 0.5, 2, 3)
    assert A_new.dtype == torch.float32 and B_new.dtype == torch.float32


def test_orthonormal_basis_drops_null_directions():
    M = torch.randn(10, 3, dtype=torch.float64)
    M = torch.cat([M, M[:, :1] + M[:, 1:2]], dim=1)  # rank 3
    Q = orthonormal_basis(M)
    assert Q.shape == (10, 3)
    torch.testing.assert_close(Q.T @ Q, torch.eye(3, dtype=torch.float64))
    assert history_basis([], 7).shape == (7, 0)


def test_never_forms_the_full_matrix_at_4096():
    A, B = _buffer(4096, 4096, 48, seed=11, dtype=torch.float32)
    hist = [torch.randn(8, 4096) for _ in range(3)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # no OpenMP contention on a shared machine
    try:
        t0 = time.perf_counter()
        A_new, B_new = allocate(A, B, 1.0, hist, 0.08, 0.99, 4, 10)
        elapsed = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    assert 4 <= A_new.shape[0] <= 10 and B_new.shape == (4096, A_new.shape[0])
    # ~0.05 s here; forming and decomposing the dense 4096 x 4096 update costs orders of magnitude more
    assert elapsed < 5.0, f"allocate took {elapsed:.2f}s at 4096x4096: a dense SVD?"
