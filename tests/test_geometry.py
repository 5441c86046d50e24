"""Tests of cet.geometry: inertia, quadric names, semi-axes and the low-rank surrogate, against dense algebra."""

import math

import pytest
import torch

from cet.geometry import (
    Inertia,
    LowRankSurrogate,
    classify_quadric,
    complement_projection,
    inertia,
    quadric_center,
    semi_axes,
    subspace_projection,
)


def values(*entries):
    return torch.tensor(entries, dtype=torch.float64)


@pytest.mark.parametrize(
    ("eigenvalues", "expected_inertia", "expected_name"),
    [
        ((3.0, 2.0, 0.5), Inertia(3, 0, 0), "elliptic paraboloid"),
        ((-0.5, -2.0, -3.0), Inertia(0, 3, 0), "inverted elliptic paraboloid"),
        ((3.0, -1.0, 0.5), Inertia(2, 1, 0), "hyperbolic paraboloid"),
        ((3.0, 0.0, 0.5), Inertia(2, 0, 1), "cylinder over an elliptic paraboloid"),
        ((-3.0, 0.0), Inertia(0, 1, 1), "cylinder over an inverted elliptic paraboloid"),
        ((3.0, 0.0, -1.0), Inertia(1, 1, 1), "cylinder over a hyperbolic paraboloid"),
        ((0.0, 0.0, 0.0), Inertia(0, 0, 3), "flat"),
        ((1.0, 0.5, -1e-12), Inertia(2, 0, 1), "cylinder over an elliptic paraboloid"),
        ((1.0, 1e-12), Inertia(1, 0, 1), "cylinder over an elliptic paraboloid"),
    ],
)
def test_inertia_and_quadric_name(eigenvalues, expected_inertia, expected_name):
    assert inertia(values(*eigenvalues)) == expected_inertia
    assert classify_quadric(values(*eigenvalues)) == expected_name


def test_inertia_tolerance_is_relative():
    # The same small eigenvalue is zero next to 1 and negative next to 1e-9.
    assert inertia(values(1.0, -1e-9)) == Inertia(1, 0, 1)
    assert inertia(values(1e-9, -1e-9)) == Inertia(1, 1, 0)


def test_inertia_accepts_list():
    assert inertia([2.0, -1.0]) == Inertia(1, 1, 0)


def test_inertia_counts_sum_to_size():
    eigenvalues = torch.linspace(-1.0, 1.0, 11, dtype=torch.float64)
    counts = inertia(eigenvalues)
    assert counts.positive + counts.negative + counts.zero == 11
    assert counts == Inertia(5, 5, 1)


def test_semi_axes_positive_eigenvalues():
    eigenvalues = values(4.0, 1.0, 0.25)
    level = 0.5

    lengths = semi_axes(eigenvalues, level)

    torch.testing.assert_close(lengths, torch.sqrt(2 * level / eigenvalues), rtol=1e-15, atol=0)


def test_semi_axes_zero_eigenvalue_infinite():
    lengths = semi_axes(values(2.0, 0.0, 1e-12), 1.0)

    assert math.isfinite(lengths[0].item())
    assert lengths[1].item() == math.inf
    assert lengths[2].item() == math.inf


def test_semi_axes_negative_eigenvalue_finite():
    lengths = semi_axes(values(2.0, -8.0), 1.0)

    assert not torch.isnan(lengths).any()
    assert torch.isfinite(lengths).all()
    assert lengths[1].item() == pytest.approx(math.sqrt(2 * 1.0 / 8.0), rel=1e-15)


def test_semi_axes_all_zero_infinite():
    lengths = semi_axes(values(0.0, 0.0), 1.0)

    assert torch.isinf(lengths).all()


def test_semi_axes_on_level_set():
    # A point at distance semi_axis along eigenvector i lies on {1/2 a^T diag(lam) a = level}.
    eigenvalues = values(3.0, 0.7, 0.1)
    level = 2.0

    lengths = semi_axes(eigenvalues, level)

    for i in range(3):
        assert 0.5 * eigenvalues[i].item() * lengths[i].item() ** 2 == pytest.approx(level, rel=1e-14)


def random_orthonormal(n, k, seed):
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q[:, :k]


def dense_surrogate(surrogate):
    """Return V diag(lam) V^T + rho (I - V V^T) as a dense matrix."""
    vectors = surrogate.eigenvectors
    n = vectors.shape[0]
    projector = vectors @ vectors.T
    return vectors @ torch.diag(surrogate.eigenvalues) @ vectors.T + surrogate.rho * (torch.eye(n, dtype=torch.float64) - projector)


@pytest.mark.parametrize(("n", "k", "rho"), [(12, 3, 0.4), (12, 1, 0.0), (20, 5, 2.5)])
def test_surrogate_cost_matches_dense(n, k, rho):
    surrogate = LowRankSurrogate(values(*torch.linspace(5.0, 1.0, k).tolist()), random_orthonormal(n, k, n + k), rho)
    dense = dense_surrogate(surrogate)
    error = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    cost = surrogate.quadratic_cost(error)

    assert cost.item() == pytest.approx(0.5 * (error @ dense @ error).item(), rel=1e-12)


@pytest.mark.parametrize(("n", "k", "rho"), [(12, 3, 0.4), (20, 5, 2.5)])
def test_surrogate_matvec_matches_dense(n, k, rho):
    surrogate = LowRankSurrogate(values(*torch.linspace(5.0, 1.0, k).tolist()), random_orthonormal(n, k, n + k), rho)
    dense = dense_surrogate(surrogate)
    vector = torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    product = surrogate.matvec(vector)

    torch.testing.assert_close(product, dense @ vector, rtol=1e-12, atol=1e-12)


def test_surrogate_flattens_shaped_error():
    surrogate = LowRankSurrogate(values(3.0, 1.0), random_orthonormal(12, 2, 3), 0.5)
    error = torch.randn(3, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    cost = surrogate.quadratic_cost(error)
    product = surrogate.matvec(error)

    assert cost.item() == pytest.approx(surrogate.quadratic_cost(error.reshape(-1)).item(), rel=1e-15)
    assert product.shape == (3, 4)


def test_from_trace_rho():
    eigenvalues = values(5.0, 3.0)
    surrogate = LowRankSurrogate.from_trace(eigenvalues, random_orthonormal(10, 2, 4), trace=12.0)

    assert surrogate.rho == pytest.approx((12.0 - 8.0) / (10 - 2), rel=1e-15)


def test_from_trace_rho_clipped_at_zero():
    surrogate = LowRankSurrogate.from_trace(values(5.0, 3.0), random_orthonormal(10, 2, 5), trace=6.0)

    assert surrogate.rho == 0.0


def test_from_trace_full_rank_rho_zero():
    surrogate = LowRankSurrogate.from_trace(values(5.0, 3.0, 1.0), random_orthonormal(3, 3, 6), trace=100.0)

    assert surrogate.rho == 0.0


@pytest.mark.parametrize("rho", [0.0, 7.0, -3.0])
def test_full_rank_surrogate_is_exact(rho):
    # With k = n the complement of the Ritz subspace is empty, so rho must not matter.
    n = 8
    generator = torch.Generator().manual_seed(7)
    factor = torch.randn(n, n, generator=generator, dtype=torch.float64)
    matrix = factor + factor.T
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    surrogate = LowRankSurrogate(eigenvalues, eigenvectors, rho)
    error = torch.randn(n, generator=generator, dtype=torch.float64)

    cost = surrogate.quadratic_cost(error)
    product = surrogate.matvec(error)

    assert cost.item() == pytest.approx(0.5 * (error @ matrix @ error).item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(product, matrix @ error, rtol=1e-10, atol=1e-12)


def test_quadric_center_solves_linear_system():
    generator = torch.Generator().manual_seed(5)
    basis, _ = torch.linalg.qr(torch.randn(5, 5, generator=generator, dtype=torch.float64))
    values = torch.tensor([3.0, 1.5, 0.7, -0.4, -2.0], dtype=torch.float64)
    hessian = basis @ torch.diag(values) @ basis.T
    gradient = torch.randn(5, generator=generator, dtype=torch.float64)

    center, minimum = quadric_center(values, basis, gradient)

    torch.testing.assert_close(center, -torch.linalg.solve(hessian, gradient))
    assert minimum == pytest.approx(-0.5 * (gradient @ torch.linalg.solve(hessian, gradient)).item())


def test_quadric_center_singular_raises():
    with pytest.raises(ValueError, match="singular"):
        quadric_center(torch.tensor([1.0, 0.0]), torch.eye(2, dtype=torch.float64), torch.ones(2))


def test_projections_split_error():
    generator = torch.Generator().manual_seed(6)
    vectors, _ = torch.linalg.qr(torch.randn(8, 3, generator=generator, dtype=torch.float64))
    error = torch.randn(2, 4, generator=generator, dtype=torch.float64)

    inside = subspace_projection(vectors, error)
    outside = complement_projection(vectors, error)

    assert inside.shape == error.shape
    torch.testing.assert_close(inside + outside, error)
    torch.testing.assert_close(vectors.T @ outside.reshape(-1), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_semi_axes_empty_level_raises():
    with pytest.raises(ValueError, match="empty level set"):
        semi_axes(values(2.0, 1.0), -1.0)
    with pytest.raises(ValueError, match="empty level set"):
        semi_axes(values(-2.0, -1.0), 1.0)


def test_known_zero_eigenvalues_make_cylinder():
    assert classify_quadric(values(3.0, 1.0), known_zero_eigenvalues=5) == "cylinder over an elliptic paraboloid"
    assert classify_quadric(values(3.0, 1.0)) == "elliptic paraboloid"


def test_quadric_center_near_zero_eigenvalue_raises():
    with pytest.raises(ValueError, match="singular"):
        quadric_center(values(1.0, 1e-17), torch.eye(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
