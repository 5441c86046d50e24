"""Tests of cet.lanczos against numpy.linalg.eigh and scipy.sparse.linalg.eigsh (float64)."""

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import LinearOperator, eigsh

from cet.lanczos import lanczos, stochastic_lanczos_quadrature


def random_symmetric(n, seed):
    generator = torch.Generator().manual_seed(seed)
    factor = torch.randn(n, n, generator=generator, dtype=torch.float64)
    return (factor + factor.T) / 2


def with_spectrum(eigenvalues, seed):
    """Return Q diag(eigenvalues) Q^T for a random orthogonal Q."""
    generator = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q @ torch.diag(torch.as_tensor(eigenvalues, dtype=torch.float64)) @ q.T


def random_start(n, seed):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def descending_eigenvalues(matrix):
    return torch.from_numpy(np.linalg.eigh(matrix.numpy())[0][::-1].copy())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_run_gives_all_eigenvalues(seed):
    matrix = random_symmetric(30, seed)

    result = lanczos(lambda v: matrix @ v, random_start(30, seed + 100), 30)

    assert result.num_steps == 30
    scale = torch.linalg.matrix_norm(matrix, ord=2).item()
    torch.testing.assert_close(result.ritz_values, descending_eigenvalues(matrix), rtol=0, atol=1e-10 * scale)


@pytest.mark.parametrize("seed", [0, 1])
def test_top_three_converge_on_n200(seed):
    # A spectrum with a separated top lets 40 steps resolve the top three eigenvalues.
    rest = torch.linspace(-1.0, 1.0, 197, dtype=torch.float64)
    matrix = with_spectrum(torch.cat([torch.tensor([10.0, 8.0, 6.5], dtype=torch.float64), rest]), seed)
    expected = descending_eigenvalues(matrix)[:3]

    result = lanczos(lambda v: matrix @ v, random_start(200, seed + 100), 40)
    values, _ = result.top(3)

    torch.testing.assert_close(values, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("num_steps", [8, 20])
def test_residual_estimates_match_true(num_steps):
    matrix = random_symmetric(60, 3)

    result = lanczos(lambda v: matrix @ v, random_start(60, 4), num_steps)

    vectors = result.ritz_vectors
    true_residuals = torch.linalg.vector_norm(matrix @ vectors - vectors * result.ritz_values, dim=0)
    scale = torch.linalg.matrix_norm(matrix, ord=2).item()
    torch.testing.assert_close(result.residuals, true_residuals, rtol=1e-8, atol=1e-10 * scale)


def test_residual_estimates_small_when_converged():
    matrix = random_symmetric(30, 5)

    result = lanczos(lambda v: matrix @ v, random_start(30, 6), 30)

    vectors = result.ritz_vectors
    true_residuals = torch.linalg.vector_norm(matrix @ vectors - vectors * result.ritz_values, dim=0)
    scale = torch.linalg.matrix_norm(matrix, ord=2).item()
    assert result.residuals.max() <= 1e-10 * scale
    assert true_residuals.max() <= 1e-10 * scale


@pytest.mark.parametrize("num_steps", [5, 30])
def test_ritz_vectors_orthonormal(num_steps):
    matrix = random_symmetric(40, 7)

    result = lanczos(lambda v: matrix @ v, random_start(40, 8), num_steps)

    gram = result.ritz_vectors.T @ result.ritz_vectors
    torch.testing.assert_close(gram, torch.eye(num_steps, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("num_steps", [5, 40])
def test_ritz_vectors_face_start(num_steps):
    matrix = random_symmetric(40, 7)
    start = random_start(40, 8)

    result = lanczos(lambda v: matrix @ v, start, num_steps)

    assert (start @ result.ritz_vectors >= 0).all()


def test_ritz_signs_independent_of_eigh(monkeypatch):
    # Another LAPACK build may return any eigenvector of the tridiagonal matrix with the opposite sign.
    matrix = random_symmetric(30, 3)
    start = random_start(30, 4)
    expected = lanczos(lambda v: matrix @ v, start, 12)
    eigh = torch.linalg.eigh

    def eigh_with_other_signs(tridiagonal):
        values, vectors = eigh(tridiagonal)
        signs = torch.tensor([(-1.0) ** i for i in range(vectors.shape[1])], dtype=vectors.dtype)
        return values, vectors * signs

    monkeypatch.setattr(torch.linalg, "eigh", eigh_with_other_signs)
    result = lanczos(lambda v: matrix @ v, start, 12)

    torch.testing.assert_close(result.ritz_vectors, expected.ritz_vectors, rtol=0, atol=1e-12)


def test_tridiagonal_matches_ritz_values():
    matrix = random_symmetric(20, 9)

    result = lanczos(lambda v: matrix @ v, random_start(20, 10), 10)

    assert result.alpha.shape == (10,)
    assert result.beta.shape == (9,)
    tridiagonal = torch.diag(result.alpha) + torch.diag(result.beta, 1) + torch.diag(result.beta, -1)
    torch.testing.assert_close(result.ritz_values, descending_eigenvalues(tridiagonal), rtol=0, atol=1e-12)


def test_identity_breaks_down_after_one_step():
    result = lanczos(lambda v: v, random_start(10, 11), 5)

    assert result.breakdown
    assert result.num_steps == 1
    assert result.ritz_values.tolist() == pytest.approx([1.0], abs=1e-14)
    assert torch.isfinite(result.ritz_vectors).all()
    assert torch.isfinite(result.residuals).all()
    assert result.residuals.abs().max() == 0


def test_zero_operator_gives_zero():
    result = lanczos(torch.zeros_like, random_start(10, 12), 5)

    assert result.breakdown
    assert result.ritz_values.tolist() == [0.0]
    assert torch.isfinite(result.ritz_vectors).all()
    assert torch.isfinite(result.residuals).all()


def test_repeated_eigenvalue_found_once():
    # From one start vector the Krylov space contains one eigenvector per distinct eigenvalue, so its dimension is 5.
    diagonal = torch.tensor([5.0, 5.0, 3.0, 2.0, 1.0, 1.0, 0.5], dtype=torch.float64)

    result = lanczos(lambda v: diagonal * v, random_start(7, 13), 7)

    assert result.breakdown
    assert result.num_steps == 5
    torch.testing.assert_close(result.ritz_values, torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64), rtol=0, atol=1e-12)


def test_repeated_top_eigenvalue_on_larger_matrix():
    # Rounding can put weight on the other directions of a multiple eigenvalue, so Lanczos may find a
    # second, partly converged copy of it. Such a copy is genuine when its Ritz vector is orthogonal to the
    # first and its residual estimate is true. A ghost copy, as plain Lanczos makes, fails the first check.
    eigenvalues = torch.cat([torch.tensor([4.0, 4.0, 4.0], dtype=torch.float64), torch.linspace(-1.0, 1.0, 47, dtype=torch.float64)])
    matrix = with_spectrum(eigenvalues, 14)

    result = lanczos(lambda v: matrix @ v, random_start(50, 15), 25)

    assert result.ritz_values[0].item() == pytest.approx(4.0, rel=1e-10)
    assert result.ritz_values.max().item() <= 4.0 * (1 + 1e-12)
    gram = result.ritz_vectors.T @ result.ritz_vectors
    torch.testing.assert_close(gram, torch.eye(result.num_steps, dtype=torch.float64), rtol=0, atol=1e-12)
    vectors = result.ritz_vectors
    true_residuals = torch.linalg.vector_norm(matrix @ vectors - vectors * result.ritz_values, dim=0)
    torch.testing.assert_close(result.residuals, true_residuals, rtol=1e-6, atol=1e-9)


def test_opposite_dominant_pair_found():
    eigenvalues = torch.cat([torch.tensor([10.0, -10.0], dtype=torch.float64), torch.linspace(-1.0, 1.0, 98, dtype=torch.float64)])
    matrix = with_spectrum(eigenvalues, 16)

    result = lanczos(lambda v: matrix @ v, random_start(100, 17), 30)
    top_value, top_vector = result.top(1)
    bottom_value, bottom_vector = result.bottom(1)

    assert top_value.item() == pytest.approx(10.0, rel=1e-10)
    assert bottom_value.item() == pytest.approx(-10.0, rel=1e-10)
    torch.testing.assert_close(matrix @ top_vector, 10.0 * top_vector, rtol=0, atol=1e-6)
    torch.testing.assert_close(matrix @ bottom_vector, -10.0 * bottom_vector, rtol=0, atol=1e-6)


def test_bottom_is_ascending():
    matrix = random_symmetric(15, 18)

    result = lanczos(lambda v: matrix @ v, random_start(15, 19), 15)
    values, vectors = result.bottom(3)

    torch.testing.assert_close(values, result.ritz_values[-3:].flip(0), rtol=0, atol=0)
    torch.testing.assert_close(vectors, result.ritz_vectors[:, -3:].flip(1), rtol=0, atol=0)


def test_matches_scipy_eigsh():
    matrix = random_symmetric(80, 20).numpy()
    operator = LinearOperator(matrix.shape, matvec=lambda v: matrix @ v, dtype=np.float64)
    expected_top = np.sort(eigsh(operator, k=3, which="LA", tol=1e-12)[0])[::-1]
    expected_bottom = np.sort(eigsh(operator, k=3, which="SA", tol=1e-12)[0])

    matrix_tensor = torch.from_numpy(matrix)
    result = lanczos(lambda v: matrix_tensor @ v, random_start(80, 21), 80)
    top, _ = result.top(3)
    bottom, _ = result.bottom(3)

    np.testing.assert_allclose(top.numpy(), expected_top, rtol=1e-9)
    np.testing.assert_allclose(bottom.numpy(), expected_bottom, rtol=1e-9)


def test_start_shape_is_kept():
    diagonal = torch.arange(1.0, 13.0, dtype=torch.float64).reshape(3, 4)
    start = torch.ones(3, 4, dtype=torch.float64)
    seen_shapes = []

    def matvec(v):
        seen_shapes.append(tuple(v.shape))
        return diagonal * v

    result = lanczos(matvec, start, 12)

    assert set(seen_shapes) == {(3, 4)}
    assert result.ritz_vectors.shape == (12, result.num_steps)
    assert result.ritz_values[0].item() == pytest.approx(12.0, rel=1e-12)


def test_num_steps_capped_at_dimension():
    matrix = random_symmetric(6, 22)

    result = lanczos(lambda v: matrix @ v, random_start(6, 23), 50)

    assert result.num_steps <= 6
    torch.testing.assert_close(result.ritz_values, descending_eigenvalues(matrix), rtol=0, atol=1e-10)


def test_float32_result_dtypes():
    matrix = random_symmetric(10, 24).float()

    result = lanczos(lambda v: matrix @ v, random_start(10, 25).float(), 10)

    assert result.ritz_values.dtype == torch.float64
    assert result.residuals.dtype == torch.float64
    assert result.ritz_vectors.dtype == torch.float32


@pytest.mark.parametrize("num_steps", [0, -1])
def test_rejects_nonpositive_num_steps(num_steps):
    with pytest.raises(ValueError, match="num_steps"):
        lanczos(lambda v: v, torch.ones(4, dtype=torch.float64), num_steps)


@pytest.mark.parametrize("value", [0.0, float("nan"), float("inf")])
def test_rejects_invalid_start(value):
    start = torch.ones(4, dtype=torch.float64)
    start[1] = value
    if value == 0.0:
        start.zero_()
    with pytest.raises(ValueError, match="start vector"):
        lanczos(lambda v: v, start, 3)


CASES = {
    "identity": (lambda v: v, 10, 5),
    "zero": (torch.zeros_like, 10, 5),
    "repeated": (lambda v: torch.tensor([5.0, 5.0, 3.0, 2.0, 1.0, 1.0, 0.5], dtype=torch.float64) * v, 7, 7),
    "random": (lambda v: random_symmetric(30, 26) @ v, 30, 12),
    "full": (lambda v: random_symmetric(12, 27) @ v, 12, 12),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_device_loop_matches_host_checks(case):
    # The loop without host synchronisation runs past a breakdown on zero vectors and cuts afterwards;
    # it must give the same Ritz pairs as the loop that stops on the host.
    matvec, n, num_steps = CASES[case]
    start = random_start(n, 28)

    on_host = lanczos(matvec, start, num_steps, host_checks=True)
    on_device = lanczos(matvec, start, num_steps, host_checks=False)

    assert on_device.breakdown == on_host.breakdown
    assert on_device.num_steps == on_host.num_steps
    for field in ("ritz_values", "ritz_vectors", "residuals", "alpha", "beta"):
        torch.testing.assert_close(getattr(on_device, field), getattr(on_host, field), rtol=1e-12, atol=1e-12)


def test_device_loop_rejects_nan():
    with pytest.raises(FloatingPointError, match="NaN"):
        lanczos(lambda v: v * float("nan"), random_start(5, 29), 3, host_checks=False)


def test_pairs_carry_true_residuals():
    matrix = random_symmetric(50, 30)

    result = lanczos(lambda v: matrix @ v, random_start(50, 31), 20)

    for which in ("top", "bottom"):
        values, vectors, residuals = result.pairs(3, which)
        true = torch.linalg.vector_norm(matrix @ vectors - vectors * values, dim=0)
        torch.testing.assert_close(residuals, true, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(result.pairs(3, "bottom")[0], result.bottom(3)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="which"):
        result.pairs(3, "largest")


def test_density_of_diagonal_operator_is_exact():
    # With Rademacher probes, (e_i^T z)^2 = 1, so each probe puts weight (multiplicity / n) on each distinct
    # eigenvalue exactly, and Lanczos finds all four distinct eigenvalues before it breaks down.
    diagonal = torch.tensor([-2.0] * 3 + [0.5] * 5 + [1.0] * 2 + [4.0] * 6, dtype=torch.float64)
    expected = {-2.0: 3 / 16, 0.5: 5 / 16, 1.0: 2 / 16, 4.0: 6 / 16}

    density = stochastic_lanczos_quadrature(lambda v: diagonal * v, diagonal, 3, 10, torch.Generator().manual_seed(32))

    assert density.num_probes == 3
    assert (density.weights >= 0).all()
    torch.testing.assert_close(density.weights.sum(dim=1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
    for probe in range(3):
        kept = density.weights[probe] > 1e-12
        nodes = density.nodes[probe][kept]
        weights = density.weights[probe][kept]
        assert len(nodes) == 4
        for node, weight in zip(nodes.tolist(), weights.tolist()):
            key = min(expected, key=lambda value: abs(value - node))
            assert node == pytest.approx(key, abs=1e-10)
            assert weight == pytest.approx(expected[key], abs=1e-10)
    for power in range(4):
        assert density.moment(power) == pytest.approx((diagonal**power).mean().item(), rel=1e-10)
    grid = torch.linspace(-6.0, 8.0, 2001, dtype=torch.float64)
    smoothed = density.smoothed(grid, 0.2)
    assert (smoothed * (grid[1] - grid[0])).sum().item() == pytest.approx(1.0, rel=1e-6)


def test_density_weights_on_random_operator():
    matrix = random_symmetric(40, 33)
    like = torch.zeros(40, dtype=torch.float64)

    density = stochastic_lanczos_quadrature(lambda v: matrix @ v, like, 4, 8, torch.Generator().manual_seed(34))

    assert (density.weights >= 0).all()
    torch.testing.assert_close(density.weights.sum(dim=1), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-12)
    # Gauss quadrature with 8 nodes is exact for polynomials up to degree 15: check A^2 against the probes.
    generator = torch.Generator().manual_seed(34)
    probes = (torch.randint(0, 2, (4, 40), generator=generator) * 2 - 1).double()
    quadratic = ((probes @ matrix) ** 2).sum(dim=1).mean().item() / 40
    assert density.moment(2) == pytest.approx(quadratic, rel=1e-10)
    assert density.nodes.min() >= descending_eigenvalues(matrix)[-1] - 1e-10


@pytest.mark.parametrize("host_checks", [True, False])
def test_residual_stop_ends_early(host_checks):
    eigenvalues = torch.cat([torch.tensor([10.0, 7.0, 5.0], dtype=torch.float64), torch.linspace(-1.0, 1.0, 197, dtype=torch.float64)])
    matrix = with_spectrum(eigenvalues, 35)

    result = lanczos(lambda v: matrix @ v, random_start(200, 36), 60, host_checks=host_checks, stop_residual=1e-6, stop_count=3)

    assert result.num_steps < 60
    assert not result.breakdown
    values, vectors, residuals = result.pairs(3)
    true = torch.linalg.vector_norm(matrix @ vectors - vectors * values, dim=0)
    assert (true <= 1e-6 * values.abs() * (1 + 1e-6)).all()
    torch.testing.assert_close(values, torch.tensor([10.0, 7.0, 5.0], dtype=torch.float64), rtol=1e-9, atol=0)


def test_residual_stop_same_on_both_paths():
    matrix = random_symmetric(80, 37)
    start = random_start(80, 38)

    on_host = lanczos(lambda v: matrix @ v, start, 80, host_checks=True, stop_residual=1e-3, stop_count=2)
    on_device = lanczos(lambda v: matrix @ v, start, 80, host_checks=False, stop_residual=1e-3, stop_count=2)

    assert on_host.num_steps == on_device.num_steps
    torch.testing.assert_close(on_device.ritz_values, on_host.ritz_values, rtol=1e-12, atol=1e-12)


def test_residual_stop_rejects_bad_tolerance():
    with pytest.raises(ValueError, match="stop_residual"):
        lanczos(lambda v: v, torch.ones(4, dtype=torch.float64), 3, stop_residual=0.0)
