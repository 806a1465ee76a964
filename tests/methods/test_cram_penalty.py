"""The decoupling penalty on plain tensors."""
import torch

from cram_ray.methods.cram.penalty import decoupling_penalty, image_token_mask, layer_energy, output_basis


def test_image_token_mask_averages_over_image_positions():
    ids = torch.tensor([[9, 9, 1, 2], [1, 2, 3, 4]])
    mask = image_token_mask(ids, 9)
    assert mask.tolist() == [[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]


def test_output_basis_is_orthonormal_over_the_b_columns():
    B1, B2 = torch.randn(10, 2), torch.randn(10, 3)
    Q = output_basis([B1, B2])
    assert Q.shape == (10, 5)
    torch.testing.assert_close(Q.T @ Q, torch.eye(5, dtype=torch.float64))
    torch.testing.assert_close(Q @ Q.T @ B1.double(), B1.double())


def test_energy_is_the_squared_projection_and_vanishes_when_orthogonal():
    h = torch.randn(4, 6)
    A, B = torch.randn(2, 6), torch.randn(8, 2)
    Q = output_basis([torch.randn(8, 3)])
    z = 2.0 * h @ A.T @ B.T
    torch.testing.assert_close(layer_energy(h, A, B, 2.0, Q), ((z.double() @ Q) ** 2).sum(1).float())
    Q_perp = output_basis([B])  # z lies in span(B): all its energy is inside
    torch.testing.assert_close(layer_energy(h, A, B, 2.0, Q_perp), (z ** 2).sum(1), rtol=1e-4, atol=1e-4)
    B_orth = torch.linalg.qr(torch.cat([Q.float(), torch.randn(8, 2)], 1))[0][:, 3:5]  # outside span(Q)
    torch.testing.assert_close(layer_energy(h, A, B_orth, 2.0, Q), torch.zeros(4), atol=1e-5, rtol=0)


def test_penalty_is_gamma_weighted_mean_and_zero_without_history():
    h = [torch.randn(3, 6), torch.randn(3, 6)]
    factors = [(torch.randn(2, 6, requires_grad=True), torch.randn(8, 2, requires_grad=True)) for _ in range(2)]
    bases = [output_basis([torch.randn(8, 2)]) for _ in range(2)]
    gamma = torch.tensor([0.0, 0.5, 1.0], requires_grad=True)
    loss = decoupling_penalty(h, factors, bases, gamma, 2.0)
    manual = torch.stack([gamma * layer_energy(x, A, B, 2.0, Q) for x, (A, B), Q in zip(h, factors, bases)]).mean()
    torch.testing.assert_close(loss, manual)
    loss.backward()
    assert all(p.grad is not None for f in factors for p in f) and gamma.grad is not None
    assert decoupling_penalty([], [], [], gamma, 2.0).item() == 0.0


def test_captured_inputs_are_treated_as_constants():
    h = torch.randn(2, 6, requires_grad=True)
    A, B = torch.randn(2, 6, requires_grad=True), torch.randn(8, 2, requires_grad=True)
    decoupling_penalty([h], [(A, B)], [output_basis([torch.randn(8, 2)])], torch.ones(2), 2.0).backward()
    assert h.grad is None and A.grad is not None
